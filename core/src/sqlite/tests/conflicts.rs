//! The conflict journal: the same lost writes on every node, whatever the arrival order.

use super::*;
use crate::model::Version;
use crate::sqlite::Conflict;
use std::collections::BTreeSet;

fn v(hlc: u64, node: u64) -> Version {
    Version { hlc: Hlc(hlc), node: NodeId(node) }
}

/// A batch of `origin` writing row 1 of `t` at `hlc` with `name`, made on top of `base`.
fn write(origin: u64, hlc: u64, name: &str, base: Option<Version>) -> Batch {
    let mut row = upsert(hlc, vec![int(1), text(name), NULL]);
    row.base = base;
    batch(origin, "t", &T_COLS, &[0], vec![row])
}

fn journal(n: &Node) -> Vec<Conflict> {
    n.db.conflicts(&Default::default()).unwrap()
}

/// Every order of `batches` (indexes), by Heap's algorithm.
fn orders(n: usize) -> Vec<Vec<usize>> {
    fn go(k: usize, a: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
        if k <= 1 {
            out.push(a.clone());
            return;
        }
        for i in 0..k {
            go(k - 1, a, out);
            let j = if k.is_multiple_of(2) { i } else { 0 };
            a.swap(j, k - 1);
        }
    }
    let mut out = Vec::new();
    go(n, &mut (0..n).collect(), &mut out);
    out
}

#[test]
fn a_write_nobody_built_on_is_lost_in_every_arrival_order() {
    // Node 4 creates the row; node 1 and node 2 each update it without seeing the other;
    // node 3 updates it after receiving node 2's. Node 3's wins; node 2's was seen (it is
    // node 3's base); node 1's is lost.
    let writes = [
        write(4, 5, "created", None),
        write(1, 10, "one", Some(v(5, 4))),
        write(2, 12, "two", Some(v(5, 4))),
        write(3, 13, "three", Some(v(12, 2))),
    ];
    let mut first: Option<Vec<Conflict>> = None;
    for order in orders(writes.len()) {
        let mut n = node(9, T);
        for &i in &order {
            n.apply(&writes[i]);
        }
        assert_eq!(n.dump("t"), vec![vec![int(1), text("three"), NULL]], "order {order:?}");
        let got: Vec<(Version, Option<String>)> = journal(&n).into_iter().map(|c| (c.loser, c.loser_image)).collect();
        assert_eq!(got, vec![(v(10, 1), Some(r#"{"id":1,"name":"one","score":null}"#.to_owned()))], "order {order:?}");
        let mut entries = journal(&n);
        // The version that held the row when the loss was recorded depends on the order.
        entries.iter_mut().for_each(|c| c.winner = v(0, 0));
        match &first {
            None => first = Some(entries),
            Some(f) => assert_eq!(&entries, f, "order {order:?}"),
        }
    }
}

#[test]
fn sequential_updates_are_not_conflicts() {
    let mut a = node(1, T);
    let mut b = node(2, T);
    a.exec("INSERT INTO t VALUES (1, 'a', 1.0)");
    b.apply(&a.acknowledge_all().batch);
    b.exec("UPDATE t SET name = 'b' WHERE id = 1");
    a.apply(&b.acknowledge_all().batch);
    a.exec("UPDATE t SET name = 'c' WHERE id = 1; UPDATE t SET name = 'd' WHERE id = 1");
    b.apply(&a.acknowledge_all().batch);
    assert_eq!(a.dump("t"), b.dump("t"));
    assert!(journal(&a).is_empty() && journal(&b).is_empty(), "{:?} {:?}", journal(&a), journal(&b));
}

#[test]
fn concurrent_updates_journal_the_older_on_both_nodes_and_a_delete_has_no_image() {
    let mut a = node(1, T);
    let mut b = node(2, T);
    a.exec("INSERT INTO t VALUES (1, 'a', 1.0), (2, 'x', 2.0)");
    b.apply(&a.acknowledge_all().batch);
    a.exec("UPDATE t SET name = 'mine' WHERE id = 1; DELETE FROM t WHERE id = 2");
    b.exec("UPDATE t SET name = 'theirs' WHERE id = 1; UPDATE t SET name = 'y' WHERE id = 2");
    let (from_a, from_b) = (a.acknowledge_all(), b.acknowledge_all());
    a.apply(&from_b.batch);
    b.apply(&from_a.batch);
    assert_eq!(a.dump("t"), b.dump("t"));
    let strip = |n: &Node| -> Vec<(String, Version, Option<String>)> {
        journal(n).into_iter().map(|c| (c.key, c.loser, c.loser_image)).collect()
    };
    assert_eq!(strip(&a), strip(&b), "the same losses on both nodes");
    let losses = strip(&a);
    assert_eq!(losses.len(), 2, "{losses:?}");
    let one = losses.iter().find(|(k, _, _)| k == "[1]").expect("row 1");
    assert_eq!(one.2.as_deref(), Some(r#"{"id":1,"name":"mine","score":1.0}"#));
    let two = losses.iter().find(|(k, _, _)| k == "[2]").expect("row 2");
    assert_eq!(two.1.node, NodeId(1), "a's delete came first and lost");
    assert_eq!(two.2, None, "a lost delete has no image");
}

#[test]
fn a_redelivered_write_that_was_seen_is_not_taken_for_lost() {
    // Node 1's write arrives, then node 2's made on top of it; then the stream delivers
    // node 1's entry again (a reconnect re-reads from the stored position).
    let first = write(1, 10, "one", None);
    let second = write(2, 12, "two", Some(v(10, 1)));
    let mut n = node(9, T);
    n.db.apply_entry(Shard(0), Position(1), &first, None).unwrap();
    n.db.apply_entry(Shard(0), Position(2), &second, None).unwrap();
    n.db.apply_entry(Shard(0), Position(1), &first, None).unwrap();
    assert_eq!(journal(&n), vec![]);
    assert_eq!(n.dump("t"), vec![vec![int(1), text("two"), NULL]]);
    // A write that is new to this node is still judged, wherever its entry is.
    n.db.apply_entry(Shard(0), Position(3), &write(3, 11, "three", None), None).unwrap();
    assert_eq!(journal(&n).iter().map(|c| c.loser).collect::<Vec<_>>(), vec![v(11, 3)]);
}

#[test]
fn a_later_write_of_the_same_node_does_not_make_its_earlier_one_lost() {
    // Node 1's second write names no base (it had lost its version of the row, e.g. after
    // `-cleanup`): it was still made on top of its first.
    let mut n = node(9, T);
    n.apply(&write(1, 10, "one", None));
    n.apply(&write(1, 12, "again", None));
    assert_eq!(journal(&n), vec![]);
}

#[test]
fn a_node_replaying_its_own_changes_judges_only_those_from_before_its_database() {
    // Node 1 wrote a row; node 2 overwrote it, having seen it; node 1's change comes back
    // from the stream.
    let mut a = node(1, T);
    a.exec("INSERT INTO t VALUES (1, 'a', 1.0)");
    let first = a.acknowledge_all().batch;
    let mut b = node(2, T);
    b.apply(&first);
    b.exec("UPDATE t SET name = 'b' WHERE id = 1");
    let second = b.acknowledge_all().batch;
    a.apply(&second);
    // Its own change, replayed to itself from the stream (as after a crash before it had
    // stored a position): made on this database, not news.
    a.db.set_own_replay_through(Shard(0), Position(5)).unwrap();
    a.db.apply_entry(Shard(0), Position(1), &first, None).unwrap();
    assert_eq!(journal(&a), vec![]);
    assert_eq!(journal(&b), vec![]);
}

#[test]
fn a_change_published_in_an_earlier_batch_is_the_base_of_the_next_change_to_its_row() {
    // Two updates of a row, neither folded yet, published in two batches (the publisher
    // reads on from where it got to before the first is acknowledged): the second was made
    // on top of the first, which travelled on its own.
    let mut a = node(1, T);
    a.exec("INSERT INTO t VALUES (1, 'a', 1.0)");
    let insert = a.acknowledge_all();
    a.exec("UPDATE t SET name = 'b' WHERE id = 1");
    let first = a.db.read_pending_after(insert.through, &[], usize::MAX).unwrap().expect("first update");
    a.exec("UPDATE t SET name = 'c' WHERE id = 1");
    let second = a.db.read_pending_after(first.through, &[], usize::MAX).unwrap().expect("second update");
    let row = |p: &Pending| p.batch.tables[0].rows[0].clone();
    let (b, c) = (row(&first), row(&second));
    assert_eq!(b.base, Some(v(row(&insert).hlc.0, 1)), "the first update replaced the insert");
    assert_eq!(c.base, Some(v(b.hlc.0, 1)), "the second update replaced the first");
    // Any node that gets all three journals nothing.
    let mut n = node(2, T);
    for p in [&insert, &first, &second] {
        n.apply(&p.batch);
    }
    assert_eq!(journal(&n), vec![]);
}

#[test]
fn a_change_made_in_the_millisecond_of_the_install_is_made_on_this_database() {
    // The clock does not move between the install and the first write (a frozen clock):
    // the write is still versioned after the point where this database's own changes
    // start, so its replay is not judged as a change from before the database.
    let frozen = CaptureOptions { time_ms_sql: "1700000000000".into(), ..CaptureOptions::default() };
    let mut a = node_with(1, T, frozen);
    a.exec("INSERT INTO t VALUES (1, 'a', 1.0)");
    let first = a.acknowledge_all().batch;
    let mut b = node(2, T);
    b.apply(&first);
    b.exec("DELETE FROM t WHERE id = 1");
    a.apply(&b.acknowledge_all().batch);
    a.db.set_own_replay_through(Shard(0), Position(5)).unwrap();
    a.db.apply_entry(Shard(0), Position(1), &first, None).unwrap();
    assert_eq!(journal(&a), vec![]);
}

#[test]
fn a_nodes_earlier_write_overwritten_by_a_concurrent_one_it_then_built_on_is_lost() {
    // Node 1 writes the row; node 2 writes it without seeing that (and wins on version);
    // node 1 receives node 2's and writes again on top of it. Node 1's first write was
    // replaced on node 1 itself by a write that never saw it: lost, in every order.
    let writes = [write(1, 10, "one", None), write(2, 12, "two", None), write(1, 14, "again", Some(v(12, 2)))];
    for order in orders(writes.len()) {
        let mut n = node(9, T);
        for &i in &order {
            n.apply(&writes[i]);
        }
        assert_eq!(n.dump("t"), vec![vec![int(1), text("again"), NULL]], "order {order:?}");
        let lost: Vec<Version> = journal(&n).into_iter().map(|c| c.loser).collect();
        assert_eq!(lost, vec![v(10, 1)], "order {order:?}");
    }
}

#[test]
fn a_node_restored_from_a_copy_does_not_publish_its_old_losses_again() {
    // Node 1's write lost to node 2's on node 3, which journals it; node 1 then restores
    // node 3's copy. The journal entry of its own change is not a change to publish: it
    // was published long ago (with its base, which this database no longer knows).
    let mut a = node(1, T);
    a.exec("INSERT INTO t VALUES (1, 'one', NULL)");
    let one = a.acknowledge_all().batch;
    let mut c = node(3, T);
    c.apply(&one);
    c.apply(&write(2, one.max_hlc().unwrap().0 + 1, "two", None));
    assert_eq!(journal(&c).iter().map(|j| j.loser.node).collect::<Vec<_>>(), vec![NodeId(1)]);
    let dir = tempfile::tempdir().unwrap();
    let file = c.db.save_snapshot(dir.path(), &dir.path().join("snap.zst")).unwrap();
    a.db.restore_snapshot(&file.path, &file.checksum, &mut |_, _| {}).unwrap();
    assert_eq!(journal(&a).len(), 1, "the copy's journal came along");
    a.exec("INSERT INTO t VALUES (2, 'after the restore', NULL)");
    let rows: Vec<Vec<Value>> =
        a.pending().batch.tables.iter().flat_map(|t| t.rows.iter().map(|r| r.values.clone())).collect();
    assert_eq!(rows, vec![vec![int(2), text("after the restore"), NULL]], "only the change made since");
}

#[test]
fn a_copy_of_a_copy_still_knows_the_first_savers_changes() {
    // Node 2 restores node 1's copy, which holds node 1's write; node 2 updates the row on
    // top of it; node 3 restores node 2's copy. Node 1's write then arrives from the stream:
    // node 3's copy held it already (and saw it replaced), so it is nothing new.
    let mut a = node(1, T);
    a.exec("INSERT INTO t VALUES (1, 'one', NULL)");
    let one = a.acknowledge_all().batch;
    let dir = tempfile::tempdir().unwrap();
    let snap = |n: &Node, name: &str| n.db.save_snapshot(dir.path(), &dir.path().join(name)).unwrap();
    let mut b = node(2, T);
    let file = snap(&a, "a.zst");
    b.db.restore_snapshot(&file.path, &file.checksum, &mut |_, _| {}).unwrap();
    b.exec("UPDATE t SET name = 'two' WHERE id = 1");
    let two = b.acknowledge_all().batch;
    assert_eq!(two.tables[0].rows[0].base, Some(v(one.max_hlc().unwrap().0, 1)));
    let mut c = node(3, T);
    let file = snap(&b, "b.zst");
    c.db.restore_snapshot(&file.path, &file.checksum, &mut |_, _| {}).unwrap();
    c.db.apply_entry(Shard(0), Position(1), &one, None).unwrap();
    c.db.apply_entry(Shard(0), Position(2), &two, None).unwrap();
    assert_eq!(journal(&c), vec![]);
    assert_eq!(c.dump("t"), vec![vec![int(1), text("two"), NULL]]);
}

#[test]
fn a_parked_entry_retried_judges_only_the_writes_no_other_entry_carried() {
    let mut n = node(9, T);
    let park = |n: &Node, b: &Batch, position: u64| {
        let error = crate::error::Error::SchemaMismatch { table: "t".into(), detail: "not yet".into() };
        let bytes = &crate::wire::encode_batch(b, Default::default())[0].payload;
        n.db.park(Shard(0), Position(position), &error, bytes).unwrap();
    };
    let retry = |n: &mut Node, b: &Batch| {
        let id = n.db.parked().unwrap()[0].0;
        n.db.apply_parked(id, b).unwrap();
        n.db.unpark(id).unwrap();
    };
    // Node 1's entry is parked here; node 1 publishes the same change again (it crashed
    // before the first was acknowledged) and that entry applies; this node updates the
    // row on top of it. The parked entry, retried, carries nothing new.
    let one = write(1, 10, "one", None);
    park(&n, &one, 1);
    n.db.apply_entry(Shard(0), Position(2), &one, None).unwrap();
    n.exec("UPDATE t SET name = 'nine' WHERE id = 1");
    retry(&mut n, &one);
    assert_eq!(journal(&n), vec![]);
    let nine = n.acknowledge_all().batch;
    assert_eq!(nine.tables[0].rows[0].base, Some(v(10, 1)));
    // Node 2's concurrent write is parked; node 2's next entry (another row) applies.
    // Retried, the parked one is judged: it is new here, and lost.
    let two = write(2, 11, "two", None);
    park(&n, &two, 3);
    let later = batch(2, "t", &T_COLS, &[0], vec![upsert(30, vec![int(2), text("x"), NULL])]);
    n.db.apply_entry(Shard(0), Position(4), &later, None).unwrap();
    retry(&mut n, &two);
    assert_eq!(journal(&n).iter().map(|c| c.loser).collect::<Vec<_>>(), vec![v(11, 2)]);
    assert_eq!(n.db.parked_count().unwrap(), 0);
    let keys: i64 =
        n.app.query_row("SELECT count(*) FROM __marmot__state WHERE key LIKE 'parked%'", [], |r| r.get(0)).unwrap();
    assert_eq!(keys, 0, "nothing kept of batches no longer parked");
}

#[test]
fn a_later_entry_carrying_a_parked_write_judges_it() {
    // Node 2's write holds the row. Node 1's write on top of nothing (concurrent) is parked
    // here; node 1's next entry (another row) applies and moves the origin's mark past it;
    // node 1 publishes both again (it crashed before acknowledging) and that entry applies:
    // it is the first to judge node 1's write, which wins, so node 2's is lost. Node 1 then
    // writes on top of its own; the parked entry, retried, carries nothing new.
    let mut n = node(9, T);
    n.apply(&write(2, 8, "two", None));
    let one = write(1, 10, "one", None);
    let error = crate::error::Error::SchemaMismatch { table: "t".into(), detail: "not yet".into() };
    n.db.park(Shard(0), Position(1), &error, &crate::wire::encode_batch(&one, Default::default())[0].payload).unwrap();
    let other = upsert(15, vec![int(2), text("x"), NULL]);
    n.db.apply_entry(Shard(0), Position(2), &batch(1, "t", &T_COLS, &[0], vec![other.clone()]), None).unwrap();
    let again = batch(1, "t", &T_COLS, &[0], vec![one.tables[0].rows[0].clone(), other]);
    n.db.apply_entry(Shard(0), Position(3), &again, None).unwrap();
    assert_eq!(journal(&n).iter().map(|c| c.loser).collect::<Vec<_>>(), vec![v(8, 2)]);
    n.db.apply_entry(Shard(0), Position(4), &write(1, 20, "later", Some(v(10, 1))), None).unwrap();
    let id = n.db.parked().unwrap()[0].0;
    n.db.apply_parked(id, &one).unwrap();
    n.db.unpark(id).unwrap();
    assert_eq!(journal(&n).iter().map(|c| c.loser).collect::<Vec<_>>(), vec![v(8, 2)]);
    assert_eq!(n.dump("t"), vec![vec![int(1), text("later"), NULL], vec![int(2), text("x"), NULL]]);
}

#[test]
fn a_row_set_aside_and_kept_names_the_base_its_changes_were_made_on() {
    // Node 1's row reaches node 2. Node 1 updates it twice, each time cut off long enough
    // that the change outlives the retention: set aside, then kept (logged again). What
    // node 1 finally publishes carries the changes set aside, so its base is the version
    // node 2 holds: not a loss.
    let mut a = node(1, T);
    let mut b = node(2, T);
    a.exec("INSERT INTO t VALUES (1, 'one', NULL)");
    let one = a.acknowledge_all().batch;
    b.apply(&one);
    a.exec("UPDATE t SET name = 'two' WHERE id = 1");
    a.db.clean_published().unwrap();
    a.db.set_aside_pending().unwrap();
    a.db.keep_set_aside().unwrap();
    // Folded, then set aside again before it was published.
    a.db.clean_published().unwrap();
    a.db.set_aside_pending().unwrap();
    a.db.clean_published().unwrap();
    assert_eq!(a.db.keep_set_aside().unwrap(), Some(1));
    let kept = a.acknowledge_all().batch;
    assert_eq!(kept.tables[0].rows[0].base, Some(v(one.max_hlc().unwrap().0, 1)));
    b.apply(&kept);
    assert_eq!(journal(&b), vec![]);
    assert_eq!(b.dump("t"), vec![vec![int(1), text("two"), NULL]]);
}

#[test]
fn changes_set_aside_are_not_journaled_as_lost() {
    // Node 1's unpublished change is overwritten by node 2's concurrent one (journaled: it
    // would be published all the same), then set aside: it never will be, so no other node
    // can journal it. A change set aside that a remote write overwrites later is not either.
    let mut a = node(1, T);
    a.exec("INSERT INTO t VALUES (1, 'mine', NULL)");
    a.apply(&write(2, u64::MAX / 4, "theirs", None));
    assert_eq!(journal(&a).len(), 1, "an unpublished change lost is journaled");
    a.db.set_aside_pending().unwrap();
    assert_eq!(journal(&a), vec![]);
    a.exec("INSERT INTO t VALUES (2, 'mine', NULL)");
    a.db.clean_published().unwrap();
    a.db.set_aside_pending().unwrap();
    let theirs = batch(2, "t", &T_COLS, &[0], vec![upsert(u64::MAX / 4 + 1, vec![int(2), text("theirs"), NULL])]);
    a.apply(&theirs);
    assert_eq!(journal(&a), vec![]);
    assert_eq!(a.dump("t"), vec![vec![int(1), text("theirs"), NULL], vec![int(2), text("theirs"), NULL]]);
}

#[test]
fn a_change_set_aside_is_judged_as_the_change_that_would_keep_it() {
    // Node 1 changes rows 1 and 2, both node 3's, and the change is set aside. Kept, it is
    // published again, newer, on top of node 3's versions. Node 2's concurrent write to row
    // 1, older than node 1's change, loses to it. Node 2's concurrent write to row 2, newer,
    // overwrites it here: node 3's version, which it was made on, is lost, as on every node
    // that held it.
    let mut a = node(1, T);
    let threes = batch(
        3,
        "t",
        &T_COLS,
        &[0],
        vec![
            upsert(5 << 16, vec![int(1), text("three"), NULL]),
            upsert((5 << 16) + 1, vec![int(2), text("three"), NULL]),
        ],
    );
    a.apply(&threes);
    a.exec("UPDATE t SET name = 'mine'");
    a.db.clean_published().unwrap();
    a.db.set_aside_pending().unwrap();
    let older = v(6 << 16, 2);
    a.apply(&write(2, older.hlc.0, "older", None));
    let newer = batch(2, "t", &T_COLS, &[0], vec![upsert(u64::MAX / 4, vec![int(2), text("newer"), NULL])]);
    a.apply(&newer);
    let losers: BTreeSet<Version> = journal(&a).iter().map(|c| c.loser).collect();
    assert_eq!(losers, BTreeSet::from([v((5 << 16) + 1, 3), older]));
    assert_eq!(a.dump("t"), vec![vec![int(1), text("mine"), NULL], vec![int(2), text("newer"), NULL]]);
}
