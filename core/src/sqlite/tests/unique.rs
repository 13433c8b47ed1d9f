//! Secondary UNIQUE constraints: the highest version holds a value, losers wait aside.

use super::*;

const THREADS: &str = "CREATE TABLE threads(id INTEGER PRIMARY KEY, uri TEXT UNIQUE, title TEXT);";

/// Node 1 and node 2 each insert a different id with the same uri; returns their batches
/// as (lower version, higher version).
fn competing_inserts() -> (Batch, Batch) {
    let mut a = node(1, THREADS);
    let mut b = node(2, THREADS);
    a.exec("INSERT INTO threads VALUES (1, 'uri:x', 'from a')");
    b.exec("INSERT INTO threads VALUES (2, 'uri:x', 'from b')");
    let (pa, pb) = (a.pending().batch, b.pending().batch);
    let version = |p: &Batch| (p.max_hlc().unwrap(), p.origin);
    if version(&pa) < version(&pb) {
        (pa, pb)
    } else {
        (pb, pa)
    }
}

fn id_of(b: &Batch) -> Value {
    b.tables[0].rows[0].values[0].clone()
}

#[test]
fn unique_conflict_resolves_the_same_in_either_arrival_order() {
    let (low, high) = competing_inserts();
    let mut c = node(3, THREADS);
    let mut d = node(4, THREADS);
    c.apply(&low);
    c.apply(&high);
    d.apply(&high);
    d.apply(&low);
    assert_eq!(c.dump("threads"), d.dump("threads"));
    let held = c.dump("threads");
    assert_eq!(held.len(), 1);
    assert_eq!(held[0][0], id_of(&high), "the higher version holds the unique value");
    assert_eq!(c.db.aside_count().unwrap(), 1);
    assert_eq!(d.db.aside_count().unwrap(), 1);
    let aside: Vec<(i64, i64)> = {
        let mut s = c.app.prepare("SELECT hlc, node FROM __marmot__aside").unwrap();
        s.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().collect::<rusqlite::Result<_>>().unwrap()
    };
    assert_eq!(aside, vec![(low.max_hlc().unwrap().0 as i64, low.origin.0 as i64)], "the lower version waits aside");
    assert!(c.db.read_pending().unwrap().is_none(), "setting aside is not a local change");
}

#[test]
fn set_aside_row_returns_when_the_holder_is_deleted_remotely() {
    let (low, high) = competing_inserts();
    for order in [[&low, &high], [&high, &low]] {
        let mut c = node(3, THREADS);
        for b in order {
            c.apply(b);
        }
        let holder = id_of(&high);
        let del = batch(
            high.origin.0,
            "threads",
            &["id", "uri", "title"],
            &[0],
            vec![delete(high.max_hlc().unwrap().0 + 1, vec![holder, NULL, NULL])],
        );
        c.apply(&del);
        assert_eq!(c.db.aside_count().unwrap(), 0);
        let rows = c.dump("threads");
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0][0], id_of(&low), "the set-aside row is back");
        assert_eq!(rows[0][1], text("uri:x"));
    }
}

#[test]
fn set_aside_row_returns_after_a_local_delete_and_reconcile() {
    let (low, high) = competing_inserts();
    let mut c = node(3, THREADS);
    c.apply(&high);
    c.apply(&low);
    assert_eq!(c.db.aside_count().unwrap(), 1);
    let Value::Integer(holder) = id_of(&high) else { panic!("integer id") };
    c.exec(&format!("DELETE FROM threads WHERE id = {holder}"));
    assert!(c.db.reconcile().unwrap(), "reconcile ran");
    assert_eq!(c.db.aside_count().unwrap(), 0);
    let rows = c.dump("threads");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0][0], id_of(&low));
    // Only the application's delete is a local change; the return of the row is not.
    let p = c.pending();
    assert_eq!(rows_of(&p.batch, "threads"), vec![(Op::Delete, vec![Value::Integer(holder), NULL, NULL])]);
    assert!(!c.db.reconcile().unwrap(), "nothing left to reconcile");
}

#[test]
fn set_aside_row_returns_when_the_holder_moves_to_another_value() {
    let (low, high) = competing_inserts();
    let mut c = node(3, THREADS);
    c.apply(&low);
    c.apply(&high);
    let mut moved = high.clone();
    let row = &mut moved.tables[0].rows[0];
    row.hlc = Hlc(row.hlc.0 + 1);
    row.values[1] = text("uri:y");
    c.apply(&moved);
    assert_eq!(c.db.aside_count().unwrap(), 0);
    assert_eq!(c.count("threads"), 2);
}

#[test]
fn lower_version_set_aside_is_dropped_when_its_own_row_is_deleted() {
    let (low, high) = competing_inserts();
    let mut c = node(3, THREADS);
    c.apply(&high);
    c.apply(&low);
    let del = batch(
        low.origin.0,
        "threads",
        &["id", "uri", "title"],
        &[0],
        vec![delete(low.max_hlc().unwrap().0 + 1, vec![id_of(&low), NULL, NULL])],
    );
    c.apply(&del);
    assert_eq!(c.db.aside_count().unwrap(), 0);
    assert_eq!(c.dump("threads").len(), 1);
}
