//! The Lua half of the plugin API, embedded in the binary so `moongate` runs from any folder.
//! The runtime serves `require(name)` from [`MODULES`] (before `package.path`).

/// `(module name, source)` for every module under `lua/`: `apisix.core` and its submodules,
/// `apisix.plugin`, `apisix.schema_def`, and the OpenResty libraries plugins expect
/// (`cjson`, `cjson.safe`, `table.nkeys`/`isarray`/`isempty`/`clone`, `tablepool`,
/// `resty.lrucache`, `resty.ipmatcher`, `resty.limit.count`/`req`/`conn`, `resty.lock`,
/// `resty.string`, `resty.jit-uuid`, `pl.stringx`, `pl.path` (over the native `lfs`), and stand-ins that load but refuse to connect
/// when the real library is not on `package.path`, [`STAND_INS`]), `resty.http`,
/// `resty.logger.socket` over cosockets, `resty.session` (cookie storage), LuaSocket's `socket.url`. `resty.redis` is the
/// real lua-resty-redis, found on `package.path` (see `lua.package_path`). `table.new` and `table.clear` are LuaJIT built-ins.
/// Modules backed by Rust (digests, ciphers, zlib, brotli, `lfs`, `resty.signal`, `resty.shell`)
/// are registered by `crypto.rs`, `compress.rs`, `lfs.rs` and `shell.rs`.
/// Modules of [`MODULES`] served only when `package.path` has no such module: the real library,
/// when installed, wins.
pub const STAND_INS: &[&str] = &["resty.rediscluster", "resty.redis.connector"];

pub const MODULES: &[(&str, &str)] = &[
    ("apisix.core", include_str!("../../../lua/apisix/core.lua")),
    (
        "apisix.core.config_local",
        include_str!("../../../lua/apisix/core/config_local.lua"),
    ),
    (
        "apisix.core.ctx",
        include_str!("../../../lua/apisix/core/ctx.lua"),
    ),
    (
        "apisix.core.ip",
        include_str!("../../../lua/apisix/core/ip.lua"),
    ),
    (
        "apisix.core.json",
        include_str!("../../../lua/apisix/core/json.lua"),
    ),
    (
        "apisix.core.log",
        include_str!("../../../lua/apisix/core/log.lua"),
    ),
    (
        "apisix.core.lrucache",
        include_str!("../../../lua/apisix/core/lrucache.lua"),
    ),
    (
        "apisix.core.request",
        include_str!("../../../lua/apisix/core/request.lua"),
    ),
    (
        "apisix.core.response",
        include_str!("../../../lua/apisix/core/response.lua"),
    ),
    (
        "apisix.core.schema",
        include_str!("../../../lua/apisix/core/schema.lua"),
    ),
    (
        "apisix.core.string",
        include_str!("../../../lua/apisix/core/string.lua"),
    ),
    (
        "apisix.core.table",
        include_str!("../../../lua/apisix/core/table.lua"),
    ),
    (
        "apisix.core.utils",
        include_str!("../../../lua/apisix/core/utils.lua"),
    ),
    (
        "apisix.core.version",
        include_str!("../../../lua/apisix/core/version.lua"),
    ),
    (
        "apisix.plugin",
        include_str!("../../../lua/apisix/plugin.lua"),
    ),
    (
        "apisix.schema_def",
        include_str!("../../../lua/apisix/schema_def.lua"),
    ),
    ("cjson", include_str!("../../../lua/cjson.lua")),
    ("cjson.safe", include_str!("../../../lua/cjson/safe.lua")),
    (
        "resty.ipmatcher",
        include_str!("../../../lua/resty/ipmatcher.lua"),
    ),
    (
        "resty.lrucache",
        include_str!("../../../lua/resty/lrucache.lua"),
    ),
    ("table.clone", include_str!("../../../lua/table/clone.lua")),
    (
        "table.isarray",
        include_str!("../../../lua/table/isarray.lua"),
    ),
    (
        "table.isempty",
        include_str!("../../../lua/table/isempty.lua"),
    ),
    ("table.nkeys", include_str!("../../../lua/table/nkeys.lua")),
    ("tablepool", include_str!("../../../lua/tablepool.lua")),
    (
        "apisix.consumer",
        include_str!("../../../lua/apisix/consumer.lua"),
    ),
    (
        "apisix.secret",
        include_str!("../../../lua/apisix/secret.lua"),
    ),
    (
        "apisix.utils.auth",
        include_str!("../../../lua/apisix/utils/auth.lua"),
    ),
    ("ngx.re", include_str!("../../../lua/ngx/re.lua")),
    ("resty.core", include_str!("../../../lua/resty/core.lua")),
    (
        "resty.core.regex",
        include_str!("../../../lua/resty/core/regex.lua"),
    ),
    (
        "resty.expr.v1",
        include_str!("../../../lua/resty/expr/v1.lua"),
    ),
    ("pl.stringx", include_str!("../../../lua/pl/stringx.lua")),
    ("pl.path", include_str!("../../../lua/pl/path.lua")),
    (
        "resty.cosocket_stub",
        include_str!("../../../lua/resty/cosocket_stub.lua"),
    ),
    ("resty.http", include_str!("../../../lua/resty/http.lua")),
    (
        "resty.jit-uuid",
        include_str!("../../../lua/resty/jit-uuid.lua"),
    ),
    (
        "resty.limit.conn",
        include_str!("../../../lua/resty/limit/conn.lua"),
    ),
    (
        "resty.limit.count",
        include_str!("../../../lua/resty/limit/count.lua"),
    ),
    (
        "resty.limit.req",
        include_str!("../../../lua/resty/limit/req.lua"),
    ),
    ("resty.lock", include_str!("../../../lua/resty/lock.lua")),
    (
        "resty.redis.connector",
        include_str!("../../../lua/resty/redis/connector.lua"),
    ),
    (
        "resty.rediscluster",
        include_str!("../../../lua/resty/rediscluster.lua"),
    ),
    (
        "resty.string",
        include_str!("../../../lua/resty/string.lua"),
    ),
    (
        "apisix.timers",
        include_str!("../../../lua/apisix/timers.lua"),
    ),
    (
        "apisix.constants",
        include_str!("../../../lua/apisix/constants.lua"),
    ),
    (
        "apisix.balancer.roundrobin",
        include_str!("../../../lua/apisix/balancer/roundrobin.lua"),
    ),
    (
        "resty.roundrobin",
        include_str!("../../../lua/resty/roundrobin.lua"),
    ),
    ("resty.jwt", include_str!("../../../lua/resty/jwt.lua")),
    (
        "resty.logger.socket",
        include_str!("../../../lua/resty/logger/socket.lua"),
    ),
    (
        "resty.session",
        include_str!("../../../lua/resty/session.lua"),
    ),
    (
        "apisix.plugins.prometheus.exporter",
        include_str!("../../../lua/apisix/plugins/prometheus/exporter.lua"),
    ),
    ("xml2lua", include_str!("../../../lua/xml2lua.lua")),
    ("net.url", include_str!("../../../lua/net/url.lua")),
    ("socket.url", include_str!("../../../lua/socket/url.lua")),
    (
        "apisix.http.service",
        include_str!("../../../lua/apisix/http/service.lua"),
    ),
    (
        "apisix.upstream",
        include_str!("../../../lua/apisix/upstream.lua"),
    ),
    (
        "apisix.router",
        include_str!("../../../lua/apisix/router.lua"),
    ),
    (
        "apisix.plugin_config",
        include_str!("../../../lua/apisix/plugin_config.lua"),
    ),
    (
        "apisix.api_router",
        include_str!("../../../lua/apisix/api_router.lua"),
    ),
    ("multipart", include_str!("../../../lua/multipart.lua")),
    ("jsonpath", include_str!("../../../lua/jsonpath.lua")),
    ("jsonschema", include_str!("../../../lua/jsonschema.lua")),
    (
        "resty.radixtree",
        include_str!("../../../lua/resty/radixtree.lua"),
    ),
    (
        "resty.jwt-validators",
        include_str!("../../../lua/resty/jwt-validators.lua"),
    ),
    (
        "resty.core.base",
        include_str!("../../../lua/resty/core/base.lua"),
    ),
    (
        "apisix.events",
        include_str!("../../../lua/apisix/events.lua"),
    ),
    ("flatbuffers", include_str!("../../../lua/flatbuffers.lua")),
    (
        "A6.ext_plugin",
        include_str!("../../../lua/A6/ext_plugin.lua"),
    ),
    (
        "A6.TextEntry",
        "return require(\"A6.ext_plugin\")[\"A6.TextEntry\"]",
    ),
    (
        "A6.DataEntry",
        "return require(\"A6.ext_plugin\")[\"A6.DataEntry\"]",
    ),
    (
        "A6.Method",
        "return require(\"A6.ext_plugin\")[\"A6.Method\"]",
    ),
    (
        "A6.Err.Code",
        "return require(\"A6.ext_plugin\")[\"A6.Err.Code\"]",
    ),
    (
        "A6.Err.Resp",
        "return require(\"A6.ext_plugin\")[\"A6.Err.Resp\"]",
    ),
    (
        "A6.PrepareConf.Req",
        "return require(\"A6.ext_plugin\")[\"A6.PrepareConf.Req\"]",
    ),
    (
        "A6.PrepareConf.Resp",
        "return require(\"A6.ext_plugin\")[\"A6.PrepareConf.Resp\"]",
    ),
    (
        "A6.HTTPReqCall.Req",
        "return require(\"A6.ext_plugin\")[\"A6.HTTPReqCall.Req\"]",
    ),
    (
        "A6.HTTPReqCall.Stop",
        "return require(\"A6.ext_plugin\")[\"A6.HTTPReqCall.Stop\"]",
    ),
    (
        "A6.HTTPReqCall.Rewrite",
        "return require(\"A6.ext_plugin\")[\"A6.HTTPReqCall.Rewrite\"]",
    ),
    (
        "A6.HTTPReqCall.Action",
        "return require(\"A6.ext_plugin\")[\"A6.HTTPReqCall.Action\"]",
    ),
    (
        "A6.HTTPReqCall.Resp",
        "return require(\"A6.ext_plugin\")[\"A6.HTTPReqCall.Resp\"]",
    ),
    (
        "A6.ExtraInfo.Var",
        "return require(\"A6.ext_plugin\")[\"A6.ExtraInfo.Var\"]",
    ),
    (
        "A6.ExtraInfo.ReqBody",
        "return require(\"A6.ext_plugin\")[\"A6.ExtraInfo.ReqBody\"]",
    ),
    (
        "A6.ExtraInfo.RespBody",
        "return require(\"A6.ext_plugin\")[\"A6.ExtraInfo.RespBody\"]",
    ),
    (
        "A6.ExtraInfo.Info",
        "return require(\"A6.ext_plugin\")[\"A6.ExtraInfo.Info\"]",
    ),
    (
        "A6.ExtraInfo.Req",
        "return require(\"A6.ext_plugin\")[\"A6.ExtraInfo.Req\"]",
    ),
    (
        "A6.ExtraInfo.Resp",
        "return require(\"A6.ext_plugin\")[\"A6.ExtraInfo.Resp\"]",
    ),
    (
        "A6.HTTPRespCall.Req",
        "return require(\"A6.ext_plugin\")[\"A6.HTTPRespCall.Req\"]",
    ),
    (
        "A6.HTTPRespCall.Resp",
        "return require(\"A6.ext_plugin\")[\"A6.HTTPRespCall.Resp\"]",
    ),
    (
        "resty.template",
        include_str!("../../../lua/resty/template.lua"),
    ),
    (
        "xmlhandler.tree",
        include_str!("../../../lua/xmlhandler/tree.lua"),
    ),
];

#[cfg(test)]
mod tests {
    use super::MODULES;

    #[test]
    fn names_are_unique_and_sources_non_empty() {
        let mut names: Vec<&str> = MODULES.iter().map(|(n, _)| *n).collect();
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(before, names.len(), "a module is listed twice");
        assert!(MODULES.iter().all(|(_, src)| !src.trim().is_empty()));
        assert!(names.contains(&"apisix.core"));
    }

    /// Runs `code` with module `name` as the global `M` and `eq(got, want)`, which raises an
    /// error naming both values when they differ.
    fn check_pure_module(name: &str, code: &str) {
        const EQ: &str = r#"
            function eq(got, want)
                if got ~= want then
                    error(("got %q, want %q"):format(tostring(got), tostring(want)), 2)
                end
            end"#;
        let (_, src) = MODULES.iter().find(|(n, _)| *n == name).expect("module");
        let lua = mlua::Lua::new();
        let module: mlua::Value = lua.load(*src).set_name(name).eval().expect("module loads");
        lua.globals().set("M", module).expect("global");
        lua.load(EQ).exec().expect("eq");
        if let Err(e) = lua.load(code).exec() {
            panic!("{e}");
        }
    }

    #[test]
    fn socket_url_parses_and_builds_as_luasocket() {
        check_pure_module(
            "socket.url",
            r##"
            -- what APISIX's AI providers read from an endpoint
            local u = M.parse("https://user:pw@api.example.com:8443/v1/chat;p=1?a=1&b=2#frag")
            eq(u.scheme, "https"); eq(u.authority, "user:pw@api.example.com:8443")
            eq(u.userinfo, "user:pw"); eq(u.user, "user"); eq(u.password, "pw")
            eq(u.host, "api.example.com"); eq(u.port, "8443"); eq(u.path, "/v1/chat")
            eq(u.params, "p=1"); eq(u.query, "a=1&b=2"); eq(u.fragment, "frag")
            local h = M.parse("http://[::1]:80/x"); eq(h.host, "::1"); eq(h.port, "80")
            local d = M.parse("/only/path", { scheme = "http", host = "d" })
            eq(d.scheme, "http"); eq(d.host, "d"); eq(d.path, "/only/path")
            local none, err = M.parse(""); eq(none, nil); eq(err, "invalid url")
            eq(M.build(u), "https://user:pw@api.example.com:8443/v1/chat;p=1?a=1&b=2#frag")
            eq(M.build({ scheme = "http", host = "::1", port = "8080", path = "/a b" }),
               "http://[::1]:8080/a%20b")
            eq(M.escape("a b/c"), "a%20b%2fc"); eq(M.unescape("a%20b%2Fc"), "a b/c")
            local p = M.parse_path("/a/b%20c/")
            eq(p[1], "a"); eq(p[2], "b c"); eq(p.is_absolute, 1); eq(p.is_directory, 1)
            eq(M.build_path(p), "/a/b%20c/")
            eq(M.absolute("http://a/b/c/d;p?q", "g"), "http://a/b/c/g")
            eq(M.absolute("http://a/b/c/d;p?q", "../g"), "http://a/b/g")
            eq(M.absolute("http://a/b/c/d;p?q", "/g"), "http://a/g")
            eq(M.absolute("http://a/b/c/d;p?q", "//g"), "http://g")
            eq(M.absolute("http://a/b/c/d;p?q", "https://x/y"), "https://x/y")
            "##,
        );
    }

    #[test]
    fn net_url_parses_builds_and_resolves() {
        check_pure_module(
            "net.url",
            r##"
            -- what APISIX's http-logger reads
            local u = M.parse("https://user:p%40ss@Logs.Example.com:8443/v1/ingest?x=1&y=a+b#top")
            eq(u.scheme, "https"); eq(u.host, "Logs.Example.com"); eq(u.port, 8443)
            eq(u.user, "user"); eq(u.password, "p@ss"); eq(u.path, "/v1/ingest")
            eq(u.query.x, "1"); eq(u.query.y, "a b"); eq(u.fragment, "top")
            eq(tostring(u.query), "x=1&y=a%20b")
            local bare = M.parse("http://127.0.0.1:9000")
            eq(bare.port, 9000); eq(bare.path, ""); eq(next(bare.query), nil)
            eq(M.parse("http://[::1]:80/a").host, "[::1]")
            eq(M.parse("http://h").port, nil)
            -- building
            local b = M.parse("http://www.example.com")
            b.query.foo = "bar"
            eq(tostring(b), "http://www.example.com/?foo=bar")
            eq(tostring(M.parse("http://h/a%20b?q=1")), "http://h/a%20b?q=1")
            -- bracketed queries, as the rock's
            local q = M.parseQuery("first=abc&a[]=123&a[]=false&b[k]=v")
            eq(q.first, "abc"); eq(q.a[1], "123"); eq(q.a[2], "false"); eq(q.b.k, "v")
            eq(tostring(q), "a[1]=123&a[2]=false&b[k]=v&first=abc")
            -- normalize
            eq(tostring(M.parse("http://www.FOO.com:80///foo/../foo/./bar"):normalize()),
               "http://www.foo.com/foo/bar")
            eq(M.removeDotSegments("/a/b/c/./../../g"), "/a/g")
            eq(M.removeDotSegments("mid/content=5/../6"), "mid/6")
            -- RFC 3986, 5.4.1 normal examples
            local base = M.parse("http://a/b/c/d;p?q")
            for ref, want in pairs({
                ["g"] = "http://a/b/c/g", ["./g"] = "http://a/b/c/g", ["g/"] = "http://a/b/c/g/",
                ["/g"] = "http://a/g", ["//g"] = "http://g", ["?y"] = "http://a/b/c/d;p?y",
                ["g?y"] = "http://a/b/c/g?y", ["#s"] = "http://a/b/c/d;p?q#s",
                ["g#s"] = "http://a/b/c/g#s", [".."] = "http://a/b/", ["../g"] = "http://a/b/g",
                ["../.."] = "http://a/", ["../../g"] = "http://a/g", [""] = "http://a/b/c/d;p?q",
                ["g:h"] = "g:h",
            }) do
                eq(tostring(base:resolve(ref)), want)
            end
            "##,
        );
    }

    #[test]
    fn resty_template_renders_lua_resty_template_syntax() {
        check_pure_module(
            "resty.template",
            r##"
            local t = M
            local function run(view, ctx) return t.compile(view)(ctx) end
            eq(run("Hello {{name}}!", { name = "<b>\"x\"</b>" }),
               "Hello &lt;b&gt;&quot;x&quot;&lt;&#47;b&gt;!")
            eq(run("{*name*}|{*missing*}|{*f*}", { name = "<raw>", f = function() return 7 end }),
               "<raw>||7")
            -- a code tag alone on its line leaves no blank line
            eq(run("[\n{% for i, v in ipairs(list) do %}\n  {{v}}\n{% end %}\n]", { list = { "a", "b" } }),
               "[\n  a\n  b\n]")
            eq(run("a{# note #}b"), "ab")
            eq(run("\\{{x}} {{x}}", { x = 1 }), "{{x}} 1")
            eq(run("{-raw-}{{x}}{-raw-}", { x = 1 }), "{{x}}")
            -- helpers from the context's metatable, as body-transformer passes them
            local ctx = setmetatable({ name = "n" }, { __index = { up = string.upper } })
            eq(run("{*up(name)*}", ctx), "N")
            -- context and globals
            eq(run("{*context.k*}{*type(k)*}", { k = "v" }), "vstring")
            -- an include with its own context
            eq(run("<{(inner {{x}}, {x = 2})}>", { x = 1 }), "<inner 2>")
            -- a block is kept, not written
            local out = run("{-side-}S{{x}}{-side-}main", { x = 3 })
            eq(out, "main")
            -- a template that does not compile is an error the caller can catch
            local ok, err = pcall(t.compile, "{% if %}")
            eq(ok, false)
            assert(tostring(err):find("expected", 1, true) or tostring(err):find("unexpected", 1, true), err)
            "##,
        );
    }

    #[test]
    fn radixtree_matches_as_lua_resty_radixtree() {
        check_pure_module(
            "resty.radixtree",
            r##"
            local rx = M.new({
                { paths = { "/users/:id" }, methods = { "GET" }, metadata = "user" },
                { paths = { "/users/:id/posts/:post" }, metadata = "post" },
                { paths = { "/users/me" }, metadata = "me" },
                { paths = { "/static/*" }, metadata = "static" },
                { paths = { "/files/*rest" }, metadata = "files" },
                { paths = { "/api/v1*" }, metadata = "v1" },
                { paths = { "/h" }, hosts = { "*.example.com" }, metadata = "host" },
                { paths = { "/p" }, priority = 1, metadata = "low" },
                { paths = { "/p" }, priority = 5, metadata = "high" },
                { paths = { "/f" }, metadata = "filtered",
                  filter_fun = function(vars) return vars.ok == "1" end },
            })
            local m = {}
            eq(rx:match("/users/42", { method = "GET", matched = m }), "user")
            eq(m.id, "42"); eq(m._path, "/users/:id"); eq(m._method, "GET")
            eq(rx:match("/users/42", { method = "POST" }), nil)
            -- an exact path wins over a parameter
            eq(rx:match("/users/me", { method = "GET" }), "me")
            m = {}
            eq(rx:match("/users/7/posts/9", { matched = m }), "post")
            eq(m.id, "7"); eq(m.post, "9")
            eq(rx:match("/users/7/posts", {}), nil)
            eq(rx:match("/users/", { method = "GET" }), nil)
            eq(rx:match("/static/css/a.css", {}), "static")
            eq(rx:match("/static", {}), nil)
            m = {}
            eq(rx:match("/files/a/b.txt", { matched = m }), "files"); eq(m.rest, "a/b.txt")
            eq(rx:match("/api/v1/users", {}), "v1"); eq(rx:match("/api/v10", {}), "v1")
            eq(rx:match("/h", { host = "a.example.com" }), "host")
            eq(rx:match("/h", { host = "example.org" }), nil)
            eq(rx:match("/p", {}), "high")
            eq(rx:match("/f", { vars = { ok = "1" } }), "filtered")
            eq(rx:match("/f", { vars = {} }), nil)
            local called
            local d = M.new({ { paths = { "/d/:x" }, handler = function(a) called = a end } })
            local dm = {}
            eq(d:dispatch("/d/1", { matched = dm }, "arg"), true)
            eq(called, "arg"); eq(dm.x, "1")
            eq(d:dispatch("/nope", {}), false)
            local ok = pcall(M.new, { { paths = { "no-slash" } } })
            eq(ok, false)
            "##,
        );
    }

    #[test]
    fn multipart_parses_edits_and_builds_form_data() {
        check_pure_module(
            "multipart",
            r##"
            local body = table.concat({
                "--XyZ",
                'Content-Disposition: form-data; name="status"',
                "",
                "ok",
                "--XyZ",
                'Content-Disposition: form-data; name="tag"',
                "",
                "a",
                "--XyZ",
                'Content-Disposition: form-data; name="tag"',
                "",
                "b\r\nwith a line",
                "--XyZ",
                'Content-Disposition: form-data; name="file"; filename="f.txt"',
                "Content-Type: text/plain",
                "",
                "file text",
                "--XyZ--",
                "",
            }, "\r\n")
            local m = M(body, 'multipart/form-data; boundary="XyZ"')
            eq(m:get("status").value, "ok")
            eq(m:get("file").filename, "f.txt")
            eq(m:get("file").headers[2], "Content-Type: text/plain")
            local all = m:get_all_with_arrays()
            eq(all.status, "ok"); eq(all.tag[1], "a"); eq(all.tag[2], "b\r\nwith a line")
            eq(m:get_all().tag, "b\r\nwith a line")
            eq(#m:get_as_array("tag"), 2)
            m:set_simple("status", "major")
            m:delete("file")
            local again = M(m:tostring(), "multipart/form-data; boundary=XyZ")
            eq(again:get("status").value, "major")
            eq(again:get("file"), nil)
            eq(#again:get_as_array("tag"), 2)
            -- no boundary: no parts
            eq(next(M("x=1", "application/x-www-form-urlencoded"):get_all()), nil)
            "##,
        );
    }

    #[test]
    fn jsonpath_queries_lua_tables() {
        check_pure_module(
            "jsonpath",
            r##"
            local jp = M
            local store = {
                store = {
                    book = {
                        { category = "reference", author = "Nigel Rees", price = 8.95 },
                        { category = "fiction", author = "Evelyn Waugh", price = 12.99 },
                        { category = "fiction", author = "J. R. R. Tolkien", price = 22.99,
                          isbn = "0-395-19395-8" },
                    },
                    bicycle = { color = "red", price = 19.95 },
                },
            }
            local function join(list)
                local out = {}
                for i, v in ipairs(list) do out[i] = tostring(v) end
                return table.concat(out, "|")
            end
            eq(join(jp.query(store, "$.store.book[*].author")),
               "Nigel Rees|Evelyn Waugh|J. R. R. Tolkien")
            eq(join(jp.query(store, "$..author")), "Nigel Rees|Evelyn Waugh|J. R. R. Tolkien")
            eq(join(jp.query(store, "$.store..price")), "19.95|8.95|12.99|22.99")
            eq(jp.value(store, "$..book[2].author"), "J. R. R. Tolkien")
            eq(jp.value(store, "$..book[-1].price"), 22.99)
            eq(join(jp.query(store, "$..book[0,1].price")), "8.95|12.99")
            eq(join(jp.query(store, "$..book[:2].price")), "8.95|12.99")
            eq(join(jp.query(store, "$..book[1:].price")), "12.99|22.99")
            eq(jp.value(store, "$..book[(@.length-1)].author"), "J. R. R. Tolkien")
            eq(join(jp.query(store, "$..book[?(@.isbn)].author")), "J. R. R. Tolkien")
            eq(join(jp.query(store, "$..book[?(@.price < 10)].author")), "Nigel Rees")
            eq(join(jp.query(store, "$..book[?(@.category == 'fiction' && @.price > 20)].price")),
               "22.99")
            eq(jp.value(store, "$['store']['bicycle'].color"), "red")
            eq(#jp.query(store, "$..*", 3), 3)
            eq(#jp.query(store, "$.nothing.here"), 0)
            -- paths are 0-based, as data-mask reads them
            local nodes = jp.nodes(store, "$..author")
            eq(join(nodes[2].path), "$|store|book|1|author")
            eq(nodes[2].value, "Evelyn Waugh")
            -- apply changes the table itself
            jp.apply(store, "$.store.book[*].price", function(p) return p * 2 end)
            eq(store.store.book[1].price, 17.9)
            -- errors, as acl checks them
            local ast, err = jp.parse("$.a[")
            eq(ast, nil); assert(err:find("unclosed", 1, true), err)
            eq(jp.value(store, "store.bicycle.color"), "red")
            local _, err2 = jp.parse("..a")
            assert(err2:find("starts with", 1, true), err2)
            local _, err3 = jp.parse("$..book[?(@.price <)]")
            assert(err3, "a broken filter is an error")
            eq(jp.query("not a table", "$.a"), nil)
            "##,
        );
    }
}
