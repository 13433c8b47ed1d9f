//! The wire format: how a [`Batch`] becomes transport entries and back.
//!
//! Documented for third parties in `docs/wire-format.md`. Every entry starts with a 4-byte
//! header — magic `M` `R`, the format version, flags — followed by one CBOR array
//! `[origin, batch_id, part_index, part_count, chunk]`. The chunks of all parts, in
//! `part_index` order, concatenate to the batch body: a CBOR map, zstd-compressed when
//! flag bit 0 is set. A reader rejects a version it does not know instead of misreading it.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};
use crate::model::{
    Batch, Hlc, NodeId, ObjectChange, ObjectKind, Op, Position, RowChange, SchemaChanges, TableChanges, Value, Version,
};

/// The wire-format version this build writes and reads.
pub const FORMAT_VERSION: u8 = 1;
const MAGIC: [u8; 2] = *b"MR";
const FLAG_ZSTD: u8 = 1;
const HEADER_LEN: usize = 4;
const ZSTD_LEVEL: i32 = 3;
/// Upper bound on the parts of one batch a reader buffers (bounds memory on bad input).
pub const PARTS_MAX: u32 = 1 << 16;

/// How batches are encoded.
#[derive(Clone, Copy, Debug)]
pub struct EncodeOptions {
    /// Compress the body with zstd.
    pub compress: bool,
    /// Maximum bytes of body carried by one part; larger batches are split.
    pub part_bytes_max: usize,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        EncodeOptions { compress: true, part_bytes_max: 512 * 1024 }
    }
}

/// One encoded transport entry of a batch.
#[derive(Clone, Debug)]
pub struct EncodedPart {
    /// Deduplication id: origin, batch id and part, unique per batch content.
    pub id: String,
    /// The entry's bytes.
    pub payload: Bytes,
}

impl Serialize for Value {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Value::Null => s.serialize_unit(),
            Value::Integer(i) => s.serialize_i64(*i),
            Value::Real(r) => s.serialize_f64(*r),
            Value::Text(t) => s.serialize_str(t),
            Value::Blob(b) => s.serialize_bytes(b),
        }
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("null, an integer, a float, a text string or a byte string")
    }
    fn visit_unit<E: de::Error>(self) -> std::result::Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E: de::Error>(self) -> std::result::Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<Value, E> {
        Ok(Value::Integer(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<Value, E> {
        i64::try_from(v).map(Value::Integer).map_err(|_| E::custom("integer out of i64 range"))
    }
    fn visit_i128<E: de::Error>(self, v: i128) -> std::result::Result<Value, E> {
        i64::try_from(v).map(Value::Integer).map_err(|_| E::custom("integer out of i64 range"))
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> std::result::Result<Value, E> {
        i64::try_from(v).map(Value::Integer).map_err(|_| E::custom("integer out of i64 range"))
    }
    fn visit_f32<E: de::Error>(self, v: f32) -> std::result::Result<Value, E> {
        Ok(Value::Real(v as f64))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> std::result::Result<Value, E> {
        Ok(Value::Real(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Value, E> {
        Ok(Value::Text(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> std::result::Result<Value, E> {
        Ok(Value::Text(v))
    }
    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> std::result::Result<Value, E> {
        Ok(Value::Blob(v.to_vec()))
    }
    fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> std::result::Result<Value, E> {
        Ok(Value::Blob(v))
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Value, D::Error> {
        d.deserialize_any(ValueVisitor)
    }
}

#[derive(Serialize, Deserialize)]
struct WireBatch {
    origin: u64,
    tables: Vec<WireTable>,
    /// Schema changes (schema log entries only); absent in data batches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    schema: Option<WireSchema>,
    /// The origin's schema fingerprint; absent when not known.
    #[serde(default, skip_serializing_if = "is_zero")]
    fingerprint: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

#[derive(Serialize, Deserialize)]
struct WireSchema {
    hlc: u64,
    objects: Vec<WireObject>,
}

/// (kind, name, table, renamed from, before, after, replaced)
type WireObject = (String, String, String, Option<String>, Option<String>, Option<String>, bool);

#[derive(Serialize, Deserialize)]
struct WireTable {
    table: String,
    columns: Vec<String>,
    pk: Vec<u32>,
    rows: Vec<(u64, u8, Vec<Value>)>,
    /// Per row, its base as `(hlc, node)` (`(0, 0)`: none); absent when no row has one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    bases: Vec<(u64, u64)>,
}

#[derive(Serialize, Deserialize)]
struct WirePart(u64, u64, u32, u32, #[serde(with = "serde_bytes_compat")] Vec<u8>);

/// Byte strings for the chunk (serde's default for `Vec<u8>` is an array of integers).
mod serde_bytes_compat {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        match crate::model::Value::deserialize(d)? {
            crate::model::Value::Blob(b) => Ok(b),
            _ => Err(serde::de::Error::custom("chunk must be a byte string")),
        }
    }
}

fn to_cbor<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(v, &mut out).expect("CBOR encoding into a Vec cannot fail");
    out
}

/// Encodes the batch body (uncompressed CBOR).
pub fn encode_body(batch: &Batch) -> Vec<u8> {
    let wire = WireBatch {
        origin: batch.origin.0,
        tables: batch
            .tables
            .iter()
            .map(|t| WireTable {
                table: t.table.clone(),
                columns: t.columns.clone(),
                pk: t.pk.iter().map(|&i| i as u32).collect(),
                rows: t.rows.iter().map(|r| (r.hlc.0, matches!(r.op, Op::Delete) as u8, r.values.clone())).collect(),
                bases: match t.rows.iter().any(|r| r.base.is_some()) {
                    true => t.rows.iter().map(|r| r.base.map_or((0, 0), |b| (b.hlc.0, b.node.0))).collect(),
                    false => Vec::new(),
                },
            })
            .collect(),
        schema: batch.schema.as_ref().map(to_wire_schema),
        fingerprint: batch.schema_fingerprint,
    };
    to_cbor(&wire)
}

fn to_wire_schema(c: &SchemaChanges) -> WireSchema {
    WireSchema {
        hlc: c.hlc.0,
        objects: c
            .objects
            .iter()
            .map(|o| {
                let kind = o.kind.as_str().to_owned();
                let (name, table, from) = (o.name.clone(), o.table.clone(), o.renamed_from.clone());
                (kind, name, table, from, o.before.clone(), o.after.clone(), o.replaced)
            })
            .collect(),
    }
}

fn from_wire_schema(w: WireSchema) -> Result<SchemaChanges> {
    let mut objects = Vec::with_capacity(w.objects.len());
    for (kind, name, table, renamed_from, before, after, replaced) in w.objects {
        let kind = ObjectKind::parse(&kind).ok_or_else(|| Error::Corrupt(format!("unknown schema object {kind:?}")))?;
        objects.push(ObjectChange { kind, name, table, renamed_from, before, after, replaced });
    }
    Ok(SchemaChanges { hlc: Hlc(w.hlc), objects })
}

/// Encodes schema changes on their own (CBOR), as a node queues them before publishing.
pub fn encode_schema(changes: &SchemaChanges) -> Vec<u8> {
    to_cbor(&to_wire_schema(changes))
}

/// Decodes what [`encode_schema`] produced.
pub fn decode_schema(bytes: &[u8]) -> Result<SchemaChanges> {
    let w: WireSchema = ciborium::from_reader(bytes).map_err(|e| Error::Corrupt(format!("schema changes: {e}")))?;
    from_wire_schema(w)
}

/// Decodes a batch body produced by [`encode_body`].
pub fn decode_body(body: &[u8]) -> Result<Batch> {
    let wire: WireBatch = ciborium::from_reader(body).map_err(|e| Error::Corrupt(format!("batch body: {e}")))?;
    let mut tables = Vec::with_capacity(wire.tables.len());
    for t in wire.tables {
        let width = t.columns.len();
        if t.pk.is_empty() || t.pk.iter().any(|&i| i as usize >= width) {
            return Err(Error::Corrupt(format!("table {:?}: bad primary key columns", t.table)));
        }
        if !t.bases.is_empty() && t.bases.len() != t.rows.len() {
            return Err(Error::Corrupt(format!(
                "table {:?}: {} bases for {} rows",
                t.table,
                t.bases.len(),
                t.rows.len()
            )));
        }
        let mut rows = Vec::with_capacity(t.rows.len());
        for (n, (hlc, op, values)) in t.rows.into_iter().enumerate() {
            if values.len() != width {
                return Err(Error::Corrupt(format!(
                    "table {:?}: row has {} values for {} columns",
                    t.table,
                    values.len(),
                    width
                )));
            }
            let op = match op {
                0 => Op::Upsert,
                1 => Op::Delete,
                other => return Err(Error::Corrupt(format!("unknown operation {other}"))),
            };
            let base = t
                .bases
                .get(n)
                .filter(|&&(hlc, node)| (hlc, node) != (0, 0))
                .map(|&(hlc, node)| Version { hlc: Hlc(hlc), node: NodeId(node) });
            rows.push(RowChange { hlc: Hlc(hlc), op, values, base });
        }
        let pk = t.pk.into_iter().map(|i| i as usize).collect();
        tables.push(TableChanges { table: t.table, columns: t.columns, pk, rows });
    }
    let schema = wire.schema.map(from_wire_schema).transpose()?;
    Ok(Batch { origin: NodeId(wire.origin), tables, schema, schema_fingerprint: wire.fingerprint })
}

/// Encodes a batch into one or more transport entries.
pub fn encode_batch(batch: &Batch, opts: EncodeOptions) -> Vec<EncodedPart> {
    let mut body = encode_body(batch);
    let mut flags = 0;
    if opts.compress {
        body = zstd::bulk::compress(&body, ZSTD_LEVEL).expect("zstd compression of a buffer");
        flags |= FLAG_ZSTD;
    }
    let batch_id = xxhash_rust::xxh3::xxh3_64(&body);
    let chunk_len = opts.part_bytes_max.max(1);
    let chunks: Vec<&[u8]> = if body.is_empty() { vec![&body[..]] } else { body.chunks(chunk_len).collect() };
    let count = chunks.len() as u32;
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, chunk)| {
            let part = WirePart(batch.origin.0, batch_id, i as u32, count, chunk.to_vec());
            let mut payload = vec![MAGIC[0], MAGIC[1], FORMAT_VERSION, flags];
            ciborium::into_writer(&part, &mut payload).expect("CBOR into a Vec");
            EncodedPart {
                id: format!("{}-{:016x}-{}-{}", batch.origin.0, batch_id, i, count),
                payload: Bytes::from(payload),
            }
        })
        .collect()
}

/// The decoded header of one entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartHeader {
    /// The batch's origin node.
    pub origin: NodeId,
    /// Identifies the batch among its origin's batches.
    pub batch_id: u64,
    /// This part's index, `0..part_count`.
    pub part_index: u32,
    /// How many parts the batch has.
    pub part_count: u32,
    /// Whether the body is zstd-compressed.
    pub compressed: bool,
}

/// Splits an entry into its header and chunk.
pub fn decode_part(payload: &[u8]) -> Result<(PartHeader, Vec<u8>)> {
    if payload.len() < HEADER_LEN || payload[0..2] != MAGIC {
        return Err(Error::Corrupt("not a Marmot message (bad magic)".into()));
    }
    if payload[2] != FORMAT_VERSION {
        return Err(Error::UnsupportedFormat { found: payload[2], supported: FORMAT_VERSION });
    }
    let flags = payload[3];
    if flags & !FLAG_ZSTD != 0 {
        return Err(Error::Corrupt(format!("unknown flags {flags:#04x}")));
    }
    let WirePart(origin, batch_id, part_index, part_count, chunk) =
        ciborium::from_reader(&payload[HEADER_LEN..]).map_err(|e| Error::Corrupt(format!("part header: {e}")))?;
    if part_count == 0 || part_index >= part_count || part_count > PARTS_MAX {
        return Err(Error::Corrupt(format!("part {part_index} of {part_count}")));
    }
    let header =
        PartHeader { origin: NodeId(origin), batch_id, part_index, part_count, compressed: flags & FLAG_ZSTD != 0 };
    Ok((header, chunk))
}

/// Decodes the concatenated chunks of a batch.
pub fn decode_chunks(compressed: bool, body: &[u8]) -> Result<Batch> {
    if compressed {
        let mut out = Vec::new();
        zstd::stream::copy_decode(body, &mut out).map_err(|e| Error::Corrupt(format!("zstd: {e}")))?;
        decode_body(&out)
    } else {
        decode_body(body)
    }
}

/// Decodes a batch carried by a single entry.
pub fn decode_single(payload: &[u8]) -> Result<Batch> {
    let (h, chunk) = decode_part(payload)?;
    if h.part_count != 1 {
        return Err(Error::Corrupt(format!("part {} of {}", h.part_index, h.part_count)));
    }
    decode_chunks(h.compressed, &chunk)
}

/// What feeding one entry to a [`Reassembler`] produced.
#[derive(Debug)]
pub enum Assembled {
    /// Nothing yet: the entry is a part of a batch still missing parts.
    Incomplete,
    /// A whole batch.
    Batch(Batch),
    /// The entry (or the batch it completes) could not be decoded; park it.
    Bad {
        /// Why it could not be decoded.
        error: Error,
        /// The raw bytes to park (all parts concatenated, with their headers).
        bytes: Vec<u8>,
    },
}

struct Partial {
    batch_id: u64,
    compressed: bool,
    first_position: Position,
    /// The reassembler's entry count when the first part arrived.
    fed_at: u64,
    chunks: BTreeMap<u32, Vec<u8>>,
    /// Each part as it arrived, with its position (parked as is if the batch never
    /// completes).
    parts: Vec<(Position, Vec<u8>)>,
    count: u32,
}

impl Partial {
    fn new(h: &PartHeader, first_position: Position, fed_at: u64) -> Partial {
        Partial {
            batch_id: h.batch_id,
            compressed: h.compressed,
            first_position,
            fed_at,
            chunks: BTreeMap::new(),
            parts: Vec::new(),
            count: h.part_count,
        }
    }

    fn raw(&self) -> Vec<u8> {
        self.parts.iter().flat_map(|(_, p)| p.iter().copied()).collect()
    }
}

/// An incomplete batch given up on: its other parts did not arrive within the
/// reassembler's bound. Park it ([`encode_stray`]); if the rest shows up later, feed the
/// parked parts back with [`Reassembler::adopt`].
#[derive(Debug)]
pub struct Stray {
    /// The batch's origin.
    pub origin: NodeId,
    /// The batch's id at its origin.
    pub batch_id: u64,
    /// How many parts the batch has.
    pub part_count: u32,
    /// The parts that arrived, with their positions.
    pub parts: Vec<(Position, Vec<u8>)>,
}

/// Entries after which an incomplete batch is given up on, unless configured.
pub const STRAY_AFTER_ENTRIES_DEFAULT: u64 = 1000;

/// Reassembles the parts of batches read from one shard, in position order.
///
/// Parts of different origins may interleave. When an origin starts a new batch while an
/// older one is incomplete, the older one is dropped: its origin crashed mid-publish and
/// republishes those changes (never acknowledged) in a later batch. An incomplete batch
/// whose origin never publishes again (it crashed for good, or is cut off) is given up on
/// after `stray_after` more entries ([`take_strays`](Self::take_strays)), so that it never
/// holds the shard's stored position back for ever.
pub struct Reassembler {
    partial: BTreeMap<u64, Partial>,
    /// First and last positions of multi-part batches completed lately: a stored position
    /// must never fall inside one, or a reader resuming there would see its later parts
    /// without the first (an orphan that never completes).
    completed: Vec<(Position, Position)>,
    fed: u64,
    stray_after: u64,
}

impl Default for Reassembler {
    fn default() -> Self {
        Reassembler::new(STRAY_AFTER_ENTRIES_DEFAULT)
    }
}

impl Reassembler {
    /// A reassembler that gives an incomplete batch up after `stray_after` more entries.
    pub fn new(stray_after: u64) -> Reassembler {
        Reassembler { partial: BTreeMap::new(), completed: Vec::new(), fed: 0, stray_after: stray_after.max(1) }
    }

    /// Feeds the entry at `position`.
    pub fn feed(&mut self, position: Position, payload: &[u8]) -> Assembled {
        self.fed += 1;
        let (h, chunk) = match decode_part(payload) {
            Ok(x) => x,
            Err(error) => return Assembled::Bad { error, bytes: payload.to_vec() },
        };
        if h.part_count == 1 {
            // A whole batch from this origin: any incomplete one of it was abandoned.
            self.partial.remove(&h.origin.0);
            return match decode_chunks(h.compressed, &chunk) {
                Ok(b) if b.origin == h.origin => Assembled::Batch(b),
                Ok(b) => Assembled::Bad {
                    error: Error::Corrupt(format!("origin {} in body, {} in header", b.origin, h.origin)),
                    bytes: payload.to_vec(),
                },
                Err(error) => Assembled::Bad { error, bytes: payload.to_vec() },
            };
        }
        let fed = self.fed;
        let p = self.partial.entry(h.origin.0).or_insert_with(|| Partial::new(&h, position, fed));
        if p.batch_id != h.batch_id || p.count != h.part_count || p.compressed != h.compressed {
            *p = Partial::new(&h, position, fed);
        }
        p.first_position = p.first_position.min(position);
        if p.chunks.insert(h.part_index, chunk).is_none() {
            p.parts.push((position, payload.to_vec()));
        }
        if p.chunks.len() < p.count as usize {
            return Assembled::Incomplete;
        }
        let p = self.partial.remove(&h.origin.0).expect("partial batch present");
        let last = p.parts.iter().map(|(pos, _)| *pos).max().unwrap_or(position);
        self.completed.push((p.first_position, last));
        let raw = p.raw();
        let body: Vec<u8> = p.chunks.into_values().flatten().collect();
        match decode_chunks(p.compressed, &body) {
            Ok(b) if b.origin == h.origin => Assembled::Batch(b),
            Ok(_) => Assembled::Bad { error: Error::Corrupt("origin mismatch".into()), bytes: raw },
            Err(error) => Assembled::Bad { error, bytes: raw },
        }
    }

    /// Feeds parts parked earlier as a [`Stray`] (when a later part of the same batch
    /// arrived). Returns what completed meanwhile (a batch whose other parts were already
    /// here), to be handled like any fed entry.
    pub fn adopt(&mut self, parts: &[(Position, Vec<u8>)]) -> Vec<Assembled> {
        let mut out = Vec::new();
        for (position, payload) in parts {
            self.fed = self.fed.saturating_sub(1);
            match self.feed(*position, payload) {
                Assembled::Incomplete => {}
                done => out.push(done),
            }
        }
        out
    }

    /// The origin and batch id of an entry, when it is one part of a multi-part batch.
    pub fn multi_part_key(payload: &[u8]) -> Option<(NodeId, u64)> {
        decode_part(payload).ok().filter(|(h, _)| h.part_count > 1).map(|(h, _)| (h.origin, h.batch_id))
    }

    /// Incomplete batches that waited more than `stray_after` entries for their other
    /// parts: removed here, to be parked by the caller.
    pub fn take_strays(&mut self) -> Vec<Stray> {
        let (fed, after) = (self.fed, self.stray_after);
        let old: Vec<u64> = self.partial.iter().filter(|(_, p)| fed - p.fed_at > after).map(|(o, _)| *o).collect();
        old.into_iter()
            .filter_map(|origin| self.partial.remove(&origin).map(|p| (origin, p)))
            .map(|(origin, p)| Stray {
                origin: NodeId(origin),
                batch_id: p.batch_id,
                part_count: p.count,
                parts: p.parts,
            })
            .collect()
    }

    /// The position up to which a consumer can record progress: everything at or before it
    /// is fully processed, given that everything through `done` has been fed.
    /// Incomplete batches hold it back so that a restart re-reads their parts, and it never
    /// falls between the parts of a batch completed meanwhile (a restart re-reads that
    /// batch whole; applying it again changes nothing).
    pub fn safe_position(&mut self, done: Position) -> Position {
        let mut held = self
            .partial
            .values()
            .map(|p| Position(p.first_position.0.saturating_sub(1)))
            .min()
            .map_or(done, |held| held.min(done));
        loop {
            let inside = self.completed.iter().find(|(first, last)| *first <= held && held < *last);
            match inside {
                Some((first, _)) => held = Position(first.0.saturating_sub(1)),
                None => break,
            }
        }
        self.completed.retain(|(_, last)| *last > held);
        held
    }

    /// Forgets every incomplete batch (after a resubscription).
    pub fn clear(&mut self) {
        self.partial.clear();
        self.completed.clear();
    }
}

/// Marks parked bytes that hold the parts of a [`Stray`].
const STRAY_MAGIC: &[u8; 4] = b"MRST";

/// One parked part: its position and its bytes.
#[derive(Serialize, Deserialize)]
struct WireStrayPart(u64, #[serde(with = "serde_bytes_compat")] Vec<u8>);

/// Encodes a stray's parts for parking.
pub fn encode_stray(stray: &Stray) -> Vec<u8> {
    let parts: Vec<WireStrayPart> = stray.parts.iter().map(|(p, b)| WireStrayPart(p.0, b.clone())).collect();
    let mut out = STRAY_MAGIC.to_vec();
    out.extend(to_cbor(&(stray.origin.0, stray.batch_id, parts)));
    out
}

/// Parts of a batch with their positions.
pub type Parts = Vec<(Position, Vec<u8>)>;

/// Decodes parked bytes written by [`encode_stray`]: origin, batch id and the parts.
pub fn decode_stray(bytes: &[u8]) -> Option<(NodeId, u64, Parts)> {
    let body = bytes.strip_prefix(STRAY_MAGIC)?;
    let (origin, batch_id, parts): (u64, u64, Vec<WireStrayPart>) = ciborium::from_reader(body).ok()?;
    Some((NodeId(origin), batch_id, parts.into_iter().map(|WireStrayPart(p, b)| (Position(p), b)).collect()))
}

#[cfg(test)]
#[path = "wire_tests.rs"]
mod tests;
