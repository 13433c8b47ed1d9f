//! Snapshots in a [`SnapshotStore`]: save one with its manifest, keep the newest few, and
//! restore the newest valid one.
//!
//! Each snapshot is two objects: `<stem>.db.zst` (the compressed database) and
//! `<stem>.json` (its [`Manifest`]), where the stem `marmot-snapshot-<ms>-<node>` sorts by
//! creation time. The manifest is written last, so a snapshot without a manifest is an
//! incomplete upload and is ignored. A snapshot whose bytes do not match its manifest's
//! checksum is refused and the next newest is tried.

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::model::{NodeId, Position, Shard};
use crate::snapshot::SnapshotStore;
use crate::sqlite::{Db, Progress};

const STEM_PREFIX: &str = "marmot-snapshot-";
/// The manifest format this build writes and reads.
pub const MANIFEST_FORMAT: u32 = 1;

/// What describes a stored snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Manifest format version.
    pub format: u32,
    /// The object holding the compressed database.
    pub object: String,
    /// The node that saved it.
    pub node_id: u64,
    /// When it was saved, in milliseconds since the epoch.
    pub created_ms: u64,
    /// Stream positions the snapshot has applied: `[shard, position]` pairs.
    pub positions: Vec<(u32, u64)>,
    /// Size of the database.
    pub db_bytes: u64,
    /// Size of the compressed object.
    pub compressed_bytes: u64,
    /// `xxh3-128:<hex>` of the compressed object.
    pub checksum: String,
}

impl Manifest {
    /// The position the snapshot holds for `shard` (0 when absent).
    pub fn position(&self, shard: Shard) -> Position {
        Position(self.positions.iter().find(|(s, _)| *s == shard.0).map_or(0, |(_, p)| *p))
    }
}

fn stem(node: NodeId, now_ms: u64) -> String {
    format!("{STEM_PREFIX}{now_ms:016}-{node}")
}

/// Saves to and restores from one store.
pub struct Snapshots {
    store: Arc<dyn SnapshotStore>,
    keep: usize,
}

impl Snapshots {
    /// Snapshots in `store`, keeping the newest `keep` (at least 1).
    pub fn new(store: Arc<dyn SnapshotStore>, keep: usize) -> Snapshots {
        Snapshots { store, keep: keep.max(1) }
    }

    /// Saves `db` (using `work_dir` for temporary files), uploads it with its manifest and
    /// deletes snapshots beyond the newest `keep`.
    pub async fn save(&self, db: &Db, work_dir: &Path, now_ms: u64) -> Result<Manifest> {
        let saved = Snapshots::write_file(db, work_dir, now_ms)?;
        self.upload_file(db.node(), now_ms, saved).await
    }

    /// The blocking half of [`save`](Self::save): writes the compressed snapshot file of
    /// `db` into `work_dir`. Run it off the async threads; then [`upload_file`](Self::upload_file).
    pub fn write_file(db: &Db, work_dir: &Path, now_ms: u64) -> Result<crate::sqlite::SnapshotFile> {
        let file = work_dir.join(format!("{}.db.zst", stem(db.node(), now_ms)));
        let saved = db.save_snapshot(work_dir, &file);
        if saved.is_err() {
            let _ = std::fs::remove_file(&file);
        }
        saved
    }

    /// The async half of [`save`](Self::save): uploads a file from
    /// [`write_file`](Self::write_file) with its manifest, deletes it locally, prunes.
    pub async fn upload_file(&self, node: NodeId, now_ms: u64, saved: crate::sqlite::SnapshotFile) -> Result<Manifest> {
        let result = self.upload(&stem(node, now_ms), node, now_ms, &saved).await;
        let _ = std::fs::remove_file(&saved.path);
        let manifest = result?;
        self.prune().await?;
        Ok(manifest)
    }

    async fn upload(
        &self,
        stem: &str,
        node: NodeId,
        now_ms: u64,
        saved: &crate::sqlite::SnapshotFile,
    ) -> Result<Manifest> {
        let object = format!("{stem}.db.zst");
        self.store.put(&object, &saved.path).await?;
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            object,
            node_id: node.0,
            created_ms: now_ms,
            positions: saved.positions.iter().map(|(s, p)| (s.0, p.0)).collect(),
            db_bytes: saved.db_bytes,
            compressed_bytes: saved.compressed_bytes,
            checksum: saved.checksum.clone(),
        };
        let json = serde_json::to_vec_pretty(&manifest).expect("a manifest serializes");
        let tmp = saved.path.with_extension("json");
        std::fs::write(&tmp, json).map_err(|source| Error::Io { context: "writing a manifest".into(), source })?;
        let put = self.store.put(&format!("{stem}.json"), &tmp).await;
        let _ = std::fs::remove_file(&tmp);
        put?;
        info!(object = %manifest.object, db_bytes = manifest.db_bytes, compressed_bytes = manifest.compressed_bytes, "snapshot saved");
        Ok(manifest)
    }

    /// Manifests of complete snapshots, newest first. Unreadable manifests are skipped with
    /// a warning.
    pub async fn list(&self, work_dir: &Path) -> Result<Vec<Manifest>> {
        let mut stems: Vec<String> = self
            .store
            .list()
            .await?
            .into_iter()
            .filter_map(|o| o.name.strip_suffix(".json").map(str::to_owned))
            .filter(|n| n.rsplit('/').next().is_some_and(|b| b.starts_with(STEM_PREFIX)))
            .collect();
        stems.sort_by(|a, b| b.rsplit('/').next().cmp(&a.rsplit('/').next()));
        let mut out = Vec::new();
        for stem in stems {
            let tmp = work_dir.join(format!("{}.manifest", stem.replace('/', "_")));
            let got = self.store.get(&format!("{stem}.json"), &tmp).await;
            let parsed = got.and_then(|_| {
                let bytes =
                    std::fs::read(&tmp).map_err(|source| Error::Io { context: "reading a manifest".into(), source })?;
                serde_json::from_slice::<Manifest>(&bytes).map_err(|e| Error::Corrupt(format!("manifest {stem}: {e}")))
            });
            let _ = std::fs::remove_file(&tmp);
            match parsed {
                Ok(m) if m.format == MANIFEST_FORMAT => out.push(m),
                Ok(m) => {
                    warn!(manifest = %stem, format = m.format, "skipping a snapshot of an unknown manifest format")
                }
                Err(e) => warn!(manifest = %stem, error = %e, "skipping an unreadable snapshot manifest"),
            }
        }
        Ok(out)
    }

    async fn prune(&self) -> Result<()> {
        let objects = self.store.list().await?;
        let mut stems: Vec<&str> = objects
            .iter()
            .filter_map(|o| o.name.strip_suffix(".json"))
            .filter(|n| n.rsplit('/').next().is_some_and(|b| b.starts_with(STEM_PREFIX)))
            .collect();
        stems.sort_by(|a, b| b.rsplit('/').next().cmp(&a.rsplit('/').next()));
        for stem in stems.into_iter().skip(self.keep) {
            self.store.delete(&format!("{stem}.json")).await?;
            self.store.delete(&format!("{stem}.db.zst")).await?;
            info!(snapshot = %stem, "deleted an old snapshot");
        }
        Ok(())
    }

    /// Downloads and restores the snapshot `m` describes.
    pub async fn restore(&self, db: &mut Db, work_dir: &Path, m: &Manifest, progress: Progress<'_>) -> Result<()> {
        let file = work_dir.join(format!("{}.download", m.object.replace('/', "_")));
        let result = match self.store.get(&m.object, &file).await {
            Ok(()) => db.restore_snapshot(&file, &m.checksum, progress),
            Err(e) => Err(e),
        };
        let _ = std::fs::remove_file(&file);
        result
    }

    /// Downloads and restores the newest snapshot that verifies; a corrupt or truncated
    /// one is refused with a warning and the next newest is tried.
    pub async fn restore_newest(&self, db: &mut Db, work_dir: &Path, progress: Progress<'_>) -> Result<Manifest> {
        let manifests = self.list(work_dir).await?;
        if manifests.is_empty() {
            return Err(Error::NotFound("no snapshot in the store".into()));
        }
        let mut last_error = None;
        for m in manifests {
            match self.restore(db, work_dir, &m, progress).await {
                Ok(()) => {
                    info!(object = %m.object, node = m.node_id, "snapshot restored");
                    return Ok(m);
                }
                Err(e @ (Error::Corrupt(_) | Error::NotFound(_))) => {
                    warn!(object = %m.object, error = %e, "snapshot refused; trying the next newest");
                    last_error = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_error.expect("at least one snapshot was tried"))
    }
}
