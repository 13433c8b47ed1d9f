//! The merge: applying a remote batch, last-writer-wins per row, in one transaction.
//!
//! Per row the change with the greatest version wins; deletes leave versioned tombstones
//! in `__marmot__versions`. A secondary `UNIQUE` value goes to the highest version that
//! claims it: losing rows wait in `__marmot__aside` and come back when the value is free.
//! The resulting state depends only on the set of changes seen, never on their order.

use rusqlite::{Connection, OptionalExtension};
use tracing::warn;

use super::conflicts;
use super::schema::{quote, Collation, TableInfo};
use super::{get_state, set_state, set_state_max, store_position, version_of, Db};
use crate::error::{Error, Result, SqlContext};
use crate::model::{Batch, Hlc, Op, Position, Shard, TableChanges, Value, Version};

/// What applying a batch did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyOutcome {
    /// Row changes that won and were applied.
    pub applied: u64,
    /// Row changes skipped because the stored version was as new or newer.
    pub skipped: u64,
    /// Row changes skipped because their primary key holds NULL (not replicated).
    pub null_keys: u64,
    /// Row changes passed over because their table is not replicated here.
    pub excluded: u64,
    /// How far the batch's newest version is ahead of this node's wall clock, in
    /// milliseconds (0 when behind): the origin's clock skew plus the transit time.
    pub remote_ahead_ms: u64,
}

/// Most log rows one of Marmot's own write transactions folds or deletes: a few tens of
/// milliseconds of the write lock (docs/operations.md).
pub const WRITE_SLICE_ROWS: i64 = 10_000;

/// Most log rows one step of cleaning in the node loop folds or deletes: about a
/// millisecond of the write lock, so the application's commits never wait long behind it
/// (10,000-row steps delayed them by 10–25 ms, measured by the throughput benchmark).
pub const CLEAN_STEP_ROWS: i64 = 1_000;

/// Upper bound on placement rounds when returning set-aside rows, per table.
const RECONCILE_ROUNDS_MAX: usize = 100_000;

/// A row image: local column index and value.
pub(crate) type Image = Vec<(usize, Value)>;

/// Which writes of a batch the conflict journal judges.
#[derive(Clone, Copy)]
enum Judging {
    /// All of them.
    Whole,
    /// Those above the greatest version applied from its origin on its shard (a batch read
    /// from the stream).
    Entry,
    /// Those of parked batch `id` not judged before it was parked or since.
    Parked(i64),
}

impl Db {
    /// Applies `batch`, read from `shard` at `position`, in one transaction that also
    /// stores `position`. A batch of this node's own changes only moves the position.
    /// On [`Error::SchemaMismatch`] nothing is applied (the caller parks the batch).
    /// `crash_after_rows` injects a crash before commit (simulation only).
    pub fn apply_batch(
        &mut self,
        shard: Shard,
        position: Position,
        batch: &Batch,
        crash_after_rows: Option<u64>,
    ) -> Result<ApplyOutcome> {
        self.on_current_schema(|db| db.apply_batch_once(shard, position, Judging::Whole, batch, crash_after_rows))
    }

    /// [`apply_batch`](Self::apply_batch) for a batch read from the stream. The stream may
    /// deliver a batch again (a reconnect, a restart, a log created again and republished
    /// to, a restore from a copy that held it): applying it again changes nothing, and the
    /// conflict journal must not judge its writes again. An origin publishes its changes to
    /// a shard in increasing version order, so each node keeps, per origin and shard, the
    /// greatest version it has applied (`seen.<origin>.<shard>`; a restored copy brings
    /// its saver's), and the journal judges only writes above it. A batch applied through
    /// [`apply_batch`](Self::apply_batch) (a parked one, retried) is judged whole.
    pub fn apply_entry(
        &mut self,
        shard: Shard,
        position: Position,
        batch: &Batch,
        crash_after_rows: Option<u64>,
    ) -> Result<ApplyOutcome> {
        self.on_current_schema(|db| db.apply_batch_once(shard, position, Judging::Entry, batch, crash_after_rows))
    }

    /// Applies the parked batch `id` (decoded: `batch`), which now fits the schema. Its
    /// writes up to what had been applied from its origin when it was parked were judged
    /// then (the stream had delivered them before, in another entry); the rest are judged
    /// now.
    pub fn apply_parked(&mut self, id: i64, batch: &Batch) -> Result<ApplyOutcome> {
        let shard = self.parked_shard(id)?;
        self.on_current_schema(|db| db.apply_batch_once(shard, Position(0), Judging::Parked(id), batch, None))
    }

    fn apply_batch_once(
        &mut self,
        shard: Shard,
        position: Position,
        judging: Judging,
        batch: &Batch,
        crash_after_rows: Option<u64>,
    ) -> Result<ApplyOutcome> {
        let tx = self.immediate()?;
        // Notes of rows a REPLACE might displace, left by an application write that was
        // ignored, must not make a row this batch deletes look displaced later.
        tx.execute_batch("UPDATE __marmot__clock SET applying = 1 WHERE id = 0; DELETE FROM __marmot__displaced;")
            .ctx(|| "marking apply".into())?;
        self.fold_local(&tx)?;
        let mut out = ApplyOutcome::default();
        let seen_key = format!("seen.{}.{}", batch.origin.0, shard.0);
        let except = match judging {
            Judging::Parked(id) => Some(id),
            _ => None,
        };
        // The versions of this batch the conflict journal judges: (above, through].
        let judged = match self.opts.conflicts {
            false => None,
            true => {
                let (above, judged_before) = match judging {
                    Judging::Whole => (0, Vec::new()),
                    Judging::Entry => (get_state(&tx, &seen_key)?, Vec::new()),
                    Judging::Parked(id) => conflicts::parked_judged(&tx, id)?,
                };
                Some(conflicts::Judged {
                    above,
                    unjudged: conflicts::unjudged_parked(&tx, batch.origin, shard.0, except)?,
                    // This node's own changes made on this database (after its first
                    // install or its last restore) are nothing new to it; older ones come
                    // back like remote ones.
                    through: match batch.origin == self.node {
                        true => get_state(&tx, "lineage_hlc")?,
                        false => u64::MAX,
                    },
                    // Changes a restored copy held (its stored positions may be short of
                    // their entries) are nothing new either, nor those of a parked batch
                    // that later entries carried.
                    known: [conflicts::known(&tx, batch.origin)?, judged_before].concat(),
                    aside: conflicts::set_aside(&tx)?,
                })
            }
        };
        if batch.origin != self.node || position <= self.own_replay_through(shard)? {
            for tc in &batch.tables {
                self.apply_table(&tx, batch, tc, judged.as_ref(), &mut out, crash_after_rows)?;
            }
            if out.excluded > 0 {
                tx.execute(
                    "INSERT INTO __marmot__state(key, value) VALUES ('rows_excluded', ?1) \
                     ON CONFLICT(key) DO UPDATE SET value = value + excluded.value",
                    [out.excluded as i64],
                )
                .ctx(|| "counting excluded rows".into())?;
            }
            if let Some(max) = batch.max_hlc() {
                tx.execute("UPDATE __marmot__clock SET hlc = max(hlc, ?1) WHERE id = 0", [max.0 as i64])
                    .ctx(|| "raising the clock".into())?;
                set_state_max(&tx, &seen_key, max.0)?;
                // Every write of the origin's from this batch's first to its last is judged
                // now: those below the mark were before, those parked unjudged here.
                if let (Some(_), Some(min)) = (&judged, batch.min_hlc()) {
                    conflicts::note_judged(&tx, batch.origin, shard.0, (min.0 - 1, max.0), except)?;
                }
                if batch.origin != self.node {
                    out.remote_ahead_ms = max.millis().saturating_sub(self.wall_ms()?);
                    set_state(&tx, "remote_ahead_ms", out.remote_ahead_ms)?;
                }
            }
        }
        if let Some(p) = Some(position).filter(|p| p.0 > 0) {
            store_position(&tx, shard, p)?;
        }
        tx.execute_batch("UPDATE __marmot__clock SET applying = 0 WHERE id = 0").ctx(|| "ending apply".into())?;
        tx.commit().ctx(|| "committing a batch".into())?;
        Ok(out)
    }

    fn apply_table(
        &self,
        conn: &Connection,
        batch: &Batch,
        tc: &TableChanges,
        judged: Option<&conflicts::Judged>,
        out: &mut ApplyOutcome,
        crash_after_rows: Option<u64>,
    ) -> Result<()> {
        let mismatch = |detail: String| Error::SchemaMismatch { table: tc.table.clone(), detail };
        if !self.opts.selection.selects(&tc.table) {
            out.excluded += tc.rows.len() as u64;
            return Ok(());
        }
        let tid = self.id_of(&tc.table).ok_or_else(|| mismatch("no such table here".into()))?;
        let info = self.table_by_id(tid).expect("id maps to a table");
        // Remote column i → local column; None for a column this node dropped (its origin
        // has not dropped it yet): its values are left out. A column never seen here parks
        // the batch until this node has it.
        let dropped = self.dropped_columns(tid);
        let renamed = self.renamed_columns(tid);
        let local = |c: &String| {
            info.column_index(c).or_else(|| renamed.and_then(|m| m.get(c)).and_then(|n| info.column_index(n)))
        };
        let remote: Vec<Option<usize>> = tc
            .columns
            .iter()
            .map(|c| match local(c) {
                Some(i) => Ok(Some(i)),
                None if dropped.contains(c) => Ok(None),
                None => Err(mismatch(format!("no column {c:?} here"))),
            })
            .collect::<Result<_>>()?;
        let remote_pk: Vec<Option<usize>> = tc.pk.iter().map(|&i| remote[i]).collect();
        if remote_pk.iter().copied().collect::<Option<Vec<usize>>>().as_ref() != Some(&info.pk) {
            return Err(mismatch("primary key columns differ".into()));
        }
        let map: Vec<usize> = remote.iter().flatten().copied().collect();
        let upsert = upsert_sql(info, &map);
        let mut aside_any = has_aside(conn, tid)?;
        for row in &tc.rows {
            if crash_after_rows.is_some_and(|n| out.applied + out.skipped >= n) {
                return Err(Error::InjectedCrash("apply: before commit"));
            }
            let pk: Vec<Value> = tc.pk.iter().map(|&i| row.values[i].clone()).collect();
            if pk.iter().any(Value::is_null) {
                out.null_keys += 1;
                continue;
            }
            let key = info.key(&pk);
            let v = Version { hlc: row.hlc, node: batch.origin };
            let held = version_of(conn, tid, &key)?;
            if let Some(judged) = judged.filter(|j| j.judges(row.hlc)) {
                let image = || {
                    (row.op == Op::Upsert).then(|| {
                        let mut values = vec![Value::Null; info.columns.len()];
                        for (local, value) in remote.iter().zip(&row.values) {
                            if let Some(i) = local {
                                values[*i] = value.clone();
                            }
                        }
                        values
                    })
                };
                let write = conflicts::Write { version: v, base: row.base, image: &image };
                let target = conflicts::RowRef { t: info, tbl: tid, key: &key, pk: &pk };
                // This node's changes set aside are never published themselves, but one kept
                // is published again as a newer change with the base it had: an older write
                // loses to it; a newer one overwrites it here and the row's published
                // history goes on from that base.
                let mine_set_aside = |h: Version| h.node == self.node && conflicts::within(&judged.aside, h.hlc.0);
                let judged_held = match held {
                    Some((h, deleted)) if mine_set_aside(h) && h < v => {
                        let published = super::get_state(conn, "published_hlc")?;
                        self.base_of_pending(conn, h.hlc, None, u64::MAX, published)?.map(|b| (b, deleted))
                    }
                    other => other,
                };
                conflicts::on_write(conn, &target, judged_held, &write)?;
            }
            if held.is_some_and(|(cur, _)| cur >= v) {
                out.skipped += 1;
                continue;
            }
            set_version(conn, tid, &key, v, row.op == Op::Delete)?;
            match row.op {
                Op::Delete => {
                    delete_row(conn, info, tid, &pk)?;
                    if aside_any {
                        remove_aside(conn, tid, &key)?;
                    }
                }
                Op::Upsert => {
                    let image: Image = remote
                        .iter()
                        .zip(row.values.iter())
                        .filter_map(|(local, v)| local.map(|i| (i, v.clone())))
                        .collect();
                    let target = Placement { tbl: tid, key: &key, pk: &pk, version: v, upsert_sql: &upsert };
                    place(conn, info, &target, &image, &mut aside_any)?;
                }
            }
            out.applied += 1;
        }
        if aside_any {
            reconcile_table(conn, info, tid)?;
        }
        Ok(())
    }

    /// Moves versions of new local changes from the log into `__marmot__versions`, so the
    /// merge compares remote changes with local ones. Runs inside the caller's write
    /// transaction.
    pub(crate) fn fold_local(&self, conn: &Connection) -> Result<()> {
        self.fold_local_limited(conn, -1).map(|_| ())
    }

    /// Folds at most `limit` log rows (all when negative); returns whether rows are left.
    pub(crate) fn fold_local_limited(&self, conn: &Connection, limit: i64) -> Result<bool> {
        self.check_schema()?;
        let folded = get_state(conn, "folded_hlc")?;
        let published = get_state(conn, "published_hlc")?;
        // Read at the first change folded at or below the published point (a merge mostly
        // folds none).
        let mut aside = None;
        let mut stmt = conn
            .prepare_cached("SELECT * FROM __marmot__log WHERE hlc > ?1 ORDER BY hlc LIMIT ?2")
            .ctx(|| "reading the log to fold".into())?;
        let mut rows = stmt.query((folded as i64, limit)).ctx(|| "reading the log to fold".into())?;
        let mut last = folded;
        let mut n = 0i64;
        while let Some(r) = rows.next().ctx(|| "folding".into())? {
            n += 1;
            let hlc = r.get::<_, i64>(0).ctx(|| "folding".into())? as u64;
            let tbl: i64 = r.get(1).ctx(|| "folding".into())?;
            let op: i64 = r.get(2).ctx(|| "folding".into())?;
            last = hlc;
            let Some(info) = self.table_by_id(tbl) else { continue };
            let pk: Vec<Value> = (0..info.pk.len())
                .map(|n| r.get_ref(3 + n).map(Value::from))
                .collect::<rusqlite::Result<_>>()
                .ctx(|| "folding".into())?;
            if pk.iter().any(Value::is_null) {
                continue;
            }
            let key = info.key(&pk);
            let v = Version { hlc: Hlc(hlc), node: self.node };
            let noted = self.opts.conflicts
                && (hlc > published || {
                    let ranges = match &aside {
                        Some(ranges) => ranges,
                        None => aside.insert(conflicts::set_aside(conn)?),
                    };
                    conflicts::within(ranges, hlc)
                });
            if noted {
                conflicts::note_folded(conn, Hlc(hlc), version_of(conn, tbl, &key)?.map(|(prev, _)| prev))?;
            }
            set_version(conn, tbl, &key, v, op == 1)?;
            remove_aside(conn, tbl, &key)?;
        }
        drop(rows);
        drop(stmt);
        set_state_max(conn, "folded_hlc", last)?;
        Ok(limit >= 0 && n == limit)
    }

    /// Folds every local change not folded yet, at most [`WRITE_SLICE_ROWS`] per write
    /// transaction, so that a large backlog (the application wrote while Marmot was
    /// stopped) never holds the write lock long. Returns how many slices it took.
    pub fn fold_in_slices(&self) -> Result<u64> {
        let mut slices = 0;
        loop {
            let tx = self.immediate()?;
            let more = self.fold_local_limited(&tx, WRITE_SLICE_ROWS)?;
            tx.commit().ctx(|| "committing a fold".into())?;
            slices += 1;
            if !more {
                return Ok(slices);
            }
        }
    }

    /// Returns set-aside rows whose unique values became free (after local deletes or
    /// updates). Cheap when nothing is set aside.
    pub fn reconcile(&self) -> Result<bool> {
        let any: bool = self
            .conn
            .query_row("SELECT EXISTS (SELECT 1 FROM __marmot__aside)", [], |r| r.get(0))
            .ctx(|| "checking set-aside rows".into())?;
        if !any {
            return Ok(false);
        }
        let tx = self.immediate()?;
        tx.execute_batch("UPDATE __marmot__clock SET applying = 1 WHERE id = 0").ctx(|| "marking apply".into())?;
        self.fold_local(&tx)?;
        for (&tid, &i) in &self.ids {
            if has_aside(&tx, tid)? {
                reconcile_table(&tx, &self.schema.tables[i], tid)?;
            }
        }
        tx.execute_batch("UPDATE __marmot__clock SET applying = 0 WHERE id = 0").ctx(|| "ending apply".into())?;
        tx.commit().ctx(|| "committing reconcile".into())?;
        Ok(true)
    }

    /// Number of rows set aside by unique conflicts.
    pub fn aside_count(&self) -> Result<u64> {
        self.conn
            .query_row("SELECT count(*) FROM __marmot__aside", [], |r| r.get::<_, i64>(0))
            .map(|n| n as u64)
            .ctx(|| "counting set-aside rows".into())
    }
}

fn set_version(conn: &Connection, tbl: i64, key: &[u8], v: Version, deleted: bool) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO __marmot__versions(tbl, pk, hlc, node, deleted) VALUES (?1, ?2, ?3, ?4, ?5) \
         ON CONFLICT(tbl, pk) DO UPDATE SET hlc = excluded.hlc, node = excluded.node, \
         deleted = excluded.deleted",
    )
    .and_then(|mut s| s.execute((tbl, key, v.hlc.0 as i64, v.node.0 as i64, deleted)))
    .map(|_| ())
    .ctx(|| "storing a row version".into())
}

fn has_aside(conn: &Connection, tbl: i64) -> Result<bool> {
    conn.prepare_cached("SELECT EXISTS (SELECT 1 FROM __marmot__aside WHERE tbl = ?1)")
        .and_then(|mut s| s.query_row([tbl], |r| r.get(0)))
        .ctx(|| "checking set-aside rows".into())
}

fn remove_aside(conn: &Connection, tbl: i64, key: &[u8]) -> Result<()> {
    conn.prepare_cached("DELETE FROM __marmot__aside WHERE tbl = ?1 AND pk = ?2")
        .and_then(|mut s| s.execute((tbl, key)))
        .map(|_| ())
        .ctx(|| "removing a set-aside row".into())
}

fn put_aside(conn: &Connection, t: &TableInfo, tbl: i64, key: &[u8], v: Version, image: &Image) -> Result<()> {
    let named: Vec<(&str, &Value)> = image.iter().map(|(i, val)| (t.columns[*i].as_str(), val)).collect();
    let mut blob = Vec::new();
    ciborium::into_writer(&named, &mut blob).expect("CBOR into a Vec");
    conn.prepare_cached("INSERT OR REPLACE INTO __marmot__aside(tbl, pk, hlc, node, image) VALUES (?1, ?2, ?3, ?4, ?5)")
        .and_then(|mut s| s.execute((tbl, key, v.hlc.0 as i64, v.node.0 as i64, blob)))
        .map(|_| ())
        .ctx(|| format!("setting aside a row of {:?}", t.name))
}

fn pk_where(t: &TableInfo, first_param: usize) -> String {
    t.pk.iter()
        .zip(&t.pk_collations)
        .enumerate()
        .map(|(n, (&i, c))| format!("{} IS ?{} COLLATE {}", quote(&t.columns[i]), first_param + n, c.sql()))
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// Runs `write`, a write of the merge to row `pk` of table `t` (id `tbl`), through the
/// guard triggers (see [`super::guard`]). For a table with application triggers the guard
/// is armed with that row first, so the write goes through and every write those triggers
/// make to replicated tables is skipped; afterwards, and for tables without application
/// triggers (nothing else can write while they are written), the guard stands idle.
fn guarded<T>(
    conn: &Connection,
    t: &TableInfo,
    tbl: i64,
    pk: &[Value],
    write: impl FnOnce() -> Result<T>,
) -> Result<T> {
    if !t.has_app_triggers {
        return write();
    }
    let sets: String = (0..pk.len()).map(|n| format!(", k{n} = ?{}", n + 2)).collect();
    let sql = format!("UPDATE temp.__marmot__arm SET tbl = ?1{sets}");
    conn.prepare_cached(&sql)
        .and_then(|mut s| s.execute(rusqlite::params_from_iter(std::iter::once(&Value::Integer(tbl)).chain(pk))))
        .ctx(|| "arming the merge's write".into())?;
    let out = write();
    conn.prepare_cached("UPDATE temp.__marmot__arm SET tbl = NULL")
        .and_then(|mut s| s.execute([]))
        .ctx(|| "idling the apply guard".into())?;
    out
}

fn delete_row(conn: &Connection, t: &TableInfo, tbl: i64, pk: &[Value]) -> Result<()> {
    let sql = format!("DELETE FROM {} WHERE {}", quote(&t.name), pk_where(t, 1));
    guarded(conn, t, tbl, pk, || {
        conn.prepare_cached(&sql)
            .and_then(|mut s| s.execute(rusqlite::params_from_iter(pk)))
            .map(|_| ())
            .ctx(|| format!("deleting a row of {:?}", t.name))
    })
}

pub(crate) fn read_image(conn: &Connection, t: &TableInfo, pk: &[Value]) -> Result<Option<Image>> {
    let cols: Vec<String> = t.columns.iter().map(|c| quote(c)).collect();
    let sql = format!("SELECT {} FROM {} WHERE {}", cols.join(", "), quote(&t.name), pk_where(t, 1));
    conn.prepare_cached(&sql)
        .and_then(|mut s| {
            s.query_row(rusqlite::params_from_iter(pk), |r| {
                (0..t.columns.len()).map(|i| Ok((i, Value::from(r.get_ref(i)?)))).collect()
            })
            .optional()
        })
        .ctx(|| format!("reading a row of {:?}", t.name))
}

/// The upsert statement for an image carrying the columns `cols` (local indexes), built once
/// per table and batch rather than per row.
///
/// The key columns are written too: the winning image's key bytes are the row's, also
/// when the stored key is equal but spelled differently (`'Bob'` for `'bob'` under
/// NOCASE). `OR ABORT` overrides a constraint's own `ON CONFLICT REPLACE`, so the merge
/// never deletes a row behind its own back.
fn upsert_sql(t: &TableInfo, cols: &[usize]) -> String {
    let names: Vec<String> = cols.iter().map(|&i| quote(&t.columns[i])).collect();
    let params: Vec<String> = (1..=cols.len()).map(|n| format!("?{n}")).collect();
    let target: Vec<String> =
        t.pk.iter()
            .zip(&t.pk_collations)
            .map(|(&i, c)| match c {
                Collation::Binary => quote(&t.columns[i]),
                c => format!("{} COLLATE {}", quote(&t.columns[i]), c.sql()),
            })
            .collect();
    let mut sets: Vec<String> = cols
        .iter()
        .filter(|i| !t.key_is_rowid || !t.pk.contains(i))
        .map(|&i| format!("{0} = excluded.{0}", quote(&t.columns[i])))
        .collect();
    // Columns the origin does not have yet take the value the origin will give them when
    // it adds them, so the row ends the same everywhere: the winning image is the row.
    for (i, absent) in t.absent.iter().enumerate() {
        if let Some(value) = absent.as_ref().filter(|_| !cols.contains(&i) && !t.pk.contains(&i)) {
            sets.push(format!("{} = {value}", quote(&t.columns[i])));
        }
    }
    let action = if sets.is_empty() { "NOTHING".to_owned() } else { format!("UPDATE SET {}", sets.join(", ")) };
    format!(
        "INSERT OR ABORT INTO {} ({}) VALUES ({}) ON CONFLICT ({}) DO {action}",
        quote(&t.name),
        names.join(", "),
        params.join(", "),
        target.join(", ")
    )
}

fn upsert_row(conn: &Connection, t: &TableInfo, tbl: i64, sql: &str, pk: &[Value], image: &Image) -> Result<()> {
    let n = guarded(conn, t, tbl, pk, || {
        conn.prepare_cached(sql)
            .and_then(|mut s| s.execute(rusqlite::params_from_iter(image.iter().map(|(_, v)| v))))
            .ctx(|| format!("writing a row of {:?}", t.name))
    })?;
    if n == 0 && !sql.ends_with("DO NOTHING") {
        // The guard skipped the merge's own write: it must never do so silently.
        return Err(Error::Database(format!("the apply guard skipped a write to {:?}", t.name)));
    }
    Ok(())
}

/// Whether `image` is in the partial index whose `WHERE` clause is `predicate`, evaluated
/// on the image's values (columns it lacks are NULL).
fn image_indexed(conn: &Connection, t: &TableInfo, predicate: &str, image: &Image) -> Result<bool> {
    let cols: Vec<String> = t
        .columns
        .iter()
        .enumerate()
        .map(|(i, c)| match image.iter().position(|(k, _)| *k == i) {
            Some(n) => format!("?{} AS {}", n + 1, quote(c)),
            None => format!("NULL AS {}", quote(c)),
        })
        .collect();
    // The clause ends on its own line: it may end in a `--` comment.
    let sql = format!("SELECT EXISTS (SELECT 1 FROM (SELECT {}) WHERE ({predicate}\n))", cols.join(", "));
    conn.prepare_cached(&sql)
        .and_then(|mut s| s.query_row(rusqlite::params_from_iter(image.iter().map(|(_, v)| v)), |r| r.get(0)))
        .ctx(|| format!("evaluating a partial index of {:?}", t.name))
}

/// Rows (by primary key) other than `pk` that hold a unique value `image` claims, as
/// SQLite compares them: with each index's collations, within a partial index's `WHERE`.
fn conflicts(conn: &Connection, t: &TableInfo, pk: &[Value], image: &Image) -> Result<Vec<Vec<Value>>> {
    let mut out: Vec<Vec<Value>> = Vec::new();
    let own = t.key(pk);
    for u in &t.unique {
        let vals: Option<Vec<&Value>> =
            u.columns.iter().map(|c| image.iter().find(|(i, _)| i == c).map(|(_, v)| v)).collect();
        let Some(vals) = vals.filter(|v| v.iter().all(|x| !x.is_null())) else { continue };
        if let Some(p) = &u.predicate {
            if !image_indexed(conn, t, p, image)? {
                continue;
            }
        }
        let mut conds: Vec<String> = u
            .columns
            .iter()
            .zip(&u.collations)
            .enumerate()
            .map(|(n, (&c, coll))| format!("{} = ?{} COLLATE {}", quote(&t.columns[c]), n + 1, coll.sql()))
            .collect();
        conds.extend(u.predicate.iter().map(|p| format!("({p}\n)")));
        let pk_cols: Vec<String> = t.pk.iter().map(|&i| quote(&t.columns[i])).collect();
        let sql = format!("SELECT {} FROM {} WHERE {}", pk_cols.join(", "), quote(&t.name), conds.join(" AND "));
        let mut stmt = conn.prepare_cached(&sql).ctx(|| format!("checking unique {:?}", u.name))?;
        let rows: Vec<Vec<Value>> = stmt
            .query_map(rusqlite::params_from_iter(vals), |r| {
                (0..t.pk.len()).map(|i| Ok(Value::from(r.get_ref(i)?))).collect()
            })
            .and_then(|rows| rows.collect())
            .ctx(|| format!("checking unique {:?}", u.name))?;
        for r in rows {
            if t.key(&r) != own && !out.contains(&r) {
                out.push(r);
            }
        }
    }
    Ok(out)
}

/// The row a winning image belongs to.
struct Placement<'a> {
    tbl: i64,
    key: &'a [u8],
    pk: &'a [Value],
    version: Version,
    /// [`upsert_sql`] for the image's columns.
    upsert_sql: &'a str,
}

/// Puts the winning image of a row in place: into the table, displacing lower-version
/// holders of its unique values, or aside if a higher version holds one. `aside_any` says
/// whether the table may have set-aside rows (kept up to date). Returns whether the row is
/// now in the table.
fn place(conn: &Connection, t: &TableInfo, p: &Placement<'_>, image: &Image, aside_any: &mut bool) -> Result<bool> {
    let (tbl, key, pk, v) = (p.tbl, p.key, p.pk, p.version);
    let mut losers = Vec::new();
    for q in conflicts(conn, t, pk, image)? {
        let qkey = t.key(&q);
        let qv = version_of(conn, tbl, &qkey)?.map(|(v, _)| v).unwrap_or_default();
        if qv > v {
            delete_row(conn, t, tbl, pk)?;
            put_aside(conn, t, tbl, key, v, image)?;
            *aside_any = true;
            return Ok(false);
        }
        losers.push((q, qkey, qv));
    }
    for (q, qkey, qv) in losers {
        if let Some(qimage) = read_image(conn, t, &q)? {
            put_aside(conn, t, tbl, &qkey, qv, &qimage)?;
            *aside_any = true;
        }
        delete_row(conn, t, tbl, &q)?;
    }
    if *aside_any {
        remove_aside(conn, tbl, key)?;
    }
    upsert_row(conn, t, tbl, p.upsert_sql, pk, image)?;
    Ok(true)
}

struct AsideRow {
    key: Vec<u8>,
    version: Version,
    image: Vec<(String, Value)>,
}

/// A set-aside row's image: `[column name, value]` pairs (see [`put_aside`]).
pub(crate) fn decode_aside_image(blob: &[u8]) -> Result<Vec<(String, Value)>> {
    ciborium::from_reader(blob).map_err(|e| Error::Corrupt(format!("set-aside image: {e}")))
}

fn aside_rows(conn: &Connection, tbl: i64) -> Result<Vec<AsideRow>> {
    let mut stmt = conn
        .prepare_cached("SELECT pk, hlc, node, image FROM __marmot__aside WHERE tbl = ?1 ORDER BY hlc DESC, node DESC")
        .ctx(|| "reading set-aside rows".into())?;
    let rows: Vec<(Vec<u8>, i64, i64, Vec<u8>)> = stmt
        .query_map([tbl], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .and_then(|rows| rows.collect())
        .ctx(|| "reading set-aside rows".into())?;
    rows.into_iter()
        .map(|(key, hlc, node, blob)| {
            let image = decode_aside_image(&blob)?;
            let version = Version { hlc: Hlc(hlc as u64), node: crate::model::NodeId(node as u64) };
            Ok(AsideRow { key, version, image })
        })
        .collect()
}

/// Returns set-aside rows to the table while one fits: the highest version first.
/// Ends in the unique stable state (no set-aside row could take its place), which is what
/// makes the outcome independent of arrival order.
fn reconcile_table(conn: &Connection, t: &TableInfo, tbl: i64) -> Result<()> {
    for _ in 0..RECONCILE_ROUNDS_MAX {
        let mut placed_one = false;
        for row in aside_rows(conn, tbl)? {
            let current = version_of(conn, tbl, &row.key)?;
            if current != Some((row.version, false)) {
                remove_aside(conn, tbl, &row.key)?;
                continue;
            }
            let image: Image =
                row.image.iter().filter_map(|(c, v)| t.column_index(c).map(|i| (i, v.clone()))).collect();
            let pk: Vec<Value> =
                t.pk.iter()
                    .map(|&i| image.iter().find(|(c, _)| *c == i).map(|(_, v)| v.clone()).unwrap_or(Value::Null))
                    .collect();
            let blocked = conflicts(conn, t, &pk, &image)?.iter().try_fold(false, |acc, q| {
                let qv = version_of(conn, tbl, &t.key(q))?.map(|(v, _)| v).unwrap_or_default();
                Ok::<_, Error>(acc || qv > row.version)
            })?;
            if !blocked {
                let cols: Vec<usize> = image.iter().map(|(i, _)| *i).collect();
                let sql = upsert_sql(t, &cols);
                let target = Placement { tbl, key: &row.key, pk: &pk, version: row.version, upsert_sql: &sql };
                place(conn, t, &target, &image, &mut true)?;
                placed_one = true;
                break;
            }
        }
        if !placed_one {
            return Ok(());
        }
    }
    warn!(table = %t.name, "set-aside reconciliation hit its round limit");
    Ok(())
}
