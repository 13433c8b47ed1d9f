//! A node that must restore finds the newest snapshot corrupt (bytes flipped) and the
//! next one truncated: both are refused (their checksums do not match their manifests),
//! with a warning naming them, and the third newest is restored; the node converges.

mod snapshot_common;

use std::time::Instant;

use marmot_tests::{create_db, require_tools, wait_converged, wait_until, NatsServer, Node, TestDir, DEADLINE};
use snapshot_common::{
    file_store_config, position, save_snapshot, snapshots_in, wait_stream_beyond, write_pairs, write_published_rounds,
    MAX_ENTRIES, SCHEMA,
};

fn name(path: &std::path::Path) -> String {
    path.file_name().expect("a file name").to_string_lossy().into_owned()
}

#[test]
fn corrupt_snapshot_is_refused_and_the_next_newest_is_used() {
    require_tools();
    let started = Instant::now();
    let dir = TestDir::new("snapshot-corrupt");
    let server = NatsServer::standalone(dir.path(), "nats");
    let store = dir.join("snapshots");
    let dbs: Vec<_> = (1..=2).map(|i| dir.join(format!("node-{i}.db"))).collect();
    for db in &dbs {
        create_db(db, SCHEMA);
    }
    let mut nodes: Vec<Node> = (1..=2u64)
        .map(|id| {
            Node::start(dir.path(), &file_store_config(id, &dbs[id as usize - 1], &server.url(), &store, 10), &[])
        })
        .collect();
    for node in &mut nodes {
        node.wait_replicating(DEADLINE);
    }
    write_pairs(&dbs[0], 1, 1, 5, 1000);
    wait_converged(&[&dbs[0], &dbs[1]], DEADLINE);
    assert!(nodes[1].terminate(DEADLINE).success());

    let at_stop = position(&dbs[0]);
    write_published_rounds(&dbs[0], 1, 1_000, 2 * MAX_ENTRIES as i64, 2, 1000);
    wait_stream_beyond(&dbs[0], at_stop);
    // Three snapshots of the same, final state; nothing is written after them.
    let config1 = dir.join("node-1.toml");
    let good = save_snapshot(dir.path(), &config1, &store);
    let truncated = save_snapshot(dir.path(), &config1, &store);
    let corrupt = save_snapshot(dir.path(), &config1, &store);
    assert_eq!(snapshots_in(&store).last(), Some(&corrupt), "the corrupt one is the newest");

    let mut bytes = std::fs::read(&corrupt).expect("read the newest snapshot");
    let (middle, end) = (bytes.len() / 2, bytes.len());
    for b in &mut bytes[middle..(middle + 16).min(end)] {
        *b ^= 0x5a;
    }
    std::fs::write(&corrupt, &bytes).expect("corrupt the newest snapshot");
    let len = std::fs::metadata(&truncated).expect("size").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&truncated)
        .and_then(|f| f.set_len(len / 2))
        .expect("truncate the second newest snapshot");

    nodes[1].restart();
    wait_until("node 2 restored a snapshot", DEADLINE, || {
        nodes[1].assert_running();
        nodes[1].log_since_start().contains("restored; replaying the streams")
    });
    let log = nodes[1].log_since_start();
    let refused: Vec<&str> = log.lines().filter(|l| l.contains("snapshot refused")).collect();
    println!("node 2 logged:\n{}", refused.join("\n"));
    assert_eq!(refused.len(), 2, "two snapshots refused:\n{log}");
    assert!(refused[0].contains(&name(&corrupt)) && refused[0].contains("checksum"), "{}", refused[0]);
    assert!(refused[1].contains(&name(&truncated)) && refused[1].contains("checksum"), "{}", refused[1]);
    let restored = log.lines().find(|l| l.contains("snapshot restored")).expect("a restored line");
    assert!(restored.contains(&name(&good)), "the third newest was restored: {restored}");
    nodes[1].wait_replicating(DEADLINE);
    wait_converged(&[&dbs[0], &dbs[1]], DEADLINE);
    write_pairs(&dbs[1], 2, 900_000, 2, 100);
    wait_converged(&[&dbs[0], &dbs[1]], DEADLINE);
    for node in &mut nodes {
        node.assert_running();
    }
    println!("test took {:?}", started.elapsed());
}
