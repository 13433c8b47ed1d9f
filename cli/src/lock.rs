//! One `marmot` per database: an exclusive lock on `<db_path>-marmot.lock`, held for the
//! life of the process and released by the kernel when it dies (however it dies), with the
//! holder's PID written inside so that a second process can name it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use crate::run::RunError;

/// The held lock; dropping it releases it.
#[derive(Debug)]
pub struct DbLock {
    _file: File,
}

/// The lock file of the database at `db_path`.
pub fn lock_path(db_path: &Path) -> PathBuf {
    let mut name = db_path.as_os_str().to_owned();
    name.push("-marmot.lock");
    PathBuf::from(name)
}

impl DbLock {
    /// Takes the lock, or fails at once naming the database and the PID that holds it.
    pub fn acquire(db_path: &Path) -> Result<DbLock, RunError> {
        let path = lock_path(db_path);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| format!("opening the lock file {}: {e}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let pid = if holder.is_empty() { "unknown".to_owned() } else { holder.to_owned() };
                return Err(format!(
                    "another marmot (PID {pid}) is already running on {}; stop it first (lock file {})",
                    db_path.display(),
                    path.display()
                )
                .into());
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(format!("locking {}: {e}", path.display()).into());
            }
        }
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{}", std::process::id()))
            .map_err(|e| format!("writing the lock file {}: {e}", path.display()))?;
        Ok(DbLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_database_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("app.db");
        let first = DbLock::acquire(&db).unwrap();
        let err = DbLock::acquire(&db).unwrap_err().to_string();
        assert!(err.contains(&format!("PID {}", std::process::id())), "{err}");
        assert!(err.contains("app.db"), "{err}");
        drop(first);
        DbLock::acquire(&db).expect("free again once the holder is gone");
    }
}
