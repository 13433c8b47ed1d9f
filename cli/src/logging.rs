//! Log output: human-readable lines or JSON lines on stderr, as `[logging]` says.
//!
//! The level is `info`, or `debug` with `logging.verbose = true`; a `RUST_LOG` filter, when
//! set, takes precedence over both. Logs go to stderr so that stdout stays free for the
//! output of `marmot status` and alike.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LoggingConfig};

/// Logging could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoggingError {
    /// `RUST_LOG` is set but is not a valid filter.
    #[error("invalid RUST_LOG filter {value:?}: {message}")]
    BadFilter {
        /// The variable's value.
        value: String,
        /// The parser's message.
        message: String,
    },
    /// A global subscriber was already installed.
    #[error("logging was already set up: {0}")]
    AlreadySet(String),
}

/// The filter to use: `RUST_LOG` when set, else `debug` or `info` by `verbose`.
pub fn filter(config: &LoggingConfig, rust_log: Option<&str>) -> Result<EnvFilter, LoggingError> {
    filter_with(config, rust_log, "info")
}

/// Like [`filter`], with `quiet_level` instead of `info` when not verbose.
fn filter_with(config: &LoggingConfig, rust_log: Option<&str>, quiet_level: &str) -> Result<EnvFilter, LoggingError> {
    match rust_log.filter(|v| !v.trim().is_empty()) {
        Some(value) => EnvFilter::try_new(value)
            .map_err(|e| LoggingError::BadFilter { value: value.to_owned(), message: e.to_string() }),
        None => Ok(EnvFilter::new(if config.verbose { "debug" } else { quiet_level })),
    }
}

/// Installs the global subscriber. Call once, before anything logs. `level` applies
/// unless `verbose` or `RUST_LOG` say otherwise: `info` for a node, quieter for the
/// inspection commands.
pub fn init(config: &LoggingConfig, level: &str) -> Result<(), LoggingError> {
    let rust_log = std::env::var(EnvFilter::DEFAULT_ENV).ok();
    let filter = filter_with(config, rust_log.as_deref(), level)?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(config.verbose);
    let result = match config.format {
        LogFormat::Console => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    result.map_err(|e| LoggingError::AlreadySet(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbose_selects_debug_and_rust_log_wins() {
        let quiet = LoggingConfig::default();
        let verbose = LoggingConfig { verbose: true, ..LoggingConfig::default() };
        assert_eq!(filter(&quiet, None).unwrap().to_string(), "info");
        assert_eq!(filter(&verbose, None).unwrap().to_string(), "debug");
        assert_eq!(filter(&verbose, Some("warn")).unwrap().to_string(), "warn");
        assert_eq!(filter(&quiet, Some(" ")).unwrap().to_string(), "info");
    }

    #[test]
    fn bad_rust_log_is_an_error_naming_it() {
        let err = filter(&LoggingConfig::default(), Some("foo=notalevel")).unwrap_err();
        assert!(err.to_string().contains("RUST_LOG"), "{err}");
    }
}
