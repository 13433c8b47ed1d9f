//! `marmot verify [--timeout 60] [--json]`: compares the replicated tables of every running
//! node, through NATS (the nodes answer on `<subject_prefix>-verify`, see
//! [`crate::verify`]).
//!
//! A round asks every node for its bucket digests (each node reads them in one read
//! transaction, with the stream positions and versions they reflect). Equal digests on
//! every node: the tables are identical, exit 0. For the buckets that differ it asks for
//! the sub-bucket digests, then the rows of the sub-buckets that differ, and gets each
//! differing key with each node's version. On a busy cluster a key may differ only because
//! a write is on its way; a key is reported as a divergence when
//! - two nodes hold the same version of it with different content (or one deleted), or
//! - it differed the same way (same versions everywhere) one round earlier and, since, every
//!   node has read the streams past where every node had read then and published every
//!   local change it had then — so nothing that could still change it was in flight.
//!
//! Exit 1 names each differing table and up to [`KEYS_MAX`] keys; exit 2 when fewer than
//! two nodes answered or the rows kept changing until the timeout. The result is announced
//! to the nodes, which keep it for `status` and the metrics.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use marmot_core::sqlite::Digests;
use marmot_core::{Hlc, Value};
use serde_json::json;

use super::{connect, NatsTarget};
use crate::config::Config;
use crate::verify::{subject, Reply, Request};

/// Exit status: every node holds the same rows.
pub const EXIT_IDENTICAL: u8 = 0;
/// Exit status: nodes differ.
pub const EXIT_DIFFER: u8 = 1;
/// Exit status: no point to compare was found (or verify could not run).
pub const EXIT_INCONCLUSIVE: u8 = 2;
/// Keys reported at most.
pub const KEYS_MAX: usize = 10;
/// Once a first node answered, how long to wait for more after the last answer (at least).
const GATHER_QUIET: Duration = Duration::from_millis(300);
/// Time between rounds.
const ROUND_EVERY: Duration = Duration::from_secs(1);
/// Buckets looked into per round at most.
const BUCKETS_MAX: usize = 64;

/// A node's view of a key: the row's hash (`None` when absent or deleted) and its version
/// (`hlc`, node).
type View = (Option<u64>, Option<(u64, u64)>);

/// One key that differs, with each node's view.
#[derive(Clone, Debug, PartialEq)]
struct KeyView {
    table: String,
    key: Vec<Value>,
    nodes: BTreeMap<u64, View>,
}

impl KeyView {
    fn id(&self) -> (String, String) {
        (self.table.clone(), format!("{:?}", self.key))
    }

    /// Two nodes hold one version with different content: no write in flight explains it.
    fn definite(&self) -> bool {
        let views: Vec<_> = self.nodes.values().collect();
        views.iter().enumerate().any(|(i, a)| views[i + 1..].iter().any(|b| a.1.is_some() && a.1 == b.1 && a.0 != b.0))
    }
}

/// What a round saw, for the next one.
struct Round {
    differing: BTreeMap<(String, String), KeyView>,
    /// Per shard, the furthest position any node had read.
    furthest: BTreeMap<u32, u64>,
    /// Per node, its highest local version then, published or not.
    locals: BTreeMap<u64, u64>,
    /// Whether every differing bucket was looked into.
    complete: bool,
}

enum Outcome {
    Identical { nodes: Vec<u64>, tables: Vec<(String, u64)> },
    Differ { nodes: Vec<u64>, keys: Vec<KeyView> },
    Inconclusive(String),
}

/// Runs verify; returns the exit status.
pub async fn run(config: &Config, timeout: Duration, as_json: bool) -> Result<u8, String> {
    let target = NatsTarget::of(config);
    let urls = target.urls();
    if urls.is_empty() {
        return Err("the node's embedded NATS server has never run here; start marmot first".into());
    }
    let transport = connect(config, urls, "verify", Some(Duration::from_secs(10))).await?;
    let client = transport.client().clone();
    let subject = subject(config);
    let deadline = Instant::now() + timeout;
    let mut previous: Option<Round> = None;
    let outcome = loop {
        let why_not = match round(&client, &subject, deadline, &mut previous).await? {
            Ok(outcome) => break outcome,
            Err(why_not) => why_not,
        };
        if Instant::now() + ROUND_EVERY >= deadline {
            break Outcome::Inconclusive(format!("no point to compare within {}s: {why_not}", timeout.as_secs()));
        }
        tokio::time::sleep(ROUND_EVERY).await;
    };
    let (code, summary) = match &outcome {
        Outcome::Identical { nodes, tables } => (
            EXIT_IDENTICAL,
            format!(
                "identical: {} nodes, {} tables, {} rows",
                nodes.len(),
                tables.len(),
                tables.iter().map(|(_, r)| r).sum::<u64>()
            ),
        ),
        Outcome::Differ { keys, .. } => {
            let tables: BTreeSet<&str> = keys.iter().map(|k| k.table.as_str()).collect();
            (EXIT_DIFFER, format!("the nodes differ in {}", tables.into_iter().collect::<Vec<_>>().join(", ")))
        }
        Outcome::Inconclusive(why) => (EXIT_INCONCLUSIVE, format!("inconclusive: {why}")),
    };
    let at_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let announce = serde_json::to_vec(&Request::Result { code, at_ms, summary: summary.clone() }).expect("serializes");
    let _ = client.publish(subject.clone(), announce.into()).await;
    let _ = client.flush().await;
    if as_json {
        println!("{}", to_json(&outcome));
    } else {
        print_text(&outcome, &summary);
    }
    Ok(code)
}

/// One round; `Err(why)` when it found nothing conclusive yet.
async fn round(
    client: &async_nats::Client,
    subject: &str,
    deadline: Instant,
    previous: &mut Option<Round>,
) -> Result<Result<Outcome, String>, String> {
    let replies = gather(client, subject, &Request::Digests, None, deadline).await?;
    let mut nodes: BTreeMap<u64, Digests> = BTreeMap::new();
    for r in replies {
        match (r.digests, r.error) {
            (Some(d), _) => {
                nodes.insert(r.node_id, d);
            }
            (None, Some(e)) => return Err(format!("node {} could not compute its digests: {e}", r.node_id)),
            (None, None) => {}
        }
    }
    if nodes.len() < 2 {
        return Ok(Err(format!("{} node(s) answered; is marmot running on the others?", nodes.len())));
    }
    let ids: Vec<u64> = nodes.keys().copied().collect();
    // Per table (present on two nodes or more), the buckets that are not equal everywhere.
    let mut by_table: BTreeMap<&str, Vec<(u64, &marmot_core::sqlite::TableDigest)>> = BTreeMap::new();
    for (&id, d) in &nodes {
        for t in &d.tables {
            by_table.entry(&t.table).or_default().push((id, t));
        }
    }
    let mut differing: Vec<(String, usize, Vec<u64>)> = Vec::new();
    for (table, holders) in by_table.iter().filter(|(_, h)| h.len() >= 2) {
        let n = holders[0].1.buckets.len();
        for b in 0..n {
            if holders.iter().any(|(_, t)| t.buckets.get(b) != holders[0].1.buckets.get(b)) {
                differing.push((table.to_string(), b, holders.iter().map(|(id, _)| *id).collect()));
            }
        }
    }
    if differing.is_empty() {
        let tables = by_table.iter().map(|(t, h)| (t.to_string(), h[0].1.rows)).collect();
        return Ok(Ok(Outcome::Identical { nodes: ids, tables }));
    }
    let mut keys: BTreeMap<(String, String), KeyView> = BTreeMap::new();
    let complete = differing.len() <= BUCKETS_MAX;
    for (table, bucket, holders) in differing.into_iter().take(BUCKETS_MAX) {
        let req = Request::SubDigests { table: table.clone(), bucket };
        let subs = gather(client, subject, &req, Some(holders.len()), deadline).await?;
        let subs: Vec<Vec<u64>> = subs.into_iter().filter_map(|r| r.sub_digests).collect();
        let Some(first) = subs.first() else { continue };
        let which: Vec<usize> = (0..first.len()).filter(|&i| subs.iter().any(|s| s.get(i) != first.get(i))).collect();
        let req = Request::Rows { table: table.clone(), bucket, subs: which };
        let rows = gather(client, subject, &req, Some(holders.len()), deadline).await?;
        let answered: Vec<u64> = rows.iter().map(|r| r.node_id).collect();
        for r in rows {
            for row in r.rows.unwrap_or_default() {
                let view = KeyView { table: table.clone(), key: row.key.clone(), nodes: BTreeMap::new() };
                let entry = keys.entry(view.id()).or_insert(view);
                let hash = (row.hash != 0).then_some(row.hash);
                entry.nodes.insert(r.node_id, (hash, row.version));
            }
        }
        // A node that answered without the key does not hold it.
        for view in keys.values_mut().filter(|v| v.table == table) {
            for id in &answered {
                view.nodes.entry(*id).or_insert((None, None));
            }
        }
    }
    keys.retain(|_, v| {
        let first = v.nodes.values().next().map(|(h, _)| *h);
        v.nodes.values().any(|(h, _)| Some(*h) != first)
    });
    let furthest = nodes.values().flat_map(|d| d.positions.iter().copied()).fold(BTreeMap::new(), |mut m, (s, p)| {
        let e = m.entry(s).or_insert(0);
        *e = (*e).max(p);
        m
    });
    let locals: BTreeMap<u64, u64> = nodes.iter().map(|(&id, d)| (id, d.local)).collect();
    let settled = previous.as_ref().is_some_and(|prev| {
        nodes.iter().all(|(id, d)| {
            prev.furthest.iter().all(|(&s, &p)| d.positions.iter().any(|&(s2, p2)| s2 == s && p2 >= p))
                && prev.locals.get(id).is_none_or(|&l| d.published >= l)
        })
    });
    if let Some(d) = keys.values().find(|v| v.definite()) {
        let mut diverged = vec![d.clone()];
        diverged.extend(keys.values().filter(|v| v.definite() && v.id() != d.id()).cloned());
        diverged.truncate(KEYS_MAX);
        return Ok(Ok(Outcome::Differ { nodes: ids, keys: diverged }));
    }
    let tables: Vec<(String, u64)> = by_table.iter().map(|(t, h)| (t.to_string(), h[0].1.rows)).collect();
    match previous.as_ref() {
        Some(prev) if settled && prev.complete && complete => {
            // Every key that differed then: agreeing now, or moved on past every version
            // any node held then (a write was in flight) — else a divergence.
            let mut diverged = Vec::new();
            for (id, then) in &prev.differing {
                let Some(now) = keys.get(id) else { continue };
                let newest_then = then.nodes.values().filter_map(|(_, v)| *v).max();
                let missed = newest_then.is_some_and(|m| now.nodes.values().any(|(_, v)| v.is_none_or(|v| v < m)));
                if now == then || missed {
                    diverged.push(now.clone());
                }
            }
            if diverged.is_empty() {
                return Ok(Ok(Outcome::Identical { nodes: ids, tables }));
            }
            diverged.truncate(KEYS_MAX);
            Ok(Ok(Outcome::Differ { nodes: ids, keys: diverged }))
        }
        Some(_) if !settled => Ok(Err("the nodes did not catch up with each other's writes".into())),
        _ => {
            *previous = Some(Round { differing: keys, furthest, locals, complete });
            Ok(Err("rows differed while writes were in flight; looking again".into()))
        }
    }
}

/// Sends `request` and collects the answers: until `expect` answered, or (not knowing how
/// many nodes there are) until no more came for a while after the first.
async fn gather(
    client: &async_nats::Client,
    subject: &str,
    request: &Request,
    expect: Option<usize>,
    deadline: Instant,
) -> Result<Vec<Reply>, String> {
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(inbox.clone()).await.map_err(|e| format!("subscribing to replies: {e}"))?;
    let payload = serde_json::to_vec(request).expect("a request serializes");
    client
        .publish_with_reply(subject.to_owned(), inbox, payload.into())
        .await
        .map_err(|e| format!("sending a verify request: {e}"))?;
    let started = Instant::now();
    let mut out: Vec<Reply> = Vec::new();
    loop {
        if expect.is_some_and(|n| out.len() >= n) {
            break;
        }
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(100));
        // After the first answer, wait as long again as it took (a node of the same size
        // takes about as long), at least GATHER_QUIET.
        let wait = match (out.is_empty(), expect) {
            (true, _) | (false, Some(_)) => left,
            (false, None) => started.elapsed().max(GATHER_QUIET).min(left),
        };
        match tokio::time::timeout(wait, sub.next()).await {
            Ok(Some(msg)) => match serde_json::from_slice::<Reply>(&msg.payload) {
                Ok(r) => out.push(r),
                Err(e) => return Err(format!("a node answered something unreadable: {e}")),
            },
            _ => break,
        }
    }
    let _ = sub.unsubscribe().await;
    Ok(out)
}

fn version_text(v: Option<(u64, u64)>) -> String {
    v.map_or("no version".into(), |(hlc, node)| format!("version {} of node {node}", Hlc(hlc)))
}

fn print_text(outcome: &Outcome, summary: &str) {
    println!("{summary}");
    if let Outcome::Differ { keys, .. } = outcome {
        let mut table = "";
        for k in keys {
            if k.table != table {
                table = &k.table;
                println!("table {table}:");
            }
            println!("  key {}", key_text(&k.key));
            for (node, (hash, version)) in &k.nodes {
                let what = match hash {
                    Some(h) => format!("row {h:016x}"),
                    None if version.is_some() => "deleted".into(),
                    None => "absent".into(),
                };
                println!("    node {node}: {what}, {}", version_text(*version));
            }
        }
    }
}

fn key_text(key: &[Value]) -> String {
    let parts: Vec<String> = key.iter().map(value_json).map(|v| v.to_string()).collect();
    format!("({})", parts.join(", "))
}

fn value_json(v: &Value) -> serde_json::Value {
    match v {
        Value::Null => serde_json::Value::Null,
        Value::Integer(i) => json!(i),
        Value::Real(f) => json!(f),
        Value::Text(t) => json!(t),
        Value::Blob(b) => json!({ "blob_hex": b.iter().map(|x| format!("{x:02x}")).collect::<String>() }),
    }
}

fn to_json(outcome: &Outcome) -> serde_json::Value {
    match outcome {
        Outcome::Identical { nodes, tables } => json!({
            "result": "identical",
            "nodes": nodes,
            "tables": tables.iter().map(|(t, rows)| json!({"table": t, "rows": rows})).collect::<Vec<_>>(),
        }),
        Outcome::Differ { nodes, keys } => json!({
            "result": "differ",
            "nodes": nodes,
            "tables": keys.iter().map(|k| k.table.clone()).collect::<BTreeSet<_>>(),
            "keys": keys.iter().map(|k| json!({
                "table": k.table,
                "key": k.key.iter().map(value_json).collect::<Vec<_>>(),
                "nodes": k.nodes.iter().map(|(node, (hash, version))| (node.to_string(), json!({
                    "present": hash.is_some(),
                    "version": version.map(|(hlc, node)| json!({"hlc": Hlc(hlc).to_string(), "node": node})),
                }))).collect::<serde_json::Map<_, _>>(),
            })).collect::<Vec<_>>(),
        }),
        Outcome::Inconclusive(why) => json!({ "result": "inconclusive", "reason": why }),
    }
}
