//! Configuration errors. Every variant names what is wrong, the key (or environment
//! variable) that carries it, and where that value came from, so that one line on stderr is
//! enough to fix it.

use std::fmt;
use std::path::PathBuf;

/// Where a configuration value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A TOML file.
    File(PathBuf),
    /// An environment variable (`MARMOT_…`), by name.
    Env(String),
    /// No file and no variable: the built-in default.
    Default,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File(path) => write!(f, "{}", path.display()),
            Origin::Env(var) => write!(f, "environment variable {var}"),
            Origin::Default => write!(f, "the built-in defaults"),
        }
    }
}

/// What is wrong with the database that `db_path` names.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DatabaseProblem {
    /// No file at that path.
    Missing,
    /// The path is a directory or another non-file.
    NotAFile,
    /// The file is empty (0 bytes): not yet a database.
    Empty,
    /// The file does not start with the SQLite header.
    NotSqlite,
    /// The database is in a rollback-journal mode, not WAL.
    NotWal,
    /// The file could not be opened or read.
    Unreadable(String),
}

impl fmt::Display for DatabaseProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DatabaseProblem::Missing => write!(f, "the file does not exist"),
            DatabaseProblem::NotAFile => write!(f, "it is not a regular file"),
            DatabaseProblem::Empty => {
                write!(f, "the file is empty, not a SQLite database yet (create the schema first)")
            }
            DatabaseProblem::NotSqlite => {
                write!(f, "not a SQLite database (the file does not start with \"SQLite format 3\")")
            }
            DatabaseProblem::NotWal => write!(f, "the database uses a rollback journal, but Marmot needs WAL mode"),
            DatabaseProblem::Unreadable(why) => write!(f, "cannot read it: {why}"),
        }
    }
}

impl DatabaseProblem {
    /// How to fix it, when there is a single command for that (starts with "; ").
    pub fn hint(&self, path: &std::path::Path) -> String {
        match self {
            DatabaseProblem::NotWal => format!(
                "; switch it once (with the application stopped) with: \
                 sqlite3 {} 'PRAGMA journal_mode=WAL;'",
                path.display()
            ),
            _ => String::new(),
        }
    }
}

/// A configuration that must not be started with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The configuration file could not be read.
    #[error("cannot read configuration file {}: {source}", file.display())]
    Read {
        /// The file.
        file: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("invalid TOML in {}{}: {message}", file.display(), line_suffix(*line))]
    Syntax {
        /// The file.
        file: PathBuf,
        /// 1-based line, when known.
        line: Option<usize>,
        /// The parser's message.
        message: String,
    },
    /// A key that Marmot does not know (often a typo).
    #[error("unknown key \"{key}\" in {origin}{}: {message}", line_suffix(*line))]
    UnknownKey {
        /// Dotted key path, e.g. `snapshot.foo`.
        key: String,
        /// Where it was set.
        origin: Origin,
        /// 1-based line, when known.
        line: Option<usize>,
        /// The keys that would have been accepted.
        message: String,
    },
    /// A value of the wrong type or out of range.
    #[error("invalid value for \"{key}\" in {origin}{}: {message}", line_suffix(*line))]
    InvalidValue {
        /// Dotted key path, e.g. `logging.format`.
        key: String,
        /// Where it was set.
        origin: Origin,
        /// 1-based line, when known.
        line: Option<usize>,
        /// What is wrong.
        message: String,
    },
    /// `db_path` does not name a usable SQLite database.
    #[error("db_path {} (set in {origin}): {problem}{}", path.display(), problem.hint(path))]
    Database {
        /// The database path.
        path: PathBuf,
        /// Where `db_path` was set.
        origin: Origin,
        /// What is wrong.
        problem: DatabaseProblem,
    },
}

impl ConfigError {
    /// The process exit status for a configuration error (2, as for a usage error).
    pub const EXIT_CODE: i32 = 2;

    /// The dotted key this error is about, when there is one.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::UnknownKey { key, .. } | ConfigError::InvalidValue { key, .. } => Some(key),
            ConfigError::Database { .. } => Some("db_path"),
            ConfigError::Read { .. } | ConfigError::Syntax { .. } => None,
        }
    }
}

fn line_suffix(line: Option<usize>) -> String {
    line.map(|l| format!(" (line {l})")).unwrap_or_default()
}
