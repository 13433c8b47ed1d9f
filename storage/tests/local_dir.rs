//! The conformance suite against a local directory, as a path and as a `file://` URL.

use marmot_core::testing::snapshot_store_conformance;
use marmot_storage::{open, StoreOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_directory_passes_the_snapshot_store_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    let location = dir.path().join("not/yet/created").to_string_lossy().into_owned();
    let store = open(StoreOptions::File { location }).await.expect("open a local directory");
    snapshot_store_conformance(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_url_passes_the_snapshot_store_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}/snapshots", dir.path().display());
    let store = open(StoreOptions::Url { url, options: vec![] }).await.expect("open a file URL");
    snapshot_store_conformance(store).await;
    assert!(dir.path().join("snapshots").is_dir(), "the URL's directory is used");
}

#[tokio::test]
async fn objects_are_plain_files_under_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    let location = format!("file://{}", dir.path().display());
    let store = open(StoreOptions::File { location }).await.unwrap();
    let from = dir.path().join("local-source");
    std::fs::write(&from, b"snapshot bytes").unwrap();
    store.put("snapshots/node-1/0001.zst", &from).await.unwrap();
    let stored = std::fs::read(dir.path().join("snapshots/node-1/0001.zst")).unwrap();
    assert_eq!(stored, b"snapshot bytes");
}
