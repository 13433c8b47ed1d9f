//! Commit points: log positions known to fall between two local transactions, where a
//! batch of local changes may end without splitting a transaction.
//!
//! The capture log carries no transaction ids (one more column would cost every write of
//! the application). But transactions are serialized by SQLite's write lock and the log's
//! versions only grow, so the log's highest version in any committed state is the last
//! change of a whole transaction. A sampler that reads it now and then (on each file
//! notification, at most once per millisecond) collects such points; the reader cuts an
//! over-large backlog at one of them, so a node that falls behind publishes bounded
//! batches instead of one batch as large as its backlog. Missing points cost only
//! granularity: without any, a backlog is read whole, as before.

use std::collections::VecDeque;
use std::sync::Mutex;

use rusqlite::Connection;

use crate::error::{Result, SqlContext};
use crate::model::Hlc;

/// Points kept at most: when full, newer points are dropped until the reader consumes
/// older ones (the oldest are the ones the next cut needs).
pub const COMMIT_POINTS_MAX: usize = 4096;

/// Rows a batch of local changes holds before it is cut at a commit point (when one is
/// known and no row of the batch is written again after it).
pub const BATCH_ROWS_MAX: usize = 5_000;

/// Commit points in increasing order, shared by a sampler and the reader.
#[derive(Debug, Default)]
pub struct CommitPoints {
    points: Mutex<VecDeque<Hlc>>,
}

impl CommitPoints {
    /// Records `point`, the log's highest version in a committed state.
    pub fn record(&self, point: Hlc) {
        let mut points = self.points.lock().unwrap_or_else(|e| e.into_inner());
        if points.back().is_some_and(|&last| last >= point) || points.len() >= COMMIT_POINTS_MAX {
            return;
        }
        points.push_back(point);
    }

    /// Forgets the points at or below `published` and returns the others, ascending.
    pub fn after(&self, published: Hlc) -> Vec<Hlc> {
        let mut points = self.points.lock().unwrap_or_else(|e| e.into_inner());
        while points.front().is_some_and(|&p| p <= published) {
            points.pop_front();
        }
        points.iter().copied().collect()
    }

    /// Reads the log's highest version through `conn` (outside any transaction, so in a
    /// committed state) and records it.
    pub fn sample(&self, conn: &Connection) -> Result<()> {
        let hlc: i64 = conn
            .prepare_cached("SELECT coalesce(max(hlc), 0) FROM __marmot__log")
            .and_then(|mut s| s.query_row([], |r| r.get(0)))
            .ctx(|| "reading the log's last version".into())?;
        if hlc > 0 {
            self.record(Hlc(hlc as u64));
        }
        Ok(())
    }
}

/// Where to end a batch of the pending changes: the last commit point in `points` (all
/// above the published point, ascending) with at most `rows_max` log entries at or below
/// it (or, when even the first has more, that first one), among the points no row is
/// written on both sides of; `None` when the backlog is small or no point qualifies (read
/// all).
///
/// `below[i]` is the number of pending log entries at or below `points[i]`, `total` the
/// number of all of them and `last` the greatest; `spans` holds, per row written more than
/// once, its first and last pending version.
pub(crate) fn cut_point(
    total: usize,
    last: Hlc,
    below: &[usize],
    spans: &mut [(Hlc, Hlc)],
    points: &[Hlc],
    rows_max: usize,
) -> Option<Hlc> {
    if total <= rows_max {
        return None;
    }
    // A point inside some row's span would send that row's newest image with the version
    // of an older write: merge the spans and refuse points inside them.
    spans.sort();
    let mut merged: Vec<(Hlc, Hlc)> = Vec::new();
    for &(first, end) in spans.iter() {
        match merged.last_mut() {
            Some(m) if first <= m.1 => m.1 = m.1.max(end),
            _ => merged.push((first, end)),
        }
    }
    let outside = |p: Hlc| {
        let i = merged.partition_point(|&(first, _)| first <= p);
        i == 0 || merged[i - 1].1 <= p
    };
    let mut best = None;
    // A point below every pending entry (its entries were set aside or discarded) cuts
    // nothing: skipped, or the batch would be empty and look like nothing pending.
    for (&p, &n) in points.iter().zip(below).filter(|(&p, &n)| n > 0 && p < last && outside(p)) {
        if n > rows_max {
            return best.or(Some(p));
        }
        best = Some(p);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hlcs(v: &[u64]) -> Vec<Hlc> {
        v.iter().map(|&h| Hlc(h)).collect()
    }

    /// [`cut_point`] over the pending versions `entries`.
    fn cut(entries: &[Hlc], spans: &mut [(Hlc, Hlc)], points: &[Hlc], rows_max: usize) -> Option<Hlc> {
        let below: Vec<usize> = points.iter().map(|&p| entries.partition_point(|&h| h <= p)).collect();
        cut_point(entries.len(), *entries.last()?, &below, spans, points, rows_max)
    }

    #[test]
    fn a_small_backlog_is_never_cut() {
        assert_eq!(cut(&hlcs(&[1, 2, 3]), &mut [], &hlcs(&[1, 2]), 3), None);
    }

    #[test]
    fn the_cut_is_the_last_point_with_at_most_the_rows_asked_below() {
        let entries = hlcs(&[1, 2, 3, 4, 5, 6]);
        assert_eq!(cut(&entries, &mut [], &hlcs(&[1, 3, 5]), 2), Some(Hlc(1)));
        assert_eq!(cut(&entries, &mut [], &hlcs(&[1, 3, 5]), 3), Some(Hlc(3)));
        assert_eq!(cut(&entries, &mut [], &hlcs(&[4, 5]), 2), Some(Hlc(4)), "more than asked when no point is lower");
        assert_eq!(cut(&entries, &mut [], &hlcs(&[6]), 2), None, "the last point is no cut");
        assert_eq!(cut(&entries, &mut [], &[], 2), None, "no point known: read all");
        assert_eq!(
            cut(&entries[2..], &mut [], &hlcs(&[1, 4]), 2),
            Some(Hlc(4)),
            "a point below every entry cuts nothing"
        );
    }

    #[test]
    fn a_row_written_on_both_sides_moves_the_cut_past_its_last_write() {
        let entries = hlcs(&[1, 2, 3, 4, 5, 6, 7]);
        // A row written at 2 and again at 5: points 3 and 4 would split it.
        let mut spans = vec![(Hlc(2), Hlc(5))];
        assert_eq!(cut(&entries, &mut spans, &hlcs(&[3, 4, 5, 6]), 2), Some(Hlc(5)));
        let mut spans = vec![(Hlc(2), Hlc(5)), (Hlc(4), Hlc(7))];
        assert_eq!(cut(&entries, &mut spans, &hlcs(&[3, 5, 6]), 2), None);
    }

    #[test]
    fn points_are_kept_ascending_and_bounded() {
        let p = CommitPoints::default();
        p.record(Hlc(5));
        p.record(Hlc(3));
        p.record(Hlc(9));
        assert_eq!(p.after(Hlc(0)), hlcs(&[5, 9]));
        assert_eq!(p.after(Hlc(5)), hlcs(&[9]));
        for h in 10..10 + COMMIT_POINTS_MAX as u64 {
            p.record(Hlc(h));
        }
        assert_eq!(p.after(Hlc(0)).len(), COMMIT_POINTS_MAX);
    }
}
