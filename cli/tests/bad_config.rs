//! Runs the built `marmot` binary with bad configurations and checks that each is refused
//! before anything starts: a one-line message naming the key and the file, exit status 2.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct Case {
    dir: tempfile::TempDir,
}

impl Case {
    fn new() -> Case {
        Case { dir: tempfile::tempdir().expect("temp dir") }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A WAL-mode database with one table.
    fn wal_db(&self) -> PathBuf {
        let path = self.path("app.db");
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY);").unwrap();
        conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get::<_, String>(0)).unwrap();
        path
    }

    /// Writes `node.toml`: `node_id = 1`, `db_path` = a valid database, then `extra`.
    fn config(&self, extra: &str) -> PathBuf {
        let db = self.wal_db();
        let text = format!("node_id = 1\ndb_path = {:?}\n{extra}", db.display().to_string());
        self.config_text(&text)
    }

    fn config_text(&self, text: &str) -> PathBuf {
        let path = self.path("node.toml");
        std::fs::write(&path, text).unwrap();
        path
    }
}

fn marmot(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_marmot"));
    cmd.args(args).env_clear();
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("marmot runs")
}

/// Asserts a configuration error (status 2) whose stderr names every one of `needles`.
fn assert_refused(out: &Output, needles: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains("configuration error"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "{needle:?} missing from: {stderr}");
    }
    stderr
}

fn run_with(config: &Path) -> Output {
    marmot(&["-config", config.to_str().unwrap()], &[])
}

#[test]
fn unknown_key_is_refused_naming_key_and_file() {
    let case = Case::new();
    let file = case.config("[snapshot]\nfoo = 1\n");
    let out = run_with(&file);
    assert_refused(&out, &["unknown key \"snapshot.foo\"", file.to_str().unwrap()]);
}

#[test]
fn wrong_type_is_refused_naming_key_file_and_line() {
    let case = Case::new();
    let file = case.config("[replication_log]\nshards = \"four\"\n");
    let out = run_with(&file);
    assert_refused(&out, &["\"replication_log.shards\"", file.to_str().unwrap(), "line 4"]);
}

#[test]
fn node_id_zero_is_refused() {
    let case = Case::new();
    let db = case.wal_db();
    let file = case.config_text(&format!("node_id = 0\ndb_path = {:?}\n", db.to_str().unwrap()));
    let out = run_with(&file);
    assert_refused(&out, &["\"node_id\"", file.to_str().unwrap()]);
}

#[test]
fn bad_enum_values_are_refused() {
    for (extra, key) in [
        ("[logging]\nformat = \"xml\"\n", "\"logging.format\""),
        ("[snapshot]\nstore = \"ftp\"\n", "\"snapshot.store\""),
    ] {
        let case = Case::new();
        let file = case.config(extra);
        assert_refused(&run_with(&file), &[key, file.to_str().unwrap()]);
    }
}

#[test]
fn toml_syntax_error_is_refused_naming_the_file() {
    let case = Case::new();
    let file = case.config_text("node_id = 1\n[nats\n");
    assert_refused(&run_with(&file), &[file.to_str().unwrap()]);
}

#[test]
fn missing_config_file_is_refused() {
    let case = Case::new();
    let file = case.path("absent.toml");
    assert_refused(&run_with(&file), &[file.to_str().unwrap()]);
}

#[test]
fn bad_databases_are_refused_naming_db_path_and_file() {
    let case = Case::new();
    let empty = case.path("empty.db");
    std::fs::write(&empty, b"").unwrap();
    let text = case.path("text.db");
    std::fs::write(&text, "not a database ".repeat(20)).unwrap();
    let journal = case.path("journal.db");
    rusqlite::Connection::open(&journal).unwrap().execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY);").unwrap();
    let cases = [
        (case.path("missing.db"), "does not exist"),
        (empty, "empty"),
        (text, "not a SQLite database"),
        (journal, "PRAGMA journal_mode=WAL"),
    ];
    for (db, problem) in cases {
        let file = case.config_text(&format!("node_id = 1\ndb_path = {:?}\n", db.to_str().unwrap()));
        let out = run_with(&file);
        assert_refused(&out, &["db_path", db.to_str().unwrap(), file.to_str().unwrap(), problem]);
    }
}

#[test]
fn bad_environment_override_is_refused_naming_the_variable() {
    let case = Case::new();
    let file = case.config("");
    let out = marmot(&["-config", file.to_str().unwrap()], &[("MARMOT_REPLICATION_LOG_SHARDS", "many")]);
    assert_refused(&out, &["MARMOT_REPLICATION_LOG_SHARDS", "replication_log.shards"]);
}

#[test]
fn go_style_command_line_reaches_the_configuration() {
    let case = Case::new();
    let file = case.config("[nats]\nurl = \"nats://x:4222\"\n");
    let out = marmot(
        &[
            "-config",
            file.to_str().unwrap(),
            "-cluster-addr",
            "127.0.0.1:4221",
            "-cluster-peers",
            "nats://127.0.0.1:4222/",
        ],
        &[],
    );
    assert_refused(&out, &["unknown key \"nats.url\"", file.to_str().unwrap()]);
    let equals = format!("--config={}", file.to_str().unwrap());
    assert_refused(&marmot(&[&equals], &[]), &["\"nats.url\""]);
}

#[test]
fn help_lists_the_flags_and_unknown_flags_fail() {
    let out = marmot(&["-help"], &[]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in ["--config", "--cleanup", "--save-snapshot", "--cluster-peers", "status"] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
    let out = marmot(&["-bogus"], &[]);
    assert!(!out.status.success());
}
