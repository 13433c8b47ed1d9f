//! The change reader: committed local changes as whole transactions, and the
//! [`ChangeSource`] built on it.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;

use rusqlite::{Connection, OptionalExtension};
use xxhash_rust::xxh3::xxh3_64;

use super::commit_points::{cut_point, CommitPoints};
use super::{conflicts, get_state, merge, set_state_max, version_of, Db, TableInfo};
use crate::error::{Result, SqlContext};
use crate::model::{Batch, Hlc, Op, RowChange, TableChanges, Value, Version};
use crate::source::{ChangeSource, Pending};

/// Log columns before the key: `hlc`, `tbl`, `op`.
const LOG_FIXED: usize = 3;

/// A row of a replicated table: its table's id and its canonical key bytes.
type RowId = (i64, Vec<u8>);

/// The key values of a log row of table `info`.
fn logged_key(row: &rusqlite::Row<'_>, info: &TableInfo) -> Result<Vec<Value>> {
    (0..info.pk.len())
        .map(|n| row.get_ref(LOG_FIXED + n).map(Value::from))
        .collect::<rusqlite::Result<_>>()
        .ctx(|| "reading a key".into())
}

/// The image of a row the merge set aside (a unique value lost to a higher version) while
/// its write, `mine`, waited to be published: the row still exists, out of the table.
pub(crate) fn aside_image(
    conn: &Connection,
    t: &TableInfo,
    tbl: i64,
    key: &[u8],
    mine: Version,
) -> Result<Option<Vec<Value>>> {
    let row: Option<(i64, i64, Vec<u8>)> = conn
        .prepare_cached("SELECT hlc, node, image FROM __marmot__aside WHERE tbl = ?1 AND pk = ?2")
        .and_then(|mut s| s.query_row((tbl, key), |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).optional())
        .ctx(|| "reading a set-aside row".into())?;
    let Some((hlc, node, blob)) = row else { return Ok(None) };
    if (hlc as u64, node as u64) != (mine.hlc.0, mine.node.0) {
        return Ok(None);
    }
    let named = merge::decode_aside_image(&blob)?;
    let mut values = vec![Value::Null; t.columns.len()];
    for (column, value) in named {
        if let Some(i) = t.column_index(&column) {
            values[i] = value;
        }
    }
    Ok(Some(values))
}

/// A change to a row of `info` with key `pk`: an upsert of `image`, or a delete (`None`).
fn row_change(
    info: &TableInfo,
    hlc: Hlc,
    pk: Vec<Value>,
    image: Option<Vec<Value>>,
    base: Option<Version>,
) -> RowChange {
    let (op, values) = match image {
        Some(values) => (Op::Upsert, values),
        None => {
            let mut values = vec![Value::Null; info.columns.len()];
            for (&i, v) in info.pk.iter().zip(pk) {
                values[i] = v;
            }
            (Op::Delete, values)
        }
    };
    RowChange { hlc, op, values, base }
}

impl Db {
    /// Every local change committed after the last acknowledged point, read in one read
    /// transaction (so it is a union of whole transactions), or `None`.
    pub fn read_pending(&mut self) -> Result<Option<Pending>> {
        self.read_pending_after(Hlc(0), &[], usize::MAX)
    }

    /// Like [`read_pending`](Self::read_pending), after `after` or the stored published
    /// point, whichever is higher; when more than `rows_max` changes are pending, only
    /// those up to one of the commit `points` (see [`cut_point`]), if one qualifies.
    pub fn read_pending_after(&mut self, after: Hlc, points: &[Hlc], rows_max: usize) -> Result<Option<Pending>> {
        self.on_current_schema(|db| db.read_pending_once(after, points, rows_max))
    }

    /// Where to cut the pending backlog (see [`cut_point`]), from what the log holds per
    /// pending entry: its version and a hash of its row's key (two keys with the same hash
    /// share a span, which can only refuse a point, never accept a wrong one). The entries
    /// are kept between reads ([`ScanCache`]): a backlog cut into many batches is scanned
    /// once, not once per batch (that cost a third of the throughput of 100-row bursts).
    fn choose_cut(&self, tx: &Connection, published: u64, points: &[Hlc], rows_max: usize) -> Result<Option<Hlc>> {
        // Most reads find fewer rows than that: one index step tells, and nothing is cut.
        let beyond: Option<i64> = tx
            .prepare_cached("SELECT hlc FROM __marmot__log WHERE hlc > ?1 ORDER BY hlc LIMIT 1 OFFSET ?2")
            .and_then(|mut s| s.query_row((published as i64, rows_max as i64), |r| r.get(0)).optional())
            .ctx(|| "counting pending changes".into())?;
        if beyond.is_none() {
            return Ok(None);
        }
        let mut cache = self.scan_cache.borrow_mut();
        cache.forget_through(Hlc(published), self.schema_generation());
        // The log changes other than by appending (set-aside, restores, key changes): the
        // kept entries must be exactly the log's, or are read again.
        let (n, sum): (i64, i64) = tx
            .prepare_cached(
                "SELECT count(*), coalesce(sum(hlc % 1000003), 0) FROM __marmot__log WHERE hlc > ?1 AND hlc <= ?2",
            )
            .and_then(|mut s| s.query_row((published as i64, cache.through.0 as i64), |r| Ok((r.get(0)?, r.get(1)?))))
            .ctx(|| "checking the scanned log".into())?;
        if n as usize != cache.entries.len() || sum != cache.sum() {
            cache.entries.clear();
            cache.through = Hlc(published);
        }
        let mut stmt = tx
            .prepare_cached("SELECT * FROM __marmot__log WHERE hlc > ?1 ORDER BY hlc")
            .ctx(|| "reading the log".into())?;
        let mut rows = stmt.query([cache.through.0 as i64]).ctx(|| "reading the log".into())?;
        while let Some(row) = rows.next().ctx(|| "reading the log".into())? {
            let hlc = Hlc(row.get::<_, i64>(0).ctx(|| "reading hlc".into())? as u64);
            let tbl: i64 = row.get(1).ctx(|| "reading tbl".into())?;
            cache.through = hlc;
            let Some(info) = self.table_by_id(tbl) else {
                cache.entries.push((hlc, None));
                continue;
            };
            let pk = logged_key(row, info)?;
            let mut key = tbl.to_le_bytes().to_vec();
            key.extend_from_slice(&info.key(&pk));
            cache.entries.push((hlc, Some(xxh3_64(&key))));
        }
        let Some(&(last, _)) = cache.entries.last() else { return Ok(None) };
        let below: Vec<usize> = points.iter().map(|&p| cache.entries.partition_point(|&(h, _)| h <= p)).collect();
        let mut spans: BTreeMap<u64, (Hlc, Hlc)> = BTreeMap::new();
        for &(hlc, hash) in &cache.entries {
            if let Some(hash) = hash {
                spans.entry(hash).and_modify(|(_, end)| *end = hlc).or_insert((hlc, hlc));
            }
        }
        let mut spans: Vec<(Hlc, Hlc)> = spans.into_values().filter(|(first, end)| first < end).collect();
        Ok(cut_point(cache.entries.len(), last, &below, &mut spans, points, rows_max))
    }

    /// Folds this node's changes up to the published point (`after` or the stored one),
    /// in steps of [`merge::CLEAN_STEP_ROWS`]: a pending change's base is then its row's
    /// version, even when the row's previous change went out in an earlier batch. Folding
    /// is work the node does anyway; this only does it before the read.
    fn fold_published(&self, after: Hlc) -> Result<()> {
        let behind = |conn: &Connection| -> Result<bool> {
            Ok(get_state(conn, "folded_hlc")? < get_state(conn, "published_hlc")?.max(after.0))
        };
        while behind(&self.conn)? {
            let tx = self.immediate()?;
            let more = behind(&tx)? && self.fold_local_limited(&tx, merge::CLEAN_STEP_ROWS)?;
            tx.commit().ctx(|| "committing a fold".into())?;
            if !more {
                break;
            }
        }
        Ok(())
    }

    fn read_pending_once(&mut self, after: Hlc, points: &[Hlc], rows_max: usize) -> Result<Option<Pending>> {
        if self.opts.conflicts {
            self.fold_published(after)?;
        }
        let tx = self.conn.unchecked_transaction().ctx(|| "beginning a read".into())?;
        // The first read pins the snapshot: its schema must be the one capture knows, or
        // rows of a table created a moment ago would be skipped and passed over.
        self.check_schema()?;
        let published = get_state(&tx, "published_hlc")?.max(after.0);
        // Points at or below the published point (recorded before a restart, say) cut nothing.
        let points = &points[points.partition_point(|p| p.0 <= published)..];
        // A cut always has pending entries below it (`cut_point` counts them from the
        // checked scan), so a cut read is never empty.
        let cut = match points.is_empty() || rows_max == usize::MAX {
            true => None,
            false => self.choose_cut(&tx, published, points, rows_max)?,
        };
        // Per written row: the newest version read and the key. The log holds keys only;
        // the values are the row's as this read sees it, below.
        let mut written: BTreeMap<RowId, (Hlc, Vec<Value>)> = BTreeMap::new();
        let mut through = Hlc(published);
        {
            let mut stmt = tx
                .prepare_cached("SELECT * FROM __marmot__log WHERE hlc > ?1 AND hlc <= ?2 ORDER BY hlc")
                .ctx(|| "reading the log".into())?;
            let upto = cut.map_or(i64::MAX, |c| c.0 as i64);
            let mut rows = stmt.query((published as i64, upto)).ctx(|| "reading the log".into())?;
            while let Some(row) = rows.next().ctx(|| "reading the log".into())? {
                let hlc = Hlc(row.get::<_, i64>(0).ctx(|| "reading hlc".into())? as u64);
                let tbl: i64 = row.get(1).ctx(|| "reading tbl".into())?;
                through = through.max(hlc);
                let Some(info) = self.table_by_id(tbl) else { continue };
                let pk = logged_key(row, info)?;
                written.insert((tbl, info.key(&pk)), (hlc, pk));
            }
        }
        let conflicts = self.opts.conflicts;
        let folded = get_state(&tx, "folded_hlc")?;
        let mut out: Vec<(Hlc, i64, RowChange)> = Vec::with_capacity(written.len());
        for ((tbl, key), (hlc, pk)) in written {
            let info = self.table_by_id(tbl).expect("read above");
            let mine = Version { hlc, node: self.node };
            let held = version_of(&tx, tbl, &key)?.map(|(v, _)| v);
            // A remote write applied since overwrote the row: that write carries it (and
            // the journal, below, this change).
            if held.is_some_and(|v| v > mine) {
                continue;
            }
            let image = match merge::read_image(&tx, info, &pk)? {
                Some(image) => Some(image.into_iter().map(|(_, v)| v).collect()),
                None => aside_image(&tx, info, tbl, &key, mine)?,
            };
            let base = match conflicts {
                true => self.base_of_pending(&tx, hlc, held, folded, published)?,
                false => None,
            };
            out.push((hlc, tbl, row_change(info, hlc, pk, image, base)));
        }
        if conflicts {
            for (tbl, hlc, blob) in self.own_losses(&tx, published, through.0)? {
                let Some(info) = self.table_by_id(tbl) else { continue };
                let (image, pk) = match blob {
                    Some(blob) => {
                        let values = conflicts::decode_image(info, &blob)?;
                        let pk = info.pk.iter().map(|&i| values[i].clone()).collect();
                        (Some(values), pk)
                    }
                    None => (None, self.own_loss_key(&tx, tbl, hlc)?),
                };
                let base = self.base_of_pending(&tx, hlc, None, folded, published)?;
                out.push((hlc, tbl, row_change(info, hlc, pk, image, base)));
            }
        }
        out.sort_by_key(|(hlc, _, _)| *hlc);
        let mut tables: BTreeMap<i64, TableChanges> = BTreeMap::new();
        for (_, tbl, row) in out {
            let info = self.table_by_id(tbl).expect("read above");
            let entry = tables.entry(tbl).or_insert_with(|| TableChanges {
                table: info.name.clone(),
                columns: info.columns.clone(),
                pk: info.pk.clone(),
                rows: Vec::new(),
            });
            entry.rows.push(row);
        }
        tx.commit().ctx(|| "ending a read".into())?;
        if through.0 == published {
            return Ok(None);
        }
        let batch = Batch {
            origin: self.node,
            tables: tables.into_values().collect(),
            schema: None,
            schema_fingerprint: self.fingerprint,
        };
        Ok(Some(Pending { batch, through }))
    }

    /// Records that local changes up to `through` are durably published.
    pub fn acknowledge(&self, through: Hlc) -> Result<()> {
        set_state_max(&self.conn, "published_hlc", through.0)
    }

    /// Marks every captured local change as published without publishing it (a forced
    /// restore over changes that cannot be published). Returns how many were discarded.
    pub fn discard_pending(&self) -> Result<u64> {
        let n = self.pending_count()?;
        set_state_max(&self.conn, "published_hlc", self.clock()?.0)?;
        Ok(n)
    }

    /// Number of captured local changes not yet published.
    pub fn pending_count(&self) -> Result<u64> {
        let published = get_state(&self.conn, "published_hlc")?;
        self.conn
            .query_row("SELECT count(*) FROM __marmot__log WHERE hlc > ?1", [published as i64], |r| r.get::<_, i64>(0))
            .map(|n| n as u64)
            .ctx(|| "counting pending changes".into())
    }

    /// The highest local version durably published.
    pub fn published_hlc(&self) -> Result<Hlc> {
        Ok(Hlc(get_state(&self.conn, "published_hlc")?))
    }

    /// Deletes published log rows (after folding their versions), keeping the clock at
    /// least as high as the highest deleted version, in steps of
    /// [`clean_published_step`](Self::clean_published_step). Returns how many rows were
    /// deleted.
    pub fn clean_published(&self) -> Result<u64> {
        let mut total = 0;
        loop {
            let (n, more) = self.clean_published_step()?;
            total += n;
            if !more {
                return Ok(total);
            }
        }
    }

    /// One write transaction of [`clean_published`](Self::clean_published): folds at most
    /// [`CLEAN_STEP_ROWS`](super::merge::CLEAN_STEP_ROWS) log rows into the versions, or,
    /// once all are folded, deletes at most that many published ones. Returns the rows
    /// deleted and whether more is left to do. A caller that must also publish and apply
    /// (the node loop) does one step at a time: cleaning 100,000 rows at once held a busy
    /// node's publishing for about 160 ms.
    pub fn clean_published_step(&self) -> Result<(u64, bool)> {
        let slice = super::merge::CLEAN_STEP_ROWS;
        let tx = self.immediate()?;
        if self.fold_local_limited(&tx, slice)? {
            tx.commit().ctx(|| "committing a fold".into())?;
            return Ok((0, true));
        }
        let published = get_state(&tx, "published_hlc")?.min(get_state(&tx, "folded_hlc")?);
        // This slice ends at the WRITE_SLICE_ROWS-th published row, or at the published point.
        let bound: i64 = tx
            .query_row(
                "SELECT coalesce((SELECT hlc FROM __marmot__log WHERE hlc <= ?1 ORDER BY hlc LIMIT 1 OFFSET ?2), ?1)",
                (published as i64, slice - 1),
                |r| r.get(0),
            )
            .ctx(|| "finding a slice of published changes".into())?;
        tx.execute(
            "UPDATE __marmot__clock SET hlc = max(hlc, coalesce( \
             (SELECT max(hlc) FROM __marmot__log WHERE hlc <= ?1), 0)) WHERE id = 0",
            [bound],
        )
        .ctx(|| "raising the clock before cleaning".into())?;
        let n = tx
            .execute("DELETE FROM __marmot__log WHERE hlc <= ?1", [bound])
            .ctx(|| "cleaning published changes".into())? as u64;
        conflicts::clean_bases(&tx, bound)?;
        tx.commit().ctx(|| "committing the cleaning".into())?;
        Ok((n, (n as i64) >= slice && (bound as u64) < published))
    }
}

/// What [`Db::choose_cut`] read of the pending log, kept for the next read: per entry up to
/// `through`, its version and its row's key hash (`None`: a table not replicated).
#[derive(Debug, Default)]
pub(crate) struct ScanCache {
    through: Hlc,
    generation: u64,
    entries: Vec<(Hlc, Option<u64>)>,
}

impl ScanCache {
    /// Drops the entries now published, and all of them when the schema changed since.
    fn forget_through(&mut self, published: Hlc, generation: u64) {
        if generation != self.generation {
            self.entries.clear();
            self.through = published;
            self.generation = generation;
        }
        let n = self.entries.partition_point(|&(h, _)| h <= published);
        self.entries.drain(..n);
        self.through = self.through.max(published);
    }

    /// The entries' checksum, as the log computes it (`sum(hlc % 1000003)`).
    fn sum(&self) -> i64 {
        self.entries.iter().map(|&(h, _)| (h.0 % 1_000_003) as i64).sum()
    }
}

/// The production [`ChangeSource`]: capture triggers read through their own connection.
///
/// Acknowledgements are kept in memory and written to the database by
/// [`flush`](ChangeSource::flush), so publishing never waits for the application's write
/// lock; after a crash, changes acknowledged but not flushed are published again, which
/// the merge ignores as duplicates.
pub struct SqliteChangeSource {
    db: Db,
    acknowledged: Hlc,
    flushed: Hlc,
    /// Where a large backlog may be cut (see [`CommitPoints`]); none: read it whole.
    points: Option<Arc<CommitPoints>>,
    batch_rows_max: usize,
}

impl SqliteChangeSource {
    /// A change source reading `db`.
    pub fn new(db: Db) -> Self {
        SqliteChangeSource { db, acknowledged: Hlc(0), flushed: Hlc(0), points: None, batch_rows_max: usize::MAX }
    }

    /// Cuts a backlog of more than `batch_rows_max` changes into batches at the commit
    /// points a sampler records in `points`.
    pub fn with_commit_points(mut self, points: Arc<CommitPoints>, batch_rows_max: usize) -> Self {
        self.points = Some(points);
        self.batch_rows_max = batch_rows_max.max(1);
        self
    }

    /// The highest acknowledged point (flushed or not).
    pub fn acknowledged(&self) -> Hlc {
        self.acknowledged
    }

    /// The underlying database connection.
    pub fn db(&self) -> &Db {
        &self.db
    }
}

#[async_trait]
impl ChangeSource for SqliteChangeSource {
    async fn pending(&mut self) -> Result<Option<Pending>> {
        let points = self.points.as_ref().map(|p| p.after(self.acknowledged)).unwrap_or_default();
        self.db.read_pending_after(self.acknowledged, &points, self.batch_rows_max)
    }

    async fn acknowledge(&mut self, through: Hlc) -> Result<()> {
        self.acknowledged = self.acknowledged.max(through);
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        if self.acknowledged > self.flushed {
            self.db.acknowledge(self.acknowledged)?;
            self.flushed = self.acknowledged;
        }
        Ok(())
    }
}
