//! `tombstone_retention`, end to end with real processes. Two nodes keep tombstones for 3
//! seconds. Rows inserted and deleted on node 1 leave tombstones on both nodes, which both
//! collect once the retention has passed (`marmot status --json` says so). Then node 2's
//! side-car is stopped and its database gets a row of its own, captured by its triggers;
//! when it starts again more than the retention later, that change is never published (it
//! could bring back a row deleted elsewhere whose tombstone is gone): node 2 keeps a copy
//! of its database with the row, restores a snapshot and converges with node 1, and node 1
//! never sees the row.

mod snapshot_common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use marmot_tests::{
    create_db, marmot_bin, query_i64, require_tools, wait_converged, wait_until, NatsServer, Node, TestDir, DEADLINE,
};
use snapshot_common::{file_store_config, save_snapshot, write_pairs, SCHEMA};

const RETENTION_MS: u64 = 3_000;

/// `marmot status --json` of the node configured in `config`.
fn status(config: &Path) -> serde_json::Value {
    let out = Command::new(marmot_bin())
        .arg("-config")
        .arg(config)
        .args(["status", "--json", "--timeout", "5"])
        .env_remove("RUST_LOG")
        .output()
        .expect("run marmot status");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("status --json is JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

fn field(status: &serde_json::Value, key: &str) -> u64 {
    status[key].as_u64().unwrap_or_else(|| panic!("status has no {key}: {status}"))
}

/// The copies `marmot` kept of `db` before setting expired changes aside.
fn expired_copies(db: &Path) -> Vec<PathBuf> {
    let name = db.file_name().unwrap().to_string_lossy().into_owned();
    std::fs::read_dir(db.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(&format!("{name}.expired-")))
        .collect()
}

#[test]
fn tombstones_are_collected_and_a_change_older_than_the_retention_is_never_published() {
    require_tools();
    let dir = TestDir::new("tombstones");
    let server = NatsServer::standalone(dir.path(), "nats");
    let store = dir.join("snapshots");
    let dbs: Vec<PathBuf> = (1..=2).map(|i| dir.join(format!("node-{i}.db"))).collect();
    let configs: Vec<PathBuf> = (1..=2).map(|i| dir.join(format!("node-{i}.toml"))).collect();
    let mut nodes: Vec<Node> = (1..=2u64)
        .map(|id| {
            let db = &dbs[id as usize - 1];
            create_db(db, SCHEMA);
            let mut config = file_store_config(id, db, &server.url(), &store, 3);
            config.max_entries = 1_000;
            // Maintenance every 200 ms; clocks on one machine agree.
            config.top =
                format!("tombstone_retention = {RETENTION_MS}\nmax_clock_skew = 100\ncleanup_interval = 200\n");
            Node::start(dir.path(), &config, &[])
        })
        .collect();
    for node in &mut nodes {
        node.wait_replicating(DEADLINE);
    }

    // 100 rows inserted, then deleted: 100 tombstones on each node.
    write_pairs(&dbs[0], 1, 1, 50, 10);
    wait_converged(&[&dbs[0], &dbs[1]], DEADLINE);
    let deleted_at = Instant::now();
    marmot_tests::sqlite3(dir.path(), "delete", &dbs[0], "DELETE FROM t;");
    wait_until("node 2 applied the deletes", DEADLINE, || query_i64(&dbs[1], "SELECT count(*) FROM t") == 0);
    // A node folds its own published deletes into its versions at its next maintenance.
    wait_until("both nodes hold the 100 tombstones", DEADLINE, || {
        configs.iter().all(|c| field(&status(c), "tombstones") == 100)
    });
    wait_until("both nodes collected the tombstones after the retention", DEADLINE, || {
        configs.iter().all(|c| {
            let s = status(c);
            field(&s, "tombstones") == 0 && field(&s, "tombstones_collected") >= 100
        })
    });
    assert!(
        deleted_at.elapsed() >= Duration::from_millis(RETENTION_MS),
        "collected only after the retention ({:?})",
        deleted_at.elapsed()
    );

    // A snapshot for node 2 to come back from.
    save_snapshot(dir.path(), &configs[0], &store);

    // Node 2's side-car stops; its database gets a row, captured and left unpublished
    // for longer than the retention.
    let stopped = nodes[1].terminate(DEADLINE);
    assert!(stopped.success(), "node 2 stopped cleanly ({stopped})");
    write_pairs(&dbs[1], 2, 9_001, 1, 10);
    let written = Instant::now();
    write_pairs(&dbs[0], 1, 5_001, 1, 10);
    wait_until("node 2's change is older than the retention", DEADLINE, || {
        written.elapsed() > Duration::from_millis(RETENTION_MS + 500)
    });
    nodes[1].restart();
    wait_until("node 2 set its change aside and restored a snapshot", DEADLINE, || {
        query_i64(&dbs[1], "SELECT count(*) FROM t WHERE id >= 9001") == 0
            && query_i64(&dbs[1], "SELECT count(*) FROM t WHERE id >= 5001 AND id < 9001") == 2
    });
    nodes[1].wait_replicating(DEADLINE);
    let log = nodes[1].log_since_start();
    assert!(log.contains("longer than tombstone_retention"), "node 2 says why:\n{log}");
    let copies = expired_copies(&dbs[1]);
    assert_eq!(copies.len(), 1, "one copy kept: {copies:?}");
    assert_eq!(query_i64(&copies[0], "SELECT count(*) FROM t WHERE id >= 9001"), 2, "the copy holds the change");

    // Both nodes go on replicating; node 1 never received the expired row.
    write_pairs(&dbs[1], 2, 7_001, 1, 10);
    wait_until("node 2's new write reached node 1", DEADLINE, || {
        query_i64(&dbs[0], "SELECT count(*) FROM t WHERE id >= 7001 AND id < 9001") == 2
    });
    wait_converged(&[&dbs[0], &dbs[1]], DEADLINE);
    assert_eq!(query_i64(&dbs[0], "SELECT count(*) FROM t WHERE id >= 9001"), 0, "never published");
    for node in &mut nodes {
        node.assert_running();
    }
}
