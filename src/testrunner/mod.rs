//! `moongate test`: runs plugin test files (`*.test.yaml`) against the real gateway code in
//! this process.
//!
//! Per test file the runner builds the plugin registry as `moongate run` does (every plugin of
//! the file's folders loads, or the file fails), starts one gateway worker on a loopback port
//! (`proxy::bind_all` and `proxy::start_workers`, as `moongate run` serves), and for each case
//! builds the snapshot of the case's route and resources with the crate's own build and
//! publishes it. Each request goes over a real connection through the HTTP/1.1 server, router,
//! phases, Lua runtime, native plugins and consumer merge to the runner's own upstream on
//! loopback. The gateway's log is captured ([`capture`]) so cases can expect log lines and a
//! failure shows what the plugin logged (a Lua error with its `file:line` and traceback).
//!
//! The worker (and so its Lua VM) lives for one file's run: module state carries from case to
//! case within a file, as it does between requests in a gateway, and a re-run starts afresh.
//! `ngx.shared` dictionaries are process-wide and keep their contents across files.

pub mod capture;
pub mod expect;
mod harness;
pub mod report;
pub mod spec;
mod watch;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::ConfigErrors;
use crate::snapshot::Registry;
use capture::Capture;
use harness::{InProcess, Upstream};
use report::{CaseResult, FileResult};
use spec::{Case, TestFile};

/// What `moongate test` was asked to do.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Test files, or folders holding them (`*.test.yaml` in the folder and in its `tests/`).
    pub paths: Vec<PathBuf>,
    /// Also write the results as JUnit XML here.
    pub junit: Option<PathBuf>,
    /// Keep running: re-run the affected files whenever a plugin or test file is saved.
    pub watch: bool,
}

/// The suffix of a test file's name.
pub const SUFFIX: &str = ".test.yaml";

/// How long after a response the runner waits for the request's log phase to finish.
const LOG_WAIT: Duration = Duration::from_secs(5);

/// Runs `moongate test`; the exit status is 0 when every case passed.
pub fn main(opts: Options) -> ExitCode {
    let capture = capture::install();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("moongate test: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let upstream = match rt.block_on(Upstream::start()) {
        Ok(u) => u,
        Err(e) => {
            eprintln!("moongate test: cannot start the test upstream on 127.0.0.1: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runner = Runner {
        rt,
        upstream,
        capture,
    };
    let files = match discover(&opts.paths) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("moongate test: {e}");
            return ExitCode::FAILURE;
        }
    };
    let results = runner.run_files(&files);
    let mut out = std::io::stdout().lock();
    for r in &results {
        let _ = report::print_file(&mut out, r);
    }
    let _ = std::io::Write::flush(&mut out);
    drop(out);
    println!("{}", report::summary(&results));
    if let Some(path) = &opts.junit {
        if let Err(e) = report::write_junit(path, &results) {
            eprintln!("moongate test: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    if opts.watch {
        return watch::run(&runner, &opts, results);
    }
    if report::totals(&results).1 == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The test files `paths` name: files as given, and `*.test.yaml` in each folder and in its
/// `tests/` folder. No path: the working directory's `tests/` and `plugins/tests/`.
pub fn discover(paths: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    let defaulted = paths.is_empty();
    let roots: Vec<PathBuf> = if defaulted {
        vec![PathBuf::from("tests"), PathBuf::from("plugins/tests")]
    } else {
        paths.to_vec()
    };
    let mut found = BTreeSet::new();
    for root in &roots {
        if root.is_file() {
            found.insert(spec::clean(root));
            continue;
        }
        if !root.is_dir() {
            if defaulted {
                continue;
            }
            return Err(format!("{}: no such file or folder", root.display()));
        }
        for dir in [root.clone(), root.join("tests")] {
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in rd.flatten() {
                let p = e.path();
                if p.is_file() && p.to_string_lossy().ends_with(SUFFIX) {
                    found.insert(spec::clean(&p));
                }
            }
        }
    }
    if found.is_empty() {
        let looked: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
        return Err(format!(
            "no test files (*{SUFFIX}) found in {}",
            looked.join(", ")
        ));
    }
    Ok(found.into_iter().collect())
}

/// Everything a run shares: the runtime the upstream and the client run on, the upstream and
/// the log.
pub struct Runner {
    rt: tokio::runtime::Runtime,
    upstream: Upstream,
    capture: &'static Capture,
}

/// A parsed test file with what its run needs.
struct Loaded {
    file: TestFile,
    node: crate::config::NodeConfig,
}

impl Runner {
    /// Runs the files one after another.
    pub fn run_files(&self, files: &[PathBuf]) -> Vec<FileResult> {
        files.iter().map(|f| self.run_file(f)).collect()
    }

    /// Runs one test file; a file that cannot be read or parsed is one failed case.
    pub fn run_file(&self, path: &Path) -> FileResult {
        let started = Instant::now();
        let loaded = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read it: {e}"))
            .and_then(|text| spec::parse(&text).map_err(|e| e.to_string()))
            .and_then(|file| {
                let dirs = spec::plugin_dirs(path, &file);
                harness::node_config(&file, dirs)
                    .map(|node| Loaded { file, node })
                    .map_err(|e| e.to_string())
            });
        let loaded = match loaded {
            Ok(l) => l,
            Err(e) => {
                return FileResult {
                    path: path.to_path_buf(),
                    cases: vec![CaseResult {
                        name: "(test file)".into(),
                        time: started.elapsed(),
                        failure: vec![report::relative_paths(&e)],
                    }],
                }
            }
        };
        let registry = harness::registry(&loaded.node);
        let needs_gateway = loaded.file.cases.iter().any(|c| c.check_error().is_none());
        let gateway = match (&registry, needs_gateway) {
            (Ok(_), true) => Some(InProcess::start(&loaded.node)),
            _ => None,
        };
        let mut cases = Vec::new();
        for case in &loaded.file.cases {
            let started = Instant::now();
            let failure = self.run_case(&loaded, &registry, gateway.as_ref(), case);
            cases.push(CaseResult {
                name: case.name.clone(),
                time: started.elapsed(),
                failure,
            });
        }
        if let Some(Ok(gw)) = gateway {
            gw.stop();
        }
        FileResult {
            path: path.to_path_buf(),
            cases,
        }
    }

    /// Runs one case: a conf check, or its route published and its requests sent. Returns
    /// the report lines of what went wrong (none: it passed).
    fn run_case(
        &self,
        loaded: &Loaded,
        registry: &Result<Arc<Registry>, ConfigErrors>,
        gateway: Option<&Result<InProcess, String>>,
        case: &Case,
    ) -> Vec<String> {
        let registry = match (registry, case.check_error()) {
            (Ok(r), _) => r,
            (Err(errors), Some(want)) => return check_error_result(want, Err(errors.clone())),
            (Err(errors), None) => return errors_failure("the plugins did not load", errors),
        };
        let build = |generation| {
            harness::case_document(&loaded.file, case, &loaded.node, self.upstream.addr)
                .and_then(|doc| harness::build_case(doc, registry, generation))
        };
        if let Some(want) = case.check_error() {
            return check_error_result(want, build(0).map(|_| ()));
        }
        let gw = match gateway {
            Some(Ok(gw)) => gw,
            Some(Err(e)) => return vec![format!("the gateway did not start: {e}")],
            None => return vec!["the gateway did not start".to_string()],
        };
        match build(gw.next_generation()) {
            Err(errors) => errors_failure("the case's conf was refused", &errors),
            Ok(snap) => {
                gw.publish(snap);
                self.run_steps(gw, case)
            }
        }
    }

    /// Sends a case's requests one by one; returns the report lines of what differed.
    fn run_steps(&self, gw: &InProcess, case: &Case) -> Vec<String> {
        let steps = case.steps();
        let several = steps.len() > 1;
        let default_path = harness::default_path(case);
        let mut failure = Vec::new();
        for (i, step) in steps.iter().enumerate() {
            let path = step
                .request
                .path
                .clone()
                .unwrap_or_else(|| default_path.clone());
            let method = step.request.method.clone().unwrap_or_else(|| "GET".into());
            self.upstream
                .prepare(step.upstream.clone().unwrap_or(spec::UpstreamAnswer::Echo));
            let mark = self.capture.mark();
            let got = self
                .rt
                .block_on(harness::send(gw.addr, &step.request, &path));
            // The log phase runs after the response is sent: wait for it (its access-log line)
            // before reading the log and what the upstream saw.
            let served = got.is_ok() && self.capture.wait_served(mark, 1, LOG_WAIT);
            let logged = self.capture.since(mark);
            let mut mismatches = match &got {
                Ok(got) => expect::check_response(&step.expect, got),
                Err(e) => vec![expect::Mismatch {
                    what: "response".into(),
                    expected: "an answer".into(),
                    got: e.clone(),
                }],
            };
            if let Some(want) = &step.expect.received {
                mismatches.extend(expect::check_received(want, &self.upstream.seen()));
            }
            let want_log = step.expect.log.to_vec();
            if !want_log.is_empty() {
                mismatches.extend(expect::check_log(&want_log, &logged));
            }
            if mismatches.is_empty() {
                continue;
            }
            let label = if several {
                format!("request {} of {} ({method} {path}):", i + 1, steps.len())
            } else {
                format!("request {method} {path}:")
            };
            failure.push(label);
            failure.extend(
                report::diff_lines(&mismatches)
                    .into_iter()
                    .map(|l| format!("  {l}")),
            );
            if let Ok(got) = &got {
                if step.expect.body.is_none() && step.expect.json.is_none() {
                    let body = String::from_utf8_lossy(&got.body);
                    if !body.is_empty() {
                        failure.push(format!("  response body: {}", one_line(&body, 300)));
                    }
                }
            }
            if !served && got.is_ok() {
                failure.push("  (the request's log phase did not finish in time)".into());
            }
            if !logged.is_empty() {
                failure.push("  gateway log:".into());
                failure.extend(
                    report::log_lines(&logged)
                        .into_iter()
                        .map(|l| format!("    {l}")),
                );
            }
            // Later requests of a stateful case depend on this one: stop here.
            if several && i + 1 < steps.len() {
                failure.push(format!(
                    "  (requests {} to {} not sent)",
                    i + 2,
                    steps.len()
                ));
            }
            break;
        }
        failure
    }
}

/// A body on one line, cut at `max` bytes.
fn one_line(s: &str, max: usize) -> String {
    let s = s.replace('\n', "\\n");
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// The report lines for build errors.
fn errors_failure(what: &str, errors: &ConfigErrors) -> Vec<String> {
    let mut out = vec![format!("{what}:")];
    out.extend(
        errors
            .0
            .iter()
            .map(|e| format!("  {}", report::relative_paths(&e.to_string()))),
    );
    out
}

/// A conf check: the build must have failed with an error containing `want`.
fn check_error_result(want: &str, built: Result<(), ConfigErrors>) -> Vec<String> {
    match built {
        Ok(()) => vec![
            "check_error:".into(),
            format!("  - an error containing {want:?}"),
            "  + the conf was accepted".into(),
        ],
        Err(errors) => {
            if errors.0.iter().any(|e| e.to_string().contains(want)) {
                return Vec::new();
            }
            let mut out = vec![
                "check_error:".into(),
                format!("  - an error containing {want:?}"),
            ];
            out.extend(
                errors
                    .0
                    .iter()
                    .map(|e| format!("  + {}", report::relative_paths(&e.to_string()))),
            );
            out
        }
    }
}
