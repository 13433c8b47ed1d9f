//! Issue #13, finding 11: `marmot -cleanup` drops versions and positions. A node started
//! again after it replays the stream from its start against rows without versions; its
//! own earlier changes in the stream used to be skipped as "own", so an older write from
//! another node won on this node only. Now a node with nothing read from a stream yet
//! applies its own changes there like remote ones.

mod snapshot_common;

use marmot_tests::{query_i64, require_tools, wait_converged, wait_until, NatsServer, TestDir, DEADLINE};
use snapshot_common::{run_marmot, start_nodes_without_snapshots};

const SCHEMA: &str = "CREATE TABLE t(id INTEGER PRIMARY KEY, v INTEGER NOT NULL);";

fn set(db: &std::path::Path, v: i64) {
    marmot_tests::open(db)
        .execute("INSERT INTO t(id, v) VALUES (1, ?1) ON CONFLICT(id) DO UPDATE SET v = excluded.v", [v])
        .unwrap();
}

#[test]
fn cleanup_then_restart_rejoins_without_an_older_write_winning() {
    require_tools();
    let dir = TestDir::new("cleanup-rejoin");
    let server = NatsServer::standalone(dir.path(), "nats");
    let dbs: Vec<_> = (1..=2).map(|i| dir.join(format!("node-{i}.db"))).collect();
    let mut nodes = start_nodes_without_snapshots(dir.path(), &server.url(), &dbs, SCHEMA);
    // Node 1 writes the row, then node 2 overwrites it: node 2's value is the newer one.
    set(&dbs[0], 100);
    wait_until("node 2 has node 1's value", DEADLINE, || {
        query_i64(&dbs[1], "SELECT coalesce(max(v), 0) FROM t") == 100
    });
    set(&dbs[1], 200);
    wait_until("node 1 has node 2's value", DEADLINE, || {
        query_i64(&dbs[0], "SELECT coalesce(max(v), 0) FROM t") == 200
    });

    assert!(nodes[1].terminate(DEADLINE).success());
    let (ok, out) = run_marmot(dir.path(), "cleanup", &dir.join("node-2.toml"), &["-cleanup"], DEADLINE);
    assert!(ok, "{out}");
    nodes[1].restart();
    nodes[1].wait_replicating(DEADLINE);
    // Node 2 replays the stream: node 1's older write, then its own newer one.
    wait_until("node 2 read the whole stream", DEADLINE, || {
        query_i64(&dbs[1], "SELECT coalesce(max(position), 0) FROM __marmot__positions") >= 2
    });
    wait_converged(&[&dbs[0], &dbs[1]], DEADLINE);
    assert_eq!(query_i64(&dbs[1], "SELECT v FROM t WHERE id = 1"), 200, "the newer write must win on node 2 too");
    for node in &mut nodes {
        assert!(node.terminate(DEADLINE).success());
    }
}
