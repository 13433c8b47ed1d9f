//! Capture cost: application inserts per second into a plain table and into the same table
//! with Marmot's capture triggers installed, in one run, as a ratio.
//!
//! The application writes through its own rusqlite connection (WAL, `synchronous=NORMAL`),
//! as an unchanged application would; for the captured case a [`Db`] holds the side-car's
//! connection open and installed the triggers. Every trial starts from a fresh file; plain
//! and captured trials alternate so drift affects both alike; the median of the trials is
//! reported. Rates are given per wall-clock second and, on Linux, per second of this
//! thread's CPU time (`/proc/thread-self/schedstat`), which stays comparable when other
//! work shares the machine. Run with `cargo bench -p marmot-core --bench capture`.
//!
//! Targets (issue #10): captured/plain ≥ 60% at 1 row per transaction, ≥ 45% at 100 rows per
//! transaction. The same is measured, without a target, for a table with a secondary
//! `UNIQUE` column, whose capture also notes the rows a `REPLACE` would displace.

use std::path::Path;
use std::time::{Duration, Instant};

use marmot_core::sqlite::{CaptureOptions, Db};
use marmot_core::NodeId;
use rusqlite::Connection;

const SCHEMA: &str = "CREATE TABLE items(
  id INTEGER PRIMARY KEY, name TEXT NOT NULL, category TEXT, qty INTEGER NOT NULL,
  price REAL, note TEXT)";
/// The same table with a secondary UNIQUE column.
const SCHEMA_UNIQUE: &str = "CREATE TABLE items(
  id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, category TEXT, qty INTEGER NOT NULL,
  price REAL, note TEXT)";
const WARMUP: Duration = Duration::from_millis(200);
const TRIAL: Duration = Duration::from_millis(700);
const TRIALS: usize = 5;

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Plain,
    Captured,
}

fn open_app(path: &Path) -> Connection {
    let conn = Connection::open(path).expect("open");
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0)).expect("WAL");
    assert_eq!(mode, "wal");
    conn.execute_batch("PRAGMA synchronous=NORMAL").expect("synchronous");
    conn
}

/// Inserts transactions of `rows_per_tx` rows for `run`, starting at id `*next`; returns
/// the number of rows inserted.
fn insert_for(conn: &Connection, rows_per_tx: usize, run: Duration, next: &mut i64) -> u64 {
    let mut stmt = conn
        .prepare_cached("INSERT INTO items(id, name, category, qty, price, note) VALUES (?1, ?2, ?3, ?4, ?5, ?6)")
        .expect("prepare");
    let start = Instant::now();
    let mut rows = 0u64;
    while start.elapsed() < run {
        conn.execute_batch("BEGIN").expect("begin");
        for _ in 0..rows_per_tx {
            let id = *next;
            *next += 1;
            let name = format!("item number {id}");
            let category = ["tools", "garden", "kitchen", "books"][(id % 4) as usize];
            stmt.execute((id, name, category, id % 1000, id as f64 * 0.25, "a short note about the item"))
                .expect("insert");
        }
        conn.execute_batch("COMMIT").expect("commit");
        rows += rows_per_tx as u64;
    }
    rows
}

/// Nanoseconds this thread has run on a CPU, where the kernel tells.
fn thread_cpu_ns() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

/// Rows per wall-clock second and per CPU second.
#[derive(Clone, Copy)]
struct Rate {
    wall: f64,
    cpu: Option<f64>,
}

/// One trial on a fresh file: rows per second after a warm-up.
fn trial(mode: Mode, schema: &str, rows_per_tx: usize) -> Rate {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("bench.db");
    let app = open_app(&path);
    app.execute_batch(schema).expect("schema");
    let _db = (mode == Mode::Captured)
        .then(|| Db::open(&path, NodeId(1), CaptureOptions::default()).expect("install capture"));
    let mut next = 1;
    insert_for(&app, rows_per_tx, WARMUP, &mut next);
    let (start, cpu_start) = (Instant::now(), thread_cpu_ns());
    let rows = insert_for(&app, rows_per_tx, TRIAL, &mut next);
    let wall = rows as f64 / start.elapsed().as_secs_f64();
    let cpu = cpu_start.zip(thread_cpu_ns()).map(|(a, b)| rows as f64 * 1e9 / (b - a).max(1) as f64);
    if mode == Mode::Captured {
        let logged: i64 = app.query_row("SELECT count(*) FROM __marmot__log", [], |r| r.get(0)).expect("log");
        assert_eq!(logged, next - 1, "every insert was captured");
    }
    Rate { wall, cpu }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn report(label: &str, rows_per_tx: usize, plain: Vec<f64>, captured: Vec<f64>, target: Option<f64>) {
    let (p, c) = (median(plain), median(captured));
    let ratio = c / p;
    let (target, verdict) = match target {
        Some(t) => (format!("{:.0}%", t * 100.0), if ratio >= t { "met" } else { "MISSED" }),
        None => ("-".to_owned(), "(UNIQUE column)"),
    };
    println!("{rows_per_tx:>7} {label:>5} {p:>13.0} {c:>16.0} {:>7.1}% {target:>7} {verdict}", ratio * 100.0);
}

fn main() {
    println!("capture cost: app inserts, WAL, synchronous=NORMAL, median of {TRIALS} trials of {TRIAL:?}");
    println!(
        "{:>7} {:>5} {:>13} {:>16} {:>8} {:>7}",
        "rows/tx", "per", "plain rows/s", "captured rows/s", "ratio", "target"
    );
    let cases =
        [(SCHEMA, 1usize, Some(0.60)), (SCHEMA, 100, Some(0.45)), (SCHEMA_UNIQUE, 1, None), (SCHEMA_UNIQUE, 100, None)];
    for (schema, rows_per_tx, target) in cases {
        let (mut plain, mut captured) = (Vec::new(), Vec::new());
        for _ in 0..TRIALS {
            plain.push(trial(Mode::Plain, schema, rows_per_tx));
            captured.push(trial(Mode::Captured, schema, rows_per_tx));
        }
        let wall = |v: &[Rate]| v.iter().map(|r| r.wall).collect::<Vec<_>>();
        report("wall", rows_per_tx, wall(&plain), wall(&captured), target);
        let cpu = |v: &[Rate]| v.iter().map(|r| r.cpu).collect::<Option<Vec<_>>>();
        if let (Some(p), Some(c)) = (cpu(&plain), cpu(&captured)) {
            report("cpu", rows_per_tx, p, c, target);
        }
    }
}
