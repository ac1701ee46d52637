//! Exports the Lua C API (LuaJIT, linked statically by mlua) from the `moongate` binary, so a
//! Lua C module loaded through `package.cpath` (luarocks' or Debian's `lpeg.so`, ...) resolves
//! `lua_*`/`luaL_*` against the VM it runs in, as such modules do inside OpenResty's nginx.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        for symbols in ["lua_*", "luaL_*", "luaopen_*", "luaJIT_*"] {
            println!("cargo:rustc-link-arg-bins=-Wl,--export-dynamic-symbol={symbols}");
        }
    }
}
