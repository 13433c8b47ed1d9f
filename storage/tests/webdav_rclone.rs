//! The conformance suite against a real WebDAV server: `rclone serve webdav`
//! (`apt-get install -y rclone`), with basic authentication.

mod common;

use common::{free_port, require_binary, Server};
use marmot_core::testing::snapshot_store_conformance;
use marmot_storage::{open, StoreOptions};

const PASSWORD: &str = "dav-pass-w0rd";

fn start_webdav(served: &std::path::Path, logs: &std::path::Path) -> Server {
    let rclone = require_binary("rclone", "apt-get install -y rclone");
    let port = free_port();
    let args = [
        "serve",
        "webdav",
        &served.to_string_lossy(),
        "--addr",
        &format!("127.0.0.1:{port}"),
        "--user",
        "marmot",
        "--pass",
        PASSWORD,
        "--config",
        &logs.join("rclone.conf").to_string_lossy(),
    ]
    .map(String::from);
    Server::start(&rclone, &args, port, logs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webdav_passes_the_snapshot_store_conformance_suite() {
    let served = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let dav = start_webdav(served.path(), logs.path());
    let url = format!("http://127.0.0.1:{}/?dir=/marmot/snapshots&login=marmot&secret={PASSWORD}", dav.port);
    let store = open(StoreOptions::WebDav { url: url.clone() }).await.expect("open WebDAV");
    snapshot_store_conformance(store.clone()).await;

    let from = logs.path().join("source");
    std::fs::write(&from, b"on the server's disk").unwrap();
    store.put("node-1/0001.zst", &from).await.unwrap();
    let on_disk = served.path().join("marmot/snapshots/node-1/0001.zst");
    assert_eq!(std::fs::read(on_disk).unwrap(), b"on the server's disk", "dir= is honoured");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_webdav_password_is_a_final_error_without_the_password() {
    let served = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let dav = start_webdav(served.path(), logs.path());
    let wrong = "not-the-dav-password";
    let url = format!("http://127.0.0.1:{}/?dir=/s&login=marmot&secret={wrong}", dav.port);
    let store = open(StoreOptions::WebDav { url }).await.unwrap();
    let from = logs.path().join("source");
    std::fs::write(&from, b"x").unwrap();
    for e in [
        store.put("a.zst", &from).await.unwrap_err(),
        store.list().await.unwrap_err(),
        store.get("a.zst", &logs.path().join("out")).await.unwrap_err(),
    ] {
        let text = format!("{e} {e:?}");
        assert!(!text.contains(wrong), "the password never appears: {text}");
        assert!(!e.is_retryable(), "a refused password is not retryable: {e}");
    }
}

#[tokio::test]
async fn unreachable_webdav_server_is_a_retryable_error_without_the_password() {
    let url = format!("http://127.0.0.1:{}/?dir=/s&login=marmot&secret={PASSWORD}", free_port());
    let options = StoreOptions::WebDav { url };
    assert!(!format!("{options:?}").contains(PASSWORD), "Debug hides the password");
    let store = open(options).await.unwrap();
    let from = std::env::temp_dir().join(format!("marmot-webdav-src-{}", std::process::id()));
    std::fs::write(&from, b"x").unwrap();
    let put = store.put("a.zst", &from).await.unwrap_err();
    let list = store.list().await.unwrap_err();
    let _ = std::fs::remove_file(&from);
    for e in [put, list] {
        assert!(e.is_retryable(), "connection refused is retryable: {e}");
        assert!(!e.to_string().contains(PASSWORD), "{e}");
    }
}
