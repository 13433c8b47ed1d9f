//! A node SIGKILLed while it applies a stream of remote transactions, and restarted, ends
//! with exactly the writer's rows: none lost, none applied twice (an application trigger
//! on the receiving node counts every insert it sees), and no half transaction visible at
//! any time. The publishing node is SIGKILLed and restarted too, mid-stream.

use std::path::Path;
use std::time::Duration;

use marmot_tests::{
    create_db, dump_tables, open, query_i64, require_tools, wait_until, Background, NatsServer, Node, NodeConfig,
    TestDir, DEADLINE,
};

const ROWS: i64 = 2000;

/// Both nodes: the items, and a tally that each writer transaction increments together
/// with its insert, so `count(items) = tally.n` holds after every whole transaction.
const SCHEMA: &str = "
CREATE TABLE items(id INTEGER PRIMARY KEY, body TEXT NOT NULL, counter INTEGER NOT NULL);
CREATE TABLE tally(id INTEGER PRIMARY KEY, n INTEGER NOT NULL);
INSERT INTO tally(id, n) VALUES (1, 0);
";

/// Node 2 only: an application trigger counting every insert into `items`. `audit` has no
/// primary key, so Marmot does not replicate it; it records what node 2 itself saw.
const AUDIT: &str = "
CREATE TABLE audit(item_id INTEGER NOT NULL);
CREATE TRIGGER items_audit AFTER INSERT ON items BEGIN
  INSERT INTO audit(item_id) VALUES (NEW.id);
END;
";

/// One transaction per row: insert it, bump the counter of an older row, bump the tally.
const WRITER: &str = r#"
import sqlite3, sys, time
c = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)
for i in range(1, int(sys.argv[2]) + 1):
    c.execute("BEGIN IMMEDIATE")
    c.execute("INSERT INTO items(id, body, counter) VALUES (?, ?, 0)", (i, "item %d" % i))
    c.execute("UPDATE items SET counter = counter + 1 WHERE id = ?", ((i + 1) // 2,))
    c.execute("UPDATE tally SET n = n + 1 WHERE id = 1")
    c.execute("COMMIT")
    time.sleep(0.003)
"#;

/// Reads node 2 in one read transaction and checks that it shows whole transactions
/// only. Returns the number of items.
fn items_checking_atomicity(db: &Path) -> i64 {
    let conn = open(db);
    let tx = conn.unchecked_transaction().unwrap();
    let items: i64 = tx.query_row("SELECT count(*) FROM items", [], |r| r.get(0)).unwrap();
    let tally: i64 = tx.query_row("SELECT n FROM tally WHERE id = 1", [], |r| r.get(0)).unwrap();
    assert_eq!(items, tally, "node 2 shows part of a transaction: {items} items but tally {tally}");
    items
}

#[test]
fn node_killed_mid_stream_catches_up_without_loss_or_duplication() {
    require_tools();
    let dir = TestDir::new("kill-mid-stream");
    let server = NatsServer::standalone(dir.path(), "nats");
    let (db1, db2) = (dir.join("node-1.db"), dir.join("node-2.db"));
    create_db(&db1, SCHEMA);
    create_db(&db2, &format!("{SCHEMA}{AUDIT}"));
    let config = |id, db: &Path| NodeConfig::new(id, db).with_urls(vec![server.url()]);
    let mut node1 = Node::start(dir.path(), &config(1, &db1), &[]);
    let mut node2 = Node::start(dir.path(), &config(2, &db2), &[]);
    node1.wait_replicating(DEADLINE);
    node2.wait_replicating(DEADLINE);

    let mut writer = Background::python(dir.path(), "writer", WRITER, &[&db1.to_string_lossy(), &ROWS.to_string()]);

    // Kill node 2 while it is applying, then let the writer get well ahead.
    wait_until("node 2 applied a few hundred rows", DEADLINE, || items_checking_atomicity(&db2) >= 300);
    node2.kill();
    let at_kill = items_checking_atomicity(&db2);
    assert!(at_kill < ROWS, "node 2 was killed mid-stream ({at_kill} of {ROWS} rows)");
    wait_until("node 1 wrote 500 more rows while node 2 is down", DEADLINE, || {
        query_i64(&db1, "SELECT count(*) FROM items") >= (at_kill + 500).min(ROWS)
    });
    node2.restart();
    node2.wait_replicating(DEADLINE);

    // Kill the publisher too, while the writer keeps writing into its database.
    wait_until("node 2 caught up past where it was killed", DEADLINE, || items_checking_atomicity(&db2) > at_kill);
    node1.kill();
    let published_before = query_i64(&db1, "SELECT count(*) FROM items");
    wait_until("node 1's database gets 200 rows while its marmot is down", DEADLINE, || {
        query_i64(&db1, "SELECT count(*) FROM items") >= (published_before + 200).min(ROWS)
    });
    node1.restart();
    node1.wait_replicating(DEADLINE);

    writer.wait_success(Duration::from_secs(120));
    wait_until("node 2 has every row", DEADLINE, || items_checking_atomicity(&db2) == ROWS);
    let tables = ["items", "tally"];
    wait_until("node 2's items and tally equal node 1's", DEADLINE, || {
        dump_tables(&db1, &tables) == dump_tables(&db2, &tables)
    });

    assert_eq!(query_i64(&db1, "SELECT count(*) FROM items"), ROWS);
    assert_eq!(query_i64(&db2, "SELECT n FROM tally"), ROWS);
    assert_eq!(
        query_i64(&db2, "SELECT sum(counter) FROM items"),
        ROWS,
        "every counter increment arrived (one per transaction)"
    );
    // Each item was inserted on node 2 exactly once: a batch applied twice, or partly
    // applied and then replayed, would have fired the trigger again.
    assert_eq!(query_i64(&db2, "SELECT count(*) FROM audit"), ROWS, "inserts seen on node 2");
    assert_eq!(query_i64(&db2, "SELECT count(DISTINCT item_id) FROM audit"), ROWS);
    assert_eq!(
        query_i64(&db2, "SELECT count(*) FROM audit a LEFT JOIN items i ON i.id = a.item_id WHERE i.id IS NULL"),
        0
    );
    node1.assert_running();
    node2.assert_running();
    // Capture is installed when the process starts (each install warns about `audit`)
    // and not again without a schema change: the side-car's connections must not take
    // each other's installs for schema changes and re-install in a loop.
    let log = node2.log_since_start();
    let (_, running) = log.split_once("replicating shards=").expect("node 2 logged its start");
    let reinstalls = running.matches("table not replicated").count();
    assert_eq!(reinstalls, 0, "node 2 re-installed capture {reinstalls} times while running");
}
