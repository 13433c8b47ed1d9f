//! The snapshot lease against a real server: a holder that renews keeps it past its time
//! to live, and a holder whose lease expired and was taken cannot release the new one's.
#![cfg(feature = "nats")]

mod nats_support;

use std::time::Duration;

use marmot_transports::nats::{lease, NatsTransport};
use nats_support::{isolated_options, start_server};

const TTL: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_lease_outlives_its_ttl_and_a_stale_holder_cannot_release_the_next_one() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    let t = NatsTransport::connect(isolated_options(server.client_url(), 1, 100)).await.unwrap();
    let store = lease::lease_bucket(t.jetstream(), "test-lease", TTL, 1).await.unwrap();

    // Node 1 works for twice the time to live, renewing; node 2 tries all along.
    let mut first = lease::try_acquire(&store, "snapshot", "node-1").await.unwrap().expect("free at first");
    let taken_meanwhile = first
        .hold_while(TTL / 3, async {
            let mut taken = false;
            for _ in 0..8 {
                tokio::time::sleep(TTL / 4).await;
                taken |= lease::try_acquire(&store, "snapshot", "node-2").await.unwrap().is_some();
            }
            taken
        })
        .await;
    assert!(!taken_meanwhile, "another node took a lease its holder kept renewing");

    // Node 1 stalls past the time to live; the lease expires and node 2 takes it.
    let mut second = None;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        second = lease::try_acquire(&store, "snapshot", "node-2").await.unwrap();
        if second.is_some() {
            break;
        }
    }
    let second = second.expect("an expired lease can be taken");
    // Node 1 wakes up and releases what it believes it holds: node 2's lease stays.
    assert!(first.release().await.is_err(), "a stale holder released another node's lease");
    assert!(lease::try_acquire(&store, "snapshot", "node-3").await.unwrap().is_none(), "node 2's lease was cleared");
    second.release().await.unwrap();
    assert!(lease::try_acquire(&store, "snapshot", "node-3").await.unwrap().is_some(), "released leases are free");
}
