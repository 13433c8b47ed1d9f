//! The conflict journal: writes that last-writer-wins overwrote without their data having
//! been seen by whoever overwrote them.
//!
//! Every replicated change carries its *base*: the version its row held on its origin
//! before it. A change whose base is another write's version was made by someone who had
//! that write, so that write's data was seen and replaced on purpose. A write is **lost**
//! when it is not the row's winner (the greatest version) and no write has it as its
//! base. That set depends only on the writes made, so every node records the same one
//! whatever the arrival order; while writes are still in flight a node may record a loss
//! that a later-arriving write turns out to have seen, and then removes it again
//! (docs/conflicts.md).
//!
//! A node keeps what it needs to decide this for a row without the row's history:
//! - the winner's version (`__marmot__versions`) and the other writes in the journal;
//! - `__marmot__based`: versions some write had as its base when they were not the version
//!   this node held as that write arrived (rare: only writes made concurrently, or
//!   arriving out of order, leave one);
//! - `__marmot__bases`: for local changes folded before they were published, the version
//!   they replaced, so the reader can tell each published change its base.

use rusqlite::{Connection, OptionalExtension};

use super::schema::TableInfo;
use super::{get_state, merge, Db};
use crate::error::{Error, Result, SqlContext};
use crate::model::{Hlc, NodeId, Value, Version};

/// Most journal entries or base notes one collection step removes.
pub const CONFLICTS_STEP_ROWS: i64 = 1000;

/// A lost change of this node's own: table id, version, exact image (`None`: a delete).
pub(crate) type OwnLoss = (i64, Hlc, Option<Vec<u8>>);

/// One recorded loss.
#[derive(Clone, Debug, PartialEq)]
pub struct Conflict {
    /// The table, by name.
    pub table: String,
    /// The row's primary key, as JSON (an array, one value per key column).
    pub key: String,
    /// The losing write's version.
    pub loser: Version,
    /// The losing row image as JSON (`None`: the losing write deleted the row).
    pub loser_image: Option<String>,
    /// The version that held the row when this node recorded the loss.
    pub winner: Version,
}

/// What [`Db::conflicts`] lists.
#[derive(Clone, Debug, Default)]
pub struct ConflictFilter {
    /// Only this table.
    pub table: Option<String>,
    /// Only losing writes made at or after this many milliseconds since the epoch.
    pub since_ms: Option<u64>,
    /// At most this many, newest first (`None`: all).
    pub limit: Option<u64>,
}

/// An incoming write to one row, as the journal sees it.
pub(crate) struct Write<'a> {
    pub version: Version,
    pub base: Option<Version>,
    /// The row image in the table's column order, `None` for a delete (made only when
    /// the write is recorded as lost).
    pub image: &'a dyn Fn() -> Option<Vec<Value>>,
}

/// A value as JSON: numbers and strings as themselves, a BLOB as `{"blob": "<hex>"}`, a
/// REAL that JSON cannot hold (infinite) as `{"real": "inf"}` or `{"real": "-inf"}`.
fn json_value(v: &Value) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        Value::Null => J::Null,
        Value::Integer(i) => J::from(*i),
        Value::Real(r) => serde_json::Number::from_f64(*r).map(J::Number).unwrap_or_else(
            || serde_json::json!({ "real": if *r > 0.0 { "inf" } else if *r < 0.0 { "-inf" } else { "nan" } }),
        ),
        Value::Text(t) => J::from(t.as_str()),
        Value::Blob(b) => {
            let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
            serde_json::json!({ "blob": hex })
        }
    }
}

fn key_json(pk: &[Value]) -> String {
    serde_json::Value::Array(pk.iter().map(json_value).collect()).to_string()
}

fn image_json(t: &TableInfo, values: &[Value]) -> String {
    let map: serde_json::Map<String, serde_json::Value> =
        t.columns.iter().zip(values).map(|(c, v)| (c.clone(), json_value(v))).collect();
    serde_json::Value::Object(map).to_string()
}

fn image_cbor(t: &TableInfo, values: &[Value]) -> Vec<u8> {
    let named: Vec<(&str, &Value)> = t.columns.iter().map(String::as_str).zip(values).collect();
    let mut blob = Vec::new();
    ciborium::into_writer(&named, &mut blob).expect("CBOR into a Vec");
    blob
}

/// Records that `base` of row (`tbl`, `key`) was some write's base, and removes a loss
/// recorded for it: that write's data was seen.
fn note_based(conn: &Connection, tbl: i64, key: &[u8], base: Version) -> Result<()> {
    conn.prepare_cached("INSERT OR IGNORE INTO __marmot__based(tbl, pk, hlc, node) VALUES (?1, ?2, ?3, ?4)")
        .and_then(|mut s| s.execute((tbl, key, base.hlc.0 as i64, base.node.0 as i64)))
        .ctx(|| "noting a base".into())?;
    let removed = conn
        .prepare_cached(
            "DELETE FROM __marmot__conflicts WHERE tbl = ?1 AND pk = ?2 AND loser_hlc = ?3 AND loser_node = ?4",
        )
        .and_then(|mut s| s.execute((tbl, key, base.hlc.0 as i64, base.node.0 as i64)))
        .ctx(|| "withdrawing a recorded loss".into())?;
    if removed > 0 {
        super::add_state(conn, "conflicts_withdrawn", removed as u64)?;
    }
    Ok(())
}

fn is_based(conn: &Connection, tbl: i64, key: &[u8], v: Version) -> Result<bool> {
    conn.prepare_cached(
        "SELECT EXISTS (SELECT 1 FROM __marmot__based WHERE tbl = ?1 AND pk = ?2 AND hlc = ?3 AND node = ?4)",
    )
    .and_then(|mut s| s.query_row((tbl, key, v.hlc.0 as i64, v.node.0 as i64), |r| r.get(0)))
    .ctx(|| "checking a base".into())
}

/// The row a write is to: its table, the table's id, its key bytes and key values.
pub(crate) struct RowRef<'a> {
    pub t: &'a TableInfo,
    pub tbl: i64,
    pub key: &'a [u8],
    pub pk: &'a [Value],
}

/// Records the loss of `loser` (image `values`, `None` for a delete) to `winner`.
fn record(
    conn: &Connection,
    row: &RowRef<'_>,
    loser: Version,
    values: Option<&[Value]>,
    winner: Version,
) -> Result<()> {
    let t = row.t;
    // The loser's own spelling of the key (`'Bob'` and `'bob'` are one row under NOCASE).
    let key: Vec<Value> = match values {
        Some(v) => t.pk.iter().map(|&i| v[i].clone()).collect(),
        None => row.pk.to_vec(),
    };
    let n = conn
        .prepare_cached(
            "INSERT OR IGNORE INTO __marmot__conflicts(table_name, key, loser_hlc, loser_node, loser_image, \
             winner_hlc, winner_node, tbl, pk, image) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )
        .and_then(|mut s| {
            s.execute(rusqlite::params![
                t.name,
                key_json(&key),
                loser.hlc.0 as i64,
                loser.node.0 as i64,
                values.map(|v| image_json(t, v)),
                winner.hlc.0 as i64,
                winner.node.0 as i64,
                row.tbl,
                row.key,
                values.map(|v| image_cbor(t, v)),
            ])
        })
        .ctx(|| format!("recording a lost write to {:?}", t.name))?;
    if n > 0 {
        super::add_state(conn, &format!("conflicts:{}", t.name), 1)?;
    }
    Ok(())
}

/// The row's current image: in the table, or set aside by a unique conflict.
fn held_image(conn: &Connection, row: &RowRef<'_>, held: Version) -> Result<Option<Vec<Value>>> {
    if let Some(image) = merge::read_image(conn, row.t, row.pk)? {
        return Ok(Some(image.into_iter().map(|(_, v)| v).collect()));
    }
    super::reader::aside_image(conn, row.t, row.tbl, row.key, held)
}

/// Journals what `incoming`, a write to `row`, shows about the writes this node knows of
/// that row. `held` is the row's version here and whether it is a tombstone. Runs before
/// the merge writes anything, in its transaction.
pub(crate) fn on_write(
    conn: &Connection,
    row: &RowRef<'_>,
    held: Option<(Version, bool)>,
    incoming: &Write<'_>,
) -> Result<()> {
    let v = incoming.version;
    if held.is_some_and(|(h, _)| h == v) {
        return Ok(());
    }
    if let Some(b) = incoming.base.filter(|&b| held.map(|(h, _)| h) != Some(b)) {
        note_based(conn, row.tbl, row.key, b)?;
    }
    match held {
        // A node's later write to a row is made on top of its earlier one (versions only
        // grow) unless it names a newer base (another node's write replaced the earlier one
        // there first): with no base or an older one, it had lost its version of the row.
        Some((h, _)) if h.node == v.node && h < v && incoming.base.is_none_or(|b| b <= h) => {}
        // The incoming write loses, unless some write was made on top of it.
        Some((h, _)) if h > v => match is_based(conn, row.tbl, row.key, v)? {
            true => {}
            false => record(conn, row, v, (incoming.image)().as_deref(), h)?,
        },
        // The held write loses, unless the incoming one or another was made on top of it.
        Some((h, deleted)) if incoming.base != Some(h) && !is_based(conn, row.tbl, row.key, h)? => {
            let image = match deleted {
                true => None,
                false => held_image(conn, row, h)?,
            };
            record(conn, row, h, image.as_deref(), v)?;
        }
        _ => {}
    }
    Ok(())
}

/// The versions of `origin`'s changes a database holds because a restored copy held them
/// (not because it applied them from the stream): ranges (after, through], kept in the
/// state as `known.<origin>.<after>` = `through`, so a copy of a copy still knows them.
pub(crate) fn known(conn: &Connection, origin: NodeId) -> Result<Vec<(u64, u64)>> {
    ranges(conn, &format!("known.{}", origin.0))
}

/// Records that the database on `conn` (a copy about to be restored) holds `origin`'s
/// changes in (`after`, `through`]: those its saver made on it.
pub(crate) fn note_known(conn: &Connection, origin: NodeId, after: u64, through: u64) -> Result<()> {
    note_range(conn, &format!("known.{}", origin.0), after, through)
}

/// Ranges of versions (after, through] kept in the state as `<name>.<after>` = `through`.
fn ranges(conn: &Connection, name: &str) -> Result<Vec<(u64, u64)>> {
    let (from, to) = (format!("{name}."), format!("{name}/"));
    conn.prepare_cached("SELECT key, value FROM __marmot__state WHERE key >= ?1 AND key < ?2")
        .and_then(|mut s| {
            s.query_map((&from, &to), |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)))?.collect()
        })
        .ctx(|| format!("reading the ranges {name}"))
        .map(|rows: Vec<(String, u64)>| {
            rows.into_iter().filter_map(|(k, through)| Some((k[from.len()..].parse().ok()?, through))).collect()
        })
}

/// Adds (`after`, `through`] to the ranges `name`; overlapping or adjacent ones merge.
fn note_range(conn: &Connection, name: &str, after: u64, through: u64) -> Result<()> {
    if through <= after {
        return Ok(());
    }
    let (mut lo, mut hi) = (after, through);
    for (a, t) in ranges(conn, name)? {
        if a <= hi && lo <= t {
            (lo, hi) = (lo.min(a), hi.max(t));
            conn.execute("DELETE FROM __marmot__state WHERE key = ?1", [format!("{name}.{a}")])
                .ctx(|| format!("merging the ranges {name}"))?;
        }
    }
    super::set_state(conn, &format!("{name}.{lo}"), hi)
}

/// Records what the journal needs of a batch parked (as `id`) from `origin` on `shard`
/// whose writes span versions [`lo`, `hi`]: `seen`, what had been applied from that
/// origin there (those writes were judged before, should the batch carry them again).
/// Later entries from the origin may carry its writes too (the same changes published
/// again); [`note_judged`] adds what they judged.
pub(crate) fn note_parked(
    conn: &Connection,
    id: i64,
    origin: NodeId,
    shard: u32,
    span: (u64, u64),
    seen: u64,
) -> Result<()> {
    super::set_state(conn, &format!("parked_seen.{id}"), seen)?;
    super::set_state(conn, &format!("parked.{}.{shard}.{id}", origin.0), span.0)?;
    super::set_state(conn, &format!("parked_hi.{id}"), span.1)
}

/// Records that `origin`'s writes on `shard` in (`after`, `through`] were judged (an
/// origin's entry to a shard holds all its changes there between its first and last
/// version), for each parked batch from there (but `except`) whose writes that range
/// meets: retried, it judges only the others.
pub(crate) fn note_judged(
    conn: &Connection,
    origin: NodeId,
    shard: u32,
    (after, through): (u64, u64),
    except: Option<i64>,
) -> Result<()> {
    if through <= after {
        return Ok(());
    }
    for (id, lo) in ranges(conn, &format!("parked.{}.{shard}", origin.0))? {
        let id = id as i64;
        if Some(id) != except && lo <= through && after < super::get_state(conn, &format!("parked_hi.{id}"))? {
            note_range(conn, &format!("parked_judged.{id}"), after, through)?;
        }
    }
    Ok(())
}

/// What the journal judged of parked batch `id`'s writes before it is retried: all up to
/// its mark, and the ranges later entries judged.
pub(crate) fn parked_judged(conn: &Connection, id: i64) -> Result<(u64, Vec<(u64, u64)>)> {
    Ok((super::get_state(conn, &format!("parked_seen.{id}"))?, ranges(conn, &format!("parked_judged.{id}"))?))
}

/// Versions of `origin`'s writes on `shard` that parked batches (but `except`) hold and
/// nothing judged yet. The entries applied after a batch was parked moved the origin's
/// mark past them, so an entry (or another parked batch) that carries them again judges
/// them by these ranges, not by the mark.
pub(crate) fn unjudged_parked(
    conn: &Connection,
    origin: NodeId,
    shard: u32,
    except: Option<i64>,
) -> Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    for (id, lo) in ranges(conn, &format!("parked.{}.{shard}", origin.0))? {
        let id = id as i64;
        if Some(id) == except {
            continue;
        }
        let (seen, judged) = parked_judged(conn, id)?;
        let hi = super::get_state(conn, &format!("parked_hi.{id}"))?;
        out.extend(without((lo.saturating_sub(1).max(seen), hi), judged));
    }
    Ok(out)
}

/// The range (after, through] less `ranges`.
fn without((after, through): (u64, u64), mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut out = Vec::new();
    let mut from = after;
    for (a, t) in ranges {
        if a > from {
            out.push((from, a.min(through)));
        }
        from = from.max(t);
        if from >= through {
            break;
        }
    }
    if from < through {
        out.push((from, through));
    }
    out.retain(|&(a, t)| a < t);
    out
}

/// Forgets what the journal kept of parked batch `id`.
pub(crate) fn forget_parked(conn: &Connection, id: i64) -> Result<()> {
    conn.execute(
        "DELETE FROM __marmot__state WHERE key IN (?1, ?2) OR key GLOB ?3 OR (key >= ?4 AND key < ?5)",
        (
            format!("parked_seen.{id}"),
            format!("parked_hi.{id}"),
            format!("parked.*.*.{id}"),
            format!("parked_judged.{id}."),
            format!("parked_judged.{id}/"),
        ),
    )
    .ctx(|| "forgetting a parked batch".into())?;
    Ok(())
}

/// Which writes of a batch the journal judges: those above the origin's mark, or in the
/// ranges parked batches hold unjudged, and at or below `through`, outside the ranges a
/// restored copy held.
pub(crate) struct Judged {
    pub above: u64,
    pub unjudged: Vec<(u64, u64)>,
    pub through: u64,
    pub known: Vec<(u64, u64)>,
    /// This node's changes set aside ([`set_aside`]).
    pub aside: Vec<(u64, u64)>,
}

impl Judged {
    pub(crate) fn judges(&self, hlc: Hlc) -> bool {
        (hlc.0 > self.above || within(&self.unjudged, hlc.0)) && hlc.0 <= self.through && !within(&self.known, hlc.0)
    }
}

/// Versions of this node's changes set aside because they outlived the tombstone
/// retention unpublished: ranges (after, through], kept in the state as
/// `aside.<after>` = `through` until a restore. They are never published themselves; a
/// later change to their row (or the row logged again when they are kept) carries them, so
/// its base is the one they had.
pub(crate) fn set_aside(conn: &Connection) -> Result<Vec<(u64, u64)>> {
    ranges(conn, "aside")
}

/// Records that this node's changes in (`after`, `through`] are set aside.
pub(crate) fn note_set_aside(conn: &Connection, after: u64, through: u64) -> Result<()> {
    note_range(conn, "aside", after, through)
}

/// Forgets the changes set aside: after a restore, the saver's mean nothing here.
pub(crate) fn forget_set_aside(conn: &Connection) -> Result<()> {
    conn.execute("DELETE FROM __marmot__state WHERE key >= ?1 AND key < ?2", ("aside.", "aside/"))
        .ctx(|| "forgetting the changes set aside".into())?;
    Ok(())
}

/// Removes the base notes of this node's changes at or below `bound` (published and
/// cleaned), but those of changes set aside: a later change to their row carries them.
pub(crate) fn clean_bases(conn: &Connection, bound: i64) -> Result<()> {
    let mut kept = set_aside(conn)?;
    kept.sort_unstable();
    let mut stmt = conn
        .prepare_cached("DELETE FROM __marmot__bases WHERE hlc > ?1 AND hlc <= ?2")
        .ctx(|| "cleaning published changes' bases".into())?;
    let mut from = i64::MIN;
    for (after, through) in kept {
        stmt.execute((from, (after as i64).min(bound))).ctx(|| "cleaning published changes' bases".into())?;
        from = from.max(through as i64);
    }
    if from < bound {
        stmt.execute((from, bound)).ctx(|| "cleaning published changes' bases".into())?;
    }
    Ok(())
}

/// Removes the journal's entries of this node's (`node`) changes in (`after`, `through`],
/// set aside: they are never published, so no other node journals them.
pub(crate) fn forget_own(conn: &Connection, node: NodeId, after: u64, through: u64) -> Result<()> {
    let removed = conn
        .execute(
            "DELETE FROM __marmot__conflicts WHERE loser_node = ?1 AND loser_hlc > ?2 AND loser_hlc <= ?3",
            (node.0 as i64, after as i64, through as i64),
        )
        .ctx(|| "forgetting the losses of changes set aside".into())?;
    if removed > 0 {
        super::add_state(conn, "conflicts_withdrawn", removed as u64)?;
    }
    Ok(())
}

/// Whether `hlc` is in one of `ranges` (after, through].
pub(crate) fn within(ranges: &[(u64, u64)], hlc: u64) -> bool {
    ranges.iter().any(|&(a, t)| a < hlc && hlc <= t)
}

/// Records, for a local change at `hlc` folded before it was published, the version it
/// replaced (`prev`), for the reader.
pub(crate) fn note_folded(conn: &Connection, hlc: Hlc, prev: Option<Version>) -> Result<()> {
    conn.prepare_cached("INSERT OR REPLACE INTO __marmot__bases(hlc, base_hlc, base_node) VALUES (?1, ?2, ?3)")
        .and_then(|mut s| s.execute((hlc.0 as i64, prev.map(|p| p.hlc.0 as i64), prev.map(|p| p.node.0 as i64))))
        .map(|_| ())
        .ctx(|| "noting a folded change's base".into())
}

fn folded_base(conn: &Connection, hlc: Hlc) -> Result<Option<Option<Version>>> {
    conn.prepare_cached("SELECT base_hlc, base_node FROM __marmot__bases WHERE hlc = ?1")
        .and_then(|mut s| {
            s.query_row([hlc.0 as i64], |r| {
                let (h, n): (Option<i64>, Option<i64>) = (r.get(0)?, r.get(1)?);
                Ok(h.zip(n).map(|(h, n)| Version { hlc: Hlc(h as u64), node: NodeId(n as u64) }))
            })
            .optional()
        })
        .ctx(|| "reading a folded change's base".into())
}

impl Db {
    /// The base of this node's pending change at `hlc` to the row whose version here is
    /// `held`: the version the row had before this node's run of unpublished changes to it
    /// that ends at `hlc` (those travel as one change). `folded` and `published` are the
    /// state's points, read in the caller's read transaction (the reader folds up to the
    /// published point first, so every change published is in the row's version).
    pub(crate) fn base_of_pending(
        &self,
        conn: &Connection,
        hlc: Hlc,
        held: Option<Version>,
        folded: u64,
        published: u64,
    ) -> Result<Option<Version>> {
        let mine = Version { hlc, node: self.node };
        // Not folded yet: nothing was applied since it committed, so the row's version is
        // the one before this node's unfolded changes to it.
        let mut base = match hlc.0 > folded {
            true => held,
            false => match folded_base(conn, hlc)? {
                Some(b) => b,
                None => return Ok(held.filter(|h| *h < mine)),
            },
        };
        // Walk back over this node's own unpublished changes: they travel as this one.
        let mut aside = None;
        for _ in 0..1_000_000 {
            match base {
                Some(b) if b.node == self.node => {
                    let travels = b.hlc.0 > published || {
                        let ranges = match &aside {
                            Some(ranges) => ranges,
                            None => aside.insert(set_aside(conn)?),
                        };
                        within(ranges, b.hlc.0)
                    };
                    match travels.then(|| folded_base(conn, b.hlc)).transpose()?.flatten() {
                        Some(earlier) => base = earlier,
                        None => break,
                    }
                }
                _ => break,
            }
        }
        Ok(base)
    }

    /// This node's own changes in (`published`, `through`] that the journal holds as lost:
    /// overwritten here by a concurrent write before they were published. They are
    /// published all the same (with the image they had), so every node journals them.
    pub(crate) fn own_losses(&self, conn: &Connection, published: u64, through: u64) -> Result<Vec<OwnLoss>> {
        // Only changes made on this database: older ones were published before its state
        // was removed (`-cleanup`) or before it was restored over (the log that says so
        // went with it).
        let published = published.max(get_state(conn, "lineage_hlc")?);
        conn.prepare_cached(
            "SELECT tbl, loser_hlc, image FROM __marmot__conflicts INDEXED BY __marmot__conflicts_at \
             WHERE loser_hlc > ?1 AND loser_hlc <= ?2 AND loser_node = ?3 ORDER BY loser_hlc",
        )
        .and_then(|mut s| {
            s.query_map((published as i64, through as i64, self.node.0 as i64), |r| {
                Ok((r.get(0)?, Hlc(r.get::<_, i64>(1)? as u64), r.get(2)?))
            })?
            .collect()
        })
        .ctx(|| "reading this node's lost changes".into())
    }

    /// The key of this node's lost delete at `hlc` of a row of table `tbl`.
    pub(crate) fn own_loss_key(&self, conn: &Connection, tbl: i64, hlc: Hlc) -> Result<Vec<Value>> {
        let key: Vec<u8> = conn
            .prepare_cached(
                "SELECT pk FROM __marmot__conflicts INDEXED BY __marmot__conflicts_at \
                 WHERE loser_hlc = ?1 AND loser_node = ?2 AND tbl = ?3",
            )
            .and_then(|mut s| s.query_row((hlc.0 as i64, self.node.0 as i64, tbl), |r| r.get(0)))
            .ctx(|| "reading a lost change's key".into())?;
        ciborium::from_reader(key.as_slice()).map_err(|e| Error::Corrupt(format!("a key in __marmot__conflicts: {e}")))
    }

    /// The journal, newest loss first.
    pub fn conflicts(&self, filter: &ConflictFilter) -> Result<Vec<Conflict>> {
        let since = filter.since_ms.map_or(0, |ms| Hlc::from_millis(ms).0 as i64);
        let limit = filter.limit.map_or(-1, |n| n as i64);
        self.conn
            .prepare(
                "SELECT table_name, key, loser_hlc, loser_node, loser_image, winner_hlc, winner_node \
                 FROM __marmot__conflicts WHERE (?1 IS NULL OR table_name = ?1) AND loser_hlc >= ?2 \
                 ORDER BY loser_hlc DESC, loser_node DESC, table_name, key LIMIT ?3",
            )
            .and_then(|mut s| {
                s.query_map((filter.table.as_deref(), since, limit), |r| {
                    Ok(Conflict {
                        table: r.get(0)?,
                        key: r.get(1)?,
                        loser: Version {
                            hlc: Hlc(r.get::<_, i64>(2)? as u64),
                            node: NodeId(r.get::<_, i64>(3)? as u64),
                        },
                        loser_image: r.get(4)?,
                        winner: Version {
                            hlc: Hlc(r.get::<_, i64>(5)? as u64),
                            node: NodeId(r.get::<_, i64>(6)? as u64),
                        },
                    })
                })?
                .collect()
            })
            .ctx(|| "reading the conflict journal".into())
    }

    /// Losses recorded so far per table (a counter: entries removed since still count).
    pub fn conflicts_recorded(&self) -> Result<Vec<(String, u64)>> {
        self.conn
            .prepare("SELECT substr(key, 11), value FROM __marmot__state WHERE key LIKE 'conflicts:%' ORDER BY key")
            .and_then(|mut s| s.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?.collect())
            .ctx(|| "reading the conflict counters".into())
    }

    /// Entries held in the journal now.
    pub fn conflicts_held(&self) -> Result<u64> {
        self.conn
            .query_row("SELECT count(*) FROM __marmot__conflicts", [], |r| r.get::<_, i64>(0))
            .map(|n| n as u64)
            .ctx(|| "counting the conflict journal".into())
    }

    /// Removes at most [`CONFLICTS_STEP_ROWS`] journal entries whose losing write is older
    /// than `before`, and as many base notes older than `horizon` (the tombstone horizon:
    /// no write that old can still arrive). Returns how many were removed and whether more
    /// are left.
    pub fn collect_conflicts_step(&self, before: Hlc, horizon: Hlc) -> Result<(u64, bool)> {
        let tx = self.immediate()?;
        let journal = tx
            .execute(
                "DELETE FROM __marmot__conflicts WHERE rowid IN (SELECT rowid FROM __marmot__conflicts \
                 INDEXED BY __marmot__conflicts_at WHERE loser_hlc < ?1 ORDER BY loser_hlc LIMIT ?2)",
                (before.0 as i64, CONFLICTS_STEP_ROWS),
            )
            .ctx(|| "removing old journal entries".into())? as u64;
        let notes = tx
            .execute(
                "DELETE FROM __marmot__based WHERE (tbl, pk, hlc, node) IN (SELECT tbl, pk, hlc, node \
                 FROM __marmot__based WHERE hlc < ?1 LIMIT ?2)",
                (horizon.0 as i64, CONFLICTS_STEP_ROWS),
            )
            .ctx(|| "removing old base notes".into())? as u64;
        tx.commit().ctx(|| "committing the journal's collection".into())?;
        let more = journal as i64 >= CONFLICTS_STEP_ROWS || notes as i64 >= CONFLICTS_STEP_ROWS;
        Ok((journal + notes, more))
    }

    /// Entries the journal removed because a later-arriving write showed its data was seen.
    pub fn conflicts_withdrawn(&self) -> Result<u64> {
        get_state(&self.conn, "conflicts_withdrawn")
    }
}

/// Decodes a journal entry's exact image into values in `t`'s column order.
pub(crate) fn decode_image(t: &TableInfo, blob: &[u8]) -> Result<Vec<Value>> {
    let named = merge::decode_aside_image(blob)?;
    let mut values = vec![Value::Null; t.columns.len()];
    for (column, value) in named {
        if let Some(i) = t.column_index(&column) {
            values[i] = value;
        }
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::without;

    #[test]
    fn a_range_less_others_keeps_what_none_covers() {
        assert_eq!(without((0, 10), vec![]), vec![(0, 10)]);
        assert_eq!(without((0, 10), vec![(6, 8), (2, 3)]), vec![(0, 2), (3, 6), (8, 10)]);
        assert_eq!(without((4, 10), vec![(0, 5), (9, 12)]), vec![(5, 9)]);
        assert_eq!(without((4, 10), vec![(0, 12)]), vec![]);
        assert_eq!(without((4, 10), vec![(10, 12), (0, 1)]), vec![(4, 10)]);
        assert_eq!(without((5, 5), vec![]), vec![]);
    }
}
