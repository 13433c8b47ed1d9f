//! Snapshots in the simulation: an in-memory [`SnapshotStore`], saves by any node, and the
//! restore a node runs when a stream dropped entries it had not read, as `marmot` does it
//! (`cli/src/run.rs`, `restore_if_behind`): publish what is pending, pick the newest
//! snapshot that covers what the streams no longer hold (or have a caught-up node save one:
//! "ask the cluster"), restore it under the write lock, replay the streams, own batches
//! included, from the snapshot's positions.

use std::sync::Arc;

use futures::executor::block_on;
use marmot_core::snapshots::{Manifest, Snapshots};
use marmot_core::sqlite::Db;
use marmot_core::testing::MemoryStore;
use marmot_core::{Bounds, Error, NodeId, Shard};

use crate::world::{Failure, World};

/// Snapshots kept in the store. Small, so that retention runs all the time: it must keep
/// the snapshots that cover the most, never the most recently named.
pub const SNAPSHOTS_KEPT: usize = 2;

/// How many entries behind a stream's last one a node may be and still save a snapshot
/// (`marmot` allows a quarter of a shard's `max_entries`).
const SAVE_SLACK: u64 = 2;

/// A new store with its [`Snapshots`].
pub fn snapshots() -> Snapshots {
    Snapshots::new(Arc::new(MemoryStore::default()), SNAPSHOTS_KEPT)
}

impl World {
    /// Node `i` saves a snapshot into the store if it is caught up with every stream, as
    /// `marmot` does (`cli/src/snapshot.rs`, `save`): a stale snapshot helps nobody.
    pub(crate) fn save_snapshot_if_caught_up(&mut self, i: usize) -> Result<(), Failure> {
        let db = self.nodes[i].engine.as_ref().expect("engine running").db();
        for s in 0..self.scenario.shards {
            let p = db.position(Shard(s)).map_err(|e| Failure(e.to_string()))?;
            if p.0 + SAVE_SLACK < self.log.last(Shard(s)).0 {
                self.counters.snapshot_saves_refused_behind += 1;
                self.trace.push(format!("node {i}: not saving a snapshot: behind on shard {s}"));
                return Ok(());
            }
        }
        self.save_snapshot(i).map(|_| ())
    }

    /// Node `i` saves a snapshot into the store; `None` when it refused because it leaves
    /// tables out (`marmot` refuses: its copies of them are not the cluster's). A node
    /// whose patterns match no table yet (`late*` before the migration) saves like any
    /// other.
    pub(crate) fn save_snapshot(&mut self, i: usize) -> Result<Option<Manifest>, Failure> {
        // A running marmot has subscribed (and so recorded its logs' epochs) before it
        // saves anything; a fresh engine here may not have yet.
        let engine = self.nodes[i].engine.as_mut().expect("engine running");
        if let Err(e) = block_on(engine.check_epochs()) {
            self.trace.push(format!("node {i}: not saving a snapshot: {e}"));
            // Cut off from the servers, a node saves nothing (`marmot` needs them for the
            // save's lease too).
            if e.is_retryable() {
                return Ok(None);
            }
            return Err(Failure(format!("node {i}: checking stream epochs: {e}")));
        }
        let db = self.nodes[i].engine.as_ref().expect("engine running").db();
        let mut saved = block_on(self.snapshots.save(db, self.work_dir(), self.now_ms(i)));
        if let Err(Error::SchemaChanged) = saved {
            // The application changed the schema since this node last looked: the save
            // waits until it noticed (its next maintenance, done here).
            self.trace.push(format!("node {i}: snapshot waits for a schema change to be noticed"));
            self.counters.snapshot_saves_after_schema_change += 1;
            let engine = self.nodes[i].engine.as_mut().expect("engine running");
            block_on(engine.maintain()).map_err(|e| Failure(format!("node {i}: maintain: {e}")))?;
            let db = self.nodes[i].engine.as_ref().expect("engine running").db();
            saved = block_on(self.snapshots.save(db, self.work_dir(), self.now_ms(i)));
        }
        if let Err(Error::SnapshotUnpublished(through)) = saved {
            // The copy holds local changes not published yet: `marmot` uploads it once its
            // node loop has published them, here the saver publishes and saves again.
            self.trace.push(format!("node {i}: snapshot waits for changes through {through} to be published"));
            if !self.publish_all(i)? {
                self.counters.snapshot_saves_refused_unpublished += 1;
                self.trace.push(format!("node {i}: not saving a snapshot: its changes could not be published"));
                return Ok(None);
            }
            let db = self.nodes[i].engine.as_ref().expect("engine running").db();
            saved = block_on(self.snapshots.save(db, self.work_dir(), self.now_ms(i)));
            if let Err(Error::SnapshotUnpublished(_)) = saved {
                return Err(Failure(format!(
                    "node {i}: published everything, yet its snapshot holds unpublished changes"
                )));
            }
        }
        if let Err(Error::RestoreRequired) = saved {
            // Its changes outlived the retention while it published them: it restores
            // (at its next publish) instead of saving.
            self.counters.snapshot_saves_refused_unpublished += 1;
            self.trace.push(format!("node {i}: not saving a snapshot: it set changes aside and must restore"));
            return Ok(None);
        }
        let excludes = !self.nodes[i].engine.as_ref().expect("engine running").db().excluded_tables().is_empty();
        match saved {
            Err(Error::PartialSelection(_)) if excludes && !self.replicates_all(i) => {
                self.counters.snapshot_saves_refused_partial += 1;
                self.trace.push(format!("node {i}: not saving a snapshot: it leaves tables out"));
                return Ok(None);
            }
            Ok(m) if excludes => return Err(Failure(format!("node {i} leaves tables out, yet saved {m:?}"))),
            _ => {}
        }
        let manifest = saved.map_err(|e| Failure(format!("node {i}: saving a snapshot: {e}")))?;
        self.counters.snapshots_saved += 1;
        self.trace.push(format!("node {i}: saved snapshot {:?} epochs {:?}", manifest.positions, manifest.epochs));
        Ok(Some(manifest))
    }

    /// Node `i` restores the newest snapshot that covers what the streams no longer hold,
    /// after publishing its pending changes; when publishing fails (a fault, a partition)
    /// the restore waits for a later try, as `marmot` does. Returns whether it restored.
    pub(crate) fn restore(&mut self, i: usize) -> Result<bool, Failure> {
        if !self.publish_all(i)? {
            self.trace.push(format!("node {i}: restore postponed: pending changes not published"));
            return Ok(false);
        }
        let manifest = match self.usable_snapshot()? {
            Some(m) => m,
            None => {
                let saver = self.snapshot_source()?;
                self.trace.push(format!("node {i}: asks node {saver} for a snapshot"));
                if self.save_snapshot(saver)?.is_none() && self.usable_snapshot()?.is_none() {
                    self.trace.push(format!("node {i}: restore postponed: node {saver} saved no snapshot"));
                    return Ok(false);
                }
                self.usable_snapshot()?.ok_or_else(|| {
                    let b: Vec<_> = (0..self.scenario.shards)
                        .map(|s| (self.log.first(Shard(s)).0, self.log.last(Shard(s)).0, self.log.epoch(Shard(s))))
                        .collect();
                    Failure(format!("a caught-up node's snapshot is not usable (streams {b:?})"))
                })?
            }
        };
        if let Some(engine) = self.nodes[i].engine.take() {
            self.retired.push(engine.stats().clone());
        }
        let node = &self.nodes[i];
        let opts = crate::world::capture_options(&self.scenario, i);
        let fail = |e: Error| Failure(format!("node {i}: restore: {e}"));
        let mut db = Db::open(&node.path, NodeId(i as u64 + 1), opts).map_err(fail)?;
        // Every other restore, the application commits a group of rows right after the copy,
        // before capture is re-installed: it must be captured and replicated like any other.
        let during = std::sync::Arc::new(std::sync::Mutex::new(None::<Result<(), String>>));
        if self.counters.restores.is_multiple_of(2) {
            let (path, grp, done, now_ms) = (node.path.clone(), node.next_gid, during.clone(), self.now_ms(i));
            self.nodes[i].next_gid += 16;
            db.after_restore_copy(Box::new(move || {
                // The copy holds its saver's simulated clock: the application's is this node's.
                let result = rusqlite::Connection::open(&path)
                    .and_then(|app| app.execute("UPDATE __marmot__simtime SET ms = ?1", [now_ms as i64]).map(|_| app))
                    .map_err(|e| e.to_string())
                    .and_then(|app| crate::workload::group(&app, grp, 2).map_err(|Failure(m)| m));
                *done.lock().unwrap() = Some(result);
            }));
        }
        block_on(self.snapshots.restore(&mut db, self.work_dir(), &manifest, &mut |_, _| {})).map_err(fail)?;
        match during.lock().unwrap().take() {
            Some(Ok(())) => {
                self.counters.writes_during_restore += 1;
                self.trace.push(format!("node {i}: the application wrote a group during the restore"));
            }
            Some(Err(e)) => return Err(Failure(format!("node {i}: writing during the restore: {e}"))),
            None => {}
        }
        for s in 0..self.scenario.shards {
            db.set_own_replay_through(Shard(s), self.log.last(Shard(s))).map_err(fail)?;
        }
        db.finish_checkpoint().map_err(fail)?;
        drop(db);
        self.counters.restores += 1;
        // The restored file has the snapshot's schema; the schema log brings it up to date.
        self.trace.push(format!("node {i}: restored {:?}", manifest.positions));
        // The copy brought its saver's simulated wall clock: this node's is its own.
        self.set_time()?;
        self.start(i)?;
        self.record_writes(i).and_then(|()| crate::oracle::check_atomicity(&self.nodes[i].app, i)).map(|()| true)
    }

    /// Publishes everything node `i` has pending; false when a publish failed.
    pub(crate) fn publish_all(&mut self, i: usize) -> Result<bool, Failure> {
        loop {
            let engine = self.nodes[i].engine.as_mut().expect("engine running");
            match block_on(engine.publish_once()) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.is_retryable() || matches!(e, Error::InjectedCrash(_)) => return Ok(false),
                // Changes older than the retention are set aside instead (the restore that
                // follows replaces them).
                Err(Error::ChangesExpired { .. }) => self.set_aside_expired(i)?,
                // Everything committed since the set-aside is published.
                Err(Error::RestoreRequired) => break,
                Err(e) => return Err(Failure(format!("node {i}: publishing before a restore: {e}"))),
            }
        }
        let engine = self.nodes[i].engine.as_mut().expect("engine running");
        block_on(engine.flush()).map_err(|e| Failure(format!("node {i}: flush: {e}")))?;
        self.record_writes(i)?;
        Ok(true)
    }

    /// The stored snapshot that covers the most among those whose positions reach every
    /// shard's first held entry.
    pub(crate) fn usable_snapshot(&self) -> Result<Option<Manifest>, Failure> {
        let manifests = block_on(self.snapshots.list(self.work_dir())).map_err(|e| Failure(e.to_string()))?;
        let bounds = |s: Shard| Bounds { first: self.log.first(s), last: self.log.last(s), epoch: self.log.epoch(s) };
        let usable = |m: &Manifest| m.usable_with(self.scenario.shards, bounds);
        Ok(manifests.into_iter().filter(usable).max_by_key(Manifest::coverage))
    }

    /// Among the nodes that replicate every table (the ones that save snapshots) and hold
    /// everything the streams dropped, the one whose stored positions are highest (summed
    /// over shards).
    /// With `can_save`, only among nodes that have not set changes aside (they cannot save
    /// a snapshot until they restored one).
    pub(crate) fn most_caught_up(&self, can_save: bool) -> Result<usize, Failure> {
        let mut best: Option<(usize, u64)> = None;
        for i in self.holders_of_dropped()? {
            let db = self.nodes[i].engine.as_ref().expect("engine").db();
            if can_save && db.restore_required().map_err(|e| Failure(e.to_string()))? {
                continue;
            }
            let sum = (0..self.scenario.shards).map(|s| self.stored_position(i, Shard(s))).sum::<Result<u64, _>>()?;
            if best.is_none_or(|(_, b)| sum > b) {
                best = Some((i, sum));
            }
        }
        best.map(|(i, _)| i).ok_or_else(|| Failure("no node holds what the streams dropped".into()))
    }

    /// The nodes that replicate every table and hold everything the streams dropped.
    pub(crate) fn holders_of_dropped(&self) -> Result<Vec<usize>, Failure> {
        let mut out = Vec::new();
        for i in (0..self.nodes.len()).filter(|&i| self.replicates_all(i)) {
            let mut covers = true;
            for s in 0..self.scenario.shards {
                covers &= self.stored_position(i, Shard(s))? + 1 >= self.log.first(Shard(s)).0;
            }
            if covers {
                out.push(i);
            }
        }
        Ok(out)
    }

    /// Node `i`'s stored position in `shard`'s current log: 0 while it is stored against
    /// a log since recreated (the node reads the new one from its start).
    pub(crate) fn stored_position(&self, i: usize, shard: Shard) -> Result<u64, Failure> {
        let db = self.nodes[i].engine.as_ref().expect("engine").db();
        let fail = |e: Error| Failure(e.to_string());
        let epoch = db.stream_epoch(shard).map_err(fail)?;
        if epoch != 0 && epoch != self.log.epoch(shard) {
            return Ok(0);
        }
        Ok(db.position(shard).map_err(fail)?.0)
    }
}
