//! Conformance suites that every implementation of a core trait must pass.
//!
//! The memory transport runs [`transport_conformance`] in its unit tests and the JetStream
//! transport runs the same suite against a real `nats-server`, so the simulator stays
//! faithful to production.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::model::{Position, Shard};
use crate::snapshot::{ObjectInfo, SnapshotStore};
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
    live_subscription_reports_entries_dropped_before_it_read_them(make(1, 5).await).await;
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
    let mut positions: Vec<Position> = results.into_iter().map(|r| r.expect("pipelined publish")).collect();
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
    assert!(started.elapsed() < Duration::from_secs(5), "next_entries returns after about `wait` when idle");
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

/// Entries published behind a live subscription in
/// [`live_subscription_reports_entries_dropped_before_it_read_them`]: far more than the log
/// keeps and than a transport may reasonably have fetched ahead for its reader.
const LIVE_TRUNCATION_ENTRIES: u64 = 3000;

/// A subscription that is already reading when the log drops entries it has not read yet
/// must not skip them: it may still deliver entries it had fetched before they were dropped
/// (in order, without gaps), then it reports `Truncated` — naming a first entry beyond its
/// position — and keeps reporting it.
async fn live_subscription_reports_entries_dropped_before_it_read_them(t: Arc<dyn LogTransport>) {
    let first = t.publish(Shard(0), "live-0", payload(0)).await.unwrap();
    let mut sub = t.subscribe(Shard(0), Position(0)).await.expect("subscribe from the start");
    let got = drain(&mut sub, 1).await;
    assert_eq!(got.first().map(|e| e.position), Some(first), "a live subscription delivers the first entry");
    let mut last = first;
    for i in 1..=LIVE_TRUNCATION_ENTRIES {
        last = t.publish(Shard(0), &format!("live-{i}"), payload(i)).await.unwrap();
    }
    let held = t.bounds(Shard(0)).await.unwrap();
    assert!(held.first.0 > first.0 + 1, "the log dropped entries the subscription has not read");
    let mut delivered = first;
    let deadline = tokio::time::Instant::now() + DELIVERY_WAIT;
    let reported = loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a live subscription whose next entries were dropped must report Truncated \
             (delivered through {delivered}, log holds {}..={})",
            held.first,
            held.last
        );
        match sub.next_entries(1000, Duration::from_millis(200)).await {
            Ok(entries) => {
                for e in entries {
                    assert_eq!(
                        e.position.0,
                        delivered.0 + 1,
                        "a live subscription never skips entries dropped by truncation"
                    );
                    delivered = e.position;
                }
                assert!(
                    delivered < last,
                    "a live subscription cannot deliver every entry of a log that dropped them unread \
                     (it delivered through {delivered})"
                );
            }
            Err(Error::Truncated { first, position, .. }) => {
                assert_eq!(position, delivered, "Truncated names the last position delivered");
                assert!(first.0 > delivered.0 + 1, "Truncated names a first entry beyond the gap: {first}");
                break first;
            }
            Err(e) => panic!("a live subscription whose next entries were dropped must report Truncated, got {e}"),
        }
    };
    match sub.next_entries(10, Duration::from_millis(200)).await {
        Err(Error::Truncated { .. }) => {}
        other => panic!("a truncated subscription keeps reporting Truncated (first {reported}), got {other:?}"),
    }
}

/// Bytes of the large object in [`snapshot_store_conformance`]: more than one 5 MiB S3
/// multipart part and many NATS chunks, and not a multiple of any chunk size.
const SNAPSHOT_LARGE_BYTES: usize = 6 * 1024 * 1024 + 12_345;

/// Runs every [`SnapshotStore`] property against `store`, which must start empty and be
/// used by nothing else meanwhile. The suite deletes what it stored. Panics with the name
/// of the violated property.
pub async fn snapshot_store_conformance(store: Arc<dyn SnapshotStore>) {
    let dir = ScratchDir::new();
    get_of_missing_name_is_not_found(&*store, &dir).await;
    large_file_round_trips_byte_for_byte(&*store, &dir).await;
    put_replaces_an_existing_object(&*store, &dir).await;
    names_with_a_path_prefix_work(&*store, &dir).await;
    list_shows_every_name_with_its_size(&*store, &dir).await;
    delete_removes_and_delete_of_missing_succeeds(&*store, &dir).await;
    failed_put_leaves_nothing_under_the_name(&*store, &dir).await;
    no_partial_object_is_visible_during_put(&*store, &dir).await;
    let left = store.list().await.expect("list at the end");
    for o in &left {
        store.delete(&o.name).await.expect("delete at the end");
    }
    assert!(store.list().await.expect("list").is_empty(), "deleting every name empties the store");
}

/// A directory for the suite's local files, removed on drop. (`tempfile` is a
/// dev-dependency of core only, and this module is public API.)
struct ScratchDir(std::path::PathBuf);

impl ScratchDir {
    fn new() -> ScratchDir {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("marmot-snapshot-conformance-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create the scratch directory");
        ScratchDir(path)
    }

    /// Writes `bytes` to a fresh local file and returns its path.
    fn file(&self, name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, bytes).expect("write a local file");
        path
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.0.join(name)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Deterministic, incompressible-looking bytes (xorshift), distinct per `seed`.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

async fn fetch(store: &dyn SnapshotStore, dir: &ScratchDir, name: &str) -> Vec<u8> {
    let to = dir.path("fetched");
    store.get(name, &to).await.unwrap_or_else(|e| panic!("get {name:?}: {e}"));
    std::fs::read(&to).expect("read the fetched file")
}

fn sizes(list: &[ObjectInfo]) -> std::collections::BTreeMap<String, u64> {
    list.iter().map(|o| (o.name.clone(), o.size_bytes)).collect()
}

async fn get_of_missing_name_is_not_found(store: &dyn SnapshotStore, dir: &ScratchDir) {
    assert!(store.list().await.expect("list").is_empty(), "the suite needs an empty store");
    for name in ["missing.zst", "snapshots/missing/0001.zst"] {
        match store.get(name, &dir.path("missing")).await {
            Err(Error::NotFound(_)) => {}
            Err(e) => panic!("get of a missing name must fail with NotFound, got {e}"),
            Ok(()) => panic!("get of a missing name must fail with NotFound, got Ok"),
        }
    }
}

async fn large_file_round_trips_byte_for_byte(store: &dyn SnapshotStore, dir: &ScratchDir) {
    let bytes = pattern(SNAPSHOT_LARGE_BYTES, 1);
    let from = dir.file("large", &bytes);
    store.put("large.zst", &from).await.expect("put of a multi-MB file");
    let to = dir.file("fetched", b"older, longer or shorter content is replaced");
    store.get("large.zst", &to).await.expect("get of a multi-MB file");
    let got = std::fs::read(&to).expect("read the fetched file");
    assert_eq!(got.len(), bytes.len(), "a multi-MB object round trips with its size");
    assert!(got == bytes, "a multi-MB object round trips byte for byte");
    let listed = sizes(&store.list().await.expect("list"));
    assert_eq!(listed.get("large.zst"), Some(&(bytes.len() as u64)), "list gives the size");
    store.delete("large.zst").await.expect("delete");
}

async fn put_replaces_an_existing_object(store: &dyn SnapshotStore, dir: &ScratchDir) {
    let first = pattern(300_000, 2);
    let second = pattern(1_000, 3);
    store.put("replace.zst", &dir.file("first", &first)).await.expect("first put");
    store.put("replace.zst", &dir.file("second", &second)).await.expect("second put");
    assert!(fetch(store, dir, "replace.zst").await == second, "put replaces the content");
    let listed = sizes(&store.list().await.expect("list"));
    assert_eq!(listed.len(), 1, "a replaced object is listed once: {listed:?}");
    assert_eq!(listed.get("replace.zst"), Some(&1_000), "list shows the new size");
    store.delete("replace.zst").await.expect("delete");
}

async fn names_with_a_path_prefix_work(store: &dyn SnapshotStore, dir: &ScratchDir) {
    let name = "snapshots/node-1/0001.zst";
    let bytes = pattern(70_000, 4);
    store.put(name, &dir.file("prefixed", &bytes)).await.expect("put under a path prefix");
    assert!(fetch(store, dir, name).await == bytes, "a prefixed name round trips");
    let listed = sizes(&store.list().await.expect("list"));
    assert_eq!(listed.get(name), Some(&70_000), "list gives the full prefixed name: {listed:?}");
    store.delete(name).await.expect("delete a prefixed name");
    assert!(store.list().await.expect("list").is_empty(), "deleting the prefixed name");
}

async fn list_shows_every_name_with_its_size(store: &dyn SnapshotStore, dir: &ScratchDir) {
    let want: std::collections::BTreeMap<String, u64> = [
        ("a.zst", 1u64),
        ("b.zst", 4_096),
        ("snapshots/node-1/0001.zst", 10_000),
        ("snapshots/node-1/0002.zst", 0),
        ("snapshots/node-2/0001.zst", 123_457),
    ]
    .into_iter()
    .map(|(n, s)| (n.to_string(), s))
    .collect();
    for (i, (name, size)) in want.iter().enumerate() {
        let from = dir.file(&format!("list-{i}"), &pattern(*size as usize, 10 + i as u64));
        store.put(name, &from).await.unwrap_or_else(|e| panic!("put {name:?}: {e}"));
    }
    let listed = sizes(&store.list().await.expect("list"));
    assert_eq!(listed, want, "list shows exactly the stored names with their sizes");
    assert!(fetch(store, dir, "snapshots/node-1/0002.zst").await.is_empty(), "empty object");
}

async fn delete_removes_and_delete_of_missing_succeeds(store: &dyn SnapshotStore, dir: &ScratchDir) {
    store.delete("b.zst").await.expect("delete");
    store.delete("snapshots/node-2/0001.zst").await.expect("delete a prefixed name");
    let listed = sizes(&store.list().await.expect("list"));
    assert!(!listed.contains_key("b.zst"), "a deleted name is not listed");
    assert!(listed.contains_key("a.zst"), "delete removes only the name given");
    match store.get("b.zst", &dir.path("deleted")).await {
        Err(Error::NotFound(_)) => {}
        other => panic!("get of a deleted name must fail with NotFound, got {other:?}"),
    }
    store.delete("b.zst").await.expect("deleting a deleted name succeeds");
    store.delete("never-stored.zst").await.expect("deleting a missing name succeeds");
    store.delete("no/such/dir/x.zst").await.expect("deleting under a missing prefix succeeds");
    for name in listed.keys() {
        store.delete(name).await.expect("delete");
    }
    assert!(store.list().await.expect("list").is_empty(), "deleting every name empties the store");
}

async fn failed_put_leaves_nothing_under_the_name(store: &dyn SnapshotStore, dir: &ScratchDir) {
    let missing = dir.path("no-such-local-file");
    assert!(store.put("failed.zst", &missing).await.is_err(), "put of a missing file fails");
    assert!(store.list().await.expect("list").is_empty(), "a failed put stores nothing");
}

async fn no_partial_object_is_visible_during_put(store: &dyn SnapshotStore, dir: &ScratchDir) {
    let old = pattern(200_000, 20);
    let new = pattern(SNAPSHOT_LARGE_BYTES, 21);
    let name = "snapshots/atomic.zst";
    store.put(name, &dir.file("old", &old)).await.expect("put the old version");
    let from = dir.file("new", &new);
    let done = std::sync::atomic::AtomicBool::new(false);
    let writer = async {
        let r = store.put(name, &from).await;
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        r
    };
    let reader = async {
        let mut seen = 0u32;
        let to = dir.path("observed");
        while !done.load(std::sync::atomic::Ordering::SeqCst) {
            for o in store.list().await.expect("list while a put runs") {
                assert_eq!(o.name, name, "no temporary name is listed while a put runs");
                assert!(
                    o.size_bytes == old.len() as u64 || o.size_bytes == new.len() as u64,
                    "list never shows a partial size ({} bytes)",
                    o.size_bytes
                );
            }
            match store.get(name, &to).await {
                Ok(()) => {
                    let got = std::fs::read(&to).expect("read");
                    assert!(got == old || got == new, "get never returns a partial object");
                    seen += 1;
                }
                // A replaced object may vanish under a reader (NATS purges old chunks).
                Err(e) if e.is_retryable() => {}
                Err(e) => panic!("get while a put replaces the object: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        seen
    };
    let (put, _seen) = futures::join!(writer, reader);
    put.expect("put of the new version");
    assert!(fetch(store, dir, name).await == new, "after put returns, get gives the new version");
    store.delete(name).await.expect("delete");
}

/// Named blobs in memory: a [`SnapshotStore`] for unit tests and the simulation.
#[derive(Default)]
pub struct MemoryStore {
    objects: std::sync::Mutex<std::collections::BTreeMap<String, Vec<u8>>>,
}

#[async_trait::async_trait]
impl SnapshotStore for MemoryStore {
    async fn put(&self, name: &str, from: &std::path::Path) -> Result<()> {
        let bytes = std::fs::read(from).map_err(|source| Error::Io { context: format!("reading {name}"), source })?;
        self.objects.lock().expect("store lock").insert(name.to_owned(), bytes);
        Ok(())
    }

    async fn get(&self, name: &str, to: &std::path::Path) -> Result<()> {
        let bytes = self.objects.lock().expect("store lock").get(name).cloned();
        let bytes = bytes.ok_or_else(|| Error::NotFound(name.to_owned()))?;
        std::fs::write(to, bytes).map_err(|source| Error::Io { context: format!("writing {name}"), source })
    }

    async fn list(&self) -> Result<Vec<ObjectInfo>> {
        let objects = self.objects.lock().expect("store lock");
        Ok(objects.iter().map(|(n, b)| ObjectInfo { name: n.clone(), size_bytes: b.len() as u64 }).collect())
    }

    async fn delete(&self, name: &str) -> Result<()> {
        self.objects.lock().expect("store lock").remove(name);
        Ok(())
    }
}

impl MemoryStore {
    /// Stores `bytes` under `name` directly (tests that lay out a store by hand).
    pub fn insert(&self, name: &str, bytes: Vec<u8>) {
        self.objects.lock().expect("store lock").insert(name.to_owned(), bytes);
    }

    /// Number of objects stored.
    pub fn len(&self) -> usize {
        self.objects.lock().expect("store lock").len()
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
