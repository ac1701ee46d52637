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
//! call) the worker writes a deadline into the slot; after, it clears it. One watchdog thread per
//! process wakes periodically, and for a slot whose deadline has passed sets a count-1 hook on
//! that VM. The hook raises the Lua error `plugin call exceeded its time budget` at the next
//! instruction, which fails the call (its request gets 500) and leaves the VM usable. The worker
//! removes the hook when the call returns.
//!
//! Guarantee: a call that keeps running Lua code is stopped within `call_budget_ms` plus one
//! watchdog tick (at most 25 ms, and at most a twentieth of the budget). Time spent waiting
//! (`ngx.sleep`, reading a body) does not count: the deadline is set per resume. Time spent
//! inside one long native call (a huge `string.rep`) is not interrupted until it returns to Lua.

use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use mlua::ffi;

/// The message of the error a stopped call fails with.
pub const BUDGET_EXCEEDED: &str = "plugin call exceeded its time budget";

struct SlotState {
    /// The VM's main `lua_State`, null once the VM is gone.
    lua: *mut ffi::lua_State,
    deadline: Option<Instant>,
    /// How long one stretch of Lua may run.
    limit: Duration,
    /// The watchdog set the hook during the current call.
    fired: bool,
}

// SAFETY: the raw state pointer is only used under the slot's mutex, by the watchdog to call
// `lua_sethook` (which LuaJIT allows from another thread) and by the owning worker.
unsafe impl Send for SlotState {}

/// One VM's deadline, shared with the watchdog.
pub struct Budget {
    state: Mutex<SlotState>,
}

impl Budget {
    /// Registers a VM with the watchdog. `lua` must stay valid until [`Budget::detach`].
    pub fn register(lua: *mut ffi::lua_State, limit: Duration) -> Arc<Budget> {
        let slot = Arc::new(Budget {
            state: Mutex::new(SlotState {
                lua,
                deadline: None,
                limit,
                fired: false,
            }),
        });
        let wd = watchdog();
        let mut slots = wd.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.retain(|s| s.strong_count() > 0);
        slots.push(Arc::downgrade(&slot));
        slot
    }

    /// Changes the budget (a reload changed `lua.call_budget_ms`).
    pub fn set_limit(&self, limit: Duration) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.limit = limit;
    }

    fn limit(&self) -> Duration {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).limit
    }

    /// Lua is about to run: arm the deadline.
    #[inline]
    pub fn start(&self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.deadline = Some(Instant::now() + s.limit);
    }

    /// Lua has stopped running (returned, failed or yielded): disarm, and remove the hook if the
    /// watchdog set one. Returns whether the watchdog fired during this stretch.
    #[inline]
    pub fn stop(&self) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.deadline = None;
        let fired = std::mem::take(&mut s.fired);
        if fired && !s.lua.is_null() {
            // SAFETY: the state is alive (not detached) and owned by this thread; the watchdog
            // cannot set a new hook now because the deadline is cleared under the same lock.
            unsafe {
                ffi::lua_sethook(s.lua, None, 0, 0);
            }
        }
        fired
    }

    /// The VM is going away: the watchdog must never touch its state again.
    pub fn detach(&self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.deadline = None;
        s.lua = std::ptr::null_mut();
    }

    /// Called by the watchdog: fires the hook if the deadline passed. Returns the deadline still
    /// pending, if any.
    fn check(&self, now: Instant) -> Option<Instant> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match s.deadline {
            Some(d) if d <= now && !s.fired && !s.lua.is_null() => {
                s.fired = true;
                // SAFETY: LuaJIT's lua_sethook only stores the hook fields in the global state
                // and updates the dispatch table, which is meant to be done asynchronously (from
                // a signal handler or another thread) while the VM runs. The state is alive:
                // `detach` nulls the pointer under this lock before the VM is closed.
                unsafe {
                    ffi::lua_sethook(s.lua, Some(budget_hook), ffi::LUA_MASKCOUNT, 1);
                }
                None
            }
            Some(d) if !s.fired => Some(d),
            _ => None,
        }
    }
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
