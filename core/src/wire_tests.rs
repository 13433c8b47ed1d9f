use proptest::prelude::*;

use super::*;

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<i64>().prop_map(Value::Integer),
        prop_oneof![
            any::<f64>().prop_filter("NaN payloads are not carried", |f| !f.is_nan()),
            Just(-0.0),
            Just(f64::INFINITY),
            Just(f64::NEG_INFINITY),
            Just(f64::MIN_POSITIVE),
            Just(f64::MAX),
            Just(5e-324),
        ]
        .prop_map(Value::Real),
        any::<String>().prop_map(Value::Text),
        Just(Value::Text(String::new())),
        Just(Value::Text("ü 日本 🦫 \u{0} \"x\"".into())),
        prop::collection::vec(any::<u8>(), 0..64).prop_map(Value::Blob),
        Just(Value::Blob(vec![])),
        Just(Value::Blob(vec![0xff, 0xfe, 0xc3, 0x28])),
    ]
}

fn batch() -> impl Strategy<Value = Batch> {
    let table = (1usize..5, prop::collection::vec((any::<u64>(), any::<bool>()), 0..6))
        .prop_flat_map(|(width, rows)| {
            let rows = rows
                .into_iter()
                .map(move |(hlc, del)| {
                    prop::collection::vec(value(), width).prop_map(move |values| RowChange {
                        hlc: Hlc(hlc),
                        op: if del { Op::Delete } else { Op::Upsert },
                        values,
                    })
                })
                .collect::<Vec<_>>();
            (Just(width), rows, any::<String>())
        })
        .prop_map(|(width, rows, name)| TableChanges {
            table: name,
            columns: (0..width).map(|i| format!("c{i} ü \"{i}\"")).collect(),
            pk: vec![0],
            rows,
        });
    (any::<u64>(), prop::collection::vec(table, 0..4))
        .prop_map(|(origin, tables)| Batch { origin: NodeId(origin), tables })
}

fn reassemble(parts: &[EncodedPart]) -> Batch {
    let mut r = Reassembler::default();
    let mut out = None;
    for (i, p) in parts.iter().enumerate() {
        match r.feed(Position(i as u64 + 1), &p.payload) {
            Assembled::Incomplete => assert!(i + 1 < parts.len(), "last part completes the batch"),
            Assembled::Batch(b) => out = Some(b),
            Assembled::Bad { error, .. } => panic!("round trip failed: {error}"),
        }
    }
    out.expect("a batch after the last part")
}

proptest! {
    #[test]
    fn every_value_round_trips_exactly(b in batch(), compress in any::<bool>(), part in 1usize..200) {
        let parts = encode_batch(&b, EncodeOptions { compress, part_bytes_max: part });
        let back = reassemble(&parts);
        prop_assert_eq!(back, b);
    }
}

#[test]
fn integers_and_reals_keep_their_storage_class() {
    let b = Batch {
        origin: NodeId(7),
        tables: vec![TableChanges {
            table: "t".into(),
            columns: vec!["a".into(), "b".into(), "c".into(), "d".into()],
            pk: vec![0],
            rows: vec![RowChange {
                hlc: Hlc(1),
                op: Op::Upsert,
                values: vec![Value::Integer(1), Value::Real(1.0), Value::Real(-0.0), Value::Integer(i64::MIN)],
            }],
        }],
    };
    let back = decode_single(&encode_batch(&b, EncodeOptions::default())[0].payload).unwrap();
    assert_eq!(back, b);
    match &back.tables[0].rows[0].values[2] {
        Value::Real(z) => assert!(z.is_sign_negative(), "-0.0 keeps its sign"),
        other => panic!("expected a REAL, got {other:?}"),
    }
}

#[test]
fn unknown_format_version_is_detected_not_misread() {
    let b = Batch { origin: NodeId(1), tables: vec![] };
    let mut payload = encode_batch(&b, EncodeOptions::default())[0].payload.to_vec();
    payload[2] = FORMAT_VERSION + 1;
    match decode_single(&payload) {
        Err(Error::UnsupportedFormat { found, .. }) => assert_eq!(found, FORMAT_VERSION + 1),
        other => panic!("expected UnsupportedFormat, got {other:?}"),
    }
}

#[test]
fn garbage_is_reported_for_parking() {
    let mut r = Reassembler::default();
    match r.feed(Position(1), b"{\"not\": \"marmot\"}") {
        Assembled::Bad { bytes, .. } => assert_eq!(bytes, b"{\"not\": \"marmot\"}"),
        other => panic!("expected Bad, got {other:?}"),
    }
}

#[test]
fn incomplete_batch_holds_back_the_safe_position_until_complete() {
    let big = Batch {
        origin: NodeId(2),
        tables: vec![TableChanges {
            table: "t".into(),
            columns: vec!["id".into(), "v".into()],
            pk: vec![0],
            rows: (0..50)
                .map(|i| RowChange {
                    hlc: Hlc(i),
                    op: Op::Upsert,
                    values: vec![Value::Integer(i as i64), Value::Blob(vec![i as u8; 100])],
                })
                .collect(),
        }],
    };
    let small = Batch { origin: NodeId(3), tables: vec![] };
    let parts = encode_batch(&big, EncodeOptions { compress: false, part_bytes_max: 1000 });
    assert!(parts.len() > 2);
    let other = encode_batch(&small, EncodeOptions::default());
    let mut r = Reassembler::default();
    assert!(matches!(r.feed(Position(10), &parts[0].payload), Assembled::Incomplete));
    assert!(matches!(r.feed(Position(11), &other[0].payload), Assembled::Batch(_)));
    assert_eq!(r.safe_position(Position(11)), Position(9), "held back before the first part");
    let mut last = None;
    for (i, p) in parts[1..].iter().enumerate() {
        last = Some(r.feed(Position(12 + i as u64), &p.payload));
    }
    assert!(matches!(last, Some(Assembled::Batch(_))));
    assert_eq!(r.safe_position(Position(40)), Position(40));
}

#[test]
fn a_new_batch_from_the_same_origin_abandons_the_incomplete_one() {
    let mk = |n: u8| Batch {
        origin: NodeId(4),
        tables: vec![TableChanges {
            table: "t".into(),
            columns: vec!["id".into()],
            pk: vec![0],
            rows: vec![RowChange { hlc: Hlc(n as u64), op: Op::Upsert, values: vec![Value::Blob(vec![n; 300])] }],
        }],
    };
    let opts = EncodeOptions { compress: false, part_bytes_max: 100 };
    let first = encode_batch(&mk(1), opts);
    let second = encode_batch(&mk(2), opts);
    let mut r = Reassembler::default();
    assert!(matches!(r.feed(Position(1), &first[0].payload), Assembled::Incomplete));
    let mut got = None;
    for (i, p) in second.iter().enumerate() {
        got = Some(r.feed(Position(2 + i as u64), &p.payload));
    }
    match got {
        Some(Assembled::Batch(b)) => assert_eq!(b, mk(2)),
        other => panic!("expected the second batch, got {other:?}"),
    }
    assert_eq!(r.safe_position(Position(9)), Position(9), "nothing is held back any more");
}

#[test]
fn a_single_part_batch_from_the_same_origin_releases_the_held_position() {
    let big = Batch {
        origin: NodeId(5),
        tables: vec![TableChanges {
            table: "t".into(),
            columns: vec!["id".into()],
            pk: vec![0],
            rows: vec![RowChange { hlc: Hlc(1), op: Op::Upsert, values: vec![Value::Blob(vec![1; 300])] }],
        }],
    };
    let small = Batch { origin: NodeId(5), tables: vec![] };
    let parts = encode_batch(&big, EncodeOptions { compress: false, part_bytes_max: 100 });
    let mut r = Reassembler::default();
    assert!(matches!(r.feed(Position(3), &parts[0].payload), Assembled::Incomplete));
    assert_eq!(r.safe_position(Position(3)), Position(2));
    let single = encode_batch(&small, EncodeOptions::default());
    assert!(matches!(r.feed(Position(4), &single[0].payload), Assembled::Batch(_)));
    assert_eq!(r.safe_position(Position(4)), Position(4), "the abandoned batch no longer holds the shard back");
}
