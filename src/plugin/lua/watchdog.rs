//! The per-call time budget: stops a runaway Lua plugin without giving up the JIT.
//!
//! LuaJIT checks instruction hooks only in the interpreter; compiled traces ignore them unless
//! LuaJIT is built with `LUAJIT_ENABLE_CHECKHOOK` (ours is, see `.cargo/config.toml`), in which
//! case a trace checks the hook mask at each loop iteration and exits to the interpreter when a
//! hook is set. While no hook is set that check is one predictable branch, so the JIT runs at
//! full speed. LuaJIT's intended pattern (the comment at the end of `lj_record.c`) is to keep
//! hooks unset and set one *asynchronously* when a deadline passes; `lua_sethook` is safe to call
//! from another thread or a signal handler for exactly this purpose.
//!
//! So: each VM owns a [`Budget`] slot. Before Lua runs (each resume of a coroutine, each sync
//! call) the worker marks a new stretch running in the slot; after, it clears the mark (two
//! atomic operations, no clock read). One watchdog thread per process wakes periodically, notes
//! when it first saw each running stretch, and for a stretch that has run for the budget sets a
//! count-1 hook on that VM. The hook raises the Lua error `plugin call exceeded its time budget` at the next
//! instruction, which fails the call (its request gets 500) and leaves the VM usable. The worker
//! removes the hook when the call returns.
//!
//! Guarantee: a call that keeps running Lua code is stopped after at least `call_budget_ms` and
//! within `call_budget_ms` plus two watchdog ticks (a tick is at most 25 ms, and at most a
//! twentieth of the budget): the watchdog first sees a stretch up to a tick after it started. Time spent waiting
//! (`ngx.sleep`, reading a body) does not count: the deadline is set per resume. Time spent
//! inside one long native call (a huge `string.rep`) is not interrupted until it returns to Lua.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use mlua::ffi;

/// The message of the error a stopped call fails with.
pub const BUDGET_EXCEEDED: &str = "plugin call exceeded its time budget";

/// [`Budget::state`] bits: Lua is running...
const RUNNING: u64 = 1;
/// ...and the watchdog set the hook during this stretch. The rest is the stretch's number.
const FIRED: u64 = 2;
const EPOCH: u64 = 4;

/// The VM's main `lua_State`, null once the VM is gone.
struct LuaPtr(*mut ffi::lua_State);

// SAFETY: the raw state pointer is only used under its mutex, by the watchdog to call
// `lua_sethook` (which LuaJIT allows from another thread) and by the owning worker.
unsafe impl Send for LuaPtr {}

/// One VM's budget, shared with the watchdog.
///
/// Arming and disarming are one atomic store and one atomic read-modify-write, with no clock
/// read and no lock: they run around every Lua call and every resume. The worker numbers each
/// stretch of Lua; the watchdog notes when it first sees a stretch running and fires once that
/// stretch has run for the limit by its own clock.
pub struct Budget {
    /// `stretch * EPOCH | RUNNING | FIRED`; the worker writes it, the watchdog only adds FIRED.
    state: AtomicU64,
    /// How long one stretch of Lua may run, in nanoseconds.
    limit: AtomicU64,
    /// Held while the hook is set or removed, so removing never races a late setting.
    lua: Mutex<LuaPtr>,
    /// Watchdog only: the running stretch it saw, and when it first saw it.
    seen: Mutex<Option<(u64, Instant)>>,
}

impl Budget {
    /// Registers a VM with the watchdog. `lua` must stay valid until [`Budget::detach`].
    pub fn register(lua: *mut ffi::lua_State, limit: Duration) -> Arc<Budget> {
        let slot = Arc::new(Budget {
            state: AtomicU64::new(0),
            limit: AtomicU64::new(nanos(limit)),
            lua: Mutex::new(LuaPtr(lua)),
            seen: Mutex::new(None),
        });
        let wd = watchdog();
        let mut slots = wd.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.retain(|s| s.strong_count() > 0);
        slots.push(Arc::downgrade(&slot));
        slot
    }

    /// Changes the budget (a reload changed `lua.call_budget_ms`).
    pub fn set_limit(&self, limit: Duration) {
        self.limit.store(nanos(limit), Ordering::Relaxed);
    }

    fn limit(&self) -> Duration {
        Duration::from_nanos(self.limit.load(Ordering::Relaxed))
    }

    /// Lua is about to run: arm the budget for a new stretch.
    #[inline]
    pub fn start(&self) {
        let s = self.state.load(Ordering::Relaxed);
        if s & RUNNING == 0 {
            // The watchdog changes only a RUNNING state: a plain store does not race.
            self.state
                .store(s.wrapping_add(EPOCH) | RUNNING, Ordering::Release);
        } else {
            // A call nested in a running one: a FIRED the watchdog may set meanwhile must stay,
            // so that `stop` removes the hook.
            self.state.fetch_add(EPOCH, Ordering::AcqRel);
        }
    }

    /// Lua has stopped running (returned, failed or yielded): disarm, and remove the hook if the
    /// watchdog set one. Returns whether the watchdog fired during this stretch.
    #[inline]
    pub fn stop(&self) -> bool {
        let prev = self.state.fetch_and(!(RUNNING | FIRED), Ordering::AcqRel);
        let fired = prev & FIRED != 0;
        if fired {
            // The watchdog set FIRED under this lock and sets the hook before releasing it.
            let lua = self.lua.lock().unwrap_or_else(|e| e.into_inner());
            if !lua.0.is_null() {
                // SAFETY: the state is alive (not detached) and owned by this thread; the
                // watchdog cannot set a new hook for this stretch, which is over.
                unsafe {
                    ffi::lua_sethook(lua.0, None, 0, 0);
                }
            }
        }
        fired
    }

    /// The VM is going away: the watchdog must never touch its state again.
    pub fn detach(&self) {
        self.state.fetch_and(!RUNNING, Ordering::AcqRel);
        self.lua.lock().unwrap_or_else(|e| e.into_inner()).0 = std::ptr::null_mut();
    }

    /// Called by the watchdog: fires the hook if the running stretch has used up its budget.
    fn check(&self, now: Instant) {
        let s = self.state.load(Ordering::Acquire);
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if s & RUNNING == 0 || s & FIRED != 0 {
            *seen = None;
            return;
        }
        let stretch = s / EPOCH;
        let since = match *seen {
            Some((e, since)) if e == stretch => since,
            _ => {
                *seen = Some((stretch, now));
                now
            }
        };
        if now.duration_since(since) < self.limit() {
            return;
        }
        let lua = self.lua.lock().unwrap_or_else(|e| e.into_inner());
        if lua.0.is_null() {
            return;
        }
        // Only if the same stretch is still running: the worker's `stop` clears RUNNING first.
        if self
            .state
            .compare_exchange(s, s | FIRED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            crate::metrics::runtime::LUA_BUDGET_STOPS.fetch_add(1, Ordering::Relaxed);
            // SAFETY: LuaJIT's lua_sethook only stores the hook fields in the global state
            // and updates the dispatch table, which is meant to be done asynchronously (from
            // a signal handler or another thread) while the VM runs. The state is alive:
            // `detach` nulls the pointer under this lock before the VM is closed.
            unsafe {
                ffi::lua_sethook(lua.0, Some(budget_hook), ffi::LUA_MASKCOUNT, 1);
            }
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The hook: raise the budget error at the current instruction. The hook stays set until the
/// worker's `stop`, so a plugin that catches the error with `pcall` fails again at its next
/// instruction instead of running on.
unsafe extern "C-unwind" fn budget_hook(l: *mut ffi::lua_State, _ar: *mut ffi::lua_Debug) {
    ffi::luaL_error(
        l,
        c"%s".as_ptr(),
        c"plugin call exceeded its time budget".as_ptr(),
    );
}

struct Watchdog {
    slots: Mutex<Vec<Weak<Budget>>>,
}

fn watchdog() -> &'static Watchdog {
    static WD: OnceLock<&'static Watchdog> = OnceLock::new();
    WD.get_or_init(|| {
        let wd: &'static Watchdog = Box::leak(Box::new(Watchdog {
            slots: Mutex::new(Vec::new()),
        }));
        let spawned = std::thread::Builder::new()
            .name("moongate-lua-watchdog".into())
            .spawn(move || run(wd));
        if let Err(e) = spawned {
            tracing::error!(
                "cannot start the Lua watchdog thread, runaway plugins will not be stopped: {e}"
            );
        }
        wd
    })
}

fn run(wd: &'static Watchdog) {
    loop {
        let slots: Vec<Arc<Budget>> = {
            let mut list = wd.slots.lock().unwrap_or_else(|e| e.into_inner());
            list.retain(|s| s.strong_count() > 0);
            list.iter().filter_map(Weak::upgrade).collect()
        };
        // Tick: a twentieth of the smallest budget, between 1 and 25 ms.
        let tick = slots
            .iter()
            .map(|s| s.limit() / 20)
            .min()
            .unwrap_or(Duration::from_millis(25))
            .clamp(Duration::from_millis(1), Duration::from_millis(25));
        let now = Instant::now();
        for s in &slots {
            s.check(now);
        }
        drop(slots);
        std::thread::sleep(tick);
    }
}
