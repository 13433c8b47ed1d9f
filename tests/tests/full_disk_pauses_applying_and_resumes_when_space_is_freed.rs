//! Issue #13, finding 1: with the database's file system full, `marmot` used to exit
//! (`committing a batch: database or disk is full`) and replication stopped both ways until
//! someone restarted it. Now it keeps running, says so once (log, `status`), retries with
//! backoff, and resumes by itself once space is freed; nothing is lost.
//!
//! The database lives on a small tmpfs that the test fills with a file, so it runs as root
//! (as CI does); without the right to mount, it fails saying so.

mod snapshot_common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use marmot_tests::{require_tools, wait_converged, wait_until, NatsServer, TestDir, DEADLINE};
use snapshot_common::{run_marmot, start_nodes_without_snapshots, write_pairs, SCHEMA};

/// A mounted tmpfs, unmounted on drop.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(at: &Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs and must run as root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallDisk(at.to_path_buf())
    }

    /// Fills the file system with `filler` until writes fail with "no space".
    fn fill(&self, filler: &Path) {
        let mut f = std::fs::File::create(filler).unwrap();
        let chunk = vec![7u8; 16 * 1024];
        loop {
            if let Err(e) = f.write_all(&chunk).and_then(|()| f.sync_all()) {
                assert_eq!(e.kind(), std::io::ErrorKind::StorageFull, "{e}");
                break;
            }
        }
        // Leftover bytes smaller than a chunk.
        let _ = f.write_all(&[7u8; 512]);
        let _ = f.sync_all();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn full_disk_pauses_applying_and_resumes_when_space_is_freed() {
    require_tools();
    let dir = TestDir::new("disk-full");
    let server = NatsServer::standalone(dir.path(), "nats");
    let disk = SmallDisk::mount(&dir.join("small"), "8m");
    let dbs = vec![dir.join("node-1.db"), dir.join("small").join("node-2.db")];
    let mut nodes = start_nodes_without_snapshots(dir.path(), &server.url(), &dbs, SCHEMA);
    write_pairs(&dbs[0], 1, 1, 5, 100);
    wait_converged(&[&dbs[0], &dbs[1]], DEADLINE);

    let filler = dir.join("small").join("filler");
    disk.fill(&filler);
    write_pairs(&dbs[0], 1, 1_000, 100, 8_000);
    wait_until("node 2 reports the full disk", DEADLINE, || {
        nodes[1].assert_running();
        nodes[1].log_since_start().contains("the database's disk is full")
    });
    let (_, status) = run_marmot(dir.path(), "status", &dir.join("node-2.toml"), &["status"], DEADLINE);
    assert!(status.contains("DISK FULL"), "{status}");
    // The old code exited in the second the disk filled; this one still runs after the
    // status command, and logged the condition once however often it retried.
    nodes[1].assert_running();
    assert_eq!(nodes[1].log_since_start().matches("the database's disk is full").count(), 1);

    std::fs::remove_file(&filler).unwrap();
    wait_converged(&[&dbs[0], &dbs[1]], DEADLINE);
    assert!(nodes[1].log_since_start().contains("applying resumed"));
    write_pairs(&dbs[1], 2, 900_000, 3, 100);
    wait_converged(&[&dbs[0], &dbs[1]], DEADLINE);
    for node in &mut nodes {
        assert!(node.terminate(DEADLINE).success());
    }
    drop(disk);
}
