//! Snapshot stores that fail: an S3 endpoint nobody listens on, and an S3 server (moto,
//! with authentication on) that rejects the keys. The expected behaviour, from
//! `cli/src/run.rs`:
//!
//! - a node whose streams still hold what it needs does not touch the store at startup;
//!   each failing save (periodic, by entries or `snapshot.interval`) logs a warning
//!   naming the store and the cause, and replication goes on;
//! - `marmot -save-snapshot` exits with status 1 and the error;
//! - a node that must restore, and whose store rejects its keys, exits with status 1 and
//!   the error: wrong credentials are a configuration error. (An empty or unreachable
//!   store is waited for instead, as is an unreachable one, below.)
//!
//! Neither the secret key nor the access key appears in any output.

mod snapshot_common;

use std::net::TcpStream;
use std::path::Path;
use std::time::Instant;

use marmot_tests::{
    create_db, free_port, poll, require_tools, wait_converged, wait_until, Background, NatsServer, Node, NodeConfig,
    TestDir, DEADLINE,
};
use snapshot_common::{
    position, run_marmot, wait_stream_beyond, write_pairs, write_published_rounds, MAX_ENTRIES, SCHEMA,
};

const ACCESS_KEY: &str = "AKIDMARMOTE2ETEST";
const SECRET: &str = "s3cr3t-Do-Not-Print-9f8e7d6c5b4a";

/// moto's S3 server with authentication checked on every request: unknown keys fail.
const MOTO: &str = r#"
import os, sys
os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
from moto.server import main
main(["-H", "127.0.0.1", "-p", sys.argv[1]])
"#;

/// Node `id` with its snapshots in S3 at `endpoint`, saving every `interval_ms` (0: only
/// every max_entries / shards entries).
fn s3_config(id: u64, db: &Path, nats_url: &str, endpoint: &str, interval_ms: u64) -> NodeConfig {
    let mut config = NodeConfig::new(id, db).with_urls(vec![nats_url.to_owned()]);
    config.max_entries = MAX_ENTRIES;
    config.extra = format!(
        "\n[snapshot]\nenabled = true\ninterval = {interval_ms}\nstore = \"s3\"\n\n[snapshot.s3]\n\
         endpoint = \"{endpoint}\"\nbucket = \"marmot-e2e\"\npath = \"snapshots\"\n\
         access_key = \"{ACCESS_KEY}\"\nsecret = \"{SECRET}\"\nuse_ssl = false\n"
    );
    config
}

/// Runs `marmot -save-snapshot` on `config` until it fails for another reason than the
/// lease being held (node 1 saves often); returns its output.
fn failed_save(dir: &Path, config: &Path) -> String {
    let mut output = String::new();
    let done = poll(DEADLINE, || {
        let (ok, out) = run_marmot(dir, "save-snapshot", config, &["-save-snapshot"], DEADLINE);
        assert!(!ok, "-save-snapshot succeeded against a failing store:\n{out}");
        output = out;
        !output.contains("another node holds the snapshot lease")
    });
    assert!(done, "the lease stayed held:\n{output}");
    output
}

fn assert_no_secrets(what: &str, output: &str) {
    assert!(!output.contains(SECRET), "{what} shows the secret key:\n{output}");
    assert!(!output.contains(ACCESS_KEY), "{what} shows the access key:\n{output}");
}

#[test]
fn unreachable_store_and_wrong_credentials_give_clear_errors_without_secrets() {
    require_tools();
    let started = Instant::now();
    let dir = TestDir::new("snapshot-store-errors");
    let server = NatsServer::standalone(dir.path(), "nats");
    let closed = format!("127.0.0.1:{}", free_port());
    let moto_port = free_port();
    let moto = format!("127.0.0.1:{moto_port}");
    let mut moto_server = Background::python(dir.path(), "moto", MOTO, &[&moto_port.to_string()]);
    wait_until("moto listens", DEADLINE, || {
        assert!(moto_server.is_running(), "moto exited:\n{}", moto_server.output());
        TcpStream::connect(&moto).is_ok()
    });

    let dbs: Vec<_> = (1..=2).map(|i| dir.join(format!("node-{i}.db"))).collect();
    for db in &dbs {
        create_db(db, SCHEMA);
    }
    // Node 1's store does not answer (it tries every second); node 2's rejects the keys.
    let mut nodes = vec![
        Node::start(dir.path(), &s3_config(1, &dbs[0], &server.url(), &closed, 1000), &[]),
        Node::start(dir.path(), &s3_config(2, &dbs[1], &server.url(), &moto, 0), &[]),
    ];
    for node in &mut nodes {
        node.wait_replicating(DEADLINE);
    }

    // Node 1's saves fail with a warning; replication goes on.
    write_pairs(&dbs[0], 1, 1, 5, 100);
    write_pairs(&dbs[1], 2, 1_000, 5, 100);
    wait_converged(&[&dbs[0], &dbs[1]], DEADLINE);
    wait_until("node 1 logs a failed save", DEADLINE, || {
        nodes[0].assert_running();
        nodes[0].log_since_start().contains("snapshot not saved; replication continues")
    });
    let log = nodes[0].log_since_start();
    let unreachable = log.lines().find(|l| l.contains("snapshot not saved")).expect("a warning");
    println!("node 1, unreachable store: {unreachable}");
    assert!(unreachable.contains(&closed) && unreachable.contains("marmot-e2e"), "names the store: {unreachable}");
    write_pairs(&dbs[0], 1, 2_000, 5, 100);
    write_pairs(&dbs[1], 2, 3_000, 5, 100);
    wait_converged(&[&dbs[0], &dbs[1]], DEADLINE);
    nodes[0].assert_running();
    nodes[1].assert_running();

    // A one-shot save with the wrong keys fails with status 1 and the server's answer.
    let output = failed_save(dir.path(), &dir.join("node-2.toml"));
    println!("node 2 -save-snapshot, wrong keys:\n{}", output.trim_end());
    assert!(
        output.contains(&moto) && output.contains("InvalidAccessKeyId"),
        "the error names the store and the cause:\n{output}"
    );
    assert_no_secrets("-save-snapshot", &output);

    // A node that must restore, and whose store rejects its keys, exits with status 1.
    assert!(nodes[1].terminate(DEADLINE).success());
    let at_stop = position(&dbs[1]);
    write_published_rounds(&dbs[0], 1, 10_000, 2 * MAX_ENTRIES as i64, 1, 100);
    wait_stream_beyond(&dbs[0], at_stop);
    let (ok, output) = run_marmot(dir.path(), "node-2-behind", &dir.join("node-2.toml"), &[], DEADLINE);
    println!("node 2, behind, wrong keys:\n{}", output.trim_end());
    assert!(!ok, "a node that cannot restore stops");
    assert!(
        output.contains("the stream no longer holds what this node missed") && output.contains("InvalidAccessKeyId"),
        "says why it needs a snapshot and why it has none:\n{output}"
    );
    assert_no_secrets("node 2 behind", &output);

    // The same node behind, with a store that does not answer: it waits (asking the cluster,
    // retrying with backoff) instead of exiting, and stops at once on SIGTERM.
    let mut waiting = Node::start(dir.path(), &s3_config(2, &dbs[1], &server.url(), &closed, 0), &[]);
    wait_until("node 2 waits for a reachable store", DEADLINE, || {
        waiting.assert_running();
        let log = waiting.log_since_start();
        log.contains("no usable snapshot exists yet") && log.contains(&closed)
    });
    assert!(waiting.terminate(DEADLINE).success());
    assert_no_secrets("node 2 waiting", &std::fs::read_to_string(waiting.log_path()).unwrap_or_default());

    nodes[0].assert_running();
    for (name, log) in [("node 1", nodes[0].log_path()), ("node 2", nodes[1].log_path())] {
        assert_no_secrets(name, &std::fs::read_to_string(log).unwrap_or_default());
    }
    println!("test took {:?}", started.elapsed());
}
