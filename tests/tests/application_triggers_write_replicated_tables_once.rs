//! An application's triggers write replicated tables once, on the node where the
//! application wrote, and tables that are not replicated on every node. The schema has an
//! audit log, an `updated_at`-style stamp computed from a node-local table, a stock
//! counter and an FTS5 external-content index, all kept by triggers on `orders`. Orders
//! written on each of three nodes in turn (each after the previous one arrived everywhere,
//! so no two counter updates race: concurrent ones resolve last-writer-wins, which is
//! documented) leave orders, stock and audit identical everywhere, one audit row per
//! order, the exact stock, and a full-text index that finds every order on every node.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use marmot_tests::{
    create_db, query_i64, require_tools, sqlite3, wait_contents, NatsServer, Node, NodeConfig, TestDir, DEADLINE,
};

const SCHEMA: &str = "
CREATE TABLE orders(id INTEGER PRIMARY KEY, item TEXT NOT NULL, qty INTEGER NOT NULL, stamp INTEGER);
CREATE TABLE stock(item TEXT PRIMARY KEY, n INTEGER NOT NULL);
CREATE TABLE audit(id INTEGER PRIMARY KEY, what TEXT NOT NULL);
-- No primary key: Marmot does not replicate it; each node keeps its own.
CREATE TABLE local_seen(x);
CREATE VIRTUAL TABLE orders_fts USING fts5(item, content='orders', content_rowid='id');

CREATE TRIGGER orders_audit AFTER INSERT ON orders BEGIN
  INSERT INTO audit(what) VALUES ('order ' || NEW.id || ': ' || NEW.qty || ' ' || NEW.item);
END;
CREATE TRIGGER orders_stamp AFTER INSERT ON orders BEGIN
  INSERT INTO local_seen VALUES (NEW.id);
  UPDATE orders SET stamp = (SELECT count(*) FROM local_seen) WHERE id = NEW.id;
END;
CREATE TRIGGER orders_stock AFTER INSERT ON orders BEGIN
  UPDATE stock SET n = n - NEW.qty WHERE item = NEW.item;
END;
CREATE TRIGGER orders_fts_ai AFTER INSERT ON orders BEGIN
  INSERT INTO orders_fts(rowid, item) VALUES (NEW.id, NEW.item);
END;
CREATE TRIGGER orders_fts_ad AFTER DELETE ON orders BEGIN
  INSERT INTO orders_fts(orders_fts, rowid, item) VALUES ('delete', OLD.id, OLD.item);
END;
CREATE TRIGGER orders_fts_au AFTER UPDATE OF item ON orders BEGIN
  INSERT INTO orders_fts(orders_fts, rowid, item) VALUES ('delete', OLD.id, OLD.item);
  INSERT INTO orders_fts(rowid, item) VALUES (NEW.id, NEW.item);
END;
";

const TABLES: [&str; 3] = ["orders", "stock", "audit"];
const ORDERS: i64 = 6;
const ITEMS: [&str; 2] = ["apple", "pear"];
const STOCK: i64 = 100;

/// Order `i` (from 1): its item and quantity, and the node that writes it (1, 2, 3, 1, …).
fn order(i: i64) -> (&'static str, i64, usize) {
    (ITEMS[(i as usize - 1) % 2], i + 2, ((i as usize - 1) % 3) + 1)
}

/// The dump of orders, stock and audit once orders 1..=`n` are written in turn. Node 2
/// starts with one more local_seen row than the others, so a stamp tells where it was
/// computed: order `i` is stamped `i` on nodes 1 and 3, and `i + 1` on node 2.
fn expected(n: i64) -> String {
    let mut orders = Vec::new();
    let mut audit = Vec::new();
    let mut left = [STOCK; 2];
    for i in 1..=n {
        let (item, qty, node) = order(i);
        let stamp = if node == 2 { i + 1 } else { i };
        orders.push(format!("  i:{i} | t:{item:?} | i:{qty} | i:{stamp}"));
        audit.push(format!("  i:{i} | t:\"order {i}: {qty} {item}\""));
        left[ITEMS.iter().position(|x| *x == item).unwrap()] -= qty;
    }
    // The dump sorts rows as text.
    orders.sort();
    audit.sort();
    let mut out = format!("table orders ({n} rows)\n");
    for row in orders {
        let _ = writeln!(out, "{row}");
    }
    let _ = writeln!(out, "table stock (2 rows)");
    for (item, n) in ITEMS.iter().zip(left) {
        let _ = writeln!(out, "  t:{item:?} | i:{n}");
    }
    let _ = writeln!(out, "table audit ({n} rows)");
    for row in audit {
        let _ = writeln!(out, "{row}");
    }
    out
}

#[test]
fn application_triggers_write_replicated_tables_once() {
    require_tools();
    let started = Instant::now();
    let dir = TestDir::new("app-triggers");
    let server = NatsServer::standalone(dir.path(), "nats");
    let dbs: Vec<PathBuf> = (1..=3).map(|i| dir.join(format!("node-{i}.db"))).collect();
    for db in &dbs {
        create_db(db, SCHEMA);
    }
    // Node 2 has seen something the others have not.
    sqlite3(dir.path(), "local-2", &dbs[1], "INSERT INTO local_seen VALUES ('node 2 only');");
    let mut nodes: Vec<Node> = (1..=3u64)
        .map(|id| {
            let config = NodeConfig::new(id, &dbs[id as usize - 1]).with_urls(vec![server.url()]);
            Node::start(dir.path(), &config, &[])
        })
        .collect();
    for node in &mut nodes {
        node.wait_replicating(DEADLINE);
    }
    let all: Vec<&Path> = dbs.iter().map(PathBuf::as_path).collect();

    sqlite3(dir.path(), "stock", &dbs[0], &format!("INSERT INTO stock VALUES ('apple', {STOCK}), ('pear', {STOCK});"));
    wait_contents(&all, &TABLES, &expected(0), DEADLINE);

    for i in 1..=ORDERS {
        let (item, qty, node) = order(i);
        sqlite3(
            dir.path(),
            &format!("order-{i}"),
            &dbs[node - 1],
            &format!("INSERT INTO orders(item, qty) VALUES ('{item}', {qty});"),
        );
        wait_contents(&all, &TABLES, &expected(i), DEADLINE);
    }

    let final_dump = expected(ORDERS);
    println!("every node holds:\n{final_dump}");
    for (n, db) in dbs.iter().enumerate() {
        let name = format!("fts-{}", n + 1);
        let found = sqlite3(
            dir.path(),
            &name,
            db,
            "SELECT group_concat(rowid, ',') FROM (SELECT rowid FROM orders_fts WHERE orders_fts MATCH 'apple' ORDER BY rowid);\n\
             SELECT group_concat(rowid, ',') FROM (SELECT rowid FROM orders_fts WHERE orders_fts MATCH 'pear' ORDER BY rowid);\n\
             SELECT count(*) FROM orders_fts WHERE orders_fts MATCH 'apple OR pear';\n\
             INSERT INTO orders_fts(orders_fts) VALUES ('integrity-check');",
        );
        assert_eq!(found, "1,3,5\n2,4,6\n6\n", "full-text search on {} finds every order, once", db.display());
        let local = query_i64(db, "SELECT count(*) FROM local_seen");
        let own = if n == 1 { 1 } else { 0 };
        assert_eq!(local, ORDERS + own, "the trigger wrote the local table on {} for every order", db.display());
        assert_eq!(query_i64(db, "SELECT count(*) FROM __marmot__parked"), 0, "nothing parked on {}", db.display());
    }
    // Still the same after the integrity checks (which write only the FTS index).
    wait_contents(&all, &TABLES, &final_dump, DEADLINE);
    for node in &mut nodes {
        node.assert_running();
    }
    println!("test took {:?}", started.elapsed());
}
