//! `ngx.shared.DICT`: OpenResty's shared memory dictionaries, shared by every worker.
//!
//! moongate's workers are threads of one process, so a dictionary is an `Arc` with a mutex
//! around a map; Lua values never cross VMs: entries hold what OpenResty stores (nil, booleans,
//! numbers, strings, and lists of numbers and strings) as Rust values, with the user flags and
//! an expiry. Each dictionary has a byte budget (its `lua_shared_dict` size); when a write does
//! not fit, the least recently used entries are evicted (expired ones first), and the `safe_*`
//! writes fail with "no memory" instead, as in OpenResty.
//!
//! Which dictionaries exist: the ones APISIX's nginx template declares for the plugins moongate
//! runs ([`DEFAULT_DICTS`]) plus `lua.shared_dicts` from the node config. Asking for any other
//! name gives nil, as `ngx.shared.unknown` does in OpenResty.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use mlua::{Lua, MultiValue, Table, UserData, UserDataMethods, Value};

/// The dictionaries APISIX's `apisix/cli/ngx_tpl.lua` declares (name, size): the rate
/// limiting plugins' counters and their helpers, and a few generic ones plugins use.
pub const DEFAULT_DICTS: &[(&str, usize)] = &[
    ("internal-status", 10 << 20),
    ("worker-events", 10 << 20),
    ("lrucache-lock", 10 << 20),
    ("plugin-limit-conn", 10 << 20),
    ("plugin-limit-conn-redis-cluster-slot-lock", 1 << 20),
    ("plugin-limit-req", 10 << 20),
    ("plugin-limit-req-redis-cluster-slot-lock", 1 << 20),
    ("plugin-limit-count", 10 << 20),
    ("plugin-limit-count-lock", 10 << 20),
    ("plugin-limit-count-redis-cluster-slot-lock", 1 << 20),
    ("plugin-limit-count-reset-header", 10 << 20),
    ("plugin-ai-rate-limiting", 10 << 20),
    ("plugin-ai-rate-limiting-reset-header", 10 << 20),
    ("plugin-graphql-limit-count", 10 << 20),
    ("plugin-graphql-limit-count-reset-header", 10 << 20),
    ("plugin-api-breaker", 10 << 20),
    ("balancer-ewma", 10 << 20),
    ("balancer-ewma-locks", 10 << 20),
    ("balancer-ewma-last-touched-at", 10 << 20),
    ("etcd-cluster-health-check", 10 << 20),
    ("discovery", 1 << 20),
    ("jwks", 1 << 20),
    ("introspection", 10 << 20),
    ("access-tokens", 1 << 20),
    ("ext-plugin", 1 << 20),
    // skywalking's segment queue and service names.
    ("tracing_buffer", 32 << 20),
];

/// What one entry costs against the budget besides its key and value (OpenResty's node and
/// rbtree overhead is of this order).
const ENTRY_OVERHEAD: usize = 64;
/// What one list element costs besides its bytes.
const LIST_NODE_OVERHEAD: usize = 24;
/// How many of the least recently used entries a full dictionary checks for expired ones
/// before evicting live ones.
const EXPIRED_SCAN: usize = 30;
/// OpenResty's key length limit.
const MAX_KEY_LEN: usize = 65535;

/// A stored value.
#[derive(Debug, Clone, PartialEq)]
pub enum Stored {
    Bool(bool),
    Num(f64),
    Str(Vec<u8>),
    List(VecDeque<Item>),
}

/// A list element: lists hold numbers and strings only.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    Num(f64),
    Str(Vec<u8>),
}

impl Item {
    fn size(&self) -> usize {
        LIST_NODE_OVERHEAD
            + match self {
                Item::Num(_) => 8,
                Item::Str(s) => s.len(),
            }
    }
}

impl Stored {
    fn size(&self) -> usize {
        match self {
            Stored::Bool(_) => 1,
            Stored::Num(_) => 8,
            Stored::Str(s) => s.len(),
            Stored::List(l) => l.iter().map(Item::size).sum(),
        }
    }
}

#[derive(Debug)]
struct Entry {
    value: Stored,
    flags: u32,
    expires: Option<Instant>,
    /// Position in the LRU order (higher is more recent).
    tick: u64,
}

impl Entry {
    fn expired(&self, now: Instant) -> bool {
        self.expires.is_some_and(|e| e <= now)
    }
    fn size(&self, key: &[u8]) -> usize {
        ENTRY_OVERHEAD + key.len() + self.value.size()
    }
}

#[derive(Debug, Default)]
struct Inner {
    map: HashMap<Vec<u8>, Entry>,
    /// tick -> key, oldest first.
    lru: BTreeMap<u64, Vec<u8>>,
    next_tick: u64,
    used: usize,
}

/// How a write treats a full dictionary.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// set / add / replace: evict the least recently used entries.
    Evict,
    /// safe_set / safe_add: fail with "no memory".
    Safe,
}

/// Why a write failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DictError {
    Exists,
    NotFound,
    NotANumber,
    NotAList,
    NoMemory,
}

impl DictError {
    pub fn as_str(&self) -> &'static str {
        match self {
            DictError::Exists => "exists",
            DictError::NotFound => "not found",
            DictError::NotANumber => "not a number",
            DictError::NotAList => "value not a list",
            DictError::NoMemory => "no memory",
        }
    }
}

/// One dictionary.
#[derive(Debug)]
pub struct SharedDict {
    pub name: String,
    capacity: Mutex<usize>,
    inner: Mutex<Inner>,
}

impl Inner {
    fn touch(&mut self, key: &[u8]) {
        let tick = self.next_tick;
        self.next_tick += 1;
        if let Some(e) = self.map.get_mut(key) {
            self.lru.remove(&e.tick);
            e.tick = tick;
            self.lru.insert(tick, key.to_vec());
        }
    }

    fn remove(&mut self, key: &[u8]) -> Option<Entry> {
        let e = self.map.remove(key)?;
        self.lru.remove(&e.tick);
        self.used -= e.size(key);
        Some(e)
    }

    /// A live (unexpired) entry. Expired ones stay (for `get_stale`) until a write needs their
    /// room or `flush_expired` drops them, as in OpenResty.
    fn live(&mut self, key: &[u8], now: Instant) -> Option<&mut Entry> {
        self.map.get_mut(key).filter(|e| !e.expired(now))
    }

    /// Makes room for `need` more bytes, never evicting `keep`: expired entries among the least
    /// recently used first, then (in Evict mode) the least recently used ones. Returns whether
    /// live entries were evicted, or None when it does not fit. Bounded work per write: only
    /// the LRU tail is looked at, as OpenResty does.
    fn make_room(
        &mut self,
        need: usize,
        capacity: usize,
        mode: Mode,
        keep: &[u8],
        now: Instant,
    ) -> Option<bool> {
        if self.used + need <= capacity {
            return Some(false);
        }
        let expired: Vec<Vec<u8>> = self
            .lru
            .values()
            .take(EXPIRED_SCAN)
            .filter(|k| k.as_slice() != keep && self.map.get(*k).is_some_and(|e| e.expired(now)))
            .cloned()
            .collect();
        for k in expired {
            self.remove(&k);
        }
        if self.used + need <= capacity {
            return Some(false);
        }
        if mode == Mode::Safe || need > capacity {
            return None;
        }
        let mut forcible = false;
        while self.used + need > capacity {
            let victim = self.lru.values().find(|k| k.as_slice() != keep).cloned()?;
            if let Some(e) = self.remove(&victim) {
                forcible |= !e.expired(now);
            }
        }
        Some(forcible)
    }

    /// Stores `value` under `key` (replacing what is there), making room first.
    fn store(
        &mut self,
        key: &[u8],
        value: Stored,
        flags: u32,
        expires: Option<Instant>,
        room: Room,
    ) -> Result<bool, DictError> {
        let old = self.map.get(key).map(|e| e.size(key)).unwrap_or(0);
        let new = ENTRY_OVERHEAD + key.len() + value.size();
        let need = new.saturating_sub(old);
        let forcible = self
            .make_room(need, room.capacity, room.mode, key, room.now)
            .ok_or(DictError::NoMemory)?;
        self.remove(key);
        let tick = self.next_tick;
        self.next_tick += 1;
        self.used += new;
        self.lru.insert(tick, key.to_vec());
        self.map.insert(
            key.to_vec(),
            Entry {
                value,
                flags,
                expires,
                tick,
            },
        );
        Ok(forcible)
    }
}

/// How a write may make room: the budget, the mode, and the time expiry is judged at.
#[derive(Clone, Copy)]
struct Room {
    capacity: usize,
    mode: Mode,
    now: Instant,
}

/// Seconds (0 = never) to an expiry instant.
fn expiry(now: Instant, exptime: f64) -> Option<Instant> {
    if exptime > 0.0 {
        Some(now + Duration::from_secs_f64(exptime.min(1e9)))
    } else {
        None
    }
}

/// How `add`/`replace`/`set` decide whether to write.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Cond {
    Always,
    IfAbsent,
    IfPresent,
}

impl SharedDict {
    pub fn new(name: &str, capacity: usize) -> SharedDict {
        SharedDict {
            name: name.to_string(),
            capacity: Mutex::new(capacity),
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data (every update is finished
        // before it returns): keep going.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn capacity(&self) -> usize {
        *self.capacity.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_capacity(&self, c: usize) {
        *self.capacity.lock().unwrap_or_else(|e| e.into_inner()) = c;
    }

    pub fn free_space(&self) -> usize {
        self.capacity().saturating_sub(self.lock().used)
    }

    /// `get`: the value and flags of a live entry.
    pub fn get(&self, key: &[u8]) -> Option<(Stored, u32)> {
        let now = Instant::now();
        let mut g = self.lock();
        let e = g.live(key, now)?;
        let out = (e.value.clone(), e.flags);
        g.touch(key);
        Some(out)
    }

    /// `get_stale`: also expired entries not yet dropped; the bool says whether it is stale.
    pub fn get_stale(&self, key: &[u8]) -> Option<(Stored, u32, bool)> {
        let now = Instant::now();
        let g = self.lock();
        let e = g.map.get(key)?;
        Some((e.value.clone(), e.flags, e.expired(now)))
    }

    fn write(
        &self,
        key: &[u8],
        value: Option<Stored>,
        exptime: f64,
        flags: u32,
        cond: Cond,
        mode: Mode,
    ) -> Result<bool, DictError> {
        let now = Instant::now();
        let capacity = self.capacity();
        let mut g = self.lock();
        let present = g.live(key, now).is_some();
        match cond {
            Cond::IfAbsent if present => return Err(DictError::Exists),
            Cond::IfPresent if !present => return Err(DictError::NotFound),
            _ => {}
        }
        match value {
            None => {
                g.remove(key);
                Ok(false)
            }
            Some(v) => g.store(
                key,
                v,
                flags,
                expiry(now, exptime),
                Room {
                    capacity,
                    mode,
                    now,
                },
            ),
        }
    }

    pub fn set(
        &self,
        key: &[u8],
        v: Option<Stored>,
        exptime: f64,
        flags: u32,
    ) -> Result<bool, DictError> {
        self.write(key, v, exptime, flags, Cond::Always, Mode::Evict)
    }

    pub fn safe_set(
        &self,
        key: &[u8],
        v: Option<Stored>,
        exptime: f64,
        flags: u32,
    ) -> Result<bool, DictError> {
        self.write(key, v, exptime, flags, Cond::Always, Mode::Safe)
    }

    pub fn add(
        &self,
        key: &[u8],
        v: Option<Stored>,
        exptime: f64,
        flags: u32,
    ) -> Result<bool, DictError> {
        self.write(key, v, exptime, flags, Cond::IfAbsent, Mode::Evict)
    }

    pub fn safe_add(
        &self,
        key: &[u8],
        v: Option<Stored>,
        exptime: f64,
        flags: u32,
    ) -> Result<bool, DictError> {
        self.write(key, v, exptime, flags, Cond::IfAbsent, Mode::Safe)
    }

    pub fn replace(
        &self,
        key: &[u8],
        v: Option<Stored>,
        exptime: f64,
        flags: u32,
    ) -> Result<bool, DictError> {
        self.write(key, v, exptime, flags, Cond::IfPresent, Mode::Evict)
    }

    pub fn delete(&self, key: &[u8]) {
        self.lock().remove(key);
    }

    /// `incr(key, value, init, init_ttl)`: the new value and whether entries were evicted. A
    /// missing key is created from `init` (with `init_ttl`) when given; the expiry of an
    /// existing key is kept.
    pub fn incr(
        &self,
        key: &[u8],
        by: f64,
        init: Option<f64>,
        init_ttl: f64,
    ) -> Result<(f64, bool), DictError> {
        let now = Instant::now();
        let capacity = self.capacity();
        let mut g = self.lock();
        if let Some(e) = g.live(key, now) {
            let Stored::Num(n) = e.value else {
                return Err(DictError::NotANumber);
            };
            let v = n + by;
            e.value = Stored::Num(v);
            g.touch(key);
            return Ok((v, false));
        }
        let Some(init) = init else {
            return Err(DictError::NotFound);
        };
        let v = init + by;
        let room = Room {
            capacity,
            mode: Mode::Evict,
            now,
        };
        let forcible = g.store(key, Stored::Num(v), 0, expiry(now, init_ttl), room)?;
        Ok((v, forcible))
    }

    /// `ttl`: seconds left (0 = never expires), None when not found.
    pub fn ttl(&self, key: &[u8]) -> Option<f64> {
        let now = Instant::now();
        let mut g = self.lock();
        let e = g.live(key, now)?;
        Some(match e.expires {
            None => 0.0,
            Some(t) => t.saturating_duration_since(now).as_secs_f64(),
        })
    }

    /// `expire`: a new expiry (0 = never) for a live key; false when not found.
    pub fn expire(&self, key: &[u8], exptime: f64) -> bool {
        let now = Instant::now();
        let mut g = self.lock();
        match g.live(key, now) {
            Some(e) => {
                e.expires = expiry(now, exptime);
                true
            }
            None => false,
        }
    }

    /// `flush_all`: every entry is expired (so `get_stale` still sees them until they go).
    pub fn flush_all(&self) {
        let now = Instant::now();
        let mut g = self.lock();
        for e in g.map.values_mut() {
            e.expires = Some(now);
        }
    }

    /// `flush_expired(max)`: drops up to `max` expired entries (0 = all); how many went.
    pub fn flush_expired(&self, max: usize) -> usize {
        let now = Instant::now();
        let mut g = self.lock();
        let mut keys: Vec<Vec<u8>> = g
            .map
            .iter()
            .filter(|(_, e)| e.expired(now))
            .map(|(k, _)| k.clone())
            .collect();
        if max > 0 {
            keys.truncate(max);
        }
        for k in &keys {
            g.remove(k);
        }
        keys.len()
    }

    /// `get_keys(max)`: live keys, up to `max` (0 = all), oldest first.
    pub fn get_keys(&self, max: usize) -> Vec<Vec<u8>> {
        let now = Instant::now();
        let g = self.lock();
        let mut out = Vec::new();
        for k in g.lru.values() {
            if max > 0 && out.len() >= max {
                break;
            }
            if g.map.get(k).is_some_and(|e| !e.expired(now)) {
                out.push(k.clone());
            }
        }
        out
    }

    /// `lpush`/`rpush`: the list's new length.
    pub fn push(&self, key: &[u8], item: Item, front: bool) -> Result<usize, DictError> {
        let now = Instant::now();
        let capacity = self.capacity();
        let mut g = self.lock();
        let need = item.size();
        match g.live(key, now) {
            Some(e) => {
                if !matches!(e.value, Stored::List(_)) {
                    return Err(DictError::NotAList);
                }
                g.make_room(need, capacity, Mode::Evict, key, now)
                    .ok_or(DictError::NoMemory)?;
                let e = g.map.get_mut(key).ok_or(DictError::NotFound)?;
                let Stored::List(l) = &mut e.value else {
                    return Err(DictError::NotAList);
                };
                if front {
                    l.push_front(item);
                } else {
                    l.push_back(item);
                }
                let n = l.len();
                g.used += need;
                g.touch(key);
                Ok(n)
            }
            None => {
                let l = VecDeque::from([item]);
                let room = Room {
                    capacity,
                    mode: Mode::Evict,
                    now,
                };
                g.store(key, Stored::List(l), 0, None, room)?;
                Ok(1)
            }
        }
    }

    /// `lpop`/`rpop`: the element, None when the list is missing or empty.
    pub fn pop(&self, key: &[u8], front: bool) -> Result<Option<Item>, DictError> {
        let now = Instant::now();
        let mut g = self.lock();
        let Some(e) = g.live(key, now) else {
            return Ok(None);
        };
        let Stored::List(l) = &mut e.value else {
            return Err(DictError::NotAList);
        };
        let item = if front { l.pop_front() } else { l.pop_back() };
        let empty = l.is_empty();
        if let Some(i) = &item {
            g.used -= i.size();
        }
        if empty {
            g.remove(key);
        }
        Ok(item)
    }

    /// `llen`: 0 for a missing key.
    pub fn llen(&self, key: &[u8]) -> Result<usize, DictError> {
        let now = Instant::now();
        let mut g = self.lock();
        match g.live(key, now) {
            None => Ok(0),
            Some(Entry {
                value: Stored::List(l),
                ..
            }) => Ok(l.len()),
            Some(_) => Err(DictError::NotAList),
        }
    }
}

fn registry() -> &'static RwLock<HashMap<String, Arc<SharedDict>>> {
    static DICTS: OnceLock<RwLock<HashMap<String, Arc<SharedDict>>>> = OnceLock::new();
    DICTS.get_or_init(|| {
        let mut m = HashMap::new();
        for (name, size) in DEFAULT_DICTS {
            m.insert(name.to_string(), Arc::new(SharedDict::new(name, *size)));
        }
        RwLock::new(m)
    })
}

/// Adds the node config's dictionaries (or resizes existing ones); what is stored survives.
pub fn configure(extra: &BTreeMap<String, crate::config::ShmSize>) {
    let mut m = registry().write().unwrap_or_else(|e| e.into_inner());
    for (name, size) in extra {
        match m.get(name) {
            Some(d) => d.set_capacity(size.0),
            None => {
                m.insert(name.clone(), Arc::new(SharedDict::new(name, size.0)));
            }
        }
    }
}

/// Every declared dictionary with its name, sorted by name (for the metrics).
pub fn all() -> Vec<(String, Arc<SharedDict>)> {
    let mut v: Vec<_> = registry()
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(k, d)| (k.clone(), d.clone()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The dictionary called `name`, if declared.
pub fn lookup(name: &str) -> Option<Arc<SharedDict>> {
    registry()
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(name)
        .cloned()
}

// ---------------------------------------------------------------------------------------------
// Lua side
// ---------------------------------------------------------------------------------------------

/// `ngx.shared.NAME`: a handle on one dictionary.
struct Handle(Arc<SharedDict>);

/// A key as OpenResty takes it: strings, numbers turned into strings; empty or too long keys
/// are errors returned to the caller (nil, "empty key").
fn key_bytes(k: &Value) -> Result<Vec<u8>, &'static str> {
    let b = match k {
        Value::String(s) => s.as_bytes().to_vec(),
        Value::Integer(i) => i.to_string().into_bytes(),
        Value::Number(n) => convert_number(*n).into_bytes(),
        Value::Nil => return Err("nil key"),
        _ => return Err("bad key type"),
    };
    if b.is_empty() {
        return Err("empty key");
    }
    if b.len() > MAX_KEY_LEN {
        return Err("key too long");
    }
    Ok(b)
}

/// Lua's tostring() of a number.
fn convert_number(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e15 {
        format!("{}", n as i64)
    } else {
        format!("{n}")
    }
}

fn to_stored(v: &Value) -> Result<Option<Stored>, &'static str> {
    Ok(Some(match v {
        Value::Nil => return Ok(None),
        Value::Boolean(b) => Stored::Bool(*b),
        Value::Integer(i) => Stored::Num(*i as f64),
        Value::Number(n) => Stored::Num(*n),
        Value::String(s) => Stored::Str(s.as_bytes().to_vec()),
        _ => return Err("bad value type"),
    }))
}

fn to_item(v: &Value) -> Result<Item, &'static str> {
    match v {
        Value::Integer(i) => Ok(Item::Num(*i as f64)),
        Value::Number(n) => Ok(Item::Num(*n)),
        Value::String(s) => Ok(Item::Str(s.as_bytes().to_vec())),
        _ => Err("bad value type"),
    }
}

fn stored_value(lua: &Lua, v: Stored) -> mlua::Result<Value> {
    Ok(match v {
        Stored::Bool(b) => Value::Boolean(b),
        Stored::Num(n) => Value::Number(n),
        Stored::Str(s) => Value::String(lua.create_string(s)?),
        // OpenResty: get on a list is an error returned to the caller.
        Stored::List(_) => Value::Nil,
    })
}

fn item_value(lua: &Lua, v: Item) -> mlua::Result<Value> {
    Ok(match v {
        Item::Num(n) => Value::Number(n),
        Item::Str(s) => Value::String(lua.create_string(s)?),
    })
}

fn num(v: Option<Value>, what: &str) -> mlua::Result<f64> {
    match v {
        None | Some(Value::Nil) => Ok(0.0),
        Some(Value::Integer(i)) => Ok(i as f64),
        Some(Value::Number(n)) => Ok(n),
        Some(Value::String(s)) => s
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| mlua::Error::runtime(format!("bad \"{what}\" argument"))),
        Some(_) => Err(mlua::Error::runtime(format!("bad \"{what}\" argument"))),
    }
}

fn ret(lua: &Lua, vals: Vec<Value>) -> mlua::Result<MultiValue> {
    let _ = lua;
    Ok(MultiValue::from_iter(vals))
}

fn fail(lua: &Lua, msg: &str) -> mlua::Result<MultiValue> {
    ret(
        lua,
        vec![Value::Nil, Value::String(lua.create_string(msg)?)],
    )
}

/// The three values a write returns: ok, err, forcible.
fn write_result(lua: &Lua, r: Result<bool, DictError>) -> mlua::Result<MultiValue> {
    match r {
        Ok(forcible) => ret(
            lua,
            vec![Value::Boolean(true), Value::Nil, Value::Boolean(forcible)],
        ),
        Err(e) => ret(
            lua,
            vec![
                Value::Boolean(false),
                Value::String(lua.create_string(e.as_str())?),
                Value::Boolean(false),
            ],
        ),
    }
}

type WriteFn = fn(&SharedDict, &[u8], Option<Stored>, f64, u32) -> Result<bool, DictError>;

fn add_write<M: UserDataMethods<Handle>>(m: &mut M, name: &'static str, f: WriteFn) {
    m.add_method(
        name,
        move |lua, this, (k, v, exptime, flags): (Value, Value, Option<Value>, Option<Value>)| {
            let key = match key_bytes(&k) {
                Ok(k) => k,
                Err(e) => {
                    return ret(
                        lua,
                        vec![
                            Value::Nil,
                            Value::String(lua.create_string(e)?),
                            Value::Boolean(false),
                        ],
                    )
                }
            };
            let value = match to_stored(&v) {
                Ok(v) => v,
                Err(e) => {
                    return ret(
                        lua,
                        vec![
                            Value::Nil,
                            Value::String(lua.create_string(e)?),
                            Value::Boolean(false),
                        ],
                    )
                }
            };
            let exptime = num(exptime, "exptime")?;
            if exptime < 0.0 {
                return Err(mlua::Error::runtime("bad \"exptime\" argument"));
            }
            let flags = num(flags, "flags")? as u32;
            write_result(lua, f(&this.0, &key, value, exptime, flags))
        },
    );
}

impl UserData for Handle {
    fn add_methods<M: UserDataMethods<Self>>(m: &mut M) {
        m.add_method("get", |lua, this, k: Value| {
            let key = match key_bytes(&k) {
                Ok(k) => k,
                Err(e) => return fail(lua, e),
            };
            match this.0.get(&key) {
                None => ret(lua, vec![Value::Nil]),
                Some((Stored::List(_), _)) => fail(lua, "value is a list"),
                Some((v, flags)) => {
                    let mut out = vec![stored_value(lua, v)?];
                    if flags != 0 {
                        out.push(Value::Integer(flags as i64));
                    }
                    ret(lua, out)
                }
            }
        });
        m.add_method("get_stale", |lua, this, k: Value| {
            let key = match key_bytes(&k) {
                Ok(k) => k,
                Err(e) => return fail(lua, e),
            };
            match this.0.get_stale(&key) {
                None => ret(lua, vec![Value::Nil]),
                Some((Stored::List(_), _, _)) => fail(lua, "value is a list"),
                Some((v, flags, stale)) => ret(
                    lua,
                    vec![
                        stored_value(lua, v)?,
                        if flags != 0 {
                            Value::Integer(flags as i64)
                        } else {
                            Value::Nil
                        },
                        Value::Boolean(stale),
                    ],
                ),
            }
        });
        add_write(m, "set", SharedDict::set);
        add_write(m, "safe_set", SharedDict::safe_set);
        add_write(m, "add", SharedDict::add);
        add_write(m, "safe_add", SharedDict::safe_add);
        add_write(m, "replace", SharedDict::replace);
        m.add_method("delete", |lua, this, k: Value| {
            let key = match key_bytes(&k) {
                Ok(k) => k,
                Err(e) => return fail(lua, e),
            };
            this.0.delete(&key);
            ret(lua, vec![Value::Boolean(true)])
        });
        m.add_method(
            "incr",
            |lua, this, (k, by, init, init_ttl): (Value, Value, Option<Value>, Option<Value>)| {
                let key = match key_bytes(&k) {
                    Ok(k) => k,
                    Err(e) => return fail(lua, e),
                };
                let by = match by {
                    Value::Integer(i) => i as f64,
                    Value::Number(n) => n,
                    _ => return Err(mlua::Error::runtime("cannot convert 'value' to a number")),
                };
                let init = match init {
                    None | Some(Value::Nil) => None,
                    Some(v) => Some(num(Some(v), "init")?),
                };
                let init_ttl = num(init_ttl, "init_ttl")?;
                if init_ttl < 0.0 {
                    return Err(mlua::Error::runtime("bad \"init_ttl\" argument"));
                }
                match this.0.incr(&key, by, init, init_ttl) {
                    Ok((v, forcible)) => ret(
                        lua,
                        vec![Value::Number(v), Value::Nil, Value::Boolean(forcible)],
                    ),
                    Err(e) => fail(lua, e.as_str()),
                }
            },
        );
        m.add_method("ttl", |lua, this, k: Value| {
            let key = match key_bytes(&k) {
                Ok(k) => k,
                Err(e) => return fail(lua, e),
            };
            match this.0.ttl(&key) {
                Some(t) => ret(lua, vec![Value::Number(t)]),
                None => fail(lua, "not found"),
            }
        });
        m.add_method("expire", |lua, this, (k, exptime): (Value, Value)| {
            let key = match key_bytes(&k) {
                Ok(k) => k,
                Err(e) => return fail(lua, e),
            };
            let exptime = num(Some(exptime), "exptime")?;
            if exptime < 0.0 {
                return Err(mlua::Error::runtime("bad \"exptime\" argument"));
            }
            if this.0.expire(&key, exptime) {
                ret(lua, vec![Value::Boolean(true)])
            } else {
                fail(lua, "not found")
            }
        });
        m.add_method("flush_all", |_, this, ()| {
            this.0.flush_all();
            Ok(())
        });
        m.add_method("flush_expired", |_, this, max: Option<Value>| {
            let max = num(max, "max_count")?.max(0.0) as usize;
            Ok(this.0.flush_expired(max))
        });
        m.add_method("get_keys", |lua, this, max: Option<Value>| {
            let max = match max {
                None | Some(Value::Nil) => 1024,
                v => num(v, "max_count")?.max(0.0) as usize,
            };
            let t = lua.create_table()?;
            for (i, k) in this.0.get_keys(max).into_iter().enumerate() {
                t.raw_set(i + 1, lua.create_string(k)?)?;
            }
            Ok(t)
        });
        m.add_method("capacity", |_, this, ()| Ok(this.0.capacity()));
        m.add_method("free_space", |_, this, ()| Ok(this.0.free_space()));
        for (name, front) in [("lpush", true), ("rpush", false)] {
            m.add_method(name, move |lua, this, (k, v): (Value, Value)| {
                let key = match key_bytes(&k) {
                    Ok(k) => k,
                    Err(e) => return fail(lua, e),
                };
                let item = match to_item(&v) {
                    Ok(i) => i,
                    Err(e) => return fail(lua, e),
                };
                match this.0.push(&key, item, front) {
                    Ok(n) => ret(lua, vec![Value::Integer(n as i64)]),
                    Err(e) => fail(lua, e.as_str()),
                }
            });
        }
        for (name, front) in [("lpop", true), ("rpop", false)] {
            m.add_method(name, move |lua, this, k: Value| {
                let key = match key_bytes(&k) {
                    Ok(k) => k,
                    Err(e) => return fail(lua, e),
                };
                match this.0.pop(&key, front) {
                    Ok(Some(i)) => ret(lua, vec![item_value(lua, i)?]),
                    Ok(None) => ret(lua, vec![Value::Nil]),
                    Err(e) => fail(lua, e.as_str()),
                }
            });
        }
        m.add_method("llen", |lua, this, k: Value| {
            let key = match key_bytes(&k) {
                Ok(k) => k,
                Err(e) => return fail(lua, e),
            };
            match this.0.llen(&key) {
                Ok(n) => ret(lua, vec![Value::Integer(n as i64)]),
                Err(e) => fail(lua, e.as_str()),
            }
        });
    }
}

/// Installs `ngx.shared`: indexing it by a declared name gives that dictionary's handle (made
/// once per VM and kept), any other name nil.
pub(crate) fn install(lua: &Lua, ngx: &Table) -> mlua::Result<()> {
    let shared = lua.create_table()?;
    let mt = lua.create_table()?;
    mt.set(
        "__index",
        lua.create_function(|lua, (t, name): (Table, Value)| {
            let Value::String(s) = &name else {
                return Ok(Value::Nil);
            };
            let Some(dict) = lookup(&s.to_string_lossy()) else {
                return Ok(Value::Nil);
            };
            let ud = lua.create_userdata(Handle(dict))?;
            t.raw_set(name, &ud)?;
            Ok(Value::UserData(ud))
        })?,
    )?;
    shared.set_metatable(Some(mt))?;
    ngx.set("shared", shared)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    impl SharedDict {
        fn used_for_test(&self) -> usize {
            self.lock().used
        }
    }

    fn s(v: &str) -> Option<Stored> {
        Some(Stored::Str(v.as_bytes().to_vec()))
    }

    #[test]
    fn add_replace_and_incr_follow_openresty() {
        let d = SharedDict::new("t", 1 << 20);
        assert_eq!(d.add(b"a", s("1"), 0.0, 0), Ok(false));
        assert_eq!(d.add(b"a", s("2"), 0.0, 0), Err(DictError::Exists));
        assert_eq!(d.replace(b"b", s("2"), 0.0, 0), Err(DictError::NotFound));
        assert_eq!(d.incr(b"a", 1.0, None, 0.0), Err(DictError::NotANumber));
        assert_eq!(d.incr(b"n", 1.0, None, 0.0), Err(DictError::NotFound));
        assert_eq!(d.incr(b"n", -1.0, Some(10.0), 0.0), Ok((9.0, false)));
        assert_eq!(d.incr(b"n", 2.5, Some(10.0), 0.0), Ok((11.5, false)));
        d.set(b"f", s("x"), 0.0, 7).unwrap();
        assert_eq!(d.get(b"f"), Some((Stored::Str(b"x".to_vec()), 7)));
        d.set(b"f", None, 0.0, 0).unwrap();
        assert_eq!(d.get(b"f"), None);
    }

    #[test]
    fn expiry_ttl_and_stale_reads() {
        let d = SharedDict::new("t", 1 << 20);
        d.set(b"k", s("v"), 0.05, 0).unwrap();
        let ttl = d.ttl(b"k").unwrap();
        assert!(ttl > 0.0 && ttl <= 0.05, "{ttl}");
        assert_eq!(d.ttl(b"none"), None);
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(d.get_stale(b"k").map(|(_, _, stale)| stale), Some(true));
        assert_eq!(d.get(b"k"), None);
        // incr keeps the expiry of the existing value and applies init_ttl to a new one.
        d.incr(b"c", 1.0, Some(0.0), 100.0).unwrap();
        d.incr(b"c", 1.0, Some(0.0), 0.0).unwrap();
        assert!(d.ttl(b"c").unwrap() > 99.0);
        d.flush_all();
        assert_eq!(d.get(b"c"), None);
        assert_eq!(d.get_keys(0).len(), 0);
    }

    #[test]
    fn a_full_dict_evicts_the_least_recently_used_or_refuses_safe_writes() {
        let d = SharedDict::new("t", 8 * 1024);
        let big = "x".repeat(1000);
        for i in 0..7 {
            assert_eq!(
                d.set(format!("k{i}").as_bytes(), s(&big), 0.0, 0),
                Ok(false)
            );
        }
        // k0 is used again, so k1 is the oldest.
        assert!(d.get(b"k0").is_some());
        assert_eq!(d.safe_set(b"k7", s(&big), 0.0, 0), Err(DictError::NoMemory));
        assert_eq!(d.set(b"k7", s(&big), 0.0, 0), Ok(true));
        assert!(d.get(b"k1").is_none());
        assert!(d.get(b"k0").is_some());
        assert!(d.free_space() < 8 * 1024);
        // More than the whole dict never fits.
        let huge = "y".repeat(9000);
        assert_eq!(d.set(b"h", s(&huge), 0.0, 0), Err(DictError::NoMemory));
    }

    #[test]
    fn a_full_dict_drops_expired_entries_before_live_ones() {
        let d = SharedDict::new("t", 8 * 1024);
        let big = "x".repeat(1000);
        d.set(b"old", s(&big), 0.01, 0).unwrap();
        for i in 0..6 {
            d.set(format!("k{i}").as_bytes(), s(&big), 0.0, 0).unwrap();
        }
        std::thread::sleep(Duration::from_millis(30));
        // The expired entry makes the room: nothing live is evicted, so forcible is false,
        // and safe_set succeeds too.
        assert_eq!(d.safe_set(b"new", s(&big), 0.0, 0), Ok(false));
        assert_eq!(d.get_stale(b"old"), None);
        assert!((0..6).all(|i| d.get(format!("k{i}").as_bytes()).is_some()));
    }

    #[test]
    fn lists() {
        let d = SharedDict::new("t", 1 << 20);
        assert_eq!(d.push(b"l", Item::Num(1.0), false), Ok(1));
        assert_eq!(d.push(b"l", Item::Str(b"a".to_vec()), true), Ok(2));
        assert_eq!(d.llen(b"l"), Ok(2));
        assert_eq!(d.pop(b"l", true), Ok(Some(Item::Str(b"a".to_vec()))));
        assert_eq!(d.pop(b"l", false), Ok(Some(Item::Num(1.0))));
        assert_eq!(d.pop(b"l", false), Ok(None));
        d.set(b"s", s("x"), 0.0, 0).unwrap();
        assert_eq!(d.push(b"s", Item::Num(1.0), true), Err(DictError::NotAList));
        assert_eq!(
            d.used_for_test(),
            d.lock().map.iter().map(|(k, e)| e.size(k)).sum::<usize>()
        );
    }
}
