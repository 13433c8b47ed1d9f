//! Issue #13, finding 12: when JetStream's data is lost and the stream created again, a
//! node whose stored position is N used to subscribe after N in the new stream: entries
//! 1..N of the new stream were applied nowhere but at their origin, with only a warning.
//! Now each position is stored with the epoch (creation time) of its stream; a node that
//! finds another stream reads it from the start.

mod snapshot_common;

use marmot_tests::{require_tools, wait_converged, wait_until, NatsServer, TestDir, DEADLINE};
use snapshot_common::{position, start_nodes_without_snapshots, write_pairs, write_published_rounds, SCHEMA};

fn delete_stream(nats_url: &str, name: &str) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let client = async_nats::connect(nats_url).await.expect("connect to NATS");
        let js = async_nats::jetstream::new(client);
        js.delete_stream(name).await.expect("delete the stream");
    });
}

#[test]
fn recreated_stream_is_read_from_its_start() {
    require_tools();
    let dir = TestDir::new("recreated-stream");
    let server = NatsServer::standalone(dir.path(), "nats");
    let dbs: Vec<_> = (1..=2).map(|i| dir.join(format!("node-{i}.db"))).collect();
    let mut nodes = start_nodes_without_snapshots(dir.path(), &server.url(), &dbs, SCHEMA);
    write_published_rounds(&dbs[0], 1, 1, 20, 1, 100);
    wait_converged(&[&dbs[0], &dbs[1]], DEADLINE);
    wait_until("node 2 stored its position", DEADLINE, || position(&dbs[1]) >= 20);
    for node in &mut nodes {
        assert!(node.terminate(DEADLINE).success());
    }

    // The stream's data is lost; node 1 comes back first, creates the stream again and
    // writes five transactions: positions 1..5 of the new stream.
    delete_stream(&server.url(), "marmot-changes-0");
    nodes[0].restart();
    nodes[0].wait_replicating(DEADLINE);
    write_published_rounds(&dbs[0], 1, 10_000, 5, 1, 100);
    nodes[1].restart();
    wait_until("node 2 notices the new stream", DEADLINE, || {
        nodes[1].assert_running();
        nodes[1].log_since_start().contains("deleted and created again")
    });
    wait_converged(&[&dbs[0], &dbs[1]], DEADLINE);
    write_pairs(&dbs[1], 2, 900_000, 2, 100);
    wait_converged(&[&dbs[0], &dbs[1]], DEADLINE);
    for node in &mut nodes {
        assert!(node.terminate(DEADLINE).success());
    }
}
