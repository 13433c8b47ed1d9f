//! The SQLite side of a node: capture triggers, the change reader, the merge.
//!
//! [`Db`] owns one connection to the application's database. The application keeps its
//! own connections (any SQLite library); Marmot's writes happen in `BEGIN IMMEDIATE`
//! transactions so they serialize with the application's through SQLite's own lock.
//!
//! Shadow objects, all prefixed `__marmot__`:
//! - `clock` — one row: the highest version applied or cleaned (`hlc`), and the
//!   `applying` flag that keeps the side-car's own writes out of capture;
//! - `log` — captured local changes keyed by their `hlc` (a union of whole transactions
//!   in commit order), cleaned once published;
//! - `versions` — per row, the version of the last write that won (tombstones included);
//! - `aside` — rows that lost a secondary `UNIQUE` value to a higher version;
//! - `positions`, `parked`, `state`, `tables` — bookkeeping.

mod capture;
mod commit_points;
mod conflicts;
mod ddl;
mod guard;
mod merge;
mod reader;
mod schema;
mod snapshot;
pub mod stream_vfs;
mod tombstones;
mod verify;

use std::collections::BTreeMap;
use std::path::Path;

use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior};

pub use capture::{cleanup, install, table_id, CaptureOptions, WALL_CLOCK_MS};
pub use commit_points::{CommitPoints, BATCH_ROWS_MAX, COMMIT_POINTS_MAX};
pub use conflicts::{Conflict, ConflictFilter, CONFLICTS_STEP_ROWS};
pub use merge::ApplyOutcome;
pub use reader::SqliteChangeSource;
pub use schema::{
    pk_key, quote, Collation, Schema, SkippedTable, TableInfo, TableSelection, UniqueIndex, EXCLUDED_REASON, PREFIX,
};
pub use snapshot::{checksum_file, Progress, SnapshotFile};
pub use tombstones::COLLECT_STEP_ROWS;
pub use verify::{BucketRow, Digests, TableDigest, DIGEST_BUCKETS};

use crate::error::{Error, Result, SqlContext};
use crate::model::{Hlc, NodeId, Position, Shard, Value, Version};

/// Busy timeout of Marmot's connections: how long a write waits for the application's.
pub const BUSY_TIMEOUT_MS: u64 = 5_000;

/// Waits for the application's write lock in short steps (SQLite's default handler sleeps
/// up to 100 ms at a time, which shows up directly as replication lag), giving up after
/// about [`BUSY_TIMEOUT_MS`].
fn retry_when_busy(attempt: i32) -> bool {
    const QUICK_ATTEMPTS: i32 = 200;
    let waited_ms = match attempt {
        a if a < QUICK_ATTEMPTS => a as u64 / 10,
        a => (QUICK_ATTEMPTS / 10) as u64 + (a - QUICK_ATTEMPTS) as u64,
    };
    if waited_ms >= BUSY_TIMEOUT_MS {
        return false;
    }
    let pause = if attempt < QUICK_ATTEMPTS { 100 } else { 1000 };
    std::thread::sleep(std::time::Duration::from_micros(pause));
    true
}

/// One connection to a replicated database, with capture installed.
pub struct Db {
    conn: Connection,
    node: NodeId,
    opts: CaptureOptions,
    schema: Schema,
    /// `__marmot__tables` id → index into `schema.tables`.
    ids: BTreeMap<i64, usize>,
    /// `__marmot__tables` id → columns the table had and dropped here.
    dropped: BTreeMap<i64, Vec<String>>,
    /// `__marmot__tables` id → former column names → current names.
    renamed: BTreeMap<i64, BTreeMap<String, String>>,
    /// The schema's fingerprint (see [`Db::schema_fingerprint`]).
    fingerprint: u64,
    schema_version: i64,
    generation: u64,
    /// The WAL checkpoint a restore left running on its own connection.
    checkpoint: Option<std::thread::JoinHandle<Result<()>>>,
    /// Run once by the next restore right after its copy commits (the simulation commits
    /// an application write there, where a real application may).
    after_restore_copy: Option<Box<dyn FnOnce() + Send>>,
    /// The pending log as the reader last scanned it to cut a backlog.
    scan_cache: std::cell::RefCell<reader::ScanCache>,
}

impl Db {
    /// Opens `path` (which must exist), sets Marmot's connection settings and installs
    /// capture.
    pub fn open(path: &Path, node: NodeId, opts: CaptureOptions) -> Result<Db> {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags).ctx(|| format!("opening {}", path.display()))?;
        Db::with_connection(conn, node, opts)
    }

    /// Wraps an open connection, sets Marmot's connection settings and installs capture.
    pub fn with_connection(conn: Connection, node: NodeId, opts: CaptureOptions) -> Result<Db> {
        if node.0 == 0 {
            return Err(Error::Database("node id 0 is reserved".into()));
        }
        conn.busy_handler(Some(retry_when_busy)).ctx(|| "setting busy handler".into())?;
        conn.execute_batch("PRAGMA foreign_keys = OFF; PRAGMA synchronous = NORMAL;")
            .ctx(|| "setting connection pragmas".into())?;
        let mut db = Db {
            conn,
            node,
            opts,
            schema: Schema::default(),
            ids: BTreeMap::new(),
            dropped: BTreeMap::new(),
            renamed: BTreeMap::new(),
            fingerprint: 0,
            schema_version: -1,
            generation: 0,
            checkpoint: None,
            after_restore_copy: None,
            scan_cache: Default::default(),
        };
        db.reinstall()?;
        Ok(db)
    }

    /// Re-installs capture and re-reads the schema.
    pub fn reinstall(&mut self) -> Result<()> {
        // The first install of this connection notices what changed while no Marmot ran.
        let changed = if self.generation == 0 { capture::Changed::Offline } else { capture::Changed::Here };
        self.schema = capture::install_as(&self.conn, self.node, &self.opts, changed)?;
        self.ids.clear();
        for (i, t) in self.schema.tables.iter().enumerate() {
            let id = table_id(&self.conn, &t.name)?;
            self.ids.insert(id, i);
        }
        self.dropped = capture::dropped_columns(&self.conn)?;
        self.renamed = ddl::renamed_columns(&self.conn)?;
        self.fingerprint = ddl::fingerprint(&ddl::current_objects(&self.conn, &capture::shadow_tables(&self.schema))?);
        guard::install(&self.conn, &self.schema, |name| self.id_of(name))?;
        self.schema_version = self.read_schema_version()?;
        for (table, rows) in self.null_key_rows()? {
            tracing::warn!(table = %table, rows, "rows whose primary key holds NULL are not replicated \
                (nodes cannot tell such rows apart); give them a key or declare the key NOT NULL");
        }
        self.generation += 1;
        Ok(())
    }

    /// Per replicated table whose key may hold NULL, the number of rows whose key does (not
    /// replicated); tables without such rows are left out.
    pub fn null_key_rows(&self) -> Result<Vec<(String, u64)>> {
        null_key_rows(&self.conn, &self.schema)
    }

    /// Columns table `tbl` had here and dropped (remote values for them are left out).
    pub(crate) fn dropped_columns(&self, tbl: i64) -> &[String] {
        self.dropped.get(&tbl).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Former names of table `tbl`'s columns → their current names (remote rows from
    /// nodes that have not renamed them yet carry the former ones).
    pub(crate) fn renamed_columns(&self, tbl: i64) -> Option<&BTreeMap<String, String>> {
        self.renamed.get(&tbl)
    }

    /// A hash of the application's schema (every table, index, view and trigger with its
    /// SQL, Marmot's own objects left out): equal on two nodes exactly when their schemas
    /// are. Shown by `marmot status` and the metrics; carried by every published batch.
    pub fn schema_fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// The oldest schema change waiting to be published on the schema log: its queue id
    /// and the changes.
    pub fn next_schema_change(&self) -> Result<Option<(i64, crate::model::SchemaChanges)>> {
        ddl::next_queued(&self.conn)
    }

    /// Removes a schema change from the queue once it is published.
    pub fn schema_change_published(&self, id: i64) -> Result<()> {
        ddl::dequeue(&self.conn, id)
    }

    /// Number of schema changes waiting to be published.
    pub fn schema_changes_queued(&self) -> Result<u64> {
        ddl::queued(&self.conn)
    }

    /// Applies an entry of the schema log (read from `shard` at `position`, stored in the
    /// same transaction), after noticing this node's own unpublished schema changes (so
    /// they are queued, published later and win over this entry, as the log orders them).
    /// Returns notes on concurrent changes it resolved.
    pub fn apply_schema(
        &mut self,
        shard: Shard,
        position: Position,
        origin: NodeId,
        changes: &crate::model::SchemaChanges,
    ) -> Result<Vec<String>> {
        let notes = self.on_current_schema(|db| {
            let tx = db.immediate()?;
            db.check_schema()?;
            let version = Version { hlc: changes.hlc, node: origin };
            let notes = ddl::apply(&tx, &capture::shadow_tables(&db.schema), changes, version)?;
            capture::install_in(&tx, db.node, &db.opts, capture::Changed::Remotely(version))?;
            if position.0 > 0 {
                store_position(&tx, shard, position)?;
            }
            tx.commit().ctx(|| "committing a schema change".into())?;
            Ok(notes)
        })?;
        self.reinstall()?;
        Ok(notes)
    }

    /// Re-installs capture when the application changed the schema. Returns whether it did.
    pub fn refresh_if_schema_changed(&mut self) -> Result<bool> {
        if self.read_schema_version()? == self.schema_version {
            return Ok(false);
        }
        self.reinstall()?;
        Ok(true)
    }

    fn read_schema_version(&self) -> Result<i64> {
        self.conn.query_row("PRAGMA schema_version", [], |r| r.get(0)).ctx(|| "reading schema_version".into())
    }

    /// Runs `op` after reading the schema again if the application changed it, and again
    /// (a few times) while `op` reports [`Error::SchemaChanged`].
    pub(crate) fn on_current_schema<T>(&mut self, mut op: impl FnMut(&mut Db) -> Result<T>) -> Result<T> {
        const SCHEMA_RETRIES_MAX: usize = 3;
        let mut attempts = 0;
        loop {
            self.refresh_if_schema_changed()?;
            match op(self) {
                Err(Error::SchemaChanged) if attempts < SCHEMA_RETRIES_MAX => attempts += 1,
                other => return other,
            }
        }
    }

    /// Fails with [`Error::SchemaChanged`] when the schema seen by the transaction open on
    /// this connection is not the one capture was installed for: no log row is read,
    /// folded or published against a stale schema.
    pub(crate) fn check_schema(&self) -> Result<()> {
        if self.read_schema_version()? != self.schema_version {
            return Err(Error::SchemaChanged);
        }
        Ok(())
    }

    /// Increases each time capture is (re)installed after a schema change.
    pub fn schema_generation(&self) -> u64 {
        self.generation
    }

    /// The connection (for tests and tools).
    pub fn conn(&self) -> &Connection {
        &self.conn
    }

    /// This node's id.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// The replicated tables and the skipped ones.
    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// The tables this node's `[replication]` selection leaves out.
    pub fn excluded_tables(&self) -> Vec<&str> {
        let skipped = self.schema.skipped.iter();
        skipped.filter(|s| s.reason == schema::EXCLUDED_REASON).map(|s| s.name.as_str()).collect()
    }

    fn table_by_id(&self, id: i64) -> Option<&TableInfo> {
        self.ids.get(&id).map(|&i| &self.schema.tables[i])
    }

    fn id_of(&self, name: &str) -> Option<i64> {
        self.ids.iter().find(|(_, &i)| self.schema.tables[i].name == name).map(|(&id, _)| id)
    }

    pub(crate) fn immediate(&self) -> Result<rusqlite::Transaction<'_>> {
        rusqlite::Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate)
            .ctx(|| "beginning a write transaction".into())
    }

    /// The stored transport position of every shard (absent shards: 0).
    pub fn positions(&self) -> Result<BTreeMap<Shard, Position>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT shard, position FROM __marmot__positions")
            .ctx(|| "reading positions".into())?;
        let rows = stmt
            .query_map([], |r| Ok((Shard(r.get(0)?), Position(r.get::<_, i64>(1)? as u64))))
            .and_then(|rows| rows.collect())
            .ctx(|| "reading positions".into())?;
        Ok(rows)
    }

    /// The stored position of `shard`.
    pub fn position(&self, shard: Shard) -> Result<Position> {
        Ok(self.positions()?.get(&shard).copied().unwrap_or_default())
    }

    /// Until which position of `shard` this node's own batches are applied like remote
    /// ones: set after a snapshot restore, whose copy may predate this node's own recent
    /// changes that the stream still holds. Beyond it, own batches are skipped.
    pub fn own_replay_through(&self, shard: Shard) -> Result<Position> {
        Ok(Position(get_state(&self.conn, &format!("own_replay_through.{}", shard.0))?))
    }

    /// Sets [`own_replay_through`](Self::own_replay_through) for `shard`.
    pub fn set_own_replay_through(&self, shard: Shard, position: Position) -> Result<()> {
        set_state_max(&self.conn, &format!("own_replay_through.{}", shard.0), position.0)
    }

    /// The epoch ([`Bounds::epoch`](crate::Bounds)) of the log that this node's position
    /// for `shard` belongs to; 0 when not recorded yet.
    pub fn stream_epoch(&self, shard: Shard) -> Result<u64> {
        get_state(&self.conn, &format!("epoch.{}", shard.0))
    }

    /// Records the epoch of the log that `shard`'s position belongs to.
    pub fn set_stream_epoch(&self, shard: Shard, epoch: u64) -> Result<()> {
        set_state(&self.conn, &format!("epoch.{}", shard.0), epoch)
    }

    /// `shard`'s log was deleted and created again: its position starts over at 0 in the
    /// log of `epoch` (re-reading it whole; applying is idempotent). The own-replay point
    /// stays: after a restore it covers this node's own batches the copy lacks, and
    /// otherwise replaying own batches changes nothing.
    pub fn restart_shard(&self, shard: Shard, epoch: u64) -> Result<()> {
        let tx = self.immediate()?;
        tx.execute("UPDATE __marmot__positions SET position = 0 WHERE shard = ?1", [shard.0])
            .ctx(|| format!("resetting the position of shard {shard}"))?;
        set_state(&tx, &format!("epoch.{}", shard.0), epoch)?;
        tx.commit().ctx(|| "committing a shard restart".into())
    }

    /// Records that everything in `shard` up to `position` is processed.
    pub fn store_position(&self, shard: Shard, position: Position) -> Result<()> {
        store_position(&self.conn, shard, position)
    }

    /// Parks an entry that cannot be applied, with its error, and moves the position on,
    /// in one transaction.
    pub fn park(&self, shard: Shard, position: Position, error: &Error, bytes: &[u8]) -> Result<()> {
        let tx = self.immediate()?;
        tx.execute(
            "INSERT INTO __marmot__parked(shard, position, error, bytes) VALUES (?1, ?2, ?3, ?4)",
            (shard.0, position.0 as i64, error.to_string(), bytes),
        )
        .ctx(|| "parking a batch".into())?;
        if let Ok(batch) = crate::wire::decode_single(bytes) {
            let hlcs = batch.tables.iter().flat_map(|t| t.rows.iter().map(|r| r.hlc.0));
            if let (Some(lo), Some(hi)) = (hlcs.clone().min(), hlcs.max()) {
                let seen = get_state(&tx, &format!("seen.{}.{}", batch.origin.0, shard.0))?;
                conflicts::note_parked(&tx, tx.last_insert_rowid(), batch.origin, shard.0, (lo, hi), seen)?;
            }
        }
        store_position(&tx, shard, position)?;
        tx.commit().ctx(|| "committing a parked batch".into())
    }

    /// Remote row changes passed over because their table is not replicated here
    /// (`[replication]`), since the database was created.
    pub fn excluded_rows(&self) -> Result<u64> {
        get_state(&self.conn, "rows_excluded")
    }

    /// Number of parked batches.
    pub fn parked_count(&self) -> Result<u64> {
        self.conn
            .query_row("SELECT count(*) FROM __marmot__parked", [], |r| r.get::<_, i64>(0))
            .map(|n| n as u64)
            .ctx(|| "counting parked batches".into())
    }

    /// Parked batches as (id, error, bytes), oldest first.
    pub fn parked(&self) -> Result<Vec<(i64, String, Vec<u8>)>> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, error, bytes FROM __marmot__parked ORDER BY id")
            .ctx(|| "reading parked batches".into())?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .and_then(|rows| rows.collect())
            .ctx(|| "reading parked batches".into())?;
        Ok(rows)
    }

    /// Removes a parked batch (after it was applied on retry).
    pub fn unpark(&self, id: i64) -> Result<()> {
        let tx = self.immediate()?;
        tx.execute("DELETE FROM __marmot__parked WHERE id = ?1", [id]).ctx(|| "removing a parked batch".into())?;
        conflicts::forget_parked(&tx, id)?;
        tx.commit().ctx(|| "removing a parked batch".into())
    }

    /// The shard a parked batch came from.
    pub(crate) fn parked_shard(&self, id: i64) -> Result<Shard> {
        let shard: Option<u32> = self
            .conn
            .query_row("SELECT shard FROM __marmot__parked WHERE id = ?1", [id], |r| r.get(0))
            .optional()
            .ctx(|| "reading a parked batch".into())?;
        Ok(Shard(shard.unwrap_or(0)))
    }

    /// The clock: at least every version produced or applied here.
    pub fn clock(&self) -> Result<Hlc> {
        let clock: i64 = self
            .conn
            .query_row("SELECT hlc FROM __marmot__clock WHERE id = 0", [], |r| r.get(0))
            .ctx(|| "reading the clock".into())?;
        let log: Option<i64> = self
            .conn
            .query_row("SELECT max(hlc) FROM __marmot__log", [], |r| r.get(0))
            .ctx(|| "reading the log".into())?;
        Ok(Hlc(clock.max(log.unwrap_or(0)) as u64))
    }

    /// This node's wall clock in milliseconds, as the capture triggers read it.
    pub fn wall_ms(&self) -> Result<u64> {
        let sql = format!("SELECT {}", self.opts.time_ms_sql);
        self.conn.query_row(&sql, [], |r| r.get::<_, i64>(0)).map(|v| v.max(0) as u64).ctx(|| "reading the time".into())
    }

    /// How far ahead of the wall clock this node's clock is, in milliseconds (0 when not):
    /// a node whose clock ran ahead, or that applied changes from one, versions its next
    /// writes that far in the future.
    pub fn clock_ahead_ms(&self) -> Result<u64> {
        Ok(self.clock()?.millis().saturating_sub(self.wall_ms()?))
    }

    /// How far ahead of this node's wall clock the last remote batch applied was, in
    /// milliseconds (see [`ApplyOutcome::remote_ahead_ms`]).
    pub fn remote_ahead_ms(&self) -> Result<u64> {
        get_state(&self.conn, "remote_ahead_ms")
    }

    /// Since when (ms since the epoch) this node waits for a snapshot that covers what the
    /// streams dropped; 0 when it does not wait. Shown by `marmot status`.
    pub fn waiting_for_snapshot_since_ms(&self) -> Result<u64> {
        get_state(&self.conn, "waiting_for_snapshot_since_ms")
    }

    /// Records that this node waits for a snapshot since `since_ms` (0: no longer waits).
    pub fn set_waiting_for_snapshot_since_ms(&self, since_ms: u64) -> Result<()> {
        set_state(&self.conn, "waiting_for_snapshot_since_ms", since_ms)
    }

    /// The version stored for a row of `table` with primary key `pk`, and whether it is a
    /// tombstone.
    pub fn version_of(&self, table: &str, pk: &[Value]) -> Result<Option<(Version, bool)>> {
        let Some(id) = self.id_of(table) else { return Ok(None) };
        let info = self.table_by_id(id).expect("id maps to a table");
        version_of(&self.conn, id, &info.key(pk))
    }
}

/// The fingerprint of the application's schema in `conn` (see [`Db::schema_fingerprint`]).
pub fn schema_fingerprint(conn: &Connection) -> Result<u64> {
    let schema = Schema::read(conn)?;
    Ok(ddl::fingerprint(&ddl::current_objects(conn, &capture::shadow_tables(&schema))?))
}

/// Per table of `schema` whose key may hold NULL, the number of rows in `conn` whose key
/// does (those rows are not replicated); tables without such rows are left out.
pub fn null_key_rows(conn: &Connection, schema: &Schema) -> Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    for t in schema.tables.iter().filter(|t| t.pk_nullable) {
        let null: Vec<String> = t.pk.iter().map(|&i| format!("{} IS NULL", quote(&t.columns[i]))).collect();
        let sql = format!("SELECT count(*) FROM {} WHERE {}", quote(&t.name), null.join(" OR "));
        let n: i64 = conn.query_row(&sql, [], |r| r.get(0)).ctx(|| format!("counting NULL keys of {:?}", t.name))?;
        if n > 0 {
            out.push((t.name.clone(), n as u64));
        }
    }
    Ok(out)
}

fn get_state(conn: &Connection, key: &str) -> Result<u64> {
    conn.query_row("SELECT value FROM __marmot__state WHERE key = ?1", [key], |r| r.get::<_, i64>(0))
        .optional()
        .map(|v| v.unwrap_or(0) as u64)
        .ctx(|| format!("reading state {key}"))
}

fn set_state(conn: &Connection, key: &str, value: u64) -> Result<()> {
    conn.prepare_cached("INSERT OR REPLACE INTO __marmot__state(key, value) VALUES (?1, ?2)")
        .and_then(|mut s| s.execute((key, value as i64)))
        .map(|_| ())
        .ctx(|| format!("writing state {key}"))
}

fn add_state(conn: &Connection, key: &str, n: u64) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO __marmot__state(key, value) VALUES (?1, ?2) \
         ON CONFLICT(key) DO UPDATE SET value = value + excluded.value",
    )
    .and_then(|mut s| s.execute((key, n as i64)))
    .map(|_| ())
    .ctx(|| format!("counting {key}"))
}

fn set_state_max(conn: &Connection, key: &str, value: u64) -> Result<()> {
    conn.execute(
        "INSERT INTO __marmot__state(key, value) VALUES (?1, ?2) \
         ON CONFLICT(key) DO UPDATE SET value = max(value, excluded.value)",
        (key, value as i64),
    )
    .map(|_| ())
    .ctx(|| format!("writing state {key}"))
}

fn store_position(conn: &Connection, shard: Shard, position: Position) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO __marmot__positions(shard, position) VALUES (?1, ?2) \
         ON CONFLICT(shard) DO UPDATE SET position = max(position, excluded.position)",
    )
    .and_then(|mut s| s.execute((shard.0, position.0 as i64)))
    .map(|_| ())
    .ctx(|| format!("storing position of shard {shard}"))
}

fn version_of(conn: &Connection, tbl: i64, key: &[u8]) -> Result<Option<(Version, bool)>> {
    conn.prepare_cached("SELECT hlc, node, deleted FROM __marmot__versions WHERE tbl = ?1 AND pk = ?2")
        .and_then(|mut s| {
            s.query_row((tbl, key), |r| {
                let v = Version { hlc: Hlc(r.get::<_, i64>(0)? as u64), node: NodeId(r.get::<_, i64>(1)? as u64) };
                Ok((v, r.get::<_, bool>(2)?))
            })
            .optional()
        })
        .ctx(|| "reading a row version".into())
}

#[cfg(test)]
mod tests;
