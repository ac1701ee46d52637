//! `flatbuffers` and the `A6.*` ext-plugin protocol modules, `ngx.pipe` and `apisix.events`,
//! exercised by the project's own Lua plugins through a real gateway: a plugin that speaks
//! APISIX's ext-plugin protocol to a runner written with Google's FlatBuffers (Python), and
//! a probe of the builder and readers themselves.

mod common;

use common::ext_runner::ExtRunner;
use common::*;

/// Speaks the runner protocol as APISIX's ext-plugin does: PrepareConf (conf entry
/// `conf.action` = "v1") for a token, then HTTPReqCall with the request; answers ExtraInfo
/// `Var` questions with `ctx.var`; a Stop ends the request with its status, headers and
/// body; a Rewrite sets the upstream path and request headers.
const A6_CLIENT: &str = r#"
local core = require("apisix.core")
local flatbuffers = require("flatbuffers")
local text_entry = require("A6.TextEntry")
local prepare_req = require("A6.PrepareConf.Req")
local prepare_resp = require("A6.PrepareConf.Resp")
local call_req = require("A6.HTTPReqCall.Req")
local call_resp = require("A6.HTTPReqCall.Resp")
local action = require("A6.HTTPReqCall.Action")
local stop_t = require("A6.HTTPReqCall.Stop")
local rewrite_t = require("A6.HTTPReqCall.Rewrite")
local method = require("A6.Method")
local info_req = require("A6.ExtraInfo.Req")
local info_var = require("A6.ExtraInfo.Var")
local info_resp = require("A6.ExtraInfo.Resp")
local info = require("A6.ExtraInfo.Info")

local _M = { version = 0.1, priority = 1000, name = "a6-client", schema = {
    type = "object", properties = { sock = { type = "string" }, action = { type = "string" } },
    required = { "sock", "action" } } }

function _M.check_schema(conf)
    return core.schema.check(_M.schema, conf)
end

local function send(sock, ty, data)
    local n = #data
    return sock:send(string.char(ty, math.floor(n / 65536) % 256, math.floor(n / 256) % 256,
        n % 256) .. data)
end

local function receive(sock)
    local hdr = assert(sock:receive(4))
    local ty, a, b, c = hdr:byte(1, 4)
    local n = a * 65536 + b * 256 + c
    return ty, n > 0 and assert(sock:receive(n)) or ""
end

local function entries(b, list, start_vec)
    local offs = {}
    for i, kv in ipairs(list) do
        local name = b:CreateString(kv[1])
        local value = b:CreateString(kv[2])
        text_entry.Start(b)
        text_entry.AddName(b, name)
        text_entry.AddValue(b, value)
        offs[i] = text_entry.End(b)
    end
    start_vec(b, #offs)
    for i = #offs, 1, -1 do
        b:PrependUOffsetTRelative(offs[i])
    end
    return b:EndVector(#offs)
end

function _M.access(conf, ctx)
    local sock = ngx.socket.tcp()
    sock:settimeouts(2000, 2000, 2000)
    assert(sock:connect("unix:" .. conf.sock))
    local b = flatbuffers.Builder(0)

    local key = b:CreateString("route-key")
    local confs = entries(b, { { conf.action, "v1" } }, prepare_req.StartConfVector)
    prepare_req.Start(b)
    prepare_req.AddConf(b, confs)
    prepare_req.AddKey(b, key)
    b:Finish(prepare_req.End(b))
    assert(send(sock, 1, b:Output()))
    local ty, data = receive(sock)
    assert(ty == 1, "prepare answered type " .. ty)
    local token = prepare_resp.GetRootAsResp(flatbuffers.binaryArray.New(data), 0):ConfToken()

    b:Clear()
    local path = b:CreateString(ctx.var.uri)
    local ip = b:CreateByteVector(ctx.var.binary_remote_addr)
    local args = {}
    for k, v in pairs(core.request.get_uri_args(ctx)) do
        args[#args + 1] = { k, v }
    end
    local args_vec = entries(b, args, call_req.StartArgsVector)
    local hdrs_vec = entries(b, { { "X-Probe", core.request.header(ctx, "X-Probe") or "" } },
                             call_req.StartHeadersVector)
    call_req.Start(b)
    call_req.AddId(b, 7)
    call_req.AddConfToken(b, token)
    call_req.AddSrcIp(b, ip)
    call_req.AddPath(b, path)
    call_req.AddArgs(b, args_vec)
    call_req.AddHeaders(b, hdrs_vec)
    call_req.AddMethod(b, method[ctx.var.request_method])
    b:Finish(call_req.End(b))
    assert(send(sock, 2, b:Output()))

    while true do
        ty, data = receive(sock)
        if ty ~= 3 then break end
        local q = info_req.GetRootAsReq(data, 0)
        assert(q:InfoType() == info.Var, "unexpected info type " .. q:InfoType())
        local u = q:Info()
        local var = info_var.New()
        var:Init(u.bytes, u.pos)
        b:Clear()
        local res = b:CreateByteVector(tostring(ctx.var[var:Name()]))
        info_resp.Start(b)
        info_resp.AddResult(b, res)
        b:Finish(info_resp.End(b))
        assert(send(sock, 3, b:Output()))
    end
    sock:setkeepalive()
    assert(ty == 2, "call answered type " .. ty)

    local r = call_resp.GetRootAsResp(flatbuffers.binaryArray.New(data), 0)
    assert(r:Id() == 7, "id " .. r:Id())
    local a = r:Action()
    if r:ActionType() == action.Stop then
        local stop = stop_t.New()
        stop:Init(a.bytes, a.pos)
        for i = 1, stop:HeadersLength() do
            local e = stop:Headers(i)
            core.response.set_header(e:Name(), e:Value())
        end
        return stop:Status(), stop:BodyAsString()
    end
    assert(r:ActionType() == action.Rewrite)
    local rw = rewrite_t.New()
    rw:Init(a.bytes, a.pos)
    ctx.var.upstream_uri = rw:Path()
    for i = 1, rw:HeadersLength() do
        local e = rw:Headers(i)
        core.request.set_header(ctx, e:Name(), e:Value())
    end
    core.request.set_header(ctx, "X-Args-Seen", tostring(rw:ArgsLength()) .. ":"
        .. tostring(rw:Args(1):Value()) .. ":" .. rw:Args(2):Name() .. "=" .. rw:Args(2):Value())
end

return _M
"#;

/// Builds a table with every scalar kind, a string, a byte vector and a nested table, reads
/// it back, and answers what came back (and what misuse and a truncated buffer answer).
const FB_PROBE: &str = r#"
local core = require("apisix.core")
local fb = require("flatbuffers")
local N = fb.N
local _M = { version = 0.1, priority = 1000, name = "fb-probe", schema = { type = "object" } }

function _M.access(conf, ctx)
    local b = fb.Builder(0)
    local s = b:CreateString(string.rep("x", 300)) -- grows the 64-byte start buffer
    local bytes = b:CreateByteVector("\0\1\2\127")
    b:StartObject(2)
    b:PrependInt16Slot(0, -2, 0)
    local inner = b:EndObject()
    b:StartObject(9)
    b:PrependBoolSlot(0, true, false)
    b:PrependInt8Slot(1, -5, 0)
    b:PrependUint16Slot(2, 65535, 0)
    b:PrependInt32Slot(3, -70000, 0)
    b:PrependUint32Slot(4, 4000000000, 0)
    b:PrependFloat64Slot(5, 1.5, 0)
    b:PrependUOffsetTRelativeSlot(6, s, 0)
    b:PrependUOffsetTRelativeSlot(7, bytes, 0)
    b:PrependUint32Slot(8, 0, 0) -- equal to its default: left out
    local root = b:EndObject()
    b:StartObject(1)
    b:PrependUOffsetTRelativeSlot(0, inner, 0)
    local holder = b:EndObject()
    b:StartObject(2)
    b:PrependUOffsetTRelativeSlot(0, root, 0)
    b:PrependUOffsetTRelativeSlot(1, holder, 0)
    b:Finish(b:EndObject())
    local out = b:Output()

    local buf = fb.binaryArray.New(out)
    local top = fb.view.New(buf, N.UOffsetT:Unpack(buf, 0))
    local v = fb.view.New(buf, top:Indirect(top.pos + top:Offset(4)))
    local h = fb.view.New(buf, top:Indirect(top.pos + top:Offset(6)))
    local i = fb.view.New(buf, h:Indirect(h.pos + h:Offset(4)))
    local res = {
        size_aligned = #out % 4 == 0,
        bool = v:GetSlot(4, false, N.Bool),
        int8 = v:GetSlot(6, 0, N.Int8),
        uint16 = v:GetSlot(8, 0, N.Uint16),
        int32 = v:GetSlot(10, 0, N.Int32),
        uint32 = v:GetSlot(12, 0, N.Uint32),
        float64 = v:GetSlot(14, 0, N.Float64),
        str_len = #v:String(v.pos + v:Offset(16)),
        bytes = v:VectorAsString(18),
        bytes_2_3 = v:VectorAsString(18, 2, 3),
        bytes_len = v:VectorLen(v:Offset(18)),
        absent = v:Offset(20),
        beyond_vtable = v:Offset(40),
        default = v:GetSlot(20, 42, N.Uint32),
        inner = i:GetSlot(4, 0, N.Int16),
        pack = N.Uint16:Pack(258) == "\2\1",
        valid = { N.Uint8:ValidNumber(255), N.Uint8:ValidNumber(256), N.Int8:ValidNumber(-129) },
    }
    local ok, err = pcall(function()
        local short = fb.binaryArray.New(out:sub(1, 6))
        return fb.view.New(short, N.UOffsetT:Unpack(short, 0)):Offset(4)
    end)
    res.truncated = ok and "read" or tostring(err):match("past the end of a 6%-byte buffer") and
        "refused" or tostring(err)
    b:Clear()
    b:StartObject(1)
    ok, err = pcall(b.CreateString, b, "x")
    res.nested = tostring(err):match("inside an object") and "refused" or tostring(err)
    return 200, res
end

return _M
"#;

fn gateway(plugins: &[(&str, &str)], routes: &str) -> (tempfile::TempDir, Gateway) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("plugins");
    std::fs::create_dir_all(&dir).expect("plugins dir");
    for (name, src) in plugins {
        std::fs::write(dir.join(format!("{name}.lua")), src).expect("write plugin");
    }
    let yaml = format!("plugin_dirs:\n  - plugins\nroutes:\n{routes}");
    let gw = Gateway::start_in(tmp.path(), &yaml);
    (tmp, gw)
}

#[test]
fn flatbuffers_builder_and_readers_agree_on_every_kind() {
    let up = Upstream::echo();
    let routes = format!(
        "  - id: fb\n    uri: /fb\n    plugins:\n      fb-probe: {{}}\n    upstream:\n      nodes:\n        \"{}\": 1\n",
        up.node()
    );
    let (_tmp, gw) = gateway(&[("fb-probe", FB_PROBE)], &routes);
    let r = get(&gw.url("/fb"));
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!(j["size_aligned"], true);
    assert_eq!(j["bool"], true);
    assert_eq!(j["int8"], -5);
    assert_eq!(j["uint16"], 65535);
    assert_eq!(j["int32"], -70000);
    assert_eq!(j["uint32"], 4_000_000_000u64);
    assert_eq!(j["float64"], 1.5);
    assert_eq!(j["str_len"], 300);
    assert_eq!(j["bytes"], "\u{0}\u{1}\u{2}\u{7f}");
    assert_eq!(j["bytes_len"], 4);
    assert_eq!(j["bytes_2_3"], "\u{1}\u{2}");
    assert_eq!(j["absent"], 0, "a default-valued field is not written");
    assert_eq!(j["beyond_vtable"], 0);
    assert_eq!(j["default"], 42);
    assert_eq!(j["inner"], -2);
    assert_eq!(j["pack"], true);
    assert_eq!(j["valid"], serde_json::json!([true, false, false]));
    assert_eq!(
        j["truncated"], "refused",
        "a short buffer is an error, not a wild read"
    );
    assert_eq!(j["nested"], "refused");
}

fn a6_routes(sock: &str, up: &Upstream) -> String {
    format!(
        "  - id: stop\n    uri: /stop\n    plugins:\n      a6-client: {{sock: \"{sock}\", action: stop}}\n    upstream:\n      nodes:\n        \"{n}\": 1\n\
         \x20 - id: rw\n    uri: /rw\n    plugins:\n      a6-client: {{sock: \"{sock}\", action: rewrite}}\n    upstream:\n      nodes:\n        \"{n}\": 1\n",
        n = up.node()
    )
}

#[test]
fn a6_messages_round_trip_with_a_flatbuffers_runner() {
    let runner = ExtRunner::start();
    let up = Upstream::echo();
    let sock = runner.socket().display().to_string();
    let (_tmp, gw) = gateway(&[("a6-client", A6_CLIENT)], &a6_routes(&sock, &up));

    // Stop: the runner read the path, args, source address, method and a header.
    let r = Req::get(&gw.url("/stop?k=v"))
        .header("X-Probe", "p1")
        .send();
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.text(), "stopped: /stop args=k=v ip=127.0.0.1 hdr=p1");
    assert_eq!(r.header("x-runner-path").as_deref(), Some("/stop"));
    assert_eq!(r.header("x-runner-conf").as_deref(), Some("v1"));
    assert_eq!(r.header("x-runner-method").as_deref(), Some("GET"));
    assert_eq!(up.requests(), 0);

    // Rewrite, after the runner asked for `remote_addr` (ExtraInfo): new path and header; the
    // args entries came through (one without a value).
    let r = Req::post(&gw.url("/rw?a=1")).send();
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!(j["uri"], "/rewritten");
    assert_eq!(j["headers"]["x-runner-var"], "127.0.0.1");
    assert_eq!(j["headers"]["x-args-seen"], "2:nil:b=2");
}

/// `ngx.pipe`: a child's merged output read line by line after writing to its stdin, its
/// exit status; separate stderr; a read timeout; a kill seen by `wait`; a spawn failure.
const PIPE_PROBE: &str = r#"
local core = require("apisix.core")
local pipe = require("ngx.pipe")
local _M = { version = 0.1, priority = 1000, name = "pipe-probe", schema = { type = "object" } }

function _M.access(conf, ctx)
    local res = {}
    local p = assert(pipe.spawn({ "/bin/sh", "-c",
        "echo one; echo two >&2; read x; echo got $x; exit 3" }, { merge_stderr = true }))
    res.pid_ok = p:pid() > 0
    res.l1 = p:stdout_read_line()
    res.l2 = p:stdout_read_line()
    res.wrote = p:write("hello\n")
    res.l3 = p:stdout_read_line()
    res.eof = select(2, p:stdout_read_line())
    res.merged = select(2, p:stderr_read_all())
    local ok, reason, status = p:wait()
    res.wait = { ok, reason, status }

    local q = assert(pipe.spawn("printf out; printf err >&2"))
    res.out = q:stdout_read_all()
    res.err = q:stderr_read_all()
    res.q_wait = { q:wait() }

    local s = assert(pipe.spawn({ "sleep", "30" }))
    s:set_timeouts(nil, 50)
    res.timeout = select(2, s:stdout_read_line())
    res.kill = s:kill(15)
    res.killed = { s:wait() }

    res.spawn_err = select(2, pipe.spawn({ "/nonexistent/moongate-probe" }))
    return 200, res
end

return _M
"#;

#[test]
fn ngx_pipe_runs_a_child_without_blocking_the_worker() {
    let up = Upstream::echo();
    let routes = format!(
        "  - id: p\n    uri: /p\n    plugins:\n      pipe-probe: {{}}\n    upstream:\n      nodes:\n        \"{}\": 1\n",
        up.node()
    );
    let (_tmp, gw) = gateway(&[("pipe-probe", PIPE_PROBE)], &routes);
    let r = get(&gw.url("/p"));
    assert_eq!(r.status, 200, "{} {}", r.text(), gw.logs());
    let j = r.json();
    assert_eq!(j["pid_ok"], true);
    assert_eq!(
        (j["l1"].as_str(), j["l2"].as_str()),
        (Some("one"), Some("two"))
    );
    assert_eq!(j["wrote"], 6);
    assert_eq!(j["l3"], "got hello");
    assert_eq!(j["eof"], "closed");
    assert_eq!(j["merged"], "merged to stdout");
    assert_eq!(j["wait"], serde_json::json!([false, "exit", 3]));
    assert_eq!(
        (j["out"].as_str(), j["err"].as_str()),
        (Some("out"), Some("err"))
    );
    assert_eq!(j["q_wait"], serde_json::json!([true, "exit", 0]));
    assert_eq!(j["timeout"], "timeout");
    assert_eq!(j["kill"], true);
    assert_eq!(j["killed"], serde_json::json!([false, "signal", 15]));
    assert_eq!(j["spawn_err"], "No such file or directory");
}
