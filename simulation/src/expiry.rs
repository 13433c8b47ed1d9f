//! Local changes that outlive the tombstone retention: their origin never publishes them
//! and restores a snapshot instead. The model keeps such a write only if it reached the
//! log anyway (published, but not acknowledged: a lost ack, a crash before the ack), since
//! every node then reads it from there.

use std::collections::{BTreeMap, BTreeSet};

use futures::executor::block_on;
use marmot_core::wire::{Assembled, Reassembler};
use marmot_core::{Hlc, NodeId, Position, Shard};

use crate::world::{Failure, World};

/// The versions of every row change stored in the logs in a complete batch.
#[derive(Default)]
pub struct StoredWrites {
    /// Per shard: the log's epoch, the last position looked at, and the reassembler of
    /// multi-part batches.
    scanned: BTreeMap<u32, (u64, Position, Reassembler)>,
    versions: BTreeSet<(NodeId, Hlc)>,
    /// Every row change published, for the conflict journal's oracle.
    pub(crate) published: crate::journal::Published,
}

impl World {
    /// Notes the row changes of complete batches stored since the last look.
    pub(crate) fn scan_log(&mut self) {
        for s in 0..self.scenario.shards {
            let shard = Shard(s);
            let epoch = self.log.epoch(shard);
            let (seen_epoch, at, reassembler) =
                self.stored.scanned.entry(s).or_insert_with(|| (epoch, Position(0), Reassembler::new(u64::MAX)));
            if *seen_epoch != epoch {
                // The logs were recreated: positions start again.
                (*seen_epoch, *at, *reassembler) = (epoch, Position(0), Reassembler::new(u64::MAX));
            }
            for (position, payload) in self.log.stored_after(shard, *at) {
                *at = position;
                if let Assembled::Batch(batch) = reassembler.feed(position, &payload) {
                    for t in &batch.tables {
                        self.stored.versions.extend(t.rows.iter().map(|r| (batch.origin, r.hlc)));
                    }
                    self.stored.published.add(&batch);
                }
            }
        }
    }

    /// Node `i` refused to publish changes older than the retention: it sets them aside
    /// (as `marmot` does before restoring) and restores a snapshot. The model drops the
    /// writes that never reached the log.
    pub(crate) fn expire(&mut self, i: usize) -> Result<(), Failure> {
        self.set_aside_expired(i)?;
        self.restore(i).map(|_| ())
    }

    /// Marks node `i`'s pending changes as never to be published; the model drops those
    /// that did not reach the log.
    pub(crate) fn set_aside_expired(&mut self, i: usize) -> Result<(), Failure> {
        self.scan_log();
        // Every write captured so far is in the model before it decides which to drop.
        self.record_writes(i)?;
        let node = NodeId(i as u64 + 1);
        let engine = self.nodes[i].engine.as_mut().expect("engine running");
        let fail = |e: marmot_core::Error| Failure(format!("node {i}: expire: {e}"));
        block_on(engine.flush()).map_err(fail)?;
        let published = engine.db().published_hlc().map_err(fail)?;
        engine.set_aside_pending().map_err(fail)?;
        self.stored.published.note_set_aside(node, published, &self.stored.versions);
        let before = self.writes.len();
        let stored = &self.stored.versions;
        self.writes.retain(|w| {
            w.version.node != node || w.version.hlc <= published || stored.contains(&(node, w.version.hlc))
        });
        self.counters.writes_expired += (before - self.writes.len()) as u64;
        self.counters.expired_restores += 1;
        self.trace.push(format!("node {i}: expired changes after {published} set aside"));
        Ok(())
    }
}

impl World {
    /// The node that gives the snapshot a restoring node asked for: the most caught-up
    /// node that has not set changes aside; when every node that could has (the whole
    /// cluster was cut off longer than the retention), the operator runs
    /// `marmot -keep-set-aside` on one of them, here the lowest: its data, changes set
    /// aside included, become the cluster's.
    pub(crate) fn snapshot_source(&mut self) -> Result<usize, Failure> {
        if let Ok(i) = self.most_caught_up(true) {
            return Ok(i);
        }
        let candidates = self.holders_of_dropped()?;
        let j = *candidates.first().ok_or_else(|| Failure("no node holds what the streams dropped".into()))?;
        let engine = self.nodes[j].engine.take().expect("engine running");
        self.retired.push(engine.stats().clone());
        drop(engine);
        let opts = crate::world::capture_options(&self.scenario, j);
        let fail = |e: marmot_core::Error| Failure(format!("node {j}: -keep-set-aside: {e}"));
        let mut db = marmot_core::sqlite::Db::open(&self.nodes[j].path, NodeId(j as u64 + 1), opts).map_err(fail)?;
        let logged = db
            .keep_set_aside()
            .map_err(fail)?
            .ok_or_else(|| Failure(format!("node {j} was not caught up, yet had set nothing aside")))?;
        drop(db);
        self.start(j)?;
        // The rows logged again are new writes of node `j`, read like any other.
        self.record_writes(j)?;
        self.trace.push(format!("node {j}: -keep-set-aside ({logged} rows logged again)"));
        self.counters.set_asides_kept += 1;
        Ok(j)
    }
}
