//! `marmot verify` against three real nodes: identical tables exit 0, also while a node
//! keeps writing (differences that are writes in flight are not divergences); then node
//! 3's database gets a row while its side-car is stopped and after `-cleanup`, so the row
//! is never captured, and `verify` exits 1 naming the table and the exact key with each
//! node's view and version; `status` shows the last result.

mod snapshot_common;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use marmot_tests::{
    create_db, marmot_command, require_tools, wait_converged, NatsServer, Node, NodeConfig, TestDir, DEADLINE,
};
use snapshot_common::{run_marmot, write_pairs, SCHEMA};

/// Runs `marmot verify` for the node configured in `config`: (exit code, output).
fn verify(config: &std::path::Path, args: &[&str]) -> (i32, String) {
    marmot_command(config, "verify", args)
}

#[test]
fn verify_finds_the_key_a_node_changed_behind_marmots_back() {
    require_tools();
    let dir = TestDir::new("verify");
    let server = NatsServer::standalone(dir.path(), "nats");
    let dbs: Vec<PathBuf> = (1..=3).map(|i| dir.join(format!("node-{i}.db"))).collect();
    let configs: Vec<PathBuf> = (1..=3).map(|i| dir.join(format!("node-{i}.toml"))).collect();
    let mut nodes: Vec<Node> = (1..=3u64)
        .map(|id| {
            let db = &dbs[id as usize - 1];
            create_db(db, SCHEMA);
            let mut c = NodeConfig::new(id, db).with_urls(vec![server.url()]);
            c.extra = "\n[snapshot]\nenabled = false\n".into();
            Node::start(dir.path(), &c, &[])
        })
        .collect();
    for node in &mut nodes {
        node.wait_replicating(DEADLINE);
    }
    for (i, db) in dbs.iter().enumerate() {
        write_pairs(db, i as i64 + 1, 1_000 * (i as i64 + 1), 50, 20);
    }
    wait_converged(&[&dbs[0], &dbs[1], &dbs[2]], DEADLINE);

    let (code, out) = verify(&configs[1], &["--timeout", "30"]);
    assert_eq!(code, 0, "identical tables: exit 0\n{out}");
    assert!(out.contains("identical: 3 nodes, 1 tables, 300 rows"), "{out}");

    // Node 1 keeps writing while verify runs.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, db) = (stop.clone(), dbs[0].clone());
        std::thread::spawn(move || {
            let mut id = 100_000;
            while !stop.load(Ordering::Relaxed) {
                write_pairs(&db, 1, id, 1, 20);
                id += 2;
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let (code, out) = verify(&configs[2], &["--timeout", "30"]);
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer");
    assert_eq!(code, 0, "writes in flight are not divergences\n{out}");
    wait_converged(&[&dbs[0], &dbs[1], &dbs[2]], DEADLINE);

    // Node 3's file changes behind Marmot's back: stopped, cleaned up, written, restarted.
    let stopped = nodes[2].terminate(DEADLINE);
    assert!(stopped.success(), "node 3 stopped ({stopped})");
    let (ok, log) = run_marmot(dir.path(), "cleanup", &configs[2], &["-cleanup"], DEADLINE);
    assert!(ok, "cleanup: {log}");
    let conn = marmot_tests::open(&dbs[2]);
    // A new row: a changed one would be overwritten when node 3, its positions gone with
    // the cleanup, replays the stream from its start.
    conn.execute("INSERT INTO t(id, node, v, body) VALUES (777777, 3, 0, 'behind marmot')", []).unwrap();
    drop(conn);
    nodes[2].restart();
    nodes[2].wait_replicating(DEADLINE);

    let (code, out) = verify(&configs[0], &["--timeout", "30", "--json"]);
    assert_eq!(code, 1, "a divergence: exit 1\n{out}");
    let report: serde_json::Value = serde_json::from_str(out.lines().next().unwrap_or("")).expect("one JSON object");
    assert_eq!(report["result"], "differ", "{report}");
    let keys = report["keys"].as_array().expect("keys");
    assert_eq!(keys.len(), 1, "exactly the key changed: {report}");
    assert_eq!(keys[0]["table"], "t");
    assert_eq!(keys[0]["key"], serde_json::json!([777777]));
    let views = keys[0]["nodes"].as_object().expect("per node");
    assert_eq!(views.len(), 3, "each node's view: {report}");
    assert_eq!(views["3"]["present"], true, "{report}");
    assert_eq!(views["3"]["version"], serde_json::Value::Null, "never captured: no version: {report}");
    assert!(views["1"]["present"] == false && views["2"]["present"] == false, "{report}");

    let (_, text) = verify(&configs[1], &["--timeout", "30"]);
    assert!(text.contains("the nodes differ in t") && text.contains("key (777777)"), "{text}");
    // Every node hears the result and keeps it for `status`.
    let status = |config: &std::path::Path| marmot_command(config, "status", &["--timeout", "5"]).1;
    marmot_tests::wait_until("status shows the last verify", DEADLINE, || {
        configs.iter().all(|c| status(c).contains("last verify: the nodes DIFFER"))
    });
    for node in &mut nodes {
        node.assert_running();
    }
}
