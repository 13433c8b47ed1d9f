//! Table digests (`marmot verify`): equal content, equal digests whatever the write order;
//! one differing row shows in one bucket, and the bucket's rows name its key.

use super::*;

fn digests_of(n: &Node) -> Vec<super::super::TableDigest> {
    n.db.digests().expect("digests").tables
}

#[test]
fn equal_rows_give_equal_digests_and_a_differing_row_is_found_by_its_bucket() {
    let mut a = node(1, T);
    let mut b = node(2, T);
    a.exec(
        "INSERT INTO t VALUES (1, 'x', 1.5); INSERT INTO t VALUES (2, 'y', NULL); INSERT INTO t VALUES (3, 'z', 2.0);",
    );
    let p = a.acknowledge_all();
    a.db.clean_published().unwrap();
    b.apply(&p.batch);
    assert_eq!(digests_of(&a), digests_of(&b), "same rows, same digests");
    assert_eq!(digests_of(&a)[0].rows, 3);

    // Row 2 changes on b only, behind capture's back: 2 and 2.0 are different values.
    b.exec("UPDATE __marmot__clock SET applying = 1; UPDATE t SET score = 2 WHERE id = 2; UPDATE __marmot__clock SET applying = 0;");
    let (da, db) = (digests_of(&a), digests_of(&b));
    let differing: Vec<usize> = (0..da[0].buckets.len()).filter(|&i| da[0].buckets[i] != db[0].buckets[i]).collect();
    assert_eq!(differing.len(), 1, "one row, one bucket");
    let bucket = differing[0];
    let (sa, sb) = (a.db.sub_digests("t", bucket).unwrap(), b.db.sub_digests("t", bucket).unwrap());
    let subs: Vec<usize> = (0..sa.len()).filter(|&i| sa[i] != sb[i]).collect();
    assert_eq!(subs.len(), 1, "one row, one sub-bucket");
    let (ra, rb) = (a.db.bucket_rows("t", bucket, &subs).unwrap(), b.db.bucket_rows("t", bucket, &subs).unwrap());
    assert_eq!(ra.len(), 1, "only the row of that sub-bucket");
    let diff: Vec<_> = ra
        .iter()
        .filter(|r| !rb.iter().any(|o| format!("{:?}", o.key) == format!("{:?}", r.key) && o.hash == r.hash))
        .map(|r| (r.key.clone(), r.version))
        .collect();
    assert_eq!(diff.len(), 1, "{diff:?}");
    assert_eq!(format!("{:?}", diff[0].0), format!("{:?}", vec![int(2)]));
    assert_eq!(diff[0].1.map(|(_, node)| node), Some(1), "the version both hold: node 1's write");
}

#[test]
fn a_row_deleted_on_one_node_shows_as_its_tombstone() {
    let mut a = node(1, T);
    let mut b = node(2, T);
    a.exec("INSERT INTO t VALUES (7, 'x', 1.0)");
    b.apply(&a.acknowledge_all().batch);
    a.exec("DELETE FROM t WHERE id = 7");
    a.acknowledge_all();
    a.db.clean_published().unwrap();
    let differing: Vec<usize> = {
        let (da, db) = (digests_of(&a), digests_of(&b));
        (0..da[0].buckets.len()).filter(|&i| da[0].buckets[i] != db[0].buckets[i]).collect()
    };
    assert_eq!(differing.len(), 1);
    let ra = a.db.bucket_rows("t", differing[0], &[]).unwrap();
    assert_eq!(ra.len(), 1);
    assert_eq!(ra[0].hash, 0, "a tombstone");
    assert!(ra[0].version.is_some());
}
