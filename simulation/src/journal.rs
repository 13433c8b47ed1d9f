//! The conflict journal's oracle: after quiescence every node's journal holds exactly the
//! writes the definition names, computed from every change published (whatever order any
//! node received them in): per row, every write that is not the row's winner (the greatest
//! version) and that no write has as its base.
//!
//! Runs that collect tombstones are checked too. A node whose unpublished changes outlived
//! the retention sets them aside and never publishes them: the change that later carries
//! such a row (a write on top of it, or the row logged again when the changes are kept)
//! names the base the changes set aside had, and the journal forgets their losses, so the
//! definition over published changes still holds.

use std::collections::{BTreeMap, BTreeSet};

use marmot_core::sqlite::TableSelection;
use marmot_core::{Batch, Hlc, NodeId, Value, Version};

use crate::model::{canonical, ValueKey};
use crate::schema;
use crate::world::Failure;

/// Tables whose rows keep their identity through every migration (a dropped and created
/// table, or one rebuilt under a new name, starts its rows' histories again).
const CHECKED: &[&str] =
    &["audit", "group_tags", "groups", "handles", "items", "names", "nk", "order", "stock", "users"];

/// A row: table, canonical key.
type Row = (String, Vec<ValueKey>);

/// The bases a change was published with: one, or more when its origin published it again
/// after losing its published point (a crash before the point was stored) and this time
/// sent its earlier changes to the row as one with it, naming an older base.
type Bases = BTreeSet<Option<Version>>;

/// Every row change published: per row, each version and its bases.
#[derive(Default)]
pub struct Published {
    rows: BTreeMap<Row, BTreeMap<Version, Bases>>,
    /// Per node, the clocks at which it was cleaned up (`-cleanup`).
    cleanups: BTreeMap<NodeId, Vec<Hlc>>,
    /// Changes published again with a base that is not an earlier one of the same chain:
    /// (row, version, its bases).
    inconsistent: Vec<(Row, Version, Bases)>,
    /// Changes their origin set aside (they outlived the retention unpublished) that had
    /// reached the log all the same (published, the acknowledgement lost): the origin
    /// cannot know they did, so whether a node journals their loss depends on whether its
    /// journal came from the origin (docs/conflicts.md, "What the journal cannot know").
    set_aside_stored: BTreeSet<Version>,
}

impl Published {
    /// Node `node` was cleaned up with its clock at `clock`.
    pub fn note_cleanup(&mut self, node: NodeId, clock: Hlc) {
        self.cleanups.entry(node).or_default().push(clock);
    }

    /// Node `node` set aside its changes above `published`; `stored` are the versions the
    /// logs held.
    pub fn note_set_aside(&mut self, node: NodeId, published: Hlc, stored: &BTreeSet<(NodeId, Hlc)>) {
        let mine = stored.range((node, Hlc(published.0.saturating_add(1)))..=(node, Hlc(u64::MAX)));
        self.set_aside_stored.extend(mine.map(|&(node, hlc)| Version { hlc, node }));
    }

    /// Notes the row changes of `batch`.
    pub fn add(&mut self, batch: &Batch) {
        for t in batch.tables.iter().filter(|t| CHECKED.contains(&t.table.as_str())) {
            let Some(table) = schema::table(&t.table) else { continue };
            for r in &t.rows {
                let key: Vec<ValueKey> = t.pk.iter().map(|&i| canonical(&r.values[i], table.fold)).collect();
                if key.iter().any(|k| k.0 == 0) {
                    continue; // a NULL key is not replicated
                }
                let v = Version { hlc: r.hlc, node: batch.origin };
                let row = (t.table.clone(), key);
                let bases = self.rows.entry(row.clone()).or_default().entry(v).or_default();
                bases.insert(r.base);
                // Published again, the change may name an older base only when the newest
                // one is its origin's own earlier change (sent as one with it this time).
                let newest = bases.iter().next_back().copied().flatten();
                if bases.len() > 1 && newest.is_none_or(|b| b.node != v.node) {
                    self.inconsistent.push((row, v, bases.clone()));
                }
            }
        }
    }

    /// Rows whose history the journal does not follow: a write whose base is older than an
    /// earlier write of its own origin to the row (or that has none). Versions only grow, so
    /// its origin had lost its own version of the row (a `-cleanup`, a table rebuild, a
    /// restore from a copy without it) and the write cannot say what it replaced; nodes
    /// that held the earlier write journal it, its origin does not (docs/conflicts.md,
    /// "What the journal cannot know").
    ///
    /// Likewise a write with no base made after its origin was cleaned up, to a row written
    /// before the cleanup: the node held the row's data but no longer its version.
    fn forgotten(&self, writes: &BTreeMap<Version, Bases>) -> bool {
        writes.iter().any(|(v, bases)| {
            // The newest base: the one its first publication named.
            let base = bases.iter().next_back().copied().flatten();
            let cleaned = self.cleanups.get(&v.node).into_iter().flatten().any(|c| *c < v.hlc);
            writes.keys().any(|w| {
                (w.node == v.node && w < v && base.is_none_or(|b| b < *w)) || (cleaned && base.is_none() && w < v)
            })
        })
    }

    /// The rows the oracle checks.
    fn followed(&self, row: &Row) -> bool {
        self.rows.get(row).is_none_or(|w| !self.forgotten(w))
    }

    /// The lost writes: (table, key, version).
    pub fn expected(&self) -> BTreeSet<(String, Vec<ValueKey>, Version)> {
        let mut out = BTreeSet::new();
        for ((table, key), writes) in self.rows.iter().filter(|(_, w)| !self.forgotten(w)) {
            let winner = writes.keys().next_back().copied();
            let bases: BTreeSet<Version> = writes.values().flatten().flatten().copied().collect();
            for v in writes.keys() {
                if Some(*v) != winner && !bases.contains(v) {
                    out.insert((table.clone(), key.clone(), *v));
                }
            }
        }
        out
    }
}

/// A key value back from the journal's JSON.
fn from_json(v: &serde_json::Value) -> Result<Value, Failure> {
    use serde_json::Value as J;
    Ok(match v {
        J::Null => Value::Null,
        J::Number(n) => match n.as_i64() {
            Some(i) => Value::Integer(i),
            None => Value::Real(n.as_f64().ok_or_else(|| Failure(format!("journal key {n}")))?),
        },
        J::String(s) => Value::Text(s.clone()),
        J::Object(o) if o.contains_key("blob") => {
            let hex = o["blob"].as_str().unwrap_or_default();
            let bytes = (0..hex.len() / 2)
                .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16))
                .collect::<Result<Vec<u8>, _>>()
                .map_err(|e| Failure(format!("journal key blob {hex}: {e}")))?;
            Value::Blob(bytes)
        }
        other => return Err(Failure(format!("journal key value {other}"))),
    })
}

/// Node `i`'s journal, on the checked tables it replicates.
pub fn journal_of(
    db: &marmot_core::sqlite::Db,
    selection: &TableSelection,
) -> Result<BTreeSet<(String, Vec<ValueKey>, Version)>, Failure> {
    let entries = db.conflicts(&Default::default()).map_err(|e| Failure(format!("reading the journal: {e}")))?;
    let mut out = BTreeSet::new();
    for c in entries.into_iter().filter(|c| CHECKED.contains(&c.table.as_str()) && selection.selects(&c.table)) {
        let table = schema::table(&c.table).expect("checked tables are known");
        let key: serde_json::Value =
            serde_json::from_str(&c.key).map_err(|e| Failure(format!("journal key {}: {e}", c.key)))?;
        let values = key.as_array().ok_or_else(|| Failure(format!("journal key {} is not an array", c.key)))?;
        let key = values.iter().map(|v| from_json(v).map(|v| canonical(&v, table.fold))).collect::<Result<_, _>>()?;
        out.insert((c.table, key, c.loser));
    }
    Ok(out)
}

/// Every node's journal equals the expected set of lost writes (on the tables it
/// replicates). Returns how many writes were lost.
pub fn check(published: &Published, nodes: &[(&marmot_core::sqlite::Db, &TableSelection)]) -> Result<u64, Failure> {
    if let Some((row, v, bases)) = published.inconsistent.first() {
        return Err(Failure(format!(
            "{v:?} of {row:?} was published more than once, with bases {bases:?} (of {} such changes)",
            published.inconsistent.len()
        )));
    }
    let expected = published.expected();
    for (i, (db, selection)) in nodes.iter().enumerate() {
        let certain = |v: &Version| !published.set_aside_stored.contains(v);
        let want: BTreeSet<_> =
            expected.iter().filter(|(t, _, v)| selection.selects(t) && certain(v)).cloned().collect();
        let got: BTreeSet<_> = journal_of(db, selection)?
            .into_iter()
            .filter(|(t, k, v)| published.followed(&(t.clone(), k.clone())) && certain(v))
            .collect();
        if got != want {
            let missing: Vec<_> = want.difference(&got).take(5).collect();
            let extra: Vec<_> = got.difference(&want).take(5).collect();
            let history = |(t, k, _): &&(String, Vec<ValueKey>, Version)| {
                let writes = published.rows.get(&(t.clone(), k.clone()));
                format!("{t} {k:?}: writes (version -> base) {writes:?}")
            };
            let rows: Vec<String> = missing.iter().chain(&extra).map(history).collect();
            return Err(Failure(format!(
                "node {i}'s conflict journal differs: missing {missing:?}, extra {extra:?}\n  {}",
                rows.join("\n  ")
            )));
        }
    }
    Ok(expected.len() as u64)
}
