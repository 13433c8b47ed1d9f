//! Snapshot files: a consistent, compressed copy of the database, and restoring one into
//! the live database.
//!
//! Save: `VACUUM INTO` a temporary file (a consistent copy that never blocks writers for
//! long), strip capture from the copy (triggers and this node's unpublished log; the clock
//! is raised to every version the copy holds), keep versions, set-aside rows and stream
//! positions, then zstd-compress while hashing.
//! Restore: verify the checksum while decompressing next to the database, then copy it
//! into the live database with SQLite's online backup API in one step, so connections
//! that hold the database open see either the old or the new content, never a mix.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};

use super::{quote, Db, PREFIX};
use crate::error::{Error, Result, SqlContext};
use crate::model::{Position, Shard};

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
    pub fn save_snapshot(&self, work_dir: &Path, out: &Path) -> Result<SnapshotFile> {
        let copy = work_dir.join(format!("{PREFIX}snapshot-{}.db", std::process::id()));
        let _ = std::fs::remove_file(&copy);
        let result = self.save_via(&copy, out);
        let _ = std::fs::remove_file(&copy);
        result
    }

    fn save_via(&self, copy: &Path, out: &Path) -> Result<SnapshotFile> {
        let target = copy.to_str().ok_or_else(|| Error::Database("work dir is not UTF-8".into()))?;
        self.conn.execute("VACUUM INTO ?1", [target]).ctx(|| "copying the database (VACUUM INTO)".into())?;
        let positions = strip_capture(copy)?;
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
        })
    }

    /// Replaces the database's content with the snapshot at `compressed` (checked against
    /// `checksum`), then re-installs capture. Other connections keep working and see the
    /// restored content once it is complete.
    pub fn restore_snapshot(&mut self, compressed: &Path, checksum: &str, progress: Progress<'_>) -> Result<()> {
        let dir = self.db_dir();
        let plain = dir.join(format!("{PREFIX}restore-{}.db", std::process::id()));
        let result = self.restore_via(compressed, checksum, &plain, progress);
        let _ = std::fs::remove_file(&plain);
        result
    }

    fn db_dir(&self) -> PathBuf {
        self.conn.path().map(Path::new).and_then(Path::parent).map(Path::to_owned).unwrap_or_else(std::env::temp_dir)
    }

    fn restore_via(&mut self, compressed: &Path, checksum: &str, plain: &Path, progress: Progress<'_>) -> Result<()> {
        let found = checksum_file(compressed)?;
        if found != checksum {
            return Err(Error::Corrupt(format!(
                "snapshot {} has checksum {found}, its manifest says {checksum}",
                compressed.display()
            )));
        }
        let total = std::fs::metadata(compressed).map_err(io("sizing the snapshot"))?.len();
        let src = File::open(compressed).map_err(io("opening the snapshot"))?;
        let counting = CountingReader { inner: src, done: 0, total, progress };
        let mut decoder = zstd::stream::read::Decoder::new(counting).map_err(io("reading the snapshot"))?;
        let mut out = BufWriter::new(File::create(plain).map_err(io("creating the restore file"))?);
        std::io::copy(&mut decoder, &mut out)
            .map_err(|e| Error::Corrupt(format!("decompressing the snapshot: {e}")))?;
        out.flush().map_err(io("writing the restore file"))?;
        drop(out);
        // The checksum already proved these are the bytes that were saved.
        let src = Connection::open_with_flags(plain, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .ctx(|| "opening the restored copy".into())?;
        {
            let backup =
                rusqlite::backup::Backup::new(&src, &mut self.conn).ctx(|| "starting the online backup".into())?;
            // One step: the destination changes in a single transaction, so readers never
            // see a half-restored database.
            backup.step(-1).ctx(|| "copying the snapshot into the database".into())?;
        }
        self.reinstall()
    }
}

struct CountingReader<'a, R: Read> {
    inner: R,
    done: u64,
    total: u64,
    progress: Progress<'a>,
}

impl<R: Read> Read for CountingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        (self.progress)(self.done, self.total);
        Ok(n)
    }
}

/// Removes capture from a copy: triggers, this node's log, parked entries; raises the clock
/// to every version the copy holds; resets the published point. Returns the positions.
fn strip_capture(copy: &Path) -> Result<Vec<(Shard, Position)>> {
    let conn = Connection::open(copy).ctx(|| "opening the copy".into())?;
    let triggers: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'trigger' AND substr(name, 1, 10) = ?1")
        .and_then(|mut s| s.query_map([PREFIX], |r| r.get(0))?.collect())
        .ctx(|| "listing triggers of the copy".into())?;
    for t in triggers {
        conn.execute_batch(&format!("DROP TRIGGER {}", quote(&t))).ctx(|| "dropping a trigger in the copy".into())?;
    }
    conn.execute_batch(
        "UPDATE __marmot__clock SET applying = 0, hlc = max(hlc, \
           coalesce((SELECT max(hlc) FROM __marmot__log), 0), \
           coalesce((SELECT max(hlc) FROM __marmot__versions), 0)); \
         DELETE FROM __marmot__log; DELETE FROM __marmot__parked; \
         UPDATE __marmot__state SET value = 0 WHERE key IN ('published_hlc', 'folded_hlc');",
    )
    .ctx(|| "stripping the copy".into())?;
    let positions = conn
        .prepare("SELECT shard, position FROM __marmot__positions ORDER BY shard")
        .and_then(|mut s| s.query_map([], |r| Ok((Shard(r.get(0)?), Position(r.get::<_, i64>(1)? as u64))))?.collect())
        .ctx(|| "reading positions of the copy".into())?;
    Ok(positions)
}
