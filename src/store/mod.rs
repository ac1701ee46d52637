//! The resource store: where resources written through the Admin API live.
//!
//! [`ResourceStore`] is the seam: the Admin API reads and writes resources by kind and id
//! through it, and [`StoreOverlay`] merges its content into every snapshot build. The embedded
//! default is [`RedbStore`] (one crash-safe file under `data_dir`); a distributed backend (etcd,
//! as APISIX uses) can implement the same trait.

pub mod etcd;
mod redb_store;

use std::fmt;
use std::sync::Arc;

use serde_json::Value;

use crate::config::{
    self, ConfigError, ConfigErrors, Consumer, ConsumerGroup, Credential, Document, GlobalRule, Id,
    PluginMetadataConf, Route, Service, Upstream,
};
use crate::reload::ResourceOverlay;
use crate::tls::Ssl;

pub use redb_store::RedbStore;

/// The resource types the store holds, named as APISIX names them in its paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Routes,
    Upstreams,
    Services,
    GlobalRules,
    Consumers,
    ConsumerGroups,
    /// Consumer credentials; the id is `USERNAME/credentials/ID` (the key under `consumers`).
    Credentials,
    PluginMetadata,
    /// Certificates (`/apisix/ssls/ID`); their keys never leave the Admin API.
    Ssls,
}

impl Kind {
    /// Every kind, in the order builds see them.
    pub const ALL: [Kind; 9] = [
        Kind::Routes,
        Kind::Upstreams,
        Kind::Services,
        Kind::GlobalRules,
        Kind::Consumers,
        Kind::ConsumerGroups,
        Kind::Credentials,
        Kind::PluginMetadata,
        Kind::Ssls,
    ];

    /// The path segment and config-file key: `routes`, `global_rules`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Routes => "routes",
            Kind::Upstreams => "upstreams",
            Kind::Services => "services",
            Kind::GlobalRules => "global_rules",
            Kind::Consumers => "consumers",
            Kind::ConsumerGroups => "consumer_groups",
            Kind::Credentials => "credentials",
            Kind::PluginMetadata => "plugin_metadata",
            Kind::Ssls => "ssls",
        }
    }

    /// The folder its keys live in: a credential's is its consumer's (`consumers/jack/credentials/1`).
    pub fn dir(self) -> &'static str {
        match self {
            Kind::Credentials => "consumers",
            k => k.as_str(),
        }
    }

    /// One resource of this kind in APISIX's messages: `route`, `global rule`, ...
    pub fn singular(self) -> &'static str {
        match self {
            Kind::Routes => "route",
            Kind::Upstreams => "upstream",
            Kind::Services => "service",
            Kind::GlobalRules => "global rule",
            Kind::Consumers => "consumer",
            Kind::ConsumerGroups => "consumer group",
            Kind::Credentials => "credential",
            Kind::PluginMetadata => "plugin_metadata",
            Kind::Ssls => "ssl",
        }
    }

    /// Parses a path segment; None for anything else.
    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// APISIX's etcd-style key: `/apisix/routes/1`.
    pub fn key(self, id: &str) -> String {
        format!("/apisix/{}/{id}", self.dir())
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A store failure (I/O, a corrupt file, a lock held by another process).
#[derive(Debug, thiserror::Error)]
#[error("resource store: {0}")]
pub struct StoreError(pub String);

/// Resources by kind and id, as JSON objects in APISIX's shape (with `id`, `create_time`,
/// `update_time`). Every method is blocking; callers on an async runtime use
/// `spawn_blocking` for writes.
pub trait ResourceStore: Send + Sync {
    /// One resource, or None.
    fn get(&self, kind: Kind, id: &str) -> Result<Option<Value>, StoreError>;

    /// Every resource of a kind, ordered by id as a string (etcd's key order).
    fn list(&self, kind: Kind) -> Result<Vec<(String, Value)>, StoreError>;

    /// Creates or replaces a resource; durable when it returns Ok. Returns the previous value.
    fn put(&self, kind: Kind, id: &str, value: &Value) -> Result<Option<Value>, StoreError>;

    /// Removes a resource; durable when it returns Ok. Returns the removed value, if any.
    fn delete(&self, kind: Kind, id: &str) -> Result<Option<Value>, StoreError>;

    /// A fresh id for `POST`: 20 zero-padded digits from a persisted counter (APISIX uses the
    /// etcd revision the same way), never one that is in use.
    fn generate_id(&self, kind: Kind) -> Result<String, StoreError>;

    /// A human-readable location for messages (a file path, an etcd endpoint).
    fn describe(&self) -> String;

    /// The backend's health for the status endpoint (etcd: connection, revision, skipped
    /// values); None when there is nothing to report.
    fn status(&self) -> Option<Value> {
        None
    }
}

/// Adds a store's resources to every build. A resource id defined both in the config file and
/// in the store fails the build (see docs/admin-api.md, "Config file and Admin API").
pub struct StoreOverlay {
    store: Arc<dyn ResourceStore>,
}

impl StoreOverlay {
    pub fn new(store: Arc<dyn ResourceStore>) -> Self {
        StoreOverlay { store }
    }
}

impl ResourceOverlay for StoreOverlay {
    fn apply(&self, doc: &mut Document) -> Result<(), ConfigErrors> {
        let mut errors = Vec::new();
        for kind in Kind::ALL {
            let items = match self.store.list(kind) {
                Ok(items) => items,
                Err(e) => {
                    errors.push(ConfigError::new("", e.to_string()));
                    continue;
                }
            };
            for (id, value) in items {
                if let Err(e) = insert_resource(doc, kind, &id, value, InsertMode::Append) {
                    errors.push(match e {
                        InsertError::Conflict => ConfigError::new(
                            format!("{kind}"),
                            format!(
                                "{} {id} is defined both in the config file and in the Admin API store ({}); \
                                 remove it from one of them",
                                kind.singular(),
                                self.store.describe()
                            ),
                        ),
                        InsertError::Invalid(e) => ConfigError::new(
                            format!("admin store {kind}/{id}{}", sep(&e.path)),
                            e.message,
                        ),
                    });
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(errors))
        }
    }
}

fn sep(path: &str) -> String {
    if path.is_empty() {
        String::new()
    } else {
        format!(".{path}")
    }
}

/// How [`insert_resource`] treats an id already in the document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsertMode {
    /// Append; an id already present is a conflict.
    Append,
    /// Remove the entry with that id first, then append.
    Replace,
}

/// Why a resource could not join a document.
#[derive(Debug)]
pub enum InsertError {
    /// The id is already in the document.
    Conflict,
    /// The JSON does not deserialize; the path is relative to the resource.
    Invalid(ConfigError),
}

/// Deserializes `value` as a `kind` resource with id `id` and appends it to `doc`. Returns its
/// index in the document's list of that kind (the index in build error paths).
pub fn insert_resource(
    doc: &mut Document,
    kind: Kind,
    id: &str,
    value: Value,
    mode: InsertMode,
) -> Result<usize, InsertError> {
    fn put<T>(
        list: &mut Vec<T>,
        id: &str,
        value: Value,
        mode: InsertMode,
        id_of: fn(&T) -> Option<&Id>,
        parse: fn(Value) -> Result<T, ConfigError>,
    ) -> Result<usize, InsertError> {
        let existing = list
            .iter()
            .position(|r| id_of(r).is_some_and(|i| i.0 == id));
        match (existing, mode) {
            (Some(_), InsertMode::Append) => return Err(InsertError::Conflict),
            (Some(i), InsertMode::Replace) => {
                list.remove(i);
            }
            (None, _) => {}
        }
        let item = parse(value).map_err(InsertError::Invalid)?;
        list.push(item);
        Ok(list.len() - 1)
    }
    match kind {
        Kind::Routes => put(
            &mut doc.routes,
            id,
            value,
            mode,
            |r: &Route| r.id.as_ref(),
            |v| config::from_value_at("", v),
        ),
        Kind::Upstreams => put(
            &mut doc.upstreams,
            id,
            value,
            mode,
            |r: &Upstream| r.id.as_ref(),
            |v| config::from_value_at("", v),
        ),
        Kind::Services => put(
            &mut doc.services,
            id,
            value,
            mode,
            |r: &Service| r.id.as_ref(),
            |v| config::from_value_at("", v),
        ),
        Kind::GlobalRules => put(
            &mut doc.global_rules,
            id,
            value,
            mode,
            |r: &GlobalRule| r.id.as_ref(),
            |v| config::from_value_at("", v),
        ),
        Kind::Consumers => put(
            &mut doc.consumers,
            id,
            value,
            mode,
            |c: &Consumer| Some(&c.username),
            |v| config::from_value_at("", v),
        ),
        Kind::ConsumerGroups => put(
            &mut doc.consumer_groups,
            id,
            value,
            mode,
            |g: &ConsumerGroup| g.id.as_ref(),
            |v| config::from_value_at("", v),
        ),
        Kind::Credentials => {
            // The store keeps APISIX's value (`id` is the credential's own); the document's
            // id is the whole `USERNAME/credentials/ID`.
            let mut value = value;
            if let Value::Object(m) = &mut value {
                m.insert("id".into(), Value::String(id.to_string()));
            }
            let existing = doc.credentials.iter().position(|c| c.id == id);
            match (existing, mode) {
                (Some(_), InsertMode::Append) => return Err(InsertError::Conflict),
                (Some(i), InsertMode::Replace) => {
                    doc.credentials.remove(i);
                }
                (None, _) => {}
            }
            let item: Credential =
                config::from_value_at("", value).map_err(InsertError::Invalid)?;
            doc.credentials.push(item);
            Ok(doc.credentials.len() - 1)
        }
        Kind::PluginMetadata => put(
            &mut doc.plugin_metadata,
            id,
            value,
            mode,
            |m: &PluginMetadataConf| Some(&m.id),
            |v| config::from_value_at("", v),
        ),
        Kind::Ssls => put(
            &mut doc.ssls,
            id,
            value,
            mode,
            |s: &Ssl| s.id.as_ref(),
            |v| config::from_value_at("", v),
        ),
    }
}

/// Removes the `kind` resource `id` from `doc`; true when it was there.
pub fn remove_resource(doc: &mut Document, kind: Kind, id: &str) -> bool {
    fn remove<T>(list: &mut Vec<T>, id: &str, id_of: fn(&T) -> Option<&Id>) -> bool {
        let before = list.len();
        list.retain(|r| id_of(r).is_none_or(|i| i.0 != id));
        list.len() != before
    }
    match kind {
        Kind::Routes => remove(&mut doc.routes, id, |r| r.id.as_ref()),
        Kind::Upstreams => remove(&mut doc.upstreams, id, |r| r.id.as_ref()),
        Kind::Services => remove(&mut doc.services, id, |r| r.id.as_ref()),
        Kind::GlobalRules => remove(&mut doc.global_rules, id, |r| r.id.as_ref()),
        Kind::Consumers => remove(&mut doc.consumers, id, |c| Some(&c.username)),
        Kind::ConsumerGroups => remove(&mut doc.consumer_groups, id, |g| g.id.as_ref()),
        Kind::Credentials => {
            let before = doc.credentials.len();
            doc.credentials.retain(|c| c.id != id);
            doc.credentials.len() != before
        }
        Kind::PluginMetadata => remove(&mut doc.plugin_metadata, id, |m| Some(&m.id)),
        Kind::Ssls => remove(&mut doc.ssls, id, |s| s.id.as_ref()),
    }
}

/// The ids of every `kind` resource in `doc`, in document order.
pub fn resource_ids(doc: &Document, kind: Kind) -> Vec<String> {
    fn ids<T>(list: &[T], id_of: fn(&T) -> Option<&Id>) -> Vec<String> {
        list.iter()
            .filter_map(|r| id_of(r).map(|i| i.0.clone()))
            .collect()
    }
    match kind {
        Kind::Routes => ids(&doc.routes, |r| r.id.as_ref()),
        Kind::Upstreams => ids(&doc.upstreams, |r| r.id.as_ref()),
        Kind::Services => ids(&doc.services, |r| r.id.as_ref()),
        Kind::GlobalRules => ids(&doc.global_rules, |r| r.id.as_ref()),
        Kind::Consumers => ids(&doc.consumers, |c| Some(&c.username)),
        Kind::ConsumerGroups => ids(&doc.consumer_groups, |g| g.id.as_ref()),
        Kind::Credentials => doc.credentials.iter().map(|c| c.id.clone()).collect(),
        Kind::PluginMetadata => ids(&doc.plugin_metadata, |m| Some(&m.id)),
        Kind::Ssls => ids(&doc.ssls, |s| s.id.as_ref()),
    }
}

/// The `kind` resource `id` from `doc` as JSON (the file's resources in APISIX's shape).
pub fn resource_json(doc: &Document, kind: Kind, id: &str) -> Option<Value> {
    fn find<T: serde::Serialize>(
        list: &[T],
        id: &str,
        id_of: fn(&T) -> Option<&Id>,
    ) -> Option<Value> {
        list.iter()
            .find(|r| id_of(r).is_some_and(|i| i.0 == id))
            .and_then(|r| serde_json::to_value(r).ok())
    }
    match kind {
        Kind::Routes => find(&doc.routes, id, |r| r.id.as_ref()),
        Kind::Upstreams => find(&doc.upstreams, id, |r| r.id.as_ref()),
        Kind::Services => find(&doc.services, id, |r| r.id.as_ref()),
        Kind::GlobalRules => find(&doc.global_rules, id, |r| r.id.as_ref()),
        Kind::Consumers => find(&doc.consumers, id, |c| Some(&c.username)),
        Kind::ConsumerGroups => find(&doc.consumer_groups, id, |g| g.id.as_ref()),
        Kind::Credentials => doc
            .credentials
            .iter()
            .find(|c| c.id == id)
            .and_then(|c| serde_json::to_value(c).ok()),
        Kind::PluginMetadata => find(&doc.plugin_metadata, id, |m| Some(&m.id)),
        Kind::Ssls => find(&doc.ssls, id, |s| s.id.as_ref()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn overlay_adds_and_refuses_conflicts() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RedbStore::open(&dir.path().join("s.redb")).unwrap());
        store
            .put(
                Kind::Routes,
                "2",
                &json!({"id":"2","uri":"/b","plugins":{}}),
            )
            .unwrap();
        let overlay = StoreOverlay::new(store.clone());
        let mut doc = config::parse_document("routes:\n  - id: 1\n    uri: /a\n").unwrap();
        overlay.apply(&mut doc).unwrap();
        assert_eq!(resource_ids(&doc, Kind::Routes), ["1", "2"]);

        store
            .put(Kind::Routes, "1", &json!({"id":"1","uri":"/c"}))
            .unwrap();
        let mut doc = config::parse_document("routes:\n  - id: 1\n    uri: /a\n").unwrap();
        let err = overlay.apply(&mut doc).unwrap_err();
        assert!(
            err.to_string()
                .contains("route 1 is defined both in the config file and in the Admin API store"),
            "{err}"
        );
    }

    #[test]
    fn replace_moves_to_the_end() {
        let mut doc =
            config::parse_document("routes:\n  - id: 1\n    uri: /a\n  - id: 2\n    uri: /b\n")
                .unwrap();
        let i = insert_resource(
            &mut doc,
            Kind::Routes,
            "1",
            json!({"id":"1","uri":"/z"}),
            InsertMode::Replace,
        )
        .unwrap();
        assert_eq!(i, 1);
        assert_eq!(resource_ids(&doc, Kind::Routes), ["2", "1"]);
        assert!(remove_resource(&mut doc, Kind::Routes, "2"));
        assert!(!remove_resource(&mut doc, Kind::Routes, "2"));
        match insert_resource(
            &mut doc,
            Kind::Routes,
            "3",
            json!({"id":"3","urii":"/z"}),
            InsertMode::Replace,
        ) {
            Err(InsertError::Invalid(e)) => assert_eq!(e.path, "urii"),
            other => panic!("{other:?}"),
        }
    }
}
