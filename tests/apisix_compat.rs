//! APISIX compatibility of the Lua layer.
//!
//! Two halves:
//! - Always (CI): the project's own Lua plugins, written below, use the same APIs APISIX's
//!   bundled plugins use (`ngx.re` with PCRE features, `resty.core.regex`, `resty.expr.v1`,
//!   `core.lrucache`, the IP matcher, `apisix.secret`, `apisix.plugin.conf_version`,
//!   `xml2lua`, `_meta`, `apisix.consumer` with consumers from the config file and the Admin
//!   API), through a real gateway and real requests.
//! - With `APISIX_SRC=/path/to/apisix` (see `scripts/apisix-compat`): APISIX's own plugin files
//!   are copied, unmodified, into a temporary `plugins/` dir and checked against behaviour taken
//!   from APISIX's docs and `t/plugin/*.t` files, restated here as request → expected response.
//!   No APISIX file is part of this repository.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

fn upstream_yaml(up: &Upstream) -> String {
    format!(
        "    upstream:\n      nodes:\n        \"{}\": 1\n",
        up.node()
    )
}

fn gateway_with(plugins: &[(&str, &str)], routes: &str) -> (tempfile::TempDir, Gateway) {
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

// ---------------------------------------------------------------------------------------------
// The project's own plugins, exercising the APIs the APISIX targets use
// ---------------------------------------------------------------------------------------------

/// Answers with what the APIs return, so the test can check each one.
const API_PROBE: &str = r#"
local core = require("apisix.core")
local plugin = require("apisix.plugin")
local secret = require("apisix.secret")
local expr = require("resty.expr.v1")
local re_compile = require("resty.core.regex").re_match_compile
local ngx_re = require("ngx.re")
local xml2lua = require("xml2lua")

local lru = core.lrucache.new({ type = "plugin" })
local built = 0

local schema = {
    type = "object",
    properties = { allow = { type = "array", items = { type = "string" } } },
    additionalProperties = false,
}

local _M = { version = 0.1, priority = 11, name = "api-probe", schema = schema }

function _M.check_schema(conf)
    return core.schema.check(schema, conf)
end

function _M.access(conf, ctx)
    local out = {}
    -- look-behind and captures, as core.utils.resolve_var's pattern needs
    local m = ngx.re.match([[a\$b $name]], [[(?<!\\)\$(\w+)]], "jo")
    out.lookbehind = m and m[1]
    local m2 = ngx.re.match("Version: 3.18", [[(?<major>\d+)\.(?<minor>\d+)]], "jo")
    out.named = m2.major .. "/" .. m2.minor
    out.sub = ngx.re.sub("/api/users/7", [[^/api/(\w+)/(\d+)]], "/v2/$1?id=${2}", "jo")
    out.gsub = ngx.re.gsub("a-b-c", "-", "+")
    local f = ngx.re.gsub("x1y22", [[\d+]], function(c) return "<" .. c[0] .. ">" end, "jo")
    out.gsub_fn = f
    local from, to = ngx.re.find("hello WORLD", "world", "ji")
    out.find = from .. ":" .. to
    local parts = {}
    for mm in ngx.re.gmatch("http://a.com, http://b.com", "([^,]+)", "jiox") do
        parts[#parts + 1] = mm[1]
    end
    out.gmatch = table.concat(parts, "|")
    out.split = table.concat(ngx_re.split("a;b;;c", ";"), "|")
    local _, err = re_compile("([a-z", "j")
    out.bad_regex = err
    out.good_regex = re_compile([[.*\.example\.com$]], "j") and true or false
    local _, _, sub_err = ngx.re.sub("x", "(", "")
    out.sub_err = sub_err ~= nil

    -- lrucache keyed by a conf sub-table: built once per conf version
    local matcher = lru(conf.allow, nil, function()
        built = built + 1
        return core.ip.create_ip_matcher(conf.allow)
    end)
    out.ip_allowed = matcher:match(ctx.var.remote_addr) and true or false
    out.ip_v6 = matcher:match("2001:db8::1") and true or false
    out.built = built

    local e = expr.new({ { "arg_who", "==", "jack" }, { "http_x_n", ">", 3 } })
    out.expr = e:eval(ctx.var)
    local bad_e, e_err = expr.new({ { "arg_who", "===", "x" } })
    out.expr_err = bad_e == nil and e_err
    out.secret = secret.is_secret_ref("$secret://vault/1/k") and not secret.is_secret_ref("k")
    out.conf_version = type(plugin.conf_version(conf)) == "string"
    out.xml = xml2lua.toXml({ a = "1<2" }, "data")
    return 200, out
end

return _M
"#;

#[test]
fn lua_layer_provides_the_apis_apisix_plugins_use() {
    let up = Upstream::echo();
    let routes = format!(
        "  - id: probe\n    uri: /probe\n    plugins:\n      api-probe:\n        allow: [\"127.0.0.0/8\", \"2001:db8::/32\"]\n{}",
        upstream_yaml(&up)
    );
    let (_tmp, gw) = gateway_with(&[("api-probe", API_PROBE)], &routes);
    let r = Req::get(&gw.url("/probe?who=jack"))
        .header("x-n", "5")
        .send();
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["lookbehind"], "name");
    assert_eq!(v["named"], "3/18");
    assert_eq!(v["sub"], "/v2/users?id=7");
    assert_eq!(v["gsub"], "a+b+c");
    assert_eq!(v["gsub_fn"], "x<1>y<22>");
    assert_eq!(v["find"], "7:11");
    assert_eq!(v["gmatch"], "http://a.com| http://b.com");
    assert_eq!(v["split"], "a|b||c");
    assert_eq!(
        v["bad_regex"],
        "pcre2_compile() failed: missing terminating ] for character class in \"([a-z\""
    );
    assert_eq!(v["good_regex"], true);
    assert_eq!(v["sub_err"], true);
    assert_eq!(v["ip_allowed"], true);
    assert_eq!(v["ip_v6"], true);
    assert_eq!(v["expr"], true);
    assert_eq!(v["expr_err"], "invalid operator '==='");
    assert_eq!(v["secret"], true);
    assert_eq!(v["conf_version"], true);
    assert_eq!(v["xml"], "<data>\n  <a>1&lt;2</a>\n</data>\n");
    // The matcher is cached on the conf's `allow` table: a second request does not rebuild it.
    let again = Req::get(&gw.url("/probe?who=bob")).send().json();
    assert_eq!(again["built"], 1);
    assert_eq!(again["expr"], false);
}

/// Refuses requests without `x-token` in rewrite, like an auth plugin.
const GUARD: &str = r#"
local core = require("apisix.core")
local _M = { version = 0.1, priority = 2500, name = "guard",
             schema = { type = "object", properties = {}, additionalProperties = false } }
function _M.check_schema(conf) return core.schema.check(_M.schema, conf) end
function _M.rewrite(conf, ctx)
    if not core.request.header(ctx, "x-token") then
        return 401, { message = "Missing token" }
    end
end
return _M
"#;

/// Adds a header in header_filter, like cors.
const STAMP: &str = r#"
local core = require("apisix.core")
local _M = { version = 0.1, priority = 4000, name = "stamp", schema = { type = "object" } }
function _M.check_schema(conf) return core.schema.check(_M.schema, conf) end
function _M.header_filter(conf, ctx)
    core.response.set_header("X-Stamp", "on")
end
return _M
"#;

/// Answers with the order in which plugins ran (ctx.order).
const ORDER_A: &str = r#"
local _M = { version = 0.1, priority = 30, name = "order-a", schema = { type = "object" } }
function _M.access(conf, ctx)
    ctx.order = (ctx.order or "") .. "a"
    if #ctx.order == 2 then
        return 200, { order = ctx.order }
    end
end
return _M
"#;
const ORDER_B: &str = r#"
local _M = { version = 0.1, priority = 20, name = "order-b", schema = { type = "object" } }
function _M.access(conf, ctx)
    ctx.order = (ctx.order or "") .. "b"
    if #ctx.order == 2 then
        return 200, { order = ctx.order }
    end
end
return _M
"#;

#[test]
fn meta_and_local_responses_behave_as_in_apisix() {
    let up = Upstream::echo();
    let u = upstream_yaml(&up);
    let routes = format!(
        "  - id: guarded\n    uri: /guarded\n    plugins:\n      guard: {{}}\n      stamp: {{}}\n{u}\
         \x20 - id: disabled\n    uri: /disabled\n    plugins:\n      guard:\n        _meta:\n          disable: true\n{u}\
         \x20 - id: errresp\n    uri: /errresp\n    plugins:\n      guard:\n        _meta:\n          error_response:\n            msg: denied\n{u}\
         \x20 - id: errtext\n    uri: /errtext\n    plugins:\n      guard:\n        _meta:\n          error_response: \"no entry\"\n{u}\
         \x20 - id: order\n    uri: /order\n    plugins:\n      order-a: {{}}\n      order-b: {{}}\n{u}\
         \x20 - id: reorder\n    uri: /reorder\n    plugins:\n      order-a: {{}}\n      order-b:\n        _meta:\n          priority: 40\n{u}"
    );
    let (_tmp, gw) = gateway_with(
        &[
            ("guard", GUARD),
            ("stamp", STAMP),
            ("order-a", ORDER_A),
            ("order-b", ORDER_B),
        ],
        &routes,
    );
    // header_filter of another plugin runs on the guard's local 401.
    let r = get(&gw.url("/guarded"));
    assert_eq!(r.status, 401);
    assert_eq!(r.text(), "{\"message\":\"Missing token\"}\n");
    assert_eq!(r.header("x-stamp").as_deref(), Some("on"));
    let ok = Req::get(&gw.url("/guarded")).header("x-token", "t").send();
    assert_eq!(ok.status, 200);
    assert_eq!(ok.header("x-stamp").as_deref(), Some("on"));
    // `_meta.disable` accepts a conf with `_meta` despite additionalProperties=false, and
    // skips the plugin.
    assert_eq!(get(&gw.url("/disabled")).status, 200);
    // `_meta.error_response` replaces the body of the >= 400 answer.
    let r = get(&gw.url("/errresp"));
    assert_eq!(r.status, 401);
    assert_eq!(r.text(), "{\"msg\":\"denied\"}\n");
    let r = get(&gw.url("/errtext"));
    assert_eq!(r.status, 401);
    assert_eq!(r.text(), "no entry");
    // `_meta.priority` changes the order.
    assert_eq!(get(&gw.url("/order")).json()["order"], "ab");
    assert_eq!(get(&gw.url("/reorder")).json()["order"], "ba");
}

#[test]
fn a_bad_meta_is_refused_with_apisix_wording() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("plugins");
    std::fs::create_dir_all(&dir).expect("plugins dir");
    std::fs::write(dir.join("guard.lua"), GUARD).expect("write plugin");
    let yaml = "workers: 1\nplugin_dirs:\n  - plugins\nroutes:\n  - id: r\n    uri: /r\n    plugins:\n      guard:\n        _meta:\n          disable: \"yes\"\n";
    let cfg = tmp.path().join("config.yaml");
    std::fs::write(&cfg, yaml).expect("write config");
    let (code, out) = check_file(&cfg);
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("property \"_meta\" validation failed: property \"disable\" validation failed: wrong type: expected boolean, got string"),
        "{out}"
    );
}

// ---------------------------------------------------------------------------------------------
// Consumers: the project's own auth plugin, built on apisix.consumer as key-auth is
// ---------------------------------------------------------------------------------------------

/// An auth plugin: `X-Token` must be the `token` of a consumer that configures `token-auth`.
const TOKEN_AUTH: &str = r#"
local core = require("apisix.core")
local consumer_mod = require("apisix.consumer")

local schema = { type = "object", properties = { header = { type = "string", default = "X-Token" } } }
local consumer_schema = {
    type = "object",
    properties = { token = { type = "string", minLength = 3 } },
    required = { "token" },
}

local _M = { version = 0.1, priority = 2600, type = "auth", name = "token-auth", schema = schema }

function _M.check_schema(conf, schema_type)
    if schema_type == core.schema.TYPE_CONSUMER then
        return core.schema.check(consumer_schema, conf)
    end
    return core.schema.check(schema, conf)
end

function _M.rewrite(conf, ctx)
    local token = core.request.header(ctx, conf.header)
    if not token then
        return 401, { message = "Missing token" }
    end
    local consumer, consumer_conf, err = consumer_mod.find_consumer("token-auth", "token", token)
    if not consumer then
        return 401, { message = "Invalid token", reason = err }
    end
    consumer_mod.attach_consumer(ctx, consumer, consumer_conf)
end

return _M
"#;

/// After auth: refuses consumers not labelled `team: core`, and reports what auth attached.
const TEAM_ONLY: &str = r#"
local core = require("apisix.core")
local _M = { version = 0.1, priority = 2400, name = "team-only", schema = { type = "object" } }

function _M.access(conf, ctx)
    local labels = ctx.consumer and ctx.consumer.labels or {}
    if labels.team ~= "core" then
        return 403, { message = "not in team core", consumer = ctx.consumer_name }
    end
    core.response.set_header("X-Seen-Consumer", ctx.consumer_name)
    core.response.set_header("X-Seen-Group", ctx.consumer_group_id)
    core.response.set_header("X-Seen-Ver", tostring(ctx.consumer_ver ~= nil))
end

return _M
"#;

const CONSUMERS_YAML: &str = "consumer_groups:\n  - id: g1\n    plugins: {}\nconsumers:\n  - username: jack\n    desc: core team\n    group_id: g1\n    labels:\n      team: core\n      custom_id: \"42\"\n    plugins:\n      token-auth:\n        token: jack-token\n  - username: rose\n    plugins:\n      token-auth:\n        token: rose-token\n";

#[test]
fn consumers_from_the_config_file_authenticate_requests() {
    let up = Upstream::echo();
    let u = upstream_yaml(&up);
    let routes = format!(
        "  - id: auth\n    uri: /auth\n    plugins:\n      token-auth: {{}}\n{u}\
         \x20 - id: team\n    uri: /team\n    plugins:\n      token-auth: {{}}\n      team-only: {{}}\n{u}"
    );
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("plugins");
    std::fs::create_dir_all(&dir).expect("plugins dir");
    std::fs::write(dir.join("token-auth.lua"), TOKEN_AUTH).expect("write plugin");
    std::fs::write(dir.join("team-only.lua"), TEAM_ONLY).expect("write plugin");
    let yaml = format!("workers: 1\nplugin_dirs:\n  - plugins\nroutes:\n{routes}{CONSUMERS_YAML}");
    let gw = Gateway::start_in(tmp.path(), &yaml);

    // The consumer's headers reach the upstream; a client's own X-Consumer-* are replaced.
    let r = Req::get(&gw.url("/auth"))
        .header("X-Token", "jack-token")
        .header("X-Consumer-Username", "forged")
        .send();
    assert_eq!(r.status, 200, "{}\n{}", r.text(), gw.logs());
    let seen = r.json();
    assert_eq!(seen["headers"]["x-consumer-username"], "jack");
    assert_eq!(seen["headers"]["x-consumer-custom-id"], "42");
    let r = Req::get(&gw.url("/auth"))
        .header("X-Token", "rose-token")
        .send();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["headers"]["x-consumer-username"], "rose");
    assert!(r.json()["headers"].get("x-consumer-custom-id").is_none());

    let r = Req::get(&gw.url("/auth"))
        .header("X-Token", "nobody")
        .send();
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["message"], "Invalid token");

    // Later plugins see ctx.consumer, consumer_name, consumer_group_id and consumer_ver.
    let r = Req::get(&gw.url("/team"))
        .header("X-Token", "jack-token")
        .send();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-seen-consumer").as_deref(), Some("jack"));
    assert_eq!(r.header("x-seen-group").as_deref(), Some("g1"));
    assert_eq!(r.header("x-seen-ver").as_deref(), Some("true"));
    let r = Req::get(&gw.url("/team"))
        .header("X-Token", "rose-token")
        .send();
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["consumer"], "rose");
}

#[test]
fn a_consumer_conf_is_checked_with_the_plugins_consumer_schema() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("plugins");
    std::fs::create_dir_all(&dir).expect("plugins dir");
    std::fs::write(dir.join("token-auth.lua"), TOKEN_AUTH).expect("write plugin");
    let yaml = "workers: 1\nplugin_dirs:\n  - plugins\nconsumers:\n  - username: jack\n    plugins:\n      token-auth:\n        header: X-Other\n  - username: jack\n";
    let cfg = tmp.path().join("config.yaml");
    std::fs::write(&cfg, yaml).expect("write config");
    let (code, out) = check_file(&cfg);
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("consumers[0].plugins.token-auth: failed to check the configuration of plugin token-auth err: property \"token\" is required"),
        "{out}"
    );
    assert!(
        out.contains("consumers[1].username: duplicate username \"jack\""),
        "{out}"
    );
}

#[test]
fn consumers_written_through_the_admin_api_take_effect() {
    const KEY: &str = "compat-admin-key-0123456789";
    let up = Upstream::echo();
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("plugins");
    std::fs::create_dir_all(&dir).expect("plugins dir");
    std::fs::write(dir.join("token-auth.lua"), TOKEN_AUTH).expect("write plugin");
    let yaml = format!(
        "workers: 1\nplugin_dirs:\n  - plugins\ndata_dir: data\nadmin:\n  listen: 127.0.0.1:0\n  key: {KEY}\nroutes:\n  - id: auth\n    uri: /auth\n    plugins:\n      token-auth: {{}}\n{}",
        upstream_yaml(&up)
    );
    let gw = Gateway::start_in(tmp.path(), &yaml);
    let admin = gw.admin_addr().to_string();
    let call = |method: &str, path: &str, body: Option<&str>| {
        admin_request(&admin, KEY, method, path, body)
    };
    let send = || {
        Req::get(&gw.url("/auth"))
            .header("X-Token", "tom-token")
            .send()
    };
    assert_eq!(send().status, 401);

    let r = call(
        "PUT",
        "/consumers/tom",
        Some(r#"{"plugins":{"token-auth":{"token":"tom-token"}}}"#),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["key"], "/apisix/consumers/tom");
    assert_eq!(r.json()["value"]["username"], "tom");
    let r = send();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["headers"]["x-consumer-username"], "tom");

    // A bad credential conf is refused with the plugin's consumer-schema message.
    let r = call(
        "PUT",
        "/consumers/bad",
        Some(r#"{"plugins":{"token-auth":{}}}"#),
    );
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json()["error_msg"],
        "failed to check the configuration of plugin token-auth err: property \"token\" is required"
    );
    let r = call("GET", "/consumers/tom", None);
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json()["value"]["plugins"]["token-auth"]["token"],
        "tom-token"
    );
    assert_eq!(call("GET", "/consumers", None).json()["total"], 1);

    // APISIX's other spelling: the name in the body only. POST has no name to give.
    let r = call(
        "PUT",
        "/consumers",
        Some(r#"{"username":"ann","plugins":{"token-auth":{"token":"ann-token"}}}"#),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["key"], "/apisix/consumers/ann");
    let r = call("POST", "/consumers", Some(r#"{"plugins":{}}"#));
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error_msg"], "missing consumer name");
    assert_eq!(call("GET", "/consumers", None).json()["total"], 2);
    assert_eq!(call("DELETE", "/consumers/ann", None).status, 200);

    assert_eq!(call("DELETE", "/consumers/tom", None).status, 200);
    assert_eq!(send().status, 401);
    assert_eq!(call("GET", "/consumers/tom", None).status, 404);
}

// ---------------------------------------------------------------------------------------------
// Consumer plugins, consumer groups and credentials (APISIX's merge_consumer_route)
// ---------------------------------------------------------------------------------------------

/// Not an auth plugin: stamps `tag` on the upstream request in rewrite (`X-Stamp-Rewrite`) and
/// access (`X-Stamp`), and reports the conf_* fields on the response.
const TAG_STAMP: &str = r#"
local core = require("apisix.core")
local schema = {
    type = "object",
    properties = { tag = { type = "string" } },
    required = { "tag" },
}
local _M = { version = 0.1, priority = 1000, name = "stamp", schema = schema }

function _M.check_schema(conf)
    return core.schema.check(schema, conf)
end

function _M.rewrite(conf, ctx)
    core.request.set_header(ctx, "X-Stamp-Rewrite", conf.tag)
end

function _M.access(conf, ctx)
    core.request.set_header(ctx, "X-Stamp", conf.tag)
end

function _M.header_filter(conf, ctx)
    core.response.set_header("X-Stamp-Resp", conf.tag)
    core.response.set_header("X-Conf-Type", ctx.conf_type)
    core.response.set_header("X-Conf-Id", ctx.conf_id)
    core.response.set_header("X-Conf-Version", ctx.conf_version)
end

return _M
"#;

/// Starts a gateway with token-auth and stamp, the given routes and resources, and an Admin
/// API; returns the admin address too.
fn consumer_gateway(
    extra_plugins: &[(&str, &str)],
    routes: &str,
    resources: &str,
) -> (tempfile::TempDir, Gateway, String) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("plugins");
    std::fs::create_dir_all(&dir).expect("plugins dir");
    std::fs::write(dir.join("token-auth.lua"), TOKEN_AUTH).expect("write plugin");
    std::fs::write(dir.join("stamp.lua"), TAG_STAMP).expect("write plugin");
    for (name, src) in extra_plugins {
        std::fs::write(dir.join(format!("{name}.lua")), src).expect("write plugin");
    }
    let yaml = format!(
        "workers: 1\nplugin_dirs:\n  - plugins\ndata_dir: data\nadmin:\n  listen: 127.0.0.1:0\n  key: {ADMIN_KEY}\nroutes:\n{routes}{resources}"
    );
    let gw = Gateway::start_in(tmp.path(), &yaml);
    let admin = gw.admin_addr().to_string();
    (tmp, gw, admin)
}

const ADMIN_KEY: &str = "compat-admin-key-0123456789";

fn admin_call(admin: &str, method: &str, path: &str, body: Option<&str>) -> Resp {
    admin_request(admin, ADMIN_KEY, method, path, body)
}

#[test]
fn consumer_and_group_plugins_merge_into_the_route_after_auth() {
    let up = Upstream::echo();
    let u = upstream_yaml(&up);
    let routes = format!(
        "  - id: merge\n    uri: /merge\n    plugins:\n      token-auth: {{}}\n{u}\
         \x20 - id: override\n    uri: /override\n    plugins:\n      token-auth: {{}}\n      stamp:\n        tag: route\n{u}\
         \x20 - id: open\n    uri: /open\n    plugins:\n      stamp:\n        tag: open\n{u}"
    );
    let resources = "consumer_groups:\n  - id: g1\n    plugins:\n      stamp:\n        tag: group\n      response-headers:\n        set:\n          X-Group: g1\n\
consumers:\n\
\x20 - username: jack\n    group_id: g1\n    plugins:\n      token-auth:\n        token: jack-token\n      stamp:\n        tag: jack\n      response-headers:\n        set:\n          X-Who: jack\n\
\x20 - username: ann\n    group_id: g1\n    plugins:\n      token-auth:\n        token: ann-token\n\
\x20 - username: rose\n    plugins:\n      token-auth:\n        token: rose-token\n";
    let (_tmp, gw, _admin) = consumer_gateway(&[], &routes, resources);
    let get = |path: &str, token: Option<&str>| {
        let mut r = Req::get(&gw.url(path));
        if let Some(t) = token {
            r = r.header("X-Token", t);
        }
        r.send()
    };

    // A consumer's own plugins join after auth: the Lua one runs its rewrite (it came only
    // from the consumer) and access, the native response-headers runs; the consumer's
    // response-headers conf replaces the group's.
    let r = get("/merge", Some("jack-token"));
    assert_eq!(r.status, 200, "{}\n{}", r.text(), gw.logs());
    let seen = r.json();
    assert_eq!(seen["headers"]["x-stamp-rewrite"], "jack");
    assert_eq!(seen["headers"]["x-stamp"], "jack");
    assert_eq!(r.header("x-stamp-resp").as_deref(), Some("jack"));
    assert_eq!(r.header("x-who").as_deref(), Some("jack"));
    assert_eq!(r.header("x-group"), None);
    assert_eq!(
        r.header("x-conf-type").as_deref(),
        Some("route&consumer&consumer_group")
    );
    assert_eq!(r.header("x-conf-id").as_deref(), Some("merge&jack&g1"));
    let version = r.header("x-conf-version").unwrap_or_default();
    let parts: Vec<&str> = version.split('&').collect();
    assert_eq!(parts.len(), 3, "{version}");

    // A group member without its own conf gets the group's plugins.
    let r = get("/merge", Some("ann-token"));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["headers"]["x-stamp"], "group");
    assert_eq!(r.header("x-group").as_deref(), Some("g1"));
    assert_eq!(r.header("x-who"), None);

    // The consumer's conf replaces the route's for access and later phases; the route's
    // rewrite ran before auth and is not run again.
    let r = get("/override", Some("jack-token"));
    assert_eq!(r.status, 200);
    let seen = r.json();
    assert_eq!(seen["headers"]["x-stamp-rewrite"], "route");
    assert_eq!(seen["headers"]["x-stamp"], "jack");
    assert_eq!(r.header("x-stamp-resp").as_deref(), Some("jack"));
    assert_eq!(r.header("x-who").as_deref(), Some("jack"));

    // Without consumer plugins the route's own run; conf_type still names the consumer.
    let r = get("/override", Some("rose-token"));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["headers"]["x-stamp"], "route");
    assert_eq!(r.header("x-conf-type").as_deref(), Some("route&consumer"));
    assert_eq!(r.header("x-conf-id").as_deref(), Some("override&rose"));
    assert_eq!(r.header("x-who"), None);

    // No auth plugin, no consumer: nothing merged.
    let r = get("/open", Some("jack-token"));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["headers"]["x-stamp"], "open");
    assert_eq!(r.header("x-conf-type").as_deref(), Some("route"));
    assert_eq!(r.header("x-who"), None);
    assert_eq!(get("/merge", None).status, 401);
}

#[test]
fn consumer_groups_and_credentials_through_the_admin_api() {
    let up = Upstream::echo();
    let u = upstream_yaml(&up);
    let routes = format!("  - id: auth\n    uri: /auth\n    plugins:\n      token-auth: {{}}\n{u}");
    let (_tmp, gw, admin) = consumer_gateway(&[], &routes, "");
    let call = |m: &str, p: &str, b: Option<&str>| admin_call(&admin, m, p, b);
    let send = |token: &str| Req::get(&gw.url("/auth")).header("X-Token", token).send();

    // A consumer naming an unknown group is refused with the field's path.
    let r = call(
        "PUT",
        "/consumers/tom",
        Some(r#"{"group_id":"gold","plugins":{"token-auth":{"token":"tom-token"}}}"#),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(
        r.json()["error_msg"],
        "invalid configuration: group_id: consumer group \"gold\" not found"
    );
    let r = call(
        "PUT",
        "/consumer_groups/gold",
        Some(r#"{"plugins":{"stamp":{"tag":"gold"}}}"#),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["key"], "/apisix/consumer_groups/gold");
    let r = call(
        "PUT",
        "/consumer_groups/bad",
        Some(r#"{"plugins":{"stamp":{}}}"#),
    );
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json()["error_msg"],
        "failed to check the configuration of plugin stamp err: property \"tag\" is required"
    );
    assert_eq!(
        call("POST", "/consumer_groups", Some(r#"{"plugins":{}}"#)).status,
        405
    );
    let r = call(
        "PUT",
        "/consumers/tom",
        Some(r#"{"group_id":"gold","plugins":{"token-auth":{"token":"tom-token"}}}"#),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let r = send("tom-token");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["headers"]["x-stamp"], "gold");

    // A group in use cannot go.
    let r = call("DELETE", "/consumer_groups/gold", None);
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json()["error_msg"],
        "can not delete this consumer group, consumer [tom] is still using it now"
    );

    // Credentials: auth plugin confs only, for a consumer that exists.
    let r = call(
        "PUT",
        "/consumers/tom/credentials/second",
        Some(r#"{"plugins":{"token-auth":{"token":"tom-second"}}}"#),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["key"], "/apisix/consumers/tom/credentials/second");
    assert_eq!(r.json()["value"]["id"], "second");
    let r = send("tom-second");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["headers"]["x-consumer-username"], "tom");
    assert_eq!(r.json()["headers"]["x-credential-identifier"], "second");
    assert_eq!(r.json()["headers"]["x-stamp"], "gold");
    // The consumer's own credential still works.
    assert_eq!(send("tom-token").status, 200);

    let r = call(
        "PUT",
        "/consumers/tom/credentials/x",
        Some(r#"{"plugins":{"stamp":{"tag":"a"}}}"#),
    );
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json()["error_msg"],
        "only supports auth type plugins in consumer credential"
    );
    let r = call(
        "PUT",
        "/consumers/tom/credentials/x",
        Some(r#"{"plugins":{"token-auth":{"token":"a1a"},"stamp":{"tag":"a"}}}"#),
    );
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json()["error_msg"],
        "invalid configuration: property \"plugins\" validation failed: expect object to have at most 1 properties"
    );
    let r = call(
        "PUT",
        "/consumers/tom/credentials/x",
        Some(r#"{"plugins":{"token-auth":{}}}"#),
    );
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json()["error_msg"],
        "failed to check the configuration of plugin token-auth err: property \"token\" is required"
    );
    let r = call(
        "PUT",
        "/consumers/nobody/credentials/x",
        Some(r#"{"plugins":{"token-auth":{"token":"abc"}}}"#),
    );
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error_msg"], "consumer not found");
    assert_eq!(
        call("PUT", "/consumers/tom/credentials", Some("{}")).json()["error_msg"],
        "missing credential id"
    );
    assert_eq!(
        call("POST", "/consumers/tom/credentials", Some("{}")).status,
        405
    );

    let r = call("GET", "/consumers/tom/credentials", None);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["total"], 1);
    assert_eq!(
        r.json()["list"][0]["key"],
        "/apisix/consumers/tom/credentials/second"
    );
    let r = call("GET", "/consumers/tom/credentials/second", None);
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json()["value"]["plugins"]["token-auth"]["token"],
        "tom-second"
    );
    // Consumers are listed without their credentials.
    assert_eq!(call("GET", "/consumers", None).json()["total"], 1);

    assert_eq!(
        call("DELETE", "/consumers/tom/credentials/second", None).status,
        200
    );
    assert_eq!(send("tom-second").status, 401);
    assert_eq!(send("tom-token").status, 200);

    // Deleting a consumer takes its credentials with it; then the group can go.
    let r = call(
        "PUT",
        "/consumers/tom/credentials/third",
        Some(r#"{"plugins":{"token-auth":{"token":"tom-third"}}}"#),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(call("DELETE", "/consumers/tom", None).status, 200);
    assert_eq!(send("tom-third").status, 401);
    assert_eq!(
        call("GET", "/consumers/tom/credentials/third", None).status,
        404
    );
    assert_eq!(call("DELETE", "/consumer_groups/gold", None).status, 200);
}

#[test]
fn credentials_and_groups_in_the_config_file() {
    let up = Upstream::echo();
    let u = upstream_yaml(&up);
    let routes = format!("  - id: auth\n    uri: /auth\n    plugins:\n      token-auth: {{}}\n{u}");
    let resources = "consumer_groups:\n  - id: g1\n    plugins:\n      stamp:\n        tag: g1\n\
consumers:\n\
\x20 - username: jack\n    group_id: g1\n\
\x20 - id: jack/credentials/one\n    plugins:\n      token-auth:\n        token: jack-one\n\
\x20 - id: jack/credentials/two\n    plugins:\n      token-auth:\n        token: jack-two\n";
    let (_tmp, gw, admin) = consumer_gateway(&[], &routes, resources);
    for (token, cred) in [("jack-one", "one"), ("jack-two", "two")] {
        let r = Req::get(&gw.url("/auth")).header("X-Token", token).send();
        assert_eq!(r.status, 200, "{}\n{}", r.text(), gw.logs());
        assert_eq!(r.json()["headers"]["x-consumer-username"], "jack");
        assert_eq!(r.json()["headers"]["x-credential-identifier"], cred);
        assert_eq!(r.json()["headers"]["x-stamp"], "g1");
    }
    let r = admin_call(&admin, "GET", "/consumers/jack/credentials", None);
    assert_eq!(r.json()["total"], 2, "{}", r.text());

    // Bad files: an unknown group, a credential of an unknown consumer, a non-auth plugin.
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("plugins");
    std::fs::create_dir_all(&dir).expect("plugins dir");
    std::fs::write(dir.join("token-auth.lua"), TOKEN_AUTH).expect("write plugin");
    std::fs::write(dir.join("stamp.lua"), TAG_STAMP).expect("write plugin");
    let yaml = "workers: 1\nplugin_dirs:\n  - plugins\nconsumers:\n  - username: jack\n    group_id: nope\n  - id: rose/credentials/a\n    plugins:\n      token-auth:\n        token: abc\n  - username: ann\n  - id: ann/credentials/b\n    plugins:\n      stamp:\n        tag: x\n";
    let cfg = tmp.path().join("config.yaml");
    std::fs::write(&cfg, yaml).expect("write config");
    let (code, out) = check_file(&cfg);
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("consumers[0].group_id: consumer group \"nope\" not found"),
        "{out}"
    );
    assert!(
        out.contains("credential \"rose/credentials/a\": consumer \"rose\" not found"),
        "{out}"
    );
    assert!(
        out.contains(".plugins.stamp: only supports auth type plugins in consumer credential"),
        "{out}"
    );
}

// ---------------------------------------------------------------------------------------------
// APISIX's own plugin files (APISIX_SRC)
// ---------------------------------------------------------------------------------------------

/// The target plugins and the files each one needs.
const TARGETS: &[(&str, &[&str])] = &[
    ("echo", &["echo.lua"]),
    ("mocking", &["mocking.lua"]),
    (
        "ip-restriction",
        &["ip-restriction.lua", "ip-restriction/init.lua"],
    ),
    ("cors", &["cors.lua"]),
    ("fault-injection", &["fault-injection.lua"]),
    ("redirect", &["redirect.lua"]),
    ("proxy-rewrite", &["proxy-rewrite.lua"]),
    ("key-auth", &["key-auth.lua"]),
    ("consumer-restriction", &["consumer-restriction.lua"]),
    (
        "limit-count",
        &[
            "limit-count.lua",
            "limit-count/init.lua",
            "limit-count/limit-count-local.lua",
            "limit-count/limit-count-redis.lua",
            "limit-count/limit-count-redis-cluster.lua",
            "limit-count/limit-count-redis-sentinel.lua",
            "limit-count/util.lua",
            "limit-count/delayed-syncer.lua",
            "limit-count/sliding-window/sliding-window.lua",
            "limit-count/sliding-window/store/shared-dict.lua",
            "limit-count/sliding-window/store/redis.lua",
            "workflow.lua",
            "apisix/utils/redis-schema.lua",
            "apisix/utils/redis.lua",
            "apisix/utils/rediscluster.lua",
        ],
    ),
    (
        "limit-req",
        &[
            "limit-req.lua",
            "limit-req/util.lua",
            "limit-req/limit-req-redis.lua",
            "limit-req/limit-req-redis-cluster.lua",
        ],
    ),
    (
        "limit-conn",
        &[
            "limit-conn.lua",
            "limit-conn/init.lua",
            "limit-conn/util.lua",
            "limit-conn/limit-conn-redis.lua",
            "limit-conn/limit-conn-redis-cluster.lua",
        ],
    ),
    ("ua-restriction", &["ua-restriction.lua"]),
    ("referer-restriction", &["referer-restriction.lua"]),
    ("request-validation", &["request-validation.lua"]),
    ("jwt-auth", &["jwt-auth.lua", "jwt-auth/parser.lua"]),
];

/// One behaviour check: the route's plugin conf (YAML, indented for `plugins:`), whether it
/// proxies to the echo upstream, the request, and what the client must see.
struct Check {
    plugin: &'static str,
    what: &'static str,
    plugins_yaml: &'static str,
    upstream: bool,
    method: &'static str,
    path: &'static str,
    headers: &'static [(&'static str, &'static str)],
    status: u16,
    /// Exact body, when Some.
    body: Option<&'static str>,
    /// Substrings the body must contain.
    body_has: &'static [&'static str],
    /// Substrings the body must not contain.
    body_lacks: &'static [&'static str],
    /// Response headers that must have these values.
    resp_headers: &'static [(&'static str, &'static str)],
}

const fn check(plugin: &'static str, what: &'static str, plugins_yaml: &'static str) -> Check {
    Check {
        plugin,
        what,
        plugins_yaml,
        upstream: true,
        method: "GET",
        path: "/",
        headers: &[],
        status: 200,
        body: None,
        body_has: &[],
        body_lacks: &[],
        resp_headers: &[],
    }
}

/// Behaviour from APISIX's docs and `t/plugin/NAME.t`, in this project's words. The echo
/// upstream answers with JSON describing what it received (`uri`, `method`, `headers`).
fn checks() -> Vec<Check> {
    vec![
        Check {
            path: "/echo",
            body: Some("before the body|replaced body|after the body"),
            resp_headers: &[("x-echo", "yes")],
            ..check(
                "echo",
                "body, before_body, after_body and headers replace the upstream's response",
                "echo:\n        before_body: \"before the body|\"\n        body: \"replaced body\"\n        after_body: \"|after the body\"\n        headers:\n          X-Echo: \"yes\"",
            )
        },
        Check {
            path: "/mock",
            upstream: false,
            status: 201,
            body: Some("{\"a\":1}"),
            resp_headers: &[("content-type", "application/json;charset=utf8")],
            ..check(
                "mocking",
                "response_example is sent with the configured status and content type",
                "mocking:\n        response_status: 201\n        content_type: \"application/json;charset=utf8\"\n        response_example: '{\"a\":1}'",
            )
        },
        Check {
            path: "/mock-headers",
            upstream: false,
            body: Some("hello"),
            resp_headers: &[("x-route", "mock-headers")],
            ..check(
                "mocking",
                "response_headers are added and may use $variables",
                "mocking:\n        content_type: \"text/plain\"\n        response_example: \"hello\"\n        response_headers:\n          X-Route: \"$route_id\"",
            )
        },
        Check {
            path: "/mock-schema",
            upstream: false,
            body_has: &["\"field\":"],
            ..check(
                "mocking",
                "response_schema generates a JSON example",
                "mocking:\n        response_schema:\n          type: object\n          properties:\n            field:\n              type: string\n          required: [field]",
            )
        },
        Check {
            path: "/ip-deny",
            status: 403,
            body: Some("{\"message\":\"Your IP address is not allowed\"}\n"),
            ..check(
                "ip-restriction",
                "a client outside the whitelist gets 403 with APISIX's message",
                "ip-restriction:\n        whitelist: [\"10.0.0.0/8\", \"fe80::/64\"]",
            )
        },
        Check {
            path: "/ip-allow",
            body_has: &["\"uri\":\"/ip-allow\""],
            ..check(
                "ip-restriction",
                "a client inside a whitelisted CIDR is proxied",
                "ip-restriction:\n        whitelist: [\"127.0.0.0/24\", \"::1\"]",
            )
        },
        Check {
            path: "/ip-black",
            status: 403,
            body: Some("{\"message\":\"go away\"}\n"),
            ..check(
                "ip-restriction",
                "a blacklisted client gets the configured message",
                "ip-restriction:\n        blacklist: [\"127.0.0.1\"]\n        message: \"go away\"",
            )
        },
        Check {
            path: "/ip-meta",
            status: 403,
            body: Some("{\"error\":\"blocked\"}\n"),
            ..check(
                "ip-restriction",
                "_meta.error_response replaces the 403 body",
                "ip-restriction:\n        blacklist: [\"127.0.0.1\"]\n        _meta:\n          error_response:\n            error: blocked",
            )
        },
        Check {
            path: "/cors",
            headers: &[("Origin", "http://sub.example.com")],
            resp_headers: &[
                ("access-control-allow-origin", "*"),
                ("access-control-allow-methods", "*"),
                ("access-control-max-age", "5"),
            ],
            ..check("cors", "defaults allow any origin", "cors: {}")
        },
        Check {
            path: "/cors",
            method: "OPTIONS",
            headers: &[("Origin", "http://sub.example.com")],
            body: Some(""),
            resp_headers: &[("access-control-allow-origin", "*")],
            ..check(
                "cors",
                "a preflight OPTIONS is answered by the gateway",
                "cors: {}",
            )
        },
        Check {
            path: "/cors-list",
            headers: &[("Origin", "http://b.com")],
            resp_headers: &[
                ("access-control-allow-origin", "http://b.com"),
                ("vary", "Origin"),
                ("access-control-allow-methods", "GET,POST"),
            ],
            ..check(
                "cors",
                "an origin from the allow_origins list is echoed",
                "cors:\n        allow_origins: \"http://a.com,http://b.com\"\n        allow_methods: \"GET,POST\"",
            )
        },
        Check {
            path: "/cors-regex",
            headers: &[("Origin", "https://x.test.com")],
            resp_headers: &[("access-control-allow-origin", "https://x.test.com")],
            ..check(
                "cors",
                "allow_origins_by_regex matches with PCRE",
                "cors:\n        allow_origins: \"http://none.com\"\n        allow_origins_by_regex: [\"^https://.*\\\\.test\\\\.com$\"]",
            )
        },
        Check {
            path: "/cors-401",
            headers: &[("Origin", "http://sub.example.com")],
            status: 403,
            resp_headers: &[("access-control-allow-origin", "*")],
            ..check(
                "cors",
                "cors headers are added to another plugin's refusal",
                "cors: {}\n      ip-restriction:\n        blacklist: [\"127.0.0.1\"]",
            )
        },
        Check {
            path: "/fault",
            status: 403,
            body: Some("Fault Injection!\n"),
            ..check(
                "fault-injection",
                "abort answers with the configured status and body",
                "fault-injection:\n        abort:\n          http_status: 403\n          body: \"Fault Injection!\\n\"",
            )
        },
        Check {
            path: "/fault-vars?name=jack",
            status: 403,
            body: Some("name is jack"),
            ..check(
                "fault-injection",
                "abort with vars applies when the expression matches",
                "fault-injection:\n        abort:\n          http_status: 403\n          body: \"name is $arg_name\"\n          vars:\n            - - [\"arg_name\", \"==\", \"jack\"]",
            )
        },
        Check {
            path: "/fault-vars?name=rose",
            body_has: &["\"uri\":\"/fault-vars?name=rose\""],
            ..check(
                "fault-injection",
                "abort with vars does not apply when the expression fails",
                "fault-injection:\n        abort:\n          http_status: 403\n          body: \"name is $arg_name\"\n          vars:\n            - - [\"arg_name\", \"==\", \"jack\"]",
            )
        },
        Check {
            path: "/fault-delay",
            body_has: &["\"uri\":\"/fault-delay\""],
            ..check(
                "fault-injection",
                "delay then proxies",
                "fault-injection:\n        delay:\n          duration: 0.01",
            )
        },
        Check {
            path: "/redir",
            status: 301,
            resp_headers: &[("location", "/test/default.html")],
            upstream: false,
            ..check(
                "redirect",
                "uri redirects with ret_code",
                "redirect:\n        uri: \"/test/default.html\"\n        ret_code: 301",
            )
        },
        Check {
            path: "/redir-vars?x=1",
            status: 302,
            resp_headers: &[("location", "/new/redir-vars?x=1")],
            upstream: false,
            ..check(
                "redirect",
                "uri may use $variables; 302 is the default",
                "redirect:\n        uri: \"/new$uri\"\n        append_query_string: true",
            )
        },
        Check {
            path: "/redir-re/abc",
            status: 301,
            resp_headers: &[("location", "/new/abc")],
            upstream: false,
            ..check(
                "redirect",
                "regex_uri rewrites with captures",
                "redirect:\n        regex_uri: [\"^/redir-re/(.*)\", \"/new/$1\"]\n        ret_code: 301",
            )
        },
        Check {
            path: "/redir-https",
            headers: &[("Host", "foo.com")],
            status: 301,
            resp_headers: &[("location", "https://foo.com/redir-https")],
            upstream: false,
            ..check(
                "redirect",
                "http_to_https sends http clients to https",
                "redirect:\n        http_to_https: true",
            )
        },
        Check {
            path: "/pr?a=1",
            body_has: &[
                "\"uri\":\"/new/path?a=1\"",
                "\"x-api\":\"v1\"",
                "\"host\":\"example.com\"",
            ],
            ..check(
                "proxy-rewrite",
                "uri, host and headers.set change the upstream request",
                "proxy-rewrite:\n        uri: \"/new/path\"\n        host: \"example.com\"\n        headers:\n          set:\n            X-Api: \"v1\"",
            )
        },
        Check {
            path: "/pr-re/users/7",
            body_has: &["\"uri\":\"/v2/users?id=7\""],
            ..check(
                "proxy-rewrite",
                "regex_uri rewrites with captures",
                "proxy-rewrite:\n        regex_uri: [\"^/pr-re/(\\\\w+)/(\\\\d+)\", \"/v2/$1?id=$2\"]",
            )
        },
        Check {
            path: "/pr-method",
            body_has: &["\"method\":\"POST\"", "\"x-from\":\"/pr-method\""],
            ..check(
                "proxy-rewrite",
                "method changes, and headers.add values may use $variables",
                "proxy-rewrite:\n        method: POST\n        headers:\n          add:\n            X-From: \"$uri\"",
            )
        },
        Check {
            path: "/pr-remove",
            headers: &[("X-Secret", "s")],
            body_has: &["\"uri\":\"/pr-remove\""],
            ..check(
                "proxy-rewrite",
                "headers.remove drops a client header",
                "proxy-rewrite:\n        headers:\n          remove: [\"X-Secret\"]",
            )
        },
        Check {
            path: "/ka",
            status: 401,
            body: Some("{\"message\":\"Missing API key in request\"}\n"),
            resp_headers: &[("www-authenticate", "apikey realm=\"key\"")],
            ..check(
                "key-auth",
                "a request without a key gets 401",
                "key-auth: {}",
            )
        },
        Check {
            path: "/ka-cors",
            headers: &[("apikey", "nope"), ("Origin", "http://a.com")],
            status: 401,
            body: Some("{\"message\":\"Invalid API key in request\"}\n"),
            resp_headers: &[("access-control-allow-origin", "*")],
            ..check(
                "key-auth",
                "an unknown key gets 401, and cors adds its headers to it",
                "key-auth: {}\n      cors: {}",
            )
        },
        Check {
            path: "/ka-ok",
            headers: &[("apikey", "jack-key")],
            body_has: &["\"x-consumer-username\":\"jack\"", "\"x-consumer-custom-id\":\"j-1\""],
            ..check(
                "key-auth",
                "a consumer's key is accepted and the upstream sees X-Consumer-Username",
                "key-auth: {}",
            )
        },
        Check {
            path: "/ka-ok?apikey=rose-key",
            body_has: &["\"x-consumer-username\":\"rose\""],
            ..check(
                "key-auth",
                "the key may come in the query string",
                "key-auth: {}",
            )
        },
        Check {
            path: "/ka-ok",
            headers: &[("apikey", "wrong-key")],
            status: 401,
            body: Some("{\"message\":\"Invalid API key in request\"}\n"),
            ..check(
                "key-auth",
                "a key no consumer has gets 401",
                "key-auth: {}",
            )
        },
        Check {
            path: "/ka-hide",
            headers: &[("apikey", "jack-key")],
            body_has: &["\"x-consumer-username\":\"jack\""],
            body_lacks: &["\"apikey\""],
            ..check(
                "key-auth",
                "hide_credentials removes the key before proxying",
                "key-auth:\n        hide_credentials: true",
            )
        },
        Check {
            path: "/ka-ok",
            headers: &[("apikey", "jack-second")],
            body_has: &["\"x-consumer-username\":\"jack\"", "\"x-credential-identifier\":\"second\""],
            ..check(
                "key-auth",
                "a credential's key identifies its consumer, and the upstream sees X-Credential-Identifier",
                "key-auth: {}",
            )
        },
        Check {
            path: "/ka-merge",
            headers: &[("apikey", "kate-key")],
            body_has: &["\"x-consumer-username\":\"kate\"", "\"x-kate\":\"consumer\""],
            resp_headers: &[("x-group", "gold")],
            ..check(
                "key-auth",
                "the consumer's and its group's plugins join the route after auth (proxy-rewrite runs its rewrite)",
                "key-auth: {}",
            )
        },
        Check {
            path: "/ka-merge-pr",
            headers: &[("apikey", "kate-key")],
            body_has: &["\"x-kate\":\"route\""],
            resp_headers: &[("x-group", "gold")],
            ..check(
                "key-auth",
                "a plugin on both the route and the consumer keeps the rewrite the route already ran",
                "key-auth: {}\n      proxy-rewrite:\n        headers:\n          set:\n            X-Kate: route",
            )
        },
        Check {
            path: "/cr-group",
            headers: &[("apikey", "kate-key")],
            body_has: &["\"x-consumer-username\":\"kate\""],
            ..check(
                "consumer-restriction",
                "a consumer of a whitelisted consumer group passes",
                "key-auth: {}\n      consumer-restriction:\n        type: consumer_group_id\n        whitelist: [\"gold\"]",
            )
        },
        Check {
            path: "/cr-group",
            headers: &[("apikey", "jack-key")],
            status: 401,
            body: Some("{\"message\":\"The request is rejected, please check the consumer_group_id for this request\"}\n"),
            ..check(
                "consumer-restriction",
                "a consumer in no group is refused by a group whitelist",
                "key-auth: {}\n      consumer-restriction:\n        type: consumer_group_id\n        whitelist: [\"gold\"]",
            )
        },
        Check {
            path: "/cr-wl",
            headers: &[("apikey", "jack-key")],
            body_has: &["\"x-consumer-username\":\"jack\""],
            ..check(
                "consumer-restriction",
                "a whitelisted consumer passes",
                "key-auth: {}\n      consumer-restriction:\n        whitelist: [\"jack\"]",
            )
        },
        Check {
            path: "/cr-wl",
            headers: &[("apikey", "rose-key")],
            status: 403,
            body: Some("{\"message\":\"The consumer_name is forbidden.\"}\n"),
            ..check(
                "consumer-restriction",
                "a consumer not on the whitelist gets 403",
                "key-auth: {}\n      consumer-restriction:\n        whitelist: [\"jack\"]",
            )
        },
        Check {
            path: "/cr-bl",
            headers: &[("apikey", "rose-key")],
            status: 401,
            body: Some("{\"message\":\"go away\"}\n"),
            ..check(
                "consumer-restriction",
                "a blacklisted consumer gets rejected_code and rejected_msg",
                "key-auth: {}\n      consumer-restriction:\n        blacklist: [\"rose\"]\n        rejected_code: 401\n        rejected_msg: \"go away\"",
            )
        },
        Check {
            path: "/cr",
            status: 401,
            body: Some("{\"message\":\"The request is rejected, please check the consumer_name for this request\"}\n"),
            ..check(
                "consumer-restriction",
                "without an authenticated consumer the request is refused",
                "consumer-restriction:\n        whitelist: [\"jack\"]",
            )
        },
        // limit-count (t/plugin/limit-count.t): the local policy counts per route and key.
        Check {
            path: "/lc",
            resp_headers: &[
                ("x-ratelimit-limit", "2"),
                ("x-ratelimit-remaining", "1"),
                ("x-ratelimit-reset", "60"),
            ],
            ..check("limit-count", "the first request of a window is counted", "limit-count:\n        count: 2\n        time_window: 60")
        },
        Check {
            path: "/lc",
            resp_headers: &[("x-ratelimit-limit", "2"), ("x-ratelimit-remaining", "0")],
            ..check("limit-count", "the second request uses the last one", "limit-count:\n        count: 2\n        time_window: 60")
        },
        Check {
            path: "/lc",
            status: 503,
            resp_headers: &[("x-ratelimit-limit", "2"), ("x-ratelimit-remaining", "0")],
            ..check("limit-count", "beyond count the request gets 503", "limit-count:\n        count: 2\n        time_window: 60")
        },
        Check {
            path: "/lc-msg",
            ..check("limit-count", "rejected_code: a request within count passes", "limit-count:\n        count: 1\n        time_window: 60\n        rejected_code: 429\n        rejected_msg: \"too many requests\"")
        },
        Check {
            path: "/lc-msg",
            status: 429,
            body: Some("{\"error_msg\":\"too many requests\"}\n"),
            ..check("limit-count", "rejected_code and rejected_msg answer the excess", "limit-count:\n        count: 1\n        time_window: 60\n        rejected_code: 429\n        rejected_msg: \"too many requests\"")
        },
        Check {
            path: "/lc-key",
            headers: &[("x-user", "a")],
            ..check("limit-count", "key from a header: user a's first request", "limit-count:\n        count: 1\n        time_window: 60\n        key: http_x_user\n        key_type: var")
        },
        Check {
            path: "/lc-key",
            headers: &[("x-user", "b")],
            ..check("limit-count", "key from a header: user b has a counter of its own", "limit-count:\n        count: 1\n        time_window: 60\n        key: http_x_user\n        key_type: var")
        },
        Check {
            path: "/lc-key",
            headers: &[("x-user", "a")],
            status: 503,
            ..check("limit-count", "key from a header: user a's second request is refused", "limit-count:\n        count: 1\n        time_window: 60\n        key: http_x_user\n        key_type: var")
        },
        Check {
            path: "/lc-redis",
            status: 500,
            body_has: &["failed to limit count"],
            ..check(
                "limit-count",
                "policy redis where Redis cannot be used fails the request with 500, not the worker",
                "limit-count:\n        count: 1\n        time_window: 60\n        policy: redis\n        redis_host: 127.0.0.1",
            )
        },
        Check {
            path: "/lc-redis-degrade",
            ..check(
                "limit-count",
                "policy redis with allow_degradation lets the request through",
                "limit-count:\n        count: 1\n        time_window: 60\n        policy: redis\n        redis_host: 127.0.0.1\n        allow_degradation: true",
            )
        },
        Check {
            path: "/lc-sliding",
            resp_headers: &[("x-ratelimit-limit", "2"), ("x-ratelimit-remaining", "1")],
            ..check("limit-count", "window_type sliding: the first request is counted", "limit-count:\n        count: 2\n        time_window: 60\n        window_type: sliding")
        },
        Check {
            path: "/lc-sliding",
            resp_headers: &[("x-ratelimit-remaining", "0")],
            ..check("limit-count", "window_type sliding: the second uses the last one", "limit-count:\n        count: 2\n        time_window: 60\n        window_type: sliding")
        },
        Check {
            path: "/lc-sliding",
            status: 503,
            ..check("limit-count", "window_type sliding: beyond count the request gets 503", "limit-count:\n        count: 2\n        time_window: 60\n        window_type: sliding")
        },
        // limit-req (t/plugin/limit-req.t)
        Check {
            path: "/lr",
            ..check("limit-req", "a first request within the rate passes", "limit-req:\n        rate: 1\n        burst: 0\n        key: remote_addr")
        },
        Check {
            path: "/lr",
            status: 503,
            ..check("limit-req", "an immediate second request beyond rate + burst gets 503", "limit-req:\n        rate: 1\n        burst: 0\n        key: remote_addr")
        },
        Check {
            path: "/lr-burst",
            ..check("limit-req", "burst: the first request passes", "limit-req:\n        rate: 0.1\n        burst: 1\n        nodelay: true\n        key: remote_addr\n        rejected_code: 429\n        rejected_msg: \"slow down\"")
        },
        Check {
            path: "/lr-burst",
            ..check("limit-req", "burst: one excess request passes at once with nodelay", "limit-req:\n        rate: 0.1\n        burst: 1\n        nodelay: true\n        key: remote_addr\n        rejected_code: 429\n        rejected_msg: \"slow down\"")
        },
        Check {
            path: "/lr-burst",
            status: 429,
            body: Some("{\"error_msg\":\"slow down\"}\n"),
            ..check("limit-req", "beyond the burst: rejected_code and rejected_msg", "limit-req:\n        rate: 0.1\n        burst: 1\n        nodelay: true\n        key: remote_addr\n        rejected_code: 429\n        rejected_msg: \"slow down\"")
        },
        Check {
            path: "/lr-delay",
            ..check("limit-req", "without nodelay: a first request passes", "limit-req:\n        rate: 4\n        burst: 1\n        key: remote_addr")
        },
        Check {
            path: "/lr-delay",
            ..check("limit-req", "without nodelay: an excess request within burst is delayed, then passes", "limit-req:\n        rate: 4\n        burst: 1\n        key: remote_addr")
        },
        // limit-conn (t/plugin/limit-conn.t): one at a time, so sequential requests all pass
        // (the concurrent case is `real_limit_conn_refuses_concurrent_requests`).
        Check {
            path: "/lconn",
            ..check("limit-conn", "a request within conn passes", "limit-conn:\n        conn: 1\n        burst: 0\n        default_conn_delay: 0.1\n        key: remote_addr")
        },
        Check {
            path: "/lconn",
            ..check("limit-conn", "the connection is released when the request ends", "limit-conn:\n        conn: 1\n        burst: 0\n        default_conn_delay: 0.1\n        key: remote_addr")
        },
        // ua-restriction (t/plugin/ua-restriction.t)
        Check {
            path: "/ua-allow",
            headers: &[("user-agent", "Baiduspider/3.0")],
            ..check("ua-restriction", "a User-Agent matching the allowlist passes", "ua-restriction:\n        allowlist: [\"my-bot1\", \"(Baiduspider)/(\\\\d+)\\\\.(\\\\d+)\"]")
        },
        Check {
            path: "/ua-allow",
            headers: &[("user-agent", "curl/8.0")],
            status: 403,
            body: Some("{\"message\":\"Not allowed\"}\n"),
            ..check("ua-restriction", "a User-Agent outside the allowlist gets 403", "ua-restriction:\n        allowlist: [\"my-bot1\", \"(Baiduspider)/(\\\\d+)\\\\.(\\\\d+)\"]")
        },
        Check {
            path: "/ua-deny",
            headers: &[("user-agent", "  Twitterspider/2.0  ")],
            status: 403,
            body: Some("{\"message\":\"go away bot\"}\n"),
            ..check("ua-restriction", "a denylisted User-Agent (stripped) gets the message", "ua-restriction:\n        denylist: [\"my-bot2\", \"(Twitterspider)/(\\\\d+)\\\\.(\\\\d+)\"]\n        message: \"go away bot\"")
        },
        Check {
            path: "/ua-deny",
            headers: &[("user-agent", "Mozilla/5.0")],
            ..check("ua-restriction", "a User-Agent not on the denylist passes", "ua-restriction:\n        denylist: [\"my-bot2\", \"(Twitterspider)/(\\\\d+)\\\\.(\\\\d+)\"]\n        message: \"go away bot\"")
        },
        Check {
            path: "/ua-deny",
            status: 403,
            ..check("ua-restriction", "no User-Agent is refused without bypass_missing", "ua-restriction:\n        denylist: [\"my-bot2\", \"(Twitterspider)/(\\\\d+)\\\\.(\\\\d+)\"]\n        message: \"go away bot\"")
        },
        Check {
            path: "/ua-bypass",
            ..check("ua-restriction", "no User-Agent passes with bypass_missing", "ua-restriction:\n        denylist: [\"my-bot2\"]\n        bypass_missing: true")
        },
        // referer-restriction (t/plugin/referer-restriction.t)
        Check {
            path: "/ref-wl",
            headers: &[("referer", "http://www.xx.com/page")],
            ..check("referer-restriction", "a referer matching a wildcard passes", "referer-restriction:\n        whitelist: [\"*.xx.com\", \"yy.com\"]")
        },
        Check {
            path: "/ref-wl",
            headers: &[("referer", "https://yy.com:8443/x?y=1")],
            ..check("referer-restriction", "an exact host passes (port and path ignored)", "referer-restriction:\n        whitelist: [\"*.xx.com\", \"yy.com\"]")
        },
        Check {
            path: "/ref-wl",
            headers: &[("referer", "http://zz.com/")],
            status: 403,
            body: Some("{\"message\":\"Your referer host is not allowed\"}\n"),
            ..check("referer-restriction", "a referer outside the whitelist gets 403", "referer-restriction:\n        whitelist: [\"*.xx.com\", \"yy.com\"]")
        },
        Check {
            path: "/ref-wl",
            status: 403,
            ..check("referer-restriction", "no referer is refused without bypass_missing", "referer-restriction:\n        whitelist: [\"*.xx.com\", \"yy.com\"]")
        },
        Check {
            path: "/ref-wl",
            headers: &[("referer", "not a url")],
            status: 403,
            ..check("referer-restriction", "a malformed referer counts as missing", "referer-restriction:\n        whitelist: [\"*.xx.com\", \"yy.com\"]")
        },
        Check {
            path: "/ref-bypass",
            ..check("referer-restriction", "no referer passes with bypass_missing", "referer-restriction:\n        whitelist: [\"yy.com\"]\n        bypass_missing: true")
        },
        Check {
            path: "/ref-bl",
            headers: &[("referer", "http://a.bad.com/")],
            status: 403,
            body: Some("{\"message\":\"no bad referers\"}\n"),
            ..check("referer-restriction", "a blacklisted referer gets the message", "referer-restriction:\n        blacklist: [\"*.bad.com\"]\n        message: \"no bad referers\"")
        },
        Check {
            path: "/ref-bl",
            headers: &[("referer", "http://good.com/")],
            ..check("referer-restriction", "another referer passes the blacklist", "referer-restriction:\n        blacklist: [\"*.bad.com\"]\n        message: \"no bad referers\"")
        },
        // request-validation (t/plugin/request-validation.t): header_schema names headers in
        // any case; the request's are found whatever case they were sent in.
        Check {
            path: "/rv",
            headers: &[("x-api-version", "v1")],
            ..check("request-validation", "a header the schema requires, sent lower-case, passes", "request-validation:\n        header_schema:\n          type: object\n          required: [\"X-Api-Version\"]\n          properties:\n            X-Api-Version:\n              type: string\n              enum: [\"v1\", \"v2\"]")
        },
        Check {
            path: "/rv",
            status: 400,
            body_has: &["property \"X-Api-Version\" is required"],
            ..check("request-validation", "a missing required header is 400 with the schema's message", "request-validation:\n        header_schema:\n          type: object\n          required: [\"X-Api-Version\"]\n          properties:\n            X-Api-Version:\n              type: string\n              enum: [\"v1\", \"v2\"]")
        },
        Check {
            path: "/rv",
            headers: &[("X-API-VERSION", "v3")],
            status: 400,
            body_has: &["X-Api-Version"],
            ..check("request-validation", "a header outside the enum is 400", "request-validation:\n        header_schema:\n          type: object\n          required: [\"X-Api-Version\"]\n          properties:\n            X-Api-Version:\n              type: string\n              enum: [\"v1\", \"v2\"]")
        },
        // workflow with a plugin action (t/plugin/workflow.t): limit-count registers itself
        // through its workflow_handler.
        Check {
            path: "/wf-limit",
            ..check("workflow", "a limit-count action lets the first request through", "workflow:\n        rules:\n          - case: [[\"uri\", \"==\", \"/wf-limit\"]]\n            actions:\n              - [\"limit-count\", {count: 1, time_window: 60, rejected_code: 503, key_type: \"constant\", key: \"wf\"}]")
        },
        Check {
            path: "/wf-limit",
            status: 503,
            ..check("workflow", "the limit-count action refuses the next one", "workflow:\n        rules:\n          - case: [[\"uri\", \"==\", \"/wf-limit\"]]\n            actions:\n              - [\"limit-count\", {count: 1, time_window: 60, rejected_code: 503, key_type: \"constant\", key: \"wf\"}]")
        },
    ]
}

/// The consumers the key-auth and consumer-restriction checks authenticate as.
/// kate brings plugins of her own and her group's; jack has a second key as a credential.
const KEY_AUTH_CONSUMERS: &str = "consumer_groups:\n  - id: gold\n    plugins:\n      response-headers:\n        set:\n          X-Group: gold\n\
consumers:\n  - username: jack\n    labels:\n      custom_id: j-1\n    plugins:\n      key-auth:\n        key: jack-key\n\
\x20 - id: jack/credentials/second\n    plugins:\n      key-auth:\n        key: jack-second\n\
\x20 - username: rose\n    plugins:\n      key-auth:\n        key: rose-key\n\
\x20 - username: kate\n    group_id: gold\n    plugins:\n      key-auth:\n        key: kate-key\n      proxy-rewrite:\n        headers:\n          set:\n            X-Kate: consumer\n";

/// (plugin, check, what went wrong).
type Failure = (String, String, String);

/// Runs every check against a gateway serving `plugin_dir`; returns (plugin, what, error) for
/// the failures and the number of checks per plugin.
fn run_checks(plugin_dir: &Path) -> (Vec<Failure>, Vec<(String, usize)>) {
    let up = Upstream::echo();
    let all = checks();
    let mut routes = String::new();
    let mut seen = std::collections::HashSet::new();
    for c in &all {
        let path = c.path.split('?').next().unwrap_or(c.path);
        if !seen.insert(path.to_string()) {
            continue;
        }
        // The regex_uri checks need a prefix route; the others match exactly.
        let uri = match path {
            "/pr-re/users/7" => "/pr-re/*",
            "/redir-re/abc" => "/redir-re/*",
            p => p,
        };
        routes.push_str(&format!(
            "  - id: \"{}\"\n    uri: \"{}\"\n    plugins:\n      {}\n",
            path.trim_start_matches('/').replace('/', "-"),
            uri,
            c.plugins_yaml
        ));
        if c.upstream {
            routes.push_str(&upstream_yaml(&up));
        }
    }
    let tmp = tempfile::tempdir().expect("temp dir");
    let yaml = format!(
        "workers: 1\nplugin_dirs:\n  - \"{}\"\nroutes:\n{routes}{KEY_AUTH_CONSUMERS}",
        plugin_dir.display()
    );
    let gw = Gateway::start_in(tmp.path(), &yaml);
    let mut failures = Vec::new();
    let mut counts: Vec<(String, usize)> = Vec::new();
    for c in &all {
        match counts.iter_mut().find(|(p, _)| p == c.plugin) {
            Some((_, n)) => *n += 1,
            None => counts.push((c.plugin.to_string(), 1)),
        }
        let mut req = Req::new(c.method, &gw.url(c.path));
        for (k, v) in c.headers {
            req = req.header(k, v);
        }
        let r = req.send();
        let mut errs = Vec::new();
        if r.status != c.status {
            errs.push(format!("status {} (want {})", r.status, c.status));
        }
        if let Some(b) = c.body {
            if r.text() != b {
                errs.push(format!("body {:?} (want {b:?})", r.text()));
            }
        }
        for s in c.body_has {
            if !r.text().contains(s) {
                errs.push(format!("body {:?} lacks {s:?}", r.text()));
            }
        }
        for s in c.body_lacks {
            if r.text().contains(s) {
                errs.push(format!("body {:?} has {s:?}", r.text()));
            }
        }
        for (k, v) in c.resp_headers {
            if r.header(k).as_deref() != Some(*v) {
                errs.push(format!("header {k}: {:?} (want {v:?})", r.header(k)));
            }
        }
        if !errs.is_empty() {
            failures.push((c.plugin.to_string(), c.what.to_string(), errs.join("; ")));
        }
    }
    if !failures.is_empty() {
        eprintln!("gateway log:\n{}", gw.logs());
    }
    (failures, counts)
}

/// Copies the target plugins from an APISIX checkout into `dir`. A file named `apisix/...` is
/// a module outside `apisix/plugins` (e.g. `apisix.utils.redis-schema`): it goes to the same
/// path under `dir`, where dotted module names are searched.
fn copy_targets(src: &Path, dir: &Path) {
    for (_, files) in TARGETS {
        for f in *files {
            let from = if f.starts_with("apisix/") {
                src.join(f)
            } else {
                src.join("apisix/plugins").join(f)
            };
            let to = dir.join(f);
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent).expect("plugin sub dir");
            }
            std::fs::copy(&from, &to)
                .unwrap_or_else(|e| panic!("cannot copy {}: {e}", from.display()));
        }
    }
    // The limit plugins' redis policies load the real lua-resty-redis (Debian's, unmodified);
    // dotted names are searched under the plugin folder too.
    common::lua_libs::install_as_resty("lua-nginx-redis", "redis.lua", dir);
}

/// APISIX's own key-auth with consumers, credentials and consumer plugins written through the
/// Admin API (APISIX_SRC): APISIX's `t/admin/credentials.t` and `t/node/consumer-plugin*.t`
/// behaviour, restated.
#[test]
fn real_key_auth_with_admin_api_credentials_and_consumer_plugins() {
    let Some(src) = std::env::var_os("APISIX_SRC") else {
        eprintln!("APISIX_SRC is not set: skipping the Admin API checks with APISIX's key-auth");
        return;
    };
    let key_auth = std::fs::read_to_string(PathBuf::from(src).join("apisix/plugins/key-auth.lua"))
        .expect("key-auth.lua");
    let up = Upstream::echo();
    let u = upstream_yaml(&up);
    let routes = format!("  - id: ka\n    uri: /ka\n    plugins:\n      key-auth: {{}}\n{u}");
    let (_tmp, gw, admin) = consumer_gateway(&[("key-auth", key_auth.as_str())], &routes, "");
    let call = |m: &str, p: &str, b: Option<&str>| admin_call(&admin, m, p, b);
    let send = |key: &str| Req::get(&gw.url("/ka")).header("apikey", key).send();

    let r = call(
        "PUT",
        "/consumers/jack",
        Some(
            r#"{"plugins":{"key-auth":{"key":"jack-key"},"response-headers":{"set":{"X-Who":"jack"}},"stamp":{"tag":"jack"}}}"#,
        ),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let r = call(
        "PUT",
        "/consumers/jack/credentials/c2",
        Some(r#"{"plugins":{"key-auth":{"key":"jack-two"}}}"#),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    for (key, cred) in [("jack-key", None), ("jack-two", Some("c2"))] {
        let r = send(key);
        assert_eq!(r.status, 200, "{}\n{}", r.text(), gw.logs());
        let seen = r.json();
        assert_eq!(seen["headers"]["x-consumer-username"], "jack");
        assert_eq!(
            seen["headers"]
                .get("x-credential-identifier")
                .and_then(|v| v.as_str()),
            cred
        );
        // The consumer's plugins run after key-auth: native and Lua.
        assert_eq!(r.header("x-who").as_deref(), Some("jack"));
        assert_eq!(seen["headers"]["x-stamp"], "jack");
        assert_eq!(r.header("x-conf-type").as_deref(), Some("route&consumer"));
    }
    assert_eq!(send("nobody").status, 401);

    // APISIX's duplicate-key refusals, with its wording.
    let r = call(
        "PUT",
        "/consumers/bob",
        Some(r#"{"plugins":{"key-auth":{"key":"jack-two"}}}"#),
    );
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json()["error_msg"],
        "duplicate key of plugin key-auth found with credential: c2 of consumer: jack"
    );
    let r = call(
        "PUT",
        "/consumers/jack/credentials/c3",
        Some(r#"{"plugins":{"key-auth":{"key":"jack-key"}}}"#),
    );
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json()["error_msg"],
        "duplicate key of plugin key-auth found with consumer: jack"
    );
    // Rewriting a consumer or a credential with its own key is fine.
    let r = call(
        "PUT",
        "/consumers/jack",
        Some(r#"{"plugins":{"key-auth":{"key":"jack-key"}}}"#),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = call(
        "PUT",
        "/consumers/jack/credentials/c2",
        Some(r#"{"plugins":{"key-auth":{"key":"jack-two"}}}"#),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // A consumer does not conflict with its own credentials.
    let r = call(
        "PUT",
        "/consumers/jack",
        Some(r#"{"plugins":{"key-auth":{"key":"jack-two"}}}"#),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // Without its plugins now, jack's requests run the route's alone.
    let r = send("jack-two");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-who"), None);
}

/// APISIX's own cors with `allow_origins_by_metadata` (APISIX_SRC): its plugin metadata
/// written through `/apisix/admin/plugin_metadata/cors`, checked against cors's
/// `metadata_schema` by its `check_schema(conf, TYPE_METADATA)`; `t/plugin/cors3.t` behaviour,
/// restated.
#[test]
fn real_cors_allow_origins_by_metadata() {
    let Some(src) = std::env::var_os("APISIX_SRC") else {
        eprintln!("APISIX_SRC is not set: skipping cors with plugin metadata");
        return;
    };
    let cors = std::fs::read_to_string(PathBuf::from(src).join("apisix/plugins/cors.lua"))
        .expect("cors.lua");
    let up = Upstream::echo();
    let u = upstream_yaml(&up);
    let routes = format!(
        "  - id: one\n    uri: /one\n    plugins:\n      cors:\n        allow_origins: \"https://test.com\"\n        allow_origins_by_metadata: [key_1]\n{u}\
         \x20 - id: two\n    uri: /two\n    plugins:\n      cors:\n        allow_origins_by_metadata: [key_1, key_2]\n{u}\
         \x20 - id: star\n    uri: /star\n    plugins:\n      cors:\n        allow_origins_by_metadata: [key_3]\n{u}"
    );
    let (_tmp, gw, admin) = consumer_gateway(&[("cors", cors.as_str())], &routes, "");
    let call = |m: &str, p: &str, b: Option<&str>| admin_call(&admin, m, p, b);
    let origin = |path: &str, o: &str| {
        Req::get(&gw.url(path))
            .header("Origin", o)
            .send()
            .header("access-control-allow-origin")
    };

    // No metadata yet: only the conf's own allow_origins.
    assert_eq!(origin("/one", "https://domain.com"), None);
    assert_eq!(
        origin("/one", "https://test.com").as_deref(),
        Some("https://test.com")
    );

    // The metadata schema refuses an origin that is not one (cors's origins_pattern).
    let r = call(
        "PUT",
        "/plugin_metadata/cors",
        Some(r#"{"allow_origins": {"key_1": "x.com"}}"#),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        r.json()["error_msg"]
            .as_str()
            .unwrap_or_default()
            .starts_with("invalid configuration: property \"allow_origins\" validation failed"),
        "{}",
        r.text()
    );

    let r = call(
        "PUT",
        "/plugin_metadata/cors",
        Some(
            r#"{"allow_origins": {"key_1": "https://domain.com", "key_2": "https://sub.domain.com,https://sub2.domain.com", "key_3": "*"}}"#,
        ),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(
        origin("/one", "https://domain.com").as_deref(),
        Some("https://domain.com")
    );
    assert_eq!(origin("/one", "http://foo.example.org"), None);
    assert_eq!(
        origin("/two", "https://sub.domain.com").as_deref(),
        Some("https://sub.domain.com")
    );
    assert_eq!(
        origin("/star", "http://foo.example.org").as_deref(),
        Some("http://foo.example.org")
    );

    // A change is seen by the next request (cors caches per modifiedIndex).
    let r = call(
        "PUT",
        "/plugin_metadata/cors",
        Some(r#"{"allow_origins": {"key_1": "https://other.com"}}"#),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(origin("/one", "https://domain.com"), None);
    assert_eq!(
        origin("/one", "https://other.com").as_deref(),
        Some("https://other.com")
    );
    let r = call("DELETE", "/plugin_metadata/cors", None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(origin("/one", "https://other.com"), None);
}

#[test]
fn real_apisix_plugins_behave_as_documented() {
    let Some(src) = std::env::var_os("APISIX_SRC") else {
        eprintln!("APISIX_SRC is not set: skipping the checks against APISIX's own plugin files");
        return;
    };
    let src = PathBuf::from(src);
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("plugins");
    std::fs::create_dir_all(&dir).expect("plugins dir");
    copy_targets(&src, &dir);
    let (failures, counts) = run_checks(&dir);
    println!("\nplugin               checks  passed");
    for (p, n) in &counts {
        let failed = failures.iter().filter(|(fp, _, _)| fp == p).count();
        println!("{p:<20} {n:>6}  {:>6}", n - failed);
    }
    for (p, what, err) in &failures {
        println!("FAIL {p}: {what}: {err}");
    }
    assert!(failures.is_empty(), "{} checks failed", failures.len());
}

/// limit-conn with concurrent requests (t/plugin/limit-conn.t: conn + burst at once pass, the
/// rest get `rejected_code`), against a slow upstream so the requests overlap.
#[test]
fn real_limit_conn_refuses_concurrent_requests() {
    let Some(src) = std::env::var_os("APISIX_SRC") else {
        eprintln!("APISIX_SRC is not set: skipping the checks against APISIX's own plugin files");
        return;
    };
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("plugins");
    std::fs::create_dir_all(&dir).expect("plugins dir");
    copy_targets(&PathBuf::from(src), &dir);
    let up = Upstream::slow(std::time::Duration::from_millis(800));
    let yaml = format!(
        "workers: 2\nplugin_dirs:\n  - \"{}\"\nroutes:\n  - id: lc\n    uri: /slow\n    plugins:\n      limit-conn:\n        conn: 1\n        burst: 1\n        default_conn_delay: 0.1\n        key: route_id\n        rejected_code: 429\n        rejected_msg: busy\n{}",
        dir.display(),
        upstream_yaml(&up)
    );
    let gw = Gateway::start_in(tmp.path(), &yaml);
    let url = gw.url("/slow");
    let clients: Vec<_> = (0..5)
        .map(|_| {
            let u = url.clone();
            std::thread::spawn(move || {
                let r = Req::get(&u).send();
                (r.status, r.text())
            })
        })
        .collect();
    let mut got: Vec<(u16, String)> = clients
        .into_iter()
        .map(|c| c.join().expect("client"))
        .collect();
    got.sort();
    let statuses: Vec<u16> = got.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        statuses,
        vec![200, 200, 429, 429, 429],
        "{got:?}\n{}",
        gw.logs()
    );
    assert_eq!(got[2].1, "{\"error_msg\":\"busy\"}\n");
    // The log phase gave the slots back.
    assert_eq!(Req::get(&url).send().status, 200);
}

/// limit-count's header names from its plugin metadata (t/plugin/limit-count*.t with
/// `plugin_metadata/limit-count`: `limit_header`, `remaining_header`, `reset_header`).
#[test]
fn real_limit_count_takes_header_names_from_its_metadata() {
    let Some(src) = std::env::var_os("APISIX_SRC") else {
        eprintln!("APISIX_SRC is not set: skipping the checks against APISIX's own plugin files");
        return;
    };
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("plugins");
    std::fs::create_dir_all(&dir).expect("plugins dir");
    copy_targets(&PathBuf::from(src), &dir);
    let up = Upstream::echo();
    let yaml = format!(
        "workers: 1\nplugin_dirs:\n  - \"{}\"\nplugin_metadata:\n  - id: limit-count\n    limit_header: X-Quota\n    remaining_header: X-Quota-Left\n    reset_header: X-Quota-Reset\nroutes:\n  - id: q\n    uri: /q\n    plugins:\n      limit-count:\n        count: 1\n        time_window: 30\n{}",
        dir.display(),
        upstream_yaml(&up)
    );
    let gw = Gateway::start_in(tmp.path(), &yaml);
    let r = Req::get(&gw.url("/q")).send();
    assert_eq!(r.status, 200, "{}", gw.logs());
    assert_eq!(r.header("x-quota").as_deref(), Some("1"));
    assert_eq!(r.header("x-quota-left").as_deref(), Some("0"));
    assert_eq!(r.header("x-quota-reset").as_deref(), Some("30"));
    assert_eq!(r.header("x-ratelimit-limit"), None);
    let r = Req::get(&gw.url("/q")).send();
    assert_eq!(r.status, 503);
    assert_eq!(r.header("x-quota-left").as_deref(), Some("0"));
}

/// redis-server on a free loopback port, killed when dropped.
struct RedisServer(std::process::Child, u16);

impl RedisServer {
    fn start() -> RedisServer {
        let port = closed_port();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start redis-server: {e}"));
        let server = RedisServer(child, port);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not listen"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    /// One command in Redis's inline form; the reply's first line, or a bulk reply's body.
    fn command(&self, line: &str) -> String {
        use std::io::{BufRead, Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.1)).expect("connect");
        s.write_all(format!("{line}\r\n").as_bytes()).expect("send");
        let mut r = std::io::BufReader::new(s);
        let mut head = String::new();
        r.read_line(&mut head).expect("read");
        let head = head.trim_end();
        let Some(len) = head.strip_prefix('$').and_then(|n| n.parse::<usize>().ok()) else {
            return head.to_string();
        };
        let mut body = vec![0u8; len];
        r.read_exact(&mut body).expect("read the bulk reply");
        String::from_utf8_lossy(&body).into_owned()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// APISIX's own limit-count with `policy: redis` (APISIX_SRC) on the real lua-resty-redis from
/// a checkout (LUA_RESTY_REDIS_SRC: APISIX calls `set_timeouts`, which Debian's 0.27 lacks):
/// two gateway nodes share one redis-server and count together, as two APISIX nodes do.
#[test]
fn real_limit_count_redis_policy_counts_across_two_nodes() {
    let (Some(src), Some(redis_src)) = (
        std::env::var_os("APISIX_SRC"),
        std::env::var_os("LUA_RESTY_REDIS_SRC"),
    ) else {
        eprintln!(
            "APISIX_SRC or LUA_RESTY_REDIS_SRC is not set: skipping limit-count with policy redis"
        );
        return;
    };
    let redis = RedisServer::start();
    let up = Upstream::echo();
    let node = |name: &str| {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path().join("plugins");
        std::fs::create_dir_all(&dir).expect("plugins dir");
        copy_targets(&PathBuf::from(&src), &dir);
        std::fs::copy(
            PathBuf::from(&redis_src).join("lib/resty/redis.lua"),
            dir.join("resty/redis.lua"),
        )
        .expect("copy lua-resty-redis");
        let yaml = format!(
            "workers: 2\nplugin_dirs:\n  - \"{}\"\nroutes:\n  - id: rc\n    uri: /rc\n    plugins:\n      limit-count:\n        count: 3\n        time_window: 60\n        policy: redis\n        redis_host: 127.0.0.1\n        redis_port: {}\n        redis_timeout: 1000\n{}",
            dir.display(),
            redis.1,
            upstream_yaml(&up)
        );
        eprintln!("node {name}");
        let gw = Gateway::start_in(tmp.path(), &yaml);
        (tmp, gw)
    };
    let (_a_dir, a) = node("a");
    let (_b_dir, b) = node("b");
    let send = |gw: &Gateway| {
        let r = Req::get(&gw.url("/rc")).send();
        (
            r.status,
            r.header("x-ratelimit-limit"),
            r.header("x-ratelimit-remaining"),
            r.header("x-ratelimit-reset").is_some(),
        )
    };
    let logs = || format!("{}\n---\n{}", a.logs(), b.logs());
    let three = Some("3".to_string());
    // One count of 3 between the nodes: a, b, a pass with 2, 1, 0 left, then both refuse.
    assert_eq!(
        send(&a),
        (200, three.clone(), Some("2".into()), true),
        "{}",
        logs()
    );
    assert_eq!(
        send(&b),
        (200, three.clone(), Some("1".into()), true),
        "{}",
        logs()
    );
    assert_eq!(
        send(&a),
        (200, three.clone(), Some("0".into()), true),
        "{}",
        logs()
    );
    assert_eq!(
        send(&b),
        (503, three.clone(), Some("0".into()), true),
        "{}",
        logs()
    );
    assert_eq!(send(&a), (503, three, Some("0".into()), true), "{}", logs());
    // The counter is Redis's: one key, with the window's expiry.
    let keys = redis.command("DBSIZE");
    assert_eq!(keys, ":1", "{}", logs());
    // The nodes keep their connections alive in their workers' pools (APISIX sets keepalive
    // after each count): some are still connected now, at most one per worker, last used for
    // APISIX's counting script. CLIENT LIST counts this connection too.
    let clients = redis.command("CLIENT LIST");
    let gateway_clients = clients.lines().count() - 1;
    assert!((1..=4).contains(&gateway_clients), "{clients}");
    assert!(
        clients
            .lines()
            .any(|l| l.contains("cmd=evalsha") || l.contains("cmd=eval")),
        "{clients}"
    );
}

// ---------------------------------------------------------------------------------------------
// Libraries APISIX's plugins require over C in OpenResty// ---------------------------------------------------------------------------------------------
// Libraries APISIX's plugins require over C in OpenResty: digests, HMAC, AES, random bytes,
// zlib, brotli; and how plugin folders are searched
// ---------------------------------------------------------------------------------------------

/// Hashes, MACs, encrypts and inflates the request body with the modules APISIX's plugins
/// require (csrf, hmac-auth, aws-lambda, jwe-decrypt, request-id, content-decode) and answers
/// with the results.
const LIB_PROBE: &str = r#"
local core = require("apisix.core")
local sha256 = require("resty.sha256")
local to_hex = require("resty.string").to_hex
local hmac = require("resty.hmac")
local aes = require("resty.aes")
local random = require("resty.random")
local zlib = require("ffi-zlib")
local str_buffer = require("string.buffer")
local helper = require("apisix.utils.probe-helper")

local _M = { version = 0.1, priority = 100, name = "lib-probe",
             schema = { type = "object", properties = { endpoint = { type = "string" } } } }

function _M.check_schema(conf)
    core.utils.check_https({ "endpoint" }, conf, _M.name)
    return core.schema.check(_M.schema, conf)
end

local function inflate(data)
    local inputs = str_buffer.new():set(data)
    local outputs = str_buffer.new()
    local ok, err = zlib.inflateGzip(function(size)
        local d = inputs:get(size)
        if d == "" then return nil end
        return d
    end, function(d) return outputs:put(d) end)
    if not ok then return nil, err end
    return outputs:get()
end

function _M.access(conf, ctx)
    local body = core.request.get_body()
    local plain, err = inflate(body)
    if not plain then
        return 400, { error = err }
    end
    local h = sha256:new()
    h:update(plain)
    local key = core.request.header(ctx, "x-key")
    local cipher = assert(aes:new(string.rep("k", 32), nil, aes.cipher(256, "gcm"),
                                  { iv = string.rep("i", 12) }))
    local enc, tag = cipher:encrypt(plain)
    return 200, {
        sha256 = to_hex(h:final()),
        hmac = to_hex(hmac:new(key, hmac.ALGOS.SHA256):final(plain)),
        aes_back = cipher:decrypt(enc, tag) == plain,
        random = #random.bytes(21, true),
        helper = helper.answer(),
        size = #plain,
    }
end

return _M
"#;

/// A helper module staged under the plugin folder the way APISIX's `apisix/utils/*.lua` are.
const PROBE_HELPER: &str = r#"
return { answer = function() return "from the plugin folder" end }
"#;

/// A plugin named like a library: its `require("brotli")` must get the library, not itself.
const BROTLI_NAMED: &str = r#"
local brotli = require("brotli")
local _M = { version = 0.1, priority = 90, name = "brotli", schema = { type = "object" } }
function _M.access(conf, ctx)
    local c = brotli.compressor:new({ quality = 5 })
    local out = c:compress("hello brotli") .. c:finish()
    local d = brotli.decompressor:new()
    return 200, { back = d:decompress(out) .. d:finish(), is_self = brotli == _M }
end
return _M
"#;

/// A plugin shipped as `NAME/init.lua` (as APISIX ships proxy-cache).
const PACKAGED: &str = r#"
local sub = require("apisix.plugins.packaged.sub")
local _M = { version = 0.1, priority = 80, name = "packaged", schema = { type = "object" } }
function _M.access(conf, ctx) return 200, { sub = sub.name } end
return _M
"#;

#[test]
fn library_modules_and_plugin_folders_serve_apisix_code() {
    use flate2::write::GzEncoder;
    use hmac::Mac;
    use sha2::Digest;
    use std::io::Write;

    let up = Upstream::echo();
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("plugins");
    for (path, src) in [
        ("lib-probe.lua", LIB_PROBE),
        ("apisix/utils/probe-helper.lua", PROBE_HELPER),
        ("brotli.lua", BROTLI_NAMED),
        ("packaged/init.lua", PACKAGED),
        ("packaged/sub.lua", "return { name = 'packaged.sub' }"),
        // A plugin's helper package beside the plugin file: not a plugin, not an error.
        ("lib-probe/init.lua", "return { not_a_plugin = true }"),
    ] {
        let to = dir.join(path);
        std::fs::create_dir_all(to.parent().expect("parent")).expect("dir");
        std::fs::write(&to, src).expect("write");
    }
    let u = upstream_yaml(&up);
    let yaml = format!(
        "workers: 1\nplugin_dirs:\n  - plugins\nroutes:\n  - id: lib\n    uri: /lib\n    plugins:\n      lib-probe:\n        endpoint: http://collector.example/x\n{u}  - id: brotli\n    uri: /brotli\n    plugins:\n      brotli: {{}}\n{u}  - id: packaged\n    uri: /packaged\n    plugins:\n      packaged: {{}}\n{u}"
    );
    let gw = Gateway::start_in(tmp.path(), &yaml);

    let text = "moongate ".repeat(5000);
    let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(text.as_bytes()).expect("gzip");
    let gz = gz.finish().expect("gzip");
    let r = Req::post(&gw.url("/lib"))
        .header("x-key", "s3cret")
        .body(gz)
        .send();
    assert_eq!(r.status, 200, "{}\n{}", r.text(), gw.logs());
    let v = r.json();
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    assert_eq!(v["size"], text.len());
    assert_eq!(v["sha256"], hex(&sha2::Sha256::digest(text.as_bytes())));
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"s3cret").expect("key");
    mac.update(text.as_bytes());
    assert_eq!(v["hmac"], hex(&mac.finalize().into_bytes()));
    assert_eq!(v["aes_back"], true);
    assert_eq!(v["random"], 21);
    assert_eq!(v["helper"], "from the plugin folder");
    // check_https warns about a plain-HTTP endpoint, as APISIX does, and refuses nothing.
    assert!(
        gw.logs()
            .contains("Using lib-probe endpoint with no TLS is a security risk"),
        "{}",
        gw.logs()
    );
    // A body that is not gzip gets the inflate error, not a crash.
    let bad = Req::post(&gw.url("/lib"))
        .header("x-key", "k")
        .body("\u{1f}\u{8b}not really gzip")
        .send();
    assert_eq!(bad.status, 400, "{}", bad.text());
    assert!(bad.json()["error"]
        .as_str()
        .unwrap_or("")
        .starts_with("INFLATE"));

    let b = get(&gw.url("/brotli")).json();
    assert_eq!(b["back"], "hello brotli");
    assert_eq!(b["is_self"], false);
    let p = get(&gw.url("/packaged"));
    assert_eq!(p.status, 200, "{}", gw.logs());
    assert_eq!(p.json()["sub"], "packaged.sub");
}

/// A dispatcher written here with the shape of APISIX's `workflow`: plugins register actions
/// with `register(name, check, handler)` from their `workflow_handler`, and `check_schema`
/// refuses an action nobody registered.
const WORKFLOW: &str = r#"
local core = require("apisix.core")
local actions = {}
local _M = { version = 0.1, priority = 1006, schema = { type = "object",
    properties = { action = { type = "string" }, conf = { type = "object" } },
    required = { "action" } } }
function _M.register(name, check, handler)
    actions[name] = { check = check, handler = handler }
end
function _M.check_schema(conf)
    local ok, err = core.schema.check(_M.schema, conf)
    if not ok then return false, err end
    local a = actions[conf.action]
    if not a then return false, "unsupported action: " .. conf.action end
    return a.check(conf.conf or {})
end
function _M.access(conf, ctx)
    return actions[conf.action].handler(conf.conf or {}, ctx)
end
return _M
"#;

/// Registers itself as a `workflow` action (`workflow_handler`) and also works as a plugin:
/// answers 429 after `max` requests.
const COUNTED: &str = r#"
local core = require("apisix.core")
local workflow = require("apisix.plugins.workflow")
local seen = 0
local schema = { type = "object", properties = { max = { type = "integer", minimum = 1 } },
    required = { "max" } }
local _M = { version = 0.1, priority = 1000, schema = schema }
local function limit(conf)
    seen = seen + 1
    if seen > conf.max then return 429, { error_msg = "over " .. conf.max } end
end
function _M.check_schema(conf) return core.schema.check(schema, conf) end
function _M.access(conf, ctx) return limit(conf) end
function _M.workflow_handler()
    workflow.register("counted", function(conf) return core.schema.check(schema, conf) end,
        function(conf, ctx) return limit(conf) end)
end
return _M
"#;

/// Checks request headers against a schema with the schema's spelling of their names.
const HEADER_SCHEMA: &str = r#"
local core = require("apisix.core")
local _M = { version = 0.1, priority = 2800, schema = { type = "object" } }
function _M.access(conf, ctx)
    local ok, err = core.schema.check({ type = "object", required = { "X-Token" },
        properties = { ["X-Token"] = { type = "string", pattern = "^t-" } } },
        core.request.headers(ctx))
    if not ok then return 400, err end
end
return _M
"#;

/// APISIX's loader calls a plugin's `workflow_handler` when it loads it, so `workflow` knows
/// the plugin as an action: whichever of the two a VM loads first (`counted` requires
/// `apisix.plugins.workflow` as a library before `workflow` runs as a plugin on /first).
/// And `core.schema.check` on request headers finds them by the schema's spelling, as
/// APISIX's validator does through the headers table's lookups (request-validation's
/// `header_schema`).
#[test]
fn workflow_actions_and_header_schemas_work_as_in_apisix() {
    let up = Upstream::echo();
    let u = upstream_yaml(&up);
    let routes = format!(
        "  - id: first\n    uri: /first\n    plugins:\n      counted:\n        max: 5\n{u}\
         \x20 - id: wf\n    uri: /wf\n    plugins:\n      workflow:\n        action: counted\n        conf:\n          max: 1\n{u}\
         \x20 - id: hdr\n    uri: /hdr\n    plugins:\n      header-schema: {{}}\n{u}"
    );
    let (_tmp, gw) = gateway_with(
        &[
            ("workflow", WORKFLOW),
            ("counted", COUNTED),
            ("header-schema", HEADER_SCHEMA),
        ],
        &routes,
    );
    assert_eq!(get(&gw.url("/first")).status, 200, "{}", gw.logs());
    // One counter per loaded module: the action shares `counted`'s, as in APISIX.
    let r = get(&gw.url("/wf"));
    assert_eq!(r.status, 429, "{}\n{}", r.text(), gw.logs());
    assert!(r.text().contains("over 1"), "{}", r.text());

    let ok = Req::get(&gw.url("/hdr")).header("x-token", "t-1").send();
    assert_eq!(ok.status, 200, "{}\n{}", ok.text(), gw.logs());
    let bad = Req::get(&gw.url("/hdr")).header("X-TOKEN", "nope").send();
    assert_eq!(bad.status, 400);
    assert!(bad.text().contains("X-Token"), "{}", bad.text());
    let missing = get(&gw.url("/hdr"));
    assert_eq!(missing.status, 400);
    assert!(
        missing.text().contains(r#"property "X-Token" is required"#),
        "{}",
        missing.text()
    );

    // An action no plugin registered is refused at load, with its path.
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("plugins");
    std::fs::create_dir_all(&dir).expect("plugins dir");
    for (name, src) in [("workflow", WORKFLOW), ("counted", COUNTED)] {
        std::fs::write(dir.join(format!("{name}.lua")), src).expect("write plugin");
    }
    let file = tmp.path().join("config.yaml");
    std::fs::write(
        &file,
        format!("plugin_dirs: [plugins]\nroutes:\n  - id: bad\n    uri: /bad\n    plugins:\n      workflow:\n        action: nobody\n{u}"),
    )
    .expect("write config");
    let (code, out) = common::check_file(&file);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("routes[0].plugins.workflow") && out.contains("unsupported action: nobody"),
        "{out}"
    );
}

/// Signs and verifies the request body with the keys in its conf (`?what=sign|verify|jwt`),
/// through `resty.openssl.pkey`, `ngx.base64` and `resty.jwt`.
const PKEY_PROBE: &str = r#"
local core = require("apisix.core")
local pkey = require("resty.openssl.pkey")
local jwt = require("resty.jwt")
local b64 = require("ngx.base64")
local _M = { version = 0.1, priority = 100, schema = { type = "object" } }
local function mode(conf)
    return conf.md, conf.pss and pkey.PADDINGS.RSA_PKCS1_PSS_PADDING or nil,
        conf.raw and { ecdsa_use_raw = true } or nil
end
function _M.access(conf, ctx)
    local data = core.request.get_body() or ""
    local what = ngx.var.arg_what
    if what == "sign" then
        local k = assert(pkey.new(conf.private))
        local sig, err = k:sign(data, mode(conf))
        return 200, { sig = sig and b64.encode_base64url(sig), err = err,
            private = k:is_private(), type = k:get_key_type().sn }
    elseif what == "verify" then
        local k = assert(pkey.new(conf.public))
        local sig = b64.decode_base64url(core.request.header(ctx, "x-sig"))
        local ok, err = k:verify(sig, data, mode(conf))
        return 200, { ok = ok, err = err, private = k:is_private() }
    elseif what == "jwt" then
        local token = jwt:sign(conf.private, { header = { typ = "JWT", alg = conf.alg },
            payload = { sub = "jack", exp = ngx.time() + 60 } })
        local good = jwt:verify(conf.public, token)
        local forged = jwt:load_jwt(token)
        forged.raw_payload = b64.encode_base64url('{"sub":"rose"}')
        local bad = jwt:verify_jwt_obj(conf.public, forged)
        local expired = jwt:verify(conf.public, jwt:sign(conf.private, { header = { alg = conf.alg },
            payload = { exp = ngx.time() - 10 } }))
        local validators = require("resty.jwt-validators")
        local sub_ok = jwt:verify(conf.public, token, { sub = validators.equals("jack") })
        local sub_bad = jwt:verify(conf.public, token,
            { sub = validators.equals_any_of({ "rose" }) })
        local missing = jwt:verify(conf.public, token, { iss = validators.equals("me") })
        local optional = jwt:verify(conf.public, token, { iss = validators.opt_equals("me") })
        return 200, { verified = good.verified, sub = good.payload.sub, forged = bad.verified,
            expired = expired.verified, reason = expired.reason,
            garbage = jwt:load_jwt("a.b").reason, sub_ok = sub_ok.verified,
            sub_bad = sub_bad.reason, missing = missing.reason, optional = optional.verified }
    elseif what == "jwk" then
        local dump_jwk = require("resty.openssl.auxiliary.jwk").dump_jwk
        local from_public = dump_jwk(assert(pkey.new(conf.public)))
        local from_private = dump_jwk(assert(pkey.new(conf.private)), false)
        local _, priv_err = dump_jwk(assert(pkey.new(conf.private)), true)
        return 200, { jwk = core.json.decode(from_public), same = from_public == from_private,
            priv_err = priv_err }
    end
    local _, err = pkey.new("not a key")
    return 200, { err = err }
end
return _M
"#;

/// Runs `openssl ARGS` in `dir`; panics with its stderr when it fails.
fn openssl(dir: &Path, args: &[&str]) -> Vec<u8> {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl (Debian package openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// `resty.openssl.pkey` with keys of every supported kind made by the openssl command:
/// signatures it makes verify with openssl, and signatures openssl makes verify with it, for
/// RSA PKCS#1 v1.5 and PSS (PKCS#8 and PKCS#1 files), ECDSA P-256 (a SEC1 file) and Ed25519;
/// `resty.jwt` signs and verifies tokens and refuses forged and expired ones;
/// `resty.openssl.auxiliary.jwk` writes each public key as the JWK of what openssl prints.
#[test]
fn pkey_and_jwt_interoperate_with_openssl() {
    let up = Upstream::echo();
    let tmp = tempfile::tempdir().expect("temp dir");
    let d = tmp.path();
    openssl(
        d,
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            "rsa.pem",
        ],
    );
    openssl(d, &["genrsa", "-traditional", "-out", "rsa1.pem", "2048"]);
    openssl(
        d,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "ec.pem",
        ],
    );
    openssl(d, &["genpkey", "-algorithm", "ed25519", "-out", "ed.pem"]);
    for k in ["rsa", "rsa1", "ec", "ed"] {
        openssl(
            d,
            &[
                "pkey",
                "-in",
                &format!("{k}.pem"),
                "-pubout",
                "-out",
                &format!("{k}.pub"),
            ],
        );
    }
    let read = |f: &str| {
        serde_json::to_string(&std::fs::read_to_string(d.join(f)).expect("key")).expect("json")
    };
    // (route, key file, conf extras)
    let kinds = [
        ("rsa", "rsa", "md: sha256\n        alg: RS256"),
        ("rsa1", "rsa1", "md: sha512\n        alg: RS512"),
        (
            "pss",
            "rsa",
            "md: sha256\n        pss: true\n        alg: PS256",
        ),
        ("ec", "ec", "md: sha256\n        alg: ES256"),
        ("ed", "ed", "alg: EdDSA"),
    ];
    let u = upstream_yaml(&up);
    let mut routes = String::new();
    for (route, key, extra) in kinds {
        routes.push_str(&format!(
            "  - id: {route}\n    uri: /{route}\n    plugins:\n      pkey-probe:\n        private: {}\n        public: {}\n        {extra}\n{u}",
            read(&format!("{key}.pem")),
            read(&format!("{key}.pub"))
        ));
    }
    routes.push_str(&format!(
        "  - id: bad\n    uri: /bad\n    plugins:\n      pkey-probe: {{}}\n{u}"
    ));
    let (_tmp, gw) = gateway_with(&[("pkey-probe", PKEY_PROBE)], &routes);
    let data = b"moongate signs this";
    std::fs::write(d.join("data"), data).expect("data");
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    use base64::Engine;
    for (route, key, _) in kinds {
        // moongate signs, openssl verifies.
        let r = Req::post(&gw.url(&format!("/{route}?what=sign")))
            .body(data.to_vec())
            .send();
        assert_eq!(r.status, 200, "{route}: {}\n{}", r.text(), gw.logs());
        let v = r.json();
        assert_eq!(v["private"], true, "{route}: {v}");
        let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(v["sig"].as_str().unwrap_or_else(|| panic!("{route}: {v}")))
            .expect("base64url");
        std::fs::write(d.join("sig"), &sig).expect("sig");
        let pubf = format!("{key}.pub");
        let check: Vec<&str> = match route {
            "ed" => vec![
                "pkeyutl", "-verify", "-pubin", "-inkey", &pubf, "-rawin", "-in", "data",
                "-sigfile", "sig",
            ],
            "pss" => vec![
                "dgst",
                "-sha256",
                "-verify",
                &pubf,
                "-sigopt",
                "rsa_padding_mode:pss",
                "-signature",
                "sig",
                "data",
            ],
            "rsa1" => vec![
                "dgst",
                "-sha512",
                "-verify",
                &pubf,
                "-signature",
                "sig",
                "data",
            ],
            _ => vec![
                "dgst",
                "-sha256",
                "-verify",
                &pubf,
                "-signature",
                "sig",
                "data",
            ],
        };
        openssl(d, &check);
        // openssl signs, moongate verifies; one flipped byte fails.
        let keyf = format!("{key}.pem");
        let make: Vec<&str> = match route {
            "ed" => vec![
                "pkeyutl", "-sign", "-inkey", &keyf, "-rawin", "-in", "data", "-out", "osig",
            ],
            "pss" => vec![
                "dgst",
                "-sha256",
                "-sign",
                &keyf,
                "-sigopt",
                "rsa_padding_mode:pss",
                "-sigopt",
                "rsa_pss_saltlen:digest",
                "-out",
                "osig",
                "data",
            ],
            "rsa1" => vec!["dgst", "-sha512", "-sign", &keyf, "-out", "osig", "data"],
            _ => vec!["dgst", "-sha256", "-sign", &keyf, "-out", "osig", "data"],
        };
        openssl(d, &make);
        let mut osig = std::fs::read(d.join("osig")).expect("osig");
        let r = Req::post(&gw.url(&format!("/{route}?what=verify")))
            .header("x-sig", &b64(&osig))
            .body(data.to_vec())
            .send();
        assert_eq!(r.json()["ok"], true, "{route}: {}", r.text());
        assert_eq!(r.json()["private"], false, "{route}: {}", r.text());
        let last = osig.len() - 1;
        osig[last] ^= 1;
        let r = Req::post(&gw.url(&format!("/{route}?what=verify")))
            .header("x-sig", &b64(&osig))
            .body(data.to_vec())
            .send();
        assert_eq!(r.json()["ok"], false, "{route}: {}", r.text());
        // Tokens.
        let r = Req::get(&gw.url(&format!("/{route}?what=jwt"))).send();
        let v = r.json();
        assert_eq!(v["verified"], true, "{route}: {v}\n{}", gw.logs());
        assert_eq!(v["sub"], "jack", "{route}: {v}");
        assert_eq!(v["forged"], false, "{route}: {v}");
        assert_eq!(v["expired"], false, "{route}: {v}");
        assert!(
            v["reason"]
                .as_str()
                .unwrap_or("")
                .contains("'exp' claim expired"),
            "{v}"
        );
        assert_eq!(v["garbage"], "invalid jwt string", "{v}");
        // Claim specs with resty.jwt-validators.
        assert_eq!(v["sub_ok"], true, "{v}");
        assert_eq!(v["sub_bad"], "Claim 'sub' ('jack') returned failure", "{v}");
        assert_eq!(v["missing"], "'iss' claim is required.", "{v}");
        assert_eq!(v["optional"], true, "{v}");
        // The public half as a JWK, compared with what openssl prints of the same key.
        let v = Req::get(&gw.url(&format!("/{route}?what=jwk")))
            .send()
            .json();
        assert_eq!(v["same"], true, "{route}: {v}");
        assert!(v["priv_err"].is_string(), "{route}: {v}");
        let jwk = &v["jwk"];
        let member = |m: &str| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(
                    jwk[m]
                        .as_str()
                        .unwrap_or_else(|| panic!("{route}: {m} in {jwk}")),
                )
                .expect("base64url")
        };
        let pubf = format!("{key}.pub");
        let spki = openssl(d, &["pkey", "-pubin", "-in", &pubf, "-outform", "DER"]);
        match key {
            "rsa" | "rsa1" => {
                assert_eq!(jwk["kty"], "RSA", "{jwk}");
                let out = openssl(d, &["rsa", "-pubin", "-in", &pubf, "-noout", "-modulus"]);
                let hex = String::from_utf8_lossy(&out);
                let hex = hex.trim().trim_start_matches("Modulus=");
                let n: String = member("n").iter().map(|b| format!("{b:02X}")).collect();
                assert_eq!(n, hex, "{route}");
                assert_eq!(member("e"), vec![1, 0, 1], "{route}");
            }
            "ec" => {
                assert_eq!(jwk["kty"], "EC", "{jwk}");
                assert_eq!(jwk["crv"], "P-256", "{jwk}");
                // The SPKI ends with the uncompressed point 04 || x || y.
                let point = &spki[spki.len() - 65..];
                assert_eq!(point[0], 4);
                assert_eq!(member("x"), point[1..33].to_vec());
                assert_eq!(member("y"), point[33..].to_vec());
            }
            _ => {
                assert_eq!(jwk["kty"], "OKP", "{jwk}");
                assert_eq!(jwk["crv"], "Ed25519", "{jwk}");
                assert_eq!(member("x"), spki[spki.len() - 32..].to_vec());
            }
        }
    }
    let r = get(&gw.url("/bad"));
    assert!(
        r.json()["err"]
            .as_str()
            .unwrap_or("")
            .starts_with("pkey:new: "),
        "{}",
        r.text()
    );
}

/// APISIX's own jwt-auth (APISIX_SRC) with HS256 and RS256 consumers: tokens made here (HMAC
/// with the hmac crate, RSA with the openssl command) pass in the header, the query and the
/// cookie; a wrong signature, an expired token, an unknown key and no token are 401
/// (t/plugin/jwt-auth.t, restated).
#[test]
fn real_jwt_auth_verifies_hs256_and_rs256_tokens() {
    use base64::Engine;
    use hmac::Mac;
    let Some(src) = std::env::var_os("APISIX_SRC") else {
        eprintln!("APISIX_SRC is not set: skipping the checks with APISIX's jwt-auth");
        return;
    };
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("plugins");
    std::fs::create_dir_all(&dir).expect("plugins dir");
    copy_targets(Path::new(&src), &dir);
    let d = tmp.path();
    openssl(
        d,
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            "rsa.pem",
        ],
    );
    openssl(d, &["pkey", "-in", "rsa.pem", "-pubout", "-out", "rsa.pub"]);
    let public = serde_json::to_string(&std::fs::read_to_string(d.join("rsa.pub")).expect("pub"))
        .expect("json");
    let up = Upstream::echo();
    let yaml = format!(
        "workers: 1\nplugin_dirs:\n  - plugins\nroutes:\n  - id: jwt\n    uri: /jwt\n    plugins:\n      jwt-auth: {{}}\n{}\
         consumers:\n  - username: jack\n    plugins:\n      jwt-auth:\n        key: jack-key\n        secret: jack-secret\n\
         \x20 - username: rose\n    plugins:\n      jwt-auth:\n        key: rose-key\n        algorithm: RS256\n        public_key: {public}\n",
        upstream_yaml(&up)
    );
    let gw = Gateway::start_in(tmp.path(), &yaml);
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let hs = |key: &str, secret: &[u8], exp: u64| {
        let head = format!(
            "{}.{}",
            b64(br#"{"alg":"HS256","typ":"JWT"}"#),
            b64(format!(r#"{{"key":"{key}","exp":{exp}}}"#).as_bytes())
        );
        let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).expect("hmac");
        m.update(head.as_bytes());
        format!("{head}.{}", b64(&m.finalize().into_bytes()))
    };
    let good = hs("jack-key", b"jack-secret", now + 60);
    let r = Req::get(&gw.url("/jwt"))
        .header("authorization", &good)
        .send();
    assert_eq!(r.status, 200, "{}\n{}", r.text(), gw.logs());
    assert_eq!(
        r.json()["headers"]["x-consumer-username"],
        "jack",
        "{}",
        r.text()
    );
    assert_eq!(
        Req::get(&gw.url(&format!("/jwt?jwt={good}"))).send().status,
        200
    );
    assert_eq!(
        Req::get(&gw.url("/jwt"))
            .header("cookie", &format!("jwt={good}"))
            .send()
            .status,
        200
    );
    for (what, token) in [
        (
            "a wrong secret",
            hs("jack-key", b"not-the-secret", now + 60),
        ),
        (
            "an expired token",
            hs("jack-key", b"jack-secret", now - 100),
        ),
        ("an unknown key", hs("nobody", b"jack-secret", now + 60)),
    ] {
        let r = Req::get(&gw.url("/jwt"))
            .header("authorization", &token)
            .send();
        assert_eq!(r.status, 401, "{what}: {}", r.text());
    }
    assert_eq!(get(&gw.url("/jwt")).status, 401);
    // RS256, signed by openssl.
    let head = format!(
        "{}.{}",
        b64(br#"{"alg":"RS256","typ":"JWT"}"#),
        b64(format!(r#"{{"key":"rose-key","exp":{}}}"#, now + 60).as_bytes())
    );
    std::fs::write(d.join("jwt-data"), &head).expect("data");
    openssl(
        d,
        &[
            "dgst", "-sha256", "-sign", "rsa.pem", "-out", "jwt-sig", "jwt-data",
        ],
    );
    let sig = std::fs::read(d.join("jwt-sig")).expect("sig");
    let token = format!("{head}.{}", b64(&sig));
    let r = Req::get(&gw.url("/jwt"))
        .header("authorization", &format!("Bearer {token}"))
        .send();
    assert_eq!(r.status, 200, "{}\n{}", r.text(), gw.logs());
    assert_eq!(r.json()["headers"]["x-consumer-username"], "rose");
    let forged = format!(
        "{}.{}.{}",
        b64(br#"{"alg":"RS256","typ":"JWT"}"#),
        b64(br#"{"key":"rose-key","exp":9999999999}"#),
        b64(&sig)
    );
    assert_eq!(
        Req::get(&gw.url("/jwt"))
            .header("authorization", &forged)
            .send()
            .status,
        401
    );
}

/// Drives `resty.roundrobin`, `apisix.balancer.roundrobin`, `apisix.timers` and
/// `apisix.constants` and answers what it saw.
const BALANCE_PROBE: &str = r#"
local core = require("apisix.core")
local rr = require("resty.roundrobin")
local balancer = require("apisix.balancer.roundrobin")
local timers = require("apisix.timers")
local constants = require("apisix.constants")
local ticks = 0
local _M = { version = 0.1, priority = 100, schema = { type = "object" } }
function _M.access(conf, ctx)
    local what = ngx.var.arg_what
    if what == "rr" then
        local p = rr:new({ a = 5, b = 1, c = 1 })
        local seq = {}
        for i = 1, 7 do seq[i] = p:find() end
        local w = rr:new({ x = 1, y = 2, z = 3 })
        local counts = { x = 0, y = 0, z = 0 }
        for _ = 1, 600 do local id = w:find(); counts[id] = counts[id] + 1 end
        w:set("x", 0)
        local after = {}
        for i = 1, 5 do after[i] = w:find() end
        local up = { id = 1 }
        local tables = rr:new({ [up] = 1 })
        return 200, { seq = table.concat(seq), counts = counts, after = table.concat(after),
            table_id = tables:find() == up }
    elseif what == "balancer" then
        local b = balancer.new({ ["127.0.0.1:1"] = 1, ["127.0.0.1:2"] = 1 }, {})
        local c = {}
        local first = b.get(c)
        c.balancer_server = first
        b.after_balance(c, true)
        local second = b.get(c)
        c.balancer_server = second
        b.after_balance(c, true)
        local third, err = b.get(c)
        return 200, { distinct = first ~= second, third = third or false, err = err }
    elseif what == "start" then
        timers.register_timer("probe", function() ticks = ticks + 1 end)
        timers.register_timer("broken", function() error("boom") end)
        return 200, { interval = timers.check_interval() }
    elseif what == "stop" then
        timers.unregister_timer("probe")
        timers.unregister_timer("broken")
        return 200, { ticks = ticks }
    elseif what == "ticks" then
        return 200, { ticks = ticks }
    end
    return 200, { rpc = constants.RPC_HTTP_REQ_CALL, routes = constants.HTTP_ETCD_DIRECTORY["/routes"] }
end
return _M
"#;

/// The APISIX modules plugins use to pick among nodes and to run work in the background:
/// smooth weighted round-robin (nginx's sequence for 5:1:1, exact shares over a full cycle, a
/// weight set to 0 leaves the rotation, tables as ids), the balancer object skipping nodes
/// tried before a retry, and `apisix.timers` running a registered callback every second (a
/// failing one logged, not stopping the others) until it is unregistered.
#[test]
fn balancer_and_timer_modules_work_as_in_apisix() {
    let up = Upstream::echo();
    let routes = format!(
        "  - id: probe\n    uri: /probe\n    plugins:\n      balance-probe: {{}}\n{}",
        upstream_yaml(&up)
    );
    let (_tmp, gw) = gateway_with(&[("balance-probe", BALANCE_PROBE)], &routes);
    let v = get(&gw.url("/probe?what=rr")).json();
    // nginx's smooth sequence for a:5, b:1, c:1 is a a b a c a a (b and c in either order:
    // they tie).
    let seq = v["seq"].as_str().unwrap_or("");
    assert!(seq == "aabacaa" || seq == "aacabaa", "{v}");
    assert_eq!(
        v["counts"],
        serde_json::json!({"x": 100, "y": 200, "z": 300}),
        "{v}"
    );
    assert!(!v["after"].as_str().unwrap_or("x").contains('x'), "{v}");
    assert_eq!(v["table_id"], true, "{v}");
    let v = get(&gw.url("/probe?what=balancer")).json();
    assert_eq!(v["distinct"], true, "{v}");
    assert_eq!(v["third"], false, "{v}");
    assert_eq!(v["err"], "all upstream servers tried", "{v}");
    let v = get(&gw.url("/probe?what=consts")).json();
    assert_eq!(v["rpc"], 2);
    assert_eq!(v["routes"], true);

    assert_eq!(get(&gw.url("/probe?what=start")).json()["interval"], 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut ticks = 0;
    while std::time::Instant::now() < deadline {
        ticks = get(&gw.url("/probe?what=ticks")).json()["ticks"]
            .as_i64()
            .unwrap_or(0);
        if ticks >= 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(ticks >= 2, "the timer ran {ticks} times\n{}", gw.logs());
    assert!(
        gw.wait_for_log("timer [broken] failed", Duration::from_secs(5)),
        "{}",
        gw.logs()
    );
    let stopped = get(&gw.url("/probe?what=stop")).json()["ticks"]
        .as_i64()
        .unwrap_or(0);
    // After unregistering, at most a run already under way lands.
    std::thread::sleep(Duration::from_millis(1500));
    let later = get(&gw.url("/probe?what=ticks")).json()["ticks"]
        .as_i64()
        .unwrap_or(0);
    assert!(
        later <= stopped + 1,
        "still ticking: {stopped} then {later}"
    );
}

/// APISIX's ext-plugin-pre-req, -post-req and -post-resp (APISIX_SRC) against a plugin runner
/// on a unix socket (`ext-plugin.path_for_test`), written with Google's FlatBuffers: a Stop
/// answers for the upstream with the runner's status, headers and body (the runner saw the
/// path, args, source address, method and headers); a Rewrite, after the runner asked for a
/// variable, changes the upstream path, a header and the args and adds a response header; the
/// response call lets the runner replace the upstream's status, headers and body. APISIX's
/// `t/plugin/ext-plugin/*.t` behaviour, restated.
#[test]
fn real_ext_plugins_talk_to_a_runner() {
    let Some(src) = std::env::var_os("APISIX_SRC") else {
        eprintln!("APISIX_SRC is not set: skipping APISIX's ext-plugin-*");
        return;
    };
    let src = PathBuf::from(src);
    let (tmp, dir) = stage_plugin(&src, "ext-plugin-pre-req");
    for f in ["ext-plugin-post-req.lua", "ext-plugin-post-resp.lua"] {
        std::fs::copy(src.join("apisix/plugins").join(f), dir.join(f)).expect("copy plugin");
    }
    copy_tree(
        &src.join("apisix/plugins/ext-plugin"),
        &dir.join("ext-plugin"),
    );
    let runner = common::ext_runner::ExtRunner::start();
    let up = Upstream::echo();
    let conf = |name: &str| format!("{{conf: [{{name: {name}, value: \"{{}}\"}}]}}");
    let yaml = format!(
        "workers: 1\nplugin_dirs:\n  - \"{}\"\next-plugin:\n  path_for_test: \"{}\"\nroutes:\n\
         \x20 - id: stop\n    uri: /stop\n    plugins:\n      ext-plugin-pre-req: {}\n{u}\
         \x20 - id: rw\n    uri: /rw\n    plugins:\n      ext-plugin-post-req: {}\n{u}\
         \x20 - id: resp\n    uri: /resp\n    plugins:\n      ext-plugin-post-resp: {}\n{u}",
        dir.display(),
        runner.socket().display(),
        conf("stop"),
        conf("rewrite"),
        conf("any"),
        u = upstream_yaml(&up)
    );
    let gw = Gateway::start_in(tmp.path(), &yaml);

    let r = Req::get(&gw.url("/stop?k=v"))
        .header("X-Probe", "p1")
        .send();
    assert_eq!(r.status, 403, "{} {}", r.text(), gw.logs());
    assert_eq!(r.text(), "stopped: /stop args=k=v ip=127.0.0.1 hdr=p1");
    assert_eq!(r.header("x-runner-path").as_deref(), Some("/stop"));
    assert_eq!(r.header("x-runner-method").as_deref(), Some("GET"));
    assert_eq!(up.requests(), 0);

    let r = Req::get(&gw.url("/rw?a=1&c=3"))
        .header("X-Drop", "gone")
        .send();
    assert_eq!(r.status, 200, "{} {}", r.text(), gw.logs());
    let j = r.json();
    assert_eq!(j["uri"], "/rewritten?b=2&c=3", "{j}");
    assert_eq!(j["headers"]["x-runner-var"], "127.0.0.1");
    assert!(j["headers"].get("x-drop").is_none(), "{j}");
    assert_eq!(r.header("x-runner-resp").as_deref(), Some("yes"));

    let r = Req::get(&gw.url("/resp")).send();
    assert_eq!(r.status, 201, "{} {}", r.text(), gw.logs());
    assert_eq!(r.text(), "changed: 200");
    assert_eq!(r.header("x-runner-status").as_deref(), Some("200"));
    assert_eq!(
        up.requests(),
        2,
        "the rewrite's request and post-resp's own"
    );
}

/// A temp folder with `plugins/NAME.lua` from the checkout and APISIX's helper modules
/// (`apisix/utils/`) beside it, as a user stages them; returns the folder and `plugins/`.
fn stage_plugin(src: &Path, name: &str) -> (tempfile::TempDir, PathBuf) {
    stage_plugins(src, &[name])
}

/// [`stage_plugin`] for several plugins in one folder.
fn stage_plugins(src: &Path, names: &[&str]) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("plugins");
    std::fs::create_dir_all(&dir).expect("plugins dir");
    for name in names {
        let file = format!("{name}.lua");
        std::fs::copy(src.join("apisix/plugins").join(&file), dir.join(&file))
            .unwrap_or_else(|e| panic!("cannot copy {file}: {e}"));
    }
    copy_tree(&src.join("apisix/utils"), &dir.join("apisix/utils"));
    (tmp, dir)
}

/// The APISIX checkout the `real_` tests read (`APISIX_SRC`), or None after saying that
/// `what` is skipped.
fn apisix_src(what: &str) -> Option<PathBuf> {
    match std::env::var_os("APISIX_SRC") {
        Some(src) => Some(PathBuf::from(src)),
        None => {
            eprintln!("APISIX_SRC is not set: skipping {what}");
            None
        }
    }
}

/// Copies a folder tree.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("folder");
    for e in std::fs::read_dir(from).expect("read folder") {
        let e = e.expect("entry");
        let dest = to.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_tree(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), &dest).expect("copy");
        }
    }
}

/// What a log collector received: target, content type, body.
type Received = std::sync::mpsc::Receiver<(String, String, String)>;

/// An HTTP log collector: each POST's target, content type and body, in arrival order.
fn log_collector() -> (Upstream, Received) {
    let (tx, rx) = std::sync::mpsc::channel::<(String, String, String)>();
    let collector = Upstream::start(move |req| {
        let tx = tx.clone();
        async move {
            use http_body_util::BodyExt;
            let target = req.uri().to_string();
            let ctype = req
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let body = req.into_body().collect().await.expect("body").to_bytes();
            let _ = tx.send((target, ctype, String::from_utf8_lossy(&body).into_owned()));
            hyper::Response::new(full("ok"))
        }
    });
    (collector, rx)
}

/// The next batch a collector received, as JSON entries.
fn next_batch(rx: &Received, gw: &Gateway) -> Vec<serde_json::Value> {
    let (target, ctype, body) = rx
        .recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| panic!("no batch reached the collector\n{}", gw.logs()));
    assert_eq!(target, "/ingest?src=gw");
    assert_eq!(ctype, "application/json");
    // With batch_max_size 1, http-logger sends the entry itself, not an array.
    match serde_json::from_str(&body).expect("a JSON batch") {
        serde_json::Value::Array(entries) => entries,
        entry => vec![entry],
    }
}

/// APISIX's own http-logger (APISIX_SRC) with its batch processor, log-util and net.url: log
/// entries reach a collector the test runs, two at a time when `batch_max_size` fills, the
/// rest after `inactive_timeout` (t/plugin/http-logger*.t).
#[test]
fn real_http_logger_sends_batches_to_a_collector() {
    let Some(src) = std::env::var_os("APISIX_SRC") else {
        eprintln!("APISIX_SRC is not set: skipping APISIX's http-logger");
        return;
    };
    let (tmp, dir) = stage_plugin(&PathBuf::from(src), "http-logger");

    let (collector, rx) = log_collector();
    let up = Upstream::echo();
    let yaml = format!(
        "workers: 1\nplugin_dirs:\n  - \"{}\"\nroutes:\n  - id: hl\n    uri: /log/*\n    plugins:\n      http-logger:\n        uri: \"http://{}/ingest?src=gw\"\n        batch_max_size: 2\n        inactive_timeout: 1\n{}",
        dir.display(),
        collector.addr(),
        upstream_yaml(&up)
    );
    let gw = Gateway::start_in(tmp.path(), &yaml);
    for path in ["/log/a", "/log/b?x=1", "/log/c"] {
        assert_eq!(Req::get(&gw.url(path)).send().status, 200, "{}", gw.logs());
    }
    // The first two fill the batch and go at once.
    let first = next_batch(&rx, &gw);
    assert_eq!(first.len(), 2, "{first:?}");
    assert_eq!(first[0]["request"]["uri"], "/log/a");
    assert_eq!(first[1]["request"]["uri"], "/log/b?x=1");
    assert_eq!(first[1]["request"]["querystring"]["x"], "1");
    for e in &first {
        assert_eq!(e["route_id"], "hl");
        assert_eq!(e["response"]["status"], 200);
        assert_eq!(e["upstream"], up.addr().to_string());
        assert_eq!(e["client_ip"], "127.0.0.1");
    }
    // The third after the batch has been idle for inactive_timeout.
    let second = next_batch(&rx, &gw);
    assert_eq!(second.len(), 1, "{second:?}");
    assert_eq!(second[0]["request"]["uri"], "/log/c");
}

/// An HTTPS log collector on loopback with `pair`'s certificate: each request's target and
/// body go to the channel; every answer is `200 ok` on a kept-alive connection.
fn tls_log_collector(
    pair: &common::tls::Pair,
) -> (u16, std::sync::mpsc::Receiver<(String, String)>) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use std::io::{BufRead, BufReader, Read, Write};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pair.cert.as_bytes())
        .map(|c| c.expect("cert PEM"))
        .collect();
    let key = PrivateKeyDer::from_pem_slice(pair.key.as_bytes()).expect("key PEM");
    let config = std::sync::Arc::new(
        rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server cert"),
    );
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let Ok(conn) = rustls::ServerConnection::new(config.clone()) else {
                continue;
            };
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(rustls::StreamOwned::new(conn, c));
                loop {
                    let mut line = String::new();
                    if !matches!(r.read_line(&mut line), Ok(n) if n > 0) {
                        return;
                    }
                    let target = line.split(' ').nth(1).unwrap_or("").to_string();
                    let mut len = 0usize;
                    loop {
                        let mut h = String::new();
                        if !matches!(r.read_line(&mut h), Ok(n) if n > 0) {
                            return;
                        }
                        if h == "\r\n" {
                            break;
                        }
                        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0u8; len];
                    if r.read_exact(&mut body).is_err() {
                        return;
                    }
                    let _ = tx.send((target, String::from_utf8_lossy(&body).into_owned()));
                    let w = r.get_mut();
                    let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                    if w.write_all(answer).and_then(|_| w.flush()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, rx)
}

/// APISIX's own http-logger (APISIX_SRC) to an `https` collector with `ssl_verify: true`: its
/// `connect` + `ssl_handshake` path over moongate's resty.http and cosocket TLS, the
/// certificate checked against the node's `ssl.ssl_trusted_certificate`; a collector whose CA is
/// not trusted gets nothing and the plugin logs the handshake's error.
#[test]
fn real_http_logger_sends_to_an_https_collector() {
    let Some(src) = std::env::var_os("APISIX_SRC") else {
        eprintln!("APISIX_SRC is not set: skipping APISIX's http-logger over https");
        return;
    };
    let (tmp, dir) = stage_plugin(&PathBuf::from(src), "http-logger");
    let pki = common::tls::Pki::new("collector CA");
    let (port, rx) = tls_log_collector(&pki.server(&["127.0.0.1"], "collector"));
    let rogue = common::tls::Pki::new("untrusted CA");
    let (rogue_port, rogue_rx) = tls_log_collector(&rogue.server(&["127.0.0.1"], "rogue"));
    std::fs::write(tmp.path().join("ca.pem"), &pki.ca_pem).expect("write CA");
    let up = Upstream::echo();
    let route = |id: &str, port: u16| {
        format!(
            "  - id: {id}\n    uri: /{id}/*\n    plugins:\n      http-logger:\n        uri: \"https://127.0.0.1:{port}/ingest?src=tls\"\n        ssl_verify: true\n        batch_max_size: 1\n{}",
            upstream_yaml(&up)
        )
    };
    let yaml = format!(
        "workers: 1\nssl:\n  enable: false\n  ssl_trusted_certificate: ca.pem\nplugin_dirs:\n  - \"{}\"\nroutes:\n{}{}",
        dir.display(),
        route("trusted", port),
        route("rogue", rogue_port),
    );
    let gw = Gateway::start_in(tmp.path(), &yaml);
    for path in ["/trusted/a", "/trusted/b"] {
        assert_eq!(Req::get(&gw.url(path)).send().status, 200, "{}", gw.logs());
        let (target, body) = rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("no entry reached the collector\n{}", gw.logs()));
        assert_eq!(target, "/ingest?src=tls");
        let entry: serde_json::Value = serde_json::from_str(&body).expect("a JSON entry");
        assert_eq!(entry["request"]["uri"], path, "{entry}");
        assert_eq!(entry["route_id"], "trusted");
    }
    assert_eq!(Req::get(&gw.url("/rogue/x")).send().status, 200);
    assert!(
        gw.wait_for_log(
            "20: unable to get local issuer certificate",
            Duration::from_secs(10)
        ),
        "{}",
        gw.logs()
    );
    assert!(
        gw.wait_for_log(
            "failed to perform SSL with host[127.0.0.1]",
            Duration::from_secs(10)
        ),
        "{}",
        gw.logs()
    );
    assert!(
        rogue_rx.try_recv().is_err(),
        "the untrusted collector got an entry"
    );
}

/// APISIX's own body-transformer (APISIX_SRC) with resty.template, xml2lua's parser and
/// xmlhandler.tree: a JSON request becomes a SOAP call upstream and the SOAP answer (or its
/// fault) becomes JSON for the client (docs/en/latest/plugins/body-transformer.md's use case).
#[test]
fn real_body_transformer_turns_json_into_soap_and_back() {
    let Some(src) = std::env::var_os("APISIX_SRC") else {
        eprintln!("APISIX_SRC is not set: skipping APISIX's body-transformer");
        return;
    };
    let (tmp, dir) = stage_plugin(&PathBuf::from(src), "body-transformer");
    // The SOAP service: answers for a city it knows, a fault (with xml:lang on the text)
    // otherwise.
    let soap = Upstream::start(|req| async move {
        use http_body_util::BodyExt;
        let body = req.into_body().collect().await.expect("body").to_bytes();
        let body = String::from_utf8_lossy(&body).into_owned();
        let answer = if body.contains("<q:city>Oslo</q:city>") {
            "<?xml version=\"1.0\"?><env:Envelope xmlns:env=\"urn:env\"><env:Body>\
             <q:lookupResponse xmlns:q=\"urn:q\"><q:place><q:city>Oslo</q:city>\
             <q:people>709000</q:people><q:note>fjords &amp; \"boats\"</q:note></q:place>\
             </q:lookupResponse></env:Body></env:Envelope>"
                .to_string()
        } else {
            format!(
                "<env:Envelope xmlns:env=\"urn:env\"><env:Body><env:Fault>\
                 <faultcode>env:Client</faultcode><faultstring xml:lang=\"en\">no such city \
                 in {} bytes</faultstring></env:Fault></env:Body></env:Envelope>",
                body.len()
            )
        };
        let mut r = hyper::Response::new(full(answer));
        r.headers_mut().insert(
            "content-type",
            hyper::header::HeaderValue::from_static("text/xml; charset=utf-8"),
        );
        r
    });
    let req_template = r#"<?xml version="1.0"?>
<env:Envelope xmlns:env="urn:env"><env:Body>
  <q:lookup xmlns:q="urn:q"><q:city>{{_escape_xml(city)}}</q:city></q:lookup>
</env:Body></env:Envelope>"#;
    let rsp_template = r#"{% local b = Envelope.Body %}
{% if b.Fault == nil then %}
{"city": "{{b.lookupResponse.place.city}}", "people": {{b.lookupResponse.place.people}},
 "note": {*_escape_json(b.lookupResponse.place.note)*}, "status": {{_ctx.var.status}}}
{% else %}
{"error": {*_escape_json(b.Fault.faultstring[1])*}, "code": "{{b.Fault.faultcode}}"}
{% end %}"#;
    let yaml = format!(
        "workers: 1\nplugin_dirs:\n  - \"{}\"\nroutes:\n  - id: soap\n    uri: /lookup\n    plugins:\n      body-transformer:\n        request:\n          input_format: json\n          template: {}\n        response:\n          input_format: xml\n          template: {}\n{}",
        dir.display(),
        serde_json::to_string(req_template).expect("json"),
        serde_json::to_string(rsp_template).expect("json"),
        upstream_yaml(&soap)
    );
    let gw = Gateway::start_in(tmp.path(), &yaml);
    let r = Req::post(&gw.url("/lookup"))
        .header("content-type", "application/json")
        .body(r#"{"city": "Oslo"}"#)
        .send();
    assert_eq!(r.status, 200, "{}\n{}", r.text(), gw.logs());
    let v: serde_json::Value = serde_json::from_str(&r.text())
        .unwrap_or_else(|e| panic!("{e}: {}\n{}", r.text(), gw.logs()));
    assert_eq!(
        v,
        serde_json::json!({"city": "Oslo", "people": 709000, "note": "fjords & \"boats\"", "status": 200})
    );
    // A city the service does not know: its fault, as JSON; the escaped request went out.
    let r = Req::post(&gw.url("/lookup"))
        .header("content-type", "application/json")
        .body(r#"{"city": "<Atlantis>"}"#)
        .send();
    let v: serde_json::Value = serde_json::from_str(&r.text())
        .unwrap_or_else(|e| panic!("{e}: {}\n{}", r.text(), gw.logs()));
    assert_eq!(v["code"], "env:Client", "{v}");
    let err = v["error"].as_str().expect("error text");
    assert!(err.starts_with("no such city in "), "{err}");
}

/// APISIX's own data-mask with its http-logger (APISIX_SRC): data-mask runs first in the log
/// phase and hides a query argument, a header and JSON body fields from the loggers after it
/// (it sets `ctx.var.request_uri`, which the logger reads back, and the body the logger's
/// `include_req_body` reads), while the upstream got them as sent (t/plugin/data-mask.t).
#[test]
fn real_data_mask_hides_fields_from_loggers() {
    let Some(src) = std::env::var_os("APISIX_SRC") else {
        eprintln!("APISIX_SRC is not set: skipping APISIX's data-mask");
        return;
    };
    let src = PathBuf::from(src);
    let (tmp, dir) = stage_plugin(&src, "http-logger");
    std::fs::copy(
        src.join("apisix/plugins/data-mask.lua"),
        dir.join("data-mask.lua"),
    )
    .expect("copy data-mask");
    let (collector, rx) = log_collector();
    let up = Upstream::echo();
    let yaml = format!(
        "workers: 1\nplugin_dirs:\n  - \"{}\"\nroutes:\n  - id: dm\n    uri: /pay\n    plugins:\n      data-mask:\n        request:\n          - {{type: query, name: card, action: regex, regex: \"\\\\d{{12}}(\\\\d{{4}})\", value: \"************$1\"}}\n          - {{type: query, name: cvc, action: remove}}\n          - {{type: header, name: authorization, action: replace, value: \"*****\"}}\n          - {{type: body, body_format: json, name: \"$.users[*].password\", action: replace, value: \"xxx\"}}\n          - {{type: body, body_format: json, name: \"$.note\", action: regex, regex: \"\\\\d{{4}}\", value: \"####\"}}\n      http-logger:\n        uri: \"http://{}/ingest?src=gw\"\n        batch_max_size: 1\n        include_req_body: true\n{}",
        dir.display(),
        collector.addr(),
        upstream_yaml(&up)
    );
    let gw = Gateway::start_in(tmp.path(), &yaml);
    let body = r#"{"users":[{"name":"a","password":"p1"},{"name":"b","password":"p2"}],"note":"pin 1234"}"#;
    let r = Req::post(&gw.url("/pay?card=4111111111111111&cvc=123&keep=1"))
        .header("authorization", "Bearer secret")
        .header("content-type", "application/json")
        .body(body)
        .send();
    assert_eq!(r.status, 200, "{}", gw.logs());
    // The upstream got everything as sent.
    let echoed: serde_json::Value = serde_json::from_str(&r.text()).expect("echo");
    assert_eq!(echoed["uri"], "/pay?card=4111111111111111&cvc=123&keep=1");
    assert_eq!(echoed["headers"]["authorization"], "Bearer secret");
    // The logger saw the masked request.
    let entry = &next_batch(&rx, &gw)[0];
    let req = &entry["request"];
    assert_eq!(
        req["querystring"],
        serde_json::json!({"card": "************1111", "keep": "1"}),
        "{entry}"
    );
    let uri = req["uri"].as_str().expect("uri");
    assert!(
        // ngx.encode_args escapes `*`, as OpenResty's does
        uri.starts_with("/pay?")
            && uri.contains("card=%2A%2A%2A%2A%2A%2A%2A%2A%2A%2A%2A%2A1111")
            && !uri.contains("cvc"),
        "{entry}"
    );
    assert_eq!(req["headers"]["authorization"], "*****", "{entry}");
    assert_eq!(echoed["body_len"], body.len());
    let logged: serde_json::Value =
        serde_json::from_str(req["body"].as_str().expect("the body")).expect("JSON body");
    assert_eq!(logged["users"][0]["password"], "xxx");
    assert_eq!(logged["users"][1]["password"], "xxx");
    assert_eq!(logged["users"][1]["name"], "b");
    assert_eq!(logged["note"], "pin ####");
    assert!(!gw.logs().contains("not changeable"), "{}", gw.logs());
}

/// APISIX's own traffic-split (APISIX_SRC): a matching rule sends the request to a configured
/// upstream by id; otherwise the weights split requests between an inline upstream and the
/// route's own (t/plugin/traffic-split.t).
#[test]
fn real_traffic_split_routes_by_rule_and_weight() {
    let Some(src) = std::env::var_os("APISIX_SRC") else {
        eprintln!("APISIX_SRC is not set: skipping APISIX's traffic-split");
        return;
    };
    let (tmp, dir) = stage_plugin(&PathBuf::from(src), "traffic-split");
    let one = Upstream::text("one");
    let two = Upstream::text("two");
    let three = Upstream::text("three");
    let yaml = format!(
        "workers: 1\nplugin_dirs:\n  - \"{}\"\nupstreams:\n  - id: u2\n    nodes:\n      \"{}\": 1\nroutes:\n  - id: ts\n    uri: /ts\n    plugins:\n      traffic-split:\n        rules:\n          - match:\n              - vars: [[\"arg_name\", \"==\", \"jack\"]]\n            weighted_upstreams:\n              - {{upstream_id: u2, weight: 1}}\n          - weighted_upstreams:\n              - upstream:\n                  type: roundrobin\n                  nodes:\n                    \"{}\": 1\n                weight: 1\n              - weight: 1\n{}",
        dir.display(),
        two.node(),
        three.node(),
        upstream_yaml(&one)
    );
    let gw = Gateway::start_in(tmp.path(), &yaml);
    for _ in 0..3 {
        let r = Req::get(&gw.url("/ts?name=jack")).send();
        assert_eq!((r.status, r.text().as_str()), (200, "two"), "{}", gw.logs());
    }
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..10 {
        let r = Req::get(&gw.url("/ts")).send();
        assert_eq!(r.status, 200, "{}", gw.logs());
        *seen.entry(r.text()).or_insert(0) += 1;
    }
    // Weights 1:1, picked by weighted round-robin: exactly half each.
    assert_eq!(
        seen,
        [("one".to_string(), 5), ("three".to_string(), 5)].into(),
        "{}",
        gw.logs()
    );
}

/// APISIX's own redirect (APISIX_SRC): `http_to_https` sends a plain request to the TLS
/// listener's real port, read from `apisix.ssl.listen` in `core.config.local_conf()`; with
/// `plugin_attr.redirect.https_port` that port wins. Over TLS the request passes.
#[test]
fn real_redirect_http_to_https_uses_the_tls_port() {
    use common::tls::*;
    let Some(src) = std::env::var_os("APISIX_SRC") else {
        eprintln!("APISIX_SRC is not set: skipping APISIX's redirect with http_to_https");
        return;
    };
    let redirect = std::fs::read_to_string(PathBuf::from(src).join("apisix/plugins/redirect.lua"))
        .expect("redirect.lua");
    let pki = Pki::new("redirect CA");
    let a = pki.server(&["a.test"], "a");
    let up = Upstream::echo();
    let yaml = |attr: &str| {
        format!(
            "workers: 1\n{attr}ssl:\n  listen: [{{ip: 127.0.0.1, port: 0}}]\nssls:\n  - id: a\n    snis: [a.test]\n    cert: |\n{}    key: |\n{}routes:\n  - id: r\n    uri: /r\n    plugins:\n      redirect: {{http_to_https: true}}\n    upstream:\n      nodes:\n        \"{}\": 1\n",
            yaml_block(&a.cert, 6),
            yaml_block(&a.key, 6),
            up.node()
        )
    };
    let gw = Gateway::start_with_plugins(&[("redirect", redirect.as_str())], &yaml(""));
    let tls_port = https_addrs(&gw)[0].port();
    let r = Req::get(&gw.url("/r?q=1")).header("host", "a.test").send();
    assert_eq!(r.status, 301, "{}\n{}", r.text(), gw.logs());
    assert_eq!(
        r.header("location").as_deref(),
        Some(format!("https://a.test:{tls_port}/r?q=1").as_str())
    );
    let r = Req::post(&gw.url("/r")).header("host", "a.test").send();
    assert_eq!(r.status, 308);
    let mut conn = tls_connect(
        ([127, 0, 0, 1], tls_port).into(),
        &ClientOpts::new(&pki.ca_pem, "a.test"),
    )
    .expect("connect to the TLS port");
    let r = tls_get(&mut conn, "a.test", "/r?q=1").expect("GET over TLS");
    assert_eq!(r.status, 200, "{}", r.body);
    drop(gw);

    let gw = Gateway::start_with_plugins(
        &[("redirect", redirect.as_str())],
        &yaml("plugin_attr:\n  redirect: {https_port: 8443}\n"),
    );
    let r = Req::get(&gw.url("/r")).header("host", "a.test").send();
    assert_eq!(
        r.header("location").as_deref(),
        Some("https://a.test:8443/r")
    );
}

/// APISIX's own real-ip, client-control and proxy-control (APISIX_SRC), on this project's
/// `resty.apisix.client`: the address from X-Forwarded-For behind a trusted proxy (the
/// upstream's X-Forwarded-For and X-Real-IP follow it), a route's body limit above the node's,
/// and request buffering.
#[test]
fn real_real_ip_client_control_and_proxy_control() {
    let Some(src) = std::env::var_os("APISIX_SRC") else {
        eprintln!(
            "APISIX_SRC is not set: skipping APISIX's real-ip, client-control, proxy-control"
        );
        return;
    };
    let src = PathBuf::from(src);
    let (tmp, dir) = stage_plugin(&src, "real-ip");
    for name in ["client-control", "proxy-control"] {
        let file = format!("{name}.lua");
        std::fs::copy(src.join("apisix/plugins").join(&file), dir.join(&file)).expect("copy");
    }
    let up = Upstream::echo();
    let node = up.node();
    let yaml = format!(
        "workers: 1\nplugin_dirs:\n  - \"{}\"\nproxy:\n  client_max_body_size: 1024\nroutes:\n  - id: ip\n    uri: /ip\n    plugins:\n      real-ip:\n        source: http_x_forwarded_for\n        trusted_addresses: [127.0.0.0/8]\n        recursive: true\n    upstream:\n      nodes:\n        \"{node}\": 1\n  - id: big\n    uri: /big\n    plugins:\n      client-control:\n        max_body_size: 4096\n      proxy-control:\n        request_buffering: true\n    upstream:\n      nodes:\n        \"{node}\": 1\n",
        dir.display(),
    );
    let gw = Gateway::start_in(tmp.path(), &yaml);
    let r = Req::get(&gw.url("/ip"))
        .header("X-Forwarded-For", "198.51.100.9, 127.0.0.5")
        .send();
    assert_eq!(r.status, 200, "{}", gw.logs());
    let h = &r.json()["headers"];
    assert_eq!(h["x-real-ip"], "198.51.100.9", "{h}");
    assert_eq!(
        h["x-forwarded-for"], "198.51.100.9, 127.0.0.5, 198.51.100.9",
        "{h}"
    );

    let post = |len: usize| Req::post(&gw.url("/big")).body(vec![b'a'; len]).send();
    assert_eq!(post(3000).status, 200, "{}", gw.logs());
    assert_eq!(post(5000).status, 413);
    let resp = raw(
        gw.addr(),
        format!(
            "POST /big HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\nbb8\r\n{}\r\n0\r\n\r\n",
            "b".repeat(3000)
        )
        .as_bytes(),
    );
    let r = RawResp::parse(&resp);
    assert_eq!(r.status, 200, "{resp}");
    assert_eq!(r.json()["headers"]["content-length"], "3000");
}

/// APISIX's `gzip` (APISIX_SRC), over `resty.apisix.response.set_gzip`: its `types`,
/// `min_length`, `http_version` and `vary` checks, then nginx's gzip filter.
#[test]
fn real_gzip() {
    use std::io::Read;
    let Some(src) = std::env::var_os("APISIX_SRC") else {
        eprintln!("APISIX_SRC is not set: skipping APISIX's gzip");
        return;
    };
    let src = PathBuf::from(src);
    let (tmp, dir) = stage_plugin(&src, "gzip");
    let page: &'static str = Box::leak("<p>moongate</p>\n".repeat(500).into_boxed_str());
    let up = Upstream::start(move |req| async move {
        let (ctype, body) = match req.uri().path() {
            "/plain" => ("text/plain", page),
            "/tiny" => ("text/html; charset=utf-8", "<p>tiny</p>"),
            _ => ("text/html; charset=utf-8", page),
        };
        let mut res = http::Response::new(full(body));
        res.headers_mut()
            .insert("content-type", ctype.parse().unwrap());
        res.headers_mut()
            .insert("vary", "upstream".parse().unwrap());
        res
    });
    let node = up.node();
    let yaml = format!(
        "workers: 1\nplugin_dirs:\n  - \"{}\"\nroutes:\n  - id: gz\n    uris: [/page, /plain, /tiny]\n    plugins:\n      gzip: {{}}\n    upstream:\n      nodes:\n        \"{node}\": 1\n  - id: vary\n    uri: /vary\n    plugins:\n      gzip:\n        types: \"*\"\n        comp_level: 9\n        vary: true\n    upstream:\n      nodes:\n        \"{node}\": 1\n",
        dir.display(),
    );
    let gw = Gateway::start_in(tmp.path(), &yaml);
    let gz = |path: &str| {
        Req::get(&gw.url(path))
            .header("Accept-Encoding", "gzip")
            .send()
    };
    let gunzip = |body: &[u8]| {
        let mut out = String::new();
        flate2::read::GzDecoder::new(body)
            .read_to_string(&mut out)
            .expect("a gzip stream");
        out
    };
    let r = gz("/page");
    assert_eq!(r.status, 200, "{}", gw.logs());
    assert_eq!(r.header("content-encoding").as_deref(), Some("gzip"));
    assert_eq!(r.header("vary").as_deref(), Some("upstream"));
    assert_eq!(gunzip(&r.body), page);
    // Not in `types` (default text/html), or shorter than min_length (20): as it came.
    for path in ["/plain", "/tiny"] {
        let r = gz(path);
        assert_eq!(r.header("content-encoding"), None, "{path}");
        assert!(r.header("content-length").is_some(), "{path}");
    }
    // http_version 1.1: an HTTP/1.0 request is answered uncompressed.
    let resp = raw(
        gw.addr(),
        b"GET /page HTTP/1.0\r\nHost: t\r\nAccept-Encoding: gzip\r\n\r\n",
    );
    let head = resp.split("\r\n\r\n").next().unwrap().to_ascii_lowercase();
    assert!(!head.contains("content-encoding"), "{head}");
    // `types: "*"` and `vary`: any type, and Vary gets Accept-Encoding after the upstream's.
    let r = gz("/vary");
    assert_eq!(r.header("content-encoding").as_deref(), Some("gzip"));
    let vary: Vec<_> = r
        .headers
        .get_all("vary")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect();
    assert_eq!(vary.join(", "), "upstream, Accept-Encoding");
    assert_eq!(gunzip(&r.body), page);
}

/// A log folder reader in the shape of APISIX's log-rotate and its core modules: `lfs` lists
/// and stats files, `pl.path` builds and cleans the paths (loggly's `join`, aws-lambda's
/// `normpath`).
const FS_PROBE: &str = r#"
local core = require("apisix.core")
local lfs = require("lfs")
local path = require("pl.path")

local _M = { version = 0.1, priority = 7, name = "fs-probe",
             schema = { type = "object", properties = { dir = { type = "string" } } } }

function _M.access(conf, ctx)
    local out = {}
    local names = {}
    for name in lfs.dir(conf.dir) do
        if name ~= "." and name ~= ".." then
            local full = path.join(conf.dir, name)
            names[#names + 1] = name .. ":" .. lfs.attributes(full, "mode") .. ":"
                .. tostring(path.getsize(full))
        end
    end
    table.sort(names)
    out.files = table.concat(names, ",")
    out.made = lfs.mkdir(path.join(conf.dir, "rotated"))
    local _, again = path.mkdir(path.join(conf.dir, "rotated"))
    out.again = again
    out.isdir = path.isdir(path.join(conf.dir, "rotated"))
    local _, missing = lfs.attributes(path.join(conf.dir, "nope"))
    out.missing = missing
    out.norm = path.normpath("/v1/./functions/../functions//f/invocations")
    out.bulk = path.join("127.0.0.1:1", "bulk", "tok", "tag", "bulk")
    out.base, out.ext = path.splitext(path.basename(path.join(conf.dir, "access.log")))
    return 200, out
end

return _M
"#;

/// `lfs` and `pl.path` from a plugin on a real gateway: a folder listed, files stat'ed, a
/// folder made, and the messages LuaFileSystem and Penlight give for a failure.
#[test]
fn file_system_modules_work_as_in_apisix() {
    let logs = tempfile::tempdir().expect("log dir");
    std::fs::write(logs.path().join("access.log"), "12345").expect("write");
    std::fs::write(logs.path().join("error.log"), "").expect("write");
    let d = logs.path().display().to_string();
    let (_tmp, gw) = gateway_with(
        &[("fs-probe", FS_PROBE)],
        &format!("  - id: fs\n    uri: /fs\n    plugins:\n      fs-probe:\n        dir: \"{d}\"\n"),
    );
    let r = Req::get(&gw.url("/fs")).send();
    assert_eq!(r.status, 200, "{}\n{}", r.text(), gw.logs());
    let j = r.json();
    assert_eq!(j["files"], "access.log:file:5,error.log:file:0");
    assert_eq!(j["made"], true);
    assert_eq!(
        j["again"],
        format!("mkdir failed for '{d}/rotated': File exists (code 17)")
    );
    assert_eq!(j["isdir"], true);
    assert!(logs.path().join("rotated").is_dir());
    assert_eq!(
        j["missing"],
        format!("cannot obtain information from file '{d}/nope': No such file or directory")
    );
    assert_eq!(j["norm"], "/v1/functions/f/invocations");
    assert_eq!(j["bulk"], "127.0.0.1:1/bulk/tok/tag/bulk");
    assert_eq!(j["base"], "access");
    assert_eq!(j["ext"], ".log");
}

/// APISIX's own loggly (APISIX_SRC), which builds its bulk endpoint with `pl.path.join`: with
/// `protocol: http` in its metadata, each entry is POSTed to `HOST/bulk/TOKEN/tag/bulk` with
/// the tags in `X-LOGGLY-TAG` (docs/en/latest/plugins/loggly.md).
#[test]
fn real_loggly_posts_bulk_entries_over_http() {
    let Some(src) = std::env::var_os("APISIX_SRC") else {
        eprintln!("APISIX_SRC is not set: skipping APISIX's loggly");
        return;
    };
    let (tmp, dir) = stage_plugin(&PathBuf::from(src), "loggly");
    let (tx, rx) = std::sync::mpsc::channel::<(String, String, String)>();
    let collector = Upstream::start(move |req| {
        let tx = tx.clone();
        async move {
            use http_body_util::BodyExt;
            let target = req.uri().to_string();
            let tag = req
                .headers()
                .get("x-loggly-tag")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let body = req.into_body().collect().await.expect("body").to_bytes();
            let _ = tx.send((target, tag, String::from_utf8_lossy(&body).into_owned()));
            hyper::Response::new(full("ok"))
        }
    });
    let up = Upstream::echo();
    let yaml = format!(
        "workers: 1\nplugin_dirs:\n  - \"{}\"\nplugin_metadata:\n  - id: loggly\n    host: \"{}\"\n    protocol: http\nroutes:\n  - id: lg\n    uri: /lg\n    plugins:\n      loggly:\n        customer_token: tok-123\n        tags: [\"web\"]\n        batch_max_size: 1\n{}",
        dir.display(),
        collector.addr(),
        upstream_yaml(&up)
    );
    let gw = Gateway::start_in(tmp.path(), &yaml);
    assert_eq!(
        Req::get(&gw.url("/lg?x=1")).send().status,
        200,
        "{}",
        gw.logs()
    );
    let (target, tag, body) = rx
        .recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| panic!("no entry reached the collector\n{}", gw.logs()));
    assert_eq!(target, "/bulk/tok-123/tag/bulk");
    assert_eq!(tag, "web");
    let entry: serde_json::Value = serde_json::from_str(body.lines().next().unwrap_or(""))
        .unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(entry["request"]["uri"], "/lg?x=1", "{body}");
    assert_eq!(entry["route_id"], "lg");
}

/// A sign-in plugin in the shape of APISIX's dingtalk-auth and authz-casdoor on
/// `resty.session`: `/login?user=NAME` starts a session and saves the user, any other path
/// reads it back (or says why there is none), `/logout` destroys it. `secret` and
/// `secret_fallbacks` come from the conf, as those plugins pass them.
const SESSION_PROBE: &str = r#"
local core = require("apisix.core")
local session = require("resty.session")

local _M = { version = 0.1, priority = 7, name = "session-probe",
             schema = { type = "object" } }

function _M.access(conf, ctx)
    local opts = { secret = conf.secret, secret_fallbacks = conf.secret_fallbacks,
                   cookie_name = "probe_session", absolute_timeout = conf.absolute_timeout }
    local args = core.request.get_uri_args(ctx)
    if ctx.var.uri == "/s/login" then
        local s, err, exists = session.start(opts)
        s:set("user", args.user)
        s:set("n", 1)
        local ok, save_err = s:save()
        return 200, { ok = ok, save_err = save_err, open_err = err, existed = exists,
                      audience = s:get_audience() }
    end
    local s, err, exists = session.open(opts)
    if ctx.var.uri == "/s/logout" then
        return 200, { destroyed = s:destroy(), existed = exists }
    end
    if not exists then
        return 401, { err = err }
    end
    s:set("n", s:get("n") + 1)
    assert(s:save())
    return 200, { user = s:get("user"), n = s:get("n"), id = #s:get_property("id") }
end

return _M
"#;

/// The `name=value` part of a Set-Cookie header.
fn cookie_pair(set_cookie: &str) -> String {
    set_cookie.split(';').next().unwrap_or("").to_string()
}

/// `resty.session` from a plugin on a real gateway: a session cookie with the library's
/// attributes, read back and updated on the next requests, refused under another secret and
/// accepted through `secret_fallbacks` after a key rotation, tampering refused, destroy
/// expiring the cookie, and `absolute_timeout` ending the session.
#[test]
fn resty_session_keeps_a_sign_in_in_a_sealed_cookie() {
    let route = |id: &str, conf: &str| {
        format!("  - id: {id}\n    uri: /s/*\n    host: {id}.test\n    plugins:\n      session-probe: {conf}\n")
    };
    let routes = route("a", "{secret: first-secret-1}")
        + &route("b", "{secret: second-secret}")
        + &route(
            "c",
            "{secret: second-secret, secret_fallbacks: [first-secret-1]}",
        )
        + &route("t", "{secret: first-secret-1, absolute_timeout: 1}");
    let (_tmp, gw) = gateway_with(&[("session-probe", SESSION_PROBE)], &routes);
    let get = |host: &str, path: &str, cookie: Option<&str>| {
        let mut r = Req::get(&gw.url(path)).header("host", host);
        if let Some(c) = cookie {
            r = r.header("cookie", c);
        }
        r.send()
    };

    let none = get("a.test", "/s/me", None);
    assert_eq!(none.status, 401, "{}", gw.logs());
    assert_eq!(none.json()["err"], "missing session cookie");

    let login = get("a.test", "/s/login?user=alice", None);
    assert_eq!(login.status, 200, "{}\n{}", login.text(), gw.logs());
    assert_eq!(login.json()["ok"], true);
    assert_eq!(login.json()["existed"], false);
    assert_eq!(login.json()["open_err"], "missing session cookie");
    assert_eq!(login.json()["audience"], "default");
    let set = login.header("set-cookie").expect("a session cookie");
    assert!(set.starts_with("probe_session="), "{set}");
    assert!(set.ends_with("; Path=/; SameSite=Lax; HttpOnly"), "{set}");
    let cookie = cookie_pair(&set);
    assert!(!cookie.contains("alice"), "the data is sealed: {cookie}");

    let me = get("a.test", "/s/me", Some(&cookie));
    assert_eq!(me.status, 200, "{}", me.text());
    assert_eq!(me.json()["user"], "alice");
    assert_eq!(me.json()["n"], 2);
    assert_eq!(me.json()["id"], 43, "a 32-byte id in base64url");
    // Every save is a new session id and a new cookie; the new one carries the update.
    let newer = cookie_pair(&me.header("set-cookie").expect("saved again"));
    assert_ne!(newer, cookie);
    assert_eq!(get("a.test", "/s/me", Some(&newer)).json()["n"], 3);

    // Another secret cannot read it; the same secret as a fallback can.
    let other = get("b.test", "/s/me", Some(&cookie));
    assert_eq!(other.status, 401);
    assert_eq!(other.json()["err"], "unable to decrypt session data");
    let rotated = get("c.test", "/s/me", Some(&cookie));
    assert_eq!(rotated.status, 200, "{}", rotated.text());
    assert_eq!(rotated.json()["user"], "alice");

    // A changed byte is refused.
    let (name, value) = cookie.split_once('=').expect("name=value");
    let mut bytes = value.as_bytes().to_vec();
    let last = bytes.len() - 1;
    bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
    let forged = format!("{name}={}", String::from_utf8(bytes).expect("ascii"));
    assert_eq!(get("a.test", "/s/me", Some(&forged)).status, 401);
    assert_eq!(
        get("a.test", "/s/me", Some("probe_session=garbage")).json()["err"],
        "invalid session header"
    );

    let out = get("a.test", "/s/logout", Some(&cookie));
    assert_eq!(out.json()["destroyed"], true);
    let expired = out.header("set-cookie").expect("an expiring cookie");
    assert!(
        expired.starts_with("probe_session=; Expires=Thu, 01 Jan 1970 00:00:01 GMT; Max-Age=0"),
        "{expired}"
    );

    // absolute_timeout: 1 ends the session once more than a second has passed.
    let short = cookie_pair(
        &get("t.test", "/s/login?user=bob", None)
            .header("set-cookie")
            .expect("cookie"),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let err = loop {
        let r = get("t.test", "/s/me", Some(&short));
        if r.status == 401 {
            break r.json()["err"].clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the session never timed out"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(err, "session absolute timeout exceeded");
}

/// APISIX's own dingtalk-auth (APISIX_SRC) against a DingTalk stand-in the test runs (the
/// token and userinfo endpoints of its docs): no code redirects to `redirect_uri`; a code is
/// exchanged for an access token and the user, who reaches the upstream in `X-Userinfo` and
/// is kept in the `dingtalk_session` cookie, so the next request needs no code and no call to
/// DingTalk; a code DingTalk refuses is 401 (t/plugin/dingtalk-auth.t).
#[test]
fn real_dingtalk_auth_signs_in_through_a_session_cookie() {
    use base64::Engine;
    let Some(src) = std::env::var_os("APISIX_SRC") else {
        eprintln!("APISIX_SRC is not set: skipping APISIX's dingtalk-auth");
        return;
    };
    let (tmp, dir) = stage_plugin(&PathBuf::from(src), "dingtalk-auth");
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = calls.clone();
    let idp = Upstream::start(move |req| {
        let seen = seen.clone();
        async move {
            use http_body_util::BodyExt;
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let path = req.uri().path().to_string();
            let query = req.uri().query().unwrap_or("").to_string();
            let body = req.into_body().collect().await.expect("body").to_bytes();
            let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let answer = match path.as_str() {
                "/token" if body["appKey"] == "key-1" && body["appSecret"] == "secret-1" => {
                    serde_json::json!({"accessToken": "at-1", "expireIn": 7200})
                }
                "/userinfo" if query == "access_token=at-1" && body["code"] == "good-code" => {
                    serde_json::json!({"errcode": 0, "errmsg": "ok",
                                       "result": {"userid": "u-42", "name": "Ann"}})
                }
                "/userinfo" => serde_json::json!({"errcode": 40078, "errmsg": "bad code"}),
                _ => serde_json::json!({"error": "unexpected"}),
            };
            hyper::Response::new(full(answer.to_string()))
        }
    });
    let up = Upstream::echo();
    let yaml = format!(
        "workers: 1\nplugin_dirs:\n  - \"{}\"\nroutes:\n  - id: dt\n    uri: /app/*\n    plugins:\n      dingtalk-auth:\n        app_key: key-1\n        app_secret: secret-1\n        secret: session-secret-1\n        redirect_uri: http://sso.example/login\n        access_token_url: http://{}/token\n        userinfo_url: http://{}/userinfo\n{}",
        dir.display(),
        idp.addr(),
        idp.addr(),
        upstream_yaml(&up)
    );
    let gw = Gateway::start_in(tmp.path(), &yaml);

    let r = Req::get(&gw.url("/app/x")).send();
    assert_eq!(r.status, 302, "{}", gw.logs());
    assert_eq!(
        r.header("location").as_deref(),
        Some("http://sso.example/login")
    );

    let r = Req::get(&gw.url("/app/x"))
        .header("x-dingtalk-code", "good-code")
        .header("x-userinfo", "forged")
        .send();
    assert_eq!(r.status, 200, "{}\n{}", r.text(), gw.logs());
    let userinfo = r.json()["headers"]["x-userinfo"]
        .as_str()
        .expect("X-Userinfo upstream")
        .to_string();
    let decode = |b64: &str| -> serde_json::Value {
        serde_json::from_slice(
            &base64::engine::general_purpose::STANDARD
                .decode(b64)
                .expect("base64"),
        )
        .expect("json")
    };
    let user = decode(&userinfo);
    assert_eq!(user["userid"], "u-42");
    assert_eq!(user["name"], "Ann");
    let set = r.header("set-cookie").expect("a session cookie");
    assert!(set.starts_with("dingtalk_session="), "{set}");
    let cookie = cookie_pair(&set);
    let before = calls.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(before, 2, "one token and one userinfo call");

    let r = Req::get(&gw.url("/app/y")).header("cookie", &cookie).send();
    assert_eq!(r.status, 200, "{}", gw.logs());
    let again = r.json()["headers"]["x-userinfo"]
        .as_str()
        .map(decode)
        .expect("X-Userinfo from the session");
    assert_eq!(again, user);
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), before);

    let r = Req::get(&gw.url("/app/x?code=bad-code")).send();
    assert_eq!(r.status, 401, "{}", gw.logs());
    assert_eq!(r.json()["message"], "Invalid authorization code");
}

/// A plugin in the shape of APISIX's log-rotate: it runs commands with `resty.shell` (the
/// request waits; the worker does not) and signals processes with `resty.signal`.
const SHELL_PROBE: &str = r##"
local shell = require("resty.shell")
local signal = require("resty.signal")

local _M = { version = 0.1, priority = 7, name = "shell-probe", schema = { type = "object" } }

-- The first five results as text ("nil" for nil), so the JSON keeps every position.
local function pack(...)
    local out = {}
    for i = 1, 5 do
        out[i] = tostring((select(i, ...)))
    end
    return out
end

function _M.access(conf, ctx)
    local out = {}
    out.fail = pack(shell.run("printf out; printf err >&2; exit 3"))
    out.cat = pack(shell.run({ "cat" }, "piped in", 5000))
    out.slow = pack(shell.run("sleep 5", nil, 100))
    out.big = pack(shell.run("head -c 100 /dev/zero", nil, nil, 10))
    out.spawn = pack(shell.run({ "/nonexistent/tool" }))
    out.killed = pack(shell.run("kill -KILL $$"))
    local me = tonumber((select(2, shell.run("echo $PPID"))))
    out.alive = pack(signal.kill(me, "NONE"))
    out.unknown = pack(signal.kill(me, "NOPE"))
    out.usr1 = signal.signum("USR1")
    -- nginx's $pid is the process the shell's parent is: the gateway's serving process.
    out.pid_is_ours = ctx.var.pid == tostring(me)
    return 200, out
end

return _M
"##;

/// `resty.shell.run`'s five values (exit code, output, stdin, timeout, size limit, a spawn
/// failure, a signal) and `resty.signal` on a real gateway.
#[test]
fn resty_shell_and_signal_run_commands_as_openresty() {
    let (_tmp, gw) = gateway_with(
        &[("shell-probe", SHELL_PROBE)],
        "  - id: sh\n    uri: /sh\n    plugins:\n      shell-probe: {}\n",
    );
    let r = Req::get(&gw.url("/sh")).send();
    assert_eq!(r.status, 200, "{}\n{}", r.text(), gw.logs());
    let j = r.json();
    let at = |k: &str, i: usize| j[k][i - 1].as_str().unwrap_or("?").to_string();
    assert_eq!(at("fail", 1), "false");
    assert_eq!(at("fail", 2), "out");
    assert_eq!(at("fail", 3), "err");
    assert_eq!(at("fail", 4), "exit");
    assert_eq!(at("fail", 5), "3");
    assert_eq!(at("cat", 1), "true");
    assert_eq!(at("cat", 2), "piped in");
    assert_eq!(at("cat", 4), "exit");
    assert_eq!(at("cat", 5), "0");
    assert_eq!(at("slow", 1), "nil");
    assert!(
        j["slow"]
            .to_string()
            .contains("failed to wait for process: timeout"),
        "{}",
        j["slow"]
    );
    assert!(
        j["big"]
            .to_string()
            .contains("failed to read stdout: too much data"),
        "{}",
        j["big"]
    );
    assert!(
        j["spawn"]
            .to_string()
            .contains("failed to spawn: No such file or directory"),
        "{}",
        j["spawn"]
    );
    assert_eq!(at("killed", 1), "false");
    assert_eq!(at("killed", 4), "signal");
    assert_eq!(at("killed", 5), "9");
    assert_eq!(at("alive", 1), "true");
    assert!(
        j["unknown"].to_string().contains("unknown signal name"),
        "{}",
        j["unknown"]
    );
    assert_eq!(j["usr1"], 10);
    assert_eq!(j["pid_is_ours"], true);
}

/// A TCP log server on loopback: everything each connection sends, as text, in order.
fn tcp_log_server() -> (std::net::SocketAddr, std::sync::mpsc::Receiver<String>) {
    use std::io::Read;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming().take(16) {
            let Ok(mut conn) = conn else { return };
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0
                        || tx
                            .send(String::from_utf8_lossy(&buf[..n]).into_owned())
                            .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (addr, rx)
}

/// Waits for the server to have received text containing every one of `parts`.
fn received_all(rx: &std::sync::mpsc::Receiver<String>, parts: &[&str], gw: &Gateway) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut got = String::new();
    while !parts.iter().all(|p| got.contains(p)) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(s) => got.push_str(&s),
            Err(_) => panic!(
                "the log server got {got:?}, not all of {parts:?}\n{}",
                gw.logs()
            ),
        }
    }
    got
}

/// A logger plugin on `resty.logger.socket`, as APISIX's syslog uses it: one logger per
/// conf, a message per request in the log phase, buffered up to `flush_limit`.
const LOGGER_SOCKET_PROBE: &str = r#"
local logger_socket = require("resty.logger.socket")

local _M = { version = 0.1, priority = 7, name = "logsock-probe",
             schema = { type = "object" } }

local loggers = {}

function _M.access(conf, ctx)
    local _, bad = logger_socket:new({ flush_limit = 10, drop_limit = 5, host = "h", port = 1 })
    local _, none = logger_socket:new({ flush_limit = 1 })
    local _, port = logger_socket:new({ host = "127.0.0.1", port = 70000 })
    return 200, { bad = bad, none = none, port = port }
end

function _M.log(conf, ctx)
    local logger = loggers[conf.port]
    if not logger then
        logger = assert(logger_socket:new({ host = "127.0.0.1", port = conf.port,
                                             flush_limit = conf.flush_limit,
                                             sock_type = conf.sock_type }))
        loggers[conf.port] = logger
    end
    assert(logger:initted())
    local bytes, err = logger:log("line " .. ctx.var.uri .. "\n")
    if not bytes then
        ngx.log(ngx.ERR, "log failed: ", err)
    end
end

return _M
"#;

/// `resty.logger.socket` on a real gateway: its option checks, and messages buffered until
/// `flush_limit` and then sent in order to a TCP log server.
#[test]
fn resty_logger_socket_buffers_and_sends_to_a_log_server() {
    let (addr, rx) = tcp_log_server();
    let (_tmp, gw) = gateway_with(
        &[("logsock-probe", LOGGER_SOCKET_PROBE)],
        &format!(
            "  - id: ls\n    uri: /ls/*\n    plugins:\n      logsock-probe:\n        port: {}\n        flush_limit: 20\n",
            addr.port()
        ),
    );
    let r = Req::get(&gw.url("/ls/check")).send();
    assert_eq!(r.status, 200, "{}", gw.logs());
    let j = r.json();
    assert_eq!(j["bad"], "\"flush_limit\" should be < \"drop_limit\"");
    assert_eq!(
        j["none"],
        "no logging server configured. \"host\"/\"port\" or \"path\" is required."
    );
    assert_eq!(j["port"], "\"port\" out of range 0~65535");
    // "line /ls/check\n" (15 bytes) stays under flush_limit 20; the next one makes it flush.
    assert_eq!(Req::get(&gw.url("/ls/a")).send().status, 200);
    let got = received_all(&rx, &["line /ls/check\n", "line /ls/a\n"], &gw);
    assert!(got.starts_with("line /ls/check\nline /ls/a\n"), "{got:?}");
}

/// APISIX's own syslog (APISIX_SRC) with its batch processor and rfc5424 encoder: each
/// request's entry reaches a TCP syslog server the test runs as an RFC 5424 line carrying the
/// JSON log entry (docs/en/latest/plugins/syslog.md).
#[test]
fn real_syslog_sends_rfc5424_lines_over_tcp() {
    let Some(src) = std::env::var_os("APISIX_SRC") else {
        eprintln!("APISIX_SRC is not set: skipping APISIX's syslog");
        return;
    };
    let src = PathBuf::from(src);
    let (tmp, dir) = stage_plugin(&src, "syslog");
    copy_tree(&src.join("apisix/plugins/syslog"), &dir.join("syslog"));
    let (addr, rx) = tcp_log_server();
    let up = Upstream::echo();
    let yaml = format!(
        "workers: 1\nplugin_dirs:\n  - \"{}\"\nroutes:\n  - id: sl\n    uri: /sl\n    plugins:\n      syslog:\n        host: 127.0.0.1\n        port: {}\n        flush_limit: 1\n        batch_max_size: 1\n{}",
        dir.display(),
        addr.port(),
        upstream_yaml(&up)
    );
    let gw = Gateway::start_in(tmp.path(), &yaml);
    assert_eq!(
        Req::get(&gw.url("/sl?k=v")).send().status,
        200,
        "{}",
        gw.logs()
    );
    let got = received_all(&rx, &["\"route_id\":\"sl\"", "/sl?k=v"], &gw);
    // <PRI>VERSION TIMESTAMP HOST APP PROCID MSGID - MSG; SYSLOG (5) * 8 + INFO (6) = 46.
    assert!(got.starts_with("<46>1 "), "{got:?}");
    assert!(got.contains(" apisix "), "{got:?}");
}

/// A plugin for a breakpoint: line 6 (`local marker = ...`) is where the hooks file stops.
const BREAKPOINT_PROBE: &str = r#"local core = require("apisix.core")
local _M = { version = 0.1, priority = 7, name = "bp-probe", schema = { type = "object" } }

function _M.access(conf, ctx)
    local marker = "seen " .. ctx.var.uri
    return 200, { marker = marker }
end

return _M
"#;

/// APISIX's own inspect plugin and its `apisix.inspect` debugger (APISIX_SRC), staged by
/// `moongate plugins import`: the hooks file named in `plugin_attr.inspect` sets a one-shot
/// breakpoint in a plugin's function, whose handler sees the function's locals; the hook is
/// removed after it fired (docs/en/latest/plugins/inspect.md).
#[test]
fn real_inspect_sets_a_breakpoint_from_its_hooks_file() {
    let Some(src) = std::env::var_os("APISIX_SRC") else {
        eprintln!("APISIX_SRC is not set: skipping APISIX's inspect");
        return;
    };
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("plugins");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_moongate"))
        .arg("plugins")
        .arg("import")
        .arg(&src)
        .arg("inspect")
        .arg("--to")
        .arg(&dir)
        .output()
        .expect("run moongate plugins import");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        dir.join("apisix/inspect/init.lua").is_file(),
        "apisix.inspect staged"
    );
    assert!(
        dir.join("apisix/inspect/dbg.lua").is_file(),
        "apisix.inspect.dbg staged"
    );
    std::fs::write(dir.join("bp-probe.lua"), BREAKPOINT_PROBE).expect("write");
    let hooks = tmp.path().join("hooks.lua");
    std::fs::write(
        &hooks,
        r#"local dbg = require("apisix.inspect.dbg")
dbg.set_hook("bp-probe.lua", 6, require("apisix.plugins.bp-probe").access, function(info)
    ngx.log(ngx.WARN, "inspect hit: uri=", info.vals.ctx.var.uri)
    return true
end)
"#,
    )
    .expect("write hooks");
    let yaml = format!(
        "workers: 1\nplugin_dirs:\n  - plugins\nplugins:\n  - inspect\n  - bp-probe\nplugin_attr:\n  inspect:\n    delay: 1\n    hooks_file: \"{}\"\nroutes:\n  - id: bp\n    uri: /bp/*\n    plugins:\n      bp-probe: {{}}\n",
        hooks.display()
    );
    let gw = Gateway::start_in(tmp.path(), &yaml);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !gw.logs().contains(r#"hooks: ["bp-probe.lua#6"]"#) {
        assert!(
            std::time::Instant::now() < deadline,
            "hooks never set\n{}",
            gw.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let r = Req::get(&gw.url("/bp/one")).send();
    assert_eq!(r.status, 200, "{}", gw.logs());
    assert_eq!(r.json()["marker"], "seen /bp/one");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !gw.logs().contains("inspect hit: uri=/bp/one") {
        assert!(
            std::time::Instant::now() < deadline,
            "no breakpoint hit\n{}",
            gw.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // One-shot: the second request runs without the breakpoint.
    assert_eq!(Req::get(&gw.url("/bp/two")).send().status, 200);
    assert!(
        !gw.logs().contains("inspect hit: uri=/bp/two"),
        "{}",
        gw.logs()
    );
}

/// A plugin in the shape of APISIX's ai-proxy: it reads its endpoint with `socket.url`, calls
/// the upstream itself, answers from access, and reports the call with
/// `resty.apisix.upstream` so the request's upstream variables (access log, loggers) show it.
const UPSTREAM_STATE_PROBE: &str = r#"
local core = require("apisix.core")
local url = require("socket.url")
local http = require("resty.http")
local apisix_upstream = require("resty.apisix.upstream")

local _M = { version = 0.1, priority = 7, name = "upstate-probe",
             schema = { type = "object", properties = { endpoint = { type = "string" } } } }

function _M.access(conf, ctx)
    local u = url.parse(conf.endpoint)
    local addr = u.host .. ":" .. u.port
    local t0 = ngx.now()
    local res, err = http.new():request_uri(conf.endpoint, { method = "GET" })
    if not res then
        return 502, { err = err }
    end
    local _, bad = apisix_upstream.push_upstream_state({ addr = 1 })
    assert(apisix_upstream.push_upstream_state({ addr = addr, status = res.status }))
    assert(apisix_upstream.update_upstream_state({ response_time = 1250 }))
    return 200, { path = u.path, query = u.query, bad = bad }
end

function _M.header_filter(conf, ctx)
    core.response.set_header("X-Up", ngx.var.upstream_addr .. " " .. ngx.var.upstream_status
                             .. " " .. ngx.var.upstream_response_time)
end

return _M
"#;

/// `socket.url` and `resty.apisix.upstream` on a real gateway: a plugin's own upstream call
/// shows in `$upstream_addr`, `$upstream_status` and `$upstream_response_time`.
#[test]
fn a_plugins_own_upstream_call_shows_in_the_upstream_variables() {
    let up = Upstream::echo();
    let (_tmp, gw) = gateway_with(
        &[("upstate-probe", UPSTREAM_STATE_PROBE)],
        &format!(
            "  - id: us\n    uri: /us\n    plugins:\n      upstate-probe:\n        endpoint: \"http://{}/v1/chat?model=m\"\n",
            up.addr()
        ),
    );
    let r = Req::get(&gw.url("/us")).send();
    assert_eq!(r.status, 200, "{}\n{}", r.text(), gw.logs());
    assert_eq!(r.json()["path"], "/v1/chat");
    assert_eq!(r.json()["query"], "model=m");
    assert_eq!(r.json()["bad"], "addr must be a string");
    assert_eq!(
        r.header("x-up").as_deref(),
        Some(format!("{} 200 1.250", up.addr()).as_str())
    );
}

/// The staged third-party Lua libraries (`MOONGATE_LUA_LIBS`: a folder made by
/// `scripts/stage-lua-libs` or a luarocks tree's `share/lua/5.1`), as `lua.package_path` YAML.
fn third_party_lua_path() -> Option<String> {
    let dir = std::env::var_os("MOONGATE_LUA_LIBS")?;
    let dir = PathBuf::from(dir);
    Some(format!(
        "lua:\n  package_path:\n    - \"{0}/?.lua\"\n    - \"{0}/?/init.lua\"\n",
        dir.display()
    ))
}

/// An OpenLDAP server (Debian's slapd) on a loopback port with `dc=example,dc=org`: users
/// `user01`/`password1` and `user02`/`password2` under `ou=users`. Killed when dropped.
struct Slapd {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Slapd {
    fn start() -> Option<Slapd> {
        if !Path::new("/usr/sbin/slapd").is_file() {
            return None;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let d = dir.path();
        std::fs::create_dir_all(d.join("db")).expect("db dir");
        std::fs::write(
            d.join("slapd.conf"),
            format!(
                "include /etc/ldap/schema/core.schema\ninclude /etc/ldap/schema/cosine.schema\n\
                 include /etc/ldap/schema/inetorgperson.schema\npidfile {0}/slapd.pid\n\
                 modulepath /usr/lib/ldap\nmoduleload back_mdb\ndatabase mdb\n\
                 suffix \"dc=example,dc=org\"\nrootdn \"cn=admin,dc=example,dc=org\"\n\
                 rootpw secret\ndirectory {0}/db\n",
                d.display()
            ),
        )
        .expect("slapd.conf");
        let mut ldif = String::from(
            "dn: dc=example,dc=org\nobjectClass: dcObject\nobjectClass: organization\no: example\n\
             dc: example\n\ndn: ou=users,dc=example,dc=org\nobjectClass: organizationalUnit\n\
             ou: users\n",
        );
        for (user, pw) in [("user01", "password1"), ("user02", "password2")] {
            ldif.push_str(&format!(
                "\ndn: cn={user},ou=users,dc=example,dc=org\nobjectClass: inetOrgPerson\n\
                 cn: {user}\nsn: {user}\nuid: {user}\nuserPassword: {pw}\n"
            ));
        }
        std::fs::write(d.join("data.ldif"), ldif).expect("ldif");
        let st = std::process::Command::new("/usr/sbin/slapadd")
            .arg("-f")
            .arg(d.join("slapd.conf"))
            .arg("-l")
            .arg(d.join("data.ldif"))
            .output()
            .expect("run slapadd");
        assert!(
            st.status.success(),
            "slapadd: {}",
            String::from_utf8_lossy(&st.stderr)
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("free port")
            .local_addr()
            .expect("addr")
            .port();
        // -d keeps it in the foreground, so the child is the server.
        let child = std::process::Command::new("/usr/sbin/slapd")
            .args(["-d", "0", "-f"])
            .arg(d.join("slapd.conf"))
            .args(["-h", &format!("ldap://127.0.0.1:{port}/")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start slapd");
        let s = Slapd {
            child,
            port,
            _dir: dir,
        };
        assert!(
            common::health::poll_until(Duration::from_secs(10), || {
                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            }),
            "slapd did not listen on {port}"
        );
        Some(s)
    }
}

impl Drop for Slapd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// APISIX's own ldap-auth (APISIX_SRC) with lua-resty-ldap (MOONGATE_LUA_LIBS), Debian's LPeg
/// and moongate's `lua_pack` against a real OpenLDAP server: a consumer's user binds with its
/// password and reaches the upstream; a wrong password, a directory user with no consumer, no
/// credentials and an undecodable header are 401 with the plugin's messages and its
/// `WWW-Authenticate` realm; `hide_credentials` keeps the password from the upstream
/// (t/plugin/ldap-auth.t, restated).
#[test]
fn real_ldap_auth_binds_against_openldap() {
    let Some(src) = std::env::var_os("APISIX_SRC") else {
        eprintln!("APISIX_SRC is not set: skipping APISIX's ldap-auth");
        return;
    };
    let Some(lua) = third_party_lua_path() else {
        eprintln!(
            "MOONGATE_LUA_LIBS is not set: skipping APISIX's ldap-auth (needs lua-resty-ldap)"
        );
        return;
    };
    let Some(ldap) = Slapd::start() else {
        eprintln!("no /usr/sbin/slapd (Debian package slapd): skipping APISIX's ldap-auth");
        return;
    };
    let (tmp, dir) = stage_plugin(&PathBuf::from(src), "ldap-auth");
    let up = Upstream::echo();
    let u = upstream_yaml(&up);
    let conf = |hide: bool| {
        format!(
            "      ldap-auth:\n        base_dn: \"ou=users,dc=example,dc=org\"\n        ldap_uri: \"127.0.0.1:{}\"\n        uid: cn\n        hide_credentials: {hide}\n",
            ldap.port
        )
    };
    let yaml = format!(
        "workers: 1\nplugin_dirs:\n  - \"{}\"\n{lua}consumers:\n  - username: user01\n    plugins:\n      ldap-auth:\n        user_dn: \"cn=user01,ou=users,dc=example,dc=org\"\nroutes:\n  - id: ldap\n    uri: /hello\n    plugins:\n{}{u}  - id: hidden\n    uri: /hidden\n    plugins:\n{}{u}",
        dir.display(),
        conf(false),
        conf(true),
    );
    let gw = Gateway::start_in(tmp.path(), &yaml);
    use base64::Engine;
    let basic = |user: &str, pw: &str| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}"))
        )
    };

    let r = Req::get(&gw.url("/hello"))
        .header("Authorization", &basic("user01", "password1"))
        .send();
    assert_eq!(r.status, 200, "{}\n{}", r.text(), gw.logs());
    assert_eq!(
        r.json()["headers"]["authorization"],
        basic("user01", "password1")
    );

    let r = Req::get(&gw.url("/hidden"))
        .header("Authorization", &basic("user01", "password1"))
        .send();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.json()["headers"].get("authorization").is_none(),
        "{}",
        r.text()
    );

    let denied = |auth: Option<&str>, message: &str| {
        let mut req = Req::get(&gw.url("/hello"));
        if let Some(a) = auth {
            req = req.header("Authorization", a);
        }
        let r = req.send();
        assert_eq!(r.status, 401, "{auth:?}: {}", r.text());
        assert_eq!(r.json()["message"], message, "{auth:?}");
        assert_eq!(
            r.header("www-authenticate").as_deref(),
            Some("Basic realm=\"ldap\""),
            "{auth:?}"
        );
    };
    denied(None, "Missing authorization in request");
    denied(
        Some(&basic("user01", "wrong")),
        "Invalid user authorization",
    );
    // In the directory, but no consumer has that user_dn.
    denied(
        Some(&basic("user02", "password2")),
        "Invalid user authorization",
    );
    denied(Some("Basic !!!"), "Invalid authorization in request");
}

/// APISIX's own zipkin (APISIX_SRC) with the opentracing library it uses (opentracing-openresty,
/// MOONGATE_LUA_LIBS): the upstream gets B3 headers continuing the client's trace, and a
/// collector the test runs receives the request's spans as Zipkin v2 JSON (the request span
/// with its method, URL and status, the proxy and response spans as its children, all in the
/// client's trace), sent by the plugin's batch processor (t/plugin/zipkin.t, restated).
#[test]
fn real_zipkin_reports_spans_to_a_collector() {
    let Some(src) = std::env::var_os("APISIX_SRC") else {
        eprintln!("APISIX_SRC is not set: skipping APISIX's zipkin");
        return;
    };
    let Some(lua) = third_party_lua_path() else {
        eprintln!("MOONGATE_LUA_LIBS is not set: skipping APISIX's zipkin (needs opentracing)");
        return;
    };
    let src = PathBuf::from(src);
    let (tmp, dir) = stage_plugin(&src, "zipkin");
    copy_tree(&src.join("apisix/plugins/zipkin"), &dir.join("zipkin"));
    let (collector, rx) = log_collector();
    let up = Upstream::echo();
    let yaml = format!(
        "workers: 1\nplugin_dirs:\n  - \"{}\"\n{lua}routes:\n  - id: z\n    uri: /traced\n    plugins:\n      zipkin:\n        endpoint: \"http://{}/api/v2/spans\"\n        sample_ratio: 1\n        service_name: gateway-under-test\n{}",
        dir.display(),
        collector.addr(),
        upstream_yaml(&up)
    );
    let gw = Gateway::start_in(tmp.path(), &yaml);
    let trace = "80f198ee56343ba864fe8b2a57d3eff7";
    let parent = "e457b5a2e4d86bd1";
    let r = Req::get(&gw.url("/traced?q=1"))
        .header("x-b3-traceid", trace)
        .header("x-b3-spanid", parent)
        .header("x-b3-sampled", "1")
        .send();
    assert_eq!(r.status, 200, "{}\n{}", r.text(), gw.logs());
    let h = &r.json()["headers"];
    assert_eq!(h["x-b3-traceid"], trace, "{h}");
    assert_eq!(h["x-b3-sampled"], "1", "{h}");
    let sent_span = h["x-b3-spanid"].as_str().unwrap_or_default().to_string();
    assert_eq!(sent_span.len(), 16, "{h}");
    assert_ne!(sent_span, parent, "{h}");

    // The batch goes when it has been idle for the processor's inactive_timeout (5 s).
    let (target, ctype, body) = rx
        .recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("no spans reached the collector\n{}", gw.logs()));
    assert_eq!(target, "/api/v2/spans");
    assert_eq!(ctype, "application/json");
    let spans: Vec<serde_json::Value> = match serde_json::from_str(&body).expect("JSON spans") {
        serde_json::Value::Array(a) => a,
        one => vec![one],
    };
    let named = |name: &str| {
        spans
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("no {name} span in {body}"))
    };
    let request = named("apisix.request");
    assert_eq!(request["traceId"], trace, "{request}");
    assert_eq!(request["parentId"], parent, "{request}");
    assert_eq!(request["kind"], "SERVER", "{request}");
    assert_eq!(
        request["localEndpoint"]["serviceName"],
        "gateway-under-test"
    );
    assert_eq!(request["tags"]["http.method"], "GET", "{request}");
    assert_eq!(request["tags"]["http.url"], "/traced?q=1", "{request}");
    assert_eq!(request["tags"]["http.status_code"], "200", "{request}");
    assert_eq!(request["remoteEndpoint"]["ipv4"], "127.0.0.1", "{request}");
    assert!(request["duration"].as_u64().is_some(), "{request}");
    for child in ["apisix.proxy", "apisix.response_span"] {
        let s = named(child);
        assert_eq!(s["traceId"], trace, "{s}");
        assert_eq!(s["parentId"], request["id"], "{s}");
    }
    // The upstream was told the proxy span's id.
    assert_eq!(named("apisix.proxy")["id"], sent_span.as_str());
}

/// APISIX's own skywalking (APISIX_SRC) with skywalking-nginx-lua (MOONGATE_LUA_LIBS) against
/// an OAP stand-in the test runs (it answers 200 to the agent's HTTP reports): the upstream
/// gets an `sw8` header for the trace, and the collector receives the instance's properties
/// with the service and instance names from `plugin_attr`, then the request's segment (an entry
/// span for the URI and an exit span to the upstream with its status, both with APISIX's
/// component id 6002, set in `delayed_body_filter`) (t/plugin/skywalking.t, restated).
#[test]
fn real_skywalking_reports_segments_to_a_collector() {
    let Some(src) = std::env::var_os("APISIX_SRC") else {
        eprintln!("APISIX_SRC is not set: skipping APISIX's skywalking");
        return;
    };
    let Some(lua) = third_party_lua_path() else {
        eprintln!("MOONGATE_LUA_LIBS is not set: skipping APISIX's skywalking (needs skywalking-nginx-lua)");
        return;
    };
    let (tmp, dir) = stage_plugin(&PathBuf::from(src), "skywalking");
    let (collector, rx) = log_collector();
    let up = Upstream::echo();
    let yaml = format!(
        "workers: 1\nplugin_dirs:\n  - \"{}\"\n{lua}plugin_attr:\n  skywalking:\n    service_name: gw-under-test\n    service_instance_name: instance-1\n    endpoint_addr: \"http://{}\"\n    report_interval: 1\nroutes:\n  - id: sw\n    uri: /sky\n    plugins:\n      skywalking:\n        sample_ratio: 1\n{}",
        dir.display(),
        collector.addr(),
        upstream_yaml(&up)
    );
    let gw = Gateway::start_in(tmp.path(), &yaml);
    let r = Req::get(&gw.url("/sky")).send();
    assert_eq!(r.status, 200, "{}\n{}", r.text(), gw.logs());
    let sw8 = r.json()["headers"]["sw8"]
        .as_str()
        .unwrap_or_else(|| panic!("no sw8 header upstream: {}", r.text()))
        .to_string();
    // sw8: sample-traceId-segmentId-spanId-service-instance-endpoint-target, base64 parts.
    assert!(sw8.starts_with("1-"), "{sw8}");
    assert_eq!(sw8.split('-').count(), 8, "{sw8}");

    let mut properties = None;
    let mut segments = None;
    let end = std::time::Instant::now() + Duration::from_secs(20);
    while (properties.is_none() || segments.is_none()) && std::time::Instant::now() < end {
        let Ok((target, _ctype, body)) = rx.recv_timeout(Duration::from_secs(1)) else {
            continue;
        };
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        match target.as_str() {
            "/v3/management/reportProperties" => properties = Some(v),
            "/v3/segments" => segments = Some(v),
            _ => {}
        }
    }
    let properties =
        properties.unwrap_or_else(|| panic!("no instance properties reported\n{}", gw.logs()));
    assert_eq!(properties["service"], "gw-under-test", "{properties}");
    assert_eq!(properties["serviceInstance"], "instance-1", "{properties}");
    let segments = segments.unwrap_or_else(|| panic!("no segments reported\n{}", gw.logs()));
    let segment = &segments[0];
    assert_eq!(segment["service"], "gw-under-test", "{segment}");
    assert_eq!(segment["serviceInstance"], "instance-1", "{segment}");
    let spans = segment["spans"].as_array().expect("spans");
    let entry = spans
        .iter()
        .find(|s| s["spanType"] == "Entry")
        .unwrap_or_else(|| panic!("no entry span: {segment}"));
    assert_eq!(entry["operationName"], "/sky", "{entry}");
    assert_eq!(entry["componentId"], 6002, "{entry}");
    let exit = spans
        .iter()
        .find(|s| s["spanType"] == "Exit")
        .unwrap_or_else(|| panic!("no exit span: {segment}"));
    assert_eq!(exit["componentId"], 6002, "{exit}");
    // APISIX starts the tracer with this peer name, not the node's address.
    assert_eq!(exit["peer"], "upstream service", "{exit}");
    assert_eq!(exit["tags"][0]["key"], "http.status_code", "{exit}");
    assert_eq!(exit["tags"][0]["value"], 200, "{exit}");
}

/// An OpenID provider the test runs: a discovery document naming its own endpoints (by the
/// `Host` it is asked with) and an RFC 7662 introspection endpoint for which `good` is an active
/// token (`sub` jack, `scope` "read write") and any other is not, and `jwks` at its `jwks_uri`.
/// Each introspection's Authorization header and form body go to the channel.
fn oidc_provider(
    jwks: serde_json::Value,
) -> (Upstream, std::sync::mpsc::Receiver<(String, String)>) {
    let (tx, rx) = std::sync::mpsc::channel::<(String, String)>();
    let provider = Upstream::start(move |req| {
        let tx = tx.clone();
        let jwks = jwks.clone();
        async move {
            use http_body_util::BodyExt;
            let host = req
                .headers()
                .get("host")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let auth = req
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let path = req.uri().path().to_string();
            let body = req.into_body().collect().await.expect("body").to_bytes();
            let body = String::from_utf8_lossy(&body).into_owned();
            let json = match path.as_str() {
                "/.well-known/openid-configuration" => serde_json::json!({
                    "issuer": format!("http://{host}"),
                    "authorization_endpoint": format!("http://{host}/authorize"),
                    "token_endpoint": format!("http://{host}/token"),
                    "introspection_endpoint": format!("http://{host}/introspect"),
                    "jwks_uri": format!("http://{host}/jwks"),
                }),
                "/jwks" => jwks,
                "/introspect" => {
                    let active = body.split('&').any(|kv| kv == "token=good");
                    let _ = tx.send((auth, body));
                    if active {
                        serde_json::json!({"active": true, "sub": "jack", "scope": "read write",
                                           "client_id": "gw-client"})
                    } else {
                        serde_json::json!({"active": false})
                    }
                }
                _ => {
                    let mut r = hyper::Response::new(full("not found"));
                    *r.status_mut() = hyper::StatusCode::NOT_FOUND;
                    return r;
                }
            };
            let mut r = hyper::Response::new(full(json.to_string()));
            r.headers_mut().insert(
                "content-type",
                hyper::header::HeaderValue::from_static("application/json"),
            );
            r
        }
    });
    (provider, rx)
}

/// APISIX's own openid-connect (APISIX_SRC) with lua-resty-openidc (MOONGATE_LUA_LIBS) and
/// moongate's resty.http, resty.session and resty.jwt, as a bearer-only resource server
/// against an OpenID provider the test runs: the discovery document is read, a bearer token is
/// introspected with the client's credentials (client_secret_basic), an active one reaches the
/// upstream with `X-Access-Token` and `X-Userinfo`, an inactive one and a missing one are 401
/// with a `Bearer` challenge, and a token without the route's required scope is 403
/// (t/plugin/openid-connect*.t, restated).
#[test]
fn real_openid_connect_introspects_bearer_tokens() {
    let Some(src) = std::env::var_os("APISIX_SRC") else {
        eprintln!("APISIX_SRC is not set: skipping APISIX's openid-connect");
        return;
    };
    let Some(lua) = third_party_lua_path() else {
        eprintln!("MOONGATE_LUA_LIBS is not set: skipping APISIX's openid-connect (needs lua-resty-openidc)");
        return;
    };
    let (tmp, dir) = stage_plugin(&PathBuf::from(src), "openid-connect");
    let (idp, seen) = oidc_provider(serde_json::json!({"keys": []}));
    let up = Upstream::echo();
    let u = upstream_yaml(&up);
    let conf = |extra: &str| {
        format!(
            "      openid-connect:\n        client_id: gw-client\n        client_secret: gw-secret\n        discovery: \"http://{0}/.well-known/openid-configuration\"\n        introspection_endpoint: \"http://{0}/introspect\"\n        bearer_only: true\n{extra}",
            idp.addr()
        )
    };
    let yaml = format!(
        "workers: 1\nplugin_dirs:\n  - \"{}\"\n{lua}routes:\n  - id: oidc\n    uri: /api\n    plugins:\n{}{u}  - id: admin\n    uri: /admin\n    plugins:\n{}{u}",
        dir.display(),
        conf(""),
        conf("        required_scopes: [admin]\n"),
    );
    let gw = Gateway::start_in(tmp.path(), &yaml);

    let r = Req::get(&gw.url("/api"))
        .header("Authorization", "Bearer good")
        .send();
    assert_eq!(r.status, 200, "{}\n{}", r.text(), gw.logs());
    let h = &r.json()["headers"];
    assert_eq!(h["x-access-token"], "good", "{h}");
    use base64::Engine;
    let userinfo = base64::engine::general_purpose::STANDARD
        .decode(
            h["x-userinfo"]
                .as_str()
                .unwrap_or_else(|| panic!("no X-Userinfo: {h}")),
        )
        .expect("base64 userinfo");
    let userinfo: serde_json::Value = serde_json::from_slice(&userinfo).expect("JSON userinfo");
    assert_eq!(userinfo["sub"], "jack", "{userinfo}");
    let (auth, body) = seen
        .recv_timeout(Duration::from_secs(5))
        .expect("the provider was asked to introspect");
    assert_eq!(
        auth,
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("gw-client:gw-secret")
        )
    );
    assert!(body.split('&').any(|kv| kv == "token=good"), "{body}");

    let r = Req::get(&gw.url("/api"))
        .header("Authorization", "Bearer revoked")
        .send();
    assert_eq!(r.status, 401, "{}", r.text());
    let challenge = r.header("www-authenticate").unwrap_or_default();
    assert!(
        challenge.starts_with("Bearer realm=\"apisix\"") && challenge.contains("invalid_token"),
        "{challenge}"
    );

    let r = Req::get(&gw.url("/api")).send();
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(
        r.header("www-authenticate").as_deref(),
        Some("Bearer realm=\"apisix\"")
    );

    let r = Req::get(&gw.url("/admin"))
        .header("Authorization", "Bearer good")
        .send();
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(
        r.json()["error"],
        "required scopes admin not present",
        "{}",
        r.text()
    );
}

/// APISIX's own degraphql (APISIX_SRC) with graphql-lua (MOONGATE_LUA_LIBS), whose parser runs
/// on Debian's LPeg through `package.cpath`: a query that does not parse and two operations
/// without `operation_name` are refused by `moongate check`; a POST's JSON variables and a
/// GET's query arguments become the GraphQL request the upstream receives
/// (t/plugin/degraphql.t, restated).
#[test]
fn real_degraphql_turns_requests_into_graphql() {
    let Some(src) = std::env::var_os("APISIX_SRC") else {
        eprintln!("APISIX_SRC is not set: skipping APISIX's degraphql");
        return;
    };
    let Some(lua) = third_party_lua_path() else {
        eprintln!("MOONGATE_LUA_LIBS is not set: skipping APISIX's degraphql (needs graphql-lua)");
        return;
    };
    let (tmp, dir) = stage_plugin(&PathBuf::from(src), "degraphql");
    // The upstream answers with what it was sent.
    let up = Upstream::start(|req| async move {
        use http_body_util::BodyExt;
        let uri = req.uri().to_string();
        let method = req.method().to_string();
        let ctype = req
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let body = req.into_body().collect().await.expect("body").to_bytes();
        hyper::Response::new(full(
            serde_json::json!({"uri": uri, "method": method, "ctype": ctype,
                               "body": String::from_utf8_lossy(&body)})
            .to_string(),
        ))
    });
    let query = "query ($name: String!) { persons(filter: {name: $name}) { id name } }";
    let route = |id: &str, q: &str, extra: &str| {
        format!(
            "  - id: {id}\n    uri: /{id}\n    plugins:\n      degraphql:\n        query: {}\n{extra}{}",
            serde_json::to_string(q).expect("json"),
            upstream_yaml(&up)
        )
    };
    let head = format!("workers: 1\nplugin_dirs:\n  - \"{}\"\n{lua}", dir.display());
    for (q, want) in [
        ("{ persons { id ", "failed to parse query"),
        (
            "query a { x } query b { y }",
            "operation_name is required if multiple operations are present in the query",
        ),
    ] {
        let (code, out) = common::check(&format!("{head}routes:\n{}", route("bad", q, "")));
        assert_eq!(code, 1, "{q}: {out}");
        assert!(out.contains(want), "{q}: {out}");
    }
    let yaml = format!(
        "{head}routes:\n{}",
        route("graphql", query, "        variables: [name]\n")
    );
    let gw = Gateway::start_in(tmp.path(), &yaml);

    let r = Req::post(&gw.url("/graphql"))
        .header("Content-Type", "application/json")
        .body(br#"{"name": "jack", "ignored": 1}"#.to_vec())
        .send();
    assert_eq!(r.status, 200, "{}\n{}", r.text(), gw.logs());
    let v = r.json();
    assert_eq!(v["method"], "POST", "{v}");
    assert_eq!(v["ctype"], "application/json", "{v}");
    let sent: serde_json::Value =
        serde_json::from_str(v["body"].as_str().unwrap_or("")).expect("a JSON GraphQL request");
    assert_eq!(sent["query"], query, "{sent}");
    assert_eq!(
        sent["variables"],
        serde_json::json!({"name": "jack"}),
        "{sent}"
    );

    let r = Req::get(&gw.url("/graphql?name=rose")).send();
    assert_eq!(r.status, 200, "{}", r.text());
    let uri = r.json()["uri"].as_str().unwrap_or("").to_string();
    let args: std::collections::HashMap<String, String> =
        url_args(uri.split_once('?').map(|(_, q)| q).unwrap_or(""));
    assert_eq!(args.get("query").map(String::as_str), Some(query), "{uri}");
    let vars: serde_json::Value =
        serde_json::from_str(args.get("variables").map(String::as_str).unwrap_or(""))
            .expect("variables");
    assert_eq!(vars, serde_json::json!({"name": "rose"}), "{uri}");

    let r = Req::new("PUT", &gw.url("/graphql")).send();
    assert_eq!(r.status, 405, "{}", r.text());
}

/// A query string's arguments, percent-decoded (`+` as a space).
fn url_args(q: &str) -> std::collections::HashMap<String, String> {
    fn decode(s: &str) -> String {
        let b = s.replace('+', " ");
        let b = b.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' && i + 2 < b.len() {
                if let Ok(v) = u8::from_str_radix(&String::from_utf8_lossy(&b[i + 1..i + 3]), 16) {
                    out.push(v);
                    i += 3;
                    continue;
                }
            }
            out.push(b[i]);
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    q.split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

/// APISIX's own openid-connect (APISIX_SRC, MOONGATE_LUA_LIBS) verifying bearer JWTs locally
/// with the provider's JWKS (`use_jwks`): lua-resty-openidc fetches the key set named by the
/// discovery document, builds the RSA key from its `n`/`e`, and verifies with moongate's
/// resty.jwt and resty.jwt-validators. A token signed by the openssl command with the issuer
/// from discovery passes with its claims in `X-Userinfo`; another issuer, a changed payload and
/// an expired token are 401 (t/plugin/openid-connect*.t, restated).
#[test]
fn real_openid_connect_verifies_jwts_with_the_providers_jwks() {
    use base64::Engine;
    let Some(src) = std::env::var_os("APISIX_SRC") else {
        eprintln!("APISIX_SRC is not set: skipping APISIX's openid-connect");
        return;
    };
    let Some(lua) = third_party_lua_path() else {
        eprintln!("MOONGATE_LUA_LIBS is not set: skipping APISIX's openid-connect (needs lua-resty-openidc)");
        return;
    };
    let keys = tempfile::tempdir().expect("temp dir");
    let d = keys.path();
    openssl(d, &["genrsa", "-out", "key.pem", "2048"]);
    let modulus = String::from_utf8(openssl(d, &["rsa", "-in", "key.pem", "-noout", "-modulus"]))
        .expect("modulus");
    let hex = modulus.trim().trim_start_matches("Modulus=");
    let n: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect();
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let jwks = serde_json::json!({"keys": [{"kty": "RSA", "kid": "k1", "use": "sig",
        "alg": "RS256", "n": b64(&n), "e": "AQAB"}]});
    let (idp, _seen) = oidc_provider(jwks);
    let issuer = format!("http://{}", idp.addr());
    let sign = |payload: &serde_json::Value| {
        let head = b64(br#"{"alg":"RS256","typ":"JWT","kid":"k1"}"#);
        let body = b64(payload.to_string().as_bytes());
        std::fs::write(d.join("data"), format!("{head}.{body}")).expect("data");
        let sig = openssl(d, &["dgst", "-sha256", "-sign", "key.pem", "data"]);
        format!("{head}.{body}.{}", b64(&sig))
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();

    let (tmp, dir) = stage_plugin(&PathBuf::from(src), "openid-connect");
    let up = Upstream::echo();
    let yaml = format!(
        "workers: 1\nplugin_dirs:\n  - \"{}\"\n{lua}routes:\n  - id: jwks\n    uri: /api\n    plugins:\n      openid-connect:\n        client_id: gw-client\n        client_secret: gw-secret\n        discovery: \"{issuer}/.well-known/openid-configuration\"\n        bearer_only: true\n        use_jwks: true\n{}",
        dir.display(),
        upstream_yaml(&up)
    );
    let gw = Gateway::start_in(tmp.path(), &yaml);
    let call = |token: &str| {
        Req::get(&gw.url("/api"))
            .header("Authorization", &format!("Bearer {token}"))
            .send()
    };

    let good = sign(
        &serde_json::json!({"iss": issuer, "sub": "jack", "aud": "gw-client",
                                        "exp": now + 300}),
    );
    let r = call(&good);
    assert_eq!(r.status, 200, "{}\n{}", r.text(), gw.logs());
    let h = &r.json()["headers"];
    let userinfo = base64::engine::general_purpose::STANDARD
        .decode(
            h["x-userinfo"]
                .as_str()
                .unwrap_or_else(|| panic!("no X-Userinfo: {h}")),
        )
        .expect("base64 userinfo");
    let userinfo: serde_json::Value = serde_json::from_slice(&userinfo).expect("JSON userinfo");
    assert_eq!(userinfo["sub"], "jack", "{userinfo}");
    assert_eq!(h["x-access-token"], good.as_str(), "{h}");

    let other_issuer = sign(
        &serde_json::json!({"iss": "http://127.0.0.1:9/evil", "sub": "jack",
                                                "exp": now + 300}),
    );
    let expired = sign(&serde_json::json!({"iss": issuer, "sub": "jack", "exp": now - 1000}));
    let mut parts: Vec<String> = good.split('.').map(str::to_string).collect();
    parts[1] = b64(
        serde_json::json!({"iss": issuer, "sub": "root", "exp": now + 300})
            .to_string()
            .as_bytes(),
    );
    let changed = parts.join(".");
    for (what, token, reason) in [
        (
            "other issuer",
            other_issuer,
            "Claim 'iss' ('http://127.0.0.1:9/evil') returned failure",
        ),
        ("expired", expired, "JWT expired"),
        ("changed", changed, "signature mismatch"),
    ] {
        let r = call(&token);
        assert_eq!(r.status, 401, "{what}: {}\n{}", r.text(), gw.logs());
        let challenge = r.header("www-authenticate").unwrap_or_default();
        assert!(
            challenge.contains("error=\"invalid_token\"") && challenge.contains(reason),
            "{what}: {challenge}"
        );
    }
}

/// APISIX's own authz-casbin (APISIX_SRC) with lua-casbin (MOONGATE_LUA_LIBS) on Debian's
/// lrexlib-pcre2 and luaposix, C modules found on `package.cpath`, and lualogging: the RBAC
/// model and policy of the plugin's docs, inline and from files; anonymous users may GET `/`
/// only, `alice` (an admin) anything, others get 403 `Access Denied`
/// (t/plugin/authz-casbin.t, restated).
#[test]
fn real_authz_casbin_enforces_an_rbac_policy() {
    let Some(src) = std::env::var_os("APISIX_SRC") else {
        eprintln!("APISIX_SRC is not set: skipping APISIX's authz-casbin");
        return;
    };
    let Some(lua) = third_party_lua_path() else {
        eprintln!(
            "MOONGATE_LUA_LIBS is not set: skipping APISIX's authz-casbin (needs lua-casbin)"
        );
        return;
    };
    let rex = format!(
        "/usr/lib/{}-linux-gnu/lua/5.1/rex_pcre2.so",
        std::env::consts::ARCH
    );
    if !Path::new(&rex).is_file() {
        eprintln!(
            "{rex} missing (Debian lua-rex-pcre2, lua-posix, lua-logging): skipping authz-casbin"
        );
        return;
    }
    let model = "[request_definition]\nr = sub, obj, act\n\n[policy_definition]\np = sub, obj, act\n\n[role_definition]\ng = _, _\n\n[policy_effect]\ne = some(where (p.eft == allow))\n\n[matchers]\nm = (g(r.sub, p.sub) || keyMatch(r.sub, p.sub)) && keyMatch(r.obj, p.obj) && keyMatch(r.act, p.act)\n";
    let policy = "p, *, /, GET\np, admin, *, *\ng, alice, admin\n";
    let (tmp, dir) = stage_plugin(&PathBuf::from(src), "authz-casbin");
    std::fs::write(tmp.path().join("model.conf"), model).expect("model");
    std::fs::write(tmp.path().join("policy.csv"), policy).expect("policy");
    let up = Upstream::echo();
    let u = upstream_yaml(&up);
    let yaml = format!(
        "workers: 1\nplugin_dirs:\n  - \"{}\"\n{lua}routes:\n  - id: inline\n    uris: [\"/\", \"/res\"]\n    plugins:\n      authz-casbin:\n        model: {}\n        policy: {}\n        username: user\n{u}  - id: files\n    uri: /files/*\n    plugins:\n      authz-casbin:\n        model_path: \"{}\"\n        policy_path: \"{}\"\n        username: user\n{u}",
        dir.display(),
        serde_json::to_string(model).expect("json"),
        serde_json::to_string(policy).expect("json"),
        tmp.path().join("model.conf").display(),
        tmp.path().join("policy.csv").display(),
    );
    let gw = Gateway::start_in(tmp.path(), &yaml);
    let call = |method: &str, path: &str, user: Option<&str>| {
        let mut r = Req::new(method, &gw.url(path));
        if let Some(u) = user {
            r = r.header("user", u);
        }
        r.send()
    };
    for (method, path, user, status) in [
        ("GET", "/", None, 200),
        ("GET", "/res", None, 403),
        ("POST", "/", None, 403),
        ("GET", "/res", Some("alice"), 200),
        ("POST", "/", Some("alice"), 200),
        ("GET", "/", Some("bob"), 200),
        ("GET", "/res", Some("bob"), 403),
        ("GET", "/files/a", None, 403),
        ("GET", "/files/a", Some("alice"), 200),
    ] {
        let r = call(method, path, user);
        assert_eq!(
            r.status,
            status,
            "{method} {path} as {user:?}: {}\n{}",
            r.text(),
            gw.logs()
        );
        if status == 403 {
            assert_eq!(
                r.json()["message"],
                "Access Denied",
                "{method} {path} as {user:?}"
            );
        }
    }
}

/// A SafeLine detector stand-in speaking lua-resty-t1k's protocol on loopback: it reads the
/// request's packets (tag byte, little-endian length, payload) up to the last one and answers
/// "reject with 403, event `e0123`" when the request head mentions `/attack`, "pass" otherwise.
/// Each request head it saw goes to the channel. Serves connections until the test ends.
fn t1k_detector() -> (u16, std::sync::mpsc::Receiver<String>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind detector");
    let port = listener.local_addr().expect("addr").port();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { return };
            let tx = tx.clone();
            std::thread::spawn(move || {
                let packet = |s: &mut std::net::TcpStream, tag: u8, body: &[u8]| {
                    let mut out = vec![tag];
                    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
                    out.extend_from_slice(body);
                    s.write_all(&out)
                };
                // One request per round, on a kept-alive connection; bounded.
                for _ in 0..1000 {
                    let mut head = String::new();
                    loop {
                        let mut h = [0u8; 5];
                        if s.read_exact(&mut h).is_err() {
                            return;
                        }
                        let len = u32::from_le_bytes([h[1], h[2], h[3], h[4]]) as usize;
                        let mut body = vec![0u8; len];
                        if s.read_exact(&mut body).is_err() {
                            return;
                        }
                        if h[0] & 0x3f == 0x01 {
                            head = String::from_utf8_lossy(&body).into_owned();
                        }
                        if h[0] & 0x80 != 0 {
                            break;
                        }
                    }
                    let attack = head.contains("/attack");
                    let _ = tx.send(head);
                    let sent = if attack {
                        packet(&mut s, 0x41, b"?")
                            .and_then(|_| packet(&mut s, 0x02, b"403"))
                            .and_then(|_| packet(&mut s, 0xa4, b"<!-- event_id: e0123 -->"))
                    } else {
                        packet(&mut s, 0xc1, b".")
                    };
                    if sent.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, rx)
}

/// APISIX's own chaitin-waf (APISIX_SRC) with lua-resty-t1k (MOONGATE_LUA_LIBS) against a
/// detector speaking the T1K protocol on loopback: in block mode a request the detector rejects
/// gets its status and the plugin's JSON with the event id, a clean one reaches the upstream,
/// both with the `X-APISIX-CHAITIN-WAF*` headers; in monitor mode the rejected request passes
/// (docs/en/latest/plugins/chaitin-waf.md, restated).
#[test]
fn real_chaitin_waf_asks_a_t1k_detector() {
    let Some(src) = std::env::var_os("APISIX_SRC") else {
        eprintln!("APISIX_SRC is not set: skipping APISIX's chaitin-waf");
        return;
    };
    let Some(lua) = third_party_lua_path() else {
        eprintln!(
            "MOONGATE_LUA_LIBS is not set: skipping APISIX's chaitin-waf (needs lua-resty-t1k)"
        );
        return;
    };
    let (port, heads) = t1k_detector();
    let (tmp, dir) = stage_plugin(&PathBuf::from(src), "chaitin-waf");
    let up = Upstream::echo();
    let u = upstream_yaml(&up);
    let yaml = format!(
        "workers: 1\nplugin_dirs:\n  - \"{}\"\n{lua}plugin_metadata:\n  - id: chaitin-waf\n    nodes:\n      - host: 127.0.0.1\n        port: {port}\nroutes:\n  - id: block\n    uri: /b/*\n    plugins:\n      chaitin-waf:\n        mode: block\n{u}  - id: monitor\n    uri: /m/*\n    plugins:\n      chaitin-waf:\n        mode: monitor\n{u}",
        dir.display()
    );
    let gw = Gateway::start_in(tmp.path(), &yaml);

    let r = get(&gw.url("/b/attack?x=1"));
    assert_eq!(r.status, 403, "{}\n{}", r.text(), gw.logs());
    let v = r.json();
    assert_eq!(v["code"], 403, "{v}");
    assert_eq!(v["success"], false, "{v}");
    assert_eq!(v["event_id"], "e0123", "{v}");
    assert_eq!(
        v["message"],
        "blocked by Chaitin SafeLine Web Application Firewall"
    );
    assert_eq!(r.header("x-apisix-chaitin-waf").as_deref(), Some("yes"));
    assert_eq!(
        r.header("x-apisix-chaitin-waf-action").as_deref(),
        Some("reject")
    );
    assert_eq!(
        r.header("x-apisix-chaitin-waf-status").as_deref(),
        Some("403")
    );
    let head = heads
        .recv_timeout(Duration::from_secs(5))
        .expect("the detector saw it");
    assert!(
        head.starts_with("GET /b/attack?x=1 HTTP/1.1\r\n"),
        "{head:?}"
    );

    let r = get(&gw.url("/b/clean"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["uri"], "/b/clean");
    assert_eq!(
        r.header("x-apisix-chaitin-waf-action").as_deref(),
        Some("pass")
    );

    let r = get(&gw.url("/m/attack"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("x-apisix-chaitin-waf-action").as_deref(),
        Some("reject")
    );
}

/// APISIX's own oas-validator (APISIX_SRC) with lua-resty-openapi-validator
/// (MOONGATE_LUA_LIBS), which routes with moongate's resty.radixtree and checks with its
/// jsonschema: requests that fit the OpenAPI document's path parameters, query and JSON body
/// reach the upstream; a wrong parameter type, a missing required query argument, a body
/// missing a required property and an unknown path are 400 `failed to validate request.`
/// (t/plugin/oas-validator*.t, restated).
#[test]
fn real_oas_validator_checks_requests_against_the_spec() {
    let Some(src) = std::env::var_os("APISIX_SRC") else {
        eprintln!("APISIX_SRC is not set: skipping APISIX's oas-validator");
        return;
    };
    let Some(lua) = third_party_lua_path() else {
        eprintln!("MOONGATE_LUA_LIBS is not set: skipping APISIX's oas-validator (needs lua-resty-openapi-validator)");
        return;
    };
    let spec = serde_json::json!({
        "openapi": "3.0.0",
        "info": {"title": "pets", "version": "1"},
        "paths": {
            "/pets/{id}": {"get": {
                "parameters": [
                    {"name": "id", "in": "path", "required": true, "schema": {"type": "integer"}},
                    {"name": "verbose", "in": "query", "required": true,
                     "schema": {"type": "boolean"}}
                ],
                "responses": {"200": {"description": "ok"}}
            }},
            "/pets": {"post": {
                "requestBody": {"required": true, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["name"],
                    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}
                }}}},
                "responses": {"201": {"description": "created"}}
            }}
        }
    });
    let (tmp, dir) = stage_plugin(&PathBuf::from(src), "oas-validator");
    let up = Upstream::echo();
    let yaml = format!(
        "workers: 1\nplugin_dirs:\n  - \"{}\"\n{lua}routes:\n  - id: oas\n    uri: /*\n    plugins:\n      oas-validator:\n        spec: {}\n        verbose_errors: true\n{}",
        dir.display(),
        serde_json::to_string(&spec.to_string()).expect("json"),
        upstream_yaml(&up)
    );
    let gw = Gateway::start_in(tmp.path(), &yaml);
    let post = |body: &str| {
        Req::post(&gw.url("/pets"))
            .header("Content-Type", "application/json")
            .body(body.as_bytes().to_vec())
            .send()
    };
    let r = get(&gw.url("/pets/12?verbose=true"));
    assert_eq!(r.status, 200, "{}\n{}", r.text(), gw.logs());
    assert_eq!(r.json()["uri"], "/pets/12?verbose=true");
    let r = post(r#"{"name": "rex", "age": 3}"#);
    assert_eq!(r.status, 200, "{}\n{}", r.text(), gw.logs());

    for (r, why) in [
        (
            get(&gw.url("/pets/rex?verbose=true")),
            "path parameter 'id': wrong type: expected integer, got string",
        ),
        (
            get(&gw.url("/pets/12")),
            "query parameter 'verbose': required parameter is missing",
        ),
        (post(r#"{"age": 3}"#), "body: property \"name\" is required"),
        (
            post(r#"{"name": "rex", "age": "old"}"#),
            "body: property \"age\" validation failed: wrong type: expected integer, got string",
        ),
        (
            get(&gw.url("/owners/1")),
            "no matching operation found for GET /owners/1",
        ),
    ] {
        assert_eq!(r.status, 400, "{why}: {}\n{}", r.text(), gw.logs());
        assert_eq!(
            r.json()["message"],
            format!("failed to validate request. {why}"),
            "{}",
            r.text()
        );
    }
}

/// A plugin declaring API endpoints with `api()`, as batch-requests and prometheus do: a JSON
/// answer, a text answer, one ending the request itself, one listing the routes
/// (`apisix.router.http_routes()`).
const API_DECLARER: &str = r#"
local core = require("apisix.core")
local router = require("apisix.router")

local _M = { version = 0.1, priority = 0, name = "api-declarer", schema = { type = "object" } }

function _M.api()
    return {
        {
            methods = { "GET" },
            uri = "/apisix/plugin/api-declarer/hello",
            handler = function(ctx)
                return 200, { hello = ctx.var.arg_who or "world", uri = ctx.var.uri }
            end,
        },
        {
            methods = { "POST", "PUT" },
            uri = { "/apisix/plugin/api-declarer/echo", "/api-declarer/echo" },
            handler = function(ctx)
                core.response.set_header("X-Echo", "1")
                core.response.exit(201, core.request.get_body())
            end,
        },
        {
            methods = { "GET" },
            uri = "/apisix/plugin/api-declarer/routes",
            handler = function()
                local routes = router.http_routes()
                local ids = {}
                for _, r in ipairs(routes) do
                    ids[#ids + 1] = r.value.id .. "=" .. r.key
                end
                table.sort(ids)
                return 200, table.concat(ids, " ")
            end,
        },
    }
end

return _M
"#;

/// Exposes the plugins' API endpoints on its route as APISIX's public-api does: at the
/// route's uri, or at `conf.uri`; 404 when no endpoint matches.
const API_EXPOSER: &str = r#"
local core = require("apisix.core")
local router = require("apisix.router")

local schema = { type = "object", properties = { uri = { type = "string" } } }
local _M = { version = 0.1, priority = 501, name = "api-exposer", schema = schema }

function _M.check_schema(conf)
    return core.schema.check(schema, conf)
end

function _M.access(conf, ctx)
    ctx.var.uri = conf.uri or ctx.var.uri
    if router.api.match(ctx) then
        return
    end
    return 404
end

return _M
"#;

/// Plugin `api()` endpoints are served through a route carrying the exposing plugin, at the
/// route's uri or the one its conf names, by method; without such a route the path is an
/// ordinary one (proxied), as in APISIX 3.
#[test]
fn plugin_api_endpoints_are_served_through_an_exposing_route() {
    let up = Upstream::text("from upstream");
    let routes = format!(
        "  - id: direct\n    uris: [\"/apisix/plugin/api-declarer/hello\", \"/apisix/plugin/api-declarer/routes\", \"/apisix/plugin/api-declarer/echo\"]\n    plugins:\n      api-exposer: {{}}\n{up}  - id: renamed\n    uri: /hello\n    plugins:\n      api-exposer:\n        uri: /apisix/plugin/api-declarer/hello\n{up}  - id: missing\n    uri: /nothing\n    plugins:\n      api-exposer: {{}}\n{up}  - id: plain\n    uri: /apisix/plugin/api-declarer/*\n    priority: -1\n{up}",
        up = upstream_yaml(&up)
    );
    let (_tmp, gw) = gateway_with(
        &[("api-declarer", API_DECLARER), ("api-exposer", API_EXPOSER)],
        &routes,
    );

    let r = Req::get(&gw.url("/apisix/plugin/api-declarer/hello?who=ann")).send();
    assert_eq!(r.status, 200, "{}", gw.logs());
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(
        r.json(),
        serde_json::json!({"hello": "ann", "uri": "/apisix/plugin/api-declarer/hello"})
    );

    // At the route's own uri, the endpoint conf.uri names.
    let r = Req::get(&gw.url("/hello")).send();
    assert_eq!(r.status, 200, "{}", gw.logs());
    assert_eq!(r.json()["hello"], "world");

    // A handler ending the request itself; a method the endpoint does not take is a 404.
    let r = Req::post(&gw.url("/apisix/plugin/api-declarer/echo"))
        .body("ping")
        .send();
    assert_eq!(
        (r.status, r.text().as_str()),
        (201, "ping"),
        "{}",
        gw.logs()
    );
    assert_eq!(r.header("x-echo").as_deref(), Some("1"));
    assert_eq!(
        Req::get(&gw.url("/apisix/plugin/api-declarer/echo"))
            .send()
            .status,
        404
    );

    // The route list handlers read through apisix.router.
    let r = Req::get(&gw.url("/apisix/plugin/api-declarer/routes")).send();
    assert_eq!(r.status, 200, "{}", gw.logs());
    assert_eq!(
        r.text(),
        "direct=/apisix/routes/direct missing=/apisix/routes/missing plain=/apisix/routes/plain renamed=/apisix/routes/renamed"
    );

    // No endpoint at the route's uri: 404, not the upstream.
    assert_eq!(Req::get(&gw.url("/nothing")).send().status, 404);
    // Without the exposing plugin an API path is an ordinary path.
    let r = Req::get(&gw.url("/apisix/plugin/api-declarer/other")).send();
    assert_eq!((r.status, r.text().as_str()), (200, "from upstream"));
}

/// APISIX's own public-api (APISIX_SRC) exposing wolf-rbac's `user_info` endpoint, as
/// t/plugin/public-api.t does: at the endpoint's own path, at another route's uri through
/// `uri`, behind key-auth; an endpoint nobody declares is a 404.
#[test]
fn real_public_api_exposes_a_plugins_endpoints() {
    let Some(src) = apisix_src("APISIX's public-api") else {
        return;
    };
    let (tmp, dir) = stage_plugins(&src, &["public-api", "wolf-rbac", "key-auth"]);
    let up = Upstream::text("from upstream");
    let u = upstream_yaml(&up);
    let yaml = format!(
        "workers: 1\nplugin_dirs:\n  - \"{}\"\nconsumers:\n  - username: bob\n    plugins:\n      key-auth:\n        key: testkey\nroutes:\n  - id: direct-wolf-rbac-userinfo\n    uri: /apisix/plugin/wolf-rbac/user_info\n    plugins:\n      public-api: {{}}\n{u}  - id: wrong-public-api\n    uri: /wrong-public-api\n    plugins:\n      public-api:\n        uri: /apisix/plugin/balalbala\n{u}  - id: custom-user-info\n    uri: /get_user_info\n    plugins:\n      public-api:\n        uri: /apisix/plugin/wolf-rbac/user_info\n      key-auth: {{}}\n{u}",
        dir.display()
    );
    let gw = Gateway::start_in(tmp.path(), &yaml);

    // wolf-rbac's handler answers: no token in the request.
    let r = Req::get(&gw.url("/apisix/plugin/wolf-rbac/user_info")).send();
    assert_eq!(r.status, 401, "{}\n{}", r.text(), gw.logs());
    assert_eq!(r.json()["message"], "Missing rbac token in request");
    // The endpoint takes GET only.
    let r = Req::post(&gw.url("/apisix/plugin/wolf-rbac/user_info")).send();
    assert_eq!(r.status, 404, "{}", r.text());
    // No plugin declares it; no route serves it.
    assert_eq!(Req::get(&gw.url("/wrong-public-api")).send().status, 404);
    assert_eq!(
        Req::get(&gw.url("/apisix/plugin/balalbala")).send().status,
        404
    );

    // Protected by key-auth: refused without the key, wolf-rbac's answer with it.
    let r = Req::get(&gw.url("/get_user_info?key=user-key")).send();
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["message"], "Missing API key in request");
    let r = Req::get(&gw.url("/get_user_info?key=user-key"))
        .header("apikey", "testkey")
        .send();
    assert_eq!(r.status, 401, "{}\n{}", r.text(), gw.logs());
    assert_eq!(r.json()["message"], "Missing rbac token in request");
    assert_eq!(up.requests(), 0, "no request reached the upstream");
}

/// APISIX's own graphql-proxy-cache (APISIX_SRC, graphql-lua from MOONGATE_LUA_LIBS) with
/// proxy-cache's memory strategy: the second identical query is answered from the cache, a
/// mutation bypasses it, and the purge endpoint (served through public-api) empties the entry
/// (t/plugin/graphql-proxy-cache*.t).
#[test]
fn real_graphql_proxy_cache_caches_queries_in_memory() {
    let Some(src) = apisix_src("APISIX's graphql-proxy-cache") else {
        return;
    };
    let Some(lua) = third_party_lua_path() else {
        eprintln!("MOONGATE_LUA_LIBS is not set: skipping APISIX's graphql-proxy-cache (needs graphql-lua)");
        return;
    };
    let (tmp, dir) = stage_plugins(&src, &["graphql-proxy-cache", "public-api"]);
    copy_tree(
        &src.join("apisix/plugins/proxy-cache"),
        &dir.join("proxy-cache"),
    );
    let up = Upstream::text(r#"{"data":{"persons":[{"id":1}]}}"#);
    let yaml = format!(
        "workers: 1\nplugin_dirs:\n  - \"{}\"\n{lua}  shared_dicts:\n    memory_cache: 1m\nroutes:\n  - id: gq\n    uri: /graphql\n    plugins:\n      graphql-proxy-cache:\n        cache_strategy: memory\n        cache_zone: memory_cache\n{}  - id: purge\n    uri: /apisix/plugin/graphql-proxy-cache/*\n    plugins:\n      public-api: {{}}\n{}",
        dir.display(),
        upstream_yaml(&up),
        upstream_yaml(&up)
    );
    let gw = Gateway::start_in(tmp.path(), &yaml);
    let query = |q: &str| {
        Req::post(&gw.url("/graphql"))
            .header("Content-Type", "application/json")
            .body(serde_json::json!({ "query": q }).to_string())
            .send()
    };

    let r = query("{ persons { id } }");
    assert_eq!(r.status, 200, "{}\n{}", r.text(), gw.logs());
    assert_eq!(r.header("apisix-cache-status").as_deref(), Some("MISS"));
    let key = r.header("apisix-cache-key").expect("a cache key");
    let r = query("{ persons { id } }");
    assert_eq!(r.status, 200, "{}", gw.logs());
    assert_eq!(r.header("apisix-cache-status").as_deref(), Some("HIT"));
    assert_eq!(r.text(), r#"{"data":{"persons":[{"id":1}]}}"#);
    assert_eq!(up.requests(), 1, "the second query came from the cache");

    // A mutation always goes upstream.
    let r = query("mutation { add(name: \"x\") { id } }");
    assert_eq!(r.header("apisix-cache-status").as_deref(), Some("BYPASS"));
    assert_eq!(up.requests(), 2);
    // Not GraphQL: refused before the upstream.
    let r = query("{ persons { id ");
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json()["message"],
        "Invalid graphql request: failed to parse graphql query"
    );

    // The purge endpoint: a wrong strategy or route is refused; the right one empties it.
    let purge = |path: &str| Req::new("PURGE", &gw.url(path)).send().status;
    assert_eq!(
        purge(&format!("/apisix/plugin/graphql-proxy-cache/disk/gq/{key}")),
        400
    );
    assert_eq!(
        purge(&format!(
            "/apisix/plugin/graphql-proxy-cache/memory/nope/{key}"
        )),
        404
    );
    assert_eq!(
        purge(&format!(
            "/apisix/plugin/graphql-proxy-cache/memory/gq/{key}"
        )),
        200,
        "{}",
        gw.logs()
    );
    let r = query("{ persons { id } }");
    assert_eq!(r.header("apisix-cache-status").as_deref(), Some("MISS"));
    assert_eq!(up.requests(), 3, "{}", gw.logs());
}
