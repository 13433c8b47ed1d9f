//! Issue #13's scenario: a 3-node cluster of embedded servers, `replicas = 3`, a stream of
//! 64 entries, snapshots in the NATS object store. Node 3 stops; nodes 1 and 2 commit 600
//! small transactions, rolling the stream far past node 3's position (and, when node 3's
//! server leaving the JetStream cluster stalls a consumer, past a live node's too). Node 3
//! starts again. Every node must come back without a human — restoring a snapshot that
//! covers what it missed, asking the cluster for one if none does — and converge; none may
//! exit.

use std::fmt::Write as _;
use std::path::PathBuf;

use marmot_tests::{
    create_db, free_cluster_port, query_i64, require_tools, wait_converged, Background, Node, NodeConfig, TestDir,
    DEADLINE,
};

const NODES: u64 = 3;
const TXNS_PER_WRITER: i64 = 300;
const SCHEMA: &str = "CREATE TABLE t(id INTEGER PRIMARY KEY, node INTEGER NOT NULL, v INTEGER NOT NULL);";

fn burst(node: u64) -> String {
    let mut sql = String::new();
    for i in 0..TXNS_PER_WRITER {
        let id = node as i64 * 1_000_000 + i;
        let _ = writeln!(sql, "INSERT INTO t(id, node, v) VALUES ({id}, {node}, {i});");
    }
    sql
}

#[test]
fn node_stopped_during_a_burst_comes_back_by_itself() {
    require_tools();
    let dir = TestDir::new("burst-while-stopped");
    let cluster_ports: Vec<u16> = (0..NODES).map(|_| free_cluster_port()).collect();
    let mut nodes: Vec<Node> = (1..=NODES)
        .map(|id| {
            let node_dir = dir.join(format!("node-{id}"));
            std::fs::create_dir(&node_dir).unwrap();
            let db = node_dir.join("app.db");
            create_db(&db, SCHEMA);
            let me = cluster_ports[id as usize - 1];
            let peers: Vec<String> =
                cluster_ports.iter().filter(|&&p| p != me).map(|p| format!("nats://127.0.0.1:{p}/")).collect();
            let args =
                ["-cluster-addr".to_owned(), format!("127.0.0.1:{me}"), "-cluster-peers".to_owned(), peers.join(",")];
            let mut config = NodeConfig::new(id, &db);
            config.replicas = 3;
            config.max_entries = 64;
            config.extra = "\n[snapshot]\nenabled = true\nstore = \"nats\"\n".into();
            Node::start(&node_dir, &config, &args)
        })
        .collect();
    for node in &mut nodes {
        node.wait_replicating(DEADLINE);
    }
    let dbs: Vec<PathBuf> = nodes.iter().map(|n| n.db().to_path_buf()).collect();
    let paths: Vec<&std::path::Path> = dbs.iter().map(PathBuf::as_path).collect();
    // Every node writes once and sees the others' rows: the stream and its consumers are
    // settled after the elections that follow the cluster's start.
    for (i, db) in dbs.iter().enumerate() {
        let sql = format!("INSERT INTO t VALUES ({}, {}, 0);", i + 1, i + 1);
        Background::sqlite3(dir.path(), &format!("warm-up-{i}"), db, &sql).wait_success(DEADLINE);
    }
    wait_converged(&paths, DEADLINE);

    assert!(nodes[2].terminate(DEADLINE).success());
    let mut writers: Vec<Background> = (1..=2)
        .map(|n| Background::sqlite3(dir.path(), &format!("burst-{n}"), &dbs[n - 1], &burst(n as u64)))
        .collect();
    for w in &mut writers {
        w.wait_success(DEADLINE);
    }
    nodes[2].restart();
    wait_converged(&paths, DEADLINE * 2);
    for (i, node) in nodes.iter_mut().enumerate() {
        node.assert_running();
        assert_eq!(query_i64(&dbs[i], "SELECT count(*) FROM t"), 3 + 2 * TXNS_PER_WRITER);
    }
    for node in &mut nodes {
        assert!(node.terminate(DEADLINE).success());
    }
}
