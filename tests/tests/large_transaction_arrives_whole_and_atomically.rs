//! One local transaction far larger than a NATS message (600 rows of 10 KB random blobs,
//! about 6 MB, so it travels in many parts) is applied on the other node as one unit: a
//! reader polling there sees either none of its rows or all of them, never a part.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use marmot_tests::{
    create_db, open, require_tools, wait_converged, wait_until, Background, NatsServer, Node, NodeConfig, TestDir,
    DEADLINE,
};

const ROWS: i64 = 600;
const BLOB_BYTES: i64 = 10 * 1024;

const SCHEMA: &str = "CREATE TABLE files(id INTEGER PRIMARY KEY, name TEXT NOT NULL, content BLOB NOT NULL);";

/// One transaction: ROWS rows of incompressible blobs.
const WRITER: &str = r#"
import os, sqlite3, sys
rows, size = int(sys.argv[2]), int(sys.argv[3])
c = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)
c.execute("BEGIN IMMEDIATE")
for i in range(1, rows + 1):
    c.execute("INSERT INTO files(id, name, content) VALUES (?, ?, ?)", (i, "file-%d" % i, os.urandom(size)))
c.execute("COMMIT")
"#;

/// Polls `SELECT count(*)` on `db` until told to stop; returns every count it saw.
fn spawn_reader(db: PathBuf, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<BTreeSet<i64>> {
    std::thread::spawn(move || {
        let conn = open(&db);
        let mut seen = BTreeSet::new();
        while !stop.load(Ordering::Relaxed) {
            let n: i64 = conn.query_row("SELECT count(*) FROM files", [], |r| r.get(0)).unwrap();
            seen.insert(n);
            std::thread::sleep(Duration::from_millis(2));
        }
        seen
    })
}

#[test]
fn large_transaction_arrives_whole_and_atomically() {
    require_tools();
    let dir = TestDir::new("large-tx");
    let server = NatsServer::standalone(dir.path(), "nats");
    let mut nodes: Vec<Node> = (1..=2)
        .map(|id| {
            let db = dir.join(format!("node-{id}.db"));
            create_db(&db, SCHEMA);
            Node::start(dir.path(), &NodeConfig::new(id, &db).with_urls(vec![server.url()]), &[])
        })
        .collect();
    for node in &mut nodes {
        node.wait_replicating(DEADLINE);
    }
    let (db1, db2) = (nodes[0].db().to_path_buf(), nodes[1].db().to_path_buf());

    let stop = Arc::new(AtomicBool::new(false));
    let reader = spawn_reader(db2.clone(), stop.clone());
    let mut writer = Background::python(
        dir.path(),
        "writer",
        WRITER,
        &[&db1.to_string_lossy(), &ROWS.to_string(), &BLOB_BYTES.to_string()],
    );
    writer.wait_success(Duration::from_secs(60));

    let conn2 = open(&db2);
    wait_until("the large transaction reaches node 2", DEADLINE, || {
        conn2.query_row("SELECT count(*) FROM files", [], |r| r.get::<_, i64>(0)).unwrap() == ROWS
    });
    stop.store(true, Ordering::Relaxed);
    let seen = reader.join().expect("the reader thread");
    assert_eq!(seen, BTreeSet::from([0, ROWS]), "a reader on node 2 saw only none or all of the transaction's rows");

    let dump = wait_converged(&[&db1, &db2], DEADLINE);
    assert!(dump.starts_with(&format!("table files ({ROWS} rows)")), "{}", &dump[..200.min(dump.len())]);
    let bytes: i64 = conn2.query_row("SELECT sum(length(content)) FROM files", [], |r| r.get(0)).unwrap();
    assert_eq!(bytes, ROWS * BLOB_BYTES, "every blob arrived whole");
    assert!(bytes > 5 * 1024 * 1024, "the transaction is over 5 MB");
    for node in &mut nodes {
        node.assert_running();
    }
    assert_eq!(
        conn2.query_row("SELECT count(*) FROM __marmot__parked", [], |r| r.get::<_, i64>(0)).unwrap(),
        0,
        "nothing was parked"
    );
}
