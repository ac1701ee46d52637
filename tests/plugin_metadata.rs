//! Plugin metadata (config file `plugin_metadata:` and `/apisix/admin/plugin_metadata/NAME`)
//! reaching a Lua plugin through `apisix.plugin.plugin_metadata`, and `_meta.filter` deciding
//! per request whether a plugin runs. Real gateway, real upstream.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const KEY: &str = "test-admin-key-0123456789";

/// A plugin that copies its metadata into response headers: `X-Meta-Greeting` (the metadata's
/// `greeting`, whose schema default is "hello"), `X-Meta-Level`, `X-Meta-Id` (the value's `id`)
/// and `X-Meta-Index` (`modifiedIndex`); `X-Meta: none` when it has no metadata.
const META_PROBE: &str = r#"
local core = require("apisix.core")
local plugin = require("apisix.plugin")
local plugin_name = "meta-probe"

local _M = {
    version = 0.1,
    priority = 10,
    name = plugin_name,
    schema = { type = "object" },
    metadata_schema = {
        type = "object",
        properties = {
            greeting = { type = "string", default = "hello" },
            level = { type = "integer", minimum = 1 },
            tags = { type = "array", items = { type = "string" } },
        },
        required = { "level" },
    },
}

function _M.header_filter(conf, ctx)
    local m = plugin.plugin_metadata(plugin_name)
    if not m then
        core.response.set_header("X-Meta", "none")
        return
    end
    core.response.set_header("X-Meta-Greeting", m.value.greeting)
    core.response.set_header("X-Meta-Level", tostring(m.value.level))
    core.response.set_header("X-Meta-Id", m.value.id)
    core.response.set_header("X-Meta-Index", tostring(m.modifiedIndex))
    core.response.set_header("X-Meta-Same", tostring(m == plugin.plugin_metadata(plugin_name)))
end

return _M
"#;

/// A plugin whose `check_schema` handles the metadata itself (APISIX's
/// `check_schema(conf, core.schema.TYPE_METADATA)`), refusing `mode: "off"`.
const META_CHECKED: &str = r#"
local core = require("apisix.core")
local plugin = require("apisix.plugin")

local metadata_schema = {
    type = "object",
    properties = { mode = { type = "string", default = "fast" } },
}

local _M = {
    version = 0.1,
    priority = 11,
    name = "meta-checked",
    schema = { type = "object" },
    metadata_schema = metadata_schema,
}

function _M.check_schema(conf, schema_type)
    if schema_type == core.schema.TYPE_METADATA then
        local ok, err = core.schema.check(metadata_schema, conf)
        if not ok then
            return false, err
        end
        if conf.mode == "off" then
            return false, "mode \"off\" is not allowed"
        end
        return true
    end
    return core.schema.check(_M.schema, conf)
end

function _M.header_filter(conf, ctx)
    local m = plugin.plugin_metadata("meta-checked")
    core.response.set_header("X-Mode", m and m.value.mode or "none")
end

return _M
"#;

/// A plugin that marks the response (`X-Tagged: NAME`), to see whether `_meta.filter` let it run
/// in `access` and `header_filter`.
const TAGGER: &str = r#"
local core = require("apisix.core")
local _M = { version = 0.1, priority = 5, name = "tagger", schema = { type = "object" } }

function _M.access(conf, ctx)
    core.request.set_header(ctx, "X-Tagger-Access", "yes")
end

function _M.header_filter(conf, ctx)
    core.response.set_header("X-Tagged", "tagger")
end

return _M
"#;

fn write_plugins(dir: &Path) {
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins).expect("plugins dir");
    for (name, src) in [
        ("meta-probe", META_PROBE),
        ("meta-checked", META_CHECKED),
        ("tagger", TAGGER),
    ] {
        std::fs::write(plugins.join(format!("{name}.lua")), src).expect("write plugin");
    }
}

fn start(extra: &str, admin: bool) -> (tempfile::TempDir, Gateway) {
    let tmp = tempfile::tempdir().expect("temp dir");
    write_plugins(tmp.path());
    let admin = if admin {
        format!("admin:\n  listen: 127.0.0.1:0\n  key: {KEY}\n")
    } else {
        String::new()
    };
    let yaml = format!("workers: 2\nplugin_dirs:\n  - plugins\n{admin}{extra}");
    let gw = Gateway::start_in(tmp.path(), &yaml);
    (tmp, gw)
}

fn route(up: &Upstream, uri: &str, plugins: &str) -> String {
    format!(
        "  - id: {}\n    uri: {uri}\n    upstream:\n      nodes:\n        \"{}\": 1\n    plugins:\n{plugins}",
        uri.trim_start_matches('/').replace('/', "-"),
        up.node()
    )
}

fn admin(gw: &Gateway, method: &str, path: &str, body: Option<Value>) -> Resp {
    admin_request(
        gw.admin_addr(),
        KEY,
        method,
        path,
        body.map(|b| b.to_string()).as_deref(),
    )
}

#[test]
fn metadata_from_the_config_file_reaches_a_lua_plugin_with_defaults_filled() {
    let up = Upstream::echo();
    let yaml = format!(
        "plugin_metadata:\n  - id: meta-probe\n    level: 3\nroutes:\n{}",
        route(&up, "/m", "      meta-probe: {}\n")
    );
    let (_tmp, gw) = start(&yaml, false);
    for _ in 0..4 {
        let r = get(&gw.url("/m"));
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-meta-greeting").as_deref(), Some("hello"));
        assert_eq!(r.header("x-meta-level").as_deref(), Some("3"));
        assert_eq!(r.header("x-meta-id").as_deref(), Some("meta-probe"));
        assert_eq!(r.header("x-meta-same").as_deref(), Some("true"));
        let idx: u64 = r.header("x-meta-index").unwrap().parse().unwrap();
        assert!(idx > 0);
    }
}

#[test]
fn a_plugin_without_metadata_sees_nil() {
    let up = Upstream::echo();
    let yaml = format!("routes:\n{}", route(&up, "/m", "      meta-probe: {}\n"));
    let (_tmp, gw) = start(&yaml, false);
    let r = get(&gw.url("/m"));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-meta").as_deref(), Some("none"));
}

#[test]
fn bad_metadata_in_the_config_file_is_refused_with_its_path() {
    let tmp = tempfile::tempdir().expect("temp dir");
    write_plugins(tmp.path());
    let file = tmp.path().join("config.yaml");
    let cases = [
        (
            "plugin_metadata:\n  - id: meta-probe\n    level: 0\n",
            "plugin_metadata[0]: invalid configuration: property \"level\" validation failed",
        ),
        (
            "plugin_metadata:\n  - id: meta-probe\n    greeting: hi\n",
            "plugin_metadata[0]: invalid configuration: property \"level\" is required",
        ),
        (
            "plugin_metadata:\n  - id: meta-probe\n    level: 1\n    tags: [1]\n",
            "plugin_metadata[0]: invalid configuration: property \"tags\" validation failed",
        ),
        (
            "plugin_metadata:\n  - id: no-such-plugin\n    level: 1\n",
            "plugin_metadata[0].id: unknown plugin [no-such-plugin]",
        ),
        (
            "plugin_metadata:\n  - level: 1\n",
            "plugin_metadata[0]: missing field `id`",
        ),
        (
            "plugin_metadata:\n  - id: meta-checked\n    mode: \"off\"\n",
            "plugin_metadata[0]: invalid configuration: mode \"off\" is not allowed",
        ),
        (
            "plugin_metadata:\n  - id: meta-probe\n    level: 1\n  - id: meta-probe\n    level: 2\n",
            "plugin_metadata[1].id: duplicate id \"meta-probe\"",
        ),
    ];
    for (body, want) in cases {
        std::fs::write(&file, format!("plugin_dirs:\n  - plugins\n{body}")).unwrap();
        let (code, out) = check_file(&file);
        assert_ne!(code, 0, "{body}: accepted:\n{out}");
        assert!(out.contains(want), "{body}: want {want:?} in:\n{out}");
    }
    std::fs::write(
        &file,
        "plugin_dirs:\n  - plugins\nplugin_metadata:\n  - id: meta-probe\n    level: 1\n",
    )
    .unwrap();
    let (code, out) = check_file(&file);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn admin_api_metadata_is_live_on_the_next_request_and_refusals_change_nothing() {
    let up = Upstream::echo();
    let yaml = format!(
        "routes:\n{}{}",
        route(&up, "/m", "      meta-probe: {}\n"),
        route(&up, "/c", "      meta-checked: {}\n")
    );
    let (_tmp, gw) = start(&yaml, true);
    assert_eq!(get(&gw.url("/m")).header("x-meta").as_deref(), Some("none"));

    // Create: APISIX's shape, id = plugin name, defaults not stored (filled when read).
    let r = admin(
        &gw,
        "PUT",
        "/plugin_metadata/meta-probe",
        Some(json!({"level": 2})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(
        r.json(),
        json!({"key": "/apisix/plugin_metadata/meta-probe", "value": {"level": 2, "id": "meta-probe"}})
    );
    let first = get(&gw.url("/m"));
    assert_eq!(first.header("x-meta-level").as_deref(), Some("2"));
    assert_eq!(first.header("x-meta-greeting").as_deref(), Some("hello"));
    let first_index = first.header("x-meta-index").unwrap();

    // Update: both workers see it on the next request, with a new modifiedIndex.
    let r = admin(
        &gw,
        "PUT",
        "/plugin_metadata/meta-probe",
        Some(json!({"level": 5, "greeting": "hey"})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    for _ in 0..6 {
        let r = get(&gw.url("/m"));
        assert_eq!(r.header("x-meta-level").as_deref(), Some("5"));
        assert_eq!(r.header("x-meta-greeting").as_deref(), Some("hey"));
        assert_ne!(r.header("x-meta-index").unwrap(), first_index);
    }

    let r = admin(&gw, "GET", "/plugin_metadata/meta-probe", None);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["key"], "/apisix/plugin_metadata/meta-probe");
    assert_eq!(
        r.json()["value"],
        json!({"level": 5, "greeting": "hey", "id": "meta-probe"})
    );
    let r = admin(&gw, "GET", "/plugin_metadata", None);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["total"], 1);
    // Every plugin's attributes carry its metadata schema, as APISIX's `/plugins?all=true`.
    let r = admin(&gw, "GET", "/plugins", None);
    assert_eq!(
        r.json()["meta-probe"]["metadata_schema"]["required"],
        json!(["level"])
    );
    assert!(r.json()["tagger"].get("metadata_schema").is_none());

    // Refusals, in APISIX's wording; what serves stays as it was.
    let r = admin(
        &gw,
        "PUT",
        "/plugin_metadata/meta-probe",
        Some(json!({"level": "high"})),
    );
    assert_eq!(r.status, 400);
    let msg = r.json()["error_msg"].as_str().unwrap().to_string();
    assert!(
        msg.starts_with("invalid configuration: property \"level\" validation failed"),
        "{msg}"
    );
    let r = admin(
        &gw,
        "PUT",
        "/plugin_metadata/no-such-plugin",
        Some(json!({"a": 1})),
    );
    assert_eq!(
        (r.status, r.json()),
        (400, json!({"error_msg": "invalid plugin name"}))
    );
    let r = admin(&gw, "PUT", "/plugin_metadata", Some(json!({"a": 1})));
    assert_eq!(
        (r.status, r.json()),
        (400, json!({"error_msg": "missing plugin name"}))
    );
    let r = admin(&gw, "POST", "/plugin_metadata", Some(json!({"a": 1})));
    assert_eq!(r.status, 405);
    assert_eq!(
        r.json()["error_msg"],
        "not supported `POST` method for plugin_metadata"
    );
    let r = admin(
        &gw,
        "PUT",
        "/plugin_metadata/meta-checked",
        Some(json!({"mode": "off"})),
    );
    assert_eq!(
        (r.status, r.json()),
        (
            400,
            json!({"error_msg": "invalid configuration: mode \"off\" is not allowed"})
        )
    );
    assert_eq!(get(&gw.url("/c")).header("x-mode").as_deref(), Some("none"));
    let r = get(&gw.url("/m"));
    assert_eq!(r.header("x-meta-level").as_deref(), Some("5"));

    // check_schema(conf, TYPE_METADATA) fills its defaults too.
    let r = admin(&gw, "PUT", "/plugin_metadata/meta-checked", Some(json!({})));
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(get(&gw.url("/c")).header("x-mode").as_deref(), Some("fast"));

    // Delete: the plugin sees nil again; a second delete is 404.
    let r = admin(&gw, "DELETE", "/plugin_metadata/meta-probe", None);
    assert_eq!(
        (r.status, r.json()),
        (
            200,
            json!({"deleted": "1", "key": "/apisix/plugin_metadata/meta-probe"})
        )
    );
    assert_eq!(get(&gw.url("/m")).header("x-meta").as_deref(), Some("none"));
    let r = admin(&gw, "DELETE", "/plugin_metadata/meta-probe", None);
    assert_eq!(r.status, 404);
    let r = admin(&gw, "GET", "/plugin_metadata/meta-probe", None);
    assert_eq!(
        (r.status, r.json()),
        (404, json!({"message": "Key not found"}))
    );
}

#[test]
fn admin_metadata_survives_a_restart() {
    let up = Upstream::echo();
    let tmp = tempfile::tempdir().expect("temp dir");
    write_plugins(tmp.path());
    let yaml = format!(
        "workers: 1\nplugin_dirs:\n  - plugins\nadmin:\n  listen: 127.0.0.1:0\n  key: {KEY}\nroutes:\n{}",
        route(&up, "/m", "      meta-probe: {}\n")
    );
    {
        let gw = Gateway::start_in(tmp.path(), &yaml);
        let r = admin(
            &gw,
            "PUT",
            "/plugin_metadata/meta-probe",
            Some(json!({"level": 7})),
        );
        assert_eq!(r.status, 201, "{}", r.text());
    }
    let gw = Gateway::start_in(tmp.path(), &yaml);
    assert_eq!(
        get(&gw.url("/m")).header("x-meta-level").as_deref(),
        Some("7")
    );
}

#[test]
fn meta_filter_runs_a_plugin_only_for_matching_requests() {
    let up = Upstream::echo();
    let yaml = format!(
        "routes:\n{}{}",
        // A native plugin filtered on a query argument.
        route(
            &up,
            "/native",
            "      response-headers:\n        set: {X-Filtered: \"on\"}\n        _meta:\n          filter: [[\"arg_version\", \"==\", \"v2\"]]\n"
        ),
        // A Lua plugin filtered on a header, with a logical operator.
        route(
            &up,
            "/lua",
            "      tagger:\n        _meta:\n          filter: [\"OR\", [\"http_x_beta\", \"==\", \"yes\"], [\"arg_n\", \">\", 10]]\n"
        ),
    );
    let (_tmp, gw) = start(&yaml, false);

    let r = get(&gw.url("/native?version=v2"));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-filtered").as_deref(), Some("on"));
    let r = get(&gw.url("/native?version=v1"));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-filtered"), None);
    assert_eq!(get(&gw.url("/native")).header("x-filtered"), None);

    // Matching: both its access (request header to the upstream) and header_filter ran.
    let r = Req::get(&gw.url("/lua")).header("X-Beta", "yes").send();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-tagged").as_deref(), Some("tagger"));
    assert_eq!(
        r.json()["headers"]["x-tagger-access"],
        "yes",
        "{}",
        r.text()
    );
    let r = get(&gw.url("/lua?n=11"));
    assert_eq!(r.header("x-tagged").as_deref(), Some("tagger"));
    // Not matching: neither phase ran.
    let r = Req::get(&gw.url("/lua?n=10")).header("X-Beta", "no").send();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-tagged"), None);
    assert!(
        r.json()["headers"].get("x-tagger-access").is_none(),
        "{}",
        r.text()
    );
}

#[test]
fn a_bad_filter_is_refused_with_its_path() {
    let tmp = tempfile::tempdir().expect("temp dir");
    write_plugins(tmp.path());
    let file = tmp.path().join("config.yaml");
    let cases = [
        (
            "[[\"arg_v\", \"=~\", \"x\"]]",
            "routes[0].plugins.response-headers._meta.filter: failed to validate the 'vars' expression: invalid operator '=~'",
        ),
        (
            "[\"arg_v\", \"==\", \"x\"]",
            "routes[0].plugins.response-headers._meta.filter: failed to validate the 'vars' expression: rule should be wrapped inside brackets",
        ),
        (
            "[[\"uri\", \"~~\", \"(\"]]",
            "routes[0].plugins.response-headers._meta.filter: failed to validate the 'vars' expression: failed to compile regex",
        ),
        (
            "[[\"remote_addr\", \"ipmatch\", [\"10.0.0.0/33\"]]]",
            "routes[0].plugins.response-headers._meta.filter: failed to validate the 'vars' expression: invalid ip address: 10.0.0.0/33",
        ),
    ];
    for (filter, want) in cases {
        std::fs::write(
            &file,
            format!(
                "plugin_dirs:\n  - plugins\nroutes:\n  - id: 1\n    uri: /x\n    plugins:\n      response-headers:\n        set: {{X-A: b}}\n        _meta:\n          filter: {filter}\n"
            ),
        )
        .unwrap();
        let (code, out) = check_file(&file);
        assert_ne!(code, 0, "{filter}: accepted:\n{out}");
        assert!(out.contains(want), "{filter}: want {want:?} in:\n{out}");
    }

    // Through the Admin API: 400 with the field's path, and the route is not stored.
    let up = Upstream::echo();
    let (_tmp, gw) = start("", true);
    let r = admin(
        &gw,
        "PUT",
        "/routes/f",
        Some(json!({
            "uri": "/f",
            "upstream": {"nodes": {up.node(): 1}},
            "plugins": {"tagger": {"_meta": {"filter": [["arg_a", "like", "b"]]}}}
        })),
    );
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json()["error_msg"],
        "invalid configuration: plugins.tagger._meta.filter: failed to validate the 'vars' expression: invalid operator 'like'"
    );
    assert_eq!(admin(&gw, "GET", "/routes/f", None).status, 404);
}

/// Editing `plugin_metadata:` in the config file: the plugin sees the new value on the next
/// requests without a restart; a bad edit keeps the last good metadata serving.
#[test]
fn config_file_metadata_edits_are_live_and_bad_edits_change_nothing() {
    let up = Upstream::echo();
    let routes = format!("routes:\n{}", route(&up, "/m", "      meta-probe: {}\n"));
    let (_tmp, gw) = start(
        &format!("plugin_metadata:\n  - id: meta-probe\n    level: 1\n{routes}"),
        false,
    );
    let level = || get(&gw.url("/m")).header("x-meta-level");
    assert_eq!(level().as_deref(), Some("1"));

    let write = |body: &str| {
        let text = format!(
            "listen: {}\nworkers: 2\nplugin_dirs:\n  - plugins\n{body}{routes}",
            gw.addr()
        );
        let path = gw.config_path();
        let tmp = path.with_extension("tmp~");
        std::fs::write(&tmp, text).expect("write config");
        std::fs::rename(&tmp, path).expect("rename config");
    };
    let eventually = |f: &dyn Fn() -> bool| {
        let end = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < end {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    };

    write("plugin_metadata:\n  - id: meta-probe\n    level: 4\n");
    assert!(
        eventually(&|| (0..4).all(|_| level().as_deref() == Some("4"))),
        "log:\n{}",
        gw.logs()
    );

    write("plugin_metadata:\n  - id: meta-probe\n    level: -1\n");
    assert!(
        gw.wait_for_log(
            "plugin_metadata[0]: invalid configuration",
            Duration::from_secs(10)
        ),
        "log:\n{}",
        gw.logs()
    );
    assert_eq!(level().as_deref(), Some("4"));

    write("");
    assert!(
        eventually(&|| get(&gw.url("/m")).header("x-meta").as_deref() == Some("none")),
        "log:\n{}",
        gw.logs()
    );
}
