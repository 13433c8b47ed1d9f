//! The JetStream transport against a real `nats-server` (started by the embedded
//! supervisor): the shared `LogTransport` conformance suite and stream setup.
#![cfg(feature = "nats")]

mod nats_support;

use std::sync::Arc;

use bytes::Bytes;
use marmot_core::{LogTransport, Position, Shard};
use marmot_transports::embedded::{EmbeddedOptions, EmbeddedServer};
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
            let t = NatsTransport::connect(opts).await.expect("connect to the test server");
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
    let t = NatsTransport::connect(first.clone()).await.expect("creates the stream");
    t.publish(Shard(0), "kept", Bytes::from_static(b"x")).await.unwrap();

    let bigger = NatsOptions { max_entries: 200, ..first.clone() };
    let err = match NatsTransport::connect(bigger.clone()).await {
        Err(e) => e,
        Ok(_) => panic!("a stream with other settings must not be used silently"),
    };
    let text = err.to_string();
    assert!(text.contains(&first.stream_name(0)), "error names the stream: {text}");
    assert!(text.contains("max_msgs is 100 (configured: 200)"), "error names the setting: {text}");
    assert!(text.contains("update_existing"), "error says how to proceed: {text}");
    assert!(!err.is_retryable(), "a settings mismatch is not retryable");

    let updated = NatsTransport::connect(NatsOptions { update_existing: true, ..bigger })
        .await
        .expect("update_existing updates the stream");
    let stream = updated.jetstream().get_stream(first.stream_name(0)).await.unwrap();
    assert_eq!(stream.cached_info().config.max_messages, 200, "max_msgs was updated");
    let b = updated.bounds(Shard(0)).await.unwrap();
    assert_eq!(b.last, Position(1), "updating keeps the stored entries");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_options_and_unknown_shards_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    let opts = NatsOptions { replicas: 0, ..isolated_options(server.client_url(), 1, 10) };
    let err = NatsTransport::connect(opts).await.err().expect("replicas 0 is invalid");
    assert!(err.to_string().contains("replicas"), "{err}");
    let t = NatsTransport::connect(isolated_options(server.client_url(), 1, 10)).await.unwrap();
    let err = t.publish(Shard(1), "x", Bytes::new()).await.unwrap_err();
    assert!(err.to_string().contains("out of range"), "{err}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_waits_for_a_server_that_starts_later() {
    nats_support::require_nats_server();
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let opts = isolated_options(&format!("nats://127.0.0.1:{port}"), 1, 10);
    let connecting = tokio::spawn(NatsTransport::connect(opts));
    // Attempts fail while the server starts (which takes far longer than an attempt);
    // a connect that gave up would finish with an error below.
    assert!(!connecting.is_finished(), "connect keeps trying while no server listens");
    let server = EmbeddedServer::start(EmbeddedOptions {
        bind_address: format!("127.0.0.1:{port}"),
        ..nats_support::embedded_options(1, dir.path())
    })
    .await
    .unwrap();
    let t = tokio::time::timeout(nats_support::DEADLINE, connecting)
        .await
        .expect("connect finishes once the server is up")
        .unwrap()
        .expect("connected");
    t.publish(Shard(0), "x", Bytes::new()).await.unwrap();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_password_are_used_and_bad_credentials_fail_at_once() {
    nats_support::require_nats_server();
    let dir = tempfile::tempdir().unwrap();
    let auth = dir.path().join("auth.conf");
    std::fs::write(&auth, "authorization { user: marmot, password: s3cret }\n").unwrap();
    let server = EmbeddedServer::start(EmbeddedOptions {
        server_config: Some(auth),
        ..nats_support::embedded_options(1, &dir.path().join("data"))
    })
    .await
    .unwrap();
    let base = isolated_options(server.client_url(), 1, 10);
    let good = NatsOptions { user_name: Some("marmot".into()), user_password: Some("s3cret".into()), ..base.clone() };
    let t = NatsTransport::connect(good).await.expect("right credentials connect");
    t.publish(Shard(0), "x", Bytes::new()).await.unwrap();
    let bad = NatsOptions { user_name: Some("marmot".into()), user_password: Some("wrong".into()), ..base };
    let err = tokio::time::timeout(nats_support::DEADLINE, NatsTransport::connect(bad))
        .await
        .expect("bad credentials are reported, not retried forever")
        .err()
        .expect("wrong password must not connect");
    assert!(!err.is_retryable(), "{err}");
    assert!(err.to_string().contains("authorization"), "{err}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_dropped_under_a_lagging_subscription_are_reported_as_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    let t = Arc::new(NatsTransport::connect(isolated_options(server.client_url(), 1, 50)).await.unwrap());
    let mut sub = t.subscribe(Shard(0), Position(0)).await.unwrap();
    t.publish(Shard(0), "first", Bytes::new()).await.unwrap();
    let got = sub.next_entries(1, nats_support::DEADLINE).await.unwrap();
    assert_eq!(got.len(), 1);
    // Far more than the consumer pulls ahead (500) and than the stream keeps (50).
    let publishes = (0..2000).map(|i| {
        let t = t.clone();
        async move { t.publish(Shard(0), &format!("p{i}"), Bytes::new()).await }
    });
    for r in futures::future::join_all(publishes).await {
        r.unwrap();
    }
    let mut last = Position(1);
    let deadline = tokio::time::Instant::now() + nats_support::DEADLINE;
    let err = loop {
        assert!(tokio::time::Instant::now() < deadline, "no truncation reported");
        match sub.next_entries(100, std::time::Duration::from_millis(500)).await {
            Ok(batch) => {
                for e in batch {
                    assert_eq!(e.position.0, last.0 + 1, "entries before the gap are contiguous");
                    last = e.position;
                }
            }
            Err(e) => break e,
        }
    };
    match err {
        marmot_core::Error::Truncated { position, first, .. } => {
            assert_eq!(position, last, "the error names the last entry delivered");
            assert!(first.0 > last.0 + 1, "the error names the first entry after the gap");
        }
        e => panic!("expected Truncated, got {e}"),
    }
    let again = sub.next_entries(10, std::time::Duration::from_millis(10)).await;
    assert!(matches!(again, Err(marmot_core::Error::Truncated { .. })), "a truncated subscription stays failed");
    server.shutdown().await;
}
