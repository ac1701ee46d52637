//! Errors as Lua code sees them: plain strings, as OpenResty's are.
//!
//! An error a Rust function returns is raised by mlua as a userdata wrapping the
//! `mlua::Error` (so that Rust gets the error back whole when it reaches Rust). Lua code that
//! catches it with `pcall` would get that userdata: `tostring(err)` works, but `"x" .. err`,
//! `err:find(...)` and `type(err) == "string"` do not, and APISIX plugins do all three.
//! OpenResty's C functions raise strings (`luaL_argerror`: `bad argument #1 to 'decode_base64'
//! (string expected, got table)`), so here every place where Lua code receives a caught error
//! value turns such a userdata into that text:
//!
//! - `pcall` and `xpcall`, replaced by wrappers that catch with a message handler
//!   ([`ERRORS_SRC`]); the handler runs where the error was raised, so the failing function's
//!   frame still says by what name it was called, as `luaL_argerror` reads it;
//! - `coroutine.resume`/`coroutine.wrap` (`runtime.rs`'s wrappers) and `ngx.thread.wait`
//!   (the light thread's body, `thread.rs`), through [`MESSAGE`].
//!
//! What is not an mlua error (a string, a table given to `error`) passes unchanged, and the
//! wrappers keep `pcall`'s behaviour towards the runtime's own stops: `ngx.exit` yields (the
//! runtime drops the runner, so no `pcall` sees it), the time budget's hook raises again at the
//! next instruction, and a memory error stays `not enough memory`. An error that reaches Rust
//! (a phase function's own failure, logged with its traceback) is the `mlua::Error` as before.

use mlua::{Lua, Value};

/// Registry name of `message(err, level, co?)` (see [`ERRORS_SRC`]).
pub(crate) const MESSAGE: &str = "moongate.error_message";
/// Registry names of LuaJIT's own `xpcall` (for moongate's Lua that calls `message` itself)
/// and `pcall` (for moongate's Lua that only tests whether a call fails).
pub(crate) const RAW_XPCALL: &str = "moongate.raw_xpcall";
pub(crate) const RAW_PCALL: &str = "moongate.raw_pcall";

/// `to_text` is the Rust half (an mlua error value and the caller's name for the failing
/// function, to its text). The frame at `level` (counted from `message`'s caller, or in the
/// dead coroutine `co`) is the function that raised the error; when the frames above it are
/// moongate's own Lua wrappers (a waiting function's, `=moongate.*`, but not this file's), the
/// outermost of them is what the plugin called, so its name is the one to report.
const ERRORS_SRC: &str = r#"
local to_text, type, getinfo, sub, xpcall, setmetatable = ...
-- Not tail calls: a tail call would take this function's frame off the stack it counts.
local function frame(co, level, what)
    local info
    if co then info = getinfo(co, level, what) else info = getinfo(level + 2, what) end
    return info
end
local function message(e, level, co)
    if type(e) ~= "userdata" then return e end
    local info = frame(co, level, "n")
    -- Bounded by the stack's depth.
    while true do
        level = level + 1
        local outer = frame(co, level, "nS")
        if not (outer and sub(outer.source, 1, 10) == "=moongate."
                and outer.source ~= "=moongate.errors") then break end
        info = outer
    end
    if info then return to_text(e, info.name, info.namewhat) end
    return to_text(e)
end
local function handler(e)
    local m = message(e, 2)
    return m
end
local function pcall(f, ...)
    return xpcall(f, handler, ...)
end
-- One wrapped handler per handler function, made again after a collection: keys and values
-- are weak, so neither a handler nor its wrapper is kept alive by this table.
local wrapped = setmetatable({}, { __mode = "kv" })
local function wrapped_xpcall(f, h, ...)
    if type(h) ~= "function" then return xpcall(f, h, ...) end
    local w = wrapped[h]
    if not w then
        -- A tail call: `h` runs in the wrapper's frame, so it sees the stack (and a
        -- `debug.traceback` its levels) as if `xpcall` had called it directly.
        w = function(e) return h(message(e, 2)) end
        wrapped[h] = w
    end
    return xpcall(f, w, ...)
end
return message, pcall, wrapped_xpcall
"#;

/// Replaces `pcall` and `xpcall` and keeps `message` in the registry for the coroutine and
/// light thread wrappers. Runs before any Lua code captures `pcall`.
pub(crate) fn install(lua: &Lua) -> mlua::Result<()> {
    let g = lua.globals();
    let debug: mlua::Table = g.get("debug")?;
    let string: mlua::Table = g.get("string")?;
    let raw_xpcall: mlua::Function = g.get("xpcall")?;
    let to_text = lua.create_function(
        |lua, (e, name, namewhat): (Value, Option<mlua::String>, Option<mlua::String>)| {
            let Value::Error(e) = e else { return Ok(e) };
            let name = name.map(|n| n.to_string_lossy());
            let method = namewhat.is_some_and(|w| w.as_bytes() == b"method");
            let called = name.as_deref().map(|n| Called { name: n, method });
            Ok(Value::String(lua.create_string(text(&e, called))?))
        },
    )?;
    let (message, pcall, xpcall): (mlua::Function, mlua::Function, mlua::Function) =
        lua.load(ERRORS_SRC).set_name("=moongate.errors").call((
            to_text,
            g.get::<mlua::Function>("type")?,
            debug.get::<mlua::Function>("getinfo")?,
            string.get::<mlua::Function>("sub")?,
            &raw_xpcall,
            g.get::<mlua::Function>("setmetatable")?,
        ))?;
    lua.set_named_registry_value(MESSAGE, message)?;
    lua.set_named_registry_value(RAW_XPCALL, raw_xpcall)?;
    lua.set_named_registry_value(RAW_PCALL, g.get::<mlua::Function>("pcall")?)?;
    g.set("pcall", pcall)?;
    g.set("xpcall", xpcall)?;
    Ok(())
}

/// How the failing function was called, from its caller's frame (`debug.getinfo`'s `name`
/// and whether `namewhat` is `method`).
#[derive(Clone, Copy)]
pub(crate) struct Called<'a> {
    pub name: &'a str,
    pub method: bool,
}

/// The text Lua code gets for `e`: what OpenResty would raise for the same failure, without
/// mlua's wrapping (`runtime error: `, `callback error`, the traceback).
pub(crate) fn text(e: &mlua::Error, called: Option<Called<'_>>) -> String {
    use mlua::Error as E;
    match e {
        // The frame's name belongs to the function that raised the error; an error that came
        // up through a Lua call inside it is another function's.
        E::CallbackError { cause, .. } => match &**cause {
            E::CallbackError { .. } => text(cause, None),
            _ => text(cause, called),
        },
        E::RuntimeError(m) => m.clone(),
        E::MemoryError(_) => "not enough memory".into(),
        E::SyntaxError { message, .. } => message.clone(),
        E::BadArgument { to, pos, cause, .. } => bad_argument(to.as_deref(), *pos, cause, called),
        E::FromLuaConversionError { from, to, .. } => {
            format!("{} expected, got {}", lua_type(to), lua_type(from))
        }
        E::WithContext { context, cause } => format!("{context}: {}", text(cause, called)),
        E::ExternalError(e) => e.to_string(),
        other => other.to_string(),
    }
}

/// `luaL_argerror`'s text. mlua counts a method's `self` as argument 1, as the Lua stack does;
/// `luaL_argerror` leaves `self` out of the count when the function was called as a method.
/// mlua names a userdata method `Type.method` (`to`): that is the fallback when the caller's
/// frame has no name.
fn bad_argument(
    to: Option<&str>,
    pos: usize,
    cause: &mlua::Error,
    called: Option<Called<'_>>,
) -> String {
    let method_name = to.map(|t| t.rsplit(['.', ':']).next().unwrap_or(t));
    let (name, method) = match called {
        Some(c) => (c.name, c.method),
        None => (method_name.unwrap_or("?"), method_name.is_some()),
    };
    let reason = match cause {
        mlua::Error::FromLuaConversionError { from, to, .. } => {
            format!("{} expected, got {}", lua_type(to), lua_type(from))
        }
        other => text(other, None),
    };
    let pos = if method { pos.saturating_sub(1) } else { pos };
    if pos == 0 {
        format!("calling '{name}' on bad self ({reason})")
    } else {
        format!("bad argument #{pos} to '{name}' ({reason})")
    }
}

/// A Rust type name in a conversion error (`String`, `i64`, `Table`...) as Lua names its type.
fn lua_type(rust: &str) -> &str {
    match rust {
        "String" | "string" | "BString" | "str" | "LuaString" | "Vec<u8>" => "string",
        "integer" | "number" | "Integer" | "Number" | "i8" | "i16" | "i32" | "i64" | "i128"
        | "isize" | "u8" | "u16" | "u32" | "u64" | "u128" | "usize" | "f32" | "f64" => "number",
        "bool" | "boolean" => "boolean",
        "Table" | "table" => "table",
        "Function" | "function" => "function",
        "AnyUserData" | "userdata" => "userdata",
        "Thread" | "thread" => "thread",
        "LightUserData" | "lightuserdata" => "userdata",
        other => other,
    }
}

#[cfg(test)]
// mlua's error variants hold their causes in an `Arc`, whatever the error's own bounds.
#[allow(clippy::arc_with_non_send_sync)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn conversion(from: &'static str, to: &str) -> mlua::Error {
        mlua::Error::FromLuaConversionError {
            from,
            to: to.into(),
            message: Some("expected string or number".into()),
        }
    }

    fn bad(to: Option<&str>, pos: usize, cause: mlua::Error) -> mlua::Error {
        mlua::Error::BadArgument {
            to: to.map(str::to_string),
            pos,
            name: None,
            cause: Arc::new(cause),
        }
    }

    fn callback(cause: mlua::Error) -> mlua::Error {
        mlua::Error::CallbackError {
            traceback: "stack traceback:\n\t[C]: in ?".into(),
            cause: Arc::new(cause),
        }
    }

    #[test]
    fn bad_arguments_read_as_lual_argerror() {
        let e = callback(bad(None, 1, conversion("table", "String")));
        let direct = Called {
            name: "decode_base64",
            method: false,
        };
        assert_eq!(
            text(&e, Some(direct)),
            "bad argument #1 to 'decode_base64' (string expected, got table)"
        );
        assert_eq!(
            text(&e, None),
            "bad argument #1 to '?' (string expected, got table)"
        );
        // A method: self is not counted; mlua's own name for it is the fallback.
        let e = callback(bad(Some("Sock.connect"), 2, conversion("nil", "i64")));
        let m = Called {
            name: "connect",
            method: true,
        };
        assert_eq!(
            text(&e, Some(m)),
            "bad argument #1 to 'connect' (number expected, got nil)"
        );
        assert_eq!(
            text(&e, None),
            "bad argument #1 to 'connect' (number expected, got nil)"
        );
        let e = callback(bad(
            Some("Sock.close"),
            1,
            mlua::Error::UserDataTypeMismatch,
        ));
        assert_eq!(
            text(&e, None),
            "calling 'close' on bad self (userdata is not expected type)"
        );
    }

    #[test]
    fn messages_lose_mlua_wrapping() {
        let e = callback(mlua::Error::runtime(
            "API disabled in the context of log_by_lua*",
        ));
        assert_eq!(text(&e, None), "API disabled in the context of log_by_lua*");
        // Through a Lua call inside a Rust function: the innermost message, and the frame's
        // name (the outer function's) is not used for it.
        let inner = callback(bad(None, 2, conversion("nil", "String")));
        let outer = callback(callback(inner));
        let c = Called {
            name: "outer",
            method: false,
        };
        assert_eq!(
            text(&outer, Some(c)),
            "bad argument #2 to '?' (string expected, got nil)"
        );
        assert_eq!(
            text(&mlua::Error::MemoryError("x".into()), None),
            "not enough memory"
        );
    }
}
