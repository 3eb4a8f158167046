//! Reading proxy.toml: parse (toml + serde, unknown keys refused), then validate once into a
//! typed [`Policy`]. Every error names the file, line and column of the offending value.

mod raw;
pub mod units;
mod validate;

use std::fmt;
use std::path::Path;

use crate::policy::Policy;

pub use validate::{ALGORITHMS, line_column, shadowed_routes};

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
    let raw: raw::RawConfig = toml::from_str(source).map_err(|e| {
        let (line, column) = e
            .span()
            .map_or((1, 1), |span| line_column(source, span.start));
        let message = e.message().trim().replace('\n', " ");
        ConfigErrors::single(file, line, column, message)
    })?;
    validate::validate(raw, file, source, base_dir)
}

#[cfg(test)]
mod tests;
