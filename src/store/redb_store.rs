//! The embedded store: one redb file.
//!
//! redb is a copy-on-write B-tree with checksummed commit slots: a commit with
//! `Durability::Immediate` (the default, used here) is on disk when `commit()` returns, and a
//! process killed at any moment leaves either the previous or the new commit, never a torn
//! state; the next open repairs the allocator state by itself. That gives the Admin API's
//! promise (every 2xx write survives `kill -9`) without code of ours on the crash path.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableTable, TableDefinition};
use serde_json::Value;

use super::{Kind, ResourceStore, StoreError};

/// `KIND/ID` → the resource as JSON text.
const RESOURCES: TableDefinition<&str, &[u8]> = TableDefinition::new("resources");
/// Counters; `id_counter` feeds generated ids.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// A [`ResourceStore`] in one redb file.
pub struct RedbStore {
    db: Database,
    path: PathBuf,
}

fn err(context: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError(format!("{context}: {e}"))
}

fn db_key(kind: Kind, id: &str) -> String {
    format!("{}/{id}", kind.as_str())
}

fn decode(kind: Kind, id: &str, bytes: &[u8]) -> Result<Value, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| err(&format!("stored {kind}/{id} is not JSON"), e))
}

impl RedbStore {
    /// Opens (or creates) the store file. Fails when another process has it open.
    pub fn open(path: &Path) -> Result<RedbStore, StoreError> {
        let db =
            create_waiting(path).map_err(|e| err(&format!("cannot open {}", path.display()), e))?;
        // Create the tables up front so reads never meet a missing table.
        let tx = db.begin_write().map_err(|e| err("begin", e))?;
        tx.open_table(RESOURCES).map_err(|e| err("open table", e))?;
        tx.open_table(META).map_err(|e| err("open table", e))?;
        tx.commit().map_err(|e| err("commit", e))?;
        Ok(RedbStore {
            db,
            path: path.to_path_buf(),
        })
    }
}

/// How long opening waits for another process's lock on the file to go: a serving process
/// that was just killed (the supervisor restarting it, `kill -9` and a restart) may still be
/// exiting. A lock held longer is another live process, and opening fails.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

fn create_waiting(path: &Path) -> Result<Database, redb::DatabaseError> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match Database::create(path) {
            Err(redb::DatabaseError::DatabaseAlreadyOpen)
                if std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

impl ResourceStore for RedbStore {
    fn get(&self, kind: Kind, id: &str) -> Result<Option<Value>, StoreError> {
        let tx = self.db.begin_read().map_err(|e| err("begin read", e))?;
        let table = tx.open_table(RESOURCES).map_err(|e| err("open table", e))?;
        let got = table
            .get(db_key(kind, id).as_str())
            .map_err(|e| err("read", e))?;
        match got {
            Some(v) => Ok(Some(decode(kind, id, v.value())?)),
            None => Ok(None),
        }
    }

    fn list(&self, kind: Kind) -> Result<Vec<(String, Value)>, StoreError> {
        let tx = self.db.begin_read().map_err(|e| err("begin read", e))?;
        let table = tx.open_table(RESOURCES).map_err(|e| err("open table", e))?;
        // `KIND/` .. `KIND0`: '0' is the byte after '/', so this is exactly the KIND prefix.
        let lo = format!("{}/", kind.as_str());
        let hi = format!("{}0", kind.as_str());
        let mut out = Vec::new();
        for item in table
            .range(lo.as_str()..hi.as_str())
            .map_err(|e| err("read", e))?
        {
            let (k, v) = item.map_err(|e| err("read", e))?;
            let id = k.value()[lo.len()..].to_string();
            let value = decode(kind, &id, v.value())?;
            out.push((id, value));
        }
        Ok(out)
    }

    fn put(&self, kind: Kind, id: &str, value: &Value) -> Result<Option<Value>, StoreError> {
        let bytes = serde_json::to_vec(value).map_err(|e| err("encode", e))?;
        let tx = self.db.begin_write().map_err(|e| err("begin write", e))?;
        let previous = {
            let mut table = tx.open_table(RESOURCES).map_err(|e| err("open table", e))?;
            let old = table
                .insert(db_key(kind, id).as_str(), bytes.as_slice())
                .map_err(|e| err("write", e))?;
            match old {
                Some(v) => Some(decode(kind, id, v.value())?),
                None => None,
            }
        };
        tx.commit().map_err(|e| err("commit", e))?;
        Ok(previous)
    }

    fn delete(&self, kind: Kind, id: &str) -> Result<Option<Value>, StoreError> {
        let tx = self.db.begin_write().map_err(|e| err("begin write", e))?;
        let previous = {
            let mut table = tx.open_table(RESOURCES).map_err(|e| err("open table", e))?;
            let old = table
                .remove(db_key(kind, id).as_str())
                .map_err(|e| err("write", e))?;
            match old {
                Some(v) => Some(decode(kind, id, v.value())?),
                None => None,
            }
        };
        tx.commit().map_err(|e| err("commit", e))?;
        Ok(previous)
    }

    fn generate_id(&self, kind: Kind) -> Result<String, StoreError> {
        let tx = self.db.begin_write().map_err(|e| err("begin write", e))?;
        let id = {
            let mut meta = tx.open_table(META).map_err(|e| err("open table", e))?;
            let resources = tx.open_table(RESOURCES).map_err(|e| err("open table", e))?;
            let mut n = meta
                .get("id_counter")
                .map_err(|e| err("read", e))?
                .map(|v| v.value())
                .unwrap_or(0);
            // Bounded: each step skips one id that is taken (only possible when a client PUT
            // an id shaped like a generated one).
            let mut id = None;
            for _ in 0..1000 {
                n += 1;
                let candidate = format!("{n:020}");
                let taken = resources
                    .get(db_key(kind, &candidate).as_str())
                    .map_err(|e| err("read", e))?
                    .is_some();
                if !taken {
                    id = Some(candidate);
                    break;
                }
            }
            meta.insert("id_counter", n).map_err(|e| err("write", e))?;
            id.ok_or_else(|| StoreError("no free generated id after 1000 tries".into()))?
        };
        tx.commit().map_err(|e| err("commit", e))?;
        Ok(id)
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn round_trip_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        {
            let s = RedbStore::open(&path).unwrap();
            assert_eq!(s.put(Kind::Routes, "1", &json!({"id":"1"})).unwrap(), None);
            assert_eq!(
                s.put(Kind::Routes, "1", &json!({"id":"1","x":2})).unwrap(),
                Some(json!({"id":"1"}))
            );
            s.put(Kind::Routes, "10", &json!({"id":"10"})).unwrap();
            s.put(Kind::Upstreams, "1", &json!({"id":"u"})).unwrap();
            let a = s.generate_id(Kind::Routes).unwrap();
            let b = s.generate_id(Kind::Routes).unwrap();
            assert_eq!(a, "00000000000000000001");
            assert_eq!(b, "00000000000000000002");
        }
        let s = RedbStore::open(&path).unwrap();
        let ids: Vec<_> = s
            .list(Kind::Routes)
            .unwrap()
            .into_iter()
            .map(|(i, _)| i)
            .collect();
        assert_eq!(ids, ["1", "10"]);
        assert_eq!(
            s.get(Kind::Routes, "1").unwrap(),
            Some(json!({"id":"1","x":2}))
        );
        assert_eq!(s.list(Kind::Services).unwrap().len(), 0);
        assert!(s.delete(Kind::Routes, "1").unwrap().is_some());
        assert!(s.delete(Kind::Routes, "1").unwrap().is_none());
        assert_eq!(s.generate_id(Kind::Routes).unwrap(), "00000000000000000003");
    }
}
