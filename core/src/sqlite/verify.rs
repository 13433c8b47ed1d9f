//! Digests of the replicated tables, for `marmot verify`: two nodes hold the same rows in a
//! table exactly when its digests are equal (up to 64-bit hash collisions).
//!
//! Each row falls in one of [`DIGEST_BUCKETS`] buckets by a hash of its canonical key (the
//! key as SQLite compares it: [`TableInfo::key`]), and within it in one of as many
//! sub-buckets by more bits of that hash; a (sub-)bucket's digest is the wrapping sum of
//! the hashes of its rows (key and every value, with its storage class), so it does not
//! depend on the order rows are read in. Nodes compare bucket digests, then the
//! sub-bucket digests of a bucket that differs ([`Db::sub_digests`]), then the rows of the
//! sub-buckets that differ ([`Db::bucket_rows`]): a 10-million-row table with one
//! differing row ships about 150 rows. Everything is read in one read transaction, with the stream
//! positions it reflects: a WAL reader never blocks the application's writes.

use rusqlite::types::ValueRef;
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::{xxh3_64, Xxh3};

use super::{quote, schema::TableInfo, Db};
use crate::error::{Result, SqlContext};
use crate::model::{Hlc, Position, Shard, Value};

/// Buckets per table.
pub const DIGEST_BUCKETS: usize = 256;

/// One table's digest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableDigest {
    /// The table.
    pub table: String,
    /// Its rows.
    pub rows: u64,
    /// Per bucket, the wrapping sum of its rows' hashes.
    pub buckets: Vec<u64>,
}

/// What a node holds, read in one transaction.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Digests {
    /// Stream positions applied when read, per shard.
    pub positions: Vec<(u32, u64)>,
    /// The highest local version published then, and the clock (every version produced or
    /// applied here is at most that).
    pub published: u64,
    /// See [`published`](Self::published).
    pub clock: u64,
    /// The highest local version captured then, published or not.
    pub local: u64,
    /// One per replicated table, by name.
    pub tables: Vec<TableDigest>,
}

/// One row of a bucket that differs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BucketRow {
    /// The key's values, canonical (as the key's collations compare them).
    pub key: Vec<Value>,
    /// The row's hash (equal rows, equal hashes).
    pub hash: u64,
    /// Its version here (`hlc`, node), if Marmot has one.
    pub version: Option<(u64, u64)>,
}

fn decode_key(key: &[u8]) -> Result<Vec<Value>> {
    ciborium::from_reader(key).map_err(|e| crate::error::Error::Corrupt(format!("a row key: {e}")))
}

/// The bucket and sub-bucket of a canonical key.
fn bucket_of(key: &[u8]) -> (usize, usize) {
    let h = xxh3_64(key);
    let n = DIGEST_BUCKETS as u64;
    ((h % n) as usize, ((h / n) % n) as usize)
}

fn hash_value(h: &mut Xxh3, v: ValueRef<'_>) {
    match v {
        ValueRef::Null => h.update(&[0]),
        ValueRef::Integer(i) => {
            h.update(&[1]);
            h.update(&i.to_le_bytes());
        }
        ValueRef::Real(f) => {
            h.update(&[2]);
            h.update(&f.to_bits().to_le_bytes());
        }
        ValueRef::Text(t) => {
            h.update(&[3]);
            h.update(&(t.len() as u64).to_le_bytes());
            h.update(t);
        }
        ValueRef::Blob(b) => {
            h.update(&[4]);
            h.update(&(b.len() as u64).to_le_bytes());
            h.update(b);
        }
    }
}

/// Scans `t`, calling `each((bucket, sub-bucket), canonical key bytes, row hash)` per row
/// (rows whose key holds NULL are not replicated and are passed over).
fn scan(conn: &rusqlite::Connection, t: &TableInfo, mut each: impl FnMut((usize, usize), &[u8], u64)) -> Result<()> {
    let cols: Vec<String> = t.columns.iter().map(|c| quote(c)).collect();
    let sql = format!("SELECT {} FROM {}", cols.join(", "), quote(&t.name));
    let mut stmt = conn.prepare(&sql).ctx(|| format!("reading {:?} for its digest", t.name))?;
    let mut rows = stmt.query([]).ctx(|| format!("reading {:?}", t.name))?;
    while let Some(r) = rows.next().ctx(|| format!("reading {:?}", t.name))? {
        let pk: Vec<Value> =
            t.pk.iter()
                .map(|&i| r.get_ref(i).map(Value::from))
                .collect::<rusqlite::Result<_>>()
                .ctx(|| format!("reading {:?}", t.name))?;
        if pk.iter().any(Value::is_null) {
            continue;
        }
        let key = t.key(&pk);
        let mut h = Xxh3::new();
        h.update(&(key.len() as u64).to_le_bytes());
        h.update(&key);
        for i in 0..t.columns.len() {
            hash_value(&mut h, r.get_ref(i).ctx(|| format!("reading {:?}", t.name))?);
        }
        each(bucket_of(&key), &key, h.digest());
    }
    Ok(())
}

impl Db {
    /// The digests of every replicated table, with the positions and versions they
    /// reflect, read in one read transaction.
    pub fn digests(&self) -> Result<Digests> {
        let tx = self.conn.unchecked_transaction().ctx(|| "starting a read for digests".into())?;
        let positions = self.positions()?.into_iter().map(|(s, p)| (s.0, p.0)).collect();
        let (published, clock) = (self.published_hlc()?.0, self.clock()?.0);
        let logged: Option<i64> =
            tx.query_row("SELECT max(hlc) FROM __marmot__log", [], |r| r.get(0)).ctx(|| "reading the log".into())?;
        let local = published.max(logged.unwrap_or(0) as u64);
        let mut tables = Vec::new();
        for t in &self.schema().tables {
            let mut d = TableDigest { table: t.name.clone(), rows: 0, buckets: vec![0; DIGEST_BUCKETS] };
            scan(&tx, t, |(b, _), _, h| {
                d.rows += 1;
                d.buckets[b] = d.buckets[b].wrapping_add(h);
            })?;
            tables.push(d);
        }
        tables.sort_by(|a, b| a.table.cmp(&b.table));
        tx.commit().ctx(|| "ending the read for digests".into())?;
        Ok(Digests { positions, published, clock, local, tables })
    }

    /// The digests of the sub-buckets of `bucket` in `table` (empty when this node does not
    /// replicate `table`).
    pub fn sub_digests(&self, table: &str, bucket: usize) -> Result<Vec<u64>> {
        let Some(t) = self.schema().tables.iter().find(|t| t.name == table) else { return Ok(Vec::new()) };
        let mut subs = vec![0u64; DIGEST_BUCKETS];
        scan(&self.conn, t, |(b, sub), _, h| {
            if b == bucket {
                subs[sub] = subs[sub].wrapping_add(h);
            }
        })?;
        Ok(subs)
    }

    /// The rows of `table` in `bucket` and one of `subs` (every sub-bucket when empty),
    /// tombstones included, with their versions, by canonical key; empty when this node
    /// does not replicate `table`.
    pub fn bucket_rows(&self, table: &str, bucket: usize, subs: &[usize]) -> Result<Vec<BucketRow>> {
        let Some(t) = self.schema().tables.iter().find(|t| t.name == table) else { return Ok(Vec::new()) };
        let Some(id) = self.id_of(table) else { return Ok(Vec::new()) };
        let wanted = |(b, sub): (usize, usize)| b == bucket && (subs.is_empty() || subs.contains(&sub));
        let tx = self.conn.unchecked_transaction().ctx(|| "starting a read of buckets".into())?;
        let mut found = Vec::new();
        scan(&tx, t, |at, key, hash| {
            if wanted(at) {
                found.push((key.to_vec(), hash));
            }
        })?;
        let mut out = Vec::with_capacity(found.len());
        for (key, hash) in found {
            let version = super::version_of(&tx, id, &key)?.map(|(v, _)| (v.hlc.0, v.node.0));
            out.push(BucketRow { key: decode_key(&key)?, hash, version });
        }
        // Tombstones in those buckets: a key deleted here and present elsewhere.
        let mut stmt = tx
            .prepare("SELECT pk, hlc, node FROM __marmot__versions WHERE tbl = ?1 AND deleted = 1")
            .ctx(|| "reading tombstones".into())?;
        let mut rows = stmt.query([id]).ctx(|| "reading tombstones".into())?;
        while let Some(r) = rows.next().ctx(|| "reading tombstones".into())? {
            let key: Vec<u8> = r.get(0).ctx(|| "reading tombstones".into())?;
            if !wanted(bucket_of(&key)) {
                continue;
            }
            let pk = decode_key(&key)?;
            let (hlc, node): (i64, i64) = (r.get(1).ctx(|| "hlc".into())?, r.get(2).ctx(|| "node".into())?);
            out.push(BucketRow { key: pk, hash: 0, version: Some((hlc as u64, node as u64)) });
        }
        drop(rows);
        drop(stmt);
        tx.commit().ctx(|| "ending the read of buckets".into())?;
        out.sort_by(|a, b| format!("{:?}", a.key).cmp(&format!("{:?}", b.key)));
        Ok(out)
    }
}

impl Digests {
    /// This node's stream positions.
    pub fn position(&self, shard: Shard) -> Position {
        Position(self.positions.iter().find(|(s, _)| *s == shard.0).map_or(0, |(_, p)| *p))
    }

    /// The published version, as an [`Hlc`].
    pub fn published_hlc(&self) -> Hlc {
        Hlc(self.published)
    }
}
