//! `require("lfs")`: LuaFileSystem's functions (the C library APISIX, Penlight's `pl.path`
//! and log-rotate use), on Rust's standard file system calls.
//!
//! Names, return values and messages follow LuaFileSystem 1.8: a failure returns
//! `nil, message, errno` (the message is the system's `strerror` text), `attributes` of a
//! path that cannot be read says `cannot obtain information from file 'P': REASON`, and `dir`
//! of a folder that cannot be opened raises `cannot open P: REASON`. The calls block, as the C
//! library's do in OpenResty. Not provided: `lock`, `unlock` and `lock_dir` (they take a C
//! `FILE*` that moongate's Lua file handles do not hand out); `setmode` answers as on POSIX.

use std::cell::RefCell;
use std::fs::{self, Metadata, ReadDir};
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::{Duration, SystemTime};

use mlua::{AnyUserData, Lua, MultiValue, Table, UserData, UserDataMethods, Value};

/// What `strerror(errno)` says: the io error's text without Rust's ` (os error N)`.
fn strerror(e: &io::Error) -> String {
    let s = e.to_string();
    match s.rfind(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// `nil, strerror, errno`: how LuaFileSystem reports a failed call.
fn failure(lua: &Lua, e: &io::Error) -> mlua::Result<MultiValue> {
    Ok(MultiValue::from_vec(vec![
        Value::Nil,
        Value::String(lua.create_string(strerror(e))?),
        Value::Integer(e.raw_os_error().unwrap_or(0) as i64),
    ]))
}

fn success(ok: mlua::Result<()>, lua: &Lua, r: io::Result<()>) -> mlua::Result<MultiValue> {
    ok?;
    match r {
        Ok(()) => Ok(MultiValue::from_vec(vec![Value::Boolean(true)])),
        Err(e) => failure(lua, &e),
    }
}

fn mode_name(m: &Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = m.file_type();
    if t.is_file() {
        "file"
    } else if t.is_dir() {
        "directory"
    } else if t.is_symlink() {
        "link"
    } else if t.is_socket() {
        "socket"
    } else if t.is_fifo() {
        "named pipe"
    } else if t.is_char_device() {
        "char device"
    } else if t.is_block_device() {
        "block device"
    } else {
        "other"
    }
}

/// `rwxr-xr-x`, as `attributes().permissions` has it (with setuid/setgid/sticky as `s`/`t`).
fn permissions(mode: u32) -> String {
    let mut s = String::with_capacity(9);
    // Owner, group, other: read, write, then execute or the class's special bit.
    for (shift, special, mark) in [(6, 0o4000, 's'), (3, 0o2000, 's'), (0, 0o1000, 't')] {
        let bits = mode >> shift;
        s.push(if bits & 0o4 != 0 { 'r' } else { '-' });
        s.push(if bits & 0o2 != 0 { 'w' } else { '-' });
        s.push(if mode & special != 0 {
            mark
        } else if bits & 0o1 != 0 {
            'x'
        } else {
            '-'
        });
    }
    s
}

/// The attribute names, in LuaFileSystem's order.
const MEMBERS: &[&str] = &[
    "mode",
    "dev",
    "ino",
    "nlink",
    "uid",
    "gid",
    "rdev",
    "access",
    "modification",
    "change",
    "size",
    "permissions",
    "blocks",
    "blksize",
];

fn member(lua: &Lua, m: &Metadata, name: &str) -> mlua::Result<Option<Value>> {
    let n = |v: f64| Some(Value::Number(v));
    Ok(match name {
        "mode" => Some(Value::String(lua.create_string(mode_name(m))?)),
        "dev" => n(m.dev() as f64),
        "ino" => n(m.ino() as f64),
        "nlink" => n(m.nlink() as f64),
        "uid" => n(m.uid() as f64),
        "gid" => n(m.gid() as f64),
        "rdev" => n(m.rdev() as f64),
        "access" => n(m.atime() as f64),
        "modification" => n(m.mtime() as f64),
        "change" => n(m.ctime() as f64),
        "size" => n(m.size() as f64),
        "permissions" => Some(Value::String(
            lua.create_string(permissions(m.permissions().mode()))?,
        )),
        "blocks" => n(m.blocks() as f64),
        "blksize" => n(m.blksize() as f64),
        _ => None,
    })
}

/// `attributes(path [, name | table])` and `symlinkattributes` (which reads the link itself
/// and adds `target`).
fn attributes(lua: &Lua, args: MultiValue, link: bool) -> mlua::Result<MultiValue> {
    let mut it = args.into_iter();
    let path: String = match it.next() {
        Some(Value::String(s)) => s.to_str()?.to_string(),
        Some(Value::Integer(i)) => i.to_string(),
        Some(Value::Number(f)) => f.to_string(),
        other => {
            let got = other.as_ref().map_or("no value", |v| v.type_name());
            let f = if link {
                "symlinkattributes"
            } else {
                "attributes"
            };
            return Err(mlua::Error::runtime(format!(
                "bad argument #1 to '{f}' (string expected, got {got})"
            )));
        }
    };
    let meta = if link {
        fs::symlink_metadata(&path)
    } else {
        fs::metadata(&path)
    };
    let m = match meta {
        Ok(m) => m,
        Err(e) => {
            return Ok(MultiValue::from_vec(vec![
                Value::Nil,
                Value::String(lua.create_string(format!(
                    "cannot obtain information from file '{path}': {}",
                    strerror(&e)
                ))?),
                Value::Integer(e.raw_os_error().unwrap_or(0) as i64),
            ]))
        }
    };
    let target = |lua: &Lua| -> mlua::Result<Value> {
        match fs::read_link(&path) {
            Ok(t) => Ok(Value::String(
                lua.create_string(t.as_os_str().as_encoded_bytes())?,
            )),
            Err(_) => Ok(Value::Nil),
        }
    };
    match it.next() {
        Some(Value::String(name)) => {
            let name = name.to_str()?.to_string();
            if link && name == "target" {
                return Ok(MultiValue::from_vec(vec![target(lua)?]));
            }
            match member(lua, &m, &name)? {
                Some(v) => Ok(MultiValue::from_vec(vec![v])),
                None => Err(mlua::Error::runtime(format!(
                    "invalid attribute name '{name}'"
                ))),
            }
        }
        arg => {
            let t = match arg {
                Some(Value::Table(t)) => t,
                _ => lua.create_table()?,
            };
            for name in MEMBERS {
                if let Some(v) = member(lua, &m, name)? {
                    t.raw_set(*name, v)?;
                }
            }
            if link && m.file_type().is_symlink() {
                t.raw_set("target", target(lua)?)?;
            }
            Ok(MultiValue::from_vec(vec![Value::Table(t)]))
        }
    }
}

/// The directory object `dir()` hands out beside its iterator: `next()`, `close()`.
struct Dir(RefCell<Option<ReadDir>>);

impl Dir {
    /// The next name (`.` and `..` first, as readdir gives them), or nil at the end, where the
    /// directory is closed.
    fn next(&self, lua: &Lua, first: &RefCell<u8>) -> mlua::Result<Value> {
        let mut guard = self.0.borrow_mut();
        let Some(rd) = guard.as_mut() else {
            return Err(mlua::Error::runtime(
                "bad argument #1 to 'next' (closed directory)",
            ));
        };
        let mut f = first.borrow_mut();
        if *f < 2 {
            *f += 1;
            return Ok(Value::String(lua.create_string(if *f == 1 {
                "."
            } else {
                ".."
            })?));
        }
        loop {
            match rd.next() {
                Some(Ok(e)) => {
                    return Ok(Value::String(
                        lua.create_string(e.file_name().as_encoded_bytes())?,
                    ))
                }
                // An entry that vanished while listing is skipped, as readdir would not
                // return it.
                Some(Err(_)) => continue,
                None => {
                    *guard = None;
                    return Ok(Value::Nil);
                }
            }
        }
    }
}

struct LuaDir {
    dir: Dir,
    dots: RefCell<u8>,
}

impl UserData for LuaDir {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("next", |lua, this, _: MultiValue| {
            this.dir.next(lua, &this.dots)
        });
        methods.add_method("close", |_, this, _: MultiValue| {
            *this.dir.0.borrow_mut() = None;
            Ok(())
        });
        methods.add_meta_method("__tostring", |_, this, ()| {
            Ok(if this.dir.0.borrow().is_some() {
                "directory (open)".to_string()
            } else {
                "directory (closed)".to_string()
            })
        });
    }
}

fn path_arg(v: Option<Value>, f: &str) -> mlua::Result<String> {
    match v {
        Some(Value::String(s)) => Ok(s.to_str()?.to_string()),
        Some(Value::Integer(i)) => Ok(i.to_string()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        other => Err(mlua::Error::runtime(format!(
            "bad argument #1 to '{f}' (string expected, got {})",
            other.as_ref().map_or("no value", |v| v.type_name())
        ))),
    }
}

fn seconds(v: &Value) -> Option<SystemTime> {
    let s = match v {
        Value::Integer(i) => *i as f64,
        Value::Number(n) => *n,
        _ => return None,
    };
    if s >= 0.0 && s.is_finite() {
        Some(SystemTime::UNIX_EPOCH + Duration::from_secs_f64(s))
    } else {
        SystemTime::UNIX_EPOCH.checked_sub(Duration::from_secs_f64(-s))
    }
}

/// `touch(path [, atime [, mtime]])`: both times now without arguments; mtime defaults to
/// atime. The file must exist, as with utime(2).
fn touch(path: &str, atime: Option<SystemTime>, mtime: Option<SystemTime>) -> io::Result<()> {
    let f = fs::OpenOptions::new().write(true).open(path).or_else(|e| {
        // A folder (or a file we may not write) is opened for reading instead.
        if e.kind() == io::ErrorKind::NotFound {
            Err(e)
        } else {
            fs::File::open(path)
        }
    })?;
    let now = SystemTime::now();
    let a = atime.unwrap_or(now);
    let m = mtime.unwrap_or(a);
    f.set_times(fs::FileTimes::new().set_accessed(a).set_modified(m))
}

fn lfs_module(lua: &Lua) -> mlua::Result<Table> {
    let m = lua.create_table()?;
    m.set("_VERSION", "LuaFileSystem 1.8.0")?;
    m.set(
        "_DESCRIPTION",
        "LuaFileSystem is a Lua library developed to complement the set of functions related to file systems offered by the standard Lua distribution",
    )?;
    m.set(
        "attributes",
        lua.create_function(|lua, a: MultiValue| attributes(lua, a, false))?,
    )?;
    m.set(
        "symlinkattributes",
        lua.create_function(|lua, a: MultiValue| attributes(lua, a, true))?,
    )?;
    m.set(
        "currentdir",
        lua.create_function(|lua, _: MultiValue| match std::env::current_dir() {
            Ok(p) => Ok(MultiValue::from_vec(vec![Value::String(
                lua.create_string(p.as_os_str().as_encoded_bytes())?,
            )])),
            Err(e) => failure(lua, &e),
        })?,
    )?;
    m.set(
        "chdir",
        lua.create_function(|lua, a: MultiValue| {
            let p = path_arg(a.into_iter().next(), "chdir")?;
            match std::env::set_current_dir(&p) {
                Ok(()) => Ok(MultiValue::from_vec(vec![Value::Boolean(true)])),
                Err(e) => Ok(MultiValue::from_vec(vec![
                    Value::Nil,
                    Value::String(lua.create_string(format!(
                        "Unable to change working directory to '{p}'\n{}\n",
                        strerror(&e)
                    ))?),
                    Value::Integer(e.raw_os_error().unwrap_or(0) as i64),
                ])),
            }
        })?,
    )?;
    m.set(
        "mkdir",
        lua.create_function(|lua, a: MultiValue| {
            let p = path_arg(a.into_iter().next(), "mkdir");
            let r = p.as_ref().map_or(Ok(()), |p| {
                use std::os::unix::fs::DirBuilderExt;
                // 0777 less the umask, as LuaFileSystem's mkdir.
                fs::DirBuilder::new().mode(0o777).create(p)
            });
            success(p.map(|_| ()), lua, r)
        })?,
    )?;
    m.set(
        "rmdir",
        lua.create_function(|lua, a: MultiValue| {
            let p = path_arg(a.into_iter().next(), "rmdir");
            let r = p.as_ref().map_or(Ok(()), fs::remove_dir);
            success(p.map(|_| ()), lua, r)
        })?,
    )?;
    m.set(
        "touch",
        lua.create_function(|lua, a: MultiValue| {
            let mut it = a.into_iter();
            let p = path_arg(it.next(), "touch");
            let atime = it.next().as_ref().and_then(seconds);
            let mtime = it.next().as_ref().and_then(seconds);
            let r = p.as_ref().map_or(Ok(()), |p| touch(p, atime, mtime));
            success(p.map(|_| ()), lua, r)
        })?,
    )?;
    m.set(
        "link",
        lua.create_function(|lua, a: MultiValue| {
            let mut it = a.into_iter();
            let old = path_arg(it.next(), "link");
            let new = path_arg(it.next(), "link");
            let symbolic = it
                .next()
                .is_some_and(|v| !matches!(v, Value::Nil | Value::Boolean(false)));
            let r = match (&old, &new) {
                (Ok(o), Ok(n)) if symbolic => std::os::unix::fs::symlink(o, n),
                (Ok(o), Ok(n)) => fs::hard_link(o, n),
                _ => Ok(()),
            };
            success(old.and(new).map(|_| ()), lua, r)
        })?,
    )?;
    m.set(
        "setmode",
        lua.create_function(|_, _: MultiValue| Ok((true, "binary")))?,
    )?;
    m.set(
        "dir",
        lua.create_function(|lua, a: MultiValue| {
            let p = path_arg(a.into_iter().next(), "dir")?;
            let rd = fs::read_dir(&p)
                .map_err(|e| mlua::Error::runtime(format!("cannot open {p}: {}", strerror(&e))))?;
            let ud = lua.create_userdata(LuaDir {
                dir: Dir(RefCell::new(Some(rd))),
                dots: RefCell::new(0),
            })?;
            let iter = lua.create_function(|lua, (d, _): (AnyUserData, MultiValue)| {
                let d = d.borrow::<LuaDir>()?;
                d.dir.next(lua, &d.dots)
            })?;
            Ok((iter, ud))
        })?,
    )?;
    Ok(m)
}

/// Registers `lfs` in `package.preload`.
pub(crate) fn install(lua: &Lua, preload: &Table) -> mlua::Result<()> {
    preload.set(
        "lfs",
        lua.create_function(|lua, _: MultiValue| lfs_module(lua))?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm() -> Lua {
        let lua = Lua::new();
        let package: Table = lua.globals().get("package").unwrap();
        install(&lua, &package.get("preload").unwrap()).unwrap();
        lua
    }

    #[test]
    fn attributes_mkdir_dir_and_touch_as_luafilesystem() {
        let lua = vm();
        let tmp = tempfile::tempdir().unwrap();
        lua.globals()
            .set("D", tmp.path().to_str().unwrap())
            .unwrap();
        lua.load(
            r#"
            local lfs = require("lfs")
            assert(lfs.mkdir(D .. "/sub") == true)
            local ok, err, code = lfs.mkdir(D .. "/sub")
            assert(ok == nil and err == "File exists" and code == 17, err)
            local f = assert(io.open(D .. "/sub/a.log", "w")); f:write("12345"); f:close()
            assert(lfs.attributes(D .. "/sub", "mode") == "directory")
            local a = lfs.attributes(D .. "/sub/a.log")
            assert(a.mode == "file" and a.size == 5 and #a.permissions == 9, a.permissions)
            assert(lfs.touch(D .. "/sub/a.log", 1000, 2000))
            assert(lfs.attributes(D .. "/sub/a.log", "modification") == 2000)
            assert(lfs.attributes(D .. "/sub/a.log", "access") == 1000)
            local none, msg, no = lfs.attributes(D .. "/nope")
            assert(none == nil and no == 2)
            assert(msg == "cannot obtain information from file '" .. D .. "/nope': No such file or directory", msg)
            local seen = {}
            for name in lfs.dir(D .. "/sub") do seen[#seen + 1] = name end
            table.sort(seen)
            assert(table.concat(seen, ",") == ".,..,a.log", table.concat(seen, ","))
            local it, d = lfs.dir(D)
            assert(d:next() == "." and d:next() == "..")
            d:close()
            assert(not pcall(d.next, d))
            local okd, e = pcall(lfs.dir, D .. "/nope")
            assert(not okd and tostring(e):find("cannot open " .. D .. "/nope: No such file or directory", 1, true), tostring(e))
            assert(lfs.link(D .. "/sub/a.log", D .. "/l", true))
            assert(lfs.symlinkattributes(D .. "/l", "mode") == "link")
            assert(lfs.symlinkattributes(D .. "/l").target == D .. "/sub/a.log")
            assert(lfs.attributes(D .. "/l", "mode") == "file")
            os.remove(D .. "/sub/a.log")
            assert(lfs.rmdir(D .. "/sub"))
            assert(lfs.currentdir() ~= nil)
            "#,
        )
        .exec()
        .unwrap();
    }

    #[test]
    fn permissions_string_spells_special_bits() {
        assert_eq!(permissions(0o755), "rwxr-xr-x");
        assert_eq!(permissions(0o4711), "rws--x--x");
        assert_eq!(permissions(0o1777), "rwxrwxrwt");
    }

    /// Penlight's `pl.path` (embedded, over this module): the string functions on the
    /// examples of Penlight's docs, and the lfs wrappers' messages.
    #[test]
    fn pl_path_over_lfs() {
        let lua = vm();
        let (_, src) = crate::plugin::lua::embedded::MODULES
            .iter()
            .find(|(n, _)| *n == "pl.path")
            .expect("pl.path is embedded");
        let preload: Table = lua
            .globals()
            .get::<Table>("package")
            .unwrap()
            .get("preload")
            .unwrap();
        let loader = lua.load(*src).set_name("pl.path").into_function().unwrap();
        preload.set("pl.path", loader).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        lua.globals()
            .set("D", tmp.path().to_str().unwrap())
            .unwrap();
        lua.load(
            r#"
            local path = require("pl.path")
            local function eq(got, want)
                if got ~= want then error(("got %q, want %q"):format(tostring(got), tostring(want)), 2) end
            end
            eq(path.normpath("/a//b/./c/../d"), "/a/b/d")
            eq(path.normpath("a/../../b"), "../b")
            eq(path.normpath("//x/y"), "//x/y")
            eq(path.normpath("///x"), "/x")
            eq(path.normpath(""), ".")
            eq(path.normpath("/.."), "/..")
            eq(path.join("http://h", "bulk", "tok", "tag", "bulk"), "http://h/bulk/tok/tag/bulk")
            eq(path.join("a/", "b"), "a/b")
            eq(path.join("a", "/abs"), "/abs")
            local d, f = path.splitpath("/usr/local/x.tar.gz")
            eq(d, "/usr/local"); eq(f, "x.tar.gz")
            local base, ext = path.splitext("/usr/local/x.tar.gz")
            eq(base, "/usr/local/x.tar"); eq(ext, ".gz")
            local b2, e2 = path.splitext("/a.b/c")
            eq(b2, "/a.b/c"); eq(e2, "")
            eq(path.basename("/a/b.lua"), "b.lua"); eq(path.dirname("/a/b.lua"), "/a")
            eq(path.extension("f.lua"), ".lua")
            eq(path.isabs("/x"), true); eq(path.isabs("x"), false)
            eq(path.abspath("b/../c", "/a"), "/a/c")
            eq(path.relpath("/a/b/c", "/a/d"), "../b/c")
            eq(path.common_prefix("/a/b/c", "/a/b/d"), "/a/b/")
            eq(path.common_prefix("/a/bc", "/a/bd"), "/a")
            eq(path.isdir(D), true); eq(path.isfile(D), false)
            eq(path.exists(D), D); eq(path.exists(D .. "/nope"), false)
            local ok, err, code = path.mkdir(D)
            eq(ok, nil); eq(code, 17)
            eq(err, "mkdir failed for '" .. D .. "': File exists (code 17)")
            local okc, msg = pcall(path.join, "a", nil)
            eq(okc, false)
            assert(tostring(msg):find("argument 2 expected a 'string', got a 'nil'", 1, true), msg)
            "#,
        )
        .exec()
        .unwrap();
    }
}
