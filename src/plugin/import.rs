//! `moongate plugins import APISIX_DIR [NAME...] --to DIR`: stages APISIX's plugin files from
//! an APISIX release or checkout into a plugin folder, with what each one requires from
//! `apisix/plugins/` and `apisix/utils/`, so a user does not copy files by hand. Modules
//! moongate provides itself (`apisix.core`, the OpenResty libraries it has natively) are not
//! copied; what neither moongate nor the checkout provides is reported per plugin.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// What one import did.
#[derive(Debug, Default)]
pub struct Report {
    /// Plugin name → files written (relative to the destination).
    pub imported: BTreeMap<String, Vec<PathBuf>>,
    /// Plugin name → modules it requires that neither moongate nor the checkout provides.
    pub missing: BTreeMap<String, BTreeSet<String>>,
    /// Plugin names skipped, with why.
    pub skipped: Vec<(String, String)>,
}

/// Why an import could not start.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{0}: not an APISIX checkout or release (no apisix/plugins folder)")]
    NotApisix(PathBuf),
    #[error("{0}: no such plugin in {1}")]
    NoSuchPlugin(String, PathBuf),
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ImportError + '_ {
    move |err| ImportError::Io {
        path: path.to_path_buf(),
        err,
    }
}

/// Every plugin of a checkout: `NAME.lua`, or `NAME/init.lua` with no `NAME.lua`.
pub fn plugin_names(apisix: &Path) -> Result<Vec<String>, ImportError> {
    let dir = apisix.join("apisix/plugins");
    let entries = std::fs::read_dir(&dir).map_err(|_| ImportError::NotApisix(apisix.into()))?;
    let mut names = BTreeSet::new();
    for e in entries.flatten() {
        let p = e.path();
        let Some(stem) = p.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        let is_file = p.extension().is_some_and(|x| x == "lua");
        if is_file || (p.is_dir() && p.join("init.lua").is_file()) {
            names.insert(stem.to_string());
        }
    }
    Ok(names.into_iter().collect())
}

/// The module names a Lua source passes to `require` as a literal string.
fn required_modules(src: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = src;
    while let Some(i) = rest.find("require") {
        rest = &rest[i + "require".len()..];
        let arg = rest.trim_start_matches([' ', '\t', '(']);
        let Some(q) = arg.chars().next().filter(|c| *c == '"' || *c == '\'') else {
            continue;
        };
        let body = &arg[1..];
        if let Some(end) = body.find(q) {
            let name = &body[..end];
            // A name ending in `.` is the fixed part of a name built at run time.
            if !name.is_empty()
                && !name.ends_with('.')
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
            {
                out.insert(name.to_string());
            }
        }
    }
    out
}

/// Where a module of the checkout lives, and where the plugin folder's searcher looks for it:
/// `apisix.plugins.A.B` is `A/B.lua` under the folder, any other dotted name its own path.
fn locate(apisix: &Path, module: &str) -> Option<(PathBuf, PathBuf)> {
    let rel = module.replace('.', "/");
    // The path the runtime's searcher looks at (only dotted names are ever staged).
    let dest_rel = super::lua::folder_path(module)?;
    for (src, dest) in [
        (
            apisix.join(format!("{rel}.lua")),
            PathBuf::from(format!("{dest_rel}.lua")),
        ),
        (
            apisix.join(&rel).join("init.lua"),
            PathBuf::from(&dest_rel).join("init.lua"),
        ),
    ] {
        if src.is_file() {
            return Some((src, dest));
        }
    }
    None
}

/// Every `.lua` file under `dir` as a module name under `prefix` (`init.lua` is the folder's).
fn folder_modules(dir: &Path, prefix: &str, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let Some(stem) = p.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        if p.is_dir() {
            folder_modules(&p, &format!("{prefix}.{stem}"), out);
        } else if p.extension().is_some_and(|x| x == "lua") && stem != "init" {
            out.push(format!("{prefix}.{stem}"));
        }
    }
}

/// Whether `module` is staged from the checkout: APISIX's plugin sub-modules and helpers,
/// and `apisix.inspect` (the inspect plugin's debugger, plain Lua over `lfs` and `debug`).
fn stageable(module: &str) -> bool {
    module.starts_with("apisix.plugins.")
        || module.starts_with("apisix.utils.")
        || module == "apisix.inspect"
        || module.starts_with("apisix.inspect.")
}

/// Imports `names` (all plugins when empty) from `apisix` into `dest`. `provided` answers
/// whether moongate serves a module itself; `native` whether a plugin is native in moongate
/// (those are skipped: a Lua file of a native plugin's name is never loaded).
pub fn import(
    apisix: &Path,
    names: &[String],
    dest: &Path,
    provided: &dyn Fn(&str) -> bool,
    native: &dyn Fn(&str) -> bool,
) -> Result<Report, ImportError> {
    let all = plugin_names(apisix)?;
    let wanted: Vec<String> = if names.is_empty() {
        all.clone()
    } else {
        for n in names {
            if !all.contains(n) {
                return Err(ImportError::NoSuchPlugin(
                    n.clone(),
                    apisix.join("apisix/plugins"),
                ));
            }
        }
        names.to_vec()
    };
    let mut report = Report::default();
    for name in wanted {
        if native(&name) {
            report.skipped.push((
                name,
                "native in moongate: enable it by name, no file needed".into(),
            ));
            continue;
        }
        // The plugin's own folder goes whole: plugins pick sub-modules by name at run time
        // (limit-count requires `limit-count-" .. policy`), which no scan can see.
        let mut queue = vec![format!("apisix.plugins.{name}")];
        folder_modules(
            &apisix.join("apisix/plugins").join(&name),
            &format!("apisix.plugins.{name}"),
            &mut queue,
        );
        let mut seen = BTreeSet::new();
        let mut files = Vec::new();
        let mut missing = BTreeSet::new();
        while let Some(module) = queue.pop() {
            if !seen.insert(module.clone()) {
                continue;
            }
            let Some((src, rel)) = locate(apisix, &module) else {
                missing.insert(module);
                continue;
            };
            let text = std::fs::read_to_string(&src).map_err(io(&src))?;
            let to = dest.join(&rel);
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent).map_err(io(parent))?;
            }
            std::fs::write(&to, &text).map_err(io(&to))?;
            files.push(rel);
            for m in required_modules(&text) {
                if provided(&m) {
                    continue;
                }
                if stageable(&m) {
                    queue.push(m);
                } else {
                    missing.insert(m);
                }
            }
        }
        if !missing.is_empty() {
            report.missing.insert(name.clone(), missing);
        }
        report.imported.insert(name, files);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn required_names_are_read_from_every_literal_form() {
        let src = r#"local a = require("apisix.core")
            local b = require 'resty.http'
            local c = require"net.url"
            local d = require(name)  -- not a literal
            local e = pcall(require, "x.y")
            local f = require("apisix.plugins.p.store." .. kind)"#;
        let got: Vec<String> = required_modules(src).into_iter().collect();
        assert_eq!(got, ["apisix.core", "net.url", "resty.http"]);
    }
}
