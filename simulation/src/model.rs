//! The oracle: the state every node must reach, computed from the set of all writes made,
//! never from any node's arrival order.

use std::collections::BTreeMap;

use marmot_core::{Value, Version};

use crate::schema::{Fold, Table};

/// One captured write, as the origin's capture recorded it.
#[derive(Clone, Debug)]
pub struct Write {
    /// Table name.
    pub table: String,
    /// Primary-key values.
    pub pk: Vec<Value>,
    /// Version.
    pub version: Version,
    /// Full row image in table column order, or `None` for a delete.
    pub image: Option<Vec<Value>>,
}

/// A sortable, exact key for one value: storage class, then value.
pub type ValueKey = (u8, i64, u64, Vec<u8>);

/// Orders values the way the canonical dump does (by storage class, then value).
pub fn value_key(v: &Value) -> ValueKey {
    match v {
        Value::Null => (0, 0, 0, vec![]),
        Value::Integer(i) => (1, *i, 0, vec![]),
        Value::Real(r) => (2, 0, r.to_bits(), vec![]),
        Value::Text(t) => (3, 0, 0, t.as_bytes().to_vec()),
        Value::Blob(b) => (4, 0, 0, b.clone()),
    }
}

/// The form every value SQLite takes as equal to `v` shares, under `fold`: integral reals
/// as integers (`1.0 = 1`), text case-folded for `NOCASE`. Written from SQLite's documented
/// comparison rules, independently of the merge code.
pub fn canonical(v: &Value, fold: Fold) -> ValueKey {
    match v {
        Value::Real(r) if r.fract() == 0.0 && r.abs() < 9.0e18 => value_key(&Value::Integer(*r as i64)),
        Value::Text(t) if fold == Fold::NoCase => value_key(&Value::Text(t.to_ascii_lowercase())),
        _ => value_key(v),
    }
}

/// A table's expected rows, sorted by primary key.
pub type Dump = BTreeMap<String, Vec<Vec<Value>>>;

/// Computes the converged state: per primary key the highest-version write; then, per
/// unique column, the highest version holds a value and the other claimants are set
/// aside (greedy by descending version, which is the unique stable assignment).
pub fn expected(writes: &[Write], tables: &[Table]) -> Dump {
    let mut out = Dump::new();
    for table in tables {
        let mut winners: BTreeMap<Vec<ValueKey>, &Write> = BTreeMap::new();
        for w in writes.iter().filter(|w| w.table == table.name) {
            let k: Vec<_> = w.pk.iter().map(|v| canonical(v, table.fold)).collect();
            match winners.get(&k) {
                Some(cur) if cur.version >= w.version => {}
                _ => {
                    winners.insert(k, w);
                }
            }
        }
        let mut live: Vec<&Write> = winners.values().copied().filter(|w| w.image.is_some()).collect();
        live.sort_by_key(|w| std::cmp::Reverse(w.version));
        let mut held: Vec<(usize, ValueKey)> = Vec::new();
        let mut rows: Vec<Vec<Value>> = Vec::new();
        for w in live {
            let image = w.image.as_ref().expect("live rows have images");
            let claims: Vec<(usize, ValueKey)> = table
                .unique
                .iter()
                .filter(|&&c| !image[c].is_null())
                .map(|&c| (c, canonical(&image[c], table.fold)))
                .collect();
            if claims.iter().any(|c| held.contains(c)) {
                continue;
            }
            held.extend(claims);
            rows.push(image.clone());
        }
        rows.sort_by_key(|r| table.pk.iter().map(|&i| value_key(&r[i])).collect::<Vec<_>>());
        out.insert(table.name.to_owned(), rows);
    }
    out
}
