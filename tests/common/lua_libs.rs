//! Debian's packaged OpenResty Lua libraries (lua-nginx-redis, lua-nginx-memcached, ...) for
//! tests that run them unmodified: the installed file under `/usr/share/lua/5.1/nginx/`, or
//! else the package's files fetched with `apt-get download` and unpacked with `dpkg -x` (the
//! packages depend on nginx-extras, which the tests do not want installed).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The path of `nginx/FILE` from Debian package `package`.
pub fn debian_lua_file(package: &str, file: &str) -> PathBuf {
    let installed = Path::new("/usr/share/lua/5.1/nginx").join(file);
    if installed.is_file() {
        return installed;
    }
    let cache = std::env::temp_dir().join("moongate-test-lua-libs");
    let cached = cache.join(file);
    if cached.is_file() {
        return cached;
    }
    std::fs::create_dir_all(&cache).expect("lua libs cache dir");
    let work = tempfile::tempdir_in(&cache).expect("download dir");
    let out = Command::new("apt-get")
        .args(["download", "-q", package])
        .current_dir(work.path())
        .output()
        .unwrap_or_else(|e| panic!("cannot run apt-get download {package}: {e}"));
    let deb = std::fs::read_dir(work.path())
        .expect("read download dir")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .unwrap_or_else(|| {
            panic!(
                "apt-get download {package} fetched nothing (run apt-get update?): {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let root = work.path().join("root");
    let st = Command::new("dpkg")
        .arg("-x")
        .arg(&deb)
        .arg(&root)
        .status()
        .expect("run dpkg -x");
    assert!(st.success(), "dpkg -x {} failed", deb.display());
    let unpacked = root.join("usr/share/lua/5.1/nginx").join(file);
    assert!(unpacked.is_file(), "{package} has no nginx/{file}");
    // A rename is atomic: test binaries racing here each end with the whole file.
    if let Some(parent) = cached.parent() {
        std::fs::create_dir_all(parent).expect("lua libs cache dir");
    }
    std::fs::rename(&unpacked, &cached).expect("move the library into the cache");
    cached
}

/// Copies Debian's `nginx/FILE` to `DIR/resty/FILE` (FILE may have folders:
/// `dns/resolver.lua`), so `require("resty.NAME")` finds it through a `DIR/?.lua` pattern in
/// `lua.package_path`.
pub fn install_as_resty(package: &str, file: &str, dir: &Path) {
    let src = debian_lua_file(package, file);
    let dst = dir.join("resty").join(file);
    if let Some(parent) = dst.parent() {
        std::fs::create_dir_all(parent).expect("resty dir");
    }
    std::fs::copy(&src, dst).expect("copy the library");
}

/// Copies Debian's `nginx/FILE` to `DIR/nginx/FILE`, Debian's own layout: its modules require
/// each other as `nginx.NAME` (lua-nginx-websocket's client requires
/// `nginx.websocket.protocol`), so a `DIR/?.lua` pattern finds them as Debian installs them.
pub fn install_as_debian(package: &str, file: &str, dir: &Path) {
    let src = debian_lua_file(package, file);
    let dst = dir.join("nginx").join(file);
    if let Some(parent) = dst.parent() {
        std::fs::create_dir_all(parent).expect("nginx dir");
    }
    std::fs::copy(&src, dst).expect("copy the library");
}
