//! Reading proxy.toml: parse (toml + serde, unknown keys refused), then validate once into a
//! typed [`Policy`]. Every error names the file, line and column of the offending value.

mod consumers;
mod jwt;
mod raw;
mod syntax;
mod telemetry;
pub mod units;
mod validate;

use std::fmt;
use std::path::Path;
use std::sync::LazyLock;

use crate::limiter::algorithm::Kind;
use crate::policy::Policy;

pub use validate::{line_column, shadowed_routes};

/// One problem in a config file, at a position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.column, self.message
        )
    }
}

/// Every problem found in one file (validation does not stop at the first).
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl ConfigErrors {
    fn single(file: &str, line: usize, column: usize, message: impl Into<String>) -> Self {
        ConfigErrors(vec![ConfigError {
            file: file.to_string(),
            line,
            column,
            message: message.into(),
        }])
    }
}

/// What a key takes, for parse errors that name a key but not what is allowed.
static KEY_HINTS: LazyLock<[(&str, String); 8]> = LazyLock::new(|| {
    [
        (
            "server",
            "every proxy.toml needs a [server] table with listen = \"IP:PORT\"".to_string(),
        ),
        (
            "listen",
            "expected listen = \"IP:PORT\", e.g. \"0.0.0.0:8080\"".to_string(),
        ),
        (
            "algorithm",
            format!("expected algorithm = one of {}", Kind::names()),
        ),
        (
            "rate",
            "expected rate = \"N/unit\", e.g. \"10/s\" or \"100/10s\"".to_string(),
        ),
        (
            "name",
            "expected name = \"a-route-name\" (letters, digits, '-', '_', '.')".to_string(),
        ),
        (
            "upstream",
            "expected upstream = the name of an [upstreams.NAME] table".to_string(),
        ),
        (
            "targets",
            "expected targets = [\"http://HOST:PORT\", ...]".to_string(),
        ),
        (
            "by",
            "expected by = \"ip\", \"header:NAME\", \"query:NAME\", \"global\", \"consumer\", or a list of these"
                .to_string(),
        ),
    ]
});

/// Adds what is allowed to a serde/toml error: for a missing field, that field's hint; for a
/// value of the wrong type, the hint of the key just before the error on its line.
fn with_hint(message: String, line_before_error: &str) -> String {
    let hint = if message.starts_with("invalid type") {
        KEY_HINTS
            .iter()
            .filter_map(|(key, hint)| {
                let at = line_before_error.rfind(&format!("{key} ="))?;
                // A whole key, not the end of a longer one.
                let whole = at == 0
                    || !line_before_error.as_bytes()[at - 1].is_ascii_alphanumeric()
                        && line_before_error.as_bytes()[at - 1] != b'_';
                whole.then_some((at, hint))
            })
            .max_by_key(|(at, _)| *at)
            .map(|(_, hint)| hint)
    } else {
        KEY_HINTS
            .iter()
            .find(|(key, _)| message.contains(&format!("missing field `{key}`")))
            .map(|(_, hint)| hint)
    };
    match hint {
        Some(hint) => format!("{message}; {hint}"),
        None => message,
    }
}

/// The hash that names a config's content (`check`, `tollgate_config_info`, the reload
/// watcher): 16 hex digits of blake3.
pub fn source_hash(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex()[..16].to_string()
}

/// Reads and validates the file at `path`.
pub fn load(path: &Path) -> Result<Policy, ConfigErrors> {
    let name = path.display().to_string();
    let source = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors::single(&name, 1, 1, format!("cannot read the config file: {e}"))
    })?;
    let base_dir = path.parent().unwrap_or(Path::new("."));
    parse(&source, &name, base_dir)
}

/// Parses and validates config text. `file` is the name errors carry.
pub fn parse(source: &str, file: &str, base_dir: &Path) -> Result<Policy, ConfigErrors> {
    let raw: raw::RawConfig = parse_toml(source, file)?;
    validate::validate(raw, file, source, base_dir)
}

/// Parses one TOML file tollgate reads into its raw structs, with errors at file:line:column
/// (the syntax pre-scan's words where toml's mislead, and a hint of what a key takes).
fn parse_toml<T: serde::de::DeserializeOwned>(source: &str, file: &str) -> Result<T, ConfigErrors> {
    toml::from_str(source).map_err(|e| {
        let message = e.message().trim().replace('\n', " ");
        let offset = e.span().map_or(0, |span| span.start);
        // Where toml's words or position mislead (a slip reported where the parser gave up),
        // the pre-scan's; otherwise toml's.
        let (offset, message) = match syntax::explain(source, offset, e.span(), &message) {
            Some(better) => (better.offset, better.message),
            None => (offset, message),
        };
        let (line, column) = line_column(source, offset);
        let line_text = source.lines().nth(line - 1).unwrap_or("");
        let before: String = line_text.chars().take(column.saturating_sub(1)).collect();
        ConfigErrors::single(file, line, column, with_hint(message, &before))
    })
}

#[cfg(test)]
mod tests;
