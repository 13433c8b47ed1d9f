//! Space Marmot's shadow tables take (issue #11), measured with SQLite's `dbstat`:
//!
//! 1. per replicated row: 100,000 rows inserted (1,000 per transaction), published and
//!    cleaned as a running node does; the shadow tables' bytes (versions, log, set-aside,
//!    the rest) divided by the rows, next to the application table's own bytes per row;
//! 2. under churn: 1,000,000 rows inserted and deleted (1,000 rounds of 1,000 inserts then
//!    1,000 deletes), published and cleaned each round; the shadow tables with their
//!    1,000,000 tombstones, then after tombstone collection (`Db::collect_tombstones_step`
//!    past every delete), with the time collection took.
//!
//! 3. the cost of `marmot verify`'s digests on a table of 1,000,000 rows: bucket digests,
//!    the sub-bucket digests of one bucket, the rows of one sub-bucket.
//!
//! Pages freed by collection stay in the file (on its free list) for new rows, as SQLite
//! does, until a `VACUUM`; both are reported. Run with
//! `cargo bench -p marmot-core --bench shadow`.

use std::path::Path;
use std::time::Instant;

use marmot_core::sqlite::{CaptureOptions, Db};
use marmot_core::{Hlc, NodeId};
use rusqlite::Connection;

const SCHEMA: &str = "CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT NOT NULL, qty INTEGER NOT NULL, note TEXT)";
const LIVE_ROWS: i64 = 100_000;
const CHURN_ROUNDS: i64 = 1_000;
const ROWS_PER_TX: i64 = 1_000;

fn open_app(path: &Path) -> Connection {
    let conn = Connection::open(path).expect("open");
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0)).expect("WAL");
    assert_eq!(mode, "wal");
    conn.execute_batch("PRAGMA synchronous=NORMAL").expect("synchronous");
    conn
}

fn insert(conn: &Connection, first: i64, n: i64) {
    let tx = conn.unchecked_transaction().expect("begin");
    {
        let mut stmt =
            tx.prepare_cached("INSERT INTO items(id, name, qty, note) VALUES (?1, ?2, ?3, ?4)").expect("prepare");
        for id in first..first + n {
            stmt.execute((id, format!("item {id}"), id % 100, "a short note")).expect("insert");
        }
    }
    tx.commit().expect("commit");
}

/// Publishes what is pending (reads and acknowledges it) and cleans the log, as a node
/// does after a successful publish.
fn publish_and_clean(db: &mut Db) {
    while let Some(p) = db.read_pending().expect("read pending") {
        db.acknowledge(p.through).expect("acknowledge");
    }
    db.clean_published().expect("clean");
}

/// Bytes of each table (with its indexes) by `dbstat`, largest first.
fn table_bytes(conn: &Connection) -> Vec<(String, u64)> {
    let mut stmt = conn
        .prepare(
            "SELECT m.tbl_name, sum(d.pgsize) FROM dbstat d JOIN sqlite_master m ON m.name = d.name \
             GROUP BY m.tbl_name ORDER BY 2 DESC",
        )
        .expect("dbstat");
    stmt.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))
        .expect("dbstat")
        .collect::<rusqlite::Result<_>>()
        .expect("dbstat rows")
}

fn shadow_bytes(tables: &[(String, u64)]) -> u64 {
    tables.iter().filter(|(t, _)| t.starts_with("__marmot__")).map(|(_, b)| b).sum()
}

fn bytes_of(tables: &[(String, u64)], name: &str) -> u64 {
    tables.iter().find(|(t, _)| t == name).map_or(0, |(_, b)| *b)
}

fn free_bytes(conn: &Connection) -> u64 {
    let pages: i64 = conn.query_row("PRAGMA freelist_count", [], |r| r.get(0)).expect("freelist");
    let size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0)).expect("page size");
    (pages * size) as u64
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn print_tables(what: &str, tables: &[(String, u64)], rows: i64) {
    let shadow = shadow_bytes(tables);
    println!("{what}: shadow tables {:.2} MiB", mib(shadow));
    for name in ["__marmot__versions", "__marmot__log", "__marmot__aside"] {
        let b = bytes_of(tables, name);
        let per_row = if rows > 0 { format!(", {:.1} bytes per row", b as f64 / rows as f64) } else { String::new() };
        println!("  {name:<20} {:>10.2} MiB{per_row}", mib(b));
    }
    let rest = shadow
        - ["__marmot__versions", "__marmot__log", "__marmot__aside"].iter().map(|n| bytes_of(tables, n)).sum::<u64>();
    println!("  {:<20} {:>10.2} MiB", "other __marmot__", mib(rest));
}

fn main() {
    let dir = tempfile::tempdir().expect("temp dir");

    // 1. Per replicated row.
    let path = dir.path().join("live.db");
    let app = open_app(&path);
    app.execute_batch(SCHEMA).expect("schema");
    let mut db = Db::open(&path, NodeId(1), CaptureOptions::default()).expect("install capture");
    for r in 0..LIVE_ROWS / ROWS_PER_TX {
        insert(&app, r * ROWS_PER_TX + 1, ROWS_PER_TX);
        publish_and_clean(&mut db);
    }
    let tables = table_bytes(&app);
    let (items, shadow) = (bytes_of(&tables, "items"), shadow_bytes(&tables));
    println!("{LIVE_ROWS} live rows, published and cleaned:");
    println!(
        "  application table {:.1} bytes per row; shadow tables {:.1} bytes per replicated row ({:.0}% of the table)",
        items as f64 / LIVE_ROWS as f64,
        shadow as f64 / LIVE_ROWS as f64,
        100.0 * shadow as f64 / items as f64
    );
    print_tables("  in detail", &tables, LIVE_ROWS);
    drop(db);
    drop(app);

    // 2. Churn: inserts and deletes, then tombstone collection.
    let path = dir.path().join("churn.db");
    let app = open_app(&path);
    app.execute_batch(SCHEMA).expect("schema");
    let mut db = Db::open(&path, NodeId(1), CaptureOptions::default()).expect("install capture");
    let started = Instant::now();
    for r in 0..CHURN_ROUNDS {
        let first = r * ROWS_PER_TX + 1;
        insert(&app, first, ROWS_PER_TX);
        app.execute("DELETE FROM items WHERE id >= ?1", [first]).expect("delete");
        publish_and_clean(&mut db);
    }
    let churned = CHURN_ROUNDS * ROWS_PER_TX;
    println!(
        "\n{churned} rows inserted and deleted in {:.1} s (captured, published, cleaned); {} tombstones held",
        started.elapsed().as_secs_f64(),
        db.tombstones_held().expect("tombstones")
    );
    let before = table_bytes(&app);
    print_tables("  before collection", &before, churned);
    let horizon = Hlc(db.clock().expect("clock").0 + 1);
    let started = Instant::now();
    let mut collected = 0;
    loop {
        let (n, more) = db.collect_tombstones_step(horizon).expect("collect");
        collected += n;
        if !more {
            break;
        }
    }
    let took = started.elapsed();
    let after = table_bytes(&app);
    println!(
        "  collected {collected} tombstones in {:.2} s ({:.0} per second, {} per transaction)",
        took.as_secs_f64(),
        collected as f64 / took.as_secs_f64(),
        marmot_core::sqlite::COLLECT_STEP_ROWS
    );
    print_tables("  after collection", &after, churned);
    println!(
        "  pages freed by collection, on the free list for new rows: {:.2} MiB (the file shrinks only with VACUUM)",
        mib(free_bytes(&app))
    );
    assert_eq!(db.tombstones_held().expect("tombstones"), 0, "every tombstone past the horizon collected");
    drop(db);
    drop(app);

    // 3. Digests of a million rows.
    let path = dir.path().join("digests.db");
    let app = open_app(&path);
    app.execute_batch(SCHEMA).expect("schema");
    let mut db = Db::open(&path, NodeId(1), CaptureOptions::default()).expect("install capture");
    for r in 0..CHURN_ROUNDS {
        insert(&app, r * ROWS_PER_TX + 1, ROWS_PER_TX);
    }
    publish_and_clean(&mut db);
    let started = Instant::now();
    let digests = db.digests().expect("digests");
    let digest_s = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let subs = db.sub_digests("items", 0).expect("sub-digests");
    let sub_s = started.elapsed().as_secs_f64();
    let sub = subs.iter().position(|&d| d != 0).expect("a non-empty sub-bucket");
    let started = Instant::now();
    let rows = db.bucket_rows("items", 0, &[sub]).expect("rows");
    let rows_s = started.elapsed().as_secs_f64();
    let n = digests.tables[0].rows;
    println!(
        "\ndigests of {n} rows: {digest_s:.2} s ({:.2} s per million rows); sub-bucket digests of one bucket \
         {sub_s:.2} s; the {} rows of one sub-bucket {rows_s:.2} s",
        digest_s * 1e6 / n as f64,
        rows.len()
    );
}
