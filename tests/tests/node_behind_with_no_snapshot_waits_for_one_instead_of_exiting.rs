//! A node comes back after the streams dropped what it missed, and the store has no
//! snapshot yet. It neither exits (a supervisor would restart it into the same state,
//! forever) nor starts replicating with a gap: it says what it waits for and waits; once
//! an up-to-date node saves a snapshot, it restores it and converges.

mod snapshot_common;

use marmot_tests::{
    create_db, require_tools, wait_converged, wait_until, NatsServer, Node, NodeConfig, TestDir, DEADLINE,
};
use snapshot_common::{
    file_store_config, position, run_marmot, save_snapshot, snapshots_in, wait_stream_beyond, write_pairs,
    write_published_rounds, MAX_ENTRIES, SCHEMA,
};

#[test]
fn node_behind_with_no_snapshot_waits_for_one_instead_of_exiting() {
    require_tools();
    let dir = TestDir::new("snapshot-none-yet");
    let server = NatsServer::standalone(dir.path(), "nats");
    let store = dir.join("snapshots");
    let dbs: Vec<_> = (1..=2).map(|i| dir.join(format!("node-{i}.db"))).collect();
    for db in &dbs {
        create_db(db, SCHEMA);
    }
    // Node 1 saves no snapshots on its own; node 2 restores from the directory store.
    let mut first = NodeConfig::new(1, &dbs[0]).with_urls(vec![server.url()]);
    first.max_entries = MAX_ENTRIES;
    let mut nodes = vec![
        Node::start(dir.path(), &first, &[]),
        Node::start(dir.path(), &file_store_config(2, &dbs[1], &server.url(), &store, 3), &[]),
    ];
    for node in &mut nodes {
        node.wait_replicating(DEADLINE);
    }
    write_pairs(&dbs[0], 1, 1, 5, 100);
    wait_converged(&[&dbs[0], &dbs[1]], DEADLINE);
    assert!(nodes[1].terminate(DEADLINE).success());

    let at_stop = position(&dbs[0]);
    write_published_rounds(&dbs[0], 1, 1_000, 2 * MAX_ENTRIES as i64, 2, 100);
    wait_stream_beyond(&dbs[0], at_stop);

    nodes[1].restart();
    wait_until("node 2 says it waits for a snapshot", DEADLINE, || {
        nodes[1].assert_running();
        nodes[1].log_since_start().contains("no usable snapshot exists yet")
    });
    assert!(snapshots_in(&store).is_empty());
    let node2_toml = dir.join("node-2.toml");
    let (_, status) = run_marmot(dir.path(), "status", &node2_toml, &["status"], DEADLINE);
    assert!(status.contains("WAITING FOR A SNAPSHOT"), "{status}");

    let saver = dir.join("node-1-saver.toml");
    std::fs::write(&saver, file_store_config(1, &dbs[0], &server.url(), &store, 3).to_toml()).expect("write a config");
    save_snapshot(dir.path(), &saver, &store);
    wait_until("node 2 restored the snapshot", DEADLINE, || {
        nodes[1].assert_running();
        nodes[1].log_since_start().contains("restored; replaying the streams")
    });
    nodes[1].wait_replicating(DEADLINE);
    wait_converged(&[&dbs[0], &dbs[1]], DEADLINE);
    write_pairs(&dbs[1], 2, 900_000, 2, 100);
    wait_converged(&[&dbs[0], &dbs[1]], DEADLINE);
    for node in &mut nodes {
        assert!(node.terminate(DEADLINE).success());
    }
}
