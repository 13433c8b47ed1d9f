//! A node that must restore a snapshot (the streams dropped what it missed) never erases
//! what its application commits meanwhile. Node 2 comes back behind the streams with no
//! snapshot in the store yet, so it waits; its application keeps working: it wrote a row
//! while the side-car was down, writes more through the `sqlite3` CLI while the node
//! waits, and a Python writer keeps committing through the snapshot's save and the
//! restore. After the restore every one of those commits is on node 2 and on the other
//! two nodes. (Once, the restore copied the snapshot over the commits made during the
//! wait.)

mod snapshot_common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use marmot_tests::{
    create_db, open, query_i64, require_tools, sqlite3, wait_converged, wait_until, Background, NatsServer, Node,
    NodeConfig, TestDir, DEADLINE,
};
use snapshot_common::{
    file_store_config, position, rows, save_snapshot, snapshots_in, wait_stream_beyond, write_pairs,
    write_published_rounds, MAX_ENTRIES, SCHEMA,
};

/// Transactions the CLI commits on node 2 while it waits for a snapshot.
const WHILE_WAITING: i64 = 3;

/// Seconds the writer pauses between its commits: often enough that one usually lands
/// between node 2's last publish and its restore, which must then refuse and publish again.
const WRITER_PAUSE_S: &str = "0.02";

/// Commits a pair of rows (`k`, `-k`) every `argv[4]` seconds on the database `argv[1]`
/// until the file `argv[2]` exists, printing each pair's first id once committed.
const WRITER: &str = r#"
import os, sqlite3, sys, time
db, stop, first, pause = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
c = sqlite3.connect(db, timeout=30, isolation_level=None)
k = first
while not os.path.exists(stop):
    c.execute("BEGIN IMMEDIATE")
    c.execute("INSERT INTO t(id, node, v, body) VALUES (?, 2, ?, 'python'), (?, 2, ?, 'python')", (k, k, k + 1, -k))
    c.execute("COMMIT")
    print(k, flush=True)
    k += 2
    time.sleep(pause)
"#;

/// The `sqlite3` script for `n` pair transactions with ids from `first` on.
fn cli_pairs(first: i64, n: i64, body: &str) -> String {
    (0..n)
        .map(|i| {
            let k = first + 2 * i;
            format!(
                "BEGIN IMMEDIATE;\nINSERT INTO t(id, node, v, body) VALUES ({k}, 2, {k}, '{body}'), ({}, 2, {}, '{body}');\nCOMMIT;\n",
                k + 1,
                -k
            )
        })
        .collect()
}

#[test]
fn restore_never_erases_a_write_committed_while_waiting() {
    require_tools();
    let started = Instant::now();
    let dir = TestDir::new("restore-keeps-waiting-writes");
    let server = NatsServer::standalone(dir.path(), "nats");
    let store = dir.join("snapshots");
    let dbs: Vec<PathBuf> = (1..=3).map(|i| dir.join(format!("node-{i}.db"))).collect();
    for db in &dbs {
        create_db(db, SCHEMA);
    }
    // Nodes 1 and 3 save no snapshots on their own; node 2 restores from the store.
    let plain = |id: u64| {
        let mut config = NodeConfig::new(id, &dbs[id as usize - 1]).with_urls(vec![server.url()]);
        config.max_entries = MAX_ENTRIES;
        config
    };
    let mut nodes = vec![
        Node::start(dir.path(), &plain(1), &[]),
        Node::start(dir.path(), &file_store_config(2, &dbs[1], &server.url(), &store, 3), &[]),
        Node::start(dir.path(), &plain(3), &[]),
    ];
    for node in &mut nodes {
        node.wait_replicating(DEADLINE);
    }
    let all: Vec<&Path> = dbs.iter().map(PathBuf::as_path).collect();
    write_pairs(&dbs[0], 1, 1, 5, 100);
    wait_converged(&all, DEADLINE);

    assert!(nodes[1].terminate(DEADLINE).success(), "node 2 stopped cleanly");
    let at_stop = position(&dbs[0]);
    // The application on node 2 goes on while its side-car is down.
    sqlite3(dir.path(), "while-stopped", &dbs[1], &cli_pairs(700_000, 1, "while stopped"));
    write_published_rounds(&dbs[0], 1, 1_000, 2 * MAX_ENTRIES as i64, 2, 100);
    wait_stream_beyond(&dbs[0], at_stop);

    nodes[1].restart();
    wait_until("node 2 says it waits for a snapshot", DEADLINE, || {
        nodes[1].assert_running();
        nodes[1].log_since_start().contains("no usable snapshot exists yet")
    });
    assert!(snapshots_in(&store).is_empty(), "no snapshot yet");

    // While node 2 waits, its application commits, and keeps committing from here on.
    sqlite3(dir.path(), "while-waiting", &dbs[1], &cli_pairs(800_000, WHILE_WAITING, "while waiting"));
    let stop = dir.join("stop-writer");
    let mut writer = Background::python(
        dir.path(),
        "writer",
        WRITER,
        &[&dbs[1].to_string_lossy(), &stop.to_string_lossy(), "900000", WRITER_PAUSE_S],
    );
    wait_until("the writer committed", DEADLINE, || !writer.output().is_empty());
    assert!(writer.is_running(), "the writer runs: {}", writer.output());

    let saver = dir.join("node-1-saver.toml");
    std::fs::write(&saver, file_store_config(1, &dbs[0], &server.url(), &store, 3).to_toml()).expect("write a config");
    save_snapshot(dir.path(), &saver, &store);
    let restore = Instant::now();
    wait_until("node 2 restored the snapshot", DEADLINE, || {
        nodes[1].assert_running();
        nodes[1].log_since_start().contains("restored; replaying the streams")
    });
    nodes[1].wait_replicating(DEADLINE);
    println!("node 2 restored and replicates {:?} after the snapshot was saved", restore.elapsed());
    // A few more commits after the restore, then the writer stops.
    let committed_at_restore = writer.output().lines().count();
    wait_until("the writer committed after the restore", DEADLINE, || {
        writer.output().lines().count() >= committed_at_restore + 3
    });
    std::fs::write(&stop, b"").expect("stop the writer");
    writer.wait_success(Duration::from_secs(10));
    let written: Vec<i64> = writer.output().lines().map(|l| l.trim().parse().expect("an id")).collect();

    let dump = wait_converged(&all, DEADLINE);
    let expected_node_2 = 2 * (1 + WHILE_WAITING + written.len() as i64);
    for db in &dbs {
        let shown = db.display();
        assert_eq!(
            query_i64(db, "SELECT count(*) FROM t WHERE body = 'while stopped'"),
            2,
            "the commit made while node 2's side-car was down is on {shown}"
        );
        assert_eq!(
            query_i64(db, "SELECT count(*) FROM t WHERE body = 'while waiting'"),
            2 * WHILE_WAITING,
            "the commits made while node 2 waited for a snapshot are on {shown}"
        );
        let mut present: Vec<i64> = open(db)
            .prepare("SELECT id FROM t WHERE body = 'python' AND v > 0")
            .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
            .expect("read the writer's rows");
        present.sort_unstable();
        let missing: Vec<&i64> = written.iter().filter(|k| present.binary_search(k).is_err()).collect();
        assert!(missing.is_empty(), "the writer's commits {missing:?} are missing on {shown}");
        assert_eq!(present.len(), written.len(), "the writer's commits, no others, on {shown}");
        assert_eq!(
            query_i64(db, "SELECT count(*) FROM t WHERE body = 'python'"),
            2 * written.len() as i64,
            "both rows of each of the writer's commits on {shown}"
        );
        assert_eq!(query_i64(db, "SELECT count(*) FROM t WHERE node = 2"), expected_node_2, "on {shown}");
        assert_eq!(rows(db), 2 * (5 + 2 * 2 * MAX_ENTRIES as i64) + expected_node_2, "on {shown}");
        assert_eq!(query_i64(db, "SELECT sum(v) FROM t"), 0, "whole transactions only on {shown}");
        assert_eq!(query_i64(db, "SELECT count(*) FROM __marmot__parked"), 0, "nothing parked on {shown}");
    }
    println!("the writer committed {} transactions; every node has {} rows", written.len(), dump.lines().count() - 1);
    let log = nodes[1].log_since_start();
    assert!(log.contains("published local changes before restoring"), "node 2 published before restoring:\n{log}");
    println!(
        "node 2 refused to restore over a fresh commit {} time(s)",
        log.matches("publishing local changes committed meanwhile").count()
    );
    for line in log.lines().filter(|l| l.contains("restor") || l.contains("snapshot")) {
        println!("node 2: {line}");
    }
    for node in &mut nodes {
        node.assert_running();
    }
    println!("test took {:?}", started.elapsed());
}
