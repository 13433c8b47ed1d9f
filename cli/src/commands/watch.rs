//! `marmot watch [--table T] [--json] [--from-now]`: tails the change streams and prints
//! every replicated row change (shard, position, origin, version, table, operation, key,
//! values), as text lines or JSON lines, until interrupted.
//!
//! Reads each shard with its own ordered subscription, from the first entry the stream
//! still holds (or from its end with `--from-now`), and reassembles multi-part batches
//! with [`Reassembler`] exactly as a node does. An entry that cannot be decoded is
//! reported on stderr and skipped. Nothing is written anywhere: positions are not stored.

use std::io::Write;
use std::time::Duration;

use marmot_core::wire::{Assembled, Reassembler};
use marmot_core::{Batch, LogTransport, Op, Position, Shard, Subscription, Value};
use serde_json::{json, Map, Value as Json};

use super::{connect, NatsTarget};
use crate::config::Config;

/// Entries read per shard per round.
const ENTRIES_PER_READ_MAX: usize = 256;
/// How long one round waits for entries when every shard is idle.
const IDLE_WAIT: Duration = Duration::from_millis(200);

struct ShardTail {
    shard: Shard,
    sub: Box<dyn Subscription>,
    reassembler: Reassembler,
}

/// Tails the streams until Ctrl-C / SIGTERM, or until stdout is closed.
pub async fn run(config: &Config, tables: &[String], json: bool, from_now: bool) -> Result<(), String> {
    let target = NatsTarget::of(config);
    if let NatsTarget::EmbeddedUnknown(conf) = &target {
        return Err(format!(
            "this node runs the embedded nats-server, which has not been started here ({} \
             missing); start marmot first or set nats.urls",
            conf.display()
        ));
    }
    let transport = connect(config, target.urls(), "watch", None).await?;
    let mut tails = Vec::new();
    for s in 0..transport.shard_count() {
        let shard = Shard(s);
        let b = transport.bounds(shard).await.map_err(|e| e.to_string())?;
        let after = if from_now { b.last } else { Position(b.first.0.saturating_sub(1)) };
        let sub = transport.subscribe(shard, after).await.map_err(|e| e.to_string())?;
        tails.push(ShardTail { shard, sub, reassembler: Reassembler::default() });
    }
    let stop = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let term = async {
            match term.as_mut() {
                Some(t) => t.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term => {},
        }
    };
    tokio::select! {
        r = tail(&mut tails, tables, json) => r,
        _ = stop => Ok(()),
    }
}

async fn tail(tails: &mut [ShardTail], tables: &[String], json: bool) -> Result<(), String> {
    let mut out = std::io::stdout().lock();
    loop {
        let mut seen = 0;
        let n = tails.len();
        for (i, t) in tails.iter_mut().enumerate() {
            let wait = if seen == 0 && i + 1 == n { IDLE_WAIT } else { Duration::ZERO };
            let entries = t.sub.next_entries(ENTRIES_PER_READ_MAX, wait).await.map_err(|e| e.to_string())?;
            seen += entries.len();
            for entry in entries {
                match t.reassembler.feed(entry.position, &entry.payload) {
                    Assembled::Incomplete => {}
                    Assembled::Bad { error, .. } => {
                        eprintln!("shard {} position {}: undecodable entry: {error}", t.shard, entry.position);
                    }
                    Assembled::Batch(batch) => {
                        for line in lines(t.shard, entry.position, &batch, tables, json) {
                            if writeln!(out, "{line}").is_err() {
                                return Ok(()); // stdout closed: the reader is gone
                            }
                        }
                    }
                }
            }
        }
    }
}

/// One line per row change of `batch` in the selected tables.
pub fn lines(shard: Shard, position: Position, batch: &Batch, tables: &[String], json: bool) -> Vec<String> {
    let mut out = Vec::new();
    for tc in batch.tables.iter().filter(|tc| tables.is_empty() || tables.contains(&tc.table)) {
        for row in &tc.rows {
            let op = match row.op {
                Op::Upsert => "upsert",
                Op::Delete => "delete",
            };
            let key: Vec<(&str, &Value)> = tc.pk.iter().map(|&i| (tc.columns[i].as_str(), &row.values[i])).collect();
            let values: Vec<(&str, &Value)> = match row.op {
                Op::Upsert => tc.columns.iter().map(String::as_str).zip(&row.values).collect(),
                Op::Delete => Vec::new(),
            };
            if json {
                let obj = |pairs: &[(&str, &Value)]| -> Json {
                    Json::Object(pairs.iter().map(|(k, v)| (k.to_string(), json_value(v))).collect::<Map<_, _>>())
                };
                let mut line = json!({
                    "shard": shard.0,
                    "position": position.0,
                    "origin": batch.origin.0,
                    "hlc": row.hlc.0,
                    "time_ms": row.hlc.millis(),
                    "table": tc.table,
                    "op": op,
                    "key": obj(&key),
                });
                if row.op == Op::Upsert {
                    line["values"] = obj(&values);
                }
                out.push(line.to_string());
            } else {
                let text = |pairs: &[(&str, &Value)]| -> String {
                    pairs.iter().map(|(k, v)| format!("{k}={}", sql_literal(v))).collect::<Vec<_>>().join(", ")
                };
                let mut line = format!(
                    "shard {shard} @{position} origin {} version {} {} {op} key ({})",
                    batch.origin,
                    row.hlc,
                    tc.table,
                    text(&key)
                );
                if row.op == Op::Upsert {
                    line.push_str(&format!(" values ({})", text(&values)));
                }
                out.push(line);
            }
        }
    }
    out
}

/// A value in JSON: numbers and strings as themselves, a BLOB as `{"blob": "<hex>"}`, a
/// REAL that JSON cannot hold (NaN, infinities) as `{"real": "<text>"}`.
fn json_value(v: &Value) -> Json {
    match v {
        Value::Null => Json::Null,
        Value::Integer(i) => json!(i),
        Value::Real(r) if r.is_finite() => json!(r),
        Value::Real(r) => json!({ "real": r.to_string() }),
        Value::Text(t) => json!(t),
        Value::Blob(b) => json!({ "blob": hex(b) }),
    }
}

/// A value as an SQL literal.
fn sql_literal(v: &Value) -> String {
    match v {
        Value::Null => "NULL".to_owned(),
        Value::Integer(i) => i.to_string(),
        Value::Real(r) => format!("{r:?}"),
        Value::Text(t) => format!("'{}'", t.replace('\'', "''")),
        Value::Blob(b) => format!("X'{}'", hex(b)),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use marmot_core::{Hlc, NodeId, RowChange, TableChanges};

    fn batch() -> Batch {
        Batch {
            origin: NodeId(2),
            tables: vec![
                TableChanges {
                    table: "books".into(),
                    columns: vec!["id".into(), "title".into(), "cover".into()],
                    pk: vec![0],
                    rows: vec![
                        RowChange {
                            hlc: Hlc((5 << 16) | 1),
                            op: Op::Upsert,
                            values: vec![Value::Integer(1), Value::Text("O'Neil".into()), Value::Blob(vec![0xab])],
                            base: None,
                        },
                        RowChange {
                            hlc: Hlc(6 << 16),
                            op: Op::Delete,
                            values: vec![Value::Integer(9), Value::Null, Value::Null],
                            base: None,
                        },
                    ],
                },
                TableChanges { table: "other".into(), columns: vec!["k".into()], pk: vec![0], rows: vec![] },
            ],
            ..Batch::default()
        }
    }

    #[test]
    fn json_lines_carry_key_and_values() {
        let lines = lines(Shard(0), Position(3), &batch(), &[], true);
        assert_eq!(lines.len(), 2);
        let first: Json = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(first["origin"], 2);
        assert_eq!(first["op"], "upsert");
        assert_eq!(first["time_ms"], 5);
        assert_eq!(first["key"]["id"], 1);
        assert_eq!(first["values"]["title"], "O'Neil");
        assert_eq!(first["values"]["cover"]["blob"], "AB");
        let second: Json = serde_json::from_str(&lines[1]).unwrap();
        assert_eq!(second["op"], "delete");
        assert!(second.get("values").is_none());
    }

    #[test]
    fn text_lines_quote_like_sql_and_tables_filter() {
        let lines = lines(Shard(0), Position(3), &batch(), &["books".into()], false);
        assert!(
            lines[0].contains("books upsert key (id=1) values (id=1, title='O''Neil', cover=X'AB')"),
            "{}",
            lines[0]
        );
        assert!(lines[1].ends_with("books delete key (id=9)"), "{}", lines[1]);
        assert!(super::lines(Shard(0), Position(3), &batch(), &["nope".into()], false).is_empty());
    }
}
