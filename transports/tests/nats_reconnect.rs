//! The JetStream transport across the loss of its connection: publishes whose
//! acknowledgements went down with the connection, and subscriptions whose consumer did.
#![cfg(feature = "nats")]

mod nats_support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use marmot_core::{LogTransport, Position, Shard};
use marmot_transports::nats::{NatsOptions, NatsTransport};
use nats_support::{isolated_options, start_server, wait_until, DEADLINE};

/// Publishes waiting for acknowledgements when the server dies.
const IN_FLIGHT: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_in_flight_when_the_connection_drops_complete_once_after_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    // Far longer than the restart takes: a publish that waited for an acknowledgement lost
    // with the connection would still be waiting when the test checks.
    let opts =
        NatsOptions { request_timeout: Duration::from_secs(30), ..isolated_options(server.client_url(), 1, 1000) };
    let t = Arc::new(NatsTransport::connect(opts).await.unwrap());
    let mut sub = t.subscribe(Shard(0), Position(0)).await.unwrap();
    t.publish(Shard(0), "before", Bytes::from_static(b"0")).await.unwrap();
    assert_eq!(sub.next_entries(10, DEADLINE).await.unwrap().len(), 1);

    // A stopped server takes the publishes into its socket without answering; killing it
    // then loses them with the connection.
    let pid = server.pid().unwrap();
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGSTOP) };
    let publishes: Vec<_> = (0..IN_FLIGHT)
        .map(|i| {
            let t = t.clone();
            tokio::spawn(async move { t.publish(Shard(0), &format!("p{i}"), Bytes::from(vec![i as u8])).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // SAFETY: as above.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    wait_until("the supervisor restarted the server", || server.pid().is_some_and(|p| p != pid)).await;
    server.wait_ready(DEADLINE).await.expect("restarted server becomes ready");

    let started = tokio::time::Instant::now();
    let mut positions = BTreeSet::new();
    for publish in publishes {
        let position = tokio::time::timeout(DEADLINE, publish)
            .await
            .expect("publish finishes")
            .unwrap()
            .expect("a publish whose acknowledgement was lost is sent again, not failed");
        positions.insert(position);
    }
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the publishes were sent again at once, not after the acknowledgement timeout ({:?})",
        started.elapsed()
    );
    let expected: BTreeSet<Position> = (2..=1 + IN_FLIGHT as u64).map(Position).collect();
    assert_eq!(positions, expected, "each publish stored once, after the first entry");
    assert_eq!(t.bounds(Shard(0)).await.unwrap().last, Position(1 + IN_FLIGHT as u64), "nothing stored twice");

    // The subscription replaced its consumer and delivers each new entry once, in order.
    let mut delivered = Vec::new();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while delivered.len() < IN_FLIGHT && tokio::time::Instant::now() < deadline {
        let batch = sub.next_entries(100, Duration::from_millis(500)).await.expect("subscription keeps working");
        delivered.extend(batch.into_iter().map(|e| e.position));
    }
    assert_eq!(delivered, expected.into_iter().collect::<Vec<_>>());
    server.shutdown().await;
}
