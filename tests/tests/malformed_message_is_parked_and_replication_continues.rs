//! Garbage published on the change subject is parked (with its bytes and an error) and
//! replication carries on with the valid entries after it: no crash loop, no silent drop.

use std::time::Duration;

use marmot_tests::{
    create_db, open, query_i64, require_tools, wait_converged, wait_until, Background, NatsServer, Node, NodeConfig,
    TestDir, DEADLINE,
};

const SCHEMA: &str = "CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT NOT NULL);";

/// Bytes that are no Marmot entry: neither the `MR` magic nor CBOR.
const GARBAGE: &[u8] = b"\x00\xffthis is not a marmot batch\x01\x02\x03\xfe";

fn publish_garbage(url: &str, subject: &str) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");
    runtime.block_on(async {
        let client = async_nats::connect(url).await.expect("connect to nats-server");
        let js = async_nats::jetstream::new(client);
        let ack = js
            .publish(subject.to_owned(), GARBAGE.to_vec().into())
            .await
            .expect("publish garbage")
            .await
            .expect("JetStream acknowledges the garbage");
        assert_eq!(ack.stream, "marmot-changes-0", "the garbage landed in the change stream");
    });
}

#[test]
fn malformed_message_is_parked_and_replication_continues() {
    require_tools();
    let dir = TestDir::new("malformed");
    let server = NatsServer::standalone(dir.path(), "nats");
    let mut nodes: Vec<Node> = (1..=2)
        .map(|id| {
            let db = dir.join(format!("node-{id}.db"));
            create_db(&db, SCHEMA);
            Node::start(dir.path(), &NodeConfig::new(id, &db).with_urls(vec![server.url()]), &[])
        })
        .collect();
    for node in &mut nodes {
        node.wait_replicating(DEADLINE);
    }

    publish_garbage(&server.url(), "marmot-change-log-0");
    let mut writer = Background::sqlite3(
        dir.path(),
        "writer-1",
        nodes[0].db(),
        "INSERT INTO notes(id, body) VALUES (1, 'after the garbage');",
    );
    writer.wait_success(Duration::from_secs(30));

    let db2 = nodes[1].db().to_path_buf();
    wait_until("the valid write after the garbage reaches node 2", DEADLINE, || {
        query_i64(&db2, "SELECT count(*) FROM notes WHERE body = 'after the garbage'") == 1
    });

    let parked: Vec<(i64, String, Vec<u8>)> = {
        let conn = open(&db2);
        let mut stmt = conn.prepare("SELECT shard, error, bytes FROM __marmot__parked ORDER BY id").unwrap();
        let rows =
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).unwrap().collect::<Result<_, _>>().unwrap();
        rows
    };
    assert_eq!(parked.len(), 1, "exactly the garbage is parked on node 2: {parked:?}");
    let (shard, error, bytes) = &parked[0];
    assert_eq!(*shard, 0);
    assert_eq!(bytes.as_slice(), GARBAGE, "the parked row keeps the raw bytes");
    assert!(!error.trim().is_empty(), "the parked row says what is wrong");

    // Node 1 receives its own stream too: the garbage is parked there as well, once.
    let db1 = nodes[0].db().to_path_buf();
    wait_until("node 1 parks the garbage", DEADLINE, || query_i64(&db1, "SELECT count(*) FROM __marmot__parked") == 1);

    // Replication keeps going both ways after the parked entry, and nobody crashed.
    let mut writer = Background::python(
        dir.path(),
        "writer-2",
        "import sqlite3, sys\n\
         c = sqlite3.connect(sys.argv[1], timeout=10, isolation_level=None)\n\
         c.execute(\"INSERT INTO notes(id, body) VALUES (2, 'from node 2')\")\n",
        &[&db2.to_string_lossy()],
    );
    writer.wait_success(Duration::from_secs(30));
    wait_converged(&[&db1, &db2], DEADLINE);
    assert_eq!(query_i64(&db1, "SELECT count(*) FROM notes"), 2);
    for node in &mut nodes {
        node.assert_running();
        let parked_lines = node.log_since_start().matches("parked a batch").count();
        assert_eq!(parked_lines, 1, "{} logs the parked entry once", node.name());
    }
    assert_eq!(query_i64(&db2, "SELECT count(*) FROM __marmot__parked"), 1);
}
