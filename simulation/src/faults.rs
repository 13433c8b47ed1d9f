//! Faults: the transport's fault mix, the engine's crash points, partitions, truncation,
//! and healing all of them at the end of the chaos phase.

use futures::executor::block_on;
use marmot_core::engine::Faults;
use marmot_core::{Position, Shard};
use marmot_transports::FaultConfig;

use crate::scenario::FaultMix;
use crate::world::{Failure, World};

/// How far a redelivery rewinds a subscription, in entries.
const REDELIVER_ENTRIES_MAX: u64 = 4;

/// The memory transport's faults for one node during the chaos phase.
pub fn fault_config(mix: &FaultMix) -> FaultConfig {
    FaultConfig {
        delay_ticks_max: mix.delay_ticks_max,
        redeliver_probability: mix.redeliver_probability,
        redeliver_entries_max: REDELIVER_ENTRIES_MAX,
        publish_fail_probability: mix.publish_fail_probability,
        publish_lost_ack_probability: mix.publish_lost_ack_probability,
    }
}

impl World {
    /// Arms crash points in node `i`'s engine; they are counted when they fire
    /// ([`World::engine_op`]), not here.
    pub(crate) fn arm(&mut self, i: usize, faults: Faults) -> Result<(), Failure> {
        self.trace.push(format!("arm {i} {faults:?}"));
        self.nodes[i].engine.as_mut().expect("engine running").set_faults(faults);
        Ok(())
    }

    /// Cuts node `i` off the transport, or heals it.
    pub(crate) fn partition(&mut self, i: usize, on: bool) -> Result<(), Failure> {
        self.log.set_partitioned(i, on);
        self.counters.partitions += u64::from(on);
        self.trace.push(format!("partition {i} {on}"));
        Ok(())
    }

    /// `marmot -cleanup` on node `i` after a clean stop (which publishes what is pending;
    /// when that fails the operator waits), then a start: the node has rows but no
    /// versions, positions or clock, and reads the logs from the start (or restores a
    /// snapshot when they no longer start at 1). Its own changes in the logs are applied
    /// like remote ones, or an older remote write would win over them on this node only.
    pub(crate) fn cleanup(&mut self, i: usize) -> Result<(), Failure> {
        // After the logs were recreated, their history since the cluster began is gone but
        // they start at 1 again, so a cleaned-up node cannot tell it must take the
        // cluster's state by snapshot: a documented limitation (docs/operations.md), not
        // drawn here.
        if self.counters.streams_recreated > 0 {
            self.trace.push(format!("node {i}: no cleanup after the logs were recreated"));
            return Ok(());
        }
        // Like truncation, never leave the cluster without a node that holds what the logs
        // dropped: cleaning up the only one loses that for good (a snapshot may cover it,
        // but the simulation's deep truncation follows a node that does).
        let mut savers = (0..self.nodes.len()).filter(|&j| j != i && self.replicates_all(j));
        let others_cover = savers.try_fold(false, |any, j| {
            let covers = (0..self.scenario.shards)
                .map(|s| self.stored_position(j, Shard(s)).map(|p| p + 1 >= self.log.first(Shard(s)).0))
                .collect::<Result<Vec<_>, _>>()?;
            Ok::<_, Failure>(any || covers.into_iter().all(|c| c))
        })?;
        if !others_cover {
            self.trace
                .push(format!("node {i}: no cleanup: no other node that saves snapshots holds what the logs dropped"));
            return Ok(());
        }
        if !self.publish_all(i)? {
            self.trace.push(format!("node {i}: cleanup postponed: pending changes not published"));
            return Ok(());
        }
        // Changes set aside are unpublished changes too (`marmot -cleanup` warns).
        let db = self.nodes[i].engine.as_ref().expect("engine").db();
        if db.restore_required().map_err(|e| Failure(e.to_string()))? {
            self.trace.push(format!("node {i}: cleanup postponed: it set changes aside and restores first"));
            return Ok(());
        }
        // Cleanup removes the clock with the rest. Stopping, cleaning up and starting again
        // takes longer than the cluster's clock skew, so the node's wall clock is past every
        // version it produced before (otherwise a new write could reuse one of them, and
        // two different writes with one version never converge).
        let clock = self.nodes[i].engine.as_ref().expect("engine").db().clock().map_err(|e| Failure(e.to_string()))?;
        while self.now_ms(i) <= clock.millis() {
            self.advance_tick();
        }
        self.set_time()?;
        if let Some(engine) = self.nodes[i].engine.take() {
            // The node's next write to a row it held names no base (its versions are gone).
            self.stored.published.note_cleanup(engine.db().node(), clock);
            self.retired.push(engine.stats().clone());
        }
        marmot_core::sqlite::cleanup(&self.nodes[i].app).map_err(|e| Failure(format!("node {i}: cleanup: {e}")))?;
        // The simulated wall clock is a table with Marmot's prefix: cleanup dropped it too.
        let now = self.now_ms(i) as i64;
        self.nodes[i]
            .app
            .execute_batch(&format!(
                "CREATE TABLE __marmot__simtime (ms INTEGER NOT NULL); INSERT INTO __marmot__simtime VALUES ({now});"
            ))
            .map_err(|e| Failure(format!("node {i}: recreating the simulated clock: {e}")))?;
        // The new log starts from the wall clock again.
        self.nodes[i].log_seen = 0;
        self.counters.cleanups += 1;
        self.trace.push(format!("node {i}: cleanup; restart"));
        self.start(i)?;
        self.record_writes(i)?;
        crate::oracle::check_atomicity(&self.nodes[i].app, i)
    }

    /// Loses every log's data: the logs are deleted and created again, empty, with a new
    /// epoch. Only when every node has stored everything the logs hold (each first reads
    /// what it can): changes no node has read would be lost for good, which no replicator
    /// repairs. Nodes must then read the new logs from their first entry, not from their
    /// old positions.
    pub(crate) fn recreate_streams(&mut self) -> Result<(), Failure> {
        for i in 0..self.nodes.len() {
            for s in 0..self.scenario.shards {
                self.engine_op(i, |e| {
                    block_on(e.receive_once(Shard(s), std::time::Duration::ZERO))
                        .map(|c| format!("received {c} from {s}"))
                })?;
            }
            let Some(engine) = self.nodes[i].engine.as_mut() else { continue };
            if let Err(e) = block_on(engine.flush()) {
                self.trace.push(format!("node {i}: flush: {e}"));
            }
        }
        for i in 0..self.nodes.len() {
            for s in 0..self.scenario.shards {
                let p = self.stored_position(i, Shard(s))?;
                if p < self.log.last(Shard(s)).0 {
                    self.trace.push(format!("streams not recreated: node {i} is behind on shard {s}"));
                    return Ok(());
                }
            }
        }
        self.log.recreate();
        self.counters.streams_recreated += 1;
        self.trace.push("streams recreated".into());
        Ok(())
    }

    /// Drops, in every shard, the entries every node has stored (applied or passed); a
    /// `deep` truncation drops everything the most caught-up node has stored, so nodes
    /// behind it find their next entries gone (at subscribe time or on a live subscription)
    /// and restore a snapshot. The deep cut follows a node that holds everything the
    /// streams dropped so far (one always exists), so some node can always save a snapshot
    /// that covers it: the cluster is never left without an up-to-date node.
    pub(crate) fn truncate(&mut self, deep: bool) -> Result<(), Failure> {
        let leader = self.most_caught_up(false)?;
        for s in 0..self.scenario.shards {
            let mut cut = if deep { 0 } else { u64::MAX };
            for i in 0..self.nodes.len() {
                if deep && i != leader {
                    continue;
                }
                let p = self.stored_position(i, Shard(s))?;
                cut = if deep { p } else { cut.min(p) };
            }
            let dropped = self.log.truncate(Shard(s), Position(cut + 1));
            self.counters.truncations += u64::from(dropped > 0);
            self.trace.push(format!("truncate {s} before {}{}", cut + 1, if deep { " (deep)" } else { "" }));
        }
        Ok(())
    }

    /// Ends the chaos phase: every node runs the migration it has not run, partitions are
    /// lifted, transport faults and armed crash points cleared, and enough ticks pass for
    /// every delayed entry to become visible.
    pub(crate) fn heal(&mut self) -> Result<(), Failure> {
        // The first migration creates `late`, which the oracle reads on every node.
        if self.migrations_run[0] == 0 {
            self.migrate(0)?;
        }
        for i in 0..self.nodes.len() {
            self.log.set_partitioned(i, false);
            self.log.set_faults(i, FaultConfig::default());
            if let Some(e) = self.nodes[i].engine.as_mut() {
                e.set_faults(Faults::default());
            }
        }
        for _ in 0..self.scenario.faults.delay_ticks_max + 1 {
            self.advance_tick();
        }
        self.set_time()
    }
}
