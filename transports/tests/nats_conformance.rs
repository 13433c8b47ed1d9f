//! The JetStream transport against a real `nats-server` (started by the embedded
//! supervisor): the shared `LogTransport` conformance suite and stream setup.
#![cfg(feature = "nats")]

mod nats_support;

use std::sync::Arc;

use bytes::Bytes;
use marmot_core::{LogTransport, Position, Shard};
use marmot_transports::nats::{NatsOptions, NatsTransport};
use nats_support::{isolated_options, start_server};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_transport_passes_the_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    let url = server.client_url().to_string();
    marmot_core::testing::transport_conformance(|shards, max_entries| {
        let opts = isolated_options(&url, shards, max_entries);
        async move {
            let t = NatsTransport::connect(opts)
                .await
                .expect("connect to the test server");
            Arc::new(t) as Arc<dyn LogTransport>
        }
    })
    .await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn differing_stream_settings_fail_unless_update_existing() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    let first = isolated_options(server.client_url(), 1, 100);
    let t = NatsTransport::connect(first.clone())
        .await
        .expect("creates the stream");
    t.publish(Shard(0), "kept", Bytes::from_static(b"x"))
        .await
        .unwrap();

    let bigger = NatsOptions {
        max_entries: 200,
        ..first.clone()
    };
    let err = match NatsTransport::connect(bigger.clone()).await {
        Err(e) => e,
        Ok(_) => panic!("a stream with other settings must not be used silently"),
    };
    let text = err.to_string();
    assert!(
        text.contains(&first.stream_name(0)),
        "error names the stream: {text}"
    );
    assert!(
        text.contains("max_msgs is 100 (configured: 200)"),
        "error names the setting: {text}"
    );
    assert!(
        text.contains("update_existing"),
        "error says how to proceed: {text}"
    );
    assert!(!err.is_retryable(), "a settings mismatch is not retryable");

    let updated = NatsTransport::connect(NatsOptions {
        update_existing: true,
        ..bigger
    })
    .await
    .expect("update_existing updates the stream");
    let stream = updated
        .jetstream()
        .get_stream(first.stream_name(0))
        .await
        .unwrap();
    assert_eq!(
        stream.cached_info().config.max_messages,
        200,
        "max_msgs was updated"
    );
    let b = updated.bounds(Shard(0)).await.unwrap();
    assert_eq!(b.last, Position(1), "updating keeps the stored entries");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_options_and_unknown_shards_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    let opts = NatsOptions {
        replicas: 0,
        ..isolated_options(server.client_url(), 1, 10)
    };
    let err = NatsTransport::connect(opts)
        .await
        .err()
        .expect("replicas 0 is invalid");
    assert!(err.to_string().contains("replicas"), "{err}");
    let t = NatsTransport::connect(isolated_options(server.client_url(), 1, 10))
        .await
        .unwrap();
    let err = t.publish(Shard(1), "x", Bytes::new()).await.unwrap_err();
    assert!(err.to_string().contains("out of range"), "{err}");
    server.shutdown().await;
}
