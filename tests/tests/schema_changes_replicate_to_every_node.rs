//! Schema changes made on any node, with any client, reach every node — with the rows
//! written around them. Three `marmot` processes on one NATS server (three shards, so the
//! schema log and the nodes' data travel on different streams); each step changes the
//! schema on one node with the `sqlite3` CLI, usually with rows written in the same
//! transaction, and waits until every node has the same schema and the same rows:
//! `ADD COLUMN` with a row using it at once, `CREATE TABLE` with an index, a view and an
//! application trigger, `RENAME COLUMN` (the trigger and view follow), `DROP COLUMN`,
//! `RENAME TABLE`, `DROP INDEX`/`DROP VIEW`, `DROP TRIGGER`/`DROP TABLE`, and a change made
//! while that node's `marmot` is stopped. A second test runs a table-rebuild migration
//! (create, copy with a type change, drop, rename: how Django and others change a column
//! on SQLite) from Python in one transaction while the other nodes keep writing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use marmot_tests::{
    create_db, marmot_bin, open, query_i64, require_tools, sqlite3, wait_converged, wait_until, Background, NatsServer,
    Node, NodeConfig, TestDir, DEADLINE,
};

const SCHEMA: &str = "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, qty TEXT);";

/// The application's schema objects of `db`, Marmot's left out.
fn schema(db: &Path) -> Vec<(String, String, Option<String>)> {
    let conn = open(db);
    let mut stmt = conn
        .prepare(
            "SELECT type, name, sql FROM sqlite_master WHERE substr(name, 1, 10) != '__marmot__' \
             AND substr(tbl_name, 1, 10) != '__marmot__' ORDER BY type, name",
        )
        .expect("read the schema");
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).expect("read the schema");
    rows.collect::<rusqlite::Result<_>>().expect("read the schema")
}

/// Waits until every node has the schema of `dbs[0]` and contains `object` (a name), then
/// until their rows are equal; returns the dump.
fn wait_schema_and_rows(dbs: &[&Path], object: &str, present: bool) -> String {
    wait_until(&format!("every node's schema {} {object:?}", if present { "has" } else { "lacks" }), DEADLINE, || {
        let first = schema(dbs[0]);
        first.iter().any(|o| o.1 == object) == present && dbs.iter().all(|db| schema(db) == first)
    });
    wait_converged(dbs, DEADLINE)
}

/// `marmot status --json` of the node configured in `config`.
fn status(config: &Path) -> serde_json::Value {
    let out = Command::new(marmot_bin())
        .arg("-config")
        .arg(config)
        .args(["status", "--json", "--timeout", "5"])
        .env_remove("RUST_LOG")
        .output()
        .expect("run marmot status");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("status --json: {e}: {}", String::from_utf8_lossy(&out.stdout)))
}

struct Cluster {
    dir: TestDir,
    _server: NatsServer,
    dbs: Vec<PathBuf>,
    nodes: Vec<Node>,
}

impl Cluster {
    fn start(name: &str) -> Cluster {
        require_tools();
        let dir = TestDir::new(name);
        let server = NatsServer::standalone(dir.path(), "nats");
        let dbs: Vec<PathBuf> = (1..=3).map(|i| dir.join(format!("node-{i}.db"))).collect();
        for db in &dbs {
            create_db(db, SCHEMA);
        }
        let mut nodes: Vec<Node> = (1..=3u64)
            .map(|id| {
                let mut config = NodeConfig::new(id, &dbs[id as usize - 1]).with_urls(vec![server.url()]);
                config.shards = 3;
                Node::start(dir.path(), &config, &[])
            })
            .collect();
        for node in &mut nodes {
            node.wait_replicating(DEADLINE);
        }
        Cluster { dir, _server: server, dbs, nodes }
    }

    fn all(&self) -> Vec<&Path> {
        self.dbs.iter().map(PathBuf::as_path).collect()
    }

    /// Runs `sql` with the `sqlite3` CLI on node `n` (from 1).
    fn sql(&self, n: usize, name: &str, sql: &str) {
        sqlite3(self.dir.path(), name, &self.dbs[n - 1], sql);
    }
}

#[test]
fn each_kind_of_schema_change_made_on_one_node_reaches_every_node() {
    let started = Instant::now();
    let mut c = Cluster::start("ddl-kinds");
    c.sql(1, "rows", "INSERT INTO items VALUES (1, 'one', '1'), (2, 'two', '2');");
    wait_converged(&c.all(), DEADLINE);

    // A row written in the same transaction as the column it uses, before Marmot noticed.
    c.sql(
        1,
        "add-column",
        "BEGIN; ALTER TABLE items ADD COLUMN note TEXT DEFAULT 'n'; \
         INSERT INTO items (id, name, qty, note) VALUES (10, 'ten', '10', 'written with the column'); COMMIT;",
    );
    let dump = wait_schema_and_rows(&c.all(), "items", true);
    assert!(dump.contains("written with the column"), "the new column's value arrived everywhere:\n{dump}");

    c.sql(
        2,
        "create-table",
        "CREATE TABLE tags (id INTEGER PRIMARY KEY, tag TEXT NOT NULL); CREATE INDEX tags_tag ON tags (tag); \
         INSERT INTO tags VALUES (1, 'red');",
    );
    wait_schema_and_rows(&c.all(), "tags_tag", true);

    c.sql(
        3,
        "view-trigger",
        "CREATE VIEW item_names AS SELECT id, name FROM items; \
         CREATE TRIGGER items_touch AFTER UPDATE OF name ON items BEGIN \
           INSERT INTO tags (tag) VALUES ('renamed ' || NEW.id); END;",
    );
    wait_schema_and_rows(&c.all(), "items_touch", true);

    // The trigger and the view follow the renamed column on every node; the trigger's row
    // is written once, by the node where the update happened.
    c.sql(
        1,
        "rename-column",
        "ALTER TABLE items RENAME COLUMN name TO title; UPDATE items SET title = 'TEN' WHERE id = 10;",
    );
    let dump = wait_schema_and_rows(&c.all(), "items", true);
    assert!(dump.contains("TEN") && dump.contains("renamed 10"), "{dump}");
    for db in &c.dbs {
        assert_eq!(query_i64(db, "SELECT count(*) FROM tags WHERE tag = 'renamed 10'"), 1, "{}", db.display());
    }

    c.sql(2, "drop-column", "ALTER TABLE items DROP COLUMN note;");
    wait_until("note is gone everywhere", DEADLINE, || {
        c.dbs.iter().all(|db| query_i64(db, "SELECT count(*) FROM pragma_table_info('items') WHERE name = 'note'") == 0)
    });
    wait_schema_and_rows(&c.all(), "items", true);

    c.sql(3, "rename-table", "ALTER TABLE tags RENAME TO labels; INSERT INTO labels (tag) VALUES ('after rename');");
    let dump = wait_schema_and_rows(&c.all(), "labels", true);
    assert!(dump.contains("after rename") && dump.contains("red"), "the renamed table kept its rows:\n{dump}");

    c.sql(1, "drop-index-view", "DROP INDEX tags_tag; DROP VIEW item_names;");
    wait_schema_and_rows(&c.all(), "item_names", false);

    c.sql(2, "drop-table", "DROP TRIGGER items_touch; DROP TABLE labels;");
    wait_schema_and_rows(&c.all(), "labels", false);

    // A change made while node 3's marmot is stopped is noticed when it starts.
    c.nodes[2].terminate(DEADLINE);
    c.sql(3, "while-stopped", "ALTER TABLE items ADD COLUMN price REAL; UPDATE items SET price = 1.5;");
    c.nodes[2].restart();
    c.nodes[2].wait_replicating(DEADLINE);
    let dump = wait_schema_and_rows(&c.all(), "items", true);
    assert!(dump.contains("(1.5)"), "{dump}");

    let fingerprints: Vec<serde_json::Value> =
        (1..=3).map(|i| status(&c.dir.join(format!("node-{i}.toml")))["schema_fingerprint"].clone()).collect();
    assert!(fingerprints[0].is_string() && fingerprints.iter().all(|f| *f == fingerprints[0]), "{fingerprints:?}");
    for db in &c.dbs {
        assert_eq!(query_i64(db, "SELECT count(*) FROM __marmot__parked"), 0, "nothing parked on {}", db.display());
    }
    for node in &mut c.nodes {
        node.assert_running();
    }
    println!("test took {:?}", started.elapsed());
}

const REBUILD: &str = r#"
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], timeout=10, isolation_level=None)
db.execute("PRAGMA legacy_alter_table = ON")
db.execute("BEGIN IMMEDIATE")
db.execute("CREATE TABLE new__items (id INTEGER PRIMARY KEY, name TEXT NOT NULL DEFAULT '', qty INTEGER NOT NULL DEFAULT 0)")
db.execute("INSERT INTO new__items (id, name, qty) SELECT id, coalesce(name, ''), CAST(qty AS INTEGER) * 10 FROM items")
db.execute("DROP TABLE items")
db.execute("ALTER TABLE new__items RENAME TO items")
db.execute("CREATE INDEX items_qty ON items (qty)")
db.execute("COMMIT")
"#;

const WRITER: &str = r#"
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], timeout=10, isolation_level=None)
base = int(sys.argv[2])
for i in range(40):
    db.execute("INSERT INTO items (id, name, qty) VALUES (?, ?, ?)", (base + i, "w", str(i)))
    time.sleep(0.02)
"#;

#[test]
fn a_table_rebuild_migration_replicates_with_its_converted_values() {
    let started = Instant::now();
    let c = Cluster::start("ddl-rebuild");
    c.sql(1, "rows", "INSERT INTO items VALUES (1, 'one', '1'), (2, 'two', '2'), (3, 'three', '3');");
    wait_converged(&c.all(), DEADLINE);
    // Nodes 2 and 3 keep writing (old layout: qty as text) while node 1 migrates.
    let mut writers: Vec<Background> = (2..=3)
        .map(|n| {
            let db = c.dbs[n - 1].to_str().expect("UTF-8 path").to_owned();
            Background::python(c.dir.path(), &format!("writer-{n}"), WRITER, &[&db, &(n * 1000).to_string()])
        })
        .collect();
    let db1 = c.dbs[0].to_str().expect("UTF-8 path").to_owned();
    Background::python(c.dir.path(), "migration", REBUILD, &[&db1]).wait_success(DEADLINE);
    for w in &mut writers {
        w.wait_success(DEADLINE);
    }
    let dump = wait_schema_and_rows(&c.all(), "items_qty", true);
    println!("every node holds:\n{dump}");
    for db in &c.dbs {
        let ddl: String = open(db)
            .query_row("SELECT sql FROM sqlite_master WHERE name = 'items'", [], |r| r.get(0))
            .expect("items exists");
        assert!(ddl.contains("qty INTEGER NOT NULL"), "{}: {ddl}", db.display());
        // The migration's conversion (qty × 10) arrived as it was computed on node 1.
        assert_eq!(query_i64(db, "SELECT qty FROM items WHERE id = 2"), 20, "{}", db.display());
        assert_eq!(query_i64(db, "SELECT count(*) FROM items WHERE id BETWEEN 2000 AND 2999"), 40, "{}", db.display());
        assert_eq!(query_i64(db, "SELECT count(*) FROM items WHERE id >= 3000"), 40, "{}", db.display());
    }
    // Writes after the migration replicate in the new layout.
    c.sql(2, "after", "INSERT INTO items (id, name, qty) VALUES (99, 'after', 7);");
    wait_until("the row written after the migration is everywhere", DEADLINE, || {
        c.dbs.iter().all(|db| query_i64(db, "SELECT qty FROM items WHERE id = 99") == 7)
    });
    wait_converged(&c.all(), DEADLINE);
    println!("test took {:?}", started.elapsed());
}
