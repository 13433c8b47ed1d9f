//! Start-up faults (issue #13): a signal ends every wait at start at once; `connect_retries`
//! bounds the connection attempts at start as in Marmot v1; a second `marmot` on the same
//! database refuses at once, naming the process that runs.

mod support;

use std::time::{Duration, Instant};

use support::{alive, capture_installed, free_port, wait_until, NodeFiles};

/// A node whose NATS URL points at a port nobody listens on, with `nats_keys` added.
fn unreachable_node(dir: &std::path::Path, nats_keys: &str) -> NodeFiles {
    let url = format!("nats://127.0.0.1:{}", free_port());
    let node = NodeFiles::new(dir, 1, Some(&url), false);
    let mut text = std::fs::read_to_string(&node.config).unwrap();
    text.push_str(nats_keys);
    std::fs::write(&node.config, text).unwrap();
    node
}

#[test]
fn sigterm_while_nats_is_unreachable_at_start_ends_the_process_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let a = unreachable_node(dir.path(), "connect_retries = 0\nreconnect_wait_seconds = 1\n");
    let mut node = a.start();
    wait_until("a connection attempt to fail", || a.log_text().contains("cannot reach NATS yet"), || a.log_text());
    let sent = Instant::now();
    node.terminate();
    let status = node.wait_exit();
    let took = sent.elapsed();
    assert!(status.success(), "exit status {status}\n{}", a.log_text());
    // Before the fix the attempts went on until SIGKILL; a prompt stop is well under this.
    assert!(took < Duration::from_secs(10), "took {took:?} to stop\n{}", a.log_text());
}

#[test]
fn connect_retries_bounds_the_attempts_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let a = unreachable_node(dir.path(), "connect_retries = 2\nreconnect_wait_seconds = 1\n");
    let mut node = a.start();
    let status = node.wait_exit();
    assert!(!status.success(), "marmot ran on without NATS\n{}", a.log_text());
    let log = a.log_text();
    assert!(log.contains("after 3 attempts (nats.connect_retries = 2"), "{log}");
    assert_eq!(log.matches("cannot reach NATS yet; retrying").count(), 2, "{log}");
}

#[test]
fn a_second_marmot_on_the_same_database_refuses_at_once_naming_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let a = NodeFiles::new(dir.path(), 1, None, false);
    let first = a.start();
    wait_until("capture to be installed", || capture_installed(&a.db), || a.log_text());
    let second = a.command(&[]);
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "the second marmot ran\n{stderr}");
    let expected = format!("another marmot (PID {}) is already running on {}", first.pid(), a.db.display());
    assert!(stderr.contains(&expected), "expected {expected:?} in:\n{stderr}");
    assert!(!stderr.contains("address already in use"), "{stderr}");
    assert!(alive(first.pid()), "the first marmot must keep running\n{}", a.log_text());
    first.stop();
    // The lock dies with its holder: the database can be served again.
    let again = a.start();
    wait_until("the node to run again", || a.log_text().matches("replicating").count() >= 2, || a.log_text());
    again.stop();
}
