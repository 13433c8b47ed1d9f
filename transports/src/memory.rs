//! The memory transport: shards as in-memory ordered logs, with seeded faults.
//!
//! [`MemoryLog`] holds the logs (shared by every node of a simulation or test);
//! [`MemoryLog::connect`] gives one node its [`MemoryTransport`] view. Faults, each driven
//! by the log's seeded RNG so a seed replays exactly:
//! - **delay**: an entry becomes visible to a node only some ticks after it was stored
//!   (per node and entry, never breaking order within a shard) — with several shards
//!   this reorders entries across shards;
//! - **redelivery**: a subscription occasionally rewinds and delivers entries again;
//! - **publish errors**: a publish fails, either before storing or after storing (the
//!   caller cannot tell, as with a lost acknowledgement);
//! - **partition**: a node's publishes fail and its subscriptions see nothing;
//! - **truncation**: `max_entries` per shard, and [`MemoryLog::truncate`]. A subscription
//!   whose next entry was dropped reports [`Error::Truncated`] (at subscribe time, or on its
//!   next read if it was already reading), as the JetStream transport does; it never skips.
//!
//! [`MemoryLog::fired`] counts the faults that actually happened, so a simulation can tell
//! a fault that fired from one that was merely configured.
//!
//! Time is a tick counter advanced by the caller ([`MemoryLog::tick`]); nothing here reads
//! a clock, so it is deterministic when driven from one thread.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use marmot_core::{Bounds, Entry, Error, LogTransport, Position, Result, Shard, Subscription};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::sync::Notify;

/// Fault probabilities and bounds for one node's view. All default to "no fault".
#[derive(Clone, Debug, Default)]
pub struct FaultConfig {
    /// Maximum extra ticks before an entry is visible to this node.
    pub delay_ticks_max: u64,
    /// Probability that a read rewinds by up to `redeliver_entries_max` entries.
    pub redeliver_probability: f64,
    /// How far a redelivery rewinds.
    pub redeliver_entries_max: u64,
    /// Probability that a publish fails without storing.
    pub publish_fail_probability: f64,
    /// Probability that a publish stores the entry and still reports failure.
    pub publish_lost_ack_probability: f64,
}

/// How many times each fault of a [`MemoryLog`] fired (across all node views).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FiredFaults {
    /// Publishes that failed before storing (injected, not partitions).
    pub publish_failures: u64,
    /// Publishes that stored the entry and reported failure.
    pub lost_acks: u64,
    /// Reads that rewound a subscription by at least one entry.
    pub redeliveries: u64,
    /// Entries that became visible to a node later than they were stored.
    pub delayed_entries: u64,
    /// Reads of a live subscription that reported [`Error::Truncated`].
    pub live_truncations: u64,
}

struct StoredEntry {
    id: String,
    payload: Bytes,
    tick: u64,
}

#[derive(Default)]
struct ShardLog {
    /// Position of `entries[0]`.
    first: u64,
    entries: std::collections::VecDeque<StoredEntry>,
    ids: BTreeMap<String, u64>,
    last: u64,
    /// Changes when the log is recreated ([`MemoryLog::recreate`]).
    epoch: u64,
}

struct NodeView {
    faults: FaultConfig,
    partitioned: bool,
    /// Per shard: the tick at which the entry at each position becomes visible.
    visible: BTreeMap<(u32, u64), u64>,
}

struct State {
    shards: Vec<ShardLog>,
    max_entries: u64,
    tick: u64,
    rng: ChaCha8Rng,
    nodes: Vec<NodeView>,
    fired: FiredFaults,
}

/// The shared logs of a memory transport.
#[derive(Clone)]
pub struct MemoryLog {
    state: Arc<Mutex<State>>,
    notify: Arc<Notify>,
}

impl MemoryLog {
    /// `shards` empty logs keeping at most `max_entries` each, faults seeded by `seed`.
    pub fn new(shards: u32, max_entries: u64, seed: u64) -> MemoryLog {
        let state = State {
            shards: (0..shards).map(|_| ShardLog { first: 1, epoch: 1, ..ShardLog::default() }).collect(),
            max_entries: max_entries.max(1),
            tick: 0,
            rng: ChaCha8Rng::seed_from_u64(seed),
            nodes: Vec::new(),
            fired: FiredFaults::default(),
        };
        MemoryLog { state: Arc::new(Mutex::new(state)), notify: Arc::new(Notify::new()) }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("memory log mutex poisoned")
    }

    /// A transport view for one node, with its faults.
    pub fn connect(&self, faults: FaultConfig) -> MemoryTransport {
        let mut st = self.lock();
        st.nodes.push(NodeView { faults, partitioned: false, visible: BTreeMap::new() });
        MemoryTransport { log: self.clone(), node: st.nodes.len() - 1, shards: st.shards.len() as u32 }
    }

    /// Advances logical time by one tick.
    pub fn tick(&self) {
        self.lock().tick += 1;
    }

    /// Cuts node view `node` off (publishes fail, reads see nothing) or heals it.
    pub fn set_partitioned(&self, node: usize, partitioned: bool) {
        self.lock().nodes[node].partitioned = partitioned;
    }

    /// Replaces a node view's faults (for example, none at all when healing).
    pub fn set_faults(&self, node: usize, faults: FaultConfig) {
        let mut st = self.lock();
        st.nodes[node].faults = faults;
        st.nodes[node].visible.clear();
    }

    /// Drops the entries of `shard` before `position`. Returns how many were dropped.
    pub fn truncate(&self, shard: Shard, position: Position) -> u64 {
        let mut st = self.lock();
        let log = &mut st.shards[shard.0 as usize];
        let mut dropped = 0;
        while log.first < position.0 && !log.entries.is_empty() {
            let e = log.entries.pop_front().expect("non-empty");
            log.ids.remove(&e.id);
            log.first += 1;
            dropped += 1;
        }
        dropped
    }

    /// Deletes every shard's log and creates it again, empty, with a new epoch (the
    /// stream's data lost, as when JetStream's storage is lost). Live subscriptions fail.
    pub fn recreate(&self) {
        let mut st = self.lock();
        for log in &mut st.shards {
            *log = ShardLog { first: 1, epoch: log.epoch + 1, ..ShardLog::default() };
        }
        for node in &mut st.nodes {
            node.visible.clear();
        }
        drop(st);
        self.notify.notify_waiters();
    }

    /// The faults fired so far.
    pub fn fired(&self) -> FiredFaults {
        self.lock().fired
    }

    /// The first position `shard` still holds.
    pub fn first(&self, shard: Shard) -> Position {
        Position(self.lock().shards[shard.0 as usize].first)
    }

    /// The epoch of `shard`'s log (see [`Bounds::epoch`]).
    pub fn epoch(&self, shard: Shard) -> u64 {
        self.lock().shards[shard.0 as usize].epoch
    }

    /// The last position of `shard`.
    pub fn last(&self, shard: Shard) -> Position {
        Position(self.lock().shards[shard.0 as usize].last)
    }

    /// The entries `shard` still holds after `after`, with their positions, as stored
    /// (regardless of any node's delivery faults).
    pub fn stored_after(&self, shard: Shard, after: Position) -> Vec<(Position, Bytes)> {
        let st = self.lock();
        let log = &st.shards[shard.0 as usize];
        let skip = (after.0 + 1).saturating_sub(log.first) as usize;
        log.entries
            .iter()
            .enumerate()
            .skip(skip)
            .map(|(i, e)| (Position(log.first + i as u64), e.payload.clone()))
            .collect()
    }
}

/// One node's view of a [`MemoryLog`].
#[derive(Clone)]
pub struct MemoryTransport {
    log: MemoryLog,
    node: usize,
    shards: u32,
}

impl MemoryTransport {
    /// A single-node transport without faults (tests).
    pub fn new(shards: u32, max_entries: u64) -> MemoryTransport {
        MemoryLog::new(shards, max_entries, 0).connect(FaultConfig::default())
    }

    /// The index of this view in its log (for [`MemoryLog::set_partitioned`]).
    pub fn node_index(&self) -> usize {
        self.node
    }
}

fn check_shard(shards: &[ShardLog], shard: Shard) -> Result<()> {
    if (shard.0 as usize) < shards.len() {
        Ok(())
    } else {
        Err(Error::Transport { message: format!("no shard {shard}"), retryable: false })
    }
}

#[async_trait]
impl LogTransport for MemoryTransport {
    fn shard_count(&self) -> u32 {
        self.shards
    }

    async fn publish(&self, shard: Shard, id: &str, payload: Bytes) -> Result<Position> {
        let mut st = self.log.lock();
        check_shard(&st.shards, shard)?;
        let node = &st.nodes[self.node];
        if node.partitioned {
            return Err(Error::transport("partitioned"));
        }
        let (fail, lost) = (node.faults.publish_fail_probability, node.faults.publish_lost_ack_probability);
        if fail > 0.0 && st.rng.gen_bool(fail) {
            st.fired.publish_failures += 1;
            return Err(Error::transport("injected publish failure"));
        }
        let tick = st.tick;
        let max_entries = st.max_entries;
        let log = &mut st.shards[shard.0 as usize];
        let position = match log.ids.get(id) {
            Some(&p) => p,
            None => {
                log.last += 1;
                log.entries.push_back(StoredEntry { id: id.to_owned(), payload, tick });
                log.ids.insert(id.to_owned(), log.last);
                while log.entries.len() as u64 > max_entries {
                    let e = log.entries.pop_front().expect("non-empty");
                    log.ids.remove(&e.id);
                    log.first += 1;
                }
                log.last
            }
        };
        if lost > 0.0 && st.rng.gen_bool(lost) {
            st.fired.lost_acks += 1;
            return Err(Error::transport("injected lost acknowledgement"));
        }
        drop(st);
        self.log.notify.notify_waiters();
        Ok(Position(position))
    }

    async fn subscribe(&self, shard: Shard, after: Position) -> Result<Box<dyn Subscription>> {
        // Subscribing works while cut off (the subscription then sees nothing until healed).
        let b = self.bounds_unchecked(shard)?;
        if !b.can_resume_after(after) {
            return Err(Error::Truncated { shard, position: after, first: b.first });
        }
        let sub =
            MemorySubscription { view: self.clone(), shard, next: after.0 + 1, delivered: after.0, epoch: b.epoch };
        Ok(Box::new(sub))
    }

    async fn bounds(&self, shard: Shard) -> Result<Bounds> {
        // A cut-off node cannot ask the server either.
        if self.log.lock().nodes[self.node].partitioned {
            return Err(Error::transport("partitioned"));
        }
        self.bounds_unchecked(shard)
    }
}

impl MemoryTransport {
    fn bounds_unchecked(&self, shard: Shard) -> Result<Bounds> {
        let st = self.log.lock();
        check_shard(&st.shards, shard)?;
        let log = &st.shards[shard.0 as usize];
        Ok(Bounds { first: Position(log.first), last: Position(log.last), epoch: log.epoch })
    }
}

struct MemorySubscription {
    view: MemoryTransport,
    shard: Shard,
    /// The next position to read (below `delivered + 1` after a redelivery rewind).
    next: u64,
    /// The highest position delivered (or the `after` the subscription started with).
    delivered: u64,
    /// The log's epoch when subscribed: a recreated log ends the subscription.
    epoch: u64,
}

impl MemorySubscription {
    fn take(&mut self, max: usize) -> Result<Vec<Entry>> {
        let mut st = self.view.log.lock();
        let st = &mut *st;
        let node = &mut st.nodes[self.view.node];
        if node.partitioned {
            return Ok(Vec::new());
        }
        let faults = node.faults.clone();
        if faults.redeliver_probability > 0.0 && st.rng.gen_bool(faults.redeliver_probability) {
            let back = st.rng.gen_range(0..=faults.redeliver_entries_max);
            let rewound = self.next.saturating_sub(back).max(1);
            if rewound < self.next {
                st.fired.redeliveries += 1;
            }
            self.next = rewound;
        }
        let log = &st.shards[self.shard.0 as usize];
        if log.epoch != self.epoch {
            return Err(Error::transport("the log was deleted and created again"));
        }
        if self.delivered + 1 < log.first {
            st.fired.live_truncations += 1;
            return Err(Error::Truncated {
                shard: self.shard,
                position: Position(self.delivered),
                first: Position(log.first),
            });
        }
        // A rewind may reach entries dropped since they were delivered: resume at the first.
        self.next = self.next.max(log.first);
        let mut out = Vec::new();
        let mut prev_visible = 0;
        while out.len() < max && self.next <= log.last {
            let e = &log.entries[(self.next - log.first) as usize];
            let key = (self.shard.0, self.next);
            let visible = match node.visible.get(&key) {
                Some(&v) => v,
                None => {
                    let d = if faults.delay_ticks_max > 0 { st.rng.gen_range(0..=faults.delay_ticks_max) } else { 0 };
                    let v = (e.tick + d).max(prev_visible);
                    if v > e.tick {
                        st.fired.delayed_entries += 1;
                    }
                    node.visible.insert(key, v);
                    v
                }
            };
            prev_visible = visible;
            if visible > st.tick {
                break;
            }
            out.push(Entry { position: Position(self.next), payload: e.payload.clone() });
            self.delivered = self.delivered.max(self.next);
            self.next += 1;
        }
        Ok(out)
    }
}

#[async_trait]
impl Subscription for MemorySubscription {
    async fn next_entries(&mut self, max: usize, wait: Duration) -> Result<Vec<Entry>> {
        let got = self.take(max)?;
        if !got.is_empty() || wait.is_zero() {
            return Ok(got);
        }
        let deadline = tokio::time::Instant::now() + wait;
        let notify = self.view.log.notify.clone();
        loop {
            let notified = notify.notified();
            let got = self.take(max)?;
            if !got.is_empty() {
                return Ok(got);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.take(max);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use marmot_core::LogTransport;

    use super::*;

    #[tokio::test]
    async fn memory_transport_passes_the_conformance_suite() {
        marmot_core::testing::transport_conformance(|shards, max| async move {
            Arc::new(MemoryTransport::new(shards, max)) as Arc<dyn LogTransport>
        })
        .await;
    }

    #[tokio::test]
    async fn partitioned_node_cannot_publish_and_sees_nothing() {
        let log = MemoryLog::new(1, 100, 1);
        let a = log.connect(FaultConfig::default());
        let b = log.connect(FaultConfig::default());
        a.publish(Shard(0), "x", Bytes::from_static(b"x")).await.unwrap();
        log.set_partitioned(b.node_index(), true);
        assert!(b.publish(Shard(0), "y", Bytes::from_static(b"y")).await.is_err());
        let mut sub = b.subscribe(Shard(0), Position(0)).await.unwrap();
        assert!(sub.next_entries(10, Duration::ZERO).await.unwrap().is_empty());
        log.set_partitioned(b.node_index(), false);
        assert_eq!(sub.next_entries(10, Duration::ZERO).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn delayed_entries_keep_their_order() {
        let log = MemoryLog::new(1, 100, 7);
        let a = log.connect(FaultConfig::default());
        let b = log.connect(FaultConfig { delay_ticks_max: 5, ..FaultConfig::default() });
        for i in 0..20 {
            a.publish(Shard(0), &format!("{i}"), Bytes::from(vec![i as u8])).await.unwrap();
        }
        let mut sub = b.subscribe(Shard(0), Position(0)).await.unwrap();
        let mut seen = Vec::new();
        for _ in 0..10 {
            seen.extend(sub.next_entries(100, Duration::ZERO).await.unwrap());
            log.tick();
        }
        let positions: Vec<u64> = seen.iter().map(|e| e.position.0).collect();
        assert_eq!(positions, (1..=20).collect::<Vec<_>>(), "all delivered, in order");
    }

    #[tokio::test]
    async fn truncation_behind_a_live_reader_is_reported_not_skipped() {
        let log = MemoryLog::new(1, 100, 3);
        let t = log.connect(FaultConfig::default());
        for i in 0..6 {
            t.publish(Shard(0), &format!("{i}"), Bytes::from(vec![i as u8])).await.unwrap();
        }
        let mut sub = t.subscribe(Shard(0), Position(0)).await.unwrap();
        assert_eq!(sub.next_entries(2, Duration::ZERO).await.unwrap().len(), 2);
        assert_eq!(log.truncate(Shard(0), Position(3)), 2, "entries 1 and 2 dropped");
        assert_eq!(sub.next_entries(1, Duration::ZERO).await.unwrap()[0].position, Position(3), "nothing unread lost");
        assert_eq!(log.truncate(Shard(0), Position(6)), 3, "entries 3 to 5 dropped");
        for _ in 0..2 {
            match sub.next_entries(10, Duration::ZERO).await {
                Err(Error::Truncated { shard, position, first }) => {
                    assert_eq!((shard, position, first), (Shard(0), Position(3), Position(6)));
                }
                other => panic!("a reader whose next entry was dropped gets Truncated, got {other:?}"),
            }
        }
        assert_eq!(log.fired().live_truncations, 2, "each report is counted");
    }

    #[tokio::test]
    async fn redelivery_into_truncated_entries_resumes_at_the_first_held() {
        let log = MemoryLog::new(1, 100, 5);
        let t =
            log.connect(FaultConfig { redeliver_probability: 1.0, redeliver_entries_max: 4, ..FaultConfig::default() });
        for i in 0..8 {
            t.publish(Shard(0), &format!("{i}"), Bytes::from(vec![i as u8])).await.unwrap();
        }
        let mut sub = t.subscribe(Shard(0), Position(0)).await.unwrap();
        let mut seen = 0;
        while seen < 8 {
            let got = sub.next_entries(1, Duration::ZERO).await.unwrap();
            seen = seen.max(got[0].position.0);
        }
        log.truncate(Shard(0), Position(8));
        for _ in 0..10 {
            let got = sub.next_entries(10, Duration::ZERO).await.expect("rewinds are not truncation");
            assert!(got.iter().all(|e| e.position == Position(8)), "only entry 8 is held: {got:?}");
        }
        let fired = log.fired();
        assert!(fired.redeliveries > 0, "rewinds are counted");
        assert_eq!(fired.live_truncations, 0);
    }

    #[tokio::test]
    async fn fired_faults_are_counted() {
        let log = MemoryLog::new(1, 100, 11);
        let faults = FaultConfig { publish_fail_probability: 0.3, delay_ticks_max: 3, ..FaultConfig::default() };
        let a = log.connect(faults);
        let mut failed = 0;
        for i in 0..50 {
            failed += u64::from(a.publish(Shard(0), &format!("{i}"), Bytes::new()).await.is_err());
        }
        let mut sub = a.subscribe(Shard(0), Position(0)).await.unwrap();
        sub.next_entries(100, Duration::ZERO).await.unwrap();
        let lossy = log.connect(FaultConfig { publish_lost_ack_probability: 1.0, ..FaultConfig::default() });
        assert!(lossy.publish(Shard(0), "lost", Bytes::new()).await.is_err());
        let fired = log.fired();
        assert_eq!(fired.publish_failures, failed, "every injected failure is counted");
        assert!(failed > 0 && fired.delayed_entries > 0, "{fired:?}");
        assert_eq!(fired.lost_acks, 1, "the stored-but-failed publish is counted");
    }
}
