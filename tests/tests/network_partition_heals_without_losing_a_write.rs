//! Issue #13's partition: three `marmot` nodes whose embedded `nats-server`s are routed
//! through TCP proxies (one per direction of each pair), so a test can cut a node off the
//! cluster. Every node's application keeps committing through a 30 s cut — the cut-off
//! node's changes wait in its database — and after the link heals every node converges and
//! holds every committed row. Cases: one replica and three, the stream's leader inside and
//! outside the cut, and a one-way cut (the node hears the others, they do not hear it).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use marmot_tests::{
    create_db, free_port, http_get, query_i64, require_tools, wait_converged, wait_until, Background, Node, NodeConfig,
    Proxy, TestDir, DEADLINE,
};

const NODES: usize = 3;
const CUT: Duration = Duration::from_secs(30);
/// A row committed this long after the cut began cannot have crossed it.
const IN_FLIGHT_MS: i64 = 3_000;

const SCHEMA: &str = "
CREATE TABLE t(id INTEGER PRIMARY KEY, node INTEGER NOT NULL, seq INTEGER NOT NULL, at_ms INTEGER NOT NULL);
CREATE TABLE latest(k INTEGER PRIMARY KEY, node INTEGER NOT NULL, seq INTEGER NOT NULL);
";

/// An application writing until `<stop>` exists: each transaction inserts its own row and
/// overwrites one of five shared rows (colliding with the other nodes' writers).
const WRITER: &str = r#"
import os, sqlite3, sys, time
db, node, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
c = sqlite3.connect(db, timeout=30, isolation_level=None)
seq = 0
while not os.path.exists(stop):
    c.execute("BEGIN IMMEDIATE")
    c.execute("INSERT INTO t(id, node, seq, at_ms) VALUES (?, ?, ?, ?)",
              (node * 10_000_000 + seq, node, seq, int(time.time() * 1000)))
    c.execute("INSERT OR REPLACE INTO latest(k, node, seq) VALUES (?, ?, ?)", (seq % 5, node, seq))
    c.execute("COMMIT")
    seq += 1
    time.sleep(0.05)
print(seq)
"#;

#[derive(Clone, Copy)]
struct Case {
    replicas: i64,
    /// Cut off the node holding the stream's leader (else another one).
    cut_the_leader: bool,
    /// Only the cut-off node's bytes are held; it still hears the others.
    one_way: bool,
}

#[test]
fn one_replica_node_holding_the_stream_is_cut_off() {
    partition_heals("r1-leader-cut", Case { replicas: 1, cut_the_leader: true, one_way: false });
}

#[test]
fn one_replica_node_without_the_stream_is_cut_off() {
    partition_heals("r1-other-cut", Case { replicas: 1, cut_the_leader: false, one_way: false });
}

#[test]
fn three_replicas_leader_is_cut_off() {
    partition_heals("r3-leader-cut", Case { replicas: 3, cut_the_leader: true, one_way: false });
}

#[test]
fn three_replicas_follower_is_cut_off() {
    partition_heals("r3-follower-cut", Case { replicas: 3, cut_the_leader: false, one_way: false });
}

#[test]
fn three_replicas_leader_is_not_heard_but_hears() {
    partition_heals("r3-one-way", Case { replicas: 3, cut_the_leader: true, one_way: true });
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("a clock after 1970").as_millis() as i64
}

/// The embedded server's monitoring port, from the configuration `marmot` generated.
fn monitor_port(node_dir: &Path, id: usize) -> Option<u16> {
    let conf = std::fs::read_to_string(node_dir.join("nats").join(format!("marmot-node-{id}.conf"))).ok()?;
    let line = conf.lines().find(|l| l.starts_with("http:"))?;
    line.trim_end().trim_end_matches('"').rsplit(':').next()?.parse().ok()
}

/// The index of the node whose server leads the replication stream, as its servers report.
fn stream_leader(node_dirs: &[PathBuf]) -> Option<usize> {
    for (i, dir) in node_dirs.iter().enumerate() {
        let Some(body) = monitor_port(dir, i + 1).and_then(|p| http_get(p, "/jsz?accounts=true&streams=true")) else {
            continue;
        };
        let jsz: serde_json::Value = serde_json::from_str(&body).expect("/jsz answers JSON");
        let accounts = jsz["account_details"].as_array().cloned().unwrap_or_default();
        for stream in accounts.iter().flat_map(|a| a["stream_detail"].as_array().cloned().unwrap_or_default()) {
            if !stream["name"].as_str().unwrap_or("").starts_with("marmot-changes") {
                continue;
            }
            if let Some(leader) = stream["cluster"]["leader"].as_str() {
                let id: usize = leader.trim_start_matches("marmot-node-").parse().ok()?;
                return Some(id - 1);
            }
        }
    }
    None
}

fn partition_heals(name: &str, case: Case) {
    require_tools();
    let dir = TestDir::new(name);
    let cluster_ports: Vec<u16> = (0..NODES).map(|_| free_port()).collect();
    // proxies[i][j]: the route node i opens to node j.
    let proxies: Vec<Vec<Option<Proxy>>> =
        (0..NODES).map(|i| (0..NODES).map(|j| (i != j).then(|| Proxy::start(cluster_ports[j]))).collect()).collect();
    let node_dirs: Vec<PathBuf> = (1..=NODES).map(|id| dir.join(format!("node-{id}"))).collect();
    let mut nodes: Vec<Node> = (0..NODES)
        .map(|i| {
            let node_dir = &node_dirs[i];
            std::fs::create_dir(node_dir).unwrap();
            let db = node_dir.join("app.db");
            create_db(&db, SCHEMA);
            // Routes go only through the proxies: each server advertises an address nobody
            // can reach, so no server learns another's real route port by gossip.
            let routes: Vec<String> =
                proxies[i].iter().flatten().map(|p| format!("\"nats://127.0.0.1:{}\"", p.port())).collect();
            let server_config = node_dir.join("cluster.conf");
            std::fs::write(
                &server_config,
                format!(
                    "cluster {{\n  name: \"e-marmot\"\n  listen: \"127.0.0.1:{}\"\n  advertise: \"127.0.0.1:1\"\n  \
                     routes: [{}]\n}}\n",
                    cluster_ports[i],
                    routes.join(", ")
                ),
            )
            .unwrap();
            let mut config = NodeConfig::new(i as u64 + 1, &db);
            config.replicas = case.replicas;
            config.server_config = Some(server_config);
            config.extra = "\n[snapshot]\nenabled = false\n".into();
            Node::start(node_dir, &config, &[])
        })
        .collect();
    for node in &mut nodes {
        node.wait_replicating(DEADLINE);
    }
    let dbs: Vec<PathBuf> = nodes.iter().map(|n| n.db().to_path_buf()).collect();
    let paths: Vec<&Path> = dbs.iter().map(PathBuf::as_path).collect();
    for (i, db) in dbs.iter().enumerate() {
        let sql = format!("INSERT INTO t VALUES ({}, 0, 0, 0);", i + 1);
        Background::sqlite3(dir.path(), &format!("warm-up-{i}"), db, &sql).wait_success(DEADLINE);
    }
    wait_converged(&paths, DEADLINE);

    let mut leader = None;
    wait_until("a server reports the stream's leader", DEADLINE, || {
        leader = stream_leader(&node_dirs);
        leader.is_some()
    });
    let leader = leader.unwrap();
    let cut = if case.cut_the_leader { leader } else { (leader + 1) % NODES };
    eprintln!("stream leader: node-{}; cutting off node-{}", leader + 1, cut + 1);

    let stop = dir.join("stop-writing");
    let stop_arg = stop.to_string_lossy().into_owned();
    let mut writers: Vec<Background> = (0..NODES)
        .map(|i| {
            let db = dbs[i].to_string_lossy().into_owned();
            let node = (i + 1).to_string();
            Background::python(dir.path(), &format!("writer-{}", i + 1), WRITER, &[&db, &node, &stop_arg])
        })
        .collect();
    wait_until("every application has committed a few rows", DEADLINE, || {
        (0..NODES).all(|i| query_i64(&dbs[i], &format!("SELECT count(*) FROM t WHERE node = {}", i + 1)) >= 10)
    });

    let cut_at = now_ms();
    for other in (0..NODES).filter(|&j| j != cut) {
        let (out, back) = (proxies[cut][other].as_ref().unwrap(), proxies[other][cut].as_ref().unwrap());
        if case.one_way {
            out.cut_forward();
            back.cut_backward();
        } else {
            out.cut();
            back.cut();
        }
    }
    // The cut is the fault itself: it lasts CUT whatever the nodes do meanwhile.
    let healed_at = std::time::Instant::now() + CUT;
    while std::time::Instant::now() < healed_at {
        for (i, w) in writers.iter_mut().enumerate() {
            assert!(w.is_running(), "the application on node-{} stopped during the cut:\n{}", i + 1, w.output());
        }
        for node in &mut nodes {
            node.assert_running();
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let crossed = |db: &Path, from: &str| {
        query_i64(db, &format!("SELECT count(*) FROM t WHERE {from} AND at_ms > {}", cut_at + IN_FLIGHT_MS))
    };
    let cut_node = cut + 1;
    assert!(crossed(&dbs[cut], &format!("node = {cut_node}")) > 100, "the cut-off node's application kept committing");
    for other in (0..NODES).filter(|&j| j != cut) {
        assert_eq!(crossed(&dbs[other], &format!("node = {cut_node}")), 0, "node-{} heard the cut-off node", other + 1);
    }
    if !case.one_way {
        assert_eq!(crossed(&dbs[cut], &format!("node <> {cut_node}")), 0, "the cut-off node heard the others");
    }
    for row in proxies.iter().flatten().flatten() {
        row.heal();
    }
    eprintln!("healed after {} ms", now_ms() - cut_at);

    std::fs::write(&stop, b"").unwrap();
    let mut committed = Vec::new();
    for (i, w) in writers.iter_mut().enumerate() {
        w.wait_success(DEADLINE);
        let n: i64 = w.output().trim().parse().expect("the writer prints how many rows it committed");
        assert_eq!(query_i64(&dbs[i], &format!("SELECT count(*) FROM t WHERE node = {}", i + 1)), n);
        committed.push(n);
    }
    let converged_from = std::time::Instant::now();
    wait_converged(&paths, DEADLINE * 2);
    eprintln!("converged {} ms after the writers stopped", converged_from.elapsed().as_millis());
    for (i, db) in dbs.iter().enumerate() {
        for (origin, n) in committed.iter().enumerate() {
            let held = query_i64(db, &format!("SELECT count(*) FROM t WHERE node = {}", origin + 1));
            assert_eq!(held, *n, "node-{} holds {held} of node-{}'s {n} committed rows", i + 1, origin + 1);
        }
    }
    for node in &mut nodes {
        assert!(node.terminate(DEADLINE).success());
    }
}
