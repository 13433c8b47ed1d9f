//! `marmot wait [--timeout SECONDS]`: blocks until every local change committed before it
//! started is durably published (in JetStream, so every other node will get it), for
//! deploy scripts and tests ("write, then wait, then switch traffic").
//!
//! It reads the database read-only: the target is the highest local version captured when
//! it starts (`last_local_hlc` of `__marmot__replication`), and it polls `published_hlc`
//! every [`POLL_EVERY`] until that reaches the target. The running node records
//! acknowledgements within about 25 ms of publishing (see `ack_flush`). It does not need
//! NATS itself: "published" is what the node recorded after JetStream acknowledged.

use std::time::{Duration, Instant};

use super::{capture_installed, open_readonly, published_and_local};
use crate::config::Config;

/// How often `published_hlc` is read.
pub const POLL_EVERY: Duration = Duration::from_millis(50);

/// Waits; `Err` names what is still pending when the timeout passed.
pub fn run(config: &Config, timeout: Duration) -> Result<(), String> {
    let conn = open_readonly(&config.db_path)?;
    if !capture_installed(&conn)? {
        return Err(format!(
            "{} has no Marmot capture installed: marmot has never run on it, so nothing it \
             holds is replicated",
            config.db_path.display()
        ));
    }
    let started = Instant::now();
    let (mut published, target) = published_and_local(&conn)?;
    while published < target {
        if !timeout.is_zero() && started.elapsed() >= timeout {
            let pending: i64 = conn
                .query_row("SELECT count(*) FROM __marmot__log WHERE hlc > ?1", [published as i64], |r| r.get(0))
                .map_err(|e| format!("reading __marmot__log: {e}"))?;
            return Err(format!(
                "timed out after {timeout:?}: {pending} local change(s) still pending publication \
                 (published through {}, waiting for {}); is marmot running on this database and \
                 is NATS reachable? `marmot status` tells more",
                marmot_core::Hlc(published),
                marmot_core::Hlc(target),
            ));
        }
        std::thread::sleep(POLL_EVERY);
        published = published_and_local(&conn)?.0;
    }
    println!("published through {}", marmot_core::Hlc(published));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use marmot_core::sqlite::{CaptureOptions, Db};
    use marmot_core::NodeId;

    /// A WAL database with capture installed, one row written by the "application".
    fn database(dir: &std::path::Path) -> (Config, Db) {
        let path = dir.join("app.db");
        let app = rusqlite::Connection::open(&path).unwrap();
        app.execute_batch("PRAGMA journal_mode=WAL; CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT);").unwrap();
        let db = Db::open(&path, NodeId(1), CaptureOptions::default()).unwrap();
        app.execute("INSERT INTO t VALUES (1, 'a')", []).unwrap();
        let config = Config { db_path: path, node_id: 1, ..Config::default() };
        (config, db)
    }

    #[test]
    fn view_shows_a_write_as_pending_until_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let (config, db) = database(dir.path());
        let app = rusqlite::Connection::open(&config.db_path).unwrap();
        let view = |c: &rusqlite::Connection| -> (i64, i64, i64) {
            c.query_row("SELECT last_local_hlc, published_hlc, pending_changes FROM __marmot__replication", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .unwrap()
        };
        let (local, published, pending) = view(&app);
        assert!(local > 0 && published == 0 && pending == 1, "{local} {published} {pending}");
        let err = run(&config, Duration::from_millis(120)).unwrap_err();
        assert!(err.contains("1 local change(s) still pending"), "{err}");
        db.acknowledge(marmot_core::Hlc(local as u64)).unwrap();
        assert_eq!(view(&app), (local, local, 0));
        run(&config, Duration::from_millis(120)).unwrap();
    }

    #[test]
    fn database_without_capture_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plain.db");
        rusqlite::Connection::open(&path).unwrap().execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY);").unwrap();
        let config = Config { db_path: path, node_id: 1, ..Config::default() };
        assert!(run(&config, Duration::ZERO).unwrap_err().contains("no Marmot capture"));
    }
}
