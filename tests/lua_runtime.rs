//! The Lua plugin runtime end to end: small Lua plugins written into the test's plugin dir, the
//! real `moongate` binary, and real upstreams on loopback.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

/// Test fixtures: each (file name, source).
const PLUGINS: &[(&str, &str)] = &[
    (
        "add-req-header.lua",
        r#"
local core = require("apisix.core")
local _M = {
    version = 0.1,
    priority = 100,
    name = "add-req-header",
    schema = {
        type = "object",
        properties = { value = { type = "string", default = "from-default" } },
    },
}
function _M.check_schema(conf)
    return core.schema.check(_M.schema, conf)
end
function _M.access(conf, ctx)
    ngx.req.set_header("X-From-Lua", conf.value)
    ngx.req.set_header("X-Route-Id", ctx.route_id)
    ngx.req.set_header("X-Matched", ctx.curr_req_matched._path)
end
return _M
"#,
    ),
    (
        "resp-header.lua",
        r#"
return {
    version = 0.1,
    priority = 90,
    schema = {},
    header_filter = function(conf, ctx)
        ngx.header["X-Lua-Resp"] = "yes"
        ngx.header["X-Status-Seen"] = tostring(ngx.status)
    end,
}
"#,
    ),
    (
        "upper-body.lua",
        r#"
return {
    version = 0.1,
    priority = 80,
    schema = { type = "object" },
    body_filter = function(conf, ctx)
        ngx.arg[1] = string.upper(ngx.arg[1])
    end,
}
"#,
    ),
    (
        "deny.lua",
        r#"
return {
    version = 0.1,
    priority = 70,
    schema = { type = "object" },
    rewrite = function(conf, ctx)
        return 403, { message = "no" }
    end,
}
"#,
    ),
    (
        "logger.lua",
        r#"
return {
    version = 0.1,
    priority = 60,
    schema = { type = "object" },
    log = function(conf, ctx)
        ngx.log(ngx.WARN, "logger saw status ", ngx.status, " on route ", ctx.route_id)
    end,
}
"#,
    ),
    (
        "boom.lua",
        r#"
local function explode()
    error("boom in access")
end
return {
    version = 0.1,
    priority = 50,
    schema = { type = "object" },
    access = function(conf, ctx)
        explode()
    end,
}
"#,
    ),
    (
        "spin.lua",
        r#"
return {
    version = 0.1,
    priority = 50,
    schema = { type = "object" },
    access = function(conf, ctx)
        local i = 0
        while true do i = i + 1 end
    end,
}
"#,
    ),
    (
        "spin-caught.lua",
        r#"
return {
    version = 0.1,
    priority = 50,
    schema = { type = "object" },
    access = function(conf, ctx)
        -- The budget's stop is not an error a plugin can catch and go on from.
        local ok, err = pcall(function() while true do end end)
        local ok2, err2 = xpcall(function() while true do end end, debug.traceback)
        return 200, "caught: " .. tostring(err) .. tostring(err2)
    end,
}
"#,
    ),
    (
        "hog.lua",
        r#"
return {
    version = 0.1,
    priority = 50,
    schema = { type = "object" },
    access = function(conf, ctx)
        local t = {}
        -- 16 MiB a step: the 64 MiB cap is reached in a few steps, long before the
        -- 300 ms time budget even on a loaded machine.
        for i = 1, 1e9 do t[i] = string.rep("x", 16 * 1024 * 1024) .. i end
    end,
}
"#,
    ),
    (
        "sleeper.lua",
        r#"
-- Module-level state is per worker VM (the test runs one worker).
local events = {}
return {
    version = 0.1,
    priority = 50,
    schema = { type = "object" },
    access = function(conf, ctx)
        local id = ngx.var.arg_id
        events[#events + 1] = "start:" .. id
        ngx.sleep(0.5)
        events[#events + 1] = "end:" .. id
        return 200, table.concat(events, ",")
    end,
}
"#,
    ),
    (
        "order-a.lua",
        r#"
return {
    version = 0.1,
    priority = 900,
    schema = { type = "object" },
    header_filter = function(conf, ctx)
        local seen = ngx.header["X-Native"] and "+n" or "-n"
        ngx.header["X-Order"] = (ngx.header["X-Order"] or "") .. "a" .. seen
    end,
}
"#,
    ),
    (
        "order-b.lua",
        r#"
return {
    version = 0.1,
    priority = 800,
    schema = { type = "object" },
    header_filter = function(conf, ctx)
        local seen = ngx.header["X-Native"] and "+n" or "-n"
        ngx.header["X-Order"] = (ngx.header["X-Order"] or "") .. "b" .. seen
    end,
}
"#,
    ),
    (
        "say-exit.lua",
        r#"
local core = require("apisix.core")
return {
    version = 0.1,
    priority = 40,
    schema = { type = "object" },
    access = function(conf, ctx)
        ngx.header["X-Staged"] = "1"
        ngx.say("said ", ngx.var.uri)
        ngx.exit(202)
    end,
}
"#,
    ),
];

fn write_plugins(dir: &Path) {
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins).expect("plugins dir");
    for (name, src) in PLUGINS {
        std::fs::write(plugins.join(name), src).expect("write plugin");
    }
}

fn route(id: &str, uri: &str, plugins: &str, node: &str) -> String {
    format!(
        "  - id: {id}\n    uri: {uri}\n    plugins:\n{plugins}    upstream:\n      nodes:\n        \"{node}\": 1\n"
    )
}

fn start(up: &Upstream, text_up: &Upstream) -> (tempfile::TempDir, Gateway) {
    let dir = tempfile::tempdir().expect("temp dir");
    write_plugins(dir.path());
    let e = up.node();
    let t = text_up.node();
    let mut yaml =
        String::from("workers: 1\nlua:\n  call_budget_ms: 300\n  memory_limit_mb: 64\nroutes:\n");
    yaml += &route(
        "hdr",
        "/hdr/*",
        "      add-req-header: {}\n      resp-header: {}\n",
        &e,
    );
    yaml += &route(
        "hdr2",
        "/hdr2",
        "      add-req-header: {value: given}\n",
        &e,
    );
    yaml += &route("upper", "/upper", "      upper-body: {}\n", &t);
    yaml += &route(
        "deny",
        "/deny",
        "      deny: {}\n      resp-header: {}\n      logger: {}\n",
        &e,
    );
    yaml += &route("boom", "/boom", "      boom: {}\n", &e);
    yaml += &route("spin", "/spin", "      spin: {}\n", &e);
    yaml += &route("spin-caught", "/spin-caught", "      spin-caught: {}\n", &e);
    yaml += &route("hog", "/hog", "      hog: {}\n", &e);
    yaml += &route("sleep", "/sleep", "      sleeper: {}\n", &e);
    yaml += &route(
        "order",
        "/order",
        "      order-a: {}\n      order-b: {}\n      response-headers: {set: {X-Native: \"1\"}}\n",
        &e,
    );
    yaml += &route(
        "say",
        "/say",
        "      say-exit: {}\n      resp-header: {}\n",
        &e,
    );
    let gw = Gateway::start_in(dir.path(), &yaml);
    (dir, gw)
}

#[test]
fn lua_plugins_on_real_requests() {
    let up = Upstream::echo();
    let text = Upstream::text("hello from upstream");
    let (_dir, gw) = start(&up, &text);

    // access sets an upstream request header; the schema default is filled in; ctx fields.
    let r = get(&gw.url("/hdr/x.json"));
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = r.json();
    assert_eq!(seen["headers"]["x-from-lua"], "from-default");
    assert_eq!(seen["headers"]["x-route-id"], "hdr");
    assert_eq!(seen["headers"]["x-matched"], "/hdr/*");
    // header_filter adds a response header and sees the upstream status.
    assert_eq!(r.header("x-lua-resp").as_deref(), Some("yes"));
    assert_eq!(r.header("x-status-seen").as_deref(), Some("200"));
    let r = get(&gw.url("/hdr2"));
    assert_eq!(r.json()["headers"]["x-from-lua"], "given");

    // body_filter rewrites the body.
    let r = get(&gw.url("/upper"));
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "HELLO FROM UPSTREAM");

    // rewrite returning 403, {message="no"}: JSON + newline; header_filter and log of the
    // other plugins still run.
    let r = get(&gw.url("/deny"));
    assert_eq!(r.status, 403);
    assert_eq!(r.text(), "{\"message\":\"no\"}\n");
    assert_eq!(r.header("x-lua-resp").as_deref(), Some("yes"));
    assert_eq!(r.header("x-status-seen").as_deref(), Some("403"));
    assert!(
        gw.wait_for_log(
            "logger saw status 403 on route deny",
            Duration::from_secs(5)
        ),
        "{}",
        gw.logs()
    );

    // ngx.say + ngx.exit(202) with a header staged in access.
    let r = get(&gw.url("/say"));
    assert_eq!(r.status, 202);
    assert_eq!(r.text(), "said /say\n");
    assert_eq!(r.header("x-staged").as_deref(), Some("1"));
    assert_eq!(r.header("x-lua-resp").as_deref(), Some("yes"));

    // Priority: order-a (900), native response-headers (898), order-b (800).
    let r = get(&gw.url("/order"));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-order").as_deref(), Some("a-nb+n"));
    assert_eq!(r.header("x-native").as_deref(), Some("1"));
}

#[test]
fn lua_faults_fail_only_their_request() {
    let up = Upstream::echo();
    let text = Upstream::text("ok");
    let (_dir, gw) = start(&up, &text);

    // A Lua error: 500, one log line with plugin, phase and traceback; the worker goes on.
    let r = get(&gw.url("/boom"));
    assert_eq!(r.status, 500);
    assert!(
        gw.wait_for_log("boom in access", Duration::from_secs(5)),
        "{}",
        gw.logs()
    );
    let line = gw
        .logs()
        .lines()
        .find(|l| l.contains("boom in access"))
        .map(str::to_string)
        .unwrap_or_default();
    assert!(line.contains("boom") && line.contains("access"), "{line}");
    assert!(
        line.contains("stack traceback") && line.contains("boom.lua:3"),
        "{line}"
    );
    assert_eq!(get(&gw.url("/hdr2")).status, 200);

    // A runaway loop is stopped by the budget; the worker keeps serving.
    let r = get(&gw.url("/spin"));
    assert_eq!(r.status, 500);
    assert!(
        gw.wait_for_log("exceeded its time budget", Duration::from_secs(5)),
        "{}",
        gw.logs()
    );
    assert_eq!(get(&gw.url("/hdr2")).status, 200);
    let r = get(&gw.url("/spin"));
    assert_eq!(r.status, 500);
    assert_eq!(get(&gw.url("/hdr2")).status, 200);
    // Nor can pcall or xpcall keep it running.
    let r = get(&gw.url("/spin-caught"));
    assert_eq!(r.status, 500, "{}", r.text());
    assert!(!r.text().contains("caught"), "{}", r.text());
    assert_eq!(get(&gw.url("/hdr2")).status, 200);

    // A memory hog hits the VM cap: 500, and the process lives on.
    let r = get(&gw.url("/hog"));
    assert_eq!(r.status, 500);
    assert!(
        gw.wait_for_log("not enough memory", Duration::from_secs(5)),
        "{}",
        gw.logs()
    );
    let r = get(&gw.url("/hdr2"));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["headers"]["x-from-lua"], "given");
}

#[test]
fn ngx_sleep_does_not_block_the_worker() {
    let up = Upstream::echo();
    let text = Upstream::text("ok");
    let (_dir, gw) = start(&up, &text);
    let a = gw.url("/sleep?id=a");
    let b = gw.url("/sleep?id=b");
    // Two requests on one worker: if ngx.sleep blocked the worker, the second would only start
    // after the first ended.
    let ta = std::thread::spawn(move || get(&a));
    std::thread::sleep(Duration::from_millis(100));
    let tb = std::thread::spawn(move || get(&b));
    let ra = ta.join().expect("request a");
    let rb = tb.join().expect("request b");
    assert_eq!(ra.status, 200);
    assert_eq!(rb.status, 200);
    let last = if rb.text().len() >= ra.text().len() {
        rb.text()
    } else {
        ra.text()
    };
    let events: Vec<&str> = last.split(',').collect();
    let first_end = events
        .iter()
        .position(|e| e.starts_with("end:"))
        .expect("an end event");
    let starts_before = events[..first_end]
        .iter()
        .filter(|e| e.starts_with("start:"))
        .count();
    assert_eq!(starts_before, 2, "the sleeps did not overlap: {last}");
}

#[test]
fn check_reports_lua_syntax_errors_with_file_and_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).expect("plugins dir");
    std::fs::write(
        plugins.join("broken.lua"),
        "local _M = {\n    version = 0.1,\n    priority = = 1,\n}\nreturn _M\n",
    )
    .expect("write");
    let cfg = dir.path().join("config.yaml");
    std::fs::write(&cfg, "routes: []\n").expect("write config");
    let (code, out) = check_file(&cfg);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("broken.lua:3:"), "{out}");

    // A module without priority is rejected as APISIX does.
    std::fs::write(
        plugins.join("broken.lua"),
        "return { version = 0.1, schema = {} }\n",
    )
    .expect("write");
    let (code, out) = check_file(&cfg);
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("broken.lua") && out.contains("priority"),
        "{out}"
    );
}

#[test]
fn check_reports_lua_schema_errors_with_route_path() {
    let dir = tempfile::tempdir().expect("temp dir");
    write_plugins(dir.path());
    let cfg = dir.path().join("config.yaml");
    std::fs::write(
        &cfg,
        "routes:\n  - id: r1\n    uri: /x\n    plugins:\n      add-req-header: {value: 5}\n    upstream:\n      nodes:\n        \"127.0.0.1:1\": 1\n",
    )
    .expect("write config");
    let (code, out) = check_file(&cfg);
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("routes[0].plugins.add-req-header")
            && out.contains(
                "property \"value\" validation failed: wrong type: expected string, got number"
            ),
        "{out}"
    );
}

/// A Lua C module through `lua.package_cpath`: Debian's LPeg (`lua-lpeg`, the C library
/// APISIX's graphql and LDAP plugins parse with) loads into the worker's VM, finding the Lua C
/// API the binary exports, and matches; the configured folder is searched before the system's.
#[test]
fn c_modules_load_from_package_cpath() {
    let system = format!(
        "/usr/lib/{}-linux-gnu/lua/5.1/lpeg.so",
        std::env::consts::ARCH
    );
    assert!(
        Path::new(&system).is_file(),
        "{system} missing: apt-get install lua-lpeg (.ci/run does)"
    );
    let tmp = tempfile::tempdir().expect("temp dir");
    let clibs = tmp.path().join("clibs");
    std::fs::create_dir_all(&clibs).expect("clibs");
    std::fs::copy(&system, clibs.join("lpeg.so")).expect("copy lpeg.so");
    let plugins = tmp.path().join("plugins");
    std::fs::create_dir_all(&plugins).expect("plugins");
    std::fs::write(
        plugins.join("lpeg-probe.lua"),
        r#"
local lpeg = require("lpeg")
local core = require("apisix.core")
local number = lpeg.C(lpeg.R("09") ^ 1) / tonumber
local list = lpeg.Ct(number * ("," * number) ^ 0) * -1
return {
    version = 0.1, priority = 1, name = "lpeg-probe", schema = { type = "object" },
    access = function(conf, ctx)
        local parsed = list:match(ngx.var.arg_list or "")
        local sum = 0
        for _, n in ipairs(parsed or {}) do sum = sum + n end
        return 200, { version = lpeg.version(), found = package.searchpath("lpeg", package.cpath),
            parsed = parsed ~= nil, count = parsed and #parsed or 0, sum = sum }
    end,
}
"#,
    )
    .expect("write plugin");
    let gw = Gateway::start_in(
        tmp.path(),
        "workers: 1\nplugin_dirs: [plugins]\nlua:\n  package_cpath: [clibs/?.so]\nroutes:\n  - id: p\n    uri: /p\n    plugins:\n      lpeg-probe: {}\n    upstream:\n      nodes:\n        \"127.0.0.1:1\": 1\n",
    );
    let r = get(&gw.url("/p?list=10,20,12"));
    assert_eq!(r.status, 200, "{}\n{}", r.text(), gw.logs());
    let v = r.json();
    assert_eq!(v["parsed"], true, "{v}");
    assert_eq!(v["count"], 3, "{v}");
    assert_eq!(v["sum"], 42, "{v}");
    assert!(
        v["version"]
            .as_str()
            .is_some_and(|s| s.starts_with(|c: char| c.is_ascii_digit())),
        "{v}"
    );
    assert_eq!(
        v["found"].as_str(),
        Some(clibs.join("lpeg.so").to_str().expect("utf-8 path")),
        "{v}"
    );
    let v = get(&gw.url("/p?list=10,x")).json();
    assert_eq!(v["parsed"], false, "{v}");
}

/// `lua.ffi_global_libraries` (by default OpenSSL's libcrypto, which nginx links): `ffi.C`
/// finds its functions, as lua-resty-ldap's ASN.1 coder and lua-resty-openssl call them inside
/// OpenResty; with the list empty, it does not.
#[test]
fn ffi_global_libraries_put_their_symbols_in_ffi_c() {
    let probe = r#"
local ffi = require("ffi")
pcall(ffi.cdef, "unsigned long OpenSSL_version_num(void);")
return {
    version = 0.1, priority = 1, name = "ffi-probe", schema = { type = "object" },
    access = function(conf, ctx)
        local ok, v = pcall(function() return tonumber(ffi.C.OpenSSL_version_num()) end)
        return 200, { ok = ok, major = ok and math.floor(v / 0x10000000) or nil }
    end,
}
"#;
    for (libs, want) in [("", true), ("lua:\n  ffi_global_libraries: []\n", false)] {
        let tmp = tempfile::tempdir().expect("temp dir");
        let plugins = tmp.path().join("plugins");
        std::fs::create_dir_all(&plugins).expect("plugins");
        std::fs::write(plugins.join("ffi-probe.lua"), probe).expect("write plugin");
        let gw = Gateway::start_in(
            tmp.path(),
            &format!("workers: 1\nplugin_dirs: [plugins]\n{libs}routes:\n  - id: p\n    uri: /p\n    plugins:\n      ffi-probe: {{}}\n    upstream:\n      nodes:\n        \"127.0.0.1:1\": 1\n"),
        );
        let v = get(&gw.url("/p")).json();
        assert_eq!(v["ok"], want, "{libs:?}: {v}\n{}", gw.logs());
        if want {
            // OpenSSL 3's version number: 0x3...
            assert_eq!(v["major"], 3, "{v}");
        }
    }
}
