//! The one error type of `marmot-core`.

use crate::model::{Hlc, Position, Shard};

/// A result with the core [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the core, named by meaning.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// SQLite refused an operation; `context` says which.
    #[error("sqlite: {context}: {source}")]
    Sqlite {
        /// What was being done.
        context: String,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
    /// Bytes that do not decode as a Marmot message.
    #[error("corrupt message: {0}")]
    Corrupt(String),
    /// A message written in a wire-format version this build does not know.
    #[error("unsupported wire format version {found} (this build reads version {supported})")]
    UnsupportedFormat {
        /// The version in the message.
        found: u8,
        /// The version this build reads and writes.
        supported: u8,
    },
    /// A remote change names a table or column that this node does not have.
    #[error("schema mismatch on table {table:?}: {detail}")]
    SchemaMismatch {
        /// The table named by the change.
        table: String,
        /// What is missing or different.
        detail: String,
    },
    /// A subscription asked for entries the log no longer holds.
    #[error("shard {shard}: position {position} is older than the first entry held ({first})")]
    Truncated {
        /// The shard.
        shard: Shard,
        /// The position asked for.
        position: Position,
        /// The first position the log still holds.
        first: Position,
    },
    /// The transport failed; `retryable` says whether trying again may succeed.
    #[error("transport: {message}")]
    Transport {
        /// What failed.
        message: String,
        /// Whether the same call may succeed later.
        retryable: bool,
    },
    /// A snapshot store failed.
    #[error("snapshot store: {message}")]
    Store {
        /// What failed (never includes credentials).
        message: String,
        /// Whether the same call may succeed later.
        retryable: bool,
    },
    /// A named object does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// A file-system operation failed.
    #[error("io: {context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The database is not usable by Marmot (not WAL, wrong file, …).
    #[error("database: {0}")]
    Database(String),
    /// A schema change from the schema log could not be applied here (its SQL failed on
    /// this node's schema). The entry is parked; the schema fingerprints differ.
    #[error("schema change cannot be applied here: {0}")]
    SchemaConflict(String),
    /// The application changed the schema while Marmot was about to read or write against
    /// the schema it knew; Marmot re-reads the schema and tries again.
    #[error("the schema changed during the operation; retrying against the new schema")]
    SchemaChanged,
    /// A restore was refused because the database holds local changes that are committed
    /// and not yet published: the copy would erase them. Publish them, then restore.
    #[error("{0} local changes are not published yet; a restore now would erase them")]
    PendingChanges(u64),
    /// A snapshot was not saved because this node leaves tables out of replication
    /// (`[replication]` include/exclude): its copies of them hold only its own rows, and a
    /// node restored from it would take them as the cluster's.
    #[error(
        "this node does not replicate {0}: a snapshot must hold every table, so nodes that replicate every \
         table save them"
    )]
    PartialSelection(String),
    /// A snapshot's copy holds local changes (through this version) that are not
    /// published yet. A snapshot is uploaded only once they are: should they never be (they
    /// outlive the tombstone retention and are set aside), nodes restored from it would
    /// hold rows no other node has.
    #[error("the copy holds local changes not published yet (through {0}); the snapshot waits until they are")]
    SnapshotUnpublished(Hlc),
    /// Local changes waited unpublished for longer than the tombstone retention: other
    /// nodes may have collected the tombstones that decide them, so publishing them could
    /// bring deleted rows back. The node restores a snapshot instead (keeping a copy of its
    /// database first).
    #[error(
        "{changes} local changes were not published for {age_ms} ms, longer than tombstone_retention \
         ({retention_ms} ms): publishing them could bring back rows deleted elsewhere"
    )]
    ChangesExpired {
        /// Local changes not published.
        changes: u64,
        /// Age of the oldest one, in milliseconds.
        age_ms: u64,
        /// The retention they outlived, in milliseconds.
        retention_ms: u64,
    },
    /// This node set aside local changes that outlived the tombstone retention: it
    /// neither publishes nor saves a snapshot until it has restored one.
    #[error("this node set aside local changes older than tombstone_retention and must restore a snapshot first")]
    RestoreRequired,
    /// A fault injected by a test or the simulator at a named point.
    #[error("injected crash at {0}")]
    InjectedCrash(&'static str),
}

impl Error {
    /// Whether retrying the failed call may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Transport { retryable, .. } | Error::Store { retryable, .. } => *retryable,
            Error::Sqlite { source, .. } => matches!(
                source.sqlite_error_code(),
                Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
            ),
            Error::Io { .. } | Error::SchemaChanged => true,
            _ => false,
        }
    }

    /// Whether the database's file system is full (`SQLITE_FULL`, or an I/O error saying
    /// so): nothing is wrong with the data; the same write succeeds once space is freed.
    pub fn is_disk_full(&self) -> bool {
        match self {
            Error::Sqlite { source, .. } => source.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull),
            Error::Io { source, .. } => source.kind() == std::io::ErrorKind::StorageFull,
            _ => false,
        }
    }

    /// Whether the error comes from the data of a batch rather than from this node's
    /// state: applying the same batch again fails the same way, so it is parked (a missing
    /// table or column, a constraint the local schema adds, a value SQLite refuses).
    pub fn is_data_error(&self) -> bool {
        match self {
            Error::SchemaMismatch { .. } | Error::Corrupt(_) | Error::SchemaConflict(_) => true,
            Error::Sqlite { source, .. } => matches!(
                source.sqlite_error_code(),
                Some(
                    rusqlite::ErrorCode::ConstraintViolation
                        | rusqlite::ErrorCode::TypeMismatch
                        | rusqlite::ErrorCode::TooBig
                )
            ),
            _ => false,
        }
    }

    /// A transport error that may succeed when retried.
    pub fn transport(message: impl Into<String>) -> Error {
        Error::Transport { message: message.into(), retryable: true }
    }
}

/// Attaches a description of the operation to SQLite errors.
pub(crate) trait SqlContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> SqlContext<T> for rusqlite::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Sqlite { context: context(), source })
    }
}
