//! Snapshots in a [`SnapshotStore`]: save one with its manifest, keep the few that cover
//! the most, and restore the best one the streams can be replayed from.
//!
//! Each snapshot is two objects: `<stem>.db.zst` (the compressed database) and
//! `<stem>.json` (its [`Manifest`]), where the stem `marmot-snapshot-<ms>-<node>` sorts by
//! creation time. The manifest is written last, so a snapshot without a manifest is an
//! incomplete upload and is ignored. A snapshot whose bytes do not match its manifest's
//! checksum is refused and the next best is tried.
//!
//! A snapshot's worth is its *coverage*: the stream positions it has applied. Retention
//! keeps the `keep` snapshots that cover the most (a stale save by a node that had fallen
//! behind never pushes out a snapshot that covers more), and a restore takes the one that
//! covers the most among those the streams can still be replayed from.

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
    /// The epoch of each shard's log those positions belong to: `[shard, epoch]` pairs
    /// (absent in older manifests: unknown).
    #[serde(default)]
    pub epochs: Vec<(u32, u64)>,
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

    /// The epoch of the log `shard`'s position belongs to (0 when unknown).
    pub fn epoch(&self, shard: Shard) -> u64 {
        self.epochs.iter().find(|(s, _)| *s == shard.0).map_or(0, |(_, e)| *e)
    }

    /// Whether the streams, whose bounds are `bounds(shard)`, can be replayed from this
    /// snapshot's positions: each position belongs to the shard's current log and that log
    /// still holds the next entry. A snapshot of a log since deleted and created again is
    /// never usable: what the old log held after its positions is gone. (An epoch unknown
    /// on either side, as in manifests of older builds, is taken to match.)
    pub fn usable_with(&self, shards: u32, bounds: impl Fn(Shard) -> crate::Bounds) -> bool {
        (0..shards).map(Shard).all(|s| {
            let b = bounds(s);
            let (mine, theirs) = (self.epoch(s), b.epoch);
            (mine == 0 || theirs == 0 || mine == theirs) && b.can_resume_after(self.position(s))
        })
    }

    /// How much of the streams the snapshot has applied: first the logs its positions
    /// belong to (a log created later has a higher epoch: positions in a log since
    /// recreated are worth nothing), then its positions summed, then its creation time.
    /// Higher is better.
    pub fn coverage(&self) -> (u128, u64, u64) {
        let epochs = self.epochs.iter().map(|(_, e)| u128::from(*e)).sum();
        (epochs, self.positions.iter().map(|(_, p)| *p).sum(), self.created_ms)
    }
}

/// Sorts manifests best first: highest coverage, then newest.
fn by_coverage(manifests: &mut [Manifest]) {
    manifests.sort_by_key(|m| std::cmp::Reverse(m.coverage()));
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
    /// deletes snapshots beyond the `keep` that cover the most. Refused with
    /// [`Error::SnapshotUnpublished`] when the copy holds local changes `db` has not
    /// published yet.
    pub async fn save(&self, db: &Db, work_dir: &Path, now_ms: u64) -> Result<Manifest> {
        let saved = Snapshots::write_file(db, work_dir, now_ms)?;
        if let Err(e) = saved.check_published(db) {
            let _ = std::fs::remove_file(&saved.path);
            return Err(e);
        }
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
    /// Check [`SnapshotFile::check_published`](crate::sqlite::SnapshotFile::check_published)
    /// first.
    pub async fn upload_file(&self, node: NodeId, now_ms: u64, saved: crate::sqlite::SnapshotFile) -> Result<Manifest> {
        let result = self.upload(&stem(node, now_ms), node, now_ms, &saved).await;
        let _ = std::fs::remove_file(&saved.path);
        let manifest = result?;
        let work_dir = saved.path.parent().unwrap_or(Path::new("."));
        self.prune(work_dir).await?;
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
            epochs: saved.epochs.iter().map(|(s, e)| (s.0, *e)).collect(),
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

    /// Deletes every snapshot beyond the `keep` that cover the most.
    async fn prune(&self, work_dir: &Path) -> Result<()> {
        let mut manifests = self.list(work_dir).await?;
        by_coverage(&mut manifests);
        for m in manifests.iter().skip(self.keep) {
            let stem = m.object.strip_suffix(".db.zst").unwrap_or(&m.object);
            self.store.delete(&format!("{stem}.json")).await?;
            self.store.delete(&m.object).await?;
            info!(snapshot = %stem, positions = ?m.positions, "deleted a snapshot that covers less than the ones kept");
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

    /// Downloads and restores the snapshot that covers the most among those `usable` accepts
    /// (the streams can be replayed from its positions) and that verify; a corrupt or
    /// truncated one is refused with a warning and the next best is tried.
    /// [`Error::NotFound`] when no snapshot is usable.
    pub async fn restore_best(
        &self,
        db: &mut Db,
        work_dir: &Path,
        usable: &(dyn Fn(&Manifest) -> bool + Sync),
        progress: Progress<'_>,
    ) -> Result<Manifest> {
        let mut manifests = self.list(work_dir).await?;
        let stored = manifests.len();
        manifests.retain(|m| usable(m));
        by_coverage(&mut manifests);
        if manifests.is_empty() {
            return Err(Error::NotFound(match stored {
                0 => "no snapshot in the store".into(),
                n => format!("none of the {n} stored snapshots covers what the streams no longer hold"),
            }));
        }
        let mut last_error = None;
        for m in manifests {
            match self.restore(db, work_dir, &m, progress).await {
                Ok(()) => {
                    info!(object = %m.object, node = m.node_id, positions = ?m.positions, "snapshot restored");
                    return Ok(m);
                }
                Err(e @ (Error::Corrupt(_) | Error::NotFound(_))) => {
                    warn!(object = %m.object, error = %e, "snapshot refused; trying the next best");
                    last_error = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_error.expect("at least one snapshot was tried"))
    }

    /// Like [`restore_best`](Self::restore_best) with every snapshot usable.
    pub async fn restore_newest(&self, db: &mut Db, work_dir: &Path, progress: Progress<'_>) -> Result<Manifest> {
        self.restore_best(db, work_dir, &|_| true, progress).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::MemoryStore as Memory;

    /// Stores a manifest (and a dummy object) saved at `ms` covering `position` on shard 0.
    fn put(store: &Memory, ms: u64, position: u64) {
        let stem = stem(NodeId(1), ms);
        let m = Manifest {
            format: MANIFEST_FORMAT,
            object: format!("{stem}.db.zst"),
            node_id: 1,
            created_ms: ms,
            positions: vec![(0, position)],
            epochs: Vec::new(),
            db_bytes: 0,
            compressed_bytes: 0,
            checksum: String::new(),
        };
        store.insert(&format!("{stem}.json"), serde_json::to_vec(&m).unwrap());
        store.insert(&m.object, Vec::new());
    }

    fn positions(list: &[Manifest]) -> Vec<u64> {
        list.iter().map(|m| m.position(Shard(0)).0).collect()
    }

    #[tokio::test]
    async fn retention_keeps_the_snapshots_that_cover_the_most_not_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Memory::default());
        // An up-to-date node saved at 368 and 400; a node that had fallen behind saved
        // three times at 15 afterwards (the incident in issue #13).
        put(&store, 1_000, 368);
        put(&store, 2_000, 400);
        for ms in [3_000, 4_000, 5_000] {
            put(&store, ms, 15);
        }
        let snapshots = Snapshots::new(store.clone(), 2);
        snapshots.prune(dir.path()).await.unwrap();
        let mut kept = snapshots.list(dir.path()).await.unwrap();
        by_coverage(&mut kept);
        assert_eq!(positions(&kept), [400, 368]);
        assert_eq!(store.len(), 4, "each deleted snapshot's object is deleted too");
    }

    #[tokio::test]
    async fn a_restore_considers_only_snapshots_the_streams_can_be_replayed_from() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Memory::default());
        put(&store, 1_000, 15);
        put(&store, 2_000, 20);
        let snapshots = Snapshots::new(store, 5);
        let db_path = dir.path().join("node.db");
        rusqlite::Connection::open(&db_path).unwrap().execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY)").unwrap();
        let mut db = Db::open(&db_path, NodeId(2), crate::sqlite::CaptureOptions::default()).unwrap();
        // The stream's first entry is 368: neither snapshot reaches it. Nothing is touched.
        let first_held = 368;
        let usable = move |m: &Manifest| m.position(Shard(0)).0 + 1 >= first_held;
        let err = snapshots.restore_best(&mut db, dir.path(), &usable, &mut |_, _| {}).await.unwrap_err();
        assert!(matches!(&err, Error::NotFound(s) if s.contains("none of the 2 stored snapshots covers")), "got {err}");
        let empty = Snapshots::new(Arc::new(Memory::default()), 5);
        let err = empty.restore_best(&mut db, dir.path(), &usable, &mut |_, _| {}).await.unwrap_err();
        assert!(matches!(&err, Error::NotFound(s) if s == "no snapshot in the store"), "got {err}");
    }
}
