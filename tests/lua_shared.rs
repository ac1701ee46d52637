//! `ngx.shared`, `ngx.timer` and the `resty.limit.*` / `resty.lock` modules, exercised by the
//! project's own Lua plugins (below) through a real gateway and real requests.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;

fn gateway_with(
    plugins: &[(&str, &str)],
    extra: &str,
    routes: &str,
) -> (tempfile::TempDir, Gateway) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("plugins");
    std::fs::create_dir_all(&dir).expect("plugins dir");
    for (name, src) in plugins {
        std::fs::write(dir.join(format!("{name}.lua")), src).expect("write plugin");
    }
    let yaml = format!("plugin_dirs:\n  - plugins\n{extra}routes:\n{routes}");
    let gw = Gateway::start_in(tmp.path(), &yaml);
    (tmp, gw)
}

fn route(id: &str, uri: &str, plugin: &str, up: Option<&Upstream>) -> String {
    let mut r = format!("  - id: {id}\n    uri: {uri}\n    plugins:\n      {plugin}: {{}}\n");
    if let Some(up) = up {
        r.push_str(&format!(
            "    upstream:\n      nodes:\n        \"{}\": 1\n",
            up.node()
        ));
    }
    r
}

/// Runs the dictionary API with OpenResty's return conventions and answers with what came
/// back.
const DICT_PROBE: &str = r##"
local core = require("apisix.core")
local _M = { version = 0.1, priority = 10, name = "dict-probe", schema = { type = "object" } }

local function pack(...) return { n = select("#", ...), ... } end
local function show(t)
    local out = {}
    for i = 1, t.n do out[i] = t[i] == nil and "nil" or tostring(t[i]) end
    return table.concat(out, ",")
end

function _M.access(conf, ctx)
    local d = ngx.shared["probe-dict"]
    local out = {}
    d:flush_all()
    d:flush_expired()
    out.missing = ngx.shared["no-such-dict"] == nil
    out.same = ngx.shared["probe-dict"] == d
    out.set = show(pack(d:set("s", "v", 0, 3)))
    out.get = show(pack(d:get("s")))
    out.add_exists = show(pack(d:add("s", "w")))
    out.safe_add = show(pack(d:safe_add("n", 1)))
    out.replace_missing = show(pack(d:replace("none", 1)))
    out.incr = show(pack(d:incr("n", 2)))
    out.incr_init = show(pack(d:incr("c", -1, 10, 100)))
    out.incr_missing = show(pack(d:incr("zz", 1)))
    out.incr_nan = show(pack(d:incr("s", 1)))
    out.bool = show(pack(d:set("b", false), d:get("b")))
    out.bad_value = show(pack(d:set("t", {})))
    out.empty_key = show(pack(d:get("")))
    out.ttl_none = show(pack(d:ttl("s")))
    out.ttl_missing = show(pack(d:ttl("none")))
    local ttl = d:ttl("c")
    out.ttl_init = ttl > 99 and ttl <= 100
    out.expire = show(pack(d:expire("s", 0.001), d:expire("none", 1)))
    ngx.sleep(0.01)
    out.expired = show(pack(d:get("s")))
    out.stale = show(pack(d:get_stale("s")))
    out.delete = show(pack(d:delete("n"), d:get("n")))
    out.list = show(pack(d:rpush("l", 1), d:lpush("l", "a"), d:llen("l"), d:lpop("l"),
                         d:rpop("l"), d:rpop("l")))
    out.not_list = show(pack(d:lpush("c", 1)))
    local keys = d:get_keys(0)
    table.sort(keys)
    out.keys = table.concat(keys, ",")
    out.capacity = d:capacity()
    out.free = d:free_space() < d:capacity()
    out.flushed = d:flush_expired()
    return 200, out
end
return _M
"##;

#[test]
fn shared_dicts_follow_openresty_conventions() {
    let (_tmp, gw) = gateway_with(
        &[("dict-probe", DICT_PROBE)],
        "workers: 1\nlua:\n  shared_dicts:\n    probe-dict: 64k\n",
        &route("p", "/p", "dict-probe", None),
    );
    let r = Req::get(&gw.url("/p")).send();
    assert_eq!(r.status, 200, "{}\n{}", r.text(), gw.logs());
    let v = r.json();
    assert_eq!(v["missing"], true);
    assert_eq!(v["same"], true);
    assert_eq!(v["set"], "true,nil,false");
    assert_eq!(v["get"], "v,3");
    assert_eq!(v["add_exists"], "false,exists,false");
    assert_eq!(v["safe_add"], "true,nil,false");
    assert_eq!(v["replace_missing"], "false,not found,false");
    assert_eq!(v["incr"], "3,nil,false");
    assert_eq!(v["incr_init"], "9,nil,false");
    assert_eq!(v["incr_missing"], "nil,not found");
    assert_eq!(v["incr_nan"], "nil,not a number");
    assert_eq!(v["bool"], "true,false");
    assert_eq!(v["bad_value"], "nil,bad value type,false");
    assert_eq!(v["empty_key"], "nil,empty key");
    assert_eq!(v["ttl_none"], "0");
    assert_eq!(v["ttl_missing"], "nil,not found");
    assert_eq!(v["ttl_init"], true);
    assert_eq!(v["expire"], "true,nil,not found");
    assert_eq!(v["expired"], "nil");
    assert_eq!(v["stale"], "v,3,true");
    assert_eq!(v["delete"], "true,nil");
    assert_eq!(v["list"], "1,2,2,a,1,nil");
    assert_eq!(v["not_list"], "nil,value not a list");
    assert_eq!(v["keys"], "b,c");
    assert_eq!(v["capacity"], 65536);
    assert_eq!(v["free"], true);
}

/// Counts requests in a shared dict and says which worker answered.
const COUNTER: &str = r##"
local _M = { version = 0.1, priority = 10, name = "counter", schema = { type = "object" } }
function _M.access(conf, ctx)
    local n = ngx.shared["plugin-limit-count"]:incr("hits", 1, 0)
    return 200, { worker = ngx.worker.id(), hits = n }
end
return _M
"##;

#[test]
fn every_worker_sees_the_same_dictionary() {
    let (_tmp, gw) = gateway_with(
        &[("counter", COUNTER)],
        "workers: 2\n",
        &route("c", "/c", "counter", None),
    );
    let mut workers = HashSet::new();
    let mut last = 0;
    for i in 1..=200 {
        let v = Req::get(&gw.url("/c")).send().json();
        workers.insert(v["worker"].as_i64().expect("worker id"));
        last = v["hits"].as_i64().expect("hits");
        assert_eq!(
            last, i,
            "each request sees every earlier one, whichever worker ran it"
        );
        if workers.len() == 2 && i >= 20 {
            break;
        }
    }
    assert_eq!(workers.len(), 2, "both workers answered ({last} requests)");
}

/// Schedules timers and reports what they did through a shared dict.
const TIMERS: &str = r##"
local _M = { version = 0.1, priority = 10, name = "timers", schema = { type = "object" } }
local d = ngx.shared["probe-dict"]

function _M.access(conf, ctx)
    local what = ctx.var.arg_do
    if what == "at" then
        local ok, err = ngx.timer.at(0.05, function(premature, key, value)
            -- a timer may wait, like a request
            ngx.sleep(0.01)
            d:set(key, value .. ":" .. tostring(premature) .. ":" .. ngx.get_phase())
        end, "at", "fired")
        return 200, { ok = ok, err = err, pending = ngx.timer.pending_count() }
    elseif what == "fail" then
        ngx.timer.at(0, function() error("boom in a timer") end)
        ngx.timer.at(0.02, function() d:set("after_fail", true) end)
        return 200, {}
    elseif what == "every" then
        local ok = ngx.timer.every(0.02, function(premature)
            if not premature then d:incr("ticks", 1, 0) end
        end)
        return 200, { ok = ok }
    elseif what == "bad" then
        local ok1, e1 = pcall(ngx.timer.at, -1, function() end)
        local ok2, e2 = pcall(ngx.timer.at, 1, "nope")
        local ok3, e3 = pcall(ngx.timer.every, 0, function() end)
        return 200, { e1 = not ok1 and tostring(e1), e2 = not ok2 and tostring(e2),
                      e3 = not ok3 and tostring(e3) }
    elseif what == "exit" then
        -- fires only at shutdown, with premature = true
        ngx.timer.at(3600, function(premature, path)
            local f = io.open(path, "w")
            f:write("premature=", tostring(premature), " exiting=",
                    tostring(ngx.worker.exiting()))
            f:close()
        end, ctx.var.http_x_path)
        return 200, { exiting = ngx.worker.exiting() }
    end
    return 200, {
        at = d:get("at"),
        after_fail = d:get("after_fail"),
        ticks = d:get("ticks"),
        running = ngx.timer.running_count(),
    }
end
return _M
"##;

fn wait_for(
    gw: &Gateway,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let v = Req::get(&gw.url("/t")).send().json();
        if done(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: {v}\n{}", gw.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn timers_run_on_the_worker_and_fire_prematurely_at_shutdown() {
    let (tmp, mut gw) = gateway_with(
        &[("timers", TIMERS)],
        "workers: 1\nlua:\n  shared_dicts:\n    probe-dict: 1m\n",
        &route("t", "/t", "timers", None),
    );
    let r = Req::get(&gw.url("/t?do=at")).send();
    assert_eq!(r.status, 200, "{}\n{}", r.text(), gw.logs());
    let v = r.json();
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["pending"], 1);
    let v = wait_for(&gw, "ngx.timer.at fired", |v| v["at"].is_string());
    assert_eq!(v["at"], "fired:false:timer");

    // An error in a callback is logged and leaves the other timers alone.
    Req::get(&gw.url("/t?do=fail")).send();
    wait_for(&gw, "a timer after a failing one", |v| {
        v["after_fail"] == true
    });
    assert!(
        gw.wait_for_log("boom in a timer", Duration::from_secs(2)),
        "{}",
        gw.logs()
    );

    Req::get(&gw.url("/t?do=every")).send();
    wait_for(&gw, "ngx.timer.every repeats", |v| {
        v["ticks"].as_i64() >= Some(3)
    });

    let v = Req::get(&gw.url("/t?do=bad")).send().json();
    assert_eq!(
        v["e1"].as_str().map(|s| s.contains("invalid delay")),
        Some(true),
        "{v}"
    );
    assert_eq!(
        v["e2"]
            .as_str()
            .map(|s| s.contains("bad argument #2 to 'at'")),
        Some(true),
        "{v}"
    );
    assert_eq!(
        v["e3"].as_str().map(|s| s.contains("delay cannot be zero")),
        Some(true),
        "{v}"
    );

    let marker = tmp.path().join("premature.txt");
    let v = Req::get(&gw.url("/t?do=exit"))
        .header("x-path", marker.to_str().expect("utf-8 path"))
        .send()
        .json();
    assert_eq!(v["exiting"], false);
    gw.terminate();
    assert!(
        gw.wait_exit(Duration::from_secs(10)).is_some(),
        "gateway did not exit"
    );
    let text = std::fs::read_to_string(&marker).unwrap_or_else(|e| panic!("{e}\n{}", gw.logs()));
    assert_eq!(text, "premature=true exiting=true");
}

/// Drives resty.limit.count / req / conn and resty.lock directly.
const LIMITS: &str = r##"
local _M = { version = 0.1, priority = 10, name = "limits", schema = { type = "object" } }
local count = require("resty.limit.count")
local req = require("resty.limit.req")
local conn = require("resty.limit.conn")
local lock = require("resty.lock")

local function pack(...) return { n = select("#", ...), ... } end
local function show(t)
    local out = {}
    for i = 1, t.n do
        local v = t[i]
        if type(v) == "number" then v = string.format("%.1f", v) end
        out[i] = v == nil and "nil" or tostring(v)
    end
    return table.concat(out, ",")
end

function _M.access(conf, ctx)
    local out = {}
    local d = ngx.shared["probe-dict"]
    d:flush_all()
    out.no_dict = show(pack(count.new("nope", 1, 1)))

    local c = count.new("probe-dict", 2, 60)
    out.count = { show(pack(c:incoming("c", true))), show(pack(c:incoming("c", true))),
                  show(pack(c:incoming("c", true))), show(pack(c:incoming("c", false, 0))),
                  show(pack(c:uncommit("c"))), show(pack(c:incoming("c", true))) }

    local r = req.new("probe-dict", 2, 1)
    out.req = { show(pack(r:incoming("r", true))), show(pack(r:incoming("r", true))),
                show(pack(r:incoming("r", true))) }
    r:uncommit("r")
    out.req_after_uncommit = show(pack(r:incoming("r", false)))

    local cn = conn.new("probe-dict", 1, 1, 0.5)
    out.conn = { show(pack(cn:incoming("k", true))), show(pack(cn:incoming("k", true))),
                 show(pack(cn:incoming("k", true))), tostring(cn:is_committed()),
                 show(pack(cn:leaving("k", 0.1))), show(pack(cn:leaving("k"))) }

    local l1 = lock:new("probe-dict", { timeout = 0.05 })
    local l2 = lock:new("probe-dict", { timeout = 0.05 })
    local e1 = l1:lock("res")
    local _, e2 = l2:lock("res")
    l1:unlock()
    local e3 = l2:lock("res")
    out.lock = { tostring(e1), tostring(e2), tostring(e3), show(pack(l1:unlock())) }
    return 200, out
end
return _M
"##;

#[test]
fn resty_limit_modules_and_lock_behave_as_documented() {
    let (_tmp, gw) = gateway_with(
        &[("limits", LIMITS)],
        "workers: 1\nlua:\n  shared_dicts:\n    probe-dict: 1m\n",
        &route("l", "/l", "limits", None),
    );
    let r = Req::get(&gw.url("/l")).send();
    assert_eq!(r.status, 200, "{}\n{}", r.text(), gw.logs());
    let v = r.json();
    assert_eq!(v["no_dict"], "nil,shared dict not found");
    // count: up to 2 per window, then rejected (without using quota); a peek (cost 0) reads the
    // count; uncommit gives one back.
    assert_eq!(
        v["count"],
        serde_json::json!([
            "0.0,1.0",
            "0.0,2.0",
            "nil,rejected",
            "0.0,2.0",
            "1.0",
            "0.0,2.0"
        ])
    );
    // req: rate 2/s, burst 1: the second request waits half a second, the third is refused.
    assert_eq!(
        v["req"],
        serde_json::json!(["0.0,0.0", "0.5,1.0", "nil,rejected"])
    );
    assert_eq!(v["req_after_uncommit"], "0.5,1.0");
    // conn: 1 at once, 1 more delayed by the unit delay, then refused; leaving counts down.
    assert_eq!(
        v["conn"],
        serde_json::json!(["0.0,1.0", "0.5,2.0", "nil,rejected", "false", "1.0", "0.0"])
    );
    assert_eq!(
        v["lock"],
        serde_json::json!(["0", "timeout", "0", "nil,unlocked"])
    );
}

/// Limits concurrency with resty.limit.conn: incoming in access, leaving in log.
const CONN_LIMIT: &str = r##"
local conn = require("resty.limit.conn")
local _M = { version = 0.1, priority = 10, name = "conn-limit", schema = { type = "object" } }
function _M.access(conf, ctx)
    local lim = conn.new("plugin-limit-conn", 2, 0, 0.1)
    local delay, err = lim:incoming("route", true)
    if not delay then
        return 503, { error = err }
    end
    ctx.lim = lim
end
function _M.log(conf, ctx)
    if ctx.lim then ctx.lim:leaving("route") end
end
return _M
"##;

#[test]
fn concurrent_requests_beyond_the_limit_are_refused_and_slots_come_back() {
    let up = Upstream::slow(Duration::from_millis(600));
    let (_tmp, gw) = gateway_with(
        &[("conn-limit", CONN_LIMIT)],
        "workers: 2\n",
        &route("s", "/s", "conn-limit", Some(&up)),
    );
    let url = gw.url("/s");
    let clients: Vec<_> = (0..5)
        .map(|_| {
            let u = url.clone();
            std::thread::spawn(move || Req::get(&u).send().status)
        })
        .collect();
    let mut statuses: Vec<u16> = clients
        .into_iter()
        .map(|c| c.join().expect("client"))
        .collect();
    statuses.sort_unstable();
    assert_eq!(statuses, vec![200, 200, 503, 503, 503], "{}", gw.logs());
    // The slots were given back in the log phase.
    assert_eq!(Req::get(&url).send().status, 200);
}

#[test]
fn a_bad_shared_dict_size_is_refused_with_its_path() {
    let (code, out) = check("lua:\n  shared_dicts:\n    my-dict: 10q\n");
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("lua.shared_dicts.my-dict"), "{out}");
    assert!(out.contains("invalid size \"10q\""), "{out}");
    let (code, out) = check("lua:\n  shared_dicts:\n    my-dict: 1k\n");
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("too small"), "{out}");
    let (code, out) = check("lua:\n  shared_dicts:\n    my-dict: 512k\n");
    assert_eq!(code, 0, "{out}");
}
