//! A 3-server NATS cluster holding the change stream with three replicas: one server is
//! SIGKILLed while every node writes, writing goes on, the server comes back, and all
//! nodes converge with nothing lost. Then a second server is killed: the restarted one
//! must have rejoined as a working replica for the stream to keep its quorum.
//!
//! Node 1 is given only the first server's URL (it finds the others in the server's INFO),
//! so the server killed is always the one node 1 is connected to: its publishes in flight
//! lose their acknowledgements with the connection, and its consumer may die with the
//! server. How long each node then received nothing is printed, not asserted: when the
//! killed server led the stream, the cluster itself needs a leader election (seen taking
//! 4 to 14 s) before anything can be stored, which no bound below the old stalls of
//! 10 to 24 s would survive.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use marmot_tests::{
    create_db, query_i64, require_tools, wait_converged, wait_until, Background, NatsServer, Node, NodeConfig, TestDir,
    DEADLINE,
};

const NODES: u64 = 3;

const SCHEMA: &str = "
CREATE TABLE events(id INTEGER PRIMARY KEY, node INTEGER NOT NULL, seq INTEGER NOT NULL, body TEXT);
CREATE TABLE shared(k INTEGER PRIMARY KEY, v INTEGER NOT NULL, node INTEGER NOT NULL);
";

/// Unique events plus colliding upserts on five shared keys, paced, until the stop file
/// appears; prints how many transactions it committed.
const WRITER: &str = r#"
import os, sqlite3, sys, time
db, node, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
c = sqlite3.connect(db, timeout=30, isolation_level=None)
i = 0
while not os.path.exists(stop) and i < 20000:
    c.execute("BEGIN IMMEDIATE")
    c.execute("INSERT INTO events(id, node, seq, body) VALUES (?, ?, ?, ?)",
              (node * 1000000 + i, node, i, "event %d of node %d" % (i, node)))
    c.execute("INSERT INTO shared(k, v, node) VALUES (?, ?, ?) "
              "ON CONFLICT(k) DO UPDATE SET v = excluded.v, node = excluded.node", (i % 5, i, node))
    c.execute("COMMIT")
    i += 1
    time.sleep(0.01)
print("committed", i)
"#;

fn events_from_others(db: &Path, node: u64) -> i64 {
    query_i64(db, &format!("SELECT count(*) FROM events WHERE node <> {node}"))
}

/// Waits until node 1 has received `more` events from the others beyond what it has now.
fn wait_progress(db: &Path, more: i64, what: &str) {
    let from = events_from_others(db, 1);
    wait_until(what, DEADLINE, || events_from_others(db, 1) >= from + more);
}

/// Waits until every node (`dbs[i]` is node `i + 1`) has received an event from the others
/// beyond what it has now; returns how long each one waited.
fn wait_each_receives(dbs: &[PathBuf], what: &str) -> Vec<Duration> {
    let start = Instant::now();
    let from: Vec<i64> = dbs.iter().zip(1..).map(|(db, id)| events_from_others(db, id)).collect();
    let mut waited: Vec<Option<Duration>> = vec![None; dbs.len()];
    wait_until(what, DEADLINE, || {
        for ((db, id), (from, waited)) in dbs.iter().zip(1..).zip(from.iter().zip(&mut waited)) {
            if waited.is_none() && events_from_others(db, id) > *from {
                *waited = Some(start.elapsed());
            }
        }
        waited.iter().all(Option::is_some)
    });
    waited.into_iter().flatten().collect()
}

#[test]
fn nats_server_restart_with_three_replicas_keeps_replicating() {
    require_tools();
    let dir = TestDir::new("nats-restart");
    let mut servers = NatsServer::cluster(dir.path(), "nats", 3);
    let urls: Vec<String> = servers.iter().map(NatsServer::url).collect();
    let mut nodes: Vec<Node> = (1..=NODES)
        .map(|id| {
            let db = dir.join(format!("node-{id}.db"));
            create_db(&db, SCHEMA);
            // See the module documentation.
            let urls = if id == 1 { vec![urls[0].clone()] } else { urls.clone() };
            let config = NodeConfig { replicas: 3, ..NodeConfig::new(id, &db).with_urls(urls) };
            Node::start(dir.path(), &config, &[])
        })
        .collect();
    for node in &mut nodes {
        node.wait_replicating(DEADLINE);
    }
    let dbs: Vec<PathBuf> = nodes.iter().map(|n| n.db().to_path_buf()).collect();

    let stop = dir.join("stop-writing");
    let mut writers: Vec<Background> = dbs
        .iter()
        .zip(1..)
        .map(|(db, id)| {
            Background::python(
                dir.path(),
                &format!("writer-{id}"),
                WRITER,
                &[&db.to_string_lossy(), &id.to_string(), &stop.to_string_lossy()],
            )
        })
        .collect();

    wait_progress(&dbs[0], 50, "node 1 receives the others' events");
    servers[0].kill();
    let stalled = wait_each_receives(&dbs, "replication resumes with one server down");
    wait_progress(&dbs[0], 200, "replication goes on with one server down");
    servers[0].restart();
    wait_progress(&dbs[0], 200, "replication goes on after the server's return");
    for writer in &mut writers {
        assert!(writer.is_running(), "the writers kept writing through the server's death and return");
    }
    std::fs::write(&stop, b"").unwrap();
    for (id, stalled) in (1..).zip(&stalled) {
        eprintln!("node {id} received nothing for {stalled:.1?} after the server was killed");
    }

    let mut committed = Vec::new();
    for writer in &mut writers {
        writer.wait_success(Duration::from_secs(30));
        let out = writer.output();
        let n: i64 =
            out.trim().strip_prefix("committed ").and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{out}"));
        committed.push(n);
    }
    let paths: Vec<&Path> = dbs.iter().map(PathBuf::as_path).collect();
    wait_converged(&paths, DEADLINE);
    for db in &dbs {
        for (origin, n) in (1..).zip(&committed) {
            let sql = format!("SELECT count(*) FROM events WHERE node = {origin}");
            assert_eq!(query_i64(db, &sql), *n, "events of node {origin} on {}", db.display());
        }
        assert_eq!(query_i64(db, "SELECT count(*) FROM shared"), 5);
    }

    // The restarted server now has to carry the stream with the third one.
    servers[1].kill();
    let mut last = Background::sqlite3(
        dir.path(),
        "last-write",
        &dbs[2],
        "INSERT INTO events(id, node, seq, body) VALUES (999999999, 3, -1, 'after the second kill');",
    );
    last.wait_success(Duration::from_secs(30));
    for db in &dbs[..2] {
        wait_until("the write after the second kill reaches every node", DEADLINE, || {
            query_i64(db, "SELECT count(*) FROM events WHERE id = 999999999") == 1
        });
    }
    wait_converged(&paths, DEADLINE);
    for node in &mut nodes {
        node.assert_running();
    }
}
