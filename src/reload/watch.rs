//! Watching the config file and the plugin folders.
//!
//! Folders are watched rather than files, and their parents too: editors save by writing a
//! temporary file and renaming it over the old one, and Kubernetes swaps a `..data` symlink,
//! both of which replace the watched inode. Only events on the config file and on plugin files
//! count: other files in those folders (a log the gateway writes, a database, an editor's swap
//! or temp file) neither start nor extend a rebuild. Events are debounced: the first relevant
//! one starts a quiet period, later relevant ones extend it, and one rebuild follows the burst,
//! its log naming the files that changed (for a rename onto the file, the file, not the temp
//! name). Once the watchers are armed, what was built at start-up is compared with the disk, so
//! a save made while the gateway started is not lost.
//!
//! [`watch_dirs`] is the watcher itself (folders, relevance, debounce); [`watch_files`] is hot
//! reload on top of it, and `moongate test --watch` uses it to re-run tests.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};

use super::Reloader;

/// Quiet time after the last event before a rebuild starts.
pub const DEBOUNCE: Duration = Duration::from_millis(100);

/// One debounced burst of changes.
#[derive(Debug, Clone)]
pub struct Burst {
    /// The relevant paths the burst's events named, in the order first seen, without repeats.
    pub paths: Vec<PathBuf>,
    /// When the burst's first relevant event arrived (a save-to-result time starts here).
    pub first_event: Instant,
}

/// Starts watching; rebuilds through `reloader` on changes, for the life of the process.
pub fn watch_files(reloader: Arc<Reloader>) -> notify::Result<()> {
    let snap = reloader.gateway().load_full();
    let config = absolute(reloader.config_path());
    let plugin_dirs: Vec<PathBuf> = snap
        .doc
        .node
        .plugin_dirs
        .iter()
        .map(|d| absolute(d))
        .collect();

    let mut dirs = BTreeSet::new();
    if let Some(parent) = config.parent() {
        dirs.insert(parent.to_path_buf());
    }
    for d in &plugin_dirs {
        dirs.insert(d.clone());
        if let Some(parent) = d.parent() {
            dirs.insert(parent.to_path_buf());
        }
    }
    let relevant = Relevance {
        config,
        plugin_dirs,
    };
    let on_change = reloader.clone();
    watch_dirs(
        "moongate-reload",
        dirs,
        move |p| relevant.matters(p),
        move |burst| {
            let names: Vec<String> = burst
                .paths
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            let trigger = format!("file change: {}", names.join(", "));
            // A failed build is logged and kept by the reloader; the next event retries.
            let _ = on_change.rebuild(&trigger, false);
        },
    )?;
    // The watchers are armed: a save made since the start-up build read the files (which no
    // event reports) shows as a difference between what serves and the disk.
    if reloader.disk_differs() {
        let _ = reloader.rebuild("files changed during start-up", false);
    }
    Ok(())
}

/// Watches each folder of `dirs` (non-recursively; one created later is picked up on the next
/// event) on a thread of its own named `thread`, and calls `on_change` once per debounced burst
/// of changes to paths for which `matters` is true, for the life of the process.
pub fn watch_dirs(
    thread: &str,
    dirs: BTreeSet<PathBuf>,
    matters: impl Fn(&Path) -> bool + Send + 'static,
    on_change: impl FnMut(Burst) + Send + 'static,
) -> notify::Result<()> {
    let (tx, rx) = mpsc::channel::<Event>();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<Event>| {
        if let Ok(ev) = res {
            let _ = tx.send(ev);
        }
    })?;
    let mut watched = BTreeSet::new();
    watch_existing(&mut watcher, &dirs, &mut watched);
    let mut watch = DirWatch {
        watcher,
        dirs,
        watched,
    };
    std::thread::Builder::new()
        .name(thread.into())
        .spawn(move || debounce_loop(rx, matters, on_change, &mut watch))
        .map_err(|e| notify::Error::generic(&e.to_string()))?;
    Ok(())
}

/// Watches each folder that exists and is not watched yet. A plugin folder created after
/// start-up is picked up on the next event in its parent.
fn watch_existing(
    watcher: &mut RecommendedWatcher,
    dirs: &BTreeSet<PathBuf>,
    watched: &mut BTreeSet<PathBuf>,
) {
    for d in dirs {
        if watched.contains(d) || !d.is_dir() {
            continue;
        }
        match watcher.watch(d, RecursiveMode::NonRecursive) {
            Ok(()) => {
                tracing::debug!(dir = %d.display(), "watching for changes");
                watched.insert(d.clone());
            }
            Err(e) => tracing::warn!(dir = %d.display(), "cannot watch for changes: {e}"),
        }
    }
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Which paths matter: the config file, Kubernetes' `..data` swap next to it, a plugin folder
/// itself being replaced, and in a plugin folder the `.lua` files and the folders (`NAME/` with
/// an `init.lua`). Anything else there (`sedXXXXXX`, `.x.lua.tmp`, `x.lua.swp`, `access.log`)
/// is not an input of a build.
struct Relevance {
    config: PathBuf,
    plugin_dirs: Vec<PathBuf>,
}

impl Relevance {
    fn matters(&self, path: &Path) -> bool {
        if path == self.config {
            return true;
        }
        if path.parent() == self.config.parent() && path.file_name().is_some_and(|n| n == "..data")
        {
            return true;
        }
        self.plugin_dirs.iter().any(|d| {
            path == d
                || (path.parent() == Some(d.as_path())
                    && (path.extension().is_some_and(|x| x == "lua") || path.is_dir()))
        })
    }
}

/// The watcher and the folders it should watch (kept with the loop: dropping the watcher ends
/// the events).
struct DirWatch {
    watcher: RecommendedWatcher,
    dirs: BTreeSet<PathBuf>,
    watched: BTreeSet<PathBuf>,
}

fn debounce_loop(
    rx: mpsc::Receiver<Event>,
    matters: impl Fn(&Path) -> bool,
    mut on_change: impl FnMut(Burst),
    watch: &mut DirWatch,
) {
    // Adds the paths of `ev` that matter; whether there was one.
    let relevant_paths = |ev: &Event, paths: &mut Vec<PathBuf>| {
        if !is_change(ev) {
            return false;
        }
        let mut any = false;
        for p in ev.paths.iter().filter(|p| matters(p)) {
            any = true;
            if !paths.contains(p) {
                paths.push(p.clone());
            }
        }
        any
    };
    loop {
        // Wait for the first relevant event.
        let Ok(ev) = rx.recv() else { return };
        watch_existing(&mut watch.watcher, &watch.dirs, &mut watch.watched);
        let mut paths = Vec::new();
        relevant_paths(&ev, &mut paths);
        if paths.is_empty() {
            continue;
        }
        let first_event = Instant::now();
        // Drain the burst: done once no relevant event came for DEBOUNCE. Other events are
        // read and dropped without moving the deadline.
        let mut deadline = Instant::now() + DEBOUNCE;
        while let Some(wait) = deadline.checked_duration_since(Instant::now()) {
            match rx.recv_timeout(wait) {
                Ok(ev) => {
                    if relevant_paths(&ev, &mut paths) {
                        deadline = Instant::now() + DEBOUNCE;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => break,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
        on_change(Burst { paths, first_event });
    }
}

fn is_change(ev: &Event) -> bool {
    matches!(
        ev.kind,
        EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_) | EventKind::Any
    )
}
