//! The process-wide answer cache: one [`Name`] per host name, each refreshed by a task of its
//! own on the DNS thread while the name is in use.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::resolver::{Answer, Failure, Resolver};
use super::{Resolved, Settings, MIN_TTL};

/// A name not held by a snapshot, a pooled connection or a plugin conf stays cached (and
/// refreshed) this long after its last lookup (cosocket names, which nothing holds).
const IDLE_FOR: Duration = Duration::from_secs(300);

/// First retry of a name that failed; doubled per failure up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
enum State {
    /// Not looked up yet.
    Pending,
    Up(Arc<[IpAddr]>),
    Down(Arc<str>),
}

/// One host name's current answer.
#[derive(Debug)]
pub struct Name {
    host: Arc<str>,
    state: watch::Sender<State>,
    /// `state` is `Down`: the one thing a request reads per node (one relaxed load).
    down: AtomicBool,
    /// Counts changes of the address set; a pooled connection made under another one is
    /// not reused.
    generation: AtomicU64,
    /// Rotates the first address tried by new connections.
    next: AtomicUsize,
    /// Seconds since [`epoch`] of the last lookup.
    last_used: AtomicU64,
    /// The upstream nodes using it, for the log lines about it.
    users: Mutex<Vec<Weak<NodeUse>>>,
}

/// Which upstream node uses a name (for log lines).
#[derive(Debug)]
struct NodeUse {
    upstream: String,
    node: String,
}

/// An upstream node's hold on its host name (see [`super::node_name`]).
#[derive(Debug)]
pub struct NodeName {
    name: Arc<Name>,
    _use: Arc<NodeUse>,
}

impl NodeName {
    /// The name does not resolve: the balancer skips the node.
    pub fn is_down(&self) -> bool {
        self.name.down.load(Ordering::Relaxed)
    }
}

/// What a connection was made with: its name and the answer's generation.
#[derive(Debug, Clone)]
pub struct Pin {
    name: Arc<Name>,
    generation: u64,
}

impl Pin {
    /// The name's answer is still the one the connection was made with.
    pub fn current(&self) -> bool {
        self.name.generation.load(Ordering::Relaxed) == self.generation
    }
}

struct Cache {
    names: Mutex<HashMap<Arc<str>, Arc<Name>>>,
    engine: OnceLock<Engine>,
}

/// The DNS thread: its runtime handle and the resolver that lives on it.
struct Engine {
    handle: tokio::runtime::Handle,
    resolver: Arc<Resolver>,
    settings: Settings,
}

fn cache() -> &'static Cache {
    static CACHE: OnceLock<Cache> = OnceLock::new();
    CACHE.get_or_init(|| Cache {
        names: Mutex::new(HashMap::new()),
        engine: OnceLock::new(),
    })
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_secs() -> u64 {
    epoch().elapsed().as_secs()
}

/// Starts the DNS thread with `settings` (the node's) and the refresh of every name the
/// snapshot built so far uses. A second call, or one after a lookup started the thread with
/// the defaults, changes nothing.
pub fn start(settings: Settings) {
    // One start at a time: two first lookups on two workers must not start two threads.
    static STARTING: Mutex<()> = Mutex::new(());
    let _starting = STARTING.lock().unwrap_or_else(|e| e.into_inner());
    let c = cache();
    if c.engine.get().is_some() {
        if c.engine.get().map(|e| &e.settings) != Some(&settings) {
            tracing::warn!("DNS settings changed after the resolver started; they take effect at the next restart");
        }
        return;
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let thread_settings = settings.clone();
    let spawned = std::thread::Builder::new()
        .name("moongate-dns".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!("DNS: cannot start its runtime: {e}");
                    return;
                }
            };
            let resolver = rt.block_on(async { Arc::new(Resolver::new(&thread_settings)) });
            let _ = tx.send((rt.handle().clone(), resolver));
            rt.block_on(std::future::pending::<()>());
        });
    if let Err(e) = spawned {
        tracing::error!("DNS: cannot start its thread: {e}");
        return;
    }
    let Ok((handle, resolver)) = rx.recv() else {
        return;
    };
    // Under the names' lock: a name made from here on sees the engine and starts its own
    // refresh; every one made before is started here.
    let names = c.names.lock().unwrap_or_else(|e| e.into_inner());
    let engine = c.engine.get_or_init(|| Engine {
        handle,
        resolver,
        settings,
    });
    for name in names.values() {
        spawn_refresh(engine, name.clone());
    }
}

fn engine() -> Option<&'static Engine> {
    let c = cache();
    if c.engine.get().is_none() {
        start(Settings::default());
    }
    c.engine.get()
}

/// The cached entry for `host` (made, and its refresh started when the resolver runs, if new).
fn entry(host: &str) -> Arc<Name> {
    let key: Arc<str> = host.trim_end_matches('.').to_ascii_lowercase().into();
    let c = cache();
    let mut names = c.names.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(n) = names.get(&key) {
        return n.clone();
    }
    let name = Arc::new(Name {
        host: key.clone(),
        state: watch::Sender::new(State::Pending),
        down: AtomicBool::new(false),
        generation: AtomicU64::new(0),
        next: AtomicUsize::new(0),
        last_used: AtomicU64::new(now_secs()),
        users: Mutex::new(Vec::new()),
    });
    names.insert(key, name.clone());
    if let Some(engine) = c.engine.get() {
        spawn_refresh(engine, name.clone());
    }
    name
}

/// The first address of `host`'s current answer, without a lookup: None when the name is not
/// cached, not looked up yet or down.
pub(super) fn current_addr(host: &str) -> Option<IpAddr> {
    let key = host.trim_end_matches('.').to_ascii_lowercase();
    let names = cache().names.lock().unwrap_or_else(|e| e.into_inner());
    let name = names.get(key.as_str())?;
    let state = name.state.borrow();
    match &*state {
        State::Up(addrs) => addrs.first().copied(),
        _ => None,
    }
}

pub(super) fn node_name(host: &str, upstream: &str, node: &str) -> NodeName {
    let name = entry(host);
    let u = Arc::new(NodeUse {
        upstream: upstream.to_string(),
        node: node.to_string(),
    });
    {
        let mut users = name.users.lock().unwrap_or_else(|e| e.into_inner());
        users.retain(|w| w.strong_count() > 0);
        let known = users
            .iter()
            .filter_map(Weak::upgrade)
            .any(|o| same_use(&o, &u));
        // A reload keeps its nodes' lines quiet; a node new to a down name is told once.
        if !known {
            if let State::Down(err) = &*name.state.borrow() {
                log_down(&u, &name.host, err);
            }
        }
        users.push(Arc::downgrade(&u));
    }
    NodeName { name, _use: u }
}

fn same_use(a: &NodeUse, b: &NodeUse) -> bool {
    a.upstream == b.upstream && a.node == b.node
}

pub(super) async fn resolve(host: &str) -> Result<Resolved, String> {
    // Starts the DNS thread if nothing did (a lookup outside `moongate run`).
    let engine = engine().ok_or_else(|| "the DNS resolver did not start".to_string())?;
    let name = entry(host);
    name.last_used.store(now_secs(), Ordering::Relaxed);
    let mut rx = name.state.subscribe();
    let state = {
        let now = rx.borrow_and_update().clone();
        match now {
            State::Pending => {
                let wait = engine.settings.timeout + Duration::from_secs(1);
                match tokio::time::timeout(wait, rx.wait_for(|s| !matches!(s, State::Pending)))
                    .await
                {
                    Ok(Ok(s)) => s.clone(),
                    _ => return Err("DNS query timed out".to_string()),
                }
            }
            other => other,
        }
    };
    match state {
        State::Up(addrs) => {
            let first = name.next.fetch_add(1, Ordering::Relaxed) % addrs.len().max(1);
            let generation = name.generation.load(Ordering::Relaxed);
            Ok(Resolved {
                addrs,
                first,
                pin: Some(Pin { name, generation }),
            })
        }
        State::Down(err) => Err(err.to_string()),
        State::Pending => Err("DNS query timed out".to_string()),
    }
}

/// Held by someone other than the cache and its refresh task, or looked up lately.
fn in_use(name: &Arc<Name>) -> bool {
    Arc::strong_count(name) > 2
        || now_secs().saturating_sub(name.last_used.load(Ordering::Relaxed)) < IDLE_FOR.as_secs()
}

fn spawn_refresh(engine: &'static Engine, name: Arc<Name>) {
    let resolver = engine.resolver.clone();
    let valid = engine.settings.valid;
    engine.handle.spawn(async move {
        let mut refresh = Refresh::default();
        loop {
            let outcome = resolver.lookup(&name.host).await;
            let wait = refresh.apply(&name, outcome, valid);
            tokio::time::sleep(wait).await;
            if !in_use(&name) && evict(&name) {
                tracing::debug!(host = %name.host, "DNS: name no longer in use, forgotten");
                return;
            }
        }
    });
}

/// Removes `name` from the cache when nothing else holds it; checked under the cache's lock,
/// so no lookup can take it meanwhile.
fn evict(name: &Arc<Name>) -> bool {
    let mut names = cache().names.lock().unwrap_or_else(|e| e.into_inner());
    if Arc::strong_count(name) > 2 {
        return false;
    }
    names.remove(&name.host);
    true
}

/// A name's refresh loop state.
#[derive(Default)]
struct Refresh {
    /// Failures in a row (for the retry backoff).
    failures: u32,
    /// A failure to get an answer was logged for this run of failures.
    warned: bool,
}

impl Refresh {
    /// Takes one lookup's outcome into `name`, logging what changed; returns when to look up
    /// again.
    fn apply(
        &mut self,
        name: &Name,
        outcome: Result<Answer, Failure>,
        valid: Option<Duration>,
    ) -> Duration {
        match outcome {
            Ok(answer) => {
                let ttl = valid.unwrap_or(answer.ttl).max(MIN_TTL);
                self.failures = 0;
                self.warned = false;
                self.set_up(name, answer.addrs);
                ttl
            }
            Err(failure) => {
                let retry = RETRY_MIN
                    .saturating_mul(1 << self.failures.min(8))
                    .min(RETRY_MAX);
                self.failures += 1;
                // As APISIX's DNS client: only an answer that the name does not exist replaces
                // a good one; while the servers fail to answer, the last one keeps serving.
                let keep = matches!(failure, Failure::Transient(_))
                    && matches!(&*name.state.borrow(), State::Up(_));
                if keep {
                    if !self.warned {
                        self.warned = true;
                        tracing::warn!(
                            host = %name.host,
                            "DNS: failed to resolve {}: {}; its last answer keeps serving until the DNS servers answer",
                            name.host,
                            failure.text(),
                        );
                    }
                } else {
                    set_down(name, failure.text());
                }
                retry
            }
        }
    }

    fn set_up(&self, name: &Name, mut addrs: Vec<IpAddr>) {
        let before = name.state.borrow().clone();
        match &before {
            State::Up(old) if same_set(old, &addrs) => return,
            State::Up(old) => {
                name.generation.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    host = %name.host,
                    "DNS: the answer for {} changed: {} -> {}",
                    name.host,
                    list(old),
                    list(&addrs)
                );
            }
            State::Down(_) => {
                name.generation.fetch_add(1, Ordering::Relaxed);
                for u in users(name) {
                    tracing::info!(
                        upstream = %u.upstream,
                        node = %u.node,
                        "upstream node is up again: {} resolves to {}",
                        name.host,
                        list(&addrs)
                    );
                }
            }
            State::Pending => {
                tracing::debug!(host = %name.host, "DNS: {} resolves to {}", name.host, list(&addrs));
            }
        }
        let mut seen = Vec::with_capacity(addrs.len());
        addrs.retain(|a| {
            let new = !seen.contains(a);
            seen.push(*a);
            new
        });
        name.state.send_replace(State::Up(addrs.into()));
        name.down.store(false, Ordering::Relaxed);
    }
}

fn set_down(name: &Name, err: &str) {
    if let State::Down(old) = &*name.state.borrow() {
        if &**old == err {
            return;
        }
    }
    let was_down = matches!(&*name.state.borrow(), State::Down(_));
    name.down.store(true, Ordering::Relaxed);
    name.state.send_replace(State::Down(err.into()));
    if was_down {
        // Still down, for another reason: not a change of the node's state.
        return;
    }
    let users = users(name);
    if users.is_empty() {
        tracing::warn!(host = %name.host, "DNS: failed to resolve {}: {err}", name.host);
    }
    for u in users {
        log_down(&u, &name.host, err);
    }
}

fn log_down(u: &NodeUse, host: &str, err: &str) {
    tracing::error!(
        upstream = %u.upstream,
        node = %u.node,
        "upstream node is down: failed to resolve {host}: {err}"
    );
}

/// The live users of a name, each (upstream, node) once.
fn users(name: &Name) -> Vec<Arc<NodeUse>> {
    let users = name.users.lock().unwrap_or_else(|e| e.into_inner());
    let mut out: Vec<Arc<NodeUse>> = Vec::new();
    for u in users.iter().filter_map(Weak::upgrade) {
        if !out.iter().any(|o| same_use(o, &u)) {
            out.push(u);
        }
    }
    out
}

fn same_set(a: &[IpAddr], b: &[IpAddr]) -> bool {
    let mut a = a.to_vec();
    let mut b = b.to_vec();
    a.sort();
    a.dedup();
    b.sort();
    b.dedup();
    a == b
}

fn list(addrs: &[IpAddr]) -> String {
    addrs
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Marks `host` down (or up at 127.0.0.1), for other modules' unit tests.
#[cfg(test)]
pub(crate) fn force(host: &str, down: bool) {
    let name = entry(host);
    if down {
        set_down(&name, "no such name (NXDOMAIN)");
    } else {
        Refresh::default().set_up(&name, vec![IpAddr::from([127, 0, 0, 1])]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name() -> Name {
        Name {
            host: "svc.test".into(),
            state: watch::Sender::new(State::Pending),
            down: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            next: AtomicUsize::new(0),
            last_used: AtomicU64::new(0),
            users: Mutex::new(Vec::new()),
        }
    }

    fn answer(ips: &[&str], ttl: u64) -> Result<Answer, Failure> {
        Ok(Answer {
            addrs: ips.iter().map(|s| s.parse().unwrap()).collect(),
            ttl: Duration::from_secs(ttl),
        })
    }

    #[test]
    fn ttl_is_clamped_and_overridden() {
        let n = name();
        let mut r = Refresh::default();
        assert_eq!(r.apply(&n, answer(&["127.0.0.1"], 0), None), MIN_TTL);
        assert_eq!(
            r.apply(&n, answer(&["127.0.0.1"], 30), None),
            Duration::from_secs(30)
        );
        let valid = Some(Duration::from_secs(7));
        assert_eq!(
            r.apply(&n, answer(&["127.0.0.1"], 30), valid),
            Duration::from_secs(7)
        );
    }

    #[test]
    fn changes_bump_the_generation_and_gone_is_down_at_once() {
        let n = name();
        let mut r = Refresh::default();
        r.apply(&n, answer(&["127.0.0.1", "127.0.0.2"], 5), None);
        assert_eq!(n.generation.load(Ordering::Relaxed), 0);
        // Same set in another order: nothing changes.
        r.apply(&n, answer(&["127.0.0.2", "127.0.0.1"], 5), None);
        assert_eq!(n.generation.load(Ordering::Relaxed), 0);
        r.apply(&n, answer(&["127.0.0.3"], 5), None);
        assert_eq!(n.generation.load(Ordering::Relaxed), 1);
        assert!(!n.down.load(Ordering::Relaxed));
        let retry = r.apply(&n, Err(Failure::Gone("NXDOMAIN".into())), None);
        assert_eq!(retry, RETRY_MIN);
        assert!(n.down.load(Ordering::Relaxed));
        let retry = r.apply(&n, Err(Failure::Gone("NXDOMAIN".into())), None);
        assert_eq!(retry, RETRY_MIN * 2);
        r.apply(&n, answer(&["127.0.0.3"], 5), None);
        assert!(!n.down.load(Ordering::Relaxed));
    }

    #[test]
    fn transient_failure_keeps_the_last_answer() {
        let n = name();
        let mut r = Refresh::default();
        r.apply(&n, answer(&["127.0.0.1"], 5), None);
        for _ in 0..10 {
            let retry = r.apply(&n, Err(Failure::Transient("timed out".into())), None);
            assert!(retry <= RETRY_MAX);
        }
        assert!(!n.down.load(Ordering::Relaxed));
        assert!(matches!(&*n.state.borrow(), State::Up(_)));
        // An answer that the name is gone replaces it.
        r.apply(&n, Err(Failure::Gone("NXDOMAIN".into())), None);
        assert!(n.down.load(Ordering::Relaxed));
        // Never resolved: a timeout is down at once.
        let fresh = name();
        Refresh::default().apply(&fresh, Err(Failure::Transient("timed out".into())), None);
        assert!(fresh.down.load(Ordering::Relaxed));
    }
}
