//! The databases under test: creating them, reading them, and the canonical dump that
//! convergence is judged by.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use rusqlite::types::ValueRef;
use rusqlite::Connection;

/// Blobs longer than this are dumped as their length and a hash.
const BLOB_DUMP_BYTES_MAX: usize = 64;

/// Creates `path` as a WAL database with `schema` (SQL statements).
pub fn create_db(path: &Path, schema: &str) {
    let conn = Connection::open(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)).expect("switch to WAL");
    assert_eq!(mode, "wal", "journal mode of {}", path.display());
    conn.execute_batch(schema).unwrap_or_else(|e| panic!("schema of {}: {e}\n{schema}", path.display()));
}

/// A connection to `path` that waits up to 10 s for locks.
pub fn open(path: &Path) -> Connection {
    let conn = Connection::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    conn.busy_timeout(Duration::from_secs(10)).expect("busy timeout");
    conn
}

/// The single integer `sql` returns on `path` (NULL reads as 0).
pub fn query_i64(path: &Path, sql: &str) -> i64 {
    open(path)
        .query_row(sql, [], |r| r.get::<_, Option<i64>>(0))
        .unwrap_or_else(|e| panic!("{sql} on {}: {e}", path.display()))
        .unwrap_or(0)
}

/// The application's tables: not `sqlite_*`, not `__marmot__*`, sorted by name.
pub fn user_tables(conn: &Connection) -> Vec<String> {
    let mut stmt = conn
        .prepare(
            "SELECT name FROM sqlite_master WHERE type = 'table' \
             AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' \
             AND name NOT LIKE '\\_\\_marmot\\_\\_%' ESCAPE '\\' ORDER BY name",
        )
        .expect("list tables");
    let names = stmt.query_map([], |r| r.get(0)).and_then(|rows| rows.collect()).expect("list tables");
    names
}

/// A canonical text dump of every user table of `path` (see [`dump_tables`]).
pub fn dump(path: &Path) -> String {
    let conn = open(path);
    let tables = user_tables(&conn);
    let names: Vec<&str> = tables.iter().map(String::as_str).collect();
    dump_with(&conn, path, &names)
}

/// A canonical text dump of `tables` of `path`, read in one transaction: per table a
/// header line, then one line per row, rows sorted. Values carry their storage class
/// and exact bits (`i:`, `r:` with the IEEE bits, `t:`, `b:`, `NULL`), so two dumps are
/// equal only if the tables hold exactly the same values.
pub fn dump_tables(path: &Path, tables: &[&str]) -> String {
    dump_with(&open(path), path, tables)
}

fn dump_with(conn: &Connection, path: &Path, tables: &[&str]) -> String {
    let tx = conn.unchecked_transaction().expect("begin a read");
    let mut out = String::new();
    for table in tables {
        let sql = format!("SELECT * FROM \"{}\"", table.replace('"', "\"\""));
        let mut stmt = tx.prepare(&sql).unwrap_or_else(|e| panic!("{sql} on {}: {e}", path.display()));
        let width = stmt.column_count();
        let mut rows: Vec<String> = stmt
            .query_map([], |r| {
                let mut line = String::new();
                for i in 0..width {
                    if i > 0 {
                        line.push_str(" | ");
                    }
                    render(&mut line, r.get_ref(i)?);
                }
                Ok(line)
            })
            .and_then(|rows| rows.collect())
            .unwrap_or_else(|e| panic!("{sql} on {}: {e}", path.display()));
        rows.sort();
        let _ = writeln!(out, "table {table} ({} rows)", rows.len());
        for row in rows {
            let _ = writeln!(out, "  {row}");
        }
    }
    tx.commit().expect("end a read");
    out
}

fn render(out: &mut String, value: ValueRef<'_>) {
    let _ = match value {
        ValueRef::Null => write!(out, "NULL"),
        ValueRef::Integer(i) => write!(out, "i:{i}"),
        ValueRef::Real(r) => write!(out, "r:{:016x}({r:?})", r.to_bits()),
        ValueRef::Text(t) => write!(out, "t:{:?}", String::from_utf8_lossy(t)),
        ValueRef::Blob(b) if b.len() > BLOB_DUMP_BYTES_MAX => {
            write!(out, "b:{} bytes, fnv {:016x}", b.len(), fnv1a(b))
        }
        ValueRef::Blob(b) => {
            out.push_str("b:");
            for byte in b {
                let _ = write!(out, "{byte:02x}");
            }
            Ok(())
        }
    };
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}
