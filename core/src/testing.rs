//! Conformance suites that every implementation of a core trait must pass.
//!
//! The memory transport runs [`transport_conformance`] in its unit tests and the JetStream
//! transport runs the same suite against a real `nats-server`, so the simulator stays
//! faithful to production.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::error::Error;
use crate::model::{Position, Shard};
use crate::transport::{Entry, LogTransport, Subscription};

/// How long the suite waits for entries that must arrive.
const DELIVERY_WAIT: Duration = Duration::from_secs(10);

/// Runs every `LogTransport` property against fresh transports made by `make`.
///
/// `make(shards, max_entries)` must return a new, empty, isolated transport with `shards`
/// shards, each keeping at most `max_entries` entries (dropping the oldest).
/// Panics with the name of the violated property.
pub async fn transport_conformance<F, Fut>(make: F)
where
    F: Fn(u32, u64) -> Fut,
    Fut: Future<Output = Arc<dyn LogTransport>>,
{
    publish_positions_increase_and_bounds_follow(make(2, 1000).await).await;
    subscription_delivers_in_order_from_any_position(make(1, 1000).await).await;
    duplicate_id_is_stored_once(make(1, 1000).await).await;
    concurrent_publishes_are_all_stored(make(1, 10_000).await).await;
    subscription_tails_new_entries_and_waits_bounded(make(1, 1000).await).await;
    shards_are_independent(make(3, 1000).await).await;
    truncated_log_is_reported(make(1, 5).await).await;
}

fn payload(i: u64) -> Bytes {
    Bytes::from(format!("entry-{i}").into_bytes())
}

async fn drain(sub: &mut Box<dyn Subscription>, want: usize) -> Vec<Entry> {
    let deadline = tokio::time::Instant::now() + DELIVERY_WAIT;
    let mut got = Vec::new();
    while got.len() < want && tokio::time::Instant::now() < deadline {
        let batch = sub
            .next_entries(want - got.len(), Duration::from_millis(200))
            .await
            .expect("next_entries must not fail on a healthy transport");
        got.extend(batch);
    }
    got
}

async fn publish_positions_increase_and_bounds_follow(t: Arc<dyn LogTransport>) {
    assert!(t.shard_count() >= 2, "shard_count reports the shards asked for");
    let empty = t.bounds(Shard(0)).await.expect("bounds of an empty shard");
    assert_eq!(empty.last, Position(0), "empty shard: last position is 0");
    let mut last = Position(0);
    for i in 0..10 {
        let p = t.publish(Shard(0), &format!("id-{i}"), payload(i)).await.expect("publish");
        assert!(p > last, "positions strictly increase: {p} after {last}");
        last = p;
    }
    let b = t.bounds(Shard(0)).await.expect("bounds");
    assert_eq!(b.last, last, "bounds.last is the last published position");
    assert!(b.first <= Position(1) || b.first <= last, "bounds.first within the log");
    let other = t.bounds(Shard(1)).await.expect("bounds of shard 1");
    assert_eq!(other.last, Position(0), "publishing to shard 0 leaves shard 1 empty");
}

async fn subscription_delivers_in_order_from_any_position(t: Arc<dyn LogTransport>) {
    let mut positions = Vec::new();
    for i in 0..20 {
        positions.push(t.publish(Shard(0), &format!("o-{i}"), payload(i)).await.unwrap());
    }
    let mut sub = t.subscribe(Shard(0), Position(0)).await.expect("subscribe from start");
    let all = drain(&mut sub, 20).await;
    assert_eq!(all.len(), 20, "a subscription from the start delivers every entry");
    for (i, e) in all.iter().enumerate() {
        assert_eq!(e.position, positions[i], "entries arrive in position order");
        assert_eq!(e.payload, payload(i as u64), "payload is delivered unchanged");
    }
    let mut sub = t.subscribe(Shard(0), positions[11]).await.expect("subscribe from middle");
    let rest = drain(&mut sub, 8).await;
    assert_eq!(rest.len(), 8, "subscribe(after = p) delivers exactly the entries after p");
    assert_eq!(rest[0].position, positions[12], "first entry is the one after `after`");
    let extra = sub.next_entries(10, Duration::from_millis(200)).await.unwrap();
    assert!(extra.is_empty(), "each entry is delivered once per subscription");
}

async fn duplicate_id_is_stored_once(t: Arc<dyn LogTransport>) {
    let a = t.publish(Shard(0), "same", payload(1)).await.unwrap();
    let b = t.publish(Shard(0), "other", payload(2)).await.unwrap();
    let again = t.publish(Shard(0), "same", payload(1)).await.unwrap();
    assert_eq!(again, a, "republishing an id returns the stored entry's position");
    let bounds = t.bounds(Shard(0)).await.unwrap();
    assert_eq!(bounds.last, b, "a duplicate stores nothing new");
}

async fn concurrent_publishes_are_all_stored(t: Arc<dyn LogTransport>) {
    let n = 200u64;
    let futs = (0..n).map(|i| {
        let t = t.clone();
        async move { t.publish(Shard(0), &format!("c-{i}"), payload(i)).await }
    });
    let results = futures::future::join_all(futs).await;
    let mut positions: Vec<Position> =
        results.into_iter().map(|r| r.expect("pipelined publish")).collect();
    positions.sort();
    positions.dedup();
    assert_eq!(positions.len() as u64, n, "concurrent publishes get distinct positions");
    let mut sub = t.subscribe(Shard(0), Position(0)).await.unwrap();
    let all = drain(&mut sub, n as usize).await;
    assert_eq!(all.len() as u64, n, "every concurrently published entry is delivered");
}

async fn subscription_tails_new_entries_and_waits_bounded(t: Arc<dyn LogTransport>) {
    let mut sub = t.subscribe(Shard(0), Position(0)).await.unwrap();
    let started = std::time::Instant::now();
    let none = sub.next_entries(10, Duration::from_millis(300)).await.unwrap();
    assert!(none.is_empty(), "nothing published: nothing delivered");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "next_entries returns after about `wait` when idle"
    );
    let publisher = t.clone();
    let task = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        publisher.publish(Shard(0), "late", payload(7)).await
    });
    let got = drain(&mut sub, 1).await;
    task.await.unwrap().unwrap();
    assert_eq!(got.len(), 1, "an entry published after subscribing is delivered");
    assert_eq!(got[0].payload, payload(7));
}

async fn shards_are_independent(t: Arc<dyn LogTransport>) {
    for s in 0..3u32 {
        for i in 0..(s as u64 + 1) {
            t.publish(Shard(s), &format!("s{s}-{i}"), payload(i)).await.unwrap();
        }
    }
    for s in 0..3u32 {
        let mut sub = t.subscribe(Shard(s), Position(0)).await.unwrap();
        let got = drain(&mut sub, s as usize + 1).await;
        assert_eq!(got.len(), s as usize + 1, "shard {s} holds only its own entries");
        let extra = sub.next_entries(10, Duration::from_millis(100)).await.unwrap();
        assert!(extra.is_empty(), "shard {s} holds nothing of other shards");
    }
}

async fn truncated_log_is_reported(t: Arc<dyn LogTransport>) {
    let mut last = Position(0);
    for i in 0..12 {
        last = t.publish(Shard(0), &format!("t-{i}"), payload(i)).await.unwrap();
    }
    let b = t.bounds(Shard(0)).await.unwrap();
    assert_eq!(b.last, last, "truncation keeps the last position");
    assert!(b.first > Position(1), "a log over max_entries drops its oldest entries");
    assert!(!b.can_resume_after(Position(0)), "bounds tell that position 0 cannot resume");
    match t.subscribe(Shard(0), Position(0)).await {
        Err(Error::Truncated { first, .. }) => {
            assert_eq!(first, b.first, "the error names the first entry held")
        }
        Err(e) => panic!("subscribing before the first entry must fail with Truncated, got {e}"),
        Ok(_) => panic!("subscribing before the first entry must fail with Truncated"),
    }
    let mut sub = t.subscribe(Shard(0), Position(b.first.0 - 1)).await.expect("resume at first");
    let got = drain(&mut sub, (b.last.0 - b.first.0 + 1) as usize).await;
    assert_eq!(got.first().map(|e| e.position), Some(b.first), "resume delivers from first");
}
