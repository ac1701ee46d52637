//! `moongate test --watch`: the hot-reload watcher (`reload::watch_dirs`: folders and their
//! atomic saves, one debounced burst per save) on the test files' folders and their plugin
//! folders; each burst re-runs the test files it affects.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc;

use super::report::{self, FileResult};
use super::{discover, spec, Options, Runner, SUFFIX};

/// Whether a path can change a test result: a test file or a Lua file.
fn matters(p: &Path) -> bool {
    p.to_string_lossy().ends_with(SUFFIX) || p.extension().is_some_and(|x| x == "lua")
}

/// A test file's plugin folders, when it parses.
fn plugin_dirs_of(file: &Path) -> Vec<PathBuf> {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|t| spec::parse(&t).ok())
        .map(|f| spec::plugin_dirs(file, &f))
        .unwrap_or_default()
}

/// The folders to watch: where the test files are (and the folders named on the command line,
/// for new test files), each plugin folder, and its `NAME/` plugin folders.
fn folders(opts: &Options, files: &[PathBuf]) -> BTreeSet<PathBuf> {
    let mut dirs = BTreeSet::new();
    for p in &opts.paths {
        if p.is_dir() {
            dirs.insert(spec::clean(p));
            dirs.insert(spec::clean(&p.join("tests")));
        }
    }
    for f in files {
        if let Some(d) = f.parent() {
            dirs.insert(d.to_path_buf());
        }
        for d in plugin_dirs_of(f) {
            if let Ok(rd) = std::fs::read_dir(&d) {
                for e in rd.flatten() {
                    if e.path().is_dir() {
                        dirs.insert(e.path());
                    }
                }
            }
            dirs.insert(d);
        }
    }
    dirs
}

/// The test files a burst of changed paths affects: a changed test file, and every test file
/// whose plugin folders hold a changed Lua file.
pub fn affected(files: &[PathBuf], changed: &[PathBuf]) -> Vec<PathBuf> {
    files
        .iter()
        .filter(|f| {
            changed.contains(f) || {
                let dirs = plugin_dirs_of(f);
                changed.iter().any(|c| {
                    c.extension().is_some_and(|x| x == "lua")
                        && dirs.iter().any(|d| c.starts_with(d))
                })
            }
        })
        .cloned()
        .collect()
}

/// Watches and re-runs until the process is stopped.
pub fn run(runner: &Runner, opts: &Options, first: Vec<FileResult>) -> ExitCode {
    let files: Vec<PathBuf> = first.iter().map(|r| r.path.clone()).collect();
    let (tx, rx) = mpsc::channel();
    if let Err(e) = crate::reload::watch_dirs(
        "moongate-test-watch",
        folders(opts, &files),
        matters,
        move |b| {
            let _ = tx.send(b);
        },
    ) {
        eprintln!("moongate test: cannot watch for changes: {e}");
        return ExitCode::FAILURE;
    }
    println!("watching for changes (Ctrl-C to stop)");
    while let Ok(burst) = rx.recv() {
        let changed: Vec<PathBuf> = burst.paths.iter().map(|p| spec::clean(p)).collect();
        // A new test file in a watched folder joins the run.
        let files = discover(&opts.paths).unwrap_or_default();
        let to_run = affected(&files, &changed);
        if to_run.is_empty() {
            continue;
        }
        let names: Vec<String> = changed.iter().map(|p| report::shown(p)).collect();
        println!("\nchanged: {}", names.join(", "));
        let results = runner.run_files(&to_run);
        let mut out = std::io::stdout().lock();
        for r in &results {
            let _ = report::print_file(&mut out, r);
        }
        let _ = writeln!(
            out,
            "{} ({} ms after the save)",
            report::summary(&results),
            burst.first_event.elapsed().as_millis()
        );
        let _ = out.flush();
        if let Some(path) = &opts.junit {
            if let Err(e) = report::write_junit(path, &results) {
                eprintln!("moongate test: cannot write {}: {e}", path.display());
            }
        }
    }
    ExitCode::FAILURE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plugin_change_reruns_the_files_that_use_its_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let root = spec::clean(tmp.path());
        let plugins = root.join("plugins");
        std::fs::create_dir_all(plugins.join("tests")).unwrap();
        std::fs::create_dir_all(root.join("other")).unwrap();
        let a = plugins.join("tests/a.test.yaml");
        let b = root.join("other/b.test.yaml");
        std::fs::write(&a, "cases: []\n").unwrap();
        std::fs::write(&b, "cases: []\n").unwrap();
        let files = vec![a.clone(), b.clone()];
        assert_eq!(affected(&files, &[plugins.join("x.lua")]), vec![a.clone()]);
        assert_eq!(
            affected(&files, &[plugins.join("x/init.lua")]),
            vec![a.clone()]
        );
        assert_eq!(affected(&files, std::slice::from_ref(&b)), vec![b.clone()]);
        // A test file is not a plugin: saving one re-runs only itself.
        assert_eq!(affected(&files, std::slice::from_ref(&a)), vec![a]);
        assert!(affected(&files, &[root.join("notes.lua")]).is_empty());
    }
}
