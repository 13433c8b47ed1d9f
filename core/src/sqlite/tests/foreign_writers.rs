//! Capture of writes made by other SQLite libraries: the `sqlite3` command-line shell and
//! Python's `sqlite3` module, each with and without `PRAGMA trusted_schema=OFF`.
//!
//! The triggers run inside *their* SQLite, not Marmot's bundled one, so these catch trigger
//! SQL that a different (older, stricter) build rejects.

use std::process::Command;

use super::*;

/// The `sqlite3` shell found on `PATH`.
const SQLITE3_CLI: &str = "sqlite3";

/// Fails the test, saying how to install it, unless `program` runs from `PATH`.
fn require(program: &str, install: &str) {
    let runs = Command::new(program).arg("--version").output().is_ok_and(|o| o.status.success());
    assert!(runs, "this test runs `{program}`, which is not on PATH: {install}");
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("running {program}: {e}"));
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{program} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

fn write_with_cli(trusted_schema_off: bool) {
    require(SQLITE3_CLI, "apt-get install sqlite3");
    let mut n = node(1, T);
    let pragma = if trusted_schema_off { "PRAGMA trusted_schema=OFF;" } else { "" };
    let sql = format!(
        "{pragma} BEGIN; INSERT INTO t VALUES (1, 'cli', 1.5); INSERT INTO t VALUES (2, 'two', 2.5); \
         UPDATE t SET id = 3 WHERE id = 2; DELETE FROM t WHERE id = 1; COMMIT;"
    );
    run(SQLITE3_CLI, &[n.path.to_str().unwrap(), &sql]);
    let p = n.pending();
    assert_eq!(
        rows_of(&p.batch, "t"),
        vec![
            (Op::Delete, vec![int(2), NULL, NULL]),
            (Op::Upsert, vec![int(3), text("two"), real(2.5)]),
            (Op::Delete, vec![int(1), NULL, NULL]),
        ]
    );
    let v = hlcs(&p.batch);
    assert!(v.windows(2).all(|w| w[0] < w[1]), "versions increase in the CLI's transaction: {v:?}");
    assert!(v[0] >= Hlc::from_millis(now_ms() - 60_000), "the CLI computed a wall-clock version");
}

#[test]
fn writes_from_the_sqlite3_cli_are_captured() {
    write_with_cli(false);
}

#[test]
fn writes_from_the_sqlite3_cli_with_trusted_schema_off_are_captured() {
    write_with_cli(true);
}

const PYTHON_WRITER: &str = r#"
import sqlite3, sys
c = sqlite3.connect(sys.argv[1])
if sys.argv[2] == "off":
    c.execute("PRAGMA trusted_schema=OFF")
c.execute("INSERT INTO t VALUES (?, ?, ?)", (1, "py ü", 1.25))
c.executemany("INSERT INTO t VALUES (?, ?, ?)", [(2, "b", None), (3, "c", 3.0)])
c.execute("UPDATE t SET name = 'py2' WHERE id = 1")
c.execute("DELETE FROM t WHERE id = 3")
c.commit()
c.close()
"#;

fn write_with_python(trusted_schema_off: bool) {
    require("python3", "apt-get install python3");
    let mut n = node(1, T);
    let mode = if trusted_schema_off { "off" } else { "on" };
    run("python3", &["-c", PYTHON_WRITER, n.path.to_str().unwrap(), mode]);
    let p = n.pending();
    assert_eq!(
        rows_of(&p.batch, "t"),
        vec![
            (Op::Upsert, vec![int(2), text("b"), NULL]),
            (Op::Upsert, vec![int(1), text("py2"), real(1.25)]),
            (Op::Delete, vec![int(3), NULL, NULL]),
        ]
    );
    let v = hlcs(&p.batch);
    assert!(v.windows(2).all(|w| w[0] < w[1]), "versions increase in Python's transaction: {v:?}");
}

#[test]
fn writes_from_python_sqlite3_are_captured() {
    write_with_python(false);
}

#[test]
fn writes_from_python_sqlite3_with_trusted_schema_off_are_captured() {
    write_with_python(true);
}

#[test]
fn cli_write_to_a_row_applied_from_remote_is_captured_but_the_apply_is_not() {
    require(SQLITE3_CLI, "apt-get install sqlite3");
    let mut n = node(1, T);
    n.apply(&batch(2, "t", &T_COLS, &[0], vec![upsert(100, vec![int(1), text("remote"), NULL])]));
    // The CLI updates the applied row: that write is local and must be captured.
    run(SQLITE3_CLI, &[n.path.to_str().unwrap(), "PRAGMA trusted_schema=OFF; UPDATE t SET score = 9 WHERE id = 1;"]);
    let p = n.pending();
    assert_eq!(rows_of(&p.batch, "t"), vec![(Op::Upsert, vec![int(1), text("remote"), real(9.0)])]);
}
