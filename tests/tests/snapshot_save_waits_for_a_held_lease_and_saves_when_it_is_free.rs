//! Another "node" holds the snapshot lease when this node's save is due, and never saves
//! (as a node whose store is broken would). The save waits instead of being skipped, and
//! once the lease is released with no newer snapshot in the store, this node saves one.

mod snapshot_common;

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use marmot_tests::{create_db, require_tools, wait_until, NatsServer, Node, TestDir, DEADLINE};
use snapshot_common::{file_store_config, position, snapshots_in, write_published_rounds, MAX_ENTRIES, SCHEMA};

const LEASE_BUCKET: &str = "marmot-changes-snapshot-lease";

#[test]
fn snapshot_save_waits_for_a_held_lease_and_saves_when_it_is_free() {
    require_tools();
    let dir = TestDir::new("snapshot-lease");
    let server = NatsServer::standalone(dir.path(), "nats");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");
    let lease = runtime.block_on(async {
        let client = async_nats::connect(server.url()).await.expect("connect to nats-server");
        let js = jetstream::new(client);
        let store = js
            .create_key_value(kv::Config {
                bucket: LEASE_BUCKET.into(),
                history: 1,
                max_age: Duration::from_secs(300),
                ..Default::default()
            })
            .await
            .expect("create the lease bucket");
        store.create("snapshot", "node-9".into()).await.expect("take the lease");
        store
    });

    let store = dir.join("snapshots");
    let db = dir.join("node-1.db");
    create_db(&db, SCHEMA);
    let mut node = Node::start(dir.path(), &file_store_config(1, &db, &server.url(), &store, 3), &[]);
    node.wait_replicating(DEADLINE);
    // More entries than `max_entries / shards`: a save is due. Each one read back before
    // the next, so the node never lags its stream by more than the stream keeps.
    for round in 0..MAX_ENTRIES as i64 + 2 {
        let before = position(&db);
        write_published_rounds(&db, 1, 1 + 2 * round, 1, 1, 100);
        wait_until("the node reads its entry back", DEADLINE, || position(&db) > before);
    }
    wait_until("the save waits for the lease", DEADLINE, || {
        node.assert_running();
        node.log_since_start().contains("waiting for the other node's snapshot")
    });
    assert!(snapshots_in(&store).is_empty(), "no snapshot while the lease is held");

    runtime.block_on(lease.purge("snapshot")).expect("release the lease");
    wait_until("a snapshot is saved after the lease is released", DEADLINE, || {
        node.assert_running();
        !snapshots_in(&store).is_empty()
    });
    wait_until("the save is logged", DEADLINE, || node.log_since_start().contains("snapshot uploaded"));
    let status = node.terminate(DEADLINE);
    assert!(status.success(), "{status:?}; its log:\n{}", node.log_since_start());
}
