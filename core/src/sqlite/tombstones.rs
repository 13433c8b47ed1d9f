//! Tombstone collection: versions of deleted rows are removed once they are older than the
//! retention, so a table with insert/delete churn does not grow its shadow tables for ever.
//!
//! Removing a tombstone is safe only when no change the tombstone would beat can still
//! arrive. Two rules make that hold (docs/internals.md, "Tombstone collection"):
//! - a node never publishes a change older than the retention (its origin restores a
//!   snapshot instead: [`Db::oldest_pending_ms`]);
//! - a node collects only tombstones older than the retention *before the last moment it
//!   had applied everything its logs held* ([`Db::note_caught_up`]), less the clock skew,
//!   and older than every parked batch it may still apply.
//!
//! Every change a collector has not applied yet was published after that moment, so its
//! version is younger than the horizon, and younger than any collected tombstone.

use super::{get_state, set_state, set_state_max, Db};
use crate::error::{Error, Result, SqlContext};
use crate::model::{Hlc, Value};

/// Tombstones removed per step: one short write transaction.
pub const COLLECT_STEP_ROWS: i64 = 1000;

impl Db {
    /// Records that at `at_ms` (this node's wall clock, read before asking the logs for
    /// their last entries) this node had applied every entry its logs held.
    pub fn note_caught_up(&self, at_ms: u64) -> Result<()> {
        set_state_max(&self.conn, "caught_up_ms", at_ms)
    }

    /// The last moment this node had applied every entry its logs held (0: never seen).
    pub fn caught_up_ms(&self) -> Result<u64> {
        get_state(&self.conn, "caught_up_ms")
    }

    /// Marks every captured local change as never to be published and records, in the same
    /// transaction, that this node must restore a snapshot before it replicates again (the
    /// changes stay in its tables until then). Returns how many were set aside.
    pub fn set_aside_pending(&self) -> Result<u64> {
        let tx = self.immediate()?;
        let n = self.pending_count()?;
        let (published, clock) = (get_state(&tx, "published_hlc")?, self.clock()?.0);
        if !self.restore_required()? {
            set_state(&tx, "set_aside_after", published)?;
        }
        set_state_max(&tx, "set_aside_through", clock)?;
        super::conflicts::note_set_aside(&tx, published, clock)?;
        super::conflicts::forget_own(&tx, self.node, published, clock)?;
        set_state_max(&tx, "published_hlc", clock)?;
        set_state(&tx, "restore_required", 1)?;
        tx.commit().ctx(|| "setting aside expired changes".into())?;
        Ok(n)
    }

    /// Whether [`set_aside_pending`](Self::set_aside_pending) ran and no snapshot was
    /// restored since.
    pub fn restore_required(&self) -> Result<bool> {
        Ok(get_state(&self.conn, "restore_required")? != 0)
    }

    /// Keeps the changes [`set_aside_pending`](Self::set_aside_pending) set aside, for
    /// when no node can give the snapshot this node waits for: every row whose version is
    /// still one of them is logged again with a new version, so it is published like a
    /// write made now (it wins over older writes elsewhere, and no collected tombstone can
    /// be older than it), and the restore is no longer required. Returns how many rows were
    /// logged again, `None` when nothing was set aside.
    pub fn keep_set_aside(&mut self) -> Result<Option<u64>> {
        self.refresh_if_schema_changed()?;
        let tx = self.immediate()?;
        if !self.restore_required()? {
            return Ok(None);
        }
        // The versions of the rows set aside: folded from the log if not yet.
        self.fold_local(&tx)?;
        let (after, through) = (get_state(&tx, "set_aside_after")?, get_state(&tx, "set_aside_through")?);
        let rows: Vec<(i64, Vec<u8>, bool)> = tx
            .prepare(
                "SELECT tbl, pk, deleted FROM __marmot__versions WHERE node = ?1 AND hlc > ?2 AND hlc <= ?3 \
                 ORDER BY hlc",
            )
            .and_then(|mut s| {
                s.query_map((self.node.0 as i64, after as i64, through as i64), |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? != 0))
                })?
                .collect()
            })
            .ctx(|| "reading the versions set aside".into())?;
        let base: i64 = tx
            .query_row(&format!("SELECT {}", super::capture::next_hlc_sql(&self.opts.time_ms_sql)), [], |r| r.get(0))
            .ctx(|| "reading the clock".into())?;
        let mut logged = 0u64;
        for (tbl, key, deleted) in rows {
            // A table dropped since has nothing left to publish.
            let Some(info) = self.table_by_id(tbl) else { continue };
            let pk: Vec<Value> = ciborium::from_reader(key.as_slice())
                .map_err(|e| Error::Corrupt(format!("a key in __marmot__versions: {e}")))?;
            let cols: String = (0..info.pk.len()).map(|n| format!(", c{n}")).collect();
            let params: String = (0..info.pk.len()).map(|n| format!(", ?{}", n + 4)).collect();
            let hlc = base + logged as i64;
            let mut args: Vec<&dyn rusqlite::ToSql> = vec![&hlc, &tbl];
            let op = i64::from(deleted);
            args.push(&op);
            args.extend(pk.iter().map(|v| v as &dyn rusqlite::ToSql));
            tx.execute(
                &format!("INSERT INTO __marmot__log(hlc, tbl, op{cols}) VALUES (?1, ?2, ?3{params})"),
                args.as_slice(),
            )
            .ctx(|| "logging a row set aside again".into())?;
            logged += 1;
        }
        tx.execute("DELETE FROM __marmot__state WHERE key = 'restore_required'", [])
            .ctx(|| "clearing restore_required".into())?;
        tx.commit().ctx(|| "keeping the changes set aside".into())?;
        Ok(Some(logged))
    }

    /// The wall-clock milliseconds of the oldest local change not yet published.
    pub fn oldest_pending_ms(&self) -> Result<Option<u64>> {
        let published = get_state(&self.conn, "published_hlc")?;
        let hlc: Option<i64> = self
            .conn
            .query_row("SELECT min(hlc) FROM __marmot__log WHERE hlc > ?1", [published as i64], |r| r.get(0))
            .ctx(|| "reading the oldest pending change".into())?;
        Ok(hlc.map(|h| Hlc(h as u64).millis()))
    }

    /// Removes at most [`COLLECT_STEP_ROWS`] tombstones versioned below `horizon`, in one
    /// transaction. Returns how many were removed and whether more are left.
    ///
    /// This node's own deletes not yet published (still in the log), or set aside, keep
    /// their tombstones: the delete is still to be published, or logged again should the
    /// operator keep what was set aside ([`keep_set_aside`](Self::keep_set_aside) reads it
    /// from its tombstone).
    pub fn collect_tombstones_step(&self, horizon: Hlc) -> Result<(u64, bool)> {
        let tx = self.immediate()?;
        let aside_after = match self.restore_required()? {
            true => get_state(&tx, "set_aside_after")? as i64,
            false => i64::MAX,
        };
        let n = tx
            .execute(
                "DELETE FROM __marmot__versions WHERE (tbl, pk) IN ( \
                 SELECT tbl, pk FROM __marmot__versions AS v INDEXED BY __marmot__tombstones \
                 WHERE deleted = 1 AND hlc < ?1 AND NOT (node = ?3 AND (hlc > ?4 \
                   OR EXISTS (SELECT 1 FROM __marmot__log AS l WHERE l.hlc = v.hlc))) \
                 ORDER BY hlc LIMIT ?2)",
                (horizon.0 as i64, COLLECT_STEP_ROWS, self.node.0 as i64, aside_after),
            )
            .ctx(|| "collecting tombstones".into())? as u64;
        if n > 0 {
            tx.execute(
                "INSERT INTO __marmot__state(key, value) VALUES ('tombstones_collected', ?1) \
                 ON CONFLICT(key) DO UPDATE SET value = value + excluded.value",
                [n as i64],
            )
            .ctx(|| "counting collected tombstones".into())?;
        }
        set_state_max(&tx, "tombstone_horizon", horizon.0)?;
        tx.commit().ctx(|| "committing tombstone collection".into())?;
        Ok((n, n as i64 >= COLLECT_STEP_ROWS))
    }

    /// Tombstones removed so far, and the horizon below which they were (0: none yet).
    pub fn tombstones_collected(&self) -> Result<(u64, Hlc)> {
        Ok((get_state(&self.conn, "tombstones_collected")?, Hlc(get_state(&self.conn, "tombstone_horizon")?)))
    }

    /// Tombstones held now.
    pub fn tombstones_held(&self) -> Result<u64> {
        self.conn
            .query_row(
                "SELECT count(*) FROM __marmot__versions INDEXED BY __marmot__tombstones WHERE deleted = 1",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u64)
            .ctx(|| "counting tombstones".into())
    }
}
