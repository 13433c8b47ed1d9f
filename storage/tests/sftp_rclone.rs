//! The conformance suite against a real SFTP server: `rclone serve sftp`
//! (`apt-get install -y rclone`; `ssh-keygen` from `openssh-client`), with a host key
//! generated here so that the test knows its fingerprint.

mod common;

use std::path::Path;

use common::{free_port, require_binary, run, Server};
use marmot_core::testing::snapshot_store_conformance;
use marmot_storage::{open, SftpOptions, StoreOptions};

const PASSWORD: &str = "sftp-pass-w0rd";

struct SftpServer {
    server: Server,
    /// `SHA256:…` of the server's host key.
    fingerprint: String,
    /// The `.pub` line of the server's host key.
    public_key: String,
}

fn host_key(dir: &Path, name: &str) -> (String, String) {
    require_binary("ssh-keygen", "apt-get install -y openssh-client");
    let key = dir.join(name);
    run("ssh-keygen", &["-q", "-t", "ed25519", "-N", "", "-f", &key.to_string_lossy()]);
    let printed = run("ssh-keygen", &["-l", "-f", &key.to_string_lossy()]);
    let fingerprint = printed.split_whitespace().nth(1).expect("fingerprint").to_string();
    assert!(fingerprint.starts_with("SHA256:"), "{printed}");
    let public_key = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    (fingerprint, public_key.trim().to_string())
}

fn start_sftp(served: &Path, keys: &Path) -> SftpServer {
    let rclone = require_binary("rclone", "apt-get install -y rclone");
    let (fingerprint, public_key) = host_key(keys, "host_key");
    let port = free_port();
    let args = [
        "serve",
        "sftp",
        &served.to_string_lossy(),
        "--addr",
        &format!("127.0.0.1:{port}"),
        "--user",
        "marmot",
        "--pass",
        PASSWORD,
        "--key",
        &keys.join("host_key").to_string_lossy(),
        "--config",
        &keys.join("rclone.conf").to_string_lossy(),
    ]
    .map(String::from);
    SftpServer { server: Server::start(&rclone, &args, port, keys), fingerprint, public_key }
}

/// Opens the store, retrying while the server, listening already, still resets new
/// connections (rclone accepts before its SSH side is ready); up to 10 s.
async fn open_when_ready(
    opts: impl Fn() -> StoreOptions,
) -> marmot_core::Result<std::sync::Arc<dyn marmot_core::SnapshotStore>> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match open(opts()).await {
            Err(e) if e.is_retryable() && std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await
            }
            other => return other,
        }
    }
}

fn options(port: u16, password: &str, host_key: Option<String>) -> StoreOptions {
    let url = format!("sftp://marmot:{password}@127.0.0.1:{port}/marmot/snapshots");
    StoreOptions::Sftp(SftpOptions { url, host_key })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sftp_with_a_pinned_fingerprint_passes_the_snapshot_store_conformance_suite() {
    let served = tempfile::tempdir().unwrap();
    let keys = tempfile::tempdir().unwrap();
    let sftp = start_sftp(served.path(), keys.path());
    let store = open_when_ready(|| options(sftp.server.port, PASSWORD, Some(sftp.fingerprint.clone())))
        .await
        .expect("connect with the right fingerprint");
    snapshot_store_conformance(store.clone()).await;

    let from = keys.path().join("source");
    std::fs::write(&from, b"on the server's disk").unwrap();
    store.put("node-1/0001.zst", &from).await.unwrap();
    let on_disk = served.path().join("marmot/snapshots/node-1/0001.zst");
    assert_eq!(std::fs::read(on_disk).unwrap(), b"on the server's disk", "the URL path is used");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sftp_accepts_a_known_hosts_line() {
    let served = tempfile::tempdir().unwrap();
    let keys = tempfile::tempdir().unwrap();
    let sftp = start_sftp(served.path(), keys.path());
    let line = format!("[127.0.0.1]:{} {}", sftp.server.port, sftp.public_key);
    let store = open_when_ready(|| options(sftp.server.port, PASSWORD, Some(line.clone()))).await.expect("connect");
    let from = keys.path().join("source");
    std::fs::write(&from, b"known hosts").unwrap();
    store.put("a.zst", &from).await.unwrap();
    store.get("a.zst", &keys.path().join("back")).await.unwrap();
    assert_eq!(std::fs::read(keys.path().join("back")).unwrap(), b"known hosts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sftp_refuses_a_server_whose_host_key_is_not_the_pinned_one() {
    let served = tempfile::tempdir().unwrap();
    let keys = tempfile::tempdir().unwrap();
    let sftp = start_sftp(served.path(), keys.path());
    let (other_fingerprint, other_key) = host_key(keys.path(), "other_key");
    for pinned in [other_fingerprint, format!("127.0.0.1 {other_key}")] {
        let e = open(options(sftp.server.port, PASSWORD, Some(pinned))).await.err().expect("refused");
        let text = e.to_string();
        assert!(text.contains("host key mismatch"), "{text}");
        assert!(text.contains(&sftp.fingerprint), "names the presented key: {text}");
        assert!(!text.contains(PASSWORD), "{text}");
        assert!(!e.is_retryable(), "a wrong host key is final: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sftp_without_a_host_key_setting_is_refused_before_connecting() {
    let e = open(options(free_port(), PASSWORD, None)).await.err().expect("refused");
    assert!(e.to_string().contains("snapshot.sftp.host_key is required"), "{e}");
    assert!(!e.to_string().contains(PASSWORD), "{e}");
    assert!(!e.is_retryable());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_sftp_password_is_a_final_error_without_the_password() {
    let served = tempfile::tempdir().unwrap();
    let keys = tempfile::tempdir().unwrap();
    let sftp = start_sftp(served.path(), keys.path());
    let wrong = "not-the-sftp-password";
    let opts = options(sftp.server.port, wrong, Some(sftp.fingerprint.clone()));
    assert!(!format!("{opts:?}").contains(wrong), "Debug hides the password");
    let e = open(opts).await.err().expect("refused");
    let text = format!("{e} {e:?}");
    assert!(text.contains("refused the password"), "{text}");
    assert!(!text.contains(wrong), "{text}");
    assert!(!e.is_retryable(), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_sftp_server_is_a_retryable_error() {
    let e = open(options(free_port(), PASSWORD, Some("SHA256:AAAA".into()))).await.err().expect("refused");
    assert!(e.is_retryable(), "connection refused is retryable: {e}");
    assert!(!e.to_string().contains(PASSWORD), "{e}");
}
