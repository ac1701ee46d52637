//! What each Admin API call does, independent of HTTP: requests come in as [`Call`]s and leave
//! as [`Reply`]s with APISIX's status codes, shapes and wording.
//!
//! A write is validated by building a whole snapshot with the change applied
//! (`Reloader::try_build`, the same code as config files and `moongate check`); only a build
//! that succeeds is stored, and the store write is followed by a published rebuild before the
//! reply, so a 2xx means "durable and serving".

use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use crate::config::{validate_id, ConfigError, ConfigErrors, Document};
use crate::plugin::ConfScope;
use crate::reload::Reloader;
use crate::snapshot::json_type;
use crate::store::{self, InsertError, InsertMode, Kind, ResourceStore};

/// A reply: status and body (JSON, or plain text for `plugins/reload`'s `done`).
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: u16,
    pub body: ReplyBody,
}

/// The body of a [`Reply`].
#[derive(Debug, Clone, PartialEq)]
pub enum ReplyBody {
    Json(Value),
    Text(&'static str),
}

impl Reply {
    pub fn json(status: u16, body: Value) -> Reply {
        Reply {
            status,
            body: ReplyBody::Json(body),
        }
    }

    /// `{"error_msg": msg}` with `status`.
    pub fn error(status: u16, msg: impl Into<String>) -> Reply {
        Reply::json(status, json!({ "error_msg": msg.into() }))
    }

    /// 400 `{"error_msg": msg}`.
    pub fn bad(msg: impl Into<String>) -> Reply {
        Reply::error(400, msg)
    }

    /// APISIX's (etcd's) 404 for a missing key.
    pub fn not_found() -> Reply {
        Reply::json(404, json!({ "message": "Key not found" }))
    }

    /// The JSON body, if it has one.
    pub fn json_body(&self) -> Option<&Value> {
        match &self.body {
            ReplyBody::Json(v) => Some(v),
            ReplyBody::Text(_) => None,
        }
    }
}

/// One Admin API request on a resource, after HTTP parsing and authentication.
#[derive(Debug, Clone)]
pub enum Call {
    List(Kind),
    Get(Kind, String),
    /// `PUT /KIND/ID` (id from the path) or `PUT /KIND` (id from the body).
    Put(Kind, Option<String>, Option<Value>),
    Post(Kind, Option<Value>),
    /// Id, sub-path (may be empty), body.
    Patch(Kind, String, String, Option<Value>),
    Delete(Kind, String),
    PluginList,
    /// `GET /plugins` (APISIX: `?all=true`): every plugin's attributes.
    PluginAll,
    PluginSchema(String),
    PluginReload,
    Status,
    /// `GET /consumers/USERNAME/credentials`.
    CredentialList(String),
    /// `GET /consumers/USERNAME/credentials/ID`.
    CredentialGet(String, String),
    /// `PUT /consumers/USERNAME/credentials/ID`.
    CredentialPut(String, String, Option<Value>),
    /// `DELETE /consumers/USERNAME/credentials/ID`.
    CredentialDelete(String, String),
}

/// The Admin API's state: the reloader every change goes through and the store.
pub struct Admin {
    reloader: Arc<Reloader>,
    store: Arc<dyn ResourceStore>,
    /// Serialises writes: validate, store and publish happen as one step per write.
    writes: Mutex<()>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Admin {
    pub fn new(reloader: Arc<Reloader>, store: Arc<dyn ResourceStore>) -> Admin {
        Admin {
            reloader,
            store,
            writes: Mutex::new(()),
        }
    }

    /// Handles one call. Blocking (store I/O, snapshot builds): run it off the async runtime.
    pub fn handle(&self, call: Call) -> Reply {
        let result = match call {
            Call::List(kind) => self.list(kind),
            Call::Get(kind, id) => self.get(kind, &id),
            Call::Put(kind, id, body) => self.put(kind, id, body),
            Call::Post(kind, body) => self.post(kind, body),
            Call::Patch(kind, id, sub, body) => self.patch(kind, &id, &sub, body),
            Call::Delete(kind, id) => self.delete(kind, &id),
            Call::PluginList => Ok(self.plugin_list()),
            Call::PluginAll => Ok(self.plugin_all()),
            Call::PluginSchema(name) => Ok(self.plugin_schema(&name)),
            Call::PluginReload => Ok(self.plugin_reload()),
            Call::Status => Ok(self.status()),
            Call::CredentialList(user) => self.credential_list(&user),
            Call::CredentialGet(user, id) => self.credential_get(&user, &id),
            Call::CredentialPut(user, id, body) => self.credential_put(&user, &id, body),
            Call::CredentialDelete(user, id) => self.credential_delete(&user, &id),
        };
        result.unwrap_or_else(|e| Reply::error(503, e.to_string()))
    }

    // ---- reads ------------------------------------------------------------------------------

    fn item(kind: Kind, id: &str, value: Value, source: &str) -> Value {
        json!({ "key": kind.key(id), "value": redact(kind, value), "source": source })
    }

    fn list(&self, kind: Kind) -> Result<Reply, store::StoreError> {
        self.list_where(kind, |_| true)
    }

    /// The resources of `kind` whose id passes `keep`, from the file and the store.
    fn list_where(
        &self,
        kind: Kind,
        keep: impl Fn(&str) -> bool,
    ) -> Result<Reply, store::StoreError> {
        let mut stored = self.store.list(kind)?;
        stored.retain(|(id, _)| keep(id));
        let snap = self.reloader.gateway().load_full();
        let mut items: Vec<(String, Value)> = Vec::new();
        for id in store::resource_ids(&snap.doc, kind) {
            if !keep(&id) {
                continue;
            }
            if stored.iter().any(|(s, _)| *s == id) {
                continue;
            }
            if let Some(v) = store::resource_json(&snap.doc, kind, &id) {
                items.push((id.clone(), Admin::item(kind, &id, v, "config_file")));
            }
        }
        for (id, v) in stored {
            let item = Admin::item(kind, &id, v, "admin_api");
            items.push((id, item));
        }
        // etcd's key order, as APISIX lists.
        items.sort_by(|a, b| a.0.cmp(&b.0));
        let list: Vec<Value> = items.into_iter().map(|(_, v)| v).collect();
        Ok(Reply::json(
            200,
            json!({ "total": list.len(), "list": list }),
        ))
    }

    fn get(&self, kind: Kind, id: &str) -> Result<Reply, store::StoreError> {
        if let Some(v) = self.store.get(kind, id)? {
            return Ok(Reply::json(200, Admin::item(kind, id, v, "admin_api")));
        }
        let snap = self.reloader.gateway().load_full();
        match store::resource_json(&snap.doc, kind, id) {
            Some(v) => Ok(Reply::json(200, Admin::item(kind, id, v, "config_file"))),
            None => Ok(Reply::not_found()),
        }
    }

    // ---- writes -----------------------------------------------------------------------------

    fn put(
        &self,
        kind: Kind,
        path_id: Option<String>,
        body: Option<Value>,
    ) -> Result<Reply, store::StoreError> {
        if kind == Kind::PluginMetadata {
            return self.put_metadata(path_id, body);
        }
        let mut conf = match object_body(body) {
            Ok(c) => c,
            Err(r) => return Ok(r),
        };
        let body_id = match body_id(&conf, id_field(kind)) {
            Ok(i) => i,
            Err(r) => return Ok(r),
        };
        let id = match (path_id, body_id) {
            (None, None) => return Ok(Reply::bad(format!("missing {} id", kind.singular()))),
            (Some(p), Some(b)) if p != b => {
                return Ok(Reply::bad(format!("wrong {} id", kind.singular())))
            }
            (Some(p), _) => p,
            (None, Some(b)) => b,
        };
        if let Err(r) = check_id(kind, &id) {
            return Ok(r);
        }
        if let Some(r) = forbidden_times(&conf) {
            return Ok(r);
        }
        let _guard = self.writes.lock().unwrap_or_else(|e| e.into_inner());
        let previous = self.store.get(kind, &id)?;
        let created = previous
            .as_ref()
            .and_then(|p| p.get("create_time").cloned())
            .unwrap_or_else(|| json!(now()));
        conf.insert(id_field(kind).into(), Value::String(id.clone()));
        conf.insert("create_time".into(), created);
        conf.insert("update_time".into(), json!(now()));
        let value = Value::Object(conf);
        let status = if previous.is_some() { 200 } else { 201 };
        self.commit(kind, &id, Some(value), previous, status)
    }

    fn post(&self, kind: Kind, body: Option<Value>) -> Result<Reply, store::StoreError> {
        if kind == Kind::PluginMetadata {
            return Ok(metadata_unsupported("POST"));
        }
        let mut conf = match object_body(body) {
            Ok(c) => c,
            Err(r) => return Ok(r),
        };
        if kind == Kind::Consumers {
            // APISIX names consumers by `username`; there is no generated id.
            return Ok(Reply::bad("missing consumer name"));
        }
        if conf.contains_key("id") {
            return Ok(Reply::bad(format!(
                "wrong {} id, do not need it",
                kind.singular()
            )));
        }
        if let Some(r) = forbidden_times(&conf) {
            return Ok(r);
        }
        let _guard = self.writes.lock().unwrap_or_else(|e| e.into_inner());
        let id = self.store.generate_id(kind)?;
        let t = now();
        conf.insert("id".into(), Value::String(id.clone()));
        conf.insert("create_time".into(), json!(t));
        conf.insert("update_time".into(), json!(t));
        self.commit(kind, &id, Some(Value::Object(conf)), None, 201)
    }

    fn patch(
        &self,
        kind: Kind,
        id: &str,
        sub_path: &str,
        body: Option<Value>,
    ) -> Result<Reply, store::StoreError> {
        if kind == Kind::PluginMetadata {
            return Ok(metadata_unsupported("PATCH"));
        }
        if let Err(r) = check_id(kind, id) {
            return Ok(r);
        }
        let Some(body) = body else {
            return Ok(Reply::bad("missing new configuration"));
        };
        if sub_path.is_empty() && !body.is_object() {
            return Ok(Reply::bad("invalid configuration"));
        }
        let _guard = self.writes.lock().unwrap_or_else(|e| e.into_inner());
        let Some(previous) = self.store.get(kind, id)? else {
            return Ok(self.missing_or_file(kind, id));
        };
        let mut value = previous.clone();
        if sub_path.is_empty() {
            merge(&mut value, body);
        } else if let Err(msg) = patch_sub_path(&mut value, sub_path, body) {
            return Ok(Reply::bad(msg));
        }
        let Value::Object(obj) = &mut value else {
            return Ok(Reply::bad("invalid configuration"));
        };
        match obj.get(id_field(kind)).map(id_string) {
            Some(Some(b)) if b == id => {}
            _ => return Ok(Reply::bad(format!("wrong {} id", kind.singular()))),
        }
        obj.insert(id_field(kind).into(), Value::String(id.to_string()));
        obj.insert("update_time".into(), json!(now()));
        if !obj.contains_key("create_time") {
            obj.insert("create_time".into(), json!(now()));
        }
        self.commit(kind, id, Some(value), Some(previous), 200)
    }

    fn delete(&self, kind: Kind, id: &str) -> Result<Reply, store::StoreError> {
        if let Err(r) = check_id(kind, id) {
            return Ok(r);
        }
        let _guard = self.writes.lock().unwrap_or_else(|e| e.into_inner());
        let Some(previous) = self.store.get(kind, id)? else {
            return Ok(self.missing_or_file(kind, id));
        };
        // APISIX deletes a consumer's credentials with it.
        let mut cascade = Vec::new();
        if kind == Kind::Consumers {
            let prefix = format!("{id}/credentials/");
            for (cid, v) in self.store.list(Kind::Credentials)? {
                if cid.starts_with(&prefix) {
                    cascade.push((Kind::Credentials, cid, v));
                }
            }
        }
        self.commit_with(kind, id, None, Some(previous), 200, cascade)
    }

    // ---- credentials ------------------------------------------------------------------------

    fn credential_list(&self, user: &str) -> Result<Reply, store::StoreError> {
        let prefix = format!("{user}/credentials/");
        self.list_where(Kind::Credentials, |id| id.starts_with(&prefix))
    }

    fn credential_get(&self, user: &str, id: &str) -> Result<Reply, store::StoreError> {
        self.get(Kind::Credentials, &format!("{user}/credentials/{id}"))
    }

    fn credential_put(
        &self,
        user: &str,
        id: &str,
        body: Option<Value>,
    ) -> Result<Reply, store::StoreError> {
        let mut conf = match object_body(body) {
            Ok(c) => c,
            Err(r) => return Ok(r),
        };
        if let Err(e) = validate_id(user).and_then(|_| validate_id(id)) {
            return Ok(Reply::bad(format!("invalid credential id: {e}")));
        }
        match body_id(&conf, "id") {
            Ok(Some(b)) if b != id => return Ok(Reply::bad("wrong credential id")),
            Ok(_) => {}
            Err(r) => return Ok(r),
        }
        if let Some(r) = forbidden_times(&conf) {
            return Ok(r);
        }
        // APISIX's own checks, with its wording: one plugin, known, of type auth.
        match conf.get("plugins") {
            None => {}
            Some(Value::Object(plugins)) => {
                if plugins.len() > 1 {
                    return Ok(Reply::bad(
                        "invalid configuration: property \"plugins\" validation failed: expect object to have at most 1 properties",
                    ));
                }
                let snap = self.reloader.gateway().load_full();
                for name in plugins.keys() {
                    match snap.registry.get(name) {
                        None => return Ok(Reply::bad(format!("unknown plugin {name}"))),
                        Some(p) if !p.is_auth() => {
                            return Ok(Reply::bad(
                                "only supports auth type plugins in consumer credential",
                            ))
                        }
                        Some(_) => {}
                    }
                }
            }
            Some(other) => {
                return Ok(Reply::bad(format!(
                    "invalid configuration: property \"plugins\" validation failed: wrong type: expected object, got {}",
                    json_type(other)
                )))
            }
        }
        let _guard = self.writes.lock().unwrap_or_else(|e| e.into_inner());
        let consumer_known = self.store.get(Kind::Consumers, user)?.is_some() || {
            let snap = self.reloader.gateway().load_full();
            store::resource_ids(&snap.doc, Kind::Consumers)
                .iter()
                .any(|u| u == user)
        };
        if !consumer_known {
            return Ok(Reply::error(404, "consumer not found"));
        }
        let key = format!("{user}/credentials/{id}");
        let previous = self.store.get(Kind::Credentials, &key)?;
        let created = previous
            .as_ref()
            .and_then(|p| p.get("create_time").cloned())
            .unwrap_or_else(|| json!(now()));
        conf.insert("id".into(), Value::String(id.to_string()));
        conf.insert("create_time".into(), created);
        conf.insert("update_time".into(), json!(now()));
        let status = if previous.is_some() { 200 } else { 201 };
        self.commit(
            Kind::Credentials,
            &key,
            Some(Value::Object(conf)),
            previous,
            status,
        )
    }

    fn credential_delete(&self, user: &str, id: &str) -> Result<Reply, store::StoreError> {
        let key = format!("{user}/credentials/{id}");
        let _guard = self.writes.lock().unwrap_or_else(|e| e.into_inner());
        let Some(previous) = self.store.get(Kind::Credentials, &key)? else {
            return Ok(self.missing_or_file(Kind::Credentials, &key));
        };
        self.commit(Kind::Credentials, &key, None, Some(previous), 200)
    }

    /// `PUT /plugin_metadata/NAME`: the body is the metadata conf of plugin NAME (an enabled
    /// plugin), checked against its metadata schema by the build; stored with `id` = NAME and
    /// no timestamps, as APISIX stores it.
    fn put_metadata(
        &self,
        name: Option<String>,
        body: Option<Value>,
    ) -> Result<Reply, store::StoreError> {
        let kind = Kind::PluginMetadata;
        let Some(name) = name else {
            return Ok(Reply::bad("missing plugin name"));
        };
        let mut conf = match object_body(body) {
            Ok(c) => c,
            Err(r) => return Ok(r),
        };
        if let Some(r) = forbidden_times(&conf) {
            return Ok(r);
        }
        if validate_id(&name).is_err()
            || self.reloader.gateway().load().registry.get(&name).is_none()
        {
            return Ok(Reply::bad("invalid plugin name"));
        }
        let _guard = self.writes.lock().unwrap_or_else(|e| e.into_inner());
        let previous = self.store.get(kind, &name)?;
        conf.insert("id".into(), Value::String(name.clone()));
        let status = if previous.is_some() { 200 } else { 201 };
        self.commit(kind, &name, Some(Value::Object(conf)), previous, status)
    }

    /// 400 for a config-file resource (read-only here), 404 otherwise.
    fn missing_or_file(&self, kind: Kind, id: &str) -> Reply {
        let snap = self.reloader.gateway().load_full();
        if store::resource_ids(&snap.doc, kind).iter().any(|i| i == id) {
            Reply::bad(file_owned(kind, id))
        } else {
            Reply::not_found()
        }
    }

    /// Validates the change by a full build, stores it, publishes it. `new` None deletes.
    /// The caller holds the write lock.
    fn commit(
        &self,
        kind: Kind,
        id: &str,
        new: Option<Value>,
        previous: Option<Value>,
        status: u16,
    ) -> Result<Reply, store::StoreError> {
        self.commit_with(kind, id, new, previous, status, Vec::new())
    }

    /// [`Admin::commit`], also deleting the stored resources in `cascade` (a consumer's
    /// credentials); they come back if the publish fails.
    fn commit_with(
        &self,
        kind: Kind,
        id: &str,
        new: Option<Value>,
        previous: Option<Value>,
        status: u16,
        cascade: Vec<(Kind, String, Value)>,
    ) -> Result<Reply, store::StoreError> {
        let in_store = previous.is_some();
        // An answer decided inside the build's edit (a file-owned id, a resource in use).
        let mut refusal: Option<Reply> = None;
        let mut index = None;
        let built = self.reloader.try_build(|doc| {
            let r = edit_document(doc, kind, id, new.clone(), in_store, &mut index);
            if let Err(r) = r {
                refusal = Some(r);
                // Stops the build; the refusal above is the answer.
                return Err(ConfigErrors(vec![ConfigError::new("", "refused")]));
            }
            Ok(())
        });
        if let Some(r) = refusal {
            return Ok(r);
        }
        let snap = match built {
            Ok(s) => s,
            Err(errors) => return Ok(Reply::bad(api_message(&errors, kind, index))),
        };
        // Service plugins are only checked by a build when a route uses the service; an Admin
        // API write checks them now so nothing invalid is stored.
        if let (Kind::Services, Some(v)) = (kind, &new) {
            if let Some(msg) = check_plugins(&snap, v.get("plugins")) {
                return Ok(Reply::bad(msg));
            }
        }
        if new.is_some() && matches!(kind, Kind::Consumers | Kind::Credentials) {
            if let Some(msg) = duplicate_key(&snap.consumers, kind, id) {
                return Ok(Reply::bad(msg));
            }
        }
        let warnings: Vec<String> = match (kind, index) {
            (Kind::Ssls, Some(i)) => snap
                .tls
                .warnings
                .iter()
                .filter(|(at, _)| *at == i)
                .map(|(_, w)| w.clone())
                .collect(),
            _ => Vec::new(),
        };
        // APISIX stores `ssls` keys encrypted with the node's keyring, if it has one.
        // And an upstream's `tls.client_key` (APISIX's `encrypt_conf`), inline ones too.
        let new = match (kind, new) {
            (Kind::Ssls, Some(v)) => Some(encrypt_keys(v, &snap.doc.node.keyring())),
            (Kind::Upstreams | Kind::Routes | Kind::Services, Some(mut v)) => {
                if let Some(Value::String(k)) = client_key_mut(kind, &mut v) {
                    *k = snap.doc.node.keyring().encrypt(k);
                }
                Some(v)
            }
            (_, new) => new,
        };
        drop(snap);

        let started = Instant::now();
        match &new {
            Some(v) => {
                self.store.put(kind, id, v)?;
            }
            None => {
                self.store.delete(kind, id)?;
            }
        }
        for (k, i, _) in &cascade {
            self.store.delete(*k, i)?;
        }
        let stored = started.elapsed();
        if let Err(errors) = self.reloader.rebuild("admin api", true) {
            // Something changed between the check and the publish (the config file, most
            // likely): put the store back as it was so it matches what is serving.
            let undo = match &previous {
                Some(p) => self.store.put(kind, id, p).map(|_| ()),
                None => self.store.delete(kind, id).map(|_| ()),
            };
            if let Err(e) = undo {
                tracing::error!(
                    "admin api: could not undo {kind}/{id} after a failed rebuild: {e}"
                );
            }
            for (k, i, v) in &cascade {
                if let Err(e) = self.store.put(*k, i, v) {
                    tracing::error!(
                        "admin api: could not undo {k}/{i} after a failed rebuild: {e}"
                    );
                }
            }
            return Ok(Reply::bad(api_message(&errors, kind, None)));
        }
        tracing::info!(
            resource = %kind,
            id,
            store_ms = stored.as_secs_f64() * 1000.0,
            live_ms = started.elapsed().as_secs_f64() * 1000.0,
            "admin api write is live"
        );
        Ok(match new {
            Some(v) => {
                let mut body = json!({ "key": kind.key(id), "value": redact(kind, v) });
                if !warnings.is_empty() {
                    body["warning"] = json!(warnings.join("; "));
                }
                Reply::json(status, body)
            }
            None => Reply::json(200, json!({ "deleted": "1", "key": kind.key(id) })),
        })
    }

    // ---- plugins and status -----------------------------------------------------------------

    fn plugin_list(&self) -> Reply {
        let snap = self.reloader.gateway().load_full();
        let names: Vec<&str> = snap.registry.names().collect();
        Reply::json(200, json!(names))
    }

    fn plugin_all(&self) -> Reply {
        let snap = self.reloader.gateway().load_full();
        let mut out = Map::new();
        for p in snap.registry.iter() {
            let mut attrs = json!({
                "priority": p.priority(),
                "version": p.version(),
                "schema": p.schema().as_json(),
                "kind": match p.kind() {
                    crate::plugin::PluginKind::Native => "native",
                    crate::plugin::PluginKind::Lua => "lua",
                },
            });
            if let (Some(m), Value::Object(a)) = (p.metadata_schema(), &mut attrs) {
                a.insert("metadata_schema".into(), m.as_json().clone());
            }
            out.insert(p.name().to_string(), attrs);
        }
        Reply::json(200, Value::Object(out))
    }

    fn plugin_schema(&self, name: &str) -> Reply {
        let snap = self.reloader.gateway().load_full();
        match snap.registry.get(name) {
            Some(p) => Reply::json(200, p.schema().as_json().clone()),
            None => Reply::error(404, format!("plugin not found in subsystem http: {name}")),
        }
    }

    fn plugin_reload(&self) -> Reply {
        let _guard = self.writes.lock().unwrap_or_else(|e| e.into_inner());
        match self.reloader.rebuild("reload api", true) {
            Ok(_) => Reply {
                status: 200,
                body: ReplyBody::Text("done"),
            },
            Err(errors) => Reply::json(
                400,
                json!({
                    "error_msg": format!(
                        "reload failed, generation {} keeps serving: {}",
                        self.reloader.gateway().load().generation,
                        errors.0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; ")
                    ),
                    "errors": errors.0.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
                }),
            ),
        }
    }

    fn status(&self) -> Reply {
        let mut v = self.reloader.status().to_json();
        if let Value::Object(m) = &mut v {
            m.insert(
                "current_generation".into(),
                json!(self.reloader.gateway().load().generation),
            );
            m.insert("store".into(), json!(self.store.describe()));
            if let Some(st) = self.store.status() {
                m.insert("store_status".into(), st);
            }
        }
        Reply::json(200, v)
    }
}

/// Applies one change to a build's document (already holding the file and the store).
fn edit_document(
    doc: &mut Document,
    kind: Kind,
    id: &str,
    new: Option<Value>,
    in_store: bool,
    index: &mut Option<usize>,
) -> Result<(), Reply> {
    let present = store::resource_ids(doc, kind).iter().any(|i| i == id);
    if present && !in_store {
        return Err(Reply::bad(file_owned(kind, id)));
    }
    match new {
        Some(v) => match store::insert_resource(doc, kind, id, v, InsertMode::Replace) {
            Ok(i) => *index = Some(i),
            Err(InsertError::Invalid(e)) => {
                return Err(Reply::bad(if e.path.is_empty() {
                    format!("invalid configuration: {}", e.message)
                } else {
                    format!("invalid configuration: {}: {}", e.path, e.message)
                }))
            }
            Err(InsertError::Conflict) => return Err(Reply::bad(file_owned(kind, id))),
        },
        None => {
            store::remove_resource(doc, kind, id);
            if kind == Kind::Consumers {
                let prefix = format!("{id}/credentials/");
                doc.credentials.retain(|c| !c.id.starts_with(&prefix));
            }
            if let Some(msg) = referrers(doc, kind, id) {
                return Err(Reply::bad(msg));
            }
        }
    }
    Ok(())
}

/// APISIX's refusal to delete an upstream or service still in use, naming every user; also an
/// `type: client` ssl an upstream presents (`tls.client_cert_id`), which APISIX lets go (its
/// requests then fail with 502).
fn referrers(doc: &Document, kind: Kind, id: &str) -> Option<String> {
    let mut users: Vec<String> = Vec::new();
    let is = |v: &Option<crate::config::Id>| v.as_ref().is_some_and(|i| i.0 == id);
    match kind {
        Kind::Upstreams => {
            for r in &doc.routes {
                if is(&r.upstream_id) {
                    users.push(format!(
                        "route [{}]",
                        r.id.as_ref().map(|i| i.0.as_str()).unwrap_or("")
                    ));
                }
            }
            for s in &doc.services {
                if is(&s.upstream_id) {
                    users.push(format!(
                        "service [{}]",
                        s.id.as_ref().map(|i| i.0.as_str()).unwrap_or("")
                    ));
                }
            }
        }
        Kind::Services => {
            for r in &doc.routes {
                if is(&r.service_id) {
                    users.push(format!(
                        "route [{}]",
                        r.id.as_ref().map(|i| i.0.as_str()).unwrap_or("")
                    ));
                }
            }
        }
        Kind::ConsumerGroups => {
            for c in &doc.consumers {
                if is(&c.group_id) {
                    users.push(format!("consumer [{}]", c.username));
                }
            }
        }
        Kind::Ssls => {
            let names =
                |u: &crate::config::Upstream| u.tls.as_ref().is_some_and(|t| is(&t.client_cert_id));
            let id_of =
                |i: &Option<crate::config::Id>| i.as_ref().map(|i| i.0.clone()).unwrap_or_default();
            for u in &doc.upstreams {
                if names(u) {
                    users.push(format!("upstream [{}]", id_of(&u.id)));
                }
            }
            for r in &doc.routes {
                if r.upstream.as_ref().is_some_and(names) {
                    users.push(format!("route [{}]", id_of(&r.id)));
                }
            }
            for s in &doc.services {
                if s.upstream.as_ref().is_some_and(names) {
                    users.push(format!("service [{}]", id_of(&s.id)));
                }
            }
        }
        _ => return None,
    }
    let first = users.first()?;
    let what = match kind {
        Kind::Upstreams => "can not delete this upstream",
        Kind::ConsumerGroups => "can not delete this consumer group",
        Kind::Ssls => "can not delete this ssl",
        _ => "can not delete this service directly",
    };
    let mut msg = format!("{what}, {first} is still using it now");
    if users.len() > 1 {
        msg.push_str(&format!(" (also: {})", users[1..].join(", ")));
    }
    Some(msg)
}

/// A resource as the Admin API shows it: an `ssls` entry without its private keys (`key`,
/// `keys`), which APISIX leaves out of reads too.
///
/// An upstream's `tls.client_key` (inline in a route or service too) is left out the same way
/// (APISIX answers with it encrypted, or in clear text without a keyring).
fn redact(kind: Kind, mut value: Value) -> Value {
    match kind {
        Kind::Ssls => {
            if let Value::Object(m) = &mut value {
                m.remove("key");
                m.remove("keys");
            }
        }
        Kind::Upstreams | Kind::Routes | Kind::Services => {
            let tls = match kind {
                Kind::Upstreams => value.get_mut("tls"),
                _ => value.get_mut("upstream").and_then(|u| u.get_mut("tls")),
            };
            if let Some(Value::Object(t)) = tls {
                t.remove("client_key");
            }
        }
        _ => {}
    }
    value
}

/// The upstream `tls.client_key` of a resource's value (`tls` of an upstream, `upstream.tls`
/// of a route or service).
fn client_key_mut(kind: Kind, value: &mut Value) -> Option<&mut Value> {
    let upstream = match kind {
        Kind::Upstreams => value,
        _ => value.get_mut("upstream")?,
    };
    upstream.get_mut("tls")?.get_mut("client_key")
}

/// An `ssls` value with `key` and every `keys` item encrypted by `keyring` (PEM ones only; no
/// keyring leaves them as they are).
fn encrypt_keys(mut value: Value, keyring: &crate::tls::Keyring) -> Value {
    if let Some(Value::String(k)) = value.get_mut("key") {
        *k = keyring.encrypt(k);
    }
    if let Some(Value::Array(ks)) = value.get_mut("keys") {
        for k in ks.iter_mut() {
            if let Value::String(s) = k {
                *s = keyring.encrypt(s);
            }
        }
    }
    value
}

/// APISIX's answer to a method plugin metadata does not have.
fn metadata_unsupported(method: &str) -> Reply {
    Reply::error(
        405,
        format!("not supported `{method}` method for plugin_metadata"),
    )
}

fn file_owned(kind: Kind, id: &str) -> String {
    format!(
        "{} {id} is defined in the config file and is read-only through the Admin API; \
         change it in the config file",
        kind.singular()
    )
}

/// Build errors as one API message. Errors about the written resource lose their config path
/// (`routes[3].plugins.x: failed to check ...` becomes `failed to check ...`); errors about
/// other resources keep theirs.
fn api_message(errors: &ConfigErrors, kind: Kind, index: Option<usize>) -> String {
    let prefix = index.map(|i| format!("{}[{i}]", kind.as_str()));
    let mut parts = Vec::new();
    for e in &errors.0 {
        let rest = prefix.as_deref().and_then(|p| {
            let rest = e.path.strip_prefix(p)?;
            (rest.is_empty() || rest.starts_with('.')).then(|| rest.trim_start_matches('.'))
        });
        parts.push(match rest {
            Some(_)
                if e.message
                    .starts_with("failed to check the configuration of plugin") =>
            {
                e.message.clone()
            }
            Some("") => e.message.clone(),
            Some(rest) => format!("invalid configuration: {rest}: {}", e.message),
            None => e.to_string(),
        });
    }
    parts.join("; ")
}

/// The attribute each auth plugin finds its consumer by (APISIX's
/// `plugin_unique_key_attrs` in `apisix/consumer.lua`).
const UNIQUE_KEY_ATTRS: [(&str, &str); 6] = [
    ("key-auth", "key"),
    ("basic-auth", "username"),
    ("jwt-auth", "key"),
    ("hmac-auth", "key_id"),
    ("ldap-auth", "user_dn"),
    ("ldap-auth-advanced", "user_dn"),
];

/// APISIX's `check_duplicate_key`: a consumer or credential just written may not use an auth
/// key another consumer or credential already has (the runtime lookup could not tell them
/// apart). A consumer does not conflict with its own credentials; a credential only with itself.
fn duplicate_key(consumers: &crate::snapshot::Consumers, kind: Kind, id: &str) -> Option<String> {
    let (user, cred) = match kind {
        Kind::Credentials => {
            let (u, c) = crate::config::split_credential_id(id)?;
            (u, Some(c))
        }
        _ => (id, None),
    };
    for (plugin, attr) in UNIQUE_KEY_ATTRS {
        let Some(entries) = consumers.by_plugin.get(plugin) else {
            continue;
        };
        let is_written = |e: &crate::snapshot::AuthEntry| {
            e.consumer.username == user && e.credential_id.as_deref() == cred
        };
        for written in entries.iter().filter(|e| is_written(e)) {
            let Some(Value::String(value)) = written.conf.get(attr) else {
                continue;
            };
            if value.starts_with("$secret://") || value.starts_with("$env://") {
                continue;
            }
            let owner = entries.iter().find(|e| {
                let same_owner = match cred {
                    Some(_) => is_written(e),
                    None => e.consumer.username == user,
                };
                !same_owner && e.conf.get(attr) == Some(&Value::String(value.clone()))
            });
            if let Some(o) = owner {
                let desc = match &o.credential_id {
                    Some(c) => format!("credential: {c} of consumer: {}", o.consumer.username),
                    None => format!("consumer: {}", o.consumer.username),
                };
                return Some(format!(
                    "duplicate {attr} of plugin {plugin} found with {desc}"
                ));
            }
        }
    }
    None
}

/// Checks a service's plugin confs against the registry of a successful build.
fn check_plugins(snap: &crate::snapshot::Snapshot, plugins: Option<&Value>) -> Option<String> {
    let Some(Value::Object(plugins)) = plugins else {
        return None;
    };
    for (name, conf) in plugins {
        let Some(p) = snap.registry.get(name) else {
            return Some(format!("unknown plugin [{name}]"));
        };
        let mut conf = conf.clone();
        if !conf.is_object() {
            return Some(format!(
                "failed to check the configuration of plugin {name} err: wrong type: expected object, got {}",
                json_type(&conf)
            ));
        }
        if let Err(e) = crate::snapshot::check_plugin_conf(p.as_ref(), &mut conf, ConfScope::Route)
        {
            return Some(format!(
                "failed to check the configuration of plugin {name} err: {e}"
            ));
        }
    }
    None
}

fn object_body(body: Option<Value>) -> Result<Map<String, Value>, Reply> {
    match body {
        None => Err(Reply::bad("missing configurations")),
        Some(Value::Object(m)) => Ok(m),
        Some(other) => Err(Reply::bad(format!(
            "invalid configuration: wrong type: expected object, got {}",
            json_type(&other)
        ))),
    }
}

/// A JSON id (string or non-negative integer) as a string; None for anything else.
fn id_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) if n.is_u64() => Some(n.to_string()),
        _ => None,
    }
}

fn body_id(conf: &Map<String, Value>, field: &str) -> Result<Option<String>, Reply> {
    match conf.get(field) {
        None => Ok(None),
        Some(v) => id_string(v).map(Some).ok_or_else(|| {
            Reply::bad(format!(
                "invalid configuration: {field}: expected a string or integer id"
            ))
        }),
    }
}

/// The body field that holds a resource's id: a consumer's is `username`, as in APISIX.
fn id_field(kind: Kind) -> &'static str {
    match kind {
        Kind::Consumers => "username",
        _ => "id",
    }
}

fn check_id(kind: Kind, id: &str) -> Result<(), Reply> {
    validate_id(id).map_err(|e| Reply::bad(format!("invalid {} id: {e}", kind.singular())))
}

/// APISIX refuses client-set timestamps on PUT and POST (PATCH may carry them).
fn forbidden_times(conf: &Map<String, Value>) -> Option<Reply> {
    for field in ["create_time", "update_time"] {
        if conf.contains_key(field) {
            return Some(Reply::bad(format!("the property is forbidden: {field}")));
        }
        if conf
            .get("upstream")
            .and_then(|u| u.as_object())
            .is_some_and(|u| u.contains_key(field))
        {
            return Some(Reply::bad(format!(
                "the property is forbidden: upstream.{field}"
            )));
        }
    }
    None
}

/// APISIX's PATCH merge: objects merge key by key, `null` removes a key, anything else
/// (arrays included) replaces.
pub fn merge(target: &mut Value, patch: Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(&k);
                } else if let Some(existing) =
                    t.get_mut(&k).filter(|e| e.is_object() && v.is_object())
                {
                    merge(existing, v);
                } else {
                    t.insert(k, v);
                }
            }
        }
        (t, p) => *t = p,
    }
}

/// APISIX's sub-path PATCH: `plugins/limit-count` sets that field to the body, creating
/// missing objects on the way; a non-object on the way is `invalid sub-path`.
pub fn patch_sub_path(target: &mut Value, sub_path: &str, body: Value) -> Result<(), String> {
    let segs: Vec<&str> = sub_path.split('/').filter(|s| !s.is_empty()).collect();
    let Some((last, parents)) = segs.split_last() else {
        *target = body;
        return Ok(());
    };
    let mut cur = target;
    for (i, seg) in parents.iter().enumerate() {
        let Value::Object(m) = cur else {
            return Err(format!("invalid sub-path: /{}", segs[..i].join("/")));
        };
        cur = m
            .entry(seg.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
    }
    match cur {
        Value::Object(m) => {
            m.insert(last.to_string(), body);
            Ok(())
        }
        _ => Err(format!("invalid sub-path: /{}", segs.join("/"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_as_apisix() {
        let mut v = json!({"a":{"b":1,"c":2},"l":[1,2],"x":1});
        merge(
            &mut v,
            json!({"a":{"b":5,"c":null},"l":[3],"x":null,"n":true}),
        );
        assert_eq!(v, json!({"a":{"b":5},"l":[3],"n":true}));
    }

    #[test]
    fn sub_path() {
        let mut v = json!({"plugins":{"a":{}},"uri":"/x"});
        patch_sub_path(&mut v, "plugins", json!({"b":{"k":1}})).unwrap();
        assert_eq!(v["plugins"], json!({"b":{"k":1}}));
        patch_sub_path(&mut v, "labels/env", json!("prod")).unwrap();
        assert_eq!(v["labels"], json!({"env":"prod"}));
        assert_eq!(
            patch_sub_path(&mut v, "uri/x", json!(1)).unwrap_err(),
            "invalid sub-path: /uri/x"
        );
    }

    #[test]
    fn messages_lose_the_resource_path() {
        let errors = ConfigErrors(vec![
            ConfigError::new(
                "routes[2].plugins.openfunction",
                "failed to check the configuration of plugin openfunction err: property \"function_uri\" is required",
            ),
            ConfigError::new("routes[2]", "\"uri\" or \"uris\" is required"),
            ConfigError::new("routes[2].upstream_id", "upstream \"9\" not found"),
            ConfigError::new("routes[0].upstream_id", "upstream \"9\" not found"),
        ]);
        assert_eq!(
            api_message(&errors, Kind::Routes, Some(2)),
            "failed to check the configuration of plugin openfunction err: property \"function_uri\" is required; \
             \"uri\" or \"uris\" is required; \
             invalid configuration: upstream_id: upstream \"9\" not found; \
             routes[0].upstream_id: upstream \"9\" not found"
        );
    }
}
