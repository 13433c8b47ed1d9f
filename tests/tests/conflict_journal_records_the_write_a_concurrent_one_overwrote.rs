//! The conflict journal with three real nodes and the `sqlite3` CLI as the application.
//! Row 1: node 1 updates it while node 3's side-car is stopped; node 3's application
//! updates it too, later, without having seen node 1's write. Node 3's write wins
//! everywhere and node 1's is journaled as lost — on every node, with its image.
//! Row 2: node 2 updates it after receiving node 1's update: sequential, not a conflict.
//! `marmot conflicts` (text and JSON, `--table`), plain SQL and `status` show it.

use std::path::{Path, PathBuf};

use marmot_tests::{
    create_db, marmot_command, query_i64, require_tools, sqlite3, wait_contents, wait_until, NatsServer, Node,
    NodeConfig, TestDir, DEADLINE,
};

const SCHEMA: &str = "PRAGMA journal_mode = WAL; CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT);";

/// The dump of table `t` holding `rows` (id, v), as [`wait_contents`] compares it.
fn t_holds(rows: &[(i64, &str)]) -> String {
    let mut out = format!("table t ({} rows)\n", rows.len());
    for (id, v) in rows {
        out += &format!("  i:{id} | t:{v:?}\n");
    }
    out
}

/// `marmot -config <config> conflicts <args>`: (exit code, output).
fn conflicts(config: &Path, args: &[&str]) -> (i32, String) {
    marmot_command(config, "conflicts", args)
}

#[test]
fn conflict_journal_records_the_write_a_concurrent_one_overwrote() {
    require_tools();
    let dir = TestDir::new("conflicts");
    let server = NatsServer::standalone(dir.path(), "nats");
    let dbs: Vec<PathBuf> = (1..=3).map(|i| dir.join(format!("node-{i}.db"))).collect();
    let configs: Vec<PathBuf> = (1..=3).map(|i| dir.join(format!("node-{i}.toml"))).collect();
    let mut nodes: Vec<Node> = (1..=3u64)
        .map(|id| {
            let db = &dbs[id as usize - 1];
            create_db(db, SCHEMA);
            let mut c = NodeConfig::new(id, db).with_urls(vec![server.url()]);
            c.extra = "\n[snapshot]\nenabled = false\n".into();
            Node::start(dir.path(), &c, &[])
        })
        .collect();
    for node in &mut nodes {
        node.wait_replicating(DEADLINE);
    }
    let all: Vec<&Path> = dbs.iter().map(PathBuf::as_path).collect();
    sqlite3(dir.path(), "seed", &dbs[0], "INSERT INTO t VALUES (1, 'start'), (2, 'start');");
    wait_contents(&all, &["t"], &t_holds(&[(1, "start"), (2, "start")]), DEADLINE);

    // Node 3's side-car stops; its application keeps writing (the triggers capture it).
    let stopped = nodes[2].terminate(DEADLINE);
    assert!(stopped.success(), "node 3 stopped ({stopped})");
    sqlite3(dir.path(), "one", &dbs[0], "UPDATE t SET v = 'one' WHERE id = 1; UPDATE t SET v = 'one' WHERE id = 2;");
    wait_until("node 2 has node 1's updates", DEADLINE, || {
        query_i64(&dbs[1], "SELECT count(*) FROM t WHERE v = 'one'") == 2
    });
    // Node 2 builds on what it received: not a conflict.
    sqlite3(dir.path(), "two", &dbs[1], "UPDATE t SET v = 'two' WHERE id = 2;");
    // Node 3 never saw 'one': a concurrent write, made later, so it wins.
    sqlite3(dir.path(), "three", &dbs[2], "UPDATE t SET v = 'three' WHERE id = 1;");
    nodes[2].restart();
    nodes[2].wait_replicating(DEADLINE);
    wait_contents(&all, &["t"], &t_holds(&[(1, "three"), (2, "two")]), DEADLINE);

    // Every node journals node 1's 'one' of row 1, and nothing else.
    let entries = |config: &Path| -> Vec<serde_json::Value> {
        let (code, out) = conflicts(config, &["--json"]);
        assert_eq!(code, 0, "{out}");
        out.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect()
    };
    wait_until("every node journals the lost write", DEADLINE, || configs.iter().all(|c| entries(c).len() == 1));
    for (i, config) in configs.iter().enumerate() {
        let e = entries(config);
        assert_eq!(e.len(), 1, "node {}: exactly one lost write: {e:?}", i + 1);
        let e = &e[0];
        assert_eq!(e["table"], "t", "{e}");
        assert_eq!(e["key"], serde_json::json!([1]), "{e}");
        assert_eq!(e["loser_node"], 1, "{e}");
        assert_eq!(e["loser_image"], serde_json::json!({"id": 1, "v": "one"}), "{e}");
        assert_eq!(e["winner_node"], 3, "{e}");
    }
    let same: Vec<Vec<serde_json::Value>> = configs.iter().map(|c| entries(c)).collect();
    assert!(
        same.iter().all(|e| e[0]["loser_version"] == same[0][0]["loser_version"]),
        "one loss, one version: {same:?}"
    );

    let (code, text) = conflicts(&configs[1], &[]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("t [1]") && text.contains("lost:") && text.contains(r#"{"id":1,"v":"one"}"#), "{text}");
    let (_, other) = conflicts(&configs[1], &["--table", "u"]);
    assert!(other.contains("no conflicts recorded"), "{other}");
    // The application can read the journal with plain SQL.
    assert_eq!(
        query_i64(&dbs[0], "SELECT count(*) FROM __marmot__conflicts WHERE table_name = 't' AND key = '[1]'"),
        1
    );
    let (_, status) = marmot_command(&configs[0], "status", &["--timeout", "5"]);
    assert!(status.contains("conflicts: 1 writes lost"), "{status}");
    for node in &mut nodes {
        node.assert_running();
    }
}
