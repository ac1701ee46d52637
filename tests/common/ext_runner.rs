//! An APISIX ext-plugin runner for the tests (`ext_runner.py`: Python with Google's
//! `flatbuffers` package), listening on a unix socket in a temp dir.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

const SCRIPT: &str = include_str!("ext_runner.py");

/// A running runner; dropping it kills the process.
pub struct ExtRunner {
    child: Child,
    sock: PathBuf,
    _dir: tempfile::TempDir,
}

impl ExtRunner {
    /// Starts the runner and waits for it to listen. Panics with what to install when
    /// Python's `flatbuffers` package is missing.
    pub fn start() -> ExtRunner {
        let dir = tempfile::tempdir().expect("runner dir");
        let script = dir.path().join("ext_runner.py");
        std::fs::write(&script, SCRIPT).expect("write runner");
        let sock = dir.path().join("runner.sock");
        let mut child = Command::new("python3")
            .arg(&script)
            .arg(&sock)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start python3");
        let mut line = String::new();
        let _ = BufReader::new(child.stdout.take().expect("runner stdout")).read_line(&mut line);
        if line.trim() != "ready" {
            let _ = child.kill();
            let out = child.wait_with_output().expect("runner output");
            panic!(
                "the ext-plugin runner did not start (pip install flatbuffers?): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        ExtRunner {
            child,
            sock,
            _dir: dir,
        }
    }

    /// The unix socket's path.
    pub fn socket(&self) -> &Path {
        &self.sock
    }
}

impl Drop for ExtRunner {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
