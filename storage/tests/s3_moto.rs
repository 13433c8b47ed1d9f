//! The conformance suite against a real S3 API: `moto_server`
//! (`pip install 'moto[server]'`).

mod common;

use common::{free_port, require_binary, Server};
use marmot_core::testing::snapshot_store_conformance;
use marmot_storage::{open, S3Options, StoreOptions};

const SECRET: &str = "moto-secret-key-do-not-print";

fn start_moto(dir: &std::path::Path) -> Server {
    start_moto_with_env(dir, &[])
}

fn start_moto_with_env(dir: &std::path::Path, env: &[(&str, &str)]) -> Server {
    let moto = require_binary("moto_server", "pip install 'moto[server]'");
    let port = free_port();
    let args = ["-H", "127.0.0.1", "-p", &port.to_string()].map(String::from);
    Server::start_with_env(&moto, &args, env, port, dir)
}

async fn create_bucket(port: u16, bucket: &str) {
    let response = reqwest::Client::new()
        .put(format!("http://127.0.0.1:{port}/{bucket}"))
        .send()
        .await
        .expect("create the bucket");
    assert!(response.status().is_success(), "create bucket: {}", response.status());
}

fn s3_options(port: u16, bucket: &str, path: &str) -> S3Options {
    S3Options {
        endpoint: format!("127.0.0.1:{port}"),
        path: path.to_string(),
        bucket: bucket.to_string(),
        access_key: "AKIAMARMOTTEST".to_string(),
        secret: SECRET.to_string(),
        session_token: String::new(),
        use_ssl: false,
        region: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_with_a_key_prefix_passes_the_snapshot_store_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    let moto = start_moto(dir.path());
    create_bucket(moto.port, "marmot").await;
    let options = s3_options(moto.port, "marmot", "/cluster-a/snapshots/");
    assert!(!format!("{options:?}").contains(SECRET), "Debug hides the secret");
    let store = open(StoreOptions::S3(options)).await.expect("open S3");
    snapshot_store_conformance(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_url_form_passes_the_snapshot_store_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    let moto = start_moto(dir.path());
    create_bucket(moto.port, "by-url").await;
    let options = [
        ("aws_endpoint", format!("http://127.0.0.1:{}", moto.port)),
        ("aws_allow_http", "true".to_string()),
        ("aws_access_key_id", "AKIAMARMOTTEST".to_string()),
        ("aws_secret_access_key", SECRET.to_string()),
        ("aws_region", "us-east-1".to_string()),
    ]
    .map(|(k, v)| (k.to_string(), v))
    .to_vec();
    let url = "s3://by-url/prefix".to_string();
    let store = open(StoreOptions::Url { url, options }).await.expect("open an s3:// URL");
    snapshot_store_conformance(store).await;
}

#[tokio::test]
async fn unreachable_s3_endpoint_is_a_retryable_error_without_the_secret() {
    let port = free_port();
    let store = open(StoreOptions::S3(s3_options(port, "marmot", "x"))).await.unwrap();
    let e = store.list().await.expect_err("nothing listens there");
    assert!(e.is_retryable(), "connection refused is retryable: {e}");
    assert!(!e.to_string().contains(SECRET), "{e}");
    let e = store.get("a.zst", &std::env::temp_dir().join("marmot-unused")).await.unwrap_err();
    assert!(e.is_retryable(), "{e}");
}

#[tokio::test]
async fn missing_bucket_name_is_a_configuration_error() {
    let mut options = s3_options(9, "", "");
    options.bucket.clear();
    let e = open(StoreOptions::S3(options)).await.err().expect("no bucket");
    assert!(!e.is_retryable());
    assert!(e.to_string().contains("bucket"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_s3_credentials_are_a_final_error_without_the_secret() {
    let dir = tempfile::tempdir().unwrap();
    // moto checks credentials after this many unauthenticated requests (the bucket's).
    let moto = start_moto_with_env(dir.path(), &[("INITIAL_NO_AUTH_ACTION_COUNT", "1")]);
    create_bucket(moto.port, "guarded").await;
    let store = open(StoreOptions::S3(s3_options(moto.port, "guarded", "p"))).await.unwrap();
    let from = dir.path().join("source");
    std::fs::write(&from, b"x").unwrap();
    for e in [
        store.put("a.zst", &from).await.unwrap_err(),
        store.list().await.unwrap_err(),
        store.get("a.zst", &dir.path().join("out")).await.unwrap_err(),
    ] {
        let text = format!("{e} {e:?}");
        assert!(!text.contains(SECRET), "the secret never appears: {text}");
        assert!(!e.is_retryable(), "refused credentials are not retryable: {text}");
    }
}
