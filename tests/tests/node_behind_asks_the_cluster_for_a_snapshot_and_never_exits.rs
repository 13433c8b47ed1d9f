//! Issue #13's incident, made deterministic: the only snapshot in the store is stale (it
//! was saved before the streams dropped what a stopped node missed). The node that comes
//! back neither exits nor restores the stale snapshot: it asks the cluster for one, an
//! up-to-date node answers by saving one, and the node restores it and converges. A node
//! that is behind refuses to save a snapshot (it would only be another stale one).

mod snapshot_common;

use marmot_tests::{create_db, require_tools, wait_converged, wait_until, NatsServer, Node, TestDir, DEADLINE};
use snapshot_common::{
    file_store_config, position, run_marmot, save_snapshot, snapshots_in, wait_stream_beyond, write_pairs,
    write_published_rounds, MAX_ENTRIES, SCHEMA,
};

#[test]
fn node_behind_asks_the_cluster_for_a_snapshot_and_never_exits() {
    require_tools();
    let dir = TestDir::new("snapshot-ask-the-cluster");
    let server = NatsServer::standalone(dir.path(), "nats");
    let store = dir.join("snapshots");
    let dbs: Vec<_> = (1..=2).map(|i| dir.join(format!("node-{i}.db"))).collect();
    for db in &dbs {
        create_db(db, SCHEMA);
    }
    let configs: Vec<_> = (0..2).map(|i| file_store_config(i as u64 + 1, &dbs[i], &server.url(), &store, 3)).collect();
    let mut nodes: Vec<Node> = configs.iter().map(|c| Node::start(dir.path(), c, &[])).collect();
    for node in &mut nodes {
        node.wait_replicating(DEADLINE);
    }
    write_pairs(&dbs[0], 1, 1, 5, 100);
    wait_converged(&[&dbs[0], &dbs[1]], DEADLINE);

    // Node 2 saves a snapshot now, then stops; the stream then drops what it misses.
    let node2_toml = dir.join("node-2.toml");
    let stale = save_snapshot(dir.path(), &node2_toml, &store);
    let stale_json = stale.with_file_name(stale.file_name().unwrap().to_string_lossy().replace(".db.zst", ".json"));
    let (stale_bytes, stale_manifest) = (std::fs::read(&stale).unwrap(), std::fs::read(&stale_json).unwrap());
    assert!(nodes[1].terminate(DEADLINE).success());
    let at_stop = position(&dbs[0]);
    write_published_rounds(&dbs[0], 1, 1_000, 2 * MAX_ENTRIES as i64, 2, 100);
    wait_stream_beyond(&dbs[0], at_stop);

    // A node that is behind refuses to save: its snapshot could not help anyone.
    let (saved, output) = run_marmot(dir.path(), "save-behind", &node2_toml, &["-save-snapshot"], DEADLINE);
    assert!(!saved, "a node behind the stream saved a snapshot:\n{output}");
    assert!(output.contains("not saving a snapshot: this node is at position"), "{output}");

    // Leave only the stale snapshot in the store (as retention by name did in #13).
    for entry in std::fs::read_dir(&store).unwrap() {
        std::fs::remove_file(entry.unwrap().path()).unwrap();
    }
    std::fs::write(&stale, &stale_bytes).unwrap();
    std::fs::write(&stale_json, &stale_manifest).unwrap();
    assert_eq!(snapshots_in(&store).len(), 1);

    nodes[1].restart();
    wait_until("node 2 asks the cluster and waits", DEADLINE, || {
        nodes[1].assert_running();
        nodes[1].log_since_start().contains("asked the cluster for one")
    });
    wait_until("node 1 answers with a snapshot", DEADLINE, || {
        nodes[0].log_since_start().contains("a node asked the cluster for a snapshot")
    });
    wait_until("node 2 restored a snapshot that covers what it missed", DEADLINE, || {
        nodes[1].assert_running();
        nodes[1].log_since_start().contains("restored; replaying the streams")
    });
    let stale_name = stale.file_name().unwrap().to_string_lossy().into_owned();
    let log = nodes[1].log_since_start();
    let restored: Vec<&str> = log.lines().filter(|l| l.contains("snapshot restored")).collect();
    assert!(!restored.is_empty() && restored.iter().all(|l| !l.contains(&stale_name)), "{restored:?}");
    nodes[1].wait_replicating(DEADLINE);
    wait_converged(&[&dbs[0], &dbs[1]], DEADLINE);
    write_pairs(&dbs[1], 2, 900_000, 2, 100);
    wait_converged(&[&dbs[0], &dbs[1]], DEADLINE);
    let status = run_marmot(dir.path(), "status", &node2_toml, &["status"], DEADLINE).1;
    assert!(!status.contains("WAITING FOR A SNAPSHOT"), "{status}");
    for node in &mut nodes {
        assert!(node.terminate(DEADLINE).success());
    }
}
