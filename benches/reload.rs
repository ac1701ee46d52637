//! Hot-reload bench: how long from a plugin file write to the first response that shows the new
//! code (p50/p99 over 100 edits), and requests per second during a reload storm against none.
//!
//! Run: `cargo bench --bench reload`. Uses the release `moongate` binary, a loopback upstream and
//! a loopback client, all on this machine; prints a small table.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{get, Gateway, Upstream};

fn probe_plugin(version: &str) -> String {
    format!(
        "local core = require(\"apisix.core\")\n\
         local _M = {{version = 0.1, priority = 10, name = \"reload-probe\", schema = {{type = \"object\"}}}}\n\
         function _M.header_filter(conf, ctx)\n  core.response.set_header(\"X-Probe-Version\", \"{version}\")\nend\n\
         return _M\n"
    )
}

fn atomic_write(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Sends requests from `threads` client threads for `dur`; returns (requests, failures).
fn load(
    url: &str,
    threads: usize,
    dur: Duration,
    during: impl FnOnce(&AtomicBool) + Send,
) -> (u64, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (url, stop, ok, failed) =
                (url.to_string(), stop.clone(), ok.clone(), failed.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if get(&url).status == 200 {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let start = Instant::now();
    let storm_stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| during(&storm_stop));
        std::thread::sleep(dur.saturating_sub(start.elapsed()));
        storm_stop.store(true, Ordering::Relaxed);
    });
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        let _ = h.join();
    }
    (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed))
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument that does not match skips the run.
    if std::env::args()
        .skip(1)
        .any(|a| !a.starts_with('-') && !"reload".contains(a.as_str()))
    {
        return;
    }
    let up = Upstream::echo();
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir(dir.path().join("plugins")).expect("plugins dir");
    let file = dir.path().join("plugins/reload-probe.lua");
    std::fs::write(&file, probe_plugin("v0")).expect("write plugin");
    let gw = Gateway::start_in(
        dir.path(),
        &format!(
            "workers: 2\naccess_log: false\nplugin_dirs: [plugins]\nroutes:\n  - id: r1\n    uri: /probe\n    plugins:\n      reload-probe: {{}}\n    upstream:\n      nodes: {{\"{}\": 1}}\n",
            up.node()
        ),
    );
    let url = gw.url("/probe");

    // 1. Write-to-live latency over 100 edits.
    let mut lat = Vec::new();
    for i in 1..=100 {
        let v = format!("v{i}");
        let t0 = Instant::now();
        atomic_write(&file, &probe_plugin(&v));
        loop {
            if get(&url).header("x-probe-version").as_deref() == Some(v.as_str()) {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "edit {i} never served"
            );
        }
        lat.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    println!(
        "reload: write -> first new response over 100 edits: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (debounce 100 ms included)",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat[lat.len() - 1]
    );

    // 2. Throughput with and without a reload storm (one edit every 50 ms).
    let dur = Duration::from_secs(4);
    let (quiet, quiet_failed) = load(&url, 2, dur, |_| {});
    let file2 = file.clone();
    let (storm, storm_failed) = load(&url, 2, dur, move |stop| {
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            atomic_write(&file2, &probe_plugin(&format!("s{i}")));
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let secs = dur.as_secs_f64();
    println!(
        "reload: rps without reloads {:.0} ({} failed); during a reload storm {:.0} ({} failed); ratio {:.2}",
        quiet as f64 / secs,
        quiet_failed,
        storm as f64 / secs,
        storm_failed,
        storm as f64 / quiet.max(1) as f64
    );
}
