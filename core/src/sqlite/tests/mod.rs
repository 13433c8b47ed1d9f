//! Tests of the SQLite side against real database files: capture, the reader, the merge.
//!
//! Every test builds its nodes in temporary directories: a WAL database created by an
//! "application" connection (plain rusqlite, as any other SQLite library would), and a
//! [`Db`] on the same file, as the side-car holds it.

mod capture;
mod conflicts;
mod ddl;
mod foreign_writers;
mod identifiers;
mod install;
mod merge;
mod real_schemas;
mod schema_changes;
mod unique;
mod verify;

use std::path::PathBuf;

use rusqlite::Connection;
use tempfile::TempDir;

use super::{quote, ApplyOutcome, CaptureOptions, Db};
use crate::model::{Batch, Hlc, NodeId, Op, Position, RowChange, Shard, TableChanges, Value};
use crate::source::Pending;

/// One node: the application's connection and the side-car's [`Db`] on one WAL file.
struct Node {
    db: Db,
    app: Connection,
    path: PathBuf,
    _dir: TempDir,
}

/// A node with `schema` created by the application, then capture installed.
fn node(id: u64, schema: &str) -> Node {
    node_with(id, schema, CaptureOptions::default())
}

fn node_with(id: u64, schema: &str, opts: CaptureOptions) -> Node {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("app.db");
    let app = Connection::open(&path).expect("open app connection");
    app.busy_timeout(std::time::Duration::from_secs(5)).expect("busy timeout");
    let mode: String = app.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0)).expect("set WAL");
    assert_eq!(mode, "wal", "test databases run in WAL mode");
    app.execute_batch(schema).expect("create the application schema");
    let db = Db::open(&path, NodeId(id), opts).expect("open Db and install capture");
    Node { db, app, path, _dir: dir }
}

impl Node {
    /// Runs SQL on the application's own connection.
    fn exec(&self, sql: &str) {
        self.app.execute_batch(sql).unwrap_or_else(|e| panic!("app SQL failed: {e}\n{sql}"));
    }

    /// The pending batch; panics when nothing is pending.
    fn pending(&mut self) -> Pending {
        self.db.read_pending().expect("read_pending").expect("changes pending")
    }

    /// Acknowledges everything pending, as if it were published.
    fn acknowledge_all(&mut self) -> Pending {
        let p = self.pending();
        self.db.acknowledge(p.through).expect("acknowledge");
        p
    }

    /// Applies a batch at position 0 (no position stored).
    fn apply(&mut self, batch: &Batch) -> ApplyOutcome {
        self.db.apply_batch(Shard(0), Position(0), batch, None).expect("apply_batch")
    }

    /// Every row of `table`, in a canonical order.
    fn dump(&self, table: &str) -> Vec<Vec<Value>> {
        dump(&self.app, table)
    }

    /// Number of rows in `table`.
    fn count(&self, table: &str) -> i64 {
        let sql = format!("SELECT count(*) FROM {}", quote(table));
        self.app.query_row(&sql, [], |r| r.get(0)).expect("count rows")
    }

    /// Marmot's triggers as (name, sql), by name.
    fn marmot_triggers(&self) -> Vec<(String, String, String)> {
        let mut stmt = self
            .app
            .prepare(
                "SELECT name, tbl_name, sql FROM sqlite_master WHERE type = 'trigger' \
                 AND substr(name, 1, 10) = '__marmot__' ORDER BY name",
            )
            .expect("list triggers");
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).expect("list triggers");
        rows.collect::<rusqlite::Result<_>>().expect("list triggers")
    }
}

fn dump(conn: &Connection, table: &str) -> Vec<Vec<Value>> {
    let mut stmt = conn.prepare(&format!("SELECT * FROM {}", quote(table))).expect("select all");
    let n = stmt.column_count();
    let mut rows: Vec<Vec<Value>> = stmt
        .query_map([], |r| (0..n).map(|i| Ok(Value::from(r.get_ref(i)?))).collect())
        .expect("select all")
        .collect::<rusqlite::Result<_>>()
        .expect("select all");
    rows.sort_by_key(|r| format!("{r:?}"));
    rows
}

fn int(i: i64) -> Value {
    Value::Integer(i)
}

fn text(s: &str) -> Value {
    Value::Text(s.to_owned())
}

fn real(f: f64) -> Value {
    Value::Real(f)
}

const NULL: Value = Value::Null;

fn upsert(hlc: u64, values: Vec<Value>) -> RowChange {
    RowChange { hlc: Hlc(hlc), op: Op::Upsert, values, base: None }
}

fn delete(hlc: u64, values: Vec<Value>) -> RowChange {
    RowChange { hlc: Hlc(hlc), op: Op::Delete, values, base: None }
}

/// A hand-built batch of one table.
fn batch(origin: u64, table: &str, columns: &[&str], pk: &[usize], rows: Vec<RowChange>) -> Batch {
    Batch { origin: NodeId(origin), tables: vec![changes(table, columns, pk, rows)], ..Batch::default() }
}

fn changes(table: &str, columns: &[&str], pk: &[usize], rows: Vec<RowChange>) -> TableChanges {
    TableChanges {
        table: table.to_owned(),
        columns: columns.iter().map(|c| (*c).to_owned()).collect(),
        pk: pk.to_vec(),
        rows,
    }
}

/// The rows of one table in a batch, as (op, values).
fn rows_of(batch: &Batch, table: &str) -> Vec<(Op, Vec<Value>)> {
    batch
        .tables
        .iter()
        .find(|t| t.table == table)
        .unwrap_or_else(|| panic!("batch has no changes of {table:?}"))
        .rows
        .iter()
        .map(|r| (r.op, r.values.clone()))
        .collect()
}

/// Every version in a batch, in batch order (tables in turn, rows in order).
fn hlcs(batch: &Batch) -> Vec<Hlc> {
    batch.tables.iter().flat_map(|t| t.rows.iter().map(|r| r.hlc)).collect()
}

/// Milliseconds since the epoch, for building versions near the wall clock.
fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock after 1970").as_millis() as u64
}

/// The simple table most tests use.
const T: &str = "CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT, score REAL);";
const T_COLS: [&str; 3] = ["id", "name", "score"];
