//! What an operator and an application see of a running node, with real components: a
//! `nats-server`, `marmot` node processes, and the `status`, `watch` and `wait`
//! subcommands of the binary under test.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use support::{capture_installed, count_books, insert_books, wait_until, Nats, NodeFiles, DEADLINE};

#[test]
fn metrics_move_with_writes_and_pending_returns_to_zero() {
    let dir = tempfile::tempdir().unwrap();
    let nats = Nats::start(dir.path());
    let a = NodeFiles::new(dir.path(), 1, Some(&nats.url), true);
    let b = NodeFiles::new(dir.path(), 2, Some(&nats.url), true);
    let _na = a.start();
    let _nb = b.start();
    let logs = || format!("node 1:\n{}\nnode 2:\n{}", a.log_text(), b.log_text());
    wait_until("both nodes to install capture", || capture_installed(&a.db) && capture_installed(&b.db), logs);
    wait_until("node 1 to report a NATS connection", || a.metric("marmot_nats_connected") == Some(1.0), logs);
    let published_before = a.metric("marmot_published").unwrap();

    insert_books(&a.db, 1..11);
    wait_until(
        "node 1 to count 10 published changes and none pending",
        || {
            let text = a.scrape().unwrap_or_default();
            support::metric_in(&text, "marmot_published") >= Some(published_before + 10.0)
                && support::metric_in(&text, "marmot_pending_publish") == Some(0.0)
                && support::metric_in(&text, "marmot_published_batches_total") >= Some(1.0)
        },
        || format!("{}\n{}", a.scrape().unwrap_or_default(), logs()),
    );
    wait_until("node 2 to apply the 10 rows", || count_books(&b.db) == 10, logs);
    wait_until(
        "node 2 to count applied rows, a lag observation and no entries behind",
        || {
            let text = b.scrape().unwrap_or_default();
            support::metric_in(&text, "marmot_applied_rows_total") == Some(10.0)
                && support::metric_in(&text, "marmot_replication_lag_seconds_count") >= Some(1.0)
                && support::metric_in(&text, "marmot_stream_lag_entries{node_id=\"2\",shard=\"0\"}") == Some(0.0)
                && support::metric_in(&text, "marmot_stream_last{node_id=\"2\",shard=\"0\"}") >= Some(1.0)
        },
        || format!("{}\n{}", b.scrape().unwrap_or_default(), logs()),
    );
    let text = b.scrape().unwrap();
    assert!(text.contains("# TYPE marmot_replication_lag_seconds histogram"), "{text}");
    assert!(text.contains("marmot_info{node_id=\"2\",version="), "{text}");
}

/// The JSON `status` prints, parsed.
fn status_json(node: &NodeFiles) -> serde_json::Value {
    let out = node.command(&["status", "--json", "--timeout", "5"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "status failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {stdout}"))
}

#[test]
fn status_json_shows_pending_changes_positions_and_skipped_tables() {
    let dir = tempfile::tempdir().unwrap();
    let nats = Nats::start(dir.path());
    let a = NodeFiles::new(dir.path(), 1, Some(&nats.url), false);
    {
        let conn = rusqlite::Connection::open(&a.db).unwrap();
        conn.execute_batch("CREATE TABLE notes (body TEXT);").unwrap();
    }
    let node = a.start();
    wait_until("capture to be installed", || capture_installed(&a.db), || a.log_text());
    insert_books(&a.db, 1..4);
    wait_until(
        "the first rows to be published",
        || status_json(&a)["pending_changes"] == 0 && status_json(&a)["published_hlc"].as_u64() > Some(0),
        || a.log_text(),
    );
    node.stop();

    // Written while marmot is stopped: captured, waiting for publication.
    insert_books(&a.db, 10..13);
    let s = status_json(&a);
    assert_eq!(s["node_id"], 1);
    assert_eq!(s["capture_installed"], true);
    assert_eq!(s["pending_changes"], 3, "{s:#}");
    assert_eq!(s["tables"], serde_json::json!(["books"]), "{s:#}");
    assert_eq!(s["skipped"][0]["name"], "notes", "{s:#}");
    assert!(s["skipped"][0]["reason"].as_str().unwrap().contains("PRIMARY KEY"), "{s:#}");
    assert_eq!(s["nats"]["reachable"], true, "{s:#}");
    assert_eq!(s["parked_batches"], 0);
    let shard = &s["shards"][0];
    assert_eq!(shard["stream"], "marmot-changes-0");
    assert!(shard["last"].as_u64() >= Some(1), "{s:#}");
    assert_eq!(
        shard["lag_entries"].as_u64(),
        Some(shard["last"].as_u64().unwrap() - shard["position"].as_u64().unwrap())
    );
    let text = a.command(&["status"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("local changes pending publication: 3"), "{text}");
    assert!(text.contains("table skipped: notes"), "{text}");

    let _node = a.start();
    wait_until(
        "the pending rows to be published after restart",
        || status_json(&a)["pending_changes"] == 0,
        || a.log_text(),
    );
}

#[test]
fn status_reports_unreachable_nats_without_failing() {
    let dir = tempfile::tempdir().unwrap();
    let port = support::free_port();
    let a = NodeFiles::new(dir.path(), 1, Some(&format!("nats://127.0.0.1:{port}")), false);
    let out = a.command(&["status", "--json", "--timeout", "0.5"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["capture_installed"], false);
    assert_eq!(s["nats"]["reachable"], false);
    assert!(s["nats"]["note"].as_str().unwrap().contains("not reachable"), "{s:#}");
    assert!(s["shards"][0]["last"].is_null());
}

#[test]
fn watch_json_prints_a_written_row() {
    let dir = tempfile::tempdir().unwrap();
    let nats = Nats::start(dir.path());
    let a = NodeFiles::new(dir.path(), 1, Some(&nats.url), false);
    let _node = a.start();
    wait_until("capture to be installed", || capture_installed(&a.db), || a.log_text());
    let mut watch = Command::new(env!("CARGO_BIN_EXE_marmot"))
        .arg("-config")
        .arg(&a.config)
        .args(["watch", "--json", "--table", "books"])
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
    {
        let conn = rusqlite::Connection::open(&a.db).unwrap();
        conn.execute("INSERT INTO books (id, title, year) VALUES (42, 'Pride and Prejudice', 1813)", []).unwrap();
    }
    let end = Instant::now() + DEADLINE;
    let mut seen = Vec::new();
    let row = loop {
        let left = end.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.max(Duration::from_millis(1))) {
            Ok(line) => {
                let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
                if v["key"]["id"] == 42 {
                    break v;
                }
                seen.push(line);
            }
            Err(_) => panic!("watch printed no row 42 (saw {seen:?})\n{}", a.log_text()),
        }
    };
    let _ = watch.kill();
    let _ = watch.wait();
    assert_eq!(row["table"], "books");
    assert_eq!(row["op"], "upsert");
    assert_eq!(row["origin"], 1);
    assert_eq!(row["values"]["title"], "Pride and Prejudice");
    assert_eq!(row["values"]["year"], 1813);
    assert!(row["hlc"].as_u64().unwrap() >> 16 == row["time_ms"].as_u64().unwrap());
}

#[test]
fn wait_returns_after_publish_and_fails_with_what_is_pending_when_nats_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let mut nats = Nats::start(dir.path());
    let a = NodeFiles::new(dir.path(), 1, Some(&nats.url), false);
    let _node = a.start();
    wait_until("capture to be installed", || capture_installed(&a.db), || a.log_text());
    insert_books(&a.db, 1..6);
    let out = a.command(&["wait", "--timeout", "30"]);
    assert!(out.status.success(), "wait failed: {}\n{}", String::from_utf8_lossy(&out.stderr), a.log_text());
    assert!(String::from_utf8_lossy(&out.stdout).contains("published through"));
    // The application's own check agrees.
    let conn = rusqlite::Connection::open(&a.db).unwrap();
    let (local, published, pending): (i64, i64, i64) = conn
        .query_row("SELECT last_local_hlc, published_hlc, pending_changes FROM __marmot__replication", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .unwrap();
    assert!(published >= local && pending == 0, "{local} {published} {pending}");

    nats.kill();
    insert_books(&a.db, 100..102);
    let started = Instant::now();
    let out = a.command(&["wait", "--timeout", "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("2 local change(s) still pending publication"), "{stderr}");
    assert!(started.elapsed() < DEADLINE);
}
