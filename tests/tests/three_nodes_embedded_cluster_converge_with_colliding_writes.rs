//! Three `marmot` nodes, each with its embedded `nats-server`, clustered through
//! `-cluster-addr`/`-cluster-peers` as in the Quick Start. On every node at once, the
//! `sqlite3` CLI and Python's `sqlite3` write colliding keys (INSERT OR REPLACE, UPDATE,
//! upsert, DELETE on a small key range) with values of every storage class; afterwards
//! all three databases hold exactly the same rows, and no transaction is lost.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use marmot_tests::{
    create_db, free_cluster_port, query_i64, require_tools, wait_converged, Background, Node, NodeConfig, TestDir,
    DEADLINE,
};

const NODES: u64 = 3;
/// Transactions per writer; each node runs two writers.
const TXNS: i64 = 150;
const KEYS: u64 = 10;

const SCHEMA: &str = "
CREATE TABLE kv(id INTEGER PRIMARY KEY, v, tag TEXT);
CREATE TABLE named(name TEXT PRIMARY KEY, v, n INTEGER NOT NULL);
CREATE TABLE marks(writer TEXT NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (writer, seq));
";

/// A small deterministic generator (xorshift64*), seeded per writer.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) % n
    }
}

/// An SQL literal of any storage class, extremes included.
fn sql_value(rng: &mut Rng) -> String {
    match rng.below(12) {
        0 => "NULL".into(),
        1 => "9223372036854775807".into(),
        2 => "-9223372036854775808".into(),
        3 => format!("{}", rng.below(1000) as i64 - 500),
        4 => "1.5e300".into(),
        5 => format!("{}.25", rng.below(100)),
        6 => "'ünïcødé ☃ ''quoted'''".into(),
        7 => "''".into(),
        8 => format!("'text {}'", rng.below(1000)),
        9 => "x''".into(),
        10 => "x'00ff7f80'".into(),
        _ => format!("x'{:08x}'", rng.below(u32::MAX as u64)),
    }
}

/// The `sqlite3` CLI writer's script: TXNS transactions of 1–3 colliding statements,
/// each also recording its own `marks` row.
fn cli_script(writer: &str, seed: u64) -> String {
    let mut rng = Rng(seed);
    let mut sql = String::new();
    for seq in 0..TXNS {
        sql.push_str("BEGIN IMMEDIATE;\n");
        for _ in 0..=rng.below(3) {
            let k = rng.below(KEYS) + 1;
            let v = sql_value(&mut rng);
            let _ = match rng.below(5) {
                0 | 1 => writeln!(sql, "INSERT OR REPLACE INTO kv(id, v, tag) VALUES ({k}, {v}, '{writer}');"),
                2 => writeln!(sql, "UPDATE kv SET v = {v}, tag = '{writer}' WHERE id = {k};"),
                3 => writeln!(
                    sql,
                    "INSERT INTO named(name, v, n) VALUES ('key-{k}', {v}, 1) \
                     ON CONFLICT(name) DO UPDATE SET v = excluded.v, n = n + 1;"
                ),
                _ => writeln!(sql, "DELETE FROM kv WHERE id = {k}; DELETE FROM named WHERE name = 'key-{k}';"),
            };
        }
        let _ = writeln!(sql, "INSERT INTO marks(writer, seq) VALUES ('{writer}', {seq});\nCOMMIT;");
    }
    sql
}

/// The Python writer: the same kinds of statements with bound parameters, including
/// values a literal cannot spell (-0.0, infinity, arbitrary bytes).
const PY_WRITER: &str = r#"
import random, sqlite3, sys, time
db, writer, txns, keys, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
rng = random.Random(seed)
values = [None, 0, -1, 2**63 - 1, -2**63, 0.0, -0.0, 1e-300, float("inf"), float("-inf"), 3.141592653589793,
          "", "plain", "ünïcødé ☃ 'quoted'", "a\nnew line", b"", bytes(range(256)), b"\x00"]
c = sqlite3.connect(db, timeout=30, isolation_level=None)
for seq in range(txns):
    c.execute("BEGIN IMMEDIATE")
    for _ in range(rng.randint(1, 3)):
        k, v, op = rng.randint(1, keys), rng.choice(values), rng.randrange(5)
        if op in (0, 1):
            c.execute("INSERT OR REPLACE INTO kv(id, v, tag) VALUES (?, ?, ?)", (k, v, writer))
        elif op == 2:
            c.execute("UPDATE kv SET v = ?, tag = ? WHERE id = ?", (v, writer, k))
        elif op == 3:
            c.execute("INSERT INTO named(name, v, n) VALUES (?, ?, 1) "
                      "ON CONFLICT(name) DO UPDATE SET v = excluded.v, n = n + 1", ("key-%d" % k, v))
        else:
            c.execute("DELETE FROM kv WHERE id = ?", (k,))
            c.execute("DELETE FROM named WHERE name = ?", ("key-%d" % k,))
    c.execute("INSERT INTO marks(writer, seq) VALUES (?, ?)", (writer, seq))
    c.execute("COMMIT")
    time.sleep(0.002)
"#;

#[test]
fn three_nodes_embedded_cluster_converge_with_colliding_writes() {
    require_tools();
    let dir = TestDir::new("embedded-cluster");
    let cluster_ports: Vec<u16> = (0..NODES).map(|_| free_cluster_port()).collect();
    let mut nodes: Vec<Node> = (1..=NODES)
        .map(|id| {
            let node_dir = dir.join(format!("node-{id}"));
            std::fs::create_dir(&node_dir).unwrap();
            let db = node_dir.join("app.db");
            create_db(&db, SCHEMA);
            let me = cluster_ports[id as usize - 1];
            let peers: Vec<String> =
                cluster_ports.iter().filter(|&&p| p != me).map(|p| format!("nats://127.0.0.1:{p}/")).collect();
            let args =
                ["-cluster-addr".to_owned(), format!("127.0.0.1:{me}"), "-cluster-peers".to_owned(), peers.join(",")];
            Node::start(&node_dir, &NodeConfig::new(id, &db), &args)
        })
        .collect();
    for node in &mut nodes {
        node.wait_replicating(DEADLINE);
    }
    let dbs: Vec<PathBuf> = nodes.iter().map(|n| n.db().to_path_buf()).collect();

    let mut writers = Vec::new();
    for (i, db) in dbs.iter().enumerate() {
        let id = i + 1;
        let cli = format!("cli-{id}");
        writers.push(Background::sqlite3(dir.path(), &cli, db, &cli_script(&cli, 0x9e37_79b9 * id as u64)));
        let py = format!("py-{id}");
        writers.push(Background::python(
            dir.path(),
            &py,
            PY_WRITER,
            &[&db.to_string_lossy(), &py, &TXNS.to_string(), &KEYS.to_string(), &id.to_string()],
        ));
    }
    for writer in &mut writers {
        writer.wait_success(Duration::from_secs(120));
    }

    let paths: Vec<&std::path::Path> = dbs.iter().map(PathBuf::as_path).collect();
    let dump = wait_converged(&paths, DEADLINE);
    let writers_total = 2 * NODES as i64;
    for db in &dbs {
        assert_eq!(
            query_i64(db, "SELECT count(*) FROM marks"),
            writers_total * TXNS,
            "every transaction of every writer reached {}",
            db.display()
        );
        assert_eq!(query_i64(db, "SELECT count(DISTINCT writer) FROM marks"), writers_total);
    }
    assert!(dump.contains("table kv ("), "{dump}");
    assert!(
        query_i64(&dbs[0], "SELECT count(*) FROM kv") + query_i64(&dbs[0], "SELECT count(*) FROM named") > 0,
        "the colliding keys end with some rows"
    );
    for node in &mut nodes {
        node.assert_running();
    }
    for db in &dbs {
        assert_eq!(query_i64(db, "SELECT count(*) FROM __marmot__parked"), 0, "nothing parked");
    }
}
