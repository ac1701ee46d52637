//! The node config as Lua plugins see it: APISIX's `core.config.local_conf()`, the table
//! `require("apisix.plugin").plugin_attr(name)` reads from.
//!
//! The table is in APISIX's shape (`apisix.node_listen`, `apisix.ssl.listen`, `plugins`,
//! `plugin_attr`), made from the node config of the snapshot in force, with the addresses
//! the listeners are really bound to (a configured port 0 shows as the port the kernel chose,
//! and a listener changed in the file since start-up, which needs a restart, shows as it
//! serves). It is published process-wide with a version, as plugin metadata is, so each VM
//! converts it once per version. Secrets (the Admin API key, the keyring) are left out.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwapOption;
use serde_json::{json, Map, Value};

use crate::config::NodeConfig;

/// One bound proxy listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BoundListener {
    pub addr: SocketAddr,
    pub tls: bool,
    pub http2: bool,
}

/// The published table and its version.
#[derive(Debug)]
pub struct LocalConf {
    pub value: Value,
    pub version: u64,
}

/// What the table is made from.
#[derive(Default)]
struct Inputs {
    node: Option<NodeConfig>,
    listeners: Option<Vec<BoundListener>>,
    version: u64,
}

static INPUTS: Mutex<Inputs> = Mutex::new(Inputs {
    node: None,
    listeners: None,
    version: 0,
});
static CURRENT: ArcSwapOption<LocalConf> = ArcSwapOption::const_empty();

/// Publishes the node config of a snapshot being published.
pub fn publish(node: &NodeConfig) {
    let mut inputs = INPUTS.lock().unwrap_or_else(|e| e.into_inner());
    if inputs.node.as_ref() == Some(node) {
        return;
    }
    inputs.node = Some(node.clone());
    republish(&mut inputs);
}

/// Notes the proxy listeners as bound (once the serving process has them).
pub fn note_listeners(listeners: Vec<BoundListener>) {
    let mut inputs = INPUTS.lock().unwrap_or_else(|e| e.into_inner());
    inputs.listeners = Some(listeners);
    republish(&mut inputs);
}

fn republish(inputs: &mut Inputs) {
    let Some(node) = &inputs.node else {
        return;
    };
    inputs.version += 1;
    CURRENT.store(Some(Arc::new(LocalConf {
        value: table(node, inputs.listeners.as_deref()),
        version: inputs.version,
    })));
}

/// The table in force, if a node config was published.
pub fn current() -> Option<Arc<LocalConf>> {
    CURRENT.load_full()
}

/// The version in force (0 before any), cheap enough for every `local_conf()` call.
pub fn version() -> u64 {
    CURRENT.load().as_ref().map(|c| c.version).unwrap_or(0)
}

fn listen_item(addr: SocketAddr, http2: bool) -> Value {
    json!({ "ip": addr.ip().to_string(), "port": addr.port(), "enable_http2": http2 })
}

/// APISIX's `local_conf` for `node`, with `bound` listeners when known.
pub fn table(node: &NodeConfig, bound: Option<&[BoundListener]>) -> Value {
    let (plain, tls): (Vec<Value>, Vec<Value>) = match bound {
        Some(b) => (
            b.iter()
                .filter(|l| !l.tls)
                .map(|l| listen_item(l.addr, l.http2))
                .collect(),
            b.iter()
                .filter(|l| l.tls)
                .map(|l| listen_item(l.addr, l.http2))
                .collect(),
        ),
        None => (
            node.listen
                .0
                .iter()
                .map(|l| listen_item(l.addr, l.enable_http2))
                .collect(),
            node.ssl
                .iter()
                .flat_map(|s| s.listeners())
                .map(|l| listen_item(l.addr, l.enable_http2))
                .collect(),
        ),
    };
    let mut ssl = Map::new();
    ssl.insert("enable".into(), json!(!tls.is_empty()));
    ssl.insert("listen".into(), Value::Array(tls));
    if let Some(s) = &node.ssl {
        let protocols: Vec<&str> = s.ssl_protocols.0.iter().map(|p| p.name()).collect();
        ssl.insert("ssl_protocols".into(), json!(protocols.join(" ")));
        ssl.insert("ssl_session_tickets".into(), json!(s.ssl_session_tickets));
        if let Some(f) = &s.fallback_sni {
            ssl.insert("fallback_sni".into(), json!(f));
        }
        if let Some(ca) = &s.ssl_trusted_certificate {
            ssl.insert("ssl_trusted_certificate".into(), json!(ca));
        }
    }
    let mut apisix = Map::new();
    apisix.insert("node_listen".into(), Value::Array(plain));
    apisix.insert("enable_admin".into(), json!(node.admin.is_some()));
    apisix.insert("enable_control".into(), json!(node.enable_control));
    apisix.insert(
        "control".into(),
        json!({ "ip": node.control.ip.to_string(), "port": node.control.port }),
    );
    apisix.insert("ssl".into(), Value::Object(ssl));
    let mut top = Map::new();
    top.insert("apisix".into(), Value::Object(apisix));
    if let Some(p) = &node.plugins {
        top.insert("plugins".into(), json!(p));
    }
    top.insert(
        "plugin_attr".into(),
        Value::Object(node.plugin_attr.clone()),
    );
    if let Some(e) = &node.ext_plugin {
        top.insert("ext-plugin".into(), Value::Object(e.clone()));
    }
    top.insert(
        "deployment".into(),
        json!({ "config_provider": match node.config_provider {
            crate::config::ConfigProvider::Etcd => "etcd",
            _ => "yaml",
        }}),
    );
    Value::Object(top)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apisix_shape_with_bound_ports() {
        let doc = crate::config::parse_document(
            "listen: 127.0.0.1:0\nssl:\n  listen: [{ip: 127.0.0.1, port: 0}]\n  fallback_sni: a.test\nplugin_attr:\n  redirect: {https_port: 8443}\n",
        )
        .unwrap();
        let t = table(&doc.node, None);
        assert_eq!(t["apisix"]["ssl"]["enable"], true);
        assert_eq!(t["apisix"]["ssl"]["listen"][0]["port"], 0);
        assert_eq!(t["apisix"]["ssl"]["ssl_protocols"], "TLSv1.2 TLSv1.3");
        assert_eq!(t["apisix"]["ssl"]["fallback_sni"], "a.test");
        assert_eq!(t["plugin_attr"]["redirect"]["https_port"], 8443);
        let bound = [
            BoundListener {
                addr: "127.0.0.1:4000".parse().unwrap(),
                tls: false,
                http2: false,
            },
            BoundListener {
                addr: "127.0.0.1:4443".parse().unwrap(),
                tls: true,
                http2: true,
            },
        ];
        let t = table(&doc.node, Some(&bound));
        assert_eq!(t["apisix"]["node_listen"][0]["port"], 4000);
        assert_eq!(t["apisix"]["ssl"]["listen"][0]["port"], 4443);
        assert_eq!(t["apisix"]["ssl"]["listen"][0]["enable_http2"], true);
        let plain = crate::config::parse_document("listen: 127.0.0.1:0\n").unwrap();
        assert_eq!(table(&plain.node, None)["apisix"]["ssl"]["enable"], false);
    }
}
