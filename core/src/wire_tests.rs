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
    let base =
        prop::option::of((1u64.., 1u64..)).prop_map(|b| b.map(|(h, n)| Version { hlc: Hlc(h), node: NodeId(n) }));
    let table = (1usize..5, prop::collection::vec((any::<u64>(), any::<bool>(), base), 0..6))
        .prop_flat_map(|(width, rows)| {
            let rows = rows
                .into_iter()
                .map(move |(hlc, del, base)| {
                    prop::collection::vec(value(), width).prop_map(move |values| RowChange {
                        hlc: Hlc(hlc),
                        op: if del { Op::Delete } else { Op::Upsert },
                        values,
                        base,
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
    (any::<u64>(), prop::collection::vec(table, 0..4)).prop_map(|(origin, tables)| Batch {
        origin: NodeId(origin),
        tables,
        ..Batch::default()
    })
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
                base: None,
            }],
        }],
        ..Batch::default()
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
    let b = Batch { origin: NodeId(1), tables: vec![], ..Batch::default() };
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
                    base: None,
                })
                .collect(),
        }],
        ..Batch::default()
    };
    let small = Batch { origin: NodeId(3), tables: vec![], ..Batch::default() };
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
            rows: vec![RowChange {
                hlc: Hlc(n as u64),
                op: Op::Upsert,
                values: vec![Value::Blob(vec![n; 300])],
                base: None,
            }],
        }],
        ..Batch::default()
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
            rows: vec![RowChange { hlc: Hlc(1), op: Op::Upsert, values: vec![Value::Blob(vec![1; 300])], base: None }],
        }],
        ..Batch::default()
    };
    let small = Batch { origin: NodeId(5), tables: vec![], ..Batch::default() };
    let parts = encode_batch(&big, EncodeOptions { compress: false, part_bytes_max: 100 });
    let mut r = Reassembler::default();
    assert!(matches!(r.feed(Position(3), &parts[0].payload), Assembled::Incomplete));
    assert_eq!(r.safe_position(Position(3)), Position(2));
    let single = encode_batch(&small, EncodeOptions::default());
    assert!(matches!(r.feed(Position(4), &single[0].payload), Assembled::Batch(_)));
    assert_eq!(r.safe_position(Position(4)), Position(4), "the abandoned batch no longer holds the shard back");
}

/// A batch of `origin` that splits into two parts or more at 100 bytes per part.
fn two_part(origin: u64, n: u8) -> (Batch, Vec<EncodedPart>) {
    let b = Batch {
        origin: NodeId(origin),
        tables: vec![TableChanges {
            table: "t".into(),
            columns: vec!["id".into()],
            pk: vec![0],
            rows: vec![RowChange {
                hlc: Hlc(n as u64),
                op: Op::Upsert,
                values: vec![Value::Blob(vec![n; 150])],
                base: None,
            }],
        }],
        ..Batch::default()
    };
    let parts = encode_batch(&b, EncodeOptions { compress: false, part_bytes_max: 100 });
    assert!(parts.len() >= 2);
    (b, parts)
}

#[test]
fn the_stored_position_never_falls_between_the_parts_of_a_batch() {
    // Issue #13, finding 8: A part 0 at 10, B part 0 at 11, A part 1 at 12. Storing 10
    // (before B) would make a resumed reader see A's part 1 without its part 0.
    let (a, a_parts) = two_part(1, 1);
    let (b, b_parts) = two_part(2, 2);
    // A's first part, B's first part, the rest of A, the rest of B.
    let order =
        std::iter::once(&a_parts[0]).chain(std::iter::once(&b_parts[0])).chain(&a_parts[1..]).chain(&b_parts[1..]);
    let stream: Vec<(u64, &EncodedPart)> = order.enumerate().map(|(i, p)| (10 + i as u64, p)).collect();
    let a_done = 11 + a_parts.len() as u64 - 1;
    let mut r = Reassembler::default();
    for (pos, part) in stream.iter().filter(|(pos, _)| *pos <= a_done) {
        assert_eq!(matches!(r.feed(Position(*pos), &part.payload), Assembled::Batch(_)), *pos == a_done);
    }
    let stored = r.safe_position(Position(a_done));
    assert_eq!(stored, Position(9), "held before A's first part, since B is incomplete");
    // A reader resuming after the stored position gets both batches whole.
    let mut resumed = Reassembler::default();
    let mut got = Vec::new();
    for (pos, part) in stream.iter().filter(|(pos, _)| *pos > stored.0) {
        if let Assembled::Batch(batch) = resumed.feed(Position(*pos), &part.payload) {
            got.push(batch);
        }
    }
    assert_eq!(got, [a, b]);
    let end = stream.last().unwrap().0;
    assert_eq!(resumed.safe_position(Position(end)), Position(end));
}

#[test]
fn a_batch_whose_origin_never_sends_the_rest_is_given_up_and_can_be_adopted_later() {
    // Issue #13, finding 7: part 0 of 2 from an origin that then stops for good.
    let (a, a_parts) = two_part(1, 1);
    let other =
        encode_batch(&Batch { origin: NodeId(3), tables: vec![], ..Batch::default() }, EncodeOptions::default());
    let mut r = Reassembler::new(3);
    assert!(matches!(r.feed(Position(1), &a_parts[0].payload), Assembled::Incomplete));
    let mut strays = Vec::new();
    for pos in 2..=5 {
        r.feed(Position(pos), &other[0].payload);
        strays.extend(r.take_strays());
        if pos < 5 {
            assert!(strays.is_empty(), "given up too early, at {pos}");
            assert_eq!(r.safe_position(Position(pos)), Position(0));
        }
    }
    assert_eq!(strays.len(), 1, "given up after 3 more entries");
    assert_eq!(r.safe_position(Position(5)), Position(5), "the shard's position moves on");
    let parked = encode_stray(&strays[0]);
    let (origin, batch_id, parts) = decode_stray(&parked).expect("a parked stray decodes");
    assert_eq!((origin, parts.len()), (NodeId(1), 1));
    assert_eq!(Reassembler::multi_part_key(&a_parts[1].payload), Some((origin, batch_id)));
    assert!(decode_single(&parked).is_err(), "a parked stray is never taken for a batch");
    // The rest arrives after all (a slow origin): the parked part is fed back first.
    assert!(r.adopt(&parts).is_empty(), "nothing completes before the rest arrives");
    let mut last = None;
    for (i, p) in a_parts[1..].iter().enumerate() {
        last = Some(r.feed(Position(6 + i as u64), &p.payload));
    }
    match last {
        Some(Assembled::Batch(batch)) => assert_eq!(batch, a),
        other => panic!("expected the whole batch, got {other:?}"),
    }
}
