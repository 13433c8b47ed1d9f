//! `[replication] include` / `exclude`: two nodes replicate different sets of tables.
//! Node 1 replicates `shared` and `metrics_*` only; node 2 everything but `*_local`. Both
//! write every table. A table both select converges; a table one leaves out keeps each
//! node's own rows there (the other node's rows are passed over and counted, never
//! parked); node 1 refuses to save a snapshot. Then node 1 is restarted selecting
//! everything: it installs capture on the tables it now replicates and sends their rows,
//! and node 2 receives them.

use std::path::{Path, PathBuf};
use std::process::Command;

use marmot_tests::{
    create_db, marmot_bin, query_i64, require_tools, sqlite3, wait_until, NatsServer, Node, NodeConfig, TestDir,
    DEADLINE,
};

const SCHEMA: &str = "CREATE TABLE shared (id INTEGER PRIMARY KEY, v TEXT);
CREATE TABLE metrics_a (id INTEGER PRIMARY KEY, v TEXT);
CREATE TABLE app_cache (id INTEGER PRIMARY KEY, v TEXT);
CREATE TABLE audit_local (id INTEGER PRIMARY KEY, v TEXT);";

const TABLES: [&str; 4] = ["shared", "metrics_a", "app_cache", "audit_local"];

/// The ids in `table` of `db`, as "1,2".
fn ids(db: &Path, table: &str) -> String {
    let conn = marmot_tests::open(db);
    conn.query_row(
        &format!("SELECT coalesce(group_concat(id, ','), '') FROM (SELECT id FROM {table} ORDER BY id)"),
        [],
        |r| r.get(0),
    )
    .expect("read ids")
}

fn write_all(dir: &Path, db: &Path, node: u64, round: u64) {
    let id = node * 10 + round;
    let sql: String = TABLES.iter().map(|t| format!("INSERT INTO {t} VALUES ({id}, 'node {node}');")).collect();
    sqlite3(dir, &format!("write-{node}-{round}"), db, &sql);
}

fn status_text(config: &Path) -> String {
    let out = Command::new(marmot_bin())
        .arg("-config")
        .arg(config)
        .args(["status", "--timeout", "5"])
        .env_remove("RUST_LOG")
        .output()
        .expect("run marmot status");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn nodes_replicate_only_the_tables_they_select() {
    require_tools();
    let dir = TestDir::new("selection");
    let server = NatsServer::standalone(dir.path(), "nats");
    let dbs: Vec<PathBuf> = (1..=2).map(|i| dir.join(format!("node-{i}.db"))).collect();
    for db in &dbs {
        create_db(db, SCHEMA);
    }
    let mut c1 = NodeConfig::new(1, &dbs[0]).with_urls(vec![server.url()]);
    c1.extra = "[replication]\ninclude = [\"shared\", \"metrics_*\"]\n".into();
    let mut c2 = NodeConfig::new(2, &dbs[1]).with_urls(vec![server.url()]);
    c2.extra = "[replication]\nexclude = [\"*_local\"]\n".into();
    let mut n1 = Node::start(dir.path(), &c1, &[]);
    let mut n2 = Node::start(dir.path(), &c2, &[]);
    n1.wait_replicating(DEADLINE);
    n2.wait_replicating(DEADLINE);

    write_all(dir.path(), &dbs[0], 1, 1);
    write_all(dir.path(), &dbs[1], 2, 1);
    wait_until("shared and metrics_a hold both nodes' rows on both nodes", DEADLINE, || {
        dbs.iter().all(|db| ids(db, "shared") == "11,21" && ids(db, "metrics_a") == "11,21")
    });
    // A marker written after, in a table both replicate, shows node 2's batch (which also
    // carried app_cache) was processed on node 1.
    sqlite3(dir.path(), "marker", &dbs[1], "INSERT INTO shared VALUES (99, 'marker');");
    wait_until("the marker reached node 1", DEADLINE, || ids(&dbs[0], "shared") == "11,21,99");
    assert_eq!(ids(&dbs[0], "app_cache"), "11", "node 1 does not replicate app_cache");
    assert_eq!(ids(&dbs[1], "app_cache"), "21", "node 1 never published its app_cache rows");
    assert_eq!(ids(&dbs[0], "audit_local"), "11");
    assert_eq!(ids(&dbs[1], "audit_local"), "21");
    for db in &dbs {
        assert_eq!(query_i64(db, "SELECT count(*) FROM __marmot__parked"), 0, "nothing parked on {}", db.display());
    }
    let triggers = |db: &Path, table: &str| {
        query_i64(db, &format!("SELECT count(*) FROM sqlite_master WHERE type = 'trigger' AND tbl_name = '{table}'"))
    };
    assert_eq!(triggers(&dbs[0], "app_cache"), 0, "an excluded table gets no triggers");
    assert!(triggers(&dbs[1], "app_cache") > 0);
    let status = status_text(&dir.join("node-1.toml"));
    assert!(status.contains("table skipped: app_cache (excluded by [replication] include/exclude)"), "{status}");
    assert!(status.contains("rows from other nodes in tables not replicated here, passed over: 1"), "{status}");

    // Node 1 leaves tables out: its copies of them are not the cluster's, so it does not
    // save snapshots, and says why.
    n1.terminate(DEADLINE);
    let saved = Command::new(marmot_bin())
        .arg("-config")
        .arg(dir.join("node-1.toml"))
        .arg("-save-snapshot")
        .env_remove("RUST_LOG")
        .output()
        .expect("run marmot -save-snapshot");
    let out = format!("{}{}", String::from_utf8_lossy(&saved.stdout), String::from_utf8_lossy(&saved.stderr));
    assert!(!saved.status.success(), "a node that leaves tables out saved a snapshot:\n{out}");
    assert!(out.contains("does not replicate app_cache, audit_local"), "{out}");

    // Node 1 now replicates everything: capture is installed on app_cache and
    // audit_local, their rows are sent, and node 2 takes app_cache (it excludes the other).
    let mut c1 = c1.clone();
    c1.extra = String::new();
    drop(n1);
    let mut n1 = Node::start(dir.path(), &c1, &[]);
    n1.wait_replicating(DEADLINE);
    assert!(triggers(&dbs[0], "app_cache") > 0, "capture installed on the newly selected table");
    write_all(dir.path(), &dbs[0], 1, 2);
    wait_until("node 1's app_cache rows, old and new, reach node 2", DEADLINE, || {
        ids(&dbs[1], "app_cache") == "11,12,21"
    });
    wait_until("node 1's second round reaches node 2's shared table", DEADLINE, || {
        ids(&dbs[1], "shared") == "11,12,21,99"
    });
    assert_eq!(ids(&dbs[1], "audit_local"), "21", "node 2 still excludes audit_local");
    n1.assert_running();
    n2.assert_running();
}
