//! Keys that SQLite holds equal under a NOCASE collation are one row on every node, however
//! each node spelled them. Two nodes write 'bob' and 'Bob' into a table keyed by a NOCASE
//! primary key, and 'Alice' and 'alice' under different ids into a table with a NOCASE
//! UNIQUE index on a BINARY column, before seeing each other's write; all three nodes end
//! with the same single row, byte for byte, and nothing parked. Then the same again with
//! every node running, the writes started at the same moment.

use std::path::{Path, PathBuf};
use std::time::Instant;

use marmot_tests::{
    create_db, query_i64, require_tools, sqlite3, wait_contents, wait_converged, wait_until, Background, NatsServer,
    Node, NodeConfig, TestDir, DEADLINE,
};

const SCHEMA: &str = "
CREATE TABLE names(k TEXT COLLATE NOCASE PRIMARY KEY, v TEXT);
CREATE TABLE handles(id INTEGER PRIMARY KEY, handle TEXT);
CREATE UNIQUE INDEX h ON handles(handle COLLATE NOCASE);
CREATE TABLE marks(node INTEGER PRIMARY KEY);
";

const TABLES: [&str; 2] = ["names", "handles"];

/// What the application sees on `db`, through the `sqlite3` CLI: the key's exact bytes.
fn rows_as_hex(dir: &Path, name: &str, db: &Path) -> String {
    sqlite3(
        dir,
        name,
        db,
        "SELECT 'names', hex(k), v FROM names ORDER BY k;\nSELECT 'handles', id, hex(handle) FROM handles ORDER BY id;",
    )
}

#[test]
fn nocase_keys_written_with_different_case_converge_to_one_row() {
    require_tools();
    let started = Instant::now();
    let dir = TestDir::new("nocase-keys");
    let server = NatsServer::standalone(dir.path(), "nats");
    let dbs: Vec<PathBuf> = (1..=3).map(|i| dir.join(format!("node-{i}.db"))).collect();
    for db in &dbs {
        create_db(db, SCHEMA);
    }
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

    // Node 2's side-car is down while both nodes write: neither write has seen the other.
    assert!(nodes[1].terminate(DEADLINE).success(), "node 2 stopped cleanly");
    sqlite3(
        dir.path(),
        "write-1",
        &dbs[0],
        "INSERT INTO names VALUES ('bob', 'from node 1');\nINSERT INTO handles VALUES (1, 'Alice');",
    );
    let from_1 = "table names (1 rows)\n  t:\"bob\" | t:\"from node 1\"\ntable handles (1 rows)\n  i:1 | t:\"Alice\"\n";
    wait_contents(&[&dbs[0], &dbs[2]], &TABLES, from_1, DEADLINE);
    sqlite3(
        dir.path(),
        "write-2",
        &dbs[1],
        "INSERT INTO names VALUES ('Bob', 'from node 2');\nINSERT INTO handles VALUES (2, 'alice');",
    );
    nodes[1].restart();
    nodes[1].wait_replicating(DEADLINE);

    // Node 2 wrote last: its row wins, with its spelling, everywhere. Row 1 gave up the
    // handle (it waits aside on every node).
    let expected =
        "table names (1 rows)\n  t:\"Bob\" | t:\"from node 2\"\ntable handles (1 rows)\n  i:2 | t:\"alice\"\n";
    wait_contents(&all, &TABLES, expected, DEADLINE);
    let hex: Vec<String> =
        dbs.iter().enumerate().map(|(i, db)| rows_as_hex(dir.path(), &format!("hex-{i}"), db)).collect();
    assert_eq!(hex[0], "names|426F62|from node 2\nhandles|2|616C696365\n");
    assert!(hex.iter().all(|h| *h == hex[0]), "the same bytes on every node: {hex:#?}");

    // Now with every side-car running: nodes 1 and 3 write at the same moment. Whichever
    // write a node saw first, a second one with the same key under NOCASE is an update
    // (names) or ignored (handles) there, never a second row.
    let mut writers = vec![
        Background::sqlite3(
            dir.path(),
            "live-1",
            &dbs[0],
            "INSERT INTO names VALUES ('carol', 'from node 1') ON CONFLICT(k) DO UPDATE SET k = excluded.k, v = excluded.v;\n\
             INSERT OR IGNORE INTO handles VALUES (3, 'Dave');\n\
             INSERT INTO marks VALUES (1);",
        ),
        Background::sqlite3(
            dir.path(),
            "live-3",
            &dbs[2],
            "INSERT INTO names VALUES ('CAROL', 'from node 3') ON CONFLICT(k) DO UPDATE SET k = excluded.k, v = excluded.v;\n\
             INSERT OR IGNORE INTO handles VALUES (4, 'dave');\n\
             INSERT INTO marks VALUES (3);",
        ),
    ];
    for writer in &mut writers {
        writer.wait_success(DEADLINE);
    }
    // Each writer's mark follows its writes: once every node has both marks, every node
    // applied both writers' writes.
    wait_until("every node has both marks", DEADLINE, || {
        dbs.iter().all(|db| query_i64(db, "SELECT count(*) FROM marks") == 2)
    });
    let dump = wait_converged(&all, DEADLINE);
    for db in &dbs {
        assert_eq!(query_i64(db, "SELECT count(*) FROM names WHERE k = 'carol'"), 1, "one carol on {}", db.display());
        assert_eq!(query_i64(db, "SELECT count(*) FROM names"), 2, "bob and carol on {}", db.display());
        assert_eq!(
            query_i64(db, "SELECT count(*) FROM handles WHERE handle = 'dave' COLLATE NOCASE"),
            1,
            "one row holds the handle dave on {}",
            db.display()
        );
        assert_eq!(query_i64(db, "SELECT count(*) FROM handles"), 2, "alice and dave on {}", db.display());
        assert_eq!(query_i64(db, "SELECT count(*) FROM __marmot__parked"), 0, "nothing parked on {}", db.display());
    }
    let hex: Vec<String> =
        dbs.iter().enumerate().map(|(i, db)| rows_as_hex(dir.path(), &format!("hex-live-{i}"), db)).collect();
    assert!(hex.iter().all(|h| *h == hex[0]), "the same bytes on every node: {hex:#?}");
    let aside: Vec<i64> = dbs.iter().map(|db| query_i64(db, "SELECT count(*) FROM __marmot__aside")).collect();
    println!("converged (rows set aside per node: {aside:?}):\n{dump}");
    for node in &mut nodes {
        node.assert_running();
    }
    println!("test took {:?}", started.elapsed());
}
