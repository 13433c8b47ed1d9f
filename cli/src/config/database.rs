//! Checks that `db_path` names a SQLite database Marmot can replicate, by reading its
//! 100-byte header only: no connection is opened, no lock is taken, nothing is written, so
//! the check is safe while the application has the database open.
//!
//! Decision (see `docs/configuration.md`): a database not in WAL mode is refused with the
//! command that switches it, rather than switched automatically. Changing the journal mode
//! needs exclusive access and changes how the application's own connections behave, so it
//! is the operator's call; it is a one-time change that persists in the file.

use std::io::Read;
use std::path::Path;

use super::error::DatabaseProblem;

/// The first 16 bytes of every SQLite 3 database file.
pub const SQLITE_HEADER: &[u8; 16] = b"SQLite format 3\0";

/// Header offsets 18 and 19: file format write and read versions; 2 means WAL.
const WAL_VERSION_OFFSETS: [usize; 2] = [18, 19];

/// Checks that `path` is an existing, non-empty SQLite database in WAL journal mode.
pub fn check(path: &Path) -> Result<(), DatabaseProblem> {
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(DatabaseProblem::Missing),
        Err(e) => return Err(DatabaseProblem::Unreadable(e.to_string())),
    };
    if !meta.is_file() {
        return Err(DatabaseProblem::NotAFile);
    }
    if meta.len() == 0 {
        return Err(DatabaseProblem::Empty);
    }
    let header = read_header(path)?;
    if header.len() < 100 || !header.starts_with(SQLITE_HEADER) {
        return Err(DatabaseProblem::NotSqlite);
    }
    if WAL_VERSION_OFFSETS.iter().all(|&i| header[i] == 2) {
        Ok(())
    } else {
        Err(DatabaseProblem::NotWal)
    }
}

fn read_header(path: &Path) -> Result<Vec<u8>, DatabaseProblem> {
    let unreadable = |e: std::io::Error| DatabaseProblem::Unreadable(e.to_string());
    let mut header = Vec::with_capacity(100);
    std::fs::File::open(path).map_err(unreadable)?.take(100).read_to_end(&mut header).map_err(unreadable)?;
    Ok(header)
}
