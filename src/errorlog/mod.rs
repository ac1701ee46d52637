//! The error log: where moongate's own log lines (tracing events) go, at what level, in what
//! form. APISIX's `nginx_config.error_log` (a file path, or `stderr`) and
//! `nginx_config.error_log_level` (nginx's level names), plus moongate's
//! `nginx_config.error_log_format`: `text` (the default) or `json` (one JSON object a line,
//! for log shippers).
//!
//! A file is opened for appending (its folder created) and written synchronously, one write
//! per line, as nginx writes its error log: the supervisor and the serving process append to
//! the same file without interleaving inside a line, and a line is on disk when the event
//! returns. SIGUSR1 reopens it (after logrotate renamed it), in both processes.
//!
//! The level: `RUST_LOG` if set, else `log_level` (moongate's filter syntax), else
//! `error_log_level`, else `info`.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};

use serde::{Deserialize, Serialize};
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use crate::config::{ConfigError, NodeConfig};

/// `nginx_config.error_log_format`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ErrorLogFormat {
    #[default]
    Text,
    Json,
}

/// Where the lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    Stderr,
    File(PathBuf),
}

/// The error log's settings, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub destination: Destination,
    pub format: ErrorLogFormat,
    /// The filter when `RUST_LOG` is not set.
    pub filter: String,
}

/// nginx's error log levels, as APISIX's `error_log_level` takes them, and the tracing level
/// each comes to (tracing has no notice/crit/alert/emerg).
const LEVELS: &[(&str, &str)] = &[
    ("debug", "debug"),
    ("info", "info"),
    ("notice", "info"),
    ("warn", "warn"),
    ("error", "error"),
    ("crit", "error"),
    ("alert", "error"),
    ("emerg", "error"),
];

impl Settings {
    /// Reads the node's settings; a bad one is an error with its path.
    pub fn from_node(node: &NodeConfig) -> Result<Settings, ConfigError> {
        let n = &node.nginx_config;
        let level = match n.error_log_level.as_deref() {
            None => None,
            Some(l) => match LEVELS.iter().find(|(name, _)| *name == l) {
                Some((_, to)) => Some(*to),
                None => {
                    return Err(ConfigError::new(
                        "nginx_config.error_log_level",
                        format!(
                            "unknown level {l:?}: one of {}",
                            LEVELS
                                .iter()
                                .map(|(n, _)| *n)
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ))
                }
            },
        };
        let destination = match n.error_log.as_deref() {
            None | Some("stderr") | Some("/dev/stderr") => Destination::Stderr,
            Some("") => {
                return Err(ConfigError::new(
                    "nginx_config.error_log",
                    "must be a file path or stderr",
                ))
            }
            Some(p) => Destination::File(PathBuf::from(p)),
        };
        let filter = node
            .log_level
            .clone()
            .or(level.map(str::to_string))
            .unwrap_or_else(|| "info".to_string());
        Ok(Settings {
            destination,
            format: n.error_log_format,
            filter,
        })
    }
}

/// Makes a relative `error_log` path relative to the config file's folder `base`.
pub fn resolve_path(error_log: &mut Option<String>, base: &Path) {
    if let Some(p) = error_log.as_mut() {
        if !matches!(p.as_str(), "stderr" | "/dev/stderr" | "")
            && Path::new(p.as_str()).is_relative()
        {
            *p = base.join(p.as_str()).to_string_lossy().into_owned();
        }
    }
}

/// The open error log file, swapped on reopen.
struct LogFile {
    path: PathBuf,
    file: RwLock<File>,
}

static FILE: OnceLock<Arc<LogFile>> = OnceLock::new();

fn open(path: &Path) -> io::Result<File> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(|e| {
                io::Error::new(e.kind(), format!("cannot create {}: {e}", dir.display()))
            })?;
        }
    }
    OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot open {}: {e}", path.display())))
}

/// Writes each formatted event to the current file (tracing's formatter hands over a whole
/// line in one `write_all`).
#[derive(Clone)]
struct FileWriter(Arc<LogFile>);

impl<'a> MakeWriter<'a> for FileWriter {
    type Writer = FileLine<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        FileLine(&self.0)
    }
}

struct FileLine<'a>(&'a LogFile);

impl Write for FileLine<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let f = self.0.file.read().unwrap_or_else(|e| e.into_inner());
        (&*f).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Installs the error log for this process. A file that cannot be opened leaves the log on
/// stderr and answers the error (for the caller to log and refuse the start).
pub fn init(settings: &Settings) -> Result<(), String> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => EnvFilter::new(v),
        _ => EnvFilter::new(&settings.filter),
    };
    let mut failed = None;
    let (writer, ansi) = match &settings.destination {
        Destination::Stderr => (
            BoxMakeWriter::new(std::io::stderr),
            std::io::IsTerminal::is_terminal(&std::io::stderr()),
        ),
        Destination::File(path) => match open(path) {
            Ok(file) => {
                let log = FILE
                    .get_or_init(|| {
                        Arc::new(LogFile {
                            path: path.clone(),
                            file: RwLock::new(file),
                        })
                    })
                    .clone();
                (BoxMakeWriter::new(FileWriter(log)), false)
            }
            Err(e) => {
                failed = Some(format!("nginx_config.error_log: {e}"));
                (BoxMakeWriter::new(std::io::stderr), false)
            }
        },
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi);
    let _ = match settings.format {
        ErrorLogFormat::Text => builder.try_init(),
        ErrorLogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
    };
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Reopens the error log file (SIGUSR1); a failure keeps the old file and is logged.
pub fn reopen() {
    let Some(log) = FILE.get() else { return };
    match open(&log.path) {
        Ok(f) => {
            *log.file.write().unwrap_or_else(|e| e.into_inner()) = f;
            tracing::info!("error log reopened: {}", log.path.display());
        }
        Err(e) => tracing::error!("error log: reopen failed, still writing the old file: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(yaml: &str) -> NodeConfig {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    #[test]
    fn levels_paths_and_formats() {
        let s = Settings::from_node(&node("{}")).unwrap();
        assert_eq!(s.destination, Destination::Stderr);
        assert_eq!(s.filter, "info");
        assert_eq!(s.format, ErrorLogFormat::Text);
        let s = Settings::from_node(&node(
            "nginx_config: {error_log: /var/log/m/error.log, error_log_level: notice, error_log_format: json}",
        ))
        .unwrap();
        assert_eq!(
            s.destination,
            Destination::File("/var/log/m/error.log".into())
        );
        assert_eq!(s.filter, "info");
        assert_eq!(s.format, ErrorLogFormat::Json);
        // log_level, moongate's finer filter, wins over error_log_level.
        let s = Settings::from_node(&node(
            "log_level: moongate=debug,warn\nnginx_config: {error_log_level: crit}",
        ))
        .unwrap();
        assert_eq!(s.filter, "moongate=debug,warn");
        let e = Settings::from_node(&node("nginx_config: {error_log_level: loud}")).unwrap_err();
        assert_eq!(e.path, "nginx_config.error_log_level");
        let e = Settings::from_node(&node("nginx_config: {error_log: ''}")).unwrap_err();
        assert_eq!(e.path, "nginx_config.error_log");
        let mut p = Some("logs/error.log".to_string());
        resolve_path(&mut p, Path::new("/etc/moongate"));
        assert_eq!(p.as_deref(), Some("/etc/moongate/logs/error.log"));
    }
}
