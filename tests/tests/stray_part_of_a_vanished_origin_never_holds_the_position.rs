//! Issue #13, finding 7: one part of a two-part batch from an origin that then vanished
//! (crashed between parts and retired) used to hold every node's stored position for the
//! shard for ever: snapshots carried the stale position, and once the stream had rolled
//! past it a restart found the stream truncated and exited. Now the incomplete batch is
//! parked (shown by `status`) after a quarter of the stream's length, positions move on,
//! and a restart resumes from the stream.

mod snapshot_common;

use marmot_core::wire::{encode_batch, EncodeOptions};
use marmot_core::{Batch, Hlc, NodeId, Op, RowChange, TableChanges, Value};
use marmot_tests::{create_db, require_tools, wait_converged, wait_until, NatsServer, Node, TestDir, DEADLINE};
use snapshot_common::{file_store_config, position, run_marmot, write_pairs, write_published_rounds, SCHEMA};

const MAX_ENTRIES: u64 = 30;

/// Publishes the first part of a two-part batch from a node that does not exist; returns
/// its stream position.
fn publish_stray_part(nats_url: &str) -> i64 {
    let batch = Batch {
        origin: NodeId(99),
        tables: vec![TableChanges {
            table: "t".into(),
            columns: vec!["id".into(), "node".into(), "v".into(), "body".into()],
            pk: vec![0],
            rows: vec![RowChange {
                hlc: Hlc::from_millis(1),
                op: Op::Upsert,
                values: vec![Value::Integer(-1), Value::Integer(99), Value::Integer(0), Value::Text("x".repeat(400))],
                base: None,
            }],
        }],
        ..Batch::default()
    };
    let parts = encode_batch(&batch, EncodeOptions { compress: false, part_bytes_max: 300 });
    assert!(parts.len() >= 2);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let client = async_nats::connect(nats_url).await.expect("connect to NATS");
        let js = async_nats::jetstream::new(client);
        let ack = js.publish("marmot-change-log-0", parts[0].payload.clone()).await.unwrap().await.unwrap();
        ack.sequence as i64
    })
}

#[test]
fn stray_part_of_a_vanished_origin_never_holds_the_position() {
    require_tools();
    let dir = TestDir::new("stray-part");
    let server = NatsServer::standalone(dir.path(), "nats");
    let store = dir.join("snapshots");
    let dbs: Vec<_> = (1..=2).map(|i| dir.join(format!("node-{i}.db"))).collect();
    for db in &dbs {
        create_db(db, SCHEMA);
    }
    let mut nodes: Vec<Node> = (0..2)
        .map(|i| {
            let mut c = file_store_config(i as u64 + 1, &dbs[i], &server.url(), &store, 3);
            c.max_entries = MAX_ENTRIES;
            Node::start(dir.path(), &c, &[])
        })
        .collect();
    for node in &mut nodes {
        node.wait_replicating(DEADLINE);
    }
    write_pairs(&dbs[0], 1, 1, 3, 100);
    wait_converged(&[&dbs[0], &dbs[1]], DEADLINE);

    let stray = publish_stray_part(&server.url());
    write_published_rounds(&dbs[0], 1, 1_000, 75, 1, 100);
    wait_converged(&[&dbs[0], &dbs[1]], DEADLINE);
    // Before the fix node 2's stored position stayed at stray - 1 for ever.
    wait_until("node 2's stored position passes the stray part", DEADLINE, || {
        nodes[1].assert_running();
        position(&dbs[1]) > stray + MAX_ENTRIES as i64
    });
    let (_, status) = run_marmot(dir.path(), "status", &dir.join("node-2.toml"), &["status"], DEADLINE);
    assert!(status.contains("incomplete batch") && status.contains("of node 99"), "{status}");

    // A restart resumes from the stream (no restore, no exit) and replication goes on.
    assert!(nodes[1].terminate(DEADLINE).success());
    nodes[1].restart();
    nodes[1].wait_replicating(DEADLINE);
    assert!(!nodes[1].log_since_start().contains("a snapshot is needed"), "{}", nodes[1].log_since_start());
    // The stream (30 entries, written within a few seconds) is too short: the start says so.
    let log = nodes[1].log_since_start();
    assert!(log.contains("this stream keeps only") && log.contains("raise replication_log.max_entries"), "{log}");
    write_pairs(&dbs[1], 2, 900_000, 3, 100);
    write_pairs(&dbs[0], 1, 800_000, 3, 100);
    wait_converged(&[&dbs[0], &dbs[1]], DEADLINE);
    for node in &mut nodes {
        assert!(node.terminate(DEADLINE).success());
    }
}
