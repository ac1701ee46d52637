//! The project's example Lua plugins (`plugins/*.lua`) and the Lua `apisix.core` API, driven
//! through real proxied requests: a real `moongate` process, real upstream servers on loopback.
//!
//! The example-plugin tests point `plugin_dirs` at the repository's own `plugins/` folder, so
//! they test exactly the files users copy. The core-API tests write small probe plugins into a
//! temp dir; each probe answers with what it observed, and the test checks that.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// The repository's `plugins/` folder.
fn repo_plugins() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("plugins")
}

/// A config serving `routes` (YAML list items, already indented by two spaces) with the
/// repository's plugins.
fn example_config(routes: &str) -> String {
    format!(
        "workers: 1\nplugin_dirs:\n  - \"{}\"\nroutes:\n{routes}",
        repo_plugins().display()
    )
}

fn upstream_yaml(up: &Upstream) -> String {
    format!(
        "    upstream:\n      nodes:\n        \"{}\": 1\n",
        up.node()
    )
}

// ---------------------------------------------------------------------------------------------
// Example plugins
// ---------------------------------------------------------------------------------------------

#[test]
fn example_headers_adds_request_and_response_headers() {
    let up = Upstream::echo();
    let gw = Gateway::start(&example_config(&format!(
        "  - id: h
    uri: /h/*
    plugins:
      example-headers:
        request_headers:
          X-Added: \"yes\"
          X-Client-Addr: \"$remote_addr\"
          X-Lang: \"${{arg_lang ?? en}}\"
        response_headers:
          X-Powered-By: moongate
{}",
        upstream_yaml(&up)
    )));

    let r = get(&gw.url("/h/one?lang=fr"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-powered-by").as_deref(), Some("moongate"));
    let seen = r.json();
    assert_eq!(seen["headers"]["x-added"], "yes");
    assert_eq!(seen["headers"]["x-client-addr"], "127.0.0.1");
    assert_eq!(seen["headers"]["x-lang"], "fr");

    let r = get(&gw.url("/h/two"));
    assert_eq!(r.json()["headers"]["x-lang"], "en");
}

#[test]
fn example_key_auth_answers_401_like_apisix() {
    let up = Upstream::echo();
    let gw = Gateway::start(&example_config(&format!(
        "  - id: private
    uri: /private/*
    plugins:
      example-key-auth:
        key: s3cret
        hide_credentials: true
      example-headers:
        response_headers:
          X-Seen-By: example-headers
{}",
        upstream_yaml(&up)
    )));

    let r = get(&gw.url("/private/a"));
    assert_eq!(r.status, 401);
    assert_eq!(
        r.json(),
        json!({"message": "Missing API key found in request"})
    );
    assert_eq!(
        r.text(),
        "{\"message\":\"Missing API key found in request\"}\n"
    );
    // header_filter still runs on a response a plugin made itself, as in APISIX.
    assert_eq!(r.header("x-seen-by").as_deref(), Some("example-headers"));

    let r = Req::get(&gw.url("/private/a"))
        .header("apikey", "wrong")
        .send();
    assert_eq!(r.status, 401);
    assert_eq!(r.json(), json!({"message": "Invalid API key in request"}));

    let r = Req::get(&gw.url("/private/a"))
        .header("apikey", "s3cret")
        .send();
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = r.json();
    assert!(
        seen["headers"].get("apikey").is_none(),
        "key forwarded: {seen}"
    );

    let r = get(&gw.url("/private/b?apikey=s3cret&keep=1"));
    assert_eq!(r.status, 200, "{}", r.text());
    let uri = r.json()["uri"].as_str().unwrap_or_default().to_string();
    assert!(uri.starts_with("/private/b?"), "{uri}");
    assert!(uri.contains("keep=1") && !uri.contains("apikey"), "{uri}");
    assert_eq!(
        up.requests(),
        2,
        "rejected requests must not reach the upstream"
    );
}

#[test]
fn example_key_auth_conf_errors_are_reported_by_check() {
    let (code, out) = check(&example_config(
        "  - id: x
    uri: /x
    plugins:
      example-key-auth:
        header: 5
",
    ));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("example-key-auth"), "{out}");
    assert!(
        out.contains("property \"key\" is required")
            || out.contains(
                "property \"header\" validation failed: wrong type: expected string, got number"
            ),
        "{out}"
    );
}

#[test]
fn example_body_rewrite_replaces_text_in_the_response() {
    let up = Upstream::text("hello world, the world says hi");
    let gw = Gateway::start(&example_config(&format!(
        "  - id: t
    uri: /t
    plugins:
      example-body-rewrite:
        replace:
          - from: world
            to: moon
          - from: hi
            to: bye
{}",
        upstream_yaml(&up)
    )));
    let r = get(&gw.url("/t"));
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "hello moon, the moon says bye");
    if let Some(len) = r.header("content-length") {
        assert_eq!(len, r.body.len().to_string());
    }
}

#[test]
fn example_body_rewrite_sees_a_body_that_arrives_in_many_chunks() {
    // 300 000 bytes of "x" arrive as several 64 KiB chunks; the plugin must see them whole.
    let up = Upstream::streaming(300_000);
    let gw = Gateway::start(&example_config(&format!(
        "  - id: big
    uri: /big
    plugins:
      example-body-rewrite:
        replace:
          - from: xxx
            to: y
{}",
        upstream_yaml(&up)
    )));
    let r = get(&gw.url("/big"));
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), 100_000);
    assert!(r.body.iter().all(|b| *b == b'y'));
}

#[test]
fn example_delay_waits_without_blocking_the_worker() {
    let up = Upstream::echo();
    let gw = Gateway::start(&example_config(&format!(
        "  - id: slow
    uri: /slow
    plugins:
      example-delay:
        delay: 3
{up}  - id: quick
    uri: /quick
    plugins:
      example-delay:
        delay: 0.01
{up}",
        up = upstream_yaml(&up)
    )));

    let slow_url = gw.url("/slow");
    let slow = std::thread::spawn(move || get(&slow_url));
    // Give the slow request time to reach its sleep (bounded: 50 x 20 ms).
    for _ in 0..50 {
        if up.requests() > 0 || slow.is_finished() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // One worker: if ngx.sleep blocked it, this request would wait for the slow one.
    let r = get(&gw.url("/quick"));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-delay-seconds").as_deref(), Some("0.01"));
    assert!(
        !slow.is_finished(),
        "the quick request should finish while the slow one is still asleep"
    );

    let r = slow.join().expect("slow request thread");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-delay-seconds").as_deref(), Some("3"));
    assert_eq!(r.json()["uri"], "/slow");
}

#[test]
fn hello_answers_without_an_upstream() {
    let gw = Gateway::start(&example_config(
        "  - id: hello
    uri: /hello
    plugins:
      hello: {}
  - id: hi
    uri: /hi
    plugins:
      hello:
        message: hi there
",
    ));
    let r = get(&gw.url("/hello"));
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({"message": "hello from moongate"}));
    let r = get(&gw.url("/hi"));
    assert_eq!(r.json(), json!({"message": "hi there"}));
}

// ---------------------------------------------------------------------------------------------
// Core API probes
// ---------------------------------------------------------------------------------------------

/// Writes `plugins` (name, source) into a temp `plugins/` dir and starts a gateway whose
/// `routes` use them. Returns the gateway (which keeps the temp dir alive).
fn probe_gateway(plugins: &[(&str, &str)], routes: &str) -> (tempfile::TempDir, Gateway) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("plugins");
    std::fs::create_dir_all(&dir).expect("plugins dir");
    for (name, src) in plugins {
        std::fs::write(dir.join(format!("{name}.lua")), src).expect("write plugin");
    }
    let yaml = format!("workers: 1\nplugin_dirs:\n  - plugins\nroutes:\n{routes}");
    let gw = Gateway::start_in(tmp.path(), &yaml);
    (tmp, gw)
}

/// A probe plugin whose `access` runs `body` (Lua statements filling the table `out`) and
/// answers `200` with `out` as JSON.
fn probe(name: &str, body: &str) -> String {
    format!(
        r#"local core = require("apisix.core")
local _M = {{ version = 0.1, priority = 7, name = "{name}", schema = {{ type = "object" }} }}
function _M.access(conf, ctx)
    local out = {{}}
{body}
    return 200, out
end
return _M
"#
    )
}

fn probe_route(uri: &str, plugin: &str) -> String {
    format!("  - id: {plugin}\n    uri: {uri}\n    plugins:\n      {plugin}: {{}}\n")
}

/// [`probe_route`] proxying to `up`.
fn probe_route_to(uri: &str, plugin: &str, up: &Upstream) -> String {
    probe_route(uri, plugin) + &upstream_yaml(up)
}

/// The ctx table is emptied and reused after a request (as APISIX returns its api_ctx to a table
/// pool): nothing a request stored there, nor a metatable it set (even a protected one, which
/// cannot be reset: that table is dropped and a fresh one made), reaches the next request.
#[test]
fn ctx_table_starts_empty_for_every_request() {
    let src = probe(
        "probe-fresh-ctx",
        r#"
    out.leftover = ctx.mine
    out.leftover_many = ctx.k1
    out.route_id = ctx.route_id
    out.var_uri = ctx.var.uri
    out.plugin = ctx._plugin_name
    ctx.mine = ngx.var.uri
    if ngx.var.arg_many then
        for i = 1, 100 do ctx["k" .. i] = i end
    end
    if ngx.var.arg_meta then
        setmetatable(ctx, { __index = function() return "from another request" end })
    end
    if ngx.var.arg_lock then
        setmetatable(ctx, { __index = function() return "locked" end, __metatable = "locked" })
    end
"#,
    );
    let (_tmp, gw) = probe_gateway(
        &[("probe-fresh-ctx", &src)],
        &probe_route("/fresh/*", "probe-fresh-ctx"),
    );
    // One worker, one request at a time: each request gets the slot (and table) the last left.
    for (i, q) in ["", "?many=1", "", "?meta=1", "", "?lock=1", "", ""]
        .iter()
        .enumerate()
    {
        let r = get(&gw.url(&format!("/fresh/{i}{q}")));
        assert_eq!(r.status, 200, "{}", r.text());
        let out = r.json();
        assert_eq!(out.get("leftover"), None, "request {i}: {out}");
        assert_eq!(out.get("leftover_many"), None, "request {i}: {out}");
        assert_eq!(out["route_id"], "probe-fresh-ctx", "request {i}");
        assert_eq!(out["var_uri"], format!("/fresh/{i}"), "request {i}");
        assert_eq!(out["plugin"], "probe-fresh-ctx", "request {i}");
    }
}

#[test]
fn core_json_round_trips() {
    let src = probe(
        "probe-json",
        r#"
    local cjson = require("cjson.safe")
    out.empty_object = core.json.encode({})
    out.empty_array = core.json.encode(setmetatable({}, core.json.array_mt))
    out.decoded_empty_array = core.json.encode(core.json.decode('{"a":[]}'))
    out.decoded_empty_object = core.json.encode(core.json.decode('{"a":{}}'))
    local d = core.json.decode('{"n":null,"l":[1,null,"x"]}')
    out.null_is_ngx_null = d.n == ngx.null and d.n == core.json.null
    out.null_round_trip = core.json.stably_encode(d)
    out.null_encodes = core.json.encode({ n = core.json.null })
    out.stable = core.json.stably_encode({ b = 1, a = { true, false }, c = "s" })
    out.nested = core.json.encode(core.json.decode('[1,2.5,"x",true,{"k":"v"}]'))
    out.unicode = core.json.decode('"caf\\u00e9"')
    local v, err = core.json.decode("{oops")
    out.bad_decode = v == nil and type(err) == "string" and #err > 0
    out.cjson_raises = not pcall(require("cjson").decode, "{oops")
    out.cjson_safe = cjson.encode({ 1, 2, "x" })
    out.delay = tostring(core.json.delay_encode({ k = "v" }))
    out.force = core.json.encode({ f = print }, true) ~= nil
    out.plain_fails = core.json.encode({ f = print }) == nil
    out.null_as_nil = core.json.stably_encode(core.json.decode('{"a":null,"b":1}', { null_as_nil = true }))
"#,
    );
    let (_tmp, gw) = probe_gateway(&[("probe-json", &src)], &probe_route("/json", "probe-json"));
    let r = get(&gw.url("/json"));
    assert_eq!(r.status, 200, "{}", r.text());
    let out = r.json();
    assert_eq!(out["empty_object"], "{}");
    assert_eq!(out["empty_array"], "[]");
    assert_eq!(out["decoded_empty_array"], "{\"a\":[]}");
    assert_eq!(out["decoded_empty_object"], "{\"a\":{}}");
    assert_eq!(out["null_is_ngx_null"], true);
    assert_eq!(out["null_round_trip"], "{\"l\":[1,null,\"x\"],\"n\":null}");
    assert_eq!(out["null_encodes"], "{\"n\":null}");
    assert_eq!(out["stable"], "{\"a\":[true,false],\"b\":1,\"c\":\"s\"}");
    let nested: Value =
        serde_json::from_str(out["nested"].as_str().unwrap_or("null")).unwrap_or(Value::Null);
    assert_eq!(nested, json!([1, 2.5, "x", true, {"k": "v"}]));
    assert_eq!(out["unicode"], "café");
    assert_eq!(out["bad_decode"], true);
    assert_eq!(out["cjson_raises"], true);
    assert_eq!(out["cjson_safe"], "[1,2,\"x\"]");
    assert_eq!(out["delay"], "{\"k\":\"v\"}");
    assert_eq!(out["force"], true);
    assert_eq!(out["plain_fails"], true);
    assert_eq!(out["null_as_nil"], "{\"b\":1}");
}

#[test]
fn core_table_helpers() {
    let src = probe(
        "probe-table",
        r#"
    local t = core.table
    local new_tab = require("table.new")
    local pre = new_tab(4, 2)
    pre[1] = "a"
    out.new = #pre
    out.nkeys = t.nkeys({ 1, 2, a = 3 })
    out.nkeys_module = require("table.nkeys")({ x = 1 })
    out.isarray = { t.isarray({ 1, 2 }), t.isarray({ a = 1 }), t.isarray({ 1, nil, 3 }) }
    out.isempty = { t.isempty({}), t.isempty({ 0 }) }
    local orig = { a = { b = 1 } }
    local shallow = t.clone(orig)
    local deep = t.deepcopy(orig)
    out.clone_shares = shallow.a == orig.a
    out.deepcopy_copies = deep.a ~= orig.a and deep.a.b == 1
    local cyc = { name = "c" }
    cyc.self = cyc
    local cc = t.deepcopy(cyc)
    out.deepcopy_cycle = cc.self == cc and cc ~= cyc
    out.try_read_attr = { t.try_read_attr({ a = { b = { c = 5 } } }, "a", "b", "c"),
                          t.try_read_attr({ a = 1 }, "a", "b") == nil }
    out.array_find = t.array_find({ "x", "y", "z" }, "y")
    local merged = t.merge({ a = { x = 1 }, k = 1 }, { a = { y = 2 }, k = 2 })
    out.merge = { merged.a.x, merged.a.y, merged.k }
    out.deep_eq = { t.deep_eq({ a = { 1, 2 } }, { a = { 1, 2 } }), t.deep_eq({ a = 1 }, { a = 2 }) }
    out.set_eq = { t.set_eq({ 1, 2, 3 }, { 3, 2, 1 }), t.set_eq({ 1, 1 }, { 1, 2 }) }
    local arr = { "a" }
    out.insert_tail = t.insert_tail(arr, "b", "c")
    t.insert(arr, "d")
    out.concat = t.concat(arr, ",")
    local c = { 1, 2, k = "v" }
    t.clear(c)
    out.clear = next(c) == nil
    out.remove_falls_back = t.remove({ 1, 2 }) == 2
    local pool = require("tablepool")
    local p = pool.fetch("probe", 0, 4)
    p.x = 1
    pool.release("probe", p)
    out.tablepool = next(pool.fetch("probe", 0, 4)) == nil
    out.str = { core.string.has_prefix("/api/v1", "/api"), core.string.has_suffix("a.lua", ".lua"),
                core.string.find("a.b", "."), core.string.rfind_char("a:b:c", ":") }
"#,
    );
    let (_tmp, gw) = probe_gateway(
        &[("probe-table", &src)],
        &probe_route("/table", "probe-table"),
    );
    let r = get(&gw.url("/table"));
    assert_eq!(r.status, 200, "{}", r.text());
    let out = r.json();
    assert_eq!(out["new"], 1);
    assert_eq!(out["nkeys"], 3);
    assert_eq!(out["nkeys_module"], 1);
    assert_eq!(out["isarray"], json!([true, false, false]));
    assert_eq!(out["isempty"], json!([true, false]));
    assert_eq!(out["clone_shares"], true);
    assert_eq!(out["deepcopy_copies"], true);
    assert_eq!(out["deepcopy_cycle"], true);
    assert_eq!(out["try_read_attr"], json!([5, true]));
    assert_eq!(out["array_find"], 2);
    assert_eq!(out["merge"], json!([1, 2, 2]));
    assert_eq!(out["deep_eq"], json!([true, false]));
    assert_eq!(out["set_eq"], json!([true, false]));
    assert_eq!(out["insert_tail"], 3);
    assert_eq!(out["concat"], "a,b,c,d");
    assert_eq!(out["clear"], true);
    assert_eq!(out["remove_falls_back"], true);
    assert_eq!(out["tablepool"], true);
    assert_eq!(out["str"], json!([true, true, 2, 4]));
}

#[test]
fn core_request_reads_the_client_request() {
    let src = probe(
        "probe-request",
        r#"
    local req = core.request
    out.method = req.get_method()
    out.header = req.header(ctx, "X-One")
    out.header_lower = req.header(ctx, "x-one")
    out.header_multi_first = req.header(ctx, "X-Multi")
    out.headers_multi = req.headers(ctx)["x-multi"]
    local args = req.get_uri_args(ctx)
    out.arg_a = args.a
    out.arg_flag = args.flag
    out.arg_b = args.b
    out.body = req.get_body()
    local none, err = req.get_body(4, ctx)
    out.body_too_big = { none == nil, err }
    out.ip = req.get_ip(ctx)
    out.remote_ip = req.get_remote_client_ip(ctx)
    out.scheme = req.get_scheme(ctx)
    out.host = req.get_host(ctx)
    out.port_is_number = type(req.get_port(ctx)) == "number" and req.get_port(ctx) > 0
    out.http_version = req.get_http_version()
    out.var_uri = ctx.var.uri
    out.var_arg_b = ctx.var.arg_b
    out.var_http = ctx.var.http_x_one
    out.route_id = ctx.route_id
    out.conf_type = ctx.conf_type
    out.conf_id = ctx.conf_id
    out.has_conf_version = ctx.conf_version ~= nil
    out.api_ctx_is_ctx = ngx.ctx.api_ctx == ctx
    out.plugin_name = ctx._plugin_name
"#,
    );
    let routes = "  - id: req-probe\n    uri: /req/*\n    plugins:\n      probe-request: {}\n";
    let (_tmp, gw) = probe_gateway(&[("probe-request", &src)], routes);
    let r = Req::post(&gw.url("/req/path?a=1&a=2&b=two%20words&flag"))
        .header("host", "probe.example")
        .header("X-One", "1")
        .header("X-Multi", "a")
        .header("X-Multi", "b")
        .body("hello body")
        .send();
    assert_eq!(r.status, 200, "{}", r.text());
    let out = r.json();
    assert_eq!(out["method"], "POST");
    assert_eq!(out["header"], "1");
    assert_eq!(out["header_lower"], "1");
    assert_eq!(out["header_multi_first"], "a");
    assert_eq!(out["headers_multi"], json!(["a", "b"]));
    assert_eq!(out["arg_a"], json!(["1", "2"]));
    assert_eq!(out["arg_flag"], true);
    assert_eq!(out["arg_b"], "two words");
    assert_eq!(out["body"], "hello body");
    assert_eq!(
        out["body_too_big"],
        json!([
            true,
            "request size 10 is greater than the maximum size 4 allowed"
        ])
    );
    assert_eq!(out["ip"], "127.0.0.1");
    assert_eq!(out["remote_ip"], "127.0.0.1");
    assert_eq!(out["scheme"], "http");
    assert_eq!(out["host"], "probe.example");
    assert_eq!(out["port_is_number"], true);
    assert_eq!(out["http_version"], 1.1);
    assert_eq!(out["var_uri"], "/req/path");
    assert_eq!(out["var_arg_b"], "two words");
    assert_eq!(out["var_http"], "1");
    assert_eq!(out["route_id"], "req-probe");
    assert_eq!(out["conf_type"], "route");
    assert_eq!(out["conf_id"], "req-probe");
    assert_eq!(out["has_conf_version"], true);
    assert_eq!(out["api_ctx_is_ctx"], true);
    assert_eq!(out["plugin_name"], "probe-request");
}

#[test]
fn core_request_changes_reach_the_upstream() {
    let src = r#"local core = require("apisix.core")
local _M = { version = 0.1, priority = 7, name = "probe-mutate", schema = { type = "object" } }
function _M.access(conf, ctx)
    core.request.set_header(ctx, "X-Set", "v0")
    core.request.set_header(ctx, "x-SET", "v1")
    core.request.set_header(ctx, "X-Twice", "only")
    core.request.set_header(ctx, "X-Tab", { "t1", "t2" })
    core.request.add_header(ctx, "X-Added", "a")
    core.request.add_header(ctx, "X-Added", "b")
    core.request.set_header(ctx, "X-Drop", nil)
    local args = core.table.clone(core.request.get_uri_args(ctx))
    args.extra = "1"
    args.gone = nil
    core.request.set_uri_args(ctx, args)
    -- the cached views follow the changes
    ctx.seen_set = core.request.header(ctx, "x-set")
    ctx.seen_extra = core.request.get_uri_args(ctx).extra
end
function _M.header_filter(conf, ctx)
    core.response.set_header("X-Seen-Set", ctx.seen_set, "X-Seen-Extra", ctx.seen_extra)
    core.response.add_header("X-Multi", "1")
    core.response.add_header("X-Multi", "2")
end
return _M
"#;
    let up = Upstream::echo();
    let routes = probe_route_to("/m", "probe-mutate", &up);
    let (_tmp, gw) = probe_gateway(&[("probe-mutate", src)], &routes);
    let r = Req::get(&gw.url("/m?keep=1&gone=1"))
        .header("X-Drop", "x")
        .header("X-Twice", "1")
        .header("X-Twice", "2")
        .send();
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = r.json();
    assert_eq!(seen["headers"]["x-set"], "v1");
    assert_eq!(seen["headers"]["x-twice"], "only");
    assert_eq!(seen["headers"]["x-tab"], "t1, t2");
    assert_eq!(seen["headers"]["x-added"], "a, b");
    assert!(seen["headers"].get("x-drop").is_none(), "{seen}");
    let uri = seen["uri"].as_str().unwrap_or_default();
    assert!(uri.starts_with("/m?"), "{uri}");
    assert!(
        uri.contains("keep=1") && uri.contains("extra=1") && !uri.contains("gone"),
        "{uri}"
    );
    assert_eq!(r.header("x-seen-set").as_deref(), Some("v1"));
    assert_eq!(r.header("x-seen-extra").as_deref(), Some("1"));
    let multi: Vec<_> = r
        .headers
        .get_all("x-multi")
        .iter()
        .map(|v| v.to_str().unwrap_or(""))
        .collect();
    assert_eq!(multi, ["1", "2"]);
}

/// `set_header` on a header the client sent replaces it where it was, as nginx's does;
/// `add_header` appends.
#[test]
fn set_header_keeps_the_headers_place() {
    let src = r#"local core = require("apisix.core")
local _M = { version = 0.1, priority = 7, name = "probe-order", schema = { type = "object" } }
function _M.access(conf, ctx)
    core.request.set_header(ctx, "X-Second", "new")
    core.request.add_header(ctx, "X-Appended", "1")
end
return _M
"#;
    // Answers with the request's header names in the order they arrived.
    let up = Upstream::start(|req| async move {
        let names: Vec<&str> = req.headers().keys().map(|k| k.as_str()).collect();
        http::Response::new(full(names.join(",")))
    });
    let routes = probe_route_to("/o", "probe-order", &up);
    let (_tmp, gw) = probe_gateway(&[("probe-order", src)], &routes);
    let r = Req::get(&gw.url("/o"))
        .header("X-First", "1")
        .header("X-Second", "old")
        .header("X-Third", "3")
        .send();
    assert_eq!(r.status, 200, "{}", r.text());
    let order = r.text();
    let at = |name: &str| {
        order
            .find(name)
            .unwrap_or_else(|| panic!("{name} missing: {order}"))
    };
    assert!(
        at("x-first") < at("x-second") && at("x-second") < at("x-third"),
        "{order}"
    );
    assert!(at("x-third") < at("x-appended"), "{order}");
}

#[test]
fn core_response_exit_sends_json_and_text() {
    let src = r#"local core = require("apisix.core")
local _M = { version = 0.1, priority = 7, name = "probe-exit", schema = { type = "object" } }
function _M.access(conf, ctx)
    local what = ctx.var.arg_what
    if what == "table" then
        return core.response.exit(403, { message = "forbidden" })
    elseif what == "array" then
        return core.response.exit(200, { list = setmetatable({}, core.json.array_mt) })
    elseif what == "text" then
        return 418, "short and stout"
    elseif what == "say" then
        core.response.set_header("X-Said", "yes")
        core.response.say("a", "b")
        return core.response.exit(201)
    end
    return 400, { error_msg = "unknown" }
end
return _M
"#;
    let (_tmp, gw) = probe_gateway(&[("probe-exit", src)], &probe_route("/exit", "probe-exit"));

    let r = get(&gw.url("/exit?what=table"));
    assert_eq!(r.status, 403);
    assert_eq!(r.text(), "{\"message\":\"forbidden\"}\n");

    let r = get(&gw.url("/exit?what=array"));
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "{\"list\":[]}\n");

    let r = get(&gw.url("/exit?what=text"));
    assert_eq!(r.status, 418);
    assert_eq!(r.text(), "short and stout");

    let r = get(&gw.url("/exit?what=say"));
    assert_eq!(r.status, 201);
    assert_eq!(r.text(), "ab");
    assert_eq!(r.header("x-said").as_deref(), Some("yes"));

    let r = get(&gw.url("/exit"));
    assert_eq!(r.status, 400);
    assert_eq!(r.json(), json!({"error_msg": "unknown"}));
}

#[test]
fn core_lrucache_reuses_objects_per_version() {
    let src = r#"local core = require("apisix.core")
local cache = core.lrucache.new({ count = 4 })
local route_cache = core.lrucache.new({ type = "plugin" })
local created = 0
local function create(tag)
    created = created + 1
    return { id = created, tag = tag }
end
local _M = { version = 0.1, priority = 7, name = "probe-lru", schema = { type = "object" } }
function _M.access(conf, ctx)
    local obj = cache(ctx.var.arg_key or "k", ctx.var.arg_ver or "1", create, "t")
    local per_route = core.lrucache.plugin_ctx(route_cache, ctx, nil, create, "route")
    return 200, { id = obj.id, tag = obj.tag, route_obj = per_route.id,
                  id_key = core.lrucache.plugin_ctx_id(ctx, "x"), created = created }
end
return _M
"#;
    let routes = "  - id: lru\n    uri: /lru\n    plugins:\n      probe-lru: {}\n";
    let (_tmp, gw) = probe_gateway(&[("probe-lru", src)], routes);
    let a = get(&gw.url("/lru?key=k&ver=1")).json();
    let b = get(&gw.url("/lru?key=k&ver=1")).json();
    assert_eq!(a["id"], b["id"], "same key and version: the cached object");
    assert_eq!(a["tag"], "t");
    assert_eq!(
        a["route_obj"], b["route_obj"],
        "plugin_ctx caches per route"
    );
    let c = get(&gw.url("/lru?key=k&ver=2")).json();
    assert_ne!(c["id"], a["id"], "a new version builds a new object");
    let d = get(&gw.url("/lru?key=other&ver=2")).json();
    assert_ne!(d["id"], c["id"]);
    let id_key = d["id_key"].as_str().unwrap_or_default();
    assert!(id_key.starts_with("route#lru#x#"), "{id_key}");
    assert_eq!(d["route_obj"], a["route_obj"]);
}

#[test]
fn core_schema_fills_defaults_and_reports_errors() {
    let src = r#"local core = require("apisix.core")
local schema = {
    type = "object",
    properties = {
        greeting = { type = "string", default = "hi" },
        count = { type = "integer", default = 3 },
    },
}
local _M = { version = 0.1, priority = 7, name = "probe-schema", schema = schema }
function _M.check_schema(conf, schema_type)
    return core.schema.check(schema, conf)
end
function _M.access(conf, ctx)
    local ok, err = core.schema.check({ type = "object", properties = { n = { type = "string" } } },
                                      { n = 1 })
    local filled = {}
    core.schema.check(schema, filled)
    return 200, { greeting = conf.greeting, count = conf.count, ok = ok, err = err,
                  filled = filled.greeting, consumer = core.schema.TYPE_CONSUMER,
                  metadata = core.schema.TYPE_METADATA }
end
return _M
"#;
    let (_tmp, gw) = probe_gateway(
        &[("probe-schema", src)],
        &probe_route("/schema", "probe-schema"),
    );
    let out = get(&gw.url("/schema")).json();
    assert_eq!(out["greeting"], "hi");
    assert_eq!(out["count"], 3);
    assert_eq!(out["ok"], false);
    assert_eq!(
        out["err"],
        "property \"n\" validation failed: wrong type: expected string, got number"
    );
    assert_eq!(out["filled"], "hi");
    assert_eq!(out["consumer"], 1);
    assert_eq!(out["metadata"], 2);
}

/// `require("jsonschema")` (api7/jsonschema's entry point, as openid-connect's `claim_schema`
/// check uses it): a schema that does not compile raises, a validator checks and fills defaults.
#[test]
fn jsonschema_generates_validators() {
    let body = r#"
    local jsonschema = require("jsonschema")
    local ok, err = pcall(jsonschema.generate_validator, { type = "no-such-type" })
    out.bad_ok = ok
    out.bad_err = type(err) == "string" and #err > 0
    local v = jsonschema.generate_validator({
        type = "object",
        properties = { iss = { type = "string" }, n = { type = "integer", default = 5 } },
        required = { "iss" },
    })
    local claims = { iss = "me" }
    out.good = v(claims)
    out.filled = claims.n
    out.missing_ok, out.missing_err = v({})
    local skip = jsonschema.generate_validator({ type = "string" },
        { skip_validation = function(x) return x == 42 end })
    out.skipped = skip(42)
    out.not_skipped = skip(41)
"#;
    let (_tmp, gw) = probe_gateway(
        &[("probe-jsonschema", &probe("probe-jsonschema", body))],
        &probe_route("/js", "probe-jsonschema"),
    );
    let out = get(&gw.url("/js")).json();
    assert_eq!(out["bad_ok"], false);
    assert_eq!(out["bad_err"], true);
    assert_eq!(out["good"], true);
    assert_eq!(out["filled"], 5);
    assert_eq!(out["missing_ok"], false);
    assert_eq!(out["missing_err"], "property \"iss\" is required");
    assert_eq!(out["skipped"], true);
    assert_eq!(out["not_skipped"], false);
}

/// `resty.core.base`, lua-resty-core's shared helpers as libraries built on it use them
/// (lua-resty-ldap takes `new_tab`): scratch buffers, `ref_in_table`, the FFI codes, and
/// `get_request` answering during a request and not in a timer.
#[test]
fn resty_core_base_helpers() {
    let body = r#"
    local base = require("resty.core.base")
    local ffi = require("ffi")
    local t = base.new_tab(4, 4)
    t[1] = "x"; base.clear_tab(t)
    out.cleared = next(t) == nil
    local buf = base.get_string_buf(16)
    ffi.copy(buf, "hello", 5)
    out.buf = ffi.string(base.get_string_buf(16), 5)
    out.big = ffi.sizeof(base.get_string_buf(100000)) >= 100000
    local holder = {}
    local inner = base.ref_in_table(holder, "k")
    inner.v = 1
    out.ref = holder.k.v == 1 and base.ref_in_table(holder, "k") == inner
    out.ok_code = base.FFI_OK
    out.declined = base.FFI_DECLINED
    out.http = base.allows_subsystem("stream", "http")
    out.stream_only = base.allows_subsystem("stream")
    out.in_request = base.get_request() ~= nil
    local shared = ngx.shared["internal-status"]
    out.timer = shared:get("base-timer")
    ngx.timer.at(0, function()
        shared:set("base-timer", base.get_request() == nil and "nil" or "request")
    end)
"#;
    let (_tmp, gw) = probe_gateway(
        &[("probe-base", &probe("probe-base", body))],
        &probe_route("/base", "probe-base"),
    );
    let out = get(&gw.url("/base")).json();
    assert_eq!(out["cleared"], true, "{out}");
    assert_eq!(out["buf"], "hello", "{out}");
    assert_eq!(out["big"], true, "{out}");
    assert_eq!(out["ref"], true, "{out}");
    assert_eq!(out["ok_code"], 0, "{out}");
    assert_eq!(out["declined"], -5, "{out}");
    assert_eq!(out["http"], true, "{out}");
    assert_eq!(out["stream_only"], false, "{out}");
    assert_eq!(out["in_request"], true, "{out}");
    assert!(
        common::health::poll_until(std::time::Duration::from_secs(10), || {
            get(&gw.url("/base")).json()["timer"] == "nil"
        }),
        "a timer's get_request() is not nil"
    );
}

/// APISIX's `delayed_body_filter` (skywalking finishes its spans there): per chunk, after
/// every plugin's `body_filter`, also those of lower priority, with `ngx.arg` and
/// `ngx.get_phase()` as in the body filter phase.
#[test]
fn delayed_body_filter_runs_after_every_body_filter() {
    let early = r#"
local _M = { version = 0.1, priority = 9000, name = "delayed-probe", schema = { type = "object" } }
function _M.body_filter(conf, ctx)
    ctx.order = (ctx.order or "") .. "body:"
end
function _M.delayed_body_filter(conf, ctx)
    ctx.order = ctx.order .. "delayed:"
    ngx.arg[1] = ngx.arg[1] .. "[" .. ngx.get_phase() .. "]"
    if ngx.arg[2] then
        ngx.arg[1] = ngx.arg[1] .. ctx.order
    end
end
return _M
"#;
    let late = r#"
local _M = { version = 0.1, priority = 1, name = "late-body", schema = { type = "object" } }
function _M.body_filter(conf, ctx)
    ctx.order = (ctx.order or "") .. "late:"
    ngx.arg[1] = string.upper(ngx.arg[1])
end
return _M
"#;
    let up = Upstream::text("abc");
    let (_tmp, gw) = probe_gateway(
        &[("delayed-probe", early), ("late-body", late)],
        &format!(
            "  - id: d\n    uri: /d\n    plugins:\n      delayed-probe: {{}}\n      late-body: {{}}\n{}",
            upstream_yaml(&up)
        ),
    );
    let r = get(&gw.url("/d"));
    assert_eq!(r.status, 200, "{}\n{}", r.text(), gw.logs());
    let body = r.text();
    // The late body_filter upper-cased the chunk before the delayed filter appended to it.
    assert!(body.starts_with("ABC[body_filter]"), "{body}");
    assert!(body.ends_with("body:late:delayed:"), "{body}");
}

/// `ctx.var.method` is the request method, as APISIX's ctx.var defines it (authz-casbin reads
/// it); nginx has no `$method`, so `ngx.var.method` stays nil. `$server_name` and `$hostname`
/// (lua-resty-t1k sends both to the WAF).
#[test]
fn ctx_var_method_is_the_request_method() {
    let body = r#"
    out.ctx_method = ctx.var.method
    out.ngx_method = ngx.var.method == nil and "nil" or ngx.var.method
    out.server_name = ngx.var.server_name
    out.hostname = ngx.var.hostname
"#;
    let (_tmp, gw) = probe_gateway(
        &[("probe-method", &probe("probe-method", body))],
        &probe_route("/m", "probe-method"),
    );
    let out = Req::new("DELETE", &gw.url("/m")).send().json();
    assert_eq!(out["ctx_method"], "DELETE", "{out}");
    assert_eq!(out["ngx_method"], "nil", "{out}");
    // nginx's $server_name (APISIX's server block is `server_name _`) and $hostname.
    assert_eq!(out["server_name"], "_", "{out}");
    let host = std::process::Command::new("hostname")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    assert_eq!(out["hostname"], host.as_str(), "{out}");
}

#[test]
fn core_utils_log_and_misc() {
    let src = probe(
        "probe-misc",
        r#"
    out.resolved = core.utils.resolve_var("$uri|${arg_x}|${arg_none ?? dflt}|$arg_none|\\$uri", ctx.var)
    local _, _, n = core.utils.resolve_var("$uri $host", ctx.var)
    out.resolved_n = n
    out.captures = core.utils.resolve_var_with_captures("/new/$1/${2}", { "a", "b" })
    out.safe = core.utils.uri_safe_encode("/a b?c")
    local host, port = core.utils.parse_addr("127.0.0.1:8080")
    out.addr = { host, port }
    local m = core.ip.create_ip_matcher({ "127.0.0.0/8", "::1" })
    out.ip_match = m:match(ctx.var.remote_addr)
    out.ip_valid = { core.ip.validate_cidr_or_ip("10.0.0.0/8"), core.ip.validate_cidr_or_ip("nope") }
    out.version_is_string = type(core.version.VERSION) == "string"
    out.local_conf = type(core.config.local_conf()) == "table"
    out.registered = { ctx.var.probe_upper_uri, ctx.var.probe_upper_uri, ctx.var.probe_count,
                       ctx.var.probe_count }
    core.log.warn("probe marker ", 42, " ", core.json.delay_encode({ k = "v" }))
    core.log.debug("never rendered ", core.log.delay_exec(error, "delay_exec ran at debug"))
"#,
    );
    // Module-level code runs once per VM: register the variables there, as APISIX plugins do.
    let src = format!(
        "local core = require(\"apisix.core\")
local n = 0
core.ctx.register_var(\"probe_upper_uri\", function(ctx) n = n + 1; return ctx.var.uri:upper() end)
core.ctx.register_var(\"probe_count\", function(ctx) n = n + 1; return n end, {{ no_cacheable = true }})
{src}"
    );
    let (_tmp, gw) = probe_gateway(
        &[("probe-misc", &src)],
        &probe_route("/misc/*", "probe-misc"),
    );
    let r = get(&gw.url("/misc/p?x=1"));
    assert_eq!(r.status, 200, "{}", r.text());
    let out = r.json();
    assert_eq!(out["resolved"], "/misc/p|1|dflt||\\$uri");
    assert_eq!(out["resolved_n"], 2);
    assert_eq!(out["captures"], "/new/a/b");
    assert_eq!(out["safe"], "/a%20b%3Fc");
    assert_eq!(out["addr"], json!(["127.0.0.1", 8080]));
    assert_eq!(out["ip_match"], true);
    assert_eq!(out["ip_valid"], json!([true, false]));
    assert_eq!(out["version_is_string"], true);
    assert_eq!(out["local_conf"], true);
    // probe_upper_uri is computed once (n = 1), probe_count on every read (2, then 3).
    assert_eq!(out["registered"], json!(["/MISC/P", "/MISC/P", 2, 3]));
    assert!(
        gw.wait_for_log("probe marker 42 {\"k\":\"v\"}", Duration::from_secs(5)),
        "{}",
        gw.logs()
    );
    let logs = gw.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("probe marker"))
        .unwrap_or_default();
    assert!(
        line.contains("probe-misc"),
        "the line names the plugin: {line}"
    );
    assert!(!logs.contains("delay_exec ran at debug"), "{logs}");
}

/// A response header set in access (before the response exists) replaces the upstream's of the
/// same name on the proxied response; the upstream's other headers pass as they are.
#[test]
fn response_header_set_in_access_replaces_the_upstreams() {
    let up = Upstream::start(|_req| async move {
        hyper::Response::builder()
            .header("x-up", "upstream")
            .header("x-other", "1")
            .header("set-cookie", "a=1")
            .header("set-cookie", "b=2")
            .body(full("proxied"))
            .expect("response")
    });
    let src = r#"local core = require("apisix.core")
local _M = { version = 0.1, priority = 7, name = "stage-header", schema = { type = "object" } }
function _M.access(conf, ctx)
    core.response.set_header("X-Up", "lua")
    core.response.add_header("X-Added", "a1")
    core.response.add_header("X-Added", "a2")
end
return _M
"#;
    let routes = probe_route_to("/s", "stage-header", &up);
    let (_tmp, gw) = probe_gateway(&[("stage-header", src)], &routes);
    let r = get(&gw.url("/s"));
    assert_eq!((r.status, r.text().as_str()), (200, "proxied"));
    let all = |n: &str| -> Vec<String> {
        r.headers
            .get_all(n)
            .iter()
            .map(|v| v.to_str().unwrap_or("").to_string())
            .collect()
    };
    assert_eq!(all("x-up"), ["lua"], "{:?}", r.headers);
    assert_eq!(all("x-added"), ["a1", "a2"]);
    assert_eq!(all("x-other"), ["1"]);
    assert_eq!(all("set-cookie"), ["a=1", "b=2"]);
}

/// A Lua plugin's log phase reads the request body (`ngx.req.get_body_data()`, as APISIX's
/// loggers' `include_req_body` and data-mask do) though it streamed to the upstream: nginx
/// keeps a body up to `client_body_buffer_size` in memory. A larger one is not kept.
#[test]
fn the_log_phase_sees_a_streamed_request_body_that_fits_the_buffer() {
    const BODY_LOG: &str = r#"
local core = require("apisix.core")
local _M = { version = 0.1, priority = 7, name = "body-log", schema = { type = "object" } }
function _M.log(conf, ctx)
    local b = ngx.req.get_body_data()
    core.log.warn("log-body[", ctx.var.uri, "]=", b and (#b > 40 and #b .. " bytes" or b) or "nil")
end
return _M
"#;
    let up = Upstream::echo();
    let (_tmp, gw) = probe_gateway(
        &[("body-log", BODY_LOG)],
        &format!(
            "  - id: bl\n    uri: /bl/*\n    plugins:\n      body-log: {{}}\n{}",
            upstream_yaml(&up)
        ),
    );
    let r = Req::post(&gw.url("/bl/sized")).body("hello=1").send();
    assert_eq!(r.status, 200);
    // Chunked, in two chunks, straight from a socket.
    let resp = raw(
        gw.addr(),
        b"POST /bl/chunked HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    );
    assert_eq!(raw_status(&resp), 200, "{resp}");
    // The default buffer is 16 KiB: one byte more is not kept; exactly 16 KiB is.
    let r = Req::post(&gw.url("/bl/big"))
        .body(vec![b'x'; 16 * 1024 + 1])
        .send();
    assert_eq!(r.status, 200);
    let echoed: serde_json::Value = serde_json::from_str(&r.text()).expect("echo");
    assert_eq!(echoed["body_len"], 16 * 1024 + 1);
    let r = Req::post(&gw.url("/bl/full"))
        .body(vec![b'y'; 16 * 1024])
        .send();
    assert_eq!(r.status, 200);
    let r = Req::get(&gw.url("/bl/none")).send();
    assert_eq!(r.status, 200);
    for line in [
        "log-body[/bl/sized]=hello=1",
        "log-body[/bl/chunked]=hello world",
        "log-body[/bl/big]=nil",
        "log-body[/bl/full]=16384 bytes",
        "log-body[/bl/none]=nil",
    ] {
        assert!(
            gw.wait_for_log(line, Duration::from_secs(5)),
            "{line}\n{}",
            gw.logs()
        );
    }
}

/// A plugin picks the request's upstream, as APISIX's traffic-split does: `ctx.upstream_id`
/// for a configured one, `apisix.upstream.set` for one it makes; otherwise the route's.
#[test]
fn a_plugin_picks_the_upstream_for_its_request() {
    const SPLIT: &str = r#"
local core = require("apisix.core")
local upstream = require("apisix.upstream")
local _M = { version = 0.1, priority = 966, name = "split", schema = { type = "object" } }
function _M.access(conf, ctx)
    local to = core.request.header(ctx, "x-to")
    if to == "id" then
        ctx.upstream_id = "u2"
    elseif to == "missing" then
        ctx.upstream_id = "nope"
    elseif to == "made" or to == "bad" then
        local up = { type = "roundrobin", scheme = "http",
                     nodes = { { host = "127.0.0.1", port = tonumber(core.request.header(ctx, "x-port")),
                                 weight = 1, domain = "ignored" } },
                     parent = ctx.matched_route }
        if to == "bad" then up.type = "nope" end
        local ok, err = upstream.check_schema(up)
        if not ok then
            return 500, { error = err }
        end
        assert(upstream.set(ctx, "made#" .. up.nodes[1].port, ctx.conf_version, up))
    elseif to == "cleared" then
        ctx.upstream_id = "u2"
        ctx.upstream_id = nil
    end
    ngx.header["x-chosen"] = tostring(ctx.upstream_id)
    ngx.header["x-known"] = tostring(upstream.get_by_id("u2") ~= nil) .. "," ..
                            tostring(upstream.get_by_id("nope") ~= nil)
end
return _M
"#;
    let one = Upstream::text("one");
    let two = Upstream::text("two");
    let three = Upstream::text("three");
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("plugins");
    std::fs::create_dir_all(&dir).expect("plugins dir");
    std::fs::write(dir.join("split.lua"), SPLIT).expect("write plugin");
    let yaml = format!(
        "workers: 1\nplugin_dirs:\n  - plugins\nupstreams:\n  - id: u2\n    nodes:\n      \"{}\": 1\nroutes:\n  - id: s\n    uri: /s\n    plugins:\n      split: {{}}\n{}",
        two.node(),
        upstream_yaml(&one)
    );
    let gw = Gateway::start_in(tmp.path(), &yaml);
    let get = |to: &str| {
        Req::get(&gw.url("/s"))
            .header("x-to", to)
            .header("x-port", &three.addr().port().to_string())
            .send()
    };
    let r = get("none");
    assert_eq!((r.status, r.text().as_str()), (200, "one"));
    assert_eq!(r.header("x-known").as_deref(), Some("true,false"));
    let r = get("id");
    assert_eq!((r.status, r.text().as_str()), (200, "two"));
    assert_eq!(r.header("x-chosen").as_deref(), Some("u2"));
    let r = get("cleared");
    assert_eq!((r.status, r.text().as_str()), (200, "one"));
    for _ in 0..3 {
        let r = get("made");
        assert_eq!(
            (r.status, r.text().as_str()),
            (200, "three"),
            "{}",
            gw.logs()
        );
    }
    // The made upstream is built once and keeps its pooled connection.
    assert_eq!(three.connections(), 1);
    let r = get("bad");
    assert_eq!(r.status, 500);
    assert!(r.text().contains("type"), "{}", r.text());
    let r = get("missing");
    assert_eq!(r.status, 503);
    assert!(
        r.text().contains("failed to find upstream by id: nope"),
        "{}",
        r.text()
    );
}

/// `apisix.http.service` reads the configured services (datadog's service names, opa's
/// `with_service`), in a request and in a timer alike.
#[test]
fn plugins_read_services_by_id() {
    const SVC: &str = r#"
local service = require("apisix.http.service")
local _M = { version = 0.1, priority = 7, name = "svc", schema = { type = "object" } }
function _M.access(conf, ctx)
    local s = service.get(ctx.service_id)
    local list, version = service.services()
    local from_timer
    ngx.timer.at(0, function() from_timer = service.get("s1").value.name end)
    ngx.sleep(0.01)
    return 200, { name = s and s.value.name, key = s and s.key, count = #list,
                  versioned = type(version) == "number", missing = service.get("nope") == nil,
                  from_timer = from_timer }
end
return _M
"#;
    let up = Upstream::echo();
    let yaml = format!(
        "services:\n  - id: s1\n    name: billing\n  - id: s2\n    name: other\nroutes:\n  - id: r\n    uri: /svc\n    service_id: s1\n    plugins:\n      svc: {{}}\n{}",
        upstream_yaml(&up)
    );
    let tmp = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir_all(tmp.path().join("plugins")).expect("plugins");
    std::fs::write(tmp.path().join("plugins/svc.lua"), SVC).expect("plugin");
    let gw = Gateway::start_in(
        tmp.path(),
        &format!("workers: 1\nplugin_dirs:\n  - plugins\n{yaml}"),
    );
    let r = Req::get(&gw.url("/svc")).send();
    assert_eq!(r.status, 200, "{}", gw.logs());
    let v: Value = serde_json::from_str(&r.text()).expect("json");
    assert_eq!(
        v,
        json!({"name": "billing", "key": "/apisix/services/s1", "count": 2, "versioned": true,
               "missing": true, "from_timer": "billing"})
    );
}

/// `resty.apisix.client` (APISIX-Runtime's module that APISIX's real-ip, client-control and
/// proxy-control call), used by a plugin of this project's.
#[test]
fn apisix_runtime_client_controls_address_body_limit_and_buffering() {
    let up = Upstream::echo();
    let node = up.node();
    let route = |id: &str, conf: &str| {
        format!(
            "  - id: {id}\n    uri: /{id}\n    plugins:\n      client-ctl: {conf}\n    upstream:\n      nodes:\n        \"{node}\": 1\n"
        )
    };
    let gw = Gateway::start_with_plugins(
        &[("client-ctl", common::lua_plugins::CLIENT_CTL)],
        &format!(
            "workers: 1\nproxy:\n  client_max_body_size: 1024\nroutes:\n{}{}{}{}{}",
            route("ip", "{real_ip_header: X-Real-IP}"),
            route("big", "{max_body_size: 4096}"),
            route("small", "{max_body_size: 10}"),
            route("unlimited", "{max_body_size: 0}"),
            route("buffered", "{request_buffering: true}"),
        ),
    );

    // The client address: what later plugins, the upstream's X-Forwarded-For and the
    // variables see; the connection's own stays in realip_remote_addr.
    let r = Req::get(&gw.url("/ip"))
        .header("X-Real-IP", "203.0.113.7:4000")
        .send();
    assert_eq!(r.status, 200, "{}", r.text());
    let h = &r.json()["headers"];
    assert_eq!(h["x-seen-remote"], "203.0.113.7 4000 127.0.0.1");
    assert_eq!(h["x-real-ip"], "203.0.113.7");
    assert_eq!(h["x-forwarded-for"], "203.0.113.7");
    // No port: nginx leaves $remote_port empty.
    let r = Req::get(&gw.url("/ip"))
        .header("X-Real-IP", "2001:db8::1")
        .send();
    assert_eq!(
        r.json()["headers"]["x-seen-remote"],
        "2001:db8::1  127.0.0.1"
    );
    let r = Req::get(&gw.url("/ip"))
        .header("X-Real-IP", "not-an-ip")
        .send();
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"], "error while setting real ip, rc: -1");
    // Without the header, the connection's address.
    let r = Req::get(&gw.url("/ip")).send();
    let seen = r.json()["headers"]["x-seen-remote"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        seen.starts_with("127.0.0.1 ") && seen.ends_with(" 127.0.0.1"),
        "{seen}"
    );

    // The body limit for the route, above or below the node's 1024, checked on the declared
    // length and while a chunked body streams.
    let post = |path: &str, len: usize| Req::post(&gw.url(path)).body(vec![b'a'; len]).send();
    assert_eq!(post("/big", 3000).status, 200);
    assert_eq!(post("/big", 5000).status, 413);
    assert_eq!(post("/small", 10).status, 200);
    assert_eq!(post("/small", 11).status, 413);
    assert_eq!(post("/unlimited", 100_000).status, 200);
    let r = Req::post(&gw.url("/big"))
        .body_stream(generated(3000))
        .send();
    assert_eq!(r.status, 200);
    let chunk = "c".repeat(2000);
    for (path, status) in [("/big", 200), ("/small", 413)] {
        let resp = raw(
            gw.addr(),
            format!(
                "POST {path} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n7d0\r\n{chunk}\r\n0\r\n\r\n"
            )
            .as_bytes(),
        );
        assert_eq!(raw_status(&resp), status, "{path}: {resp}");
    }

    // Buffering: a chunked client body reaches the upstream whole, with its length.
    let resp = raw(
        gw.addr(),
        format!(
            "POST /buffered HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3e8\r\n{}\r\n0\r\n\r\n",
            "b".repeat(1000)
        )
        .as_bytes(),
    );
    let r = RawResp::parse(&resp);
    assert_eq!(r.status, 200, "{resp}");
    let h = &r.json()["headers"];
    assert_eq!(h["content-length"], "1000", "{h}");
    assert!(h.get("transfer-encoding").is_none(), "{h}");
    assert_eq!(r.json()["body_len"], 1000);
}

/// `resty.apisix.response.set_gzip` (what APISIX's `gzip` calls): the response goes out
/// gzip-compressed where nginx's gzip filter would compress it, after any body_filter.
#[test]
fn set_gzip_compresses_as_nginx_gzip_filter() {
    use std::io::Read;
    let text: String = (0..40_000)
        .map(|i| format!("line {i} of moongate\n"))
        .collect();
    let text: &'static str = Box::leak(text.into_boxed_str());
    let up = Upstream::start(move |req| async move {
        let mut res = http::Response::new(full(text));
        let h = res.headers_mut();
        h.insert("content-type", "text/html".parse().unwrap());
        h.insert("etag", "\"v1\"".parse().unwrap());
        h.insert("accept-ranges", "bytes".parse().unwrap());
        match req.uri().path() {
            "/gz/encoded" => {
                h.insert("content-encoding", "br".parse().unwrap());
            }
            "/gz/partial" => *res.status_mut() = http::StatusCode::PARTIAL_CONTENT,
            "/gz/missing" => *res.status_mut() = http::StatusCode::NOT_FOUND,
            _ => {}
        }
        res
    });
    let node = up.node();
    let route = |id: &str, uri: &str, plugins: &str| {
        format!(
            "  - id: {id}\n    uri: {uri}\n    plugins:\n{plugins}    upstream:\n      nodes:\n        \"{node}\": 1\n"
        )
    };
    let gw = Gateway::start_with_plugins(
        &[
            ("gzip-on", common::lua_plugins::GZIP_ON),
            ("upper-body", common::lua_plugins::UPPER_BODY),
        ],
        &format!(
            "workers: 1\nroutes:\n{}{}{}",
            route("gz", "/gz/*", "      gzip-on: {level: 6}\n"),
            route(
                "upper",
                "/upper",
                "      gzip-on: {}\n      upper-body: {}\n"
            ),
            route("bad", "/bad", "      gzip-on: {bad: true}\n"),
        ),
    );
    let gunzip = |body: &[u8]| {
        let mut out = String::new();
        flate2::read::GzDecoder::new(body)
            .read_to_string(&mut out)
            .expect("a gzip stream");
        out
    };
    let gz = |path: &str| {
        Req::get(&gw.url(path))
            .header("Accept-Encoding", "br;q=0.9, gzip")
            .send()
    };

    let r = gz("/gz/page");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-encoding").as_deref(), Some("gzip"));
    assert_eq!(r.header("content-length"), None);
    assert_eq!(r.header("accept-ranges"), None);
    assert_eq!(r.header("etag").as_deref(), Some("W/\"v1\""));
    assert!(r.body.len() < text.len() / 5, "{} bytes", r.body.len());
    assert_eq!(gunzip(&r.body), text);
    // 404 is compressed too, as nginx does.
    let r = gz("/gz/missing");
    assert_eq!(r.status, 404);
    assert_eq!(gunzip(&r.body), text);

    // Where nginx leaves the response alone: no gzip in Accept-Encoding (or q=0), a HEAD, a
    // request through another proxy (Via), a body already encoded, a 206.
    for (path, method, headers) in [
        ("/gz/page", "GET", vec![]),
        ("/gz/page", "GET", vec![("Accept-Encoding", "gzip;q=0, br")]),
        ("/gz/page", "HEAD", vec![("Accept-Encoding", "gzip")]),
        (
            "/gz/page",
            "GET",
            vec![("Accept-Encoding", "gzip"), ("Via", "1.1 edge")],
        ),
        ("/gz/partial", "GET", vec![("Accept-Encoding", "gzip")]),
    ] {
        let mut req = Req::new(method, &gw.url(path));
        for (k, v) in &headers {
            req = req.header(k, v);
        }
        let r = req.send();
        assert_eq!(
            r.header("content-encoding"),
            None,
            "{method} {path} {headers:?}"
        );
        assert_eq!(r.header("etag").as_deref(), Some("\"v1\""));
        assert_eq!(
            r.header("content-length").as_deref(),
            Some(text.len().to_string().as_str())
        );
        if method == "GET" {
            assert_eq!(r.body.len(), text.len());
        }
    }
    let r = gz("/gz/encoded");
    assert_eq!(r.header("content-encoding").as_deref(), Some("br"));
    assert_eq!(r.body.len(), text.len());

    // Compression comes after body_filter.
    let r = gz("/upper");
    assert_eq!(r.header("content-encoding").as_deref(), Some("gzip"));
    assert_eq!(gunzip(&r.body), text.to_uppercase());

    // Out-of-range buffers: nil, err, and the response as it was.
    let r = gz("/bad");
    assert_eq!(r.header("x-bad").as_deref(), Some("nil failed to set gzip"));
    assert_eq!(r.header("content-encoding"), None);
    assert_eq!(r.body.len(), text.len());
}
