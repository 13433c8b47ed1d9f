//! Unit tests of the configuration: defaults, every kind of error, environment overrides.

use std::path::{Path, PathBuf};

use super::error::DatabaseProblem;
use super::load::{load_with_env, parse_str};
use super::*;

fn file() -> PathBuf {
    PathBuf::from("/etc/marmot/node.toml")
}

fn parse(text: &str) -> Result<Config, ConfigError> {
    parse_str(text, &file())
}

fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("node.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn make_db(dir: &Path, wal: bool) -> PathBuf {
    let path = dir.join("app.db");
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT);").unwrap();
    if wal {
        conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get::<_, String>(0)).unwrap();
    }
    path
}

#[test]
fn defaults_match_marmot_v1() {
    let c = Config::default();
    assert_eq!(c.db_path, std::env::temp_dir().join("marmot.db"));
    assert_ne!(c.node_id, 0);
    assert!(c.publish && c.replicate);
    assert_eq!(c.scan_max_changes, 512);
    assert_eq!(c.cleanup_interval_ms, 5000);
    assert_eq!((c.sleep_timeout(), c.polling_interval()), (None, None));
    assert!(c.snapshot.enabled);
    assert_eq!(c.snapshot.interval_ms, 0);
    assert_eq!(c.snapshot.store, SnapshotStoreKind::Nats);
    assert_eq!(c.snapshot.keep, 3);
    assert_eq!(c.snapshot.nats.replicas, 1);
    assert_eq!(c.snapshot.nats.bucket_or_default("marmot-changes"), "marmot-changes-snapshot-store");
    assert!(!c.snapshot.s3.use_ssl);
    let log = &c.replication_log;
    assert_eq!((log.shards, log.max_entries, log.replicas), (1, 1024, 1));
    assert!(log.compress && !log.update_existing);
    assert!(c.embedded_nats());
    assert_eq!(c.nats.subject_prefix, "marmot-change-log");
    assert_eq!(c.nats.stream_prefix, "marmot-changes");
    assert_eq!(c.nats.bind_address, ":-1");
    assert_eq!((c.nats.connect_retries, c.nats.reconnect_wait_seconds), (5, 2));
    assert_eq!(c.logging, LoggingConfig { verbose: false, format: LogFormat::Console });
    assert!(!c.prometheus.enable);
    assert_eq!(c.prometheus.bind, ":3010");
    assert_eq!(c.prometheus.namespace, "marmot");
}

#[test]
fn empty_file_gives_defaults() {
    assert_eq!(parse("").unwrap(), Config::default());
}

#[test]
fn default_node_id_is_stable_nonzero_and_fits_toml() {
    assert_eq!(default_node_id(), default_node_id());
    let id = node_id_from("0123456789abcdef");
    assert!(id >= 1 && id <= i64::MAX as u64);
}

#[test]
fn a_full_v1_file_parses() {
    let text = include_str!("../../../config.toml");
    let c = parse(text).expect("the documented config.toml parses");
    assert_eq!(c.nats.stream_prefix, "marmot-changes");
}

#[test]
fn replicas_below_one_mean_a_majority_of_shards_capped_at_five() {
    let rl = |shards, replicas| ReplicationLogConfig { shards, replicas, ..Default::default() };
    assert_eq!(rl(4, 0).effective_replicas(), 3);
    assert_eq!(rl(1, -1).effective_replicas(), 1);
    assert_eq!(rl(20, 0).effective_replicas(), 5);
    assert_eq!(rl(1, 9).effective_replicas(), 5);
    assert_eq!(rl(3, 2).effective_replicas(), 2);
}

#[test]
fn unknown_key_names_the_key_path_and_the_file() {
    let err = parse("node_id = 1\n[snapshot]\nfoo = 1\n").unwrap_err();
    assert!(matches!(err, ConfigError::UnknownKey { line: Some(3), .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("unknown key \"snapshot.foo\" in /etc/marmot/node.toml"), "{msg}");
    let err = parse("[nats]\nurl = \"nats://x\"\n").unwrap_err();
    assert!(err.to_string().contains("\"nats.url\""), "{err}");
    assert!(err.to_string().contains("urls"), "lists the accepted keys: {err}");
}

#[test]
fn wrong_type_names_key_file_and_line() {
    let err = parse("publish = true\n\n[replication_log]\nshards = \"four\"\n").unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ConfigError::InvalidValue { line: Some(4), .. }), "{err:?}");
    assert!(msg.contains("\"replication_log.shards\""), "{msg}");
    assert!(msg.contains("/etc/marmot/node.toml"), "{msg}");
    let err = parse("snapshot = { nats = { replicas = -1 } }").unwrap_err();
    assert_eq!(err.key(), Some("snapshot.nats.replicas"));
}

#[test]
fn bad_enum_values_are_refused_with_the_choices() {
    let err = parse("[logging]\nformat = \"xml\"\n").unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("\"logging.format\"") && msg.contains("json"), "{msg}");
    let err = parse("[snapshot]\nstore = \"ftp\"\n").unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("\"snapshot.store\"") && msg.contains("sftp"), "{msg}");
}

#[test]
fn syntax_error_names_the_file_and_line() {
    let err = parse("node_id = 1\nnats = [\n").unwrap_err();
    assert!(matches!(err, ConfigError::Syntax { .. }), "{err:?}");
    assert!(err.to_string().contains("/etc/marmot/node.toml"), "{err}");
}

#[test]
fn node_id_zero_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), "node_id = 0\n");
    let err = load_with_env(Some(&path), &[]).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("\"node_id\"") && msg.contains(&path.display().to_string()), "{msg}");
    let err = load_with_env(None, &vars(&[("MARMOT_NODE_ID", "0")])).unwrap_err();
    assert!(err.to_string().contains("MARMOT_NODE_ID"), "{err}");
}

#[test]
fn a_client_certificate_without_its_key_is_refused_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), "[nats]\ncert_file = \"/etc/marmot/client.pem\"\n");
    let msg = load_with_env(Some(&path), &[]).unwrap_err().to_string();
    assert!(msg.contains("\"nats.cert_file\"") && msg.contains("nats.key_file"), "{msg}");
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    let err = load_with_env(None, &vars(&[("MARMOT_NATS_KEY_FILE", "/k.pem")])).unwrap_err();
    assert_eq!(err.key(), Some("nats.key_file"), "{err}");
    assert!(err.to_string().contains("nats.cert_file"), "{err}");
    let both = write_config(dir.path(), "[nats]\ncert_file = \"/c.pem\"\nkey_file = \"/k.pem\"\n");
    assert!(load_with_env(Some(&both), &[]).is_ok(), "both set is fine (files are checked at start)");
}

#[test]
fn missing_file_is_a_read_error_naming_it() {
    let err = load_with_env(Some(Path::new("/nonexistent/node.toml")), &[]).unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }));
    assert!(err.to_string().contains("/nonexistent/node.toml"), "{err}");
}

#[test]
fn seq_map_path_is_accepted_with_a_notice() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), "node_id = 1\nseq_map_path = \"/tmp/seq-map.cbor\"\n");
    let loaded = load_with_env(Some(&path), &[]).unwrap();
    assert!(loaded.notices.iter().any(|n| n.contains("seq_map_path")), "{:?}", loaded.notices);
}

#[test]
fn env_overrides_apply_after_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), "node_id = 1\n[replication_log]\nshards = 2\n");
    let env = vars(&[
        ("MARMOT_NODE_ID", "3"),
        ("MARMOT_NATS_URLS", "nats://a:4222, nats://b:4222"),
        ("MARMOT_REPLICATION_LOG_SHARDS", "4"),
        ("MARMOT_SNAPSHOT_NATS_REPLICAS", "3"),
        ("MARMOT_LOGGING_FORMAT", "json"),
        ("MARMOT_PUBLISH", "false"),
        ("MARMOT_NATS_SERVER_PATH", "/opt/nats-server"),
        ("PATH", "/bin"),
    ]);
    let loaded = load_with_env(Some(&path), &env).unwrap();
    let c = &loaded.config;
    assert_eq!(c.node_id, 3);
    assert_eq!(c.nats.urls, vec!["nats://a:4222", "nats://b:4222"]);
    assert_eq!(c.replication_log.shards, 4);
    assert_eq!(c.snapshot.nats.replicas, 3);
    assert_eq!(c.logging.format, LogFormat::Json);
    assert!(!c.publish);
    assert_eq!(c.nats.server_path, Some(PathBuf::from("/opt/nats-server")));
    assert_eq!(loaded.origin("node_id"), Origin::Env("MARMOT_NODE_ID".into()));
    assert_eq!(loaded.origin("db_path"), Origin::File(path));
}

#[test]
fn env_type_errors_name_the_variable() {
    let cases = [
        ("MARMOT_NODE_ID", "three"),
        ("MARMOT_REPLICATION_LOG_COMPRESS", "maybe"),
        ("MARMOT_LOGGING_FORMAT", "xml"),
        ("MARMOT_SNAPSHOT_NATS_REPLICAS", "-2"),
    ];
    for (var, value) in cases {
        let err = load_with_env(None, &vars(&[(var, value)])).unwrap_err();
        assert!(err.to_string().contains(var), "{var}={value}: {err}");
    }
}

#[test]
fn unknown_marmot_variables_are_reported_not_fatal() {
    let loaded = load_with_env(None, &vars(&[("MARMOT_NODEID", "3"), ("MARMOT_CONFIG", "x")])).unwrap();
    assert_eq!(loaded.notices.len(), 1, "{:?}", loaded.notices);
    assert!(loaded.notices[0].contains("MARMOT_NODEID"));
}

#[test]
fn every_key_has_a_distinct_variable() {
    let keys = env::known_keys();
    let mut names: Vec<String> = keys.iter().map(|(k, _)| env::var_name(k)).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), keys.len());
    assert!(names.contains(&"MARMOT_REPLICATION_LOG_SHARDS".to_owned()));
    assert!(names.contains(&"MARMOT_SNAPSHOT_S3_USE_SSL".to_owned()));
}

fn validate_db(db: &Path) -> Result<(), ConfigError> {
    let dir = db.parent().unwrap();
    let text = format!("node_id = 1\ndb_path = {:?}\n", db.display().to_string());
    let path = write_config(dir, &text);
    load_with_env(Some(&path), &[]).unwrap().validate()
}

fn db_problem(err: ConfigError) -> DatabaseProblem {
    let msg = err.to_string();
    assert!(msg.contains("db_path") && msg.contains("node.toml"), "{msg}");
    match err {
        ConfigError::Database { problem, .. } => problem,
        other => panic!("expected a database error, got {other:?}"),
    }
}

#[test]
fn a_wal_database_validates() {
    let dir = tempfile::tempdir().unwrap();
    validate_db(&make_db(dir.path(), true)).unwrap();
}

#[test]
fn missing_empty_and_foreign_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.db");
    assert_eq!(db_problem(validate_db(&missing).unwrap_err()), DatabaseProblem::Missing);
    let empty = dir.path().join("empty.db");
    std::fs::write(&empty, b"").unwrap();
    assert_eq!(db_problem(validate_db(&empty).unwrap_err()), DatabaseProblem::Empty);
    let text = dir.path().join("notes.db");
    std::fs::write(&text, "just some text, not a database at all".repeat(10)).unwrap();
    assert_eq!(db_problem(validate_db(&text).unwrap_err()), DatabaseProblem::NotSqlite);
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    assert_eq!(db_problem(validate_db(&sub).unwrap_err()), DatabaseProblem::NotAFile);
}

#[test]
fn a_rollback_journal_database_is_refused_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let db = make_db(dir.path(), false);
    let err = validate_db(&db).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("PRAGMA journal_mode=WAL"), "{msg}");
    assert_eq!(db_problem(err), DatabaseProblem::NotWal);
}

#[test]
fn files_named_under_nats_must_exist() {
    let dir = tempfile::tempdir().unwrap();
    let db = make_db(dir.path(), true);
    let text = format!("node_id = 1\ndb_path = {:?}\n[nats]\nca_file = \"/nope/ca.pem\"\n", db.display().to_string());
    let path = write_config(dir.path(), &text);
    let err = load_with_env(Some(&path), &[]).unwrap().validate().unwrap_err();
    assert!(err.to_string().contains("\"nats.ca_file\""), "{err}");
}
