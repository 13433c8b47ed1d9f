//! An application reads the database of a node while that node restores a snapshot into
//! it: every read succeeds (the reader has a busy timeout) and shows a whole database,
//! either before or after the restore. Writers insert pairs of rows `(k, -k)`, so every
//! consistent view has an even row count and a zero sum; the reader checks both on every
//! read, and an integrity check now and then.

mod snapshot_common;

use std::time::{Duration, Instant};

use marmot_tests::{
    create_db, require_tools, wait_converged, wait_until, Background, NatsServer, Node, TestDir, DEADLINE,
};
use snapshot_common::{
    file_store_config, position, rows, save_snapshot, wait_stream_beyond, write_pairs, write_published_rounds,
    MAX_ENTRIES, SCHEMA,
};

/// Reads `t` in a loop until the stop file appears; exits 1 on a broken invariant.
const READER: &str = r#"
import os, sqlite3, sys, time
db, stop, ready = sys.argv[1], sys.argv[2], sys.argv[3]
c = sqlite3.connect(db, timeout=30, isolation_level=None)
reads, seen, errors, checks = 0, [], 0, 0
started = time.time()
while True:
    last_round = os.path.exists(stop)
    try:
        n, s = c.execute("SELECT count(*), coalesce(sum(v), 0) FROM t").fetchone()
        if reads % 200 == 0:
            ok = c.execute("PRAGMA quick_check").fetchone()[0]
            checks += 1
            if ok != "ok":
                print("BROKEN: quick_check says", ok, flush=True)
                sys.exit(1)
    except sqlite3.Error as e:
        errors += 1
        print("ERROR:", e, flush=True)
        sys.exit(1)
    if n % 2 != 0 or s != 0:
        print("BROKEN: count", n, "sum", s, flush=True)
        sys.exit(1)
    reads += 1
    if not seen or seen[-1][0] != n:
        seen.append([n, 0])
    seen[-1][1] += 1
    if reads == 1:
        open(ready, "w").close()
    if last_round:
        break
print("reads", reads, "quick_checks", checks, "errors", errors, "seconds", round(time.time() - started, 2))
print("row counts seen in order, with the reads that saw each:", seen)
"#;

const ROUNDS_PER_NODE: i64 = 2 * MAX_ENTRIES as i64;
const PER_ROUND: i64 = 5;
/// Rows carry a few KiB so that the restore takes a while.
const BODY_BYTES: usize = 4096;

#[test]
fn application_reading_during_restore_never_sees_a_partial_database() {
    require_tools();
    let started = Instant::now();
    let dir = TestDir::new("snapshot-reader");
    let server = NatsServer::standalone(dir.path(), "nats");
    let store = dir.join("snapshots");
    let dbs: Vec<_> = (1..=2).map(|i| dir.join(format!("node-{i}.db"))).collect();
    for db in &dbs {
        create_db(db, SCHEMA);
    }
    let mut nodes: Vec<Node> = (1..=2u64)
        .map(|id| Node::start(dir.path(), &file_store_config(id, &dbs[id as usize - 1], &server.url(), &store, 3), &[]))
        .collect();
    for node in &mut nodes {
        node.wait_replicating(DEADLINE);
    }
    write_pairs(&dbs[0], 1, 1, 20, BODY_BYTES);
    wait_converged(&[&dbs[0], &dbs[1]], DEADLINE);
    let status = nodes[1].terminate(DEADLINE);
    assert!(status.success(), "node 2 stopped cleanly ({status})");
    let before = rows(&dbs[1]);

    let at_stop = position(&dbs[0]);
    write_published_rounds(&dbs[0], 1, 1_000, ROUNDS_PER_NODE, PER_ROUND, BODY_BYTES);
    wait_stream_beyond(&dbs[0], at_stop);
    save_snapshot(dir.path(), &dir.join("node-1.toml"), &store);
    let expected = rows(&dbs[0]);

    let (stop, ready) = (dir.join("reader.stop"), dir.join("reader.ready"));
    let mut reader = Background::python(
        dir.path(),
        "reader",
        READER,
        &[&dbs[1].to_string_lossy(), &stop.to_string_lossy(), &ready.to_string_lossy()],
    );
    wait_until("the reader is reading", DEADLINE, || {
        assert!(reader.is_running(), "the reader exited early:\n{}", reader.output());
        ready.exists()
    });
    let restart = Instant::now();
    nodes[1].restart();
    wait_until("node 2 restored a snapshot", DEADLINE, || {
        nodes[1].assert_running();
        assert!(reader.is_running(), "the reader failed during the restore:\n{}", reader.output());
        nodes[1].log_since_start().contains("restored; replaying the streams")
    });
    nodes[1].wait_replicating(DEADLINE);
    wait_converged(&[&dbs[0], &dbs[1]], DEADLINE);
    let converged = restart.elapsed();
    std::fs::write(&stop, b"").expect("stop the reader");
    reader.wait_success(Duration::from_secs(30));
    let output = reader.output();
    println!("node 2 restored and converged in {converged:?}; the reader said:\n{output}");
    assert!(!output.contains("BROKEN") && !output.contains("ERROR"), "{output}");
    let seen = output.lines().find(|l| l.starts_with("row counts seen")).expect("the reader's summary");
    assert!(seen.contains(&format!("[{before}, ")), "the reader saw the database before the restore: {seen}");
    assert!(seen.contains(&format!("[{expected}, ")), "the reader saw the converged database: {seen}");
    println!("test took {:?}", started.elapsed());
}
