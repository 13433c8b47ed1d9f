//! The data model shared by every part of Marmot: values, versions, row changes and batches.
//!
//! Everything here is plain data. The SQLite side produces and consumes it, the wire format
//! encodes it, and transports carry it as opaque bytes.

use std::cmp::Ordering;
use std::fmt;

/// A node's identity in the cluster. `0` is reserved and never valid.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub u64);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A hybrid logical clock value: milliseconds since the Unix epoch in the high 48 bits,
/// a counter in the low 16 bits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hlc(pub u64);

impl Hlc {
    /// The smallest clock value for a physical time in milliseconds.
    pub fn from_millis(ms: u64) -> Hlc {
        Hlc(ms << 16)
    }

    /// The physical part of the clock, in milliseconds since the Unix epoch.
    pub fn millis(self) -> u64 {
        self.0 >> 16
    }
}

impl fmt::Display for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.0 >> 16, self.0 & 0xffff)
    }
}

/// The version of one row change. Versions are totally ordered: by `hlc`, then `node`.
/// Last-writer-wins keeps, per row, the change with the greatest version.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Version {
    /// When the change was made, on its origin's clock.
    pub hlc: Hlc,
    /// The node that made the change.
    pub node: NodeId,
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.hlc, self.node).cmp(&(other.hlc, other.node))
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.hlc, self.node)
    }
}

/// Index of a log shard (a JetStream stream, or one log of the memory transport).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Shard(pub u32);

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A position in a shard's log. Positions start at 1; `Position(0)` means "before the first
/// entry" (nothing consumed yet).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position(pub u64);

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// One SQLite value, exactly as stored: the five storage classes.
#[derive(Clone, Debug)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// A 64-bit signed integer.
    Integer(i64),
    /// A 64-bit IEEE float; compared and carried bit-exactly.
    Real(f64),
    /// UTF-8 text.
    Text(String),
    /// Arbitrary bytes, possibly empty.
    Blob(Vec<u8>),
}

impl PartialEq for Value {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Value::Null, Value::Null) => true,
            (Value::Integer(a), Value::Integer(b)) => a == b,
            (Value::Real(a), Value::Real(b)) => a.to_bits() == b.to_bits(),
            (Value::Text(a), Value::Text(b)) => a == b,
            (Value::Blob(a), Value::Blob(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for Value {}

impl Value {
    /// True for SQL NULL.
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }
}

impl From<rusqlite::types::Value> for Value {
    fn from(v: rusqlite::types::Value) -> Self {
        use rusqlite::types::Value as V;
        match v {
            V::Null => Value::Null,
            V::Integer(i) => Value::Integer(i),
            V::Real(r) => Value::Real(r),
            V::Text(t) => Value::Text(t),
            V::Blob(b) => Value::Blob(b),
        }
    }
}

impl From<rusqlite::types::ValueRef<'_>> for Value {
    fn from(v: rusqlite::types::ValueRef<'_>) -> Self {
        use rusqlite::types::ValueRef as V;
        match v {
            V::Null => Value::Null,
            V::Integer(i) => Value::Integer(i),
            V::Real(r) => Value::Real(r),
            V::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
            V::Blob(b) => Value::Blob(b.to_vec()),
        }
    }
}

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(ToSqlOutput::Borrowed(match self {
            Value::Null => ValueRef::Null,
            Value::Integer(i) => ValueRef::Integer(*i),
            Value::Real(r) => ValueRef::Real(*r),
            Value::Text(t) => ValueRef::Text(t.as_bytes()),
            Value::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

/// What a row change does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// The row now has the carried image (insert or update: the merge treats both alike).
    Upsert,
    /// The row was deleted; only the primary key is carried.
    Delete,
}

/// One captured change of one row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowChange {
    /// The change's version on its origin.
    pub hlc: Hlc,
    /// Upsert or delete.
    pub op: Op,
    /// Column values in the order of [`TableChanges::columns`]. For a delete, only the
    /// primary-key columns are meaningful; the others are NULL.
    pub values: Vec<Value>,
    /// The version the row held on its origin before this change (its *base*); `None`
    /// when the row did not exist there or the origin did not say. A change whose base is
    /// another write's version was made by someone who had that write: that write is
    /// not lost (see the conflict journal, docs/conflicts.md).
    pub base: Option<Version>,
}

/// The changes of one table within a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableChanges {
    /// The table's name, unquoted.
    pub table: String,
    /// Column names, in the order the values are carried.
    pub columns: Vec<String>,
    /// Indexes into `columns` of the primary key, in key order.
    pub pk: Vec<usize>,
    /// Row changes in commit order.
    pub rows: Vec<RowChange>,
}

/// A batch: the union of one or more whole committed transactions of one origin node.
/// It is published, delivered and applied as one unit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Batch {
    /// The node whose application made these changes.
    pub origin: NodeId,
    /// Changes grouped by table. A table appears at most once.
    pub tables: Vec<TableChanges>,
    /// Schema changes (only in entries of the schema log, shard 0; no rows then).
    pub schema: Option<SchemaChanges>,
    /// The origin's schema fingerprint when it read these changes (0: not known).
    pub schema_fingerprint: u64,
}

/// The kind of a schema object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectKind {
    /// A table (ordinary or virtual).
    Table,
    /// An index.
    Index,
    /// A view.
    View,
    /// A trigger.
    Trigger,
}

impl ObjectKind {
    /// The name `sqlite_master.type` uses.
    pub fn as_str(self) -> &'static str {
        match self {
            ObjectKind::Table => "table",
            ObjectKind::Index => "index",
            ObjectKind::View => "view",
            ObjectKind::Trigger => "trigger",
        }
    }

    /// Parses `sqlite_master.type`.
    pub fn parse(s: &str) -> Option<ObjectKind> {
        match s {
            "table" => Some(ObjectKind::Table),
            "index" => Some(ObjectKind::Index),
            "view" => Some(ObjectKind::View),
            "trigger" => Some(ObjectKind::Trigger),
            _ => None,
        }
    }
}

/// How one schema object changed on its origin: its definition before and after (as
/// `sqlite_master.sql` holds it; `None`: absent).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectChange {
    /// What the object is.
    pub kind: ObjectKind,
    /// Its name.
    pub name: String,
    /// The table it belongs to (itself for a table).
    pub table: String,
    /// A table renamed into this one: its former name.
    pub renamed_from: Option<String>,
    /// A table dropped and created again under the same name (or replaced by one that was
    /// never replicated): nodes drop theirs and create it anew; its origin sends its rows.
    pub replaced: bool,
    /// Its definition before the change.
    pub before: Option<String>,
    /// Its definition after the change.
    pub after: Option<String>,
}

/// The schema changes one node noticed at once, in the order they are applied.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SchemaChanges {
    /// When the origin noticed them (orders and distinguishes a node's schema entries).
    pub hlc: Hlc,
    /// The changed objects.
    pub objects: Vec<ObjectChange>,
}

impl Batch {
    /// Number of row changes in the batch.
    pub fn len(&self) -> usize {
        self.tables.iter().map(|t| t.rows.len()).sum()
    }

    /// True when the batch carries no row change.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The smallest version in the batch, if any.
    pub fn min_hlc(&self) -> Option<Hlc> {
        self.tables.iter().flat_map(|t| t.rows.iter().map(|r| r.hlc)).min()
    }

    /// The greatest version in the batch, if any.
    pub fn max_hlc(&self) -> Option<Hlc> {
        self.tables.iter().flat_map(|t| t.rows.iter().map(|r| r.hlc)).max()
    }
}
