//! `moongate plugins import`: APISIX plugin files staged into a plugin folder with what they
//! require, against a small APISIX-shaped tree written here (and APISIX's own, with
//! APISIX_SRC).

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn write(root: &Path, rel: &str, text: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().expect("parent")).expect("dir");
    std::fs::write(p, text).expect("write");
}

fn import(args: &[&str], cwd: &Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_moongate"))
        .args(["plugins", "import"])
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("run moongate plugins import");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A plugin with a helper in apisix/utils, a sub-module it requires by name, one it picks at
/// run time (only the folder copy brings it), a plugin that needs a library nobody provides,
/// and a file named like a native plugin.
fn apisix_tree(root: &Path) {
    write(
        root,
        "apisix/plugins/greet.lua",
        r#"local core = require("apisix.core")
local greeting = require("apisix.utils.greeting")
local words = require("apisix.plugins.greet.words")
local _M = { version = 0.1, priority = 10, name = "greet", schema = { type = "object",
    properties = { style = { type = "string", default = "plain" } } } }
function _M.access(conf, ctx)
    local style = require("apisix.plugins.greet.styles." .. conf.style)
    return 200, { text = greeting.say(words.hello, style.mark) }
end
return _M
"#,
    );
    write(
        root,
        "apisix/plugins/greet/words.lua",
        r#"return { hello = "hello" }"#,
    );
    write(
        root,
        "apisix/plugins/greet/styles/plain.lua",
        r#"return { mark = "." }"#,
    );
    write(
        root,
        "apisix/utils/greeting.lua",
        r#"local inner = require("apisix.utils.inner")
return { say = function(w, mark) return inner.cap(w) .. mark end }
"#,
    );
    write(
        root,
        "apisix/utils/inner.lua",
        r#"return { cap = function(s) return s:sub(1, 1):upper() .. s:sub(2) end }"#,
    );
    write(
        root,
        "apisix/plugins/needy.lua",
        // A third-party library no moongate release provides (net.url, this test's first
        // choice, is embedded now).
        r#"local sdk = require("vendor.sdk")
local up = require("apisix.admin.utils")
return { version = 0.1, priority = 1, schema = {} }
"#,
    );
    write(root, "apisix/plugins/openfunction.lua", "return {}");
    // The inspect plugin's shape: its debugger lives in apisix/inspect/.
    write(
        root,
        "apisix/plugins/peek.lua",
        r#"local inspect = require("apisix.inspect")
return { version = 0.1, priority = 1, name = "peek", schema = { type = "object" },
         init = function() inspect.init() end }
"#,
    );
    write(
        root,
        "apisix/inspect/init.lua",
        r#"local dbg = require("apisix.inspect.dbg")
return { init = function() return dbg.hooks() end }
"#,
    );
    write(
        root,
        "apisix/inspect/dbg.lua",
        "return { hooks = function() return {} end }",
    );
}

#[test]
fn import_stages_plugins_with_what_they_require_and_says_what_is_missing() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let src = tmp.path().join("apisix-src");
    apisix_tree(&src);
    let work = tmp.path().join("gw");
    std::fs::create_dir_all(&work).expect("work dir");
    let src_arg = src.to_string_lossy().into_owned();

    let (code, out) = import(&[&src_arg, "--to", "plugins"], &work);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("greet: 5 file(s)\n"), "{out}");
    assert!(
        out.contains(
            "needy: 1 file(s); needs modules moongate does not provide: apisix.admin.utils, vendor.sdk"
        ),
        "{out}"
    );
    assert!(
        out.contains("openfunction: skipped: native in moongate"),
        "{out}"
    );
    assert!(out.contains("peek: 3 file(s)\n"), "{out}");
    for f in [
        "greet.lua",
        "greet/words.lua",
        "greet/styles/plain.lua",
        "apisix/utils/greeting.lua",
        "apisix/utils/inner.lua",
        "peek.lua",
        "apisix/inspect/init.lua",
        "apisix/inspect/dbg.lua",
    ] {
        assert!(
            work.join("plugins").join(f).is_file(),
            "{f} not staged\n{out}"
        );
    }
    assert!(!work.join("plugins/openfunction.lua").exists());
    // apisix.core is moongate's own: never copied.
    assert!(!work.join("plugins/apisix/core.lua").exists());

    // The staged plugin serves, helpers and the run-time pick included.
    let up = Upstream::echo();
    let yaml = format!(
        "workers: 1\nplugins: [greet]\nplugin_dirs: [plugins]\nroutes:\n  - id: g\n    uri: /g\n    plugins:\n      greet: {{}}\n    upstream:\n      nodes:\n        \"{}\": 1\n",
        up.node()
    );
    let gw = Gateway::start_in(&work, &yaml);
    let r = get(&gw.url("/g"));
    assert_eq!(r.status, 200, "{}\n{}", r.text(), gw.logs());
    assert_eq!(r.json()["text"], "Hello.");

    // Errors a user can act on.
    let (code, out) = import(&[&src_arg, "nope", "--to", "plugins"], &work);
    assert_eq!(code, 1);
    assert!(out.contains("nope: no such plugin in"), "{out}");
    let (code, out) = import(&[&work.to_string_lossy(), "--to", "plugins"], &work);
    assert_eq!(code, 1);
    assert!(out.contains("not an APISIX checkout or release"), "{out}");
}

/// APISIX's own files (APISIX_SRC): the imported plugins pass `moongate check` with confs
/// from their docs.
#[test]
fn real_import_of_apisix_plugins_passes_check() {
    let Some(src) = std::env::var_os("APISIX_SRC") else {
        eprintln!("APISIX_SRC is not set: skipping the import of APISIX's own plugins");
        return;
    };
    let tmp = tempfile::tempdir().expect("temp dir");
    let names = [
        "limit-count",
        "limit-req",
        "jwt-auth",
        "request-validation",
        "workflow",
        "cors",
    ];
    let mut args = vec![src.to_string_lossy().into_owned()];
    args.extend(names.iter().map(|s| s.to_string()));
    args.extend(["--to".to_string(), "plugins".to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, out) = import(&args, tmp.path());
    assert_eq!(code, 0, "{out}");
    // The limit plugins require lua-resty-redis at load, which APISIX's build installs and
    // import does not (a third-party library): Debian's, unmodified, where `require` finds it.
    common::lua_libs::install_as_resty("lua-nginx-redis", "redis.lua", &tmp.path().join("plugins"));
    let file = tmp.path().join("config.yaml");
    std::fs::write(
        &file,
        "plugin_dirs: [plugins]\nroutes:\n  - id: r\n    uri: /r\n    plugins:\n      limit-count: {count: 2, time_window: 60}\n      limit-req: {rate: 1, burst: 0, key: remote_addr}\n      jwt-auth: {}\n      request-validation: {header_schema: {type: object}}\n      cors: {}\n      workflow:\n        rules:\n          - actions: [[\"limit-count\", {count: 1, time_window: 60}]]\n    upstream:\n      nodes: {\"127.0.0.1:1\": 1}\n",
    )
    .expect("config");
    let (code, out) = check_file(&file);
    assert_eq!(code, 0, "{out}");
}
