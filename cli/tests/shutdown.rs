//! SIGTERM right after writes: marmot publishes what is pending, records its progress,
//! stops its embedded nats-server and exits 0; the rows are in the stream afterwards.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use support::{alive, capture_installed, children_named, insert_books, wait_until, NodeFiles, DEADLINE};

const ROWS: i64 = 300;

#[test]
fn sigterm_publishes_pending_rows_stops_the_embedded_server_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let a = NodeFiles::new(dir.path(), 1, None, false);
    let mut node = a.start();
    wait_until("capture to be installed", || capture_installed(&a.db), || a.log_text());
    let servers = children_named(node.pid(), "nats-server");
    assert_eq!(servers.len(), 1, "one embedded nats-server child: {servers:?}\n{}", a.log_text());

    // Many transactions, then SIGTERM at once: most are still pending when it arrives.
    for i in 0..ROWS / 10 {
        insert_books(&a.db, i * 10 + 1..i * 10 + 11);
    }
    node.terminate();
    let status = node.wait_exit();
    assert!(status.success(), "marmot exited with {status}\n{}", a.log_text());
    wait_until("the embedded nats-server to be gone", || !alive(servers[0]), || a.log_text());

    // Recorded as published in the database…
    let conn = rusqlite::Connection::open(&a.db).unwrap();
    let pending: i64 = conn.query_row("SELECT pending_changes FROM __marmot__replication", [], |r| r.get(0)).unwrap();
    assert_eq!(pending, 0, "changes left unpublished\n{}", a.log_text());

    // …and really in the stream: run the same server again on its store and read it back.
    let conf = a.dir.join("nats").join("marmot-node-1.conf");
    let mut server =
        Command::new("nats-server").arg("-c").arg(&conf).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let ids = read_ids_with_watch(&a, ROWS as usize);
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(ids.len(), ROWS as usize, "every row is in the stream");
    assert_eq!(ids.iter().min(), Some(&1));
    assert_eq!(ids.iter().max(), Some(&ROWS));
}

/// Runs `marmot watch --json` against the node's (restarted) embedded server until it
/// printed `want` distinct row ids.
fn read_ids_with_watch(node: &NodeFiles, want: usize) -> std::collections::BTreeSet<i64> {
    let mut watch = Command::new(env!("CARGO_BIN_EXE_marmot"))
        .arg("-config")
        .arg(&node.config)
        .args(["watch", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = watch.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut ids = std::collections::BTreeSet::new();
    let end = Instant::now() + DEADLINE;
    while ids.len() < want {
        let left = end.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        match rx.recv_timeout(left) {
            Ok(line) => {
                let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                ids.insert(v["key"]["id"].as_i64().unwrap());
            }
            Err(_) => break,
        }
    }
    let _ = watch.kill();
    let _ = watch.wait();
    ids
}
