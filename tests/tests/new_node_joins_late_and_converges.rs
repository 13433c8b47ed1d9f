//! A fourth node, with an empty copy of the schema, joins a running three-node cluster
//! after the streams dropped their first entries: it restores a snapshot (it has nothing
//! the streams could replay from), converges, and then replicates both ways.

mod snapshot_common;

use std::time::Instant;

use marmot_tests::{
    create_db, query_i64, require_tools, wait_converged, wait_until, NatsServer, Node, TestDir, DEADLINE,
};
use snapshot_common::{
    file_store_config, rows, snapshots_in, wait_stream_beyond, write_pairs, write_published_rounds, MAX_ENTRIES, SCHEMA,
};

const ROUNDS_PER_NODE: i64 = MAX_ENTRIES as i64;
const PER_ROUND: i64 = 2;

#[test]
fn new_node_joins_late_and_converges() {
    require_tools();
    let started = Instant::now();
    let dir = TestDir::new("snapshot-late-join");
    let server = NatsServer::standalone(dir.path(), "nats");
    let store = dir.join("snapshots");
    let dbs: Vec<_> = (1..=4).map(|i| dir.join(format!("node-{i}.db"))).collect();
    let config = |id: u64| file_store_config(id, &dbs[id as usize - 1], &server.url(), &store, 3);
    for db in &dbs[..3] {
        create_db(db, SCHEMA);
    }
    let mut nodes: Vec<Node> = (1..=3u64).map(|id| Node::start(dir.path(), &config(id), &[])).collect();
    for node in &mut nodes {
        node.wait_replicating(DEADLINE);
    }
    for (i, db) in dbs[..3].iter().enumerate() {
        write_published_rounds(db, i as i64 + 1, 1 + 100_000 * i as i64, ROUNDS_PER_NODE, PER_ROUND, 200);
    }
    let expected = 3 * 2 * ROUNDS_PER_NODE * PER_ROUND;
    wait_until("nodes 1 to 3 have every row", DEADLINE, || dbs[..3].iter().all(|db| rows(db) == expected));
    wait_converged(&[&dbs[0], &dbs[1], &dbs[2]], DEADLINE);
    wait_stream_beyond(&dbs[0], 0);
    // The periodic saves (every max_entries / shards entries) are the only snapshots.
    wait_until("a periodic snapshot is in the store", DEADLINE, || !snapshots_in(&store).is_empty());

    create_db(&dbs[3], SCHEMA);
    let joined = Instant::now();
    let mut node4 = Node::start(dir.path(), &config(4), &[]);
    wait_until("node 4 restored a snapshot", DEADLINE, || {
        node4.assert_running();
        node4.log_since_start().contains("restored; replaying the streams")
    });
    node4.wait_replicating(DEADLINE);
    wait_converged(&[&dbs[0], &dbs[1], &dbs[2], &dbs[3]], DEADLINE);
    println!("node 4 joined and converged in {:?}", joined.elapsed());

    // Node 4 writes and receives like the others.
    write_pairs(&dbs[3], 4, 900_000, 3, 200);
    write_pairs(&dbs[1], 2, 950_000, 3, 200);
    wait_until("the new rows arrived everywhere", DEADLINE, || dbs.iter().all(|db| rows(db) == expected + 12));
    wait_converged(&[&dbs[0], &dbs[1], &dbs[2], &dbs[3]], DEADLINE);
    assert_eq!(query_i64(&dbs[0], "SELECT count(*) FROM t WHERE node = 4"), 6);
    for node in nodes.iter_mut().chain([&mut node4]) {
        node.assert_running();
    }
    println!("test took {:?}", started.elapsed());
}
