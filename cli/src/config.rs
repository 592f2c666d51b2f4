//! The `sweep` config file: settings that hold unless a flag or a `SWEEP_*` variable says
//! otherwise (precedence: flag, then environment, then this file, then the built-in default).
//!
//! The file is TOML, at `--config FILE`, else `$SWEEP_CONFIG`, else
//! `$XDG_CONFIG_HOME/sweep/config.toml` (`~/.config/sweep/config.toml`) when it exists:
//!
//! ```toml
//! coordinator = "http://sweep.example.org:7070"
//! output = "table"
//! ```
//!
//! Each key stands for the environment variable `SWEEP_<KEY>`, which is what the flags read;
//! the file only fills in variables that are not set. Unknown keys and values of the wrong type
//! are errors that name the file, the line and the key.

use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};

/// The keys a config file may hold, and the variables they set.
pub const KEYS: &[(&str, &str)] = &[
    ("coordinator", "SWEEP_COORDINATOR"),
    ("output", "SWEEP_OUTPUT"),
    ("state_dir", "SWEEP_STATE_DIR"),
    ("listen", "SWEEP_LISTEN"),
    ("artifacts", "SWEEP_ARTIFACTS"),
    ("worker_bin", "SWEEP_WORKER_BIN"),
];

/// Where the config file is: the explicit path (which must exist), else `$SWEEP_CONFIG`
/// (which must exist), else the per-user file if it exists.
pub fn locate(explicit: Option<&Path>) -> anyhow::Result<Option<PathBuf>> {
    if let Some(p) = explicit {
        return Ok(Some(p.to_path_buf()));
    }
    if let Some(p) = std::env::var_os("SWEEP_CONFIG").filter(|p| !p.is_empty()) {
        return Ok(Some(PathBuf::from(p)));
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")));
    Ok(base.map(|b| b.join("sweep/config.toml")).filter(|p| p.is_file()))
}

/// The `(variable, value)` pairs of a config file's text; `path` is for the messages.
pub fn parse(path: &Path, text: &str) -> anyhow::Result<Vec<(&'static str, String)>> {
    let doc: toml::Spanned<toml::Table> = toml::from_str(text).map_err(|e| {
        let at = e.span().map(|s| line_col(text, s.start)).map(|(l, c)| format!(":{l}:{c}")).unwrap_or_default();
        anyhow!("config file {}{at}: {}", path.display(), e.message())
    })?;
    let mut pairs = Vec::new();
    for (key, value) in doc.get_ref() {
        let at = key_line(text, key).map(|l| format!(":{l}:1")).unwrap_or_default();
        let Some((_, var)) = KEYS.iter().find(|(k, _)| k == key) else {
            let known: Vec<&str> = KEYS.iter().map(|(k, _)| *k).collect();
            bail!("config file {}{at}: unknown key `{key}`; known keys: {}", path.display(), known.join(", "));
        };
        let value = match value {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            other => bail!("config file {}{at}: `{key}` must be a string, not a {}", path.display(), other.type_str()),
        };
        pairs.push((*var, value));
    }
    Ok(pairs)
}

/// The line (1-based) where `key = …` stands.
fn key_line(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            let rest = l.strip_prefix(key).or_else(|| l.strip_prefix(&format!("\"{key}\"")));
            rest.is_some_and(|r| r.trim_start().starts_with('='))
        })
        .map(|i| i + 1)
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// Reads the config file (if any) and sets each of its variables that the environment does not
/// set already. Must run before any thread starts.
pub fn apply(explicit: Option<&Path>) -> anyhow::Result<Option<PathBuf>> {
    let Some(path) = locate(explicit)? else { return Ok(None) };
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read config file {}", path.display()))?;
    for (var, value) in parse(&path, &text)? {
        if std::env::var_os(var).is_none() {
            // SAFETY: called at the start of main, before the runtime or any other thread.
            unsafe { std::env::set_var(var, value) };
        }
    }
    Ok(Some(path))
}

/// `--config FILE` or `--config=FILE` from the raw arguments (read before clap parses them,
/// because the file supplies defaults to the parse).
pub fn explicit_path(args: &[std::ffi::OsString]) -> Option<PathBuf> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if s == "--" {
            break;
        }
        if s == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(v) = s.strip_prefix("--config=") {
            return Some(PathBuf::from(v));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_become_variables_and_mistakes_name_the_line() {
        let p = Path::new("c.toml");
        let pairs = parse(p, "coordinator = \"http://c:7070\"\noutput = \"json\"\n").unwrap();
        assert_eq!(pairs, [("SWEEP_COORDINATOR", "http://c:7070".to_string()), ("SWEEP_OUTPUT", "json".into())]);
        let e = parse(p, "output = \"json\"\ncoordnator = \"x\"\n").unwrap_err().to_string();
        assert!(e.contains("c.toml:2:1") && e.contains("unknown key `coordnator`") && e.contains("coordinator"), "{e}");
        let e = parse(p, "output = [1]\n").unwrap_err().to_string();
        assert!(e.contains("c.toml:1:1") && e.contains("must be a string, not a array"), "{e}");
        let e = parse(p, "output = \n").unwrap_err().to_string();
        assert!(e.starts_with("config file c.toml:1:"), "{e}");
    }

    #[test]
    fn the_explicit_path_is_found_in_either_spelling() {
        let a = |v: &[&str]| v.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
        assert_eq!(explicit_path(&a(&["sweep", "--config", "x.toml", "list"])), Some(PathBuf::from("x.toml")));
        assert_eq!(explicit_path(&a(&["sweep", "list", "--config=y.toml"])), Some(PathBuf::from("y.toml")));
        assert_eq!(explicit_path(&a(&["sweep", "list", "--", "--config", "z"])), None);
    }
}
