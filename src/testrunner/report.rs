//! What a run prints: one line per case, the differences under a failed one, the summary, and
//! the JUnit XML file for CI.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use quick_xml::events::{BytesDecl, BytesEnd, BytesStart, BytesText, Event};

use super::expect::Mismatch;

/// How one case went.
#[derive(Debug, Clone)]
pub struct CaseResult {
    pub name: String,
    pub time: Duration,
    /// Empty when the case passed; else the report's lines under its FAIL line.
    pub failure: Vec<String>,
}

impl CaseResult {
    pub fn passed(&self) -> bool {
        self.failure.is_empty()
    }
}

/// How one test file went.
#[derive(Debug, Clone)]
pub struct FileResult {
    pub path: PathBuf,
    pub cases: Vec<CaseResult>,
}

/// Counts over files.
pub fn totals(files: &[FileResult]) -> (usize, usize) {
    let all = files.iter().flat_map(|f| &f.cases);
    let passed = all.clone().filter(|c| c.passed()).count();
    (passed, all.count() - passed)
}

/// `path` relative to the working directory when it is below it (shorter lines).
pub fn shown(path: &Path) -> String {
    let cwd = std::env::current_dir().unwrap_or_default();
    path.strip_prefix(&cwd)
        .unwrap_or(path)
        .display()
        .to_string()
}

/// Text with the working directory's absolute prefix removed from every path in it.
pub fn relative_paths(text: &str) -> String {
    match std::env::current_dir() {
        Ok(cwd) => {
            let prefix = format!("{}/", cwd.display());
            text.replace(&prefix, "")
        }
        Err(_) => text.to_string(),
    }
}

/// The lines of a step's differences: `what`, then `- expected` and `+ got` (multi-line values
/// keep their lines, each marked).
pub fn diff_lines(mismatches: &[Mismatch]) -> Vec<String> {
    let mut out = Vec::new();
    for m in mismatches {
        out.push(format!("{}:", m.what));
        for l in clip(&m.expected).lines() {
            out.push(format!("  - {l}"));
        }
        if m.expected.is_empty() {
            out.push("  - ".to_string());
        }
        for l in clip(&m.got).lines() {
            out.push(format!("  + {l}"));
        }
        if m.got.is_empty() {
            out.push("  + ".to_string());
        }
    }
    out
}

/// Long values are cut (a body of megabytes helps nobody in a terminal).
fn clip(s: &str) -> String {
    const MAX: usize = 2000;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes in all)", &s[..end], s.len())
}

/// Log lines for a failure: a Lua error's one-line text (`msg | stack traceback: | ...`) is
/// shown on its lines again, paths relative to the working directory.
pub fn log_lines(lines: &[String]) -> Vec<String> {
    const MAX: usize = 60;
    let mut out = Vec::new();
    for l in lines.iter().take(MAX) {
        let l = relative_paths(l.trim_start());
        let mut parts = l.split(" | ");
        if let Some(first) = parts.next() {
            out.push(first.to_string());
        }
        for p in parts {
            out.push(format!("    {p}"));
        }
    }
    if lines.len() > MAX {
        out.push(format!("... {} more lines", lines.len() - MAX));
    }
    out
}

/// Prints one file's case lines to `w`.
pub fn print_file(w: &mut impl Write, file: &FileResult) -> std::io::Result<()> {
    let name = shown(&file.path);
    for c in &file.cases {
        let ms = c.time.as_secs_f64() * 1000.0;
        if c.passed() {
            writeln!(w, "ok   {name}: {} ({ms:.0} ms)", c.name)?;
        } else {
            writeln!(w, "FAIL {name}: {} ({ms:.0} ms)", c.name)?;
            for l in &c.failure {
                writeln!(w, "       {l}")?;
            }
        }
    }
    Ok(())
}

/// The closing line: `N passed, M failed`.
pub fn summary(files: &[FileResult]) -> String {
    let (passed, failed) = totals(files);
    format!("{passed} passed, {failed} failed")
}

/// Writes the results as JUnit XML: one `testsuite` per file, one `testcase` per case, a
/// `failure` with the report's lines for a failed one.
pub fn write_junit(path: &Path, files: &[FileResult]) -> std::io::Result<()> {
    let mut w = quick_xml::Writer::new_with_indent(Vec::new(), b' ', 2);
    w.write_event(Event::Decl(BytesDecl::new("1.0", Some("UTF-8"), None)))?;
    let (passed, failed) = totals(files);
    let total = (passed + failed).to_string();
    let failed_s = failed.to_string();
    let mut root = BytesStart::new("testsuites");
    root.push_attribute(("name", "moongate test"));
    root.push_attribute(("tests", total.as_str()));
    root.push_attribute(("failures", failed_s.as_str()));
    w.write_event(Event::Start(root))?;
    for f in files {
        let name = shown(&f.path);
        let tests = f.cases.len().to_string();
        let failures = f.cases.iter().filter(|c| !c.passed()).count().to_string();
        let time: f64 = f.cases.iter().map(|c| c.time.as_secs_f64()).sum();
        let time = format!("{time:.3}");
        let mut suite = BytesStart::new("testsuite");
        suite.push_attribute(("name", name.as_str()));
        suite.push_attribute(("tests", tests.as_str()));
        suite.push_attribute(("failures", failures.as_str()));
        suite.push_attribute(("time", time.as_str()));
        w.write_event(Event::Start(suite))?;
        for c in &f.cases {
            let time = format!("{:.3}", c.time.as_secs_f64());
            let mut tc = BytesStart::new("testcase");
            tc.push_attribute(("classname", name.as_str()));
            tc.push_attribute(("name", c.name.as_str()));
            tc.push_attribute(("time", time.as_str()));
            if c.passed() {
                w.write_event(Event::Empty(tc))?;
                continue;
            }
            w.write_event(Event::Start(tc))?;
            let mut fail = BytesStart::new("failure");
            let first = c.failure.first().cloned().unwrap_or_default();
            fail.push_attribute(("message", first.as_str()));
            w.write_event(Event::Start(fail))?;
            w.write_event(Event::Text(BytesText::new(&c.failure.join("\n"))))?;
            w.write_event(Event::End(BytesEnd::new("failure")))?;
            w.write_event(Event::End(BytesEnd::new("testcase")))?;
        }
        w.write_event(Event::End(BytesEnd::new("testsuite")))?;
    }
    w.write_event(Event::End(BytesEnd::new("testsuites")))?;
    let mut bytes = w.into_inner();
    bytes.push(b'\n');
    std::fs::write(path, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lua_traceback_is_shown_on_its_lines() {
        let lines = log_lines(&[
            "ERROR x: p.lua:3: boom | stack traceback: | p.lua:3: in function".to_string(),
        ]);
        assert_eq!(
            lines,
            [
                "ERROR x: p.lua:3: boom",
                "    stack traceback:",
                "    p.lua:3: in function"
            ]
        );
    }

    #[test]
    fn diff_marks_expected_and_got() {
        let lines = diff_lines(&[Mismatch {
            what: "body".into(),
            expected: "a\nb".into(),
            got: "".into(),
        }]);
        assert_eq!(lines, ["body:", "  - a", "  - b", "  + "]);
    }
}
