//! A node stopped while the others write far more than the streams keep comes back by
//! restoring a snapshot from a local-directory store, and converges. A row written into
//! its database while its side-car was down (captured by the triggers, never published)
//! is published before the restore replaces the database, and reaches the other nodes.

mod snapshot_common;

use std::time::Instant;

use marmot_tests::{
    create_db, query_i64, require_tools, wait_converged, wait_until, NatsServer, Node, TestDir, DEADLINE,
};
use snapshot_common::{
    file_store_config, position, rows, save_snapshot, snapshots_in, wait_stream_beyond, write_pairs,
    write_published_rounds, MAX_ENTRIES, SCHEMA,
};

/// Rounds (each published as at least one stream entry) that each of nodes 1 and 2
/// writes while node 3 is down: far beyond what the log keeps.
const ROUNDS_PER_NODE: i64 = 2 * MAX_ENTRIES as i64;
/// Pair transactions per round.
const PER_ROUND: i64 = 3;
const WRITES_PER_NODE: i64 = ROUNDS_PER_NODE * PER_ROUND;

#[test]
fn stopped_node_restores_a_snapshot_and_converges() {
    require_tools();
    let started = Instant::now();
    let dir = TestDir::new("snapshot-restore");
    let server = NatsServer::standalone(dir.path(), "nats");
    let store = dir.join("snapshots");
    let dbs: Vec<_> = (1..=3).map(|i| dir.join(format!("node-{i}.db"))).collect();
    for db in &dbs {
        create_db(db, SCHEMA);
    }
    let mut nodes: Vec<Node> = (1..=3u64)
        .map(|id| Node::start(dir.path(), &file_store_config(id, &dbs[id as usize - 1], &server.url(), &store, 3), &[]))
        .collect();
    for node in &mut nodes {
        node.wait_replicating(DEADLINE);
    }

    write_pairs(&dbs[0], 1, 1, 5, 100);
    wait_converged(&[&dbs[0], &dbs[1], &dbs[2]], DEADLINE);

    let status = nodes[2].terminate(DEADLINE);
    assert!(status.success(), "node 3 stopped cleanly on SIGTERM ({status})");

    // Nodes 1 and 2 write far more than the streams keep; node 3's database gets a row
    // of its own, which its triggers capture while its side-car is down.
    let at_stop = position(&dbs[2]);
    write_published_rounds(&dbs[0], 1, 1_000, ROUNDS_PER_NODE, PER_ROUND, 100);
    write_published_rounds(&dbs[1], 2, 100_000, ROUNDS_PER_NODE, PER_ROUND, 100);
    write_pairs(&dbs[2], 3, 900_000, 1, 100);
    assert_eq!(
        query_i64(&dbs[2], "SELECT count(*) FROM __marmot__log"),
        2,
        "node 3's triggers captured its local write (two rows)"
    );
    let expected_rows = 2 * (5 + 2 * WRITES_PER_NODE + 1);
    wait_until("nodes 1 and 2 have each other's rows", DEADLINE, || {
        rows(&dbs[0]) == expected_rows - 2 && rows(&dbs[1]) == expected_rows - 2
    });
    wait_converged(&[&dbs[0], &dbs[1]], DEADLINE);
    wait_stream_beyond(&dbs[0], at_stop);

    // Periodic saves (every max_entries / shards entries) put snapshots in the store.
    wait_until("a periodic snapshot is in the store", DEADLINE, || !snapshots_in(&store).is_empty());
    let periodic = snapshots_in(&store).len();
    // And one saved now, by a separate process on node 1's database, holds everything.
    let newest = save_snapshot(dir.path(), &dir.join("node-1.toml"), &store);
    println!("{periodic} periodic snapshot(s); saved {}", newest.display());

    let restart = Instant::now();
    nodes[2].restart();
    wait_until("node 3 restored a snapshot", DEADLINE, || {
        nodes[2].assert_running();
        nodes[2].log_since_start().contains("restored; replaying the streams")
    });
    let log = nodes[2].log_since_start();
    assert!(log.contains("the stream no longer holds what this node missed"), "node 3 logs why it restores:\n{log}");
    assert!(
        log.contains("published local changes before restoring"),
        "node 3 published its pending change before restoring:\n{log}"
    );
    nodes[2].wait_replicating(DEADLINE);
    let dump = wait_converged(&[&dbs[0], &dbs[1], &dbs[2]], DEADLINE);
    println!("node 3 restored and converged in {:?}", restart.elapsed());
    assert_eq!(dump.lines().next(), Some(format!("table t ({expected_rows} rows)").as_str()));
    for db in &dbs {
        assert_eq!(
            query_i64(db, "SELECT count(*) FROM t WHERE node = 3"),
            2,
            "node 3's unpublished write survived the restore and reached {}",
            db.display()
        );
        assert_eq!(query_i64(db, "SELECT sum(v) FROM t"), 0);
    }

    // Replication goes on both ways after the restore.
    write_pairs(&dbs[2], 3, 950_000, 3, 100);
    write_pairs(&dbs[0], 1, 960_000, 3, 100);
    wait_until("the new rows arrived everywhere", DEADLINE, || dbs.iter().all(|db| rows(db) == expected_rows + 12));
    wait_converged(&[&dbs[0], &dbs[1], &dbs[2]], DEADLINE);
    for node in &mut nodes {
        node.assert_running();
    }
    println!("test took {:?}", started.elapsed());
}
