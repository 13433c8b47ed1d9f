//! `INSERT OR REPLACE` that collides on a secondary UNIQUE column deletes the row holding
//! the value. SQLite fires no delete trigger for that row (unless the application turned
//! `recursive_triggers` on, which the `sqlite3` CLI does not), yet the delete must reach
//! every node: three nodes end with only the new row, and after the new row is deleted,
//! with none. (Once, the replicas only set the displaced row aside and brought it back
//! when the new row was deleted.)

use std::path::{Path, PathBuf};
use std::time::Instant;

use marmot_tests::{
    create_db, query_i64, require_tools, sqlite3, wait_contents, NatsServer, Node, NodeConfig, TestDir, DEADLINE,
};

const SCHEMA: &str = "
CREATE TABLE users(id INTEGER PRIMARY KEY, email TEXT UNIQUE, name TEXT);
CREATE TABLE marks(id INTEGER PRIMARY KEY, note TEXT NOT NULL);
";

#[test]
fn insert_or_replace_through_a_unique_column_deletes_the_displaced_row_everywhere() {
    require_tools();
    let started = Instant::now();
    let dir = TestDir::new("replace-unique");
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

    sqlite3(dir.path(), "insert-1", &dbs[0], "INSERT INTO users VALUES (1, 'x@m', 'one');");
    wait_contents(&all, &["users"], "table users (1 rows)\n  i:1 | t:\"x@m\" | t:\"one\"\n", DEADLINE);

    // Row 2 takes row 1's email: SQLite deletes row 1, silently (no recursive triggers).
    let out = sqlite3(
        dir.path(),
        "replace-2",
        &dbs[0],
        "PRAGMA recursive_triggers;\nINSERT OR REPLACE INTO users VALUES (2, 'x@m', 'two');",
    );
    assert_eq!(out.trim(), "0", "the sqlite3 CLI runs without recursive_triggers");
    wait_contents(&all, &["users"], "table users (1 rows)\n  i:2 | t:\"x@m\" | t:\"two\"\n", DEADLINE);

    // Deleting row 2 leaves no row anywhere. The mark, written after the delete on the
    // same node, arrives after it: once every node has it, every node applied the delete.
    sqlite3(
        dir.path(),
        "delete-2",
        &dbs[0],
        "DELETE FROM users WHERE id = 2;\nINSERT INTO marks VALUES (1, 'after the delete');",
    );
    let after_delete = "table users (0 rows)\ntable marks (1 rows)\n  i:1 | t:\"after the delete\"\n";
    wait_contents(&all, &["users", "marks"], after_delete, DEADLINE);

    // Nothing brings row 1 back later either: another round trip, from another node.
    sqlite3(dir.path(), "mark-3", &dbs[2], "INSERT INTO marks VALUES (2, 'later, from node 3');");
    let later = "table users (0 rows)\ntable marks (2 rows)\n  i:1 | t:\"after the delete\"\n  \
                 i:2 | t:\"later, from node 3\"\n";
    wait_contents(&all, &["users", "marks"], later, DEADLINE);
    for db in &dbs {
        assert_eq!(
            query_i64(db, "SELECT count(*) FROM __marmot__aside"),
            0,
            "row 1 was deleted on {}, not set aside waiting for its email",
            db.display()
        );
        assert_eq!(query_i64(db, "SELECT count(*) FROM __marmot__parked"), 0, "nothing parked on {}", db.display());
    }
    for node in &mut nodes {
        node.assert_running();
    }
    println!("test took {:?}", started.elapsed());
}
