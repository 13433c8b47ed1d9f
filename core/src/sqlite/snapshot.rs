//! Snapshot files: a consistent, compressed copy of the database, and restoring one into
//! the live database.
//!
//! Save: `VACUUM INTO` a temporary file (a consistent copy that never blocks writers for
//! long), strip this node's capture state from the copy (its unpublished log; the clock
//! is raised to every version the copy holds), keep the capture triggers (so a node
//! restoring it captures its application's commits from the copy on), versions, set-aside
//! rows and stream positions, then zstd-compress while hashing.
//! Restore: verify the checksum, then copy it into the live database with SQLite's online
//! backup API in one step, reading the compressed file through [`stream_vfs`] (no plain
//! copy on disk), so connections that hold the database open see either the old or the
//! new content, never a mix.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};

use super::{get_state, stream_vfs, Db, PREFIX};
use crate::error::{Error, Result, SqlContext};
use crate::model::{Hlc, Position, Shard};

/// Buffer size for streaming copies.
const COPY_BUFFER_BYTES: usize = 256 * 1024;
const ZSTD_LEVEL: i32 = 3;

/// A compressed snapshot file and what describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotFile {
    /// The compressed file.
    pub path: PathBuf,
    /// Size of the uncompressed database.
    pub db_bytes: u64,
    /// Size of the compressed file.
    pub compressed_bytes: u64,
    /// `xxh3-128:<hex>` of the compressed file.
    pub checksum: String,
    /// Stream positions the copy has applied, per shard.
    pub positions: Vec<(Shard, Position)>,
    /// The epoch of each shard's log those positions belong to (0: not recorded).
    pub epochs: Vec<(Shard, u64)>,
    /// The highest local change in the copy that was not published when it was taken.
    /// Upload the file only once the node has published through it
    /// ([`SnapshotFile::check_published`]).
    pub unpublished: Option<Hlc>,
}

impl SnapshotFile {
    /// `Err(SnapshotUnpublished)` while `db` has not published every local change the
    /// copy holds.
    pub fn check_published(&self, db: &Db) -> Result<()> {
        match self.unpublished {
            Some(through) if db.published_hlc()? < through => Err(Error::SnapshotUnpublished(through)),
            _ => Ok(()),
        }
    }
}

/// Reports progress: (bytes done, bytes total).
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

/// Hashes everything written through it.
struct HashingWriter<W: Write> {
    inner: W,
    hasher: xxhash_rust::xxh3::Xxh3,
    bytes: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The checksum of a file, in the form stored in manifests.
pub fn checksum_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).map_err(io(format!("opening {}", path.display())))?;
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; COPY_BUFFER_BYTES];
    loop {
        let n = f.read(&mut buf).map_err(io("reading a snapshot"))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("xxh3-128:{:032x}", hasher.digest128()))
}

impl Db {
    /// Writes a compressed snapshot of the database to `out`, using `work_dir` for the
    /// temporary uncompressed copy.
    /// Refused with [`Error::PartialSelection`] on a node that leaves tables out.
    pub fn save_snapshot(&self, work_dir: &Path, out: &Path) -> Result<SnapshotFile> {
        let excluded = self.excluded_tables();
        if !excluded.is_empty() {
            return Err(Error::PartialSelection(excluded.join(", ")));
        }
        if self.restore_required()? {
            return Err(Error::RestoreRequired);
        }
        let copy = work_dir.join(format!("{PREFIX}snapshot-{}.db", std::process::id()));
        let _ = std::fs::remove_file(&copy);
        let result = self.save_via(&copy, out);
        let _ = std::fs::remove_file(&copy);
        result
    }

    fn save_via(&self, copy: &Path, out: &Path) -> Result<SnapshotFile> {
        let target = copy.to_str().ok_or_else(|| Error::Database("work dir is not UTF-8".into()))?;
        self.conn.execute("VACUUM INTO ?1", [target]).ctx(|| "copying the database (VACUUM INTO)".into())?;
        // A schema change this node has not noticed yet would reach nodes restored from
        // the copy without ever being published (and stay there if the application undid
        // it before this node noticed): save once it is noticed.
        let (unnoticed, unpublished) = {
            let conn = Connection::open(copy).ctx(|| "opening the copy".into())?;
            (super::ddl::unnoticed(&conn)?, unpublished_through(&conn)?)
        };
        if unnoticed {
            return Err(Error::SchemaChanged);
        }
        self.fold_copy(copy)?;
        let (positions, epochs) = strip_capture(copy, self.node)?;
        let db_bytes = std::fs::metadata(copy).map_err(io("sizing the copy"))?.len();
        let file = File::create(out).map_err(io(format!("creating {}", out.display())))?;
        let mut writer = HashingWriter { inner: BufWriter::new(file), hasher: Default::default(), bytes: 0 };
        let mut src = BufReader::with_capacity(COPY_BUFFER_BYTES, File::open(copy).map_err(io("reading the copy"))?);
        zstd::stream::copy_encode(&mut src, &mut writer, ZSTD_LEVEL).map_err(io("compressing the snapshot"))?;
        writer.flush().map_err(io("writing the snapshot"))?;
        writer.inner.get_ref().sync_all().map_err(io("syncing the snapshot"))?;
        Ok(SnapshotFile {
            path: out.to_owned(),
            db_bytes,
            compressed_bytes: writer.bytes,
            checksum: format!("xxh3-128:{:032x}", writer.hasher.digest128()),
            positions,
            epochs,
            unpublished,
        })
    }

    /// Folds the copy's unpublished local changes into its versions before its log is
    /// stripped: a node restored from it must know the versions of those rows (and their
    /// tombstones), or an older concurrent write would win there only.
    fn fold_copy(&self, copy: &Path) -> Result<()> {
        let mut db = Db::open(copy, self.node, self.opts.clone())?;
        db.refresh_if_schema_changed()?;
        let tx = db.immediate()?;
        db.fold_local(&tx)?;
        tx.commit().ctx(|| "folding the copy's log".into())
    }

    /// Replaces the database's content with the snapshot at `compressed` (checked against
    /// `checksum`), then re-installs capture. Other connections keep working and see the
    /// restored content once it is complete. `progress` reports database bytes copied.
    ///
    /// The snapshot is decompressed while it is copied (no plain copy is written), and the
    /// WAL checkpoint that moves the restored pages into the database file runs afterwards
    /// on a connection of its own ([`Db::finish_checkpoint`] waits for it): the restored
    /// content is committed, visible and crash-safe before that.
    pub fn restore_snapshot(&mut self, compressed: &Path, checksum: &str, progress: Progress<'_>) -> Result<()> {
        let found = checksum_file(compressed)?;
        if found != checksum {
            return Err(Error::Corrupt(format!(
                "snapshot {} has checksum {found}, its manifest says {checksum}",
                compressed.display()
            )));
        }
        self.finish_checkpoint()?;
        // The copy's clock may be behind this node's: this node's next writes must still be
        // versioned above every version it produced or applied before.
        let clock_before = self.clock()?;
        let source = stream_vfs::open(compressed, Some(progress))?;
        // The restore's own commits must not checkpoint a whole database's worth of WAL
        // in line: the background checkpoint below does it.
        let autocheckpoint: i64 = self
            .conn
            .query_row("PRAGMA wal_autocheckpoint", [], |r| r.get(0))
            .ctx(|| "reading wal_autocheckpoint".into())?;
        self.conn.execute_batch("PRAGMA wal_autocheckpoint = 0").ctx(|| "pausing WAL checkpoints".into())?;
        let copied = copy_all(&source.conn, &mut self.conn);
        drop(source);
        if let (Ok(()), Some(hook)) = (&copied, self.after_restore_copy.take()) {
            hook();
        }
        let reinstalled = copied.and_then(|()| {
            self.keep_clock_after_restore(clock_before)?;
            self.conn
                .execute("DELETE FROM __marmot__state WHERE key = 'restore_required'", [])
                .ctx(|| "clearing restore_required".into())?;
            self.checkpoint_in_background();
            self.reinstall()
        });
        self.conn
            .execute_batch(&format!("PRAGMA wal_autocheckpoint = {autocheckpoint}"))
            .ctx(|| "resuming WAL checkpoints".into())?;
        reinstalled
    }

    /// Raises the restored clock to `before`, this node's clock before the restore. The
    /// copy keeps its capture triggers, so the application's commits right after the copy
    /// are captured; the versions they got from the copy's clock are moved above `before`
    /// (nothing read them yet), so this node's versions keep increasing.
    fn keep_clock_after_restore(&mut self, before: Hlc) -> Result<()> {
        let tx = self.immediate()?;
        let low: Option<i64> =
            tx.query_row("SELECT min(hlc) FROM __marmot__log", [], |r| r.get(0)).ctx(|| "reading the log".into())?;
        if let Some(low) = low.filter(|&l| l as u64 <= before.0) {
            let shift = before.0 as i64 - low + 1;
            // Through negative keys, so that no shifted key meets one not shifted yet.
            tx.execute_batch(&format!(
                "UPDATE __marmot__log SET hlc = -hlc; UPDATE __marmot__log SET hlc = -hlc + {shift};"
            ))
            .ctx(|| "versioning changes committed during the restore".into())?;
        }
        tx.execute("UPDATE __marmot__clock SET hlc = max(hlc, ?1) WHERE id = 0", [before.0 as i64])
            .ctx(|| "keeping the clock after the restore".into())?;
        tx.commit().ctx(|| "committing the clock after the restore".into())
    }

    /// Sets a function the next restore runs right after its copy commits, before this
    /// node re-installs capture (for the simulation: an application commit there).
    pub fn after_restore_copy(&mut self, hook: Box<dyn FnOnce() + Send>) {
        self.after_restore_copy = Some(hook);
    }

    /// Starts a passive WAL checkpoint on a connection of its own, and waits until it is
    /// under way, so this connection's next commits find it running and do not start one.
    fn checkpoint_in_background(&mut self) {
        let Some(path) = self.conn.path().filter(|p| !p.is_empty()).map(PathBuf::from) else { return };
        let (started, running) = std::sync::mpsc::channel();
        self.checkpoint = Some(std::thread::spawn(move || {
            let conn = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_WRITE)
                .ctx(|| "opening a connection for the WAL checkpoint".into());
            let _ = started.send(());
            conn?
                .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                .ctx(|| "checkpointing the restored database".into())
        }));
        let _ = running.recv();
    }

    /// Waits for the WAL checkpoint a restore started, if one is still running.
    pub fn finish_checkpoint(&mut self) -> Result<()> {
        match self.checkpoint.take().map(std::thread::JoinHandle::join) {
            None => Ok(()),
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(Error::Database("the WAL checkpoint thread panicked".into())),
        }
    }
}

/// Copies `source` over `dest` in one backup step: the destination changes in a single
/// transaction, so readers never see a half-restored database.
fn copy_all(source: &Connection, dest: &mut Connection) -> Result<()> {
    use rusqlite::backup::{Backup, StepResult};
    let path = dest.path().map(PathBuf::from);
    let backup = Backup::new(source, dest).ctx(|| "starting the online backup".into())?;
    // The first step takes the database's write lock and keeps it until the copy ends: no
    // commit can happen from here on. A commit the application made before it and that is
    // not published yet would be erased by the copy: refuse, so it is published first.
    let first = backup.step(1).ctx(|| "copying the snapshot into the database".into())?;
    if matches!(first, StepResult::Busy | StepResult::Locked) {
        // No lock held: checking now would not keep a commit from slipping in before the copy.
        return Err(Error::Database(format!(
            "copying the snapshot into the database did not start ({first:?}): the database stayed busy; \
             it is unchanged"
        )));
    }
    if let Some(path) = path.filter(|_| first != StepResult::Done) {
        let pending = unpublished_changes(&path)?;
        if pending > 0 {
            return Err(Error::PendingChanges(pending));
        }
    }
    let result = match first {
        StepResult::Done => StepResult::Done,
        _ => backup.step(-1).ctx(|| "copying the snapshot into the database".into())?,
    };
    match result {
        StepResult::Done => Ok(()),
        other => Err(Error::Database(format!(
            "copying the snapshot into the database did not finish ({other:?}): the database stayed busy; \
             it is unchanged"
        ))),
    }
}

/// Local changes committed and not yet published, read on a connection of its own (which
/// sees every commit made before the restore took the write lock).
fn unpublished_changes(path: &Path) -> Result<u64> {
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .ctx(|| "opening the database to check for unpublished changes".into())?;
    conn.query_row(
        "SELECT count(*) FROM __marmot__log WHERE hlc > \
         (SELECT value FROM __marmot__state WHERE key = 'published_hlc')",
        [],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n as u64)
    .ctx(|| "counting unpublished changes".into())
}

/// Removes this node's capture state from a copy (its log; the triggers stay); raises the clock
/// to every version the copy holds; resets the published point. Returns the positions and
/// the epochs of the logs they belong to.
#[allow(clippy::type_complexity)]
/// The highest local change in `conn`'s log above its published version, if any.
fn unpublished_through(conn: &Connection) -> Result<Option<Hlc>> {
    let published = get_state(conn, "published_hlc")?;
    let max: Option<i64> = conn
        .query_row("SELECT max(hlc) FROM __marmot__log WHERE hlc > ?1", [published as i64], |r| r.get(0))
        .ctx(|| "reading the copy's unpublished changes".into())?;
    Ok(max.map(|h| Hlc(h as u64)))
}

/// Per shard: the stream positions a copy has applied, and their logs' epochs.
type CopyPositions = (Vec<(Shard, Position)>, Vec<(Shard, u64)>);

fn strip_capture(copy: &Path, saver: crate::model::NodeId) -> Result<CopyPositions> {
    let conn = Connection::open(copy).ctx(|| "opening the copy".into())?;
    // Which of the saver's own changes the copy holds: those it made on this database (after
    // its install or its last restore, up to the last it folded). They come back from the
    // stream (a node restoring its own snapshot replays them, another node reads them after
    // the copy's positions), and the conflict journal must not take them for new.
    let (lineage, folded) = (get_state(&conn, "lineage_hlc")?, get_state(&conn, "folded_hlc")?);
    super::conflicts::note_known(&conn, saver, lineage, folded)?;
    // The capture triggers stay: a node restoring the copy captures what its application
    // commits between the copy and re-installing capture.
    conn.execute_batch(
        "UPDATE __marmot__clock SET applying = 0, hlc = max(hlc, \
           coalesce((SELECT max(hlc) FROM __marmot__log), 0), \
           coalesce((SELECT max(hlc) FROM __marmot__versions), 0)); \
         DELETE FROM __marmot__log; \
         CREATE TABLE IF NOT EXISTS __marmot__ddl_out(id INTEGER PRIMARY KEY, hlc INTEGER NOT NULL, body BLOB NOT NULL); \
         DELETE FROM __marmot__ddl_out; \
         UPDATE __marmot__state SET value = 0 WHERE key IN ('published_hlc', 'folded_hlc'); \
         INSERT OR REPLACE INTO __marmot__state(key, value) VALUES ('capture_stripped', 1);",
    )
    .ctx(|| "stripping the copy".into())?;
    // Parked batches stay: they are remote changes the copy's positions have passed but its
    // tables do not hold yet; a node restored from it applies them once its schema fits.
    let positions = conn
        .prepare("SELECT shard, position FROM __marmot__positions ORDER BY shard")
        .and_then(|mut s| s.query_map([], |r| Ok((Shard(r.get(0)?), Position(r.get::<_, i64>(1)? as u64))))?.collect())
        .ctx(|| "reading positions of the copy".into())?;
    let epochs = conn
        .prepare(
            "SELECT CAST(substr(key, 7) AS INTEGER), value FROM __marmot__state WHERE key LIKE 'epoch.%' ORDER BY 1",
        )
        .and_then(|mut s| s.query_map([], |r| Ok((Shard(r.get(0)?), r.get::<_, i64>(1)? as u64)))?.collect())
        .ctx(|| "reading stream epochs of the copy".into())?;
    Ok((positions, epochs))
}
