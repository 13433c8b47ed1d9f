//! A read-only SQLite VFS that presents a zstd-compressed database file as the plain
//! file, decompressing on a second thread while SQLite reads.
//!
//! A restore copies its source with the online backup API, which reads the source page
//! by page from the front to the back. Serving those reads straight from the compressed
//! snapshot means no decompressed copy is ever written to disk, and decompression runs
//! beside the copy instead of before it. Memory stays bounded: the first chunk (the
//! header, which SQLite re-reads) plus a few chunks in flight.
//!
//! Reads that go backwards (any other use of the source, such as a query) restart the
//! decompression from the beginning: correct, slow, and never needed by a backup.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::fs::File;
use std::io::Read;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Mutex, OnceLock};
use std::thread::JoinHandle;

use rusqlite::{ffi, Connection, OpenFlags};

use crate::error::{Error, Result};

const VFS_NAME: &CStr = c"marmot-zstd";
/// Size of the pieces handed from the decompressing thread to SQLite's reads.
const CHUNK_BYTES: usize = 1 << 20;
/// Chunks decompressed ahead of the reader.
const CHUNKS_AHEAD: usize = 4;
const HEADER: &[u8; 16] = b"SQLite format 3\0";

/// Progress callback, kept as a raw pointer while a source is open (see [`Source`]).
struct ProgressPtr(*mut (dyn FnMut(u64, u64) + 'static));
// SAFETY: the pointer is only dereferenced by SQLite's reads on the thread that opened
// the source and runs the backup; the registry merely carries it to `x_open`.
unsafe impl Send for ProgressPtr {}

struct Pending {
    path: PathBuf,
    progress: Option<ProgressPtr>,
}

/// Names this VFS may open, each waiting for its `x_open`.
fn pending() -> &'static Mutex<HashMap<String, Pending>> {
    static PENDING: OnceLock<Mutex<HashMap<String, Pending>>> = OnceLock::new();
    PENDING.get_or_init(Default::default)
}

/// A compressed database opened read-only through this VFS. The connection must not
/// outlive the progress callback, which the lifetime ties to it.
pub struct Source<'a> {
    /// The read-only connection.
    pub conn: Connection,
    _progress: PhantomData<&'a mut ()>,
}

/// Opens the zstd-compressed SQLite database at `compressed` as a read-only connection
/// whose reads decompress on the fly. `progress` is called with (database bytes read,
/// database size) as the reads advance.
pub fn open<'a>(compressed: &Path, progress: Option<&'a mut dyn FnMut(u64, u64)>) -> Result<Source<'a>> {
    register()?;
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = format!("marmot-zstd-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
    let progress = progress.map(|p| {
        let p: *mut (dyn FnMut(u64, u64) + 'a) = p;
        // SAFETY: only the lifetime is erased; `Source<'a>` keeps the borrow alive for as
        // long as the connection (the only user of the pointer) exists.
        ProgressPtr(unsafe {
            std::mem::transmute::<*mut (dyn FnMut(u64, u64) + 'a), *mut (dyn FnMut(u64, u64) + 'static)>(p)
        })
    });
    pending()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(name.clone(), Pending { path: compressed.into(), progress });
    let opened = Connection::open_with_flags_and_vfs(
        format!("file:{name}?immutable=1"),
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        VFS_NAME.to_str().expect("ASCII name"),
    );
    // Taken by `x_open` on success; removed here in every case.
    pending().lock().unwrap_or_else(|e| e.into_inner()).remove(&name);
    let conn = opened.map_err(|e| {
        Error::Corrupt(format!("snapshot {} is not a compressed SQLite database ({e})", compressed.display()))
    })?;
    Ok(Source { conn, _progress: PhantomData })
}

fn register() -> Result<()> {
    static REGISTERED: OnceLock<c_int> = OnceLock::new();
    let rc = *REGISTERED.get_or_init(|| {
        // SAFETY: the default VFS is a static object that lives for the whole process.
        let default = unsafe { ffi::sqlite3_vfs_find(ptr::null()) };
        if default.is_null() {
            return ffi::SQLITE_ERROR;
        }
        let vfs = Box::leak(Box::new(ffi::sqlite3_vfs {
            iVersion: 2,
            szOsFile: std::mem::size_of::<StreamFile>() as c_int,
            mxPathname: 512,
            pNext: ptr::null_mut(),
            zName: VFS_NAME.as_ptr(),
            pAppData: default.cast(),
            xOpen: Some(x_open),
            xDelete: Some(x_delete),
            xAccess: Some(x_access),
            xFullPathname: Some(x_full_pathname),
            xDlOpen: None,
            xDlError: None,
            xDlSym: None,
            xDlClose: None,
            xRandomness: Some(x_randomness),
            xSleep: Some(x_sleep),
            xCurrentTime: Some(x_current_time),
            xGetLastError: Some(x_get_last_error),
            xCurrentTimeInt64: Some(x_current_time_int64),
            xSetSystemCall: None,
            xGetSystemCall: None,
            xNextSystemCall: None,
        }));
        // SAFETY: `vfs` is leaked, so it outlives every connection that uses it.
        unsafe { ffi::sqlite3_vfs_register(vfs, 0) }
    });
    if rc == ffi::SQLITE_OK {
        Ok(())
    } else {
        Err(Error::Database(format!("registering the snapshot reader with SQLite failed (code {rc})")))
    }
}

/// SQLite's file object: its header first, then ours.
#[repr(C)]
struct StreamFile {
    base: ffi::sqlite3_file,
    stream: *mut Stream,
}

/// Decompressed content, front to back.
struct Stream {
    path: PathBuf,
    progress: Option<ProgressPtr>,
    chunks: Receiver<std::io::Result<Vec<u8>>>,
    worker: Option<JoinHandle<()>>,
    /// The first chunk, kept: SQLite reads the header again and again.
    first: Vec<u8>,
    /// The chunk after `first` that reads are in, and where it starts.
    current: Vec<u8>,
    current_start: u64,
    /// Size of the database, from its header.
    size: u64,
}

fn decompress(path: PathBuf) -> (Receiver<std::io::Result<Vec<u8>>>, JoinHandle<()>) {
    let (tx, rx) = sync_channel(CHUNKS_AHEAD);
    let worker = std::thread::spawn(move || {
        let run = || -> std::io::Result<()> {
            let mut decoder = zstd::stream::read::Decoder::new(File::open(&path)?)?;
            loop {
                let mut chunk = vec![0u8; CHUNK_BYTES];
                let mut filled = 0;
                while filled < CHUNK_BYTES {
                    match decoder.read(&mut chunk[filled..])? {
                        0 => break,
                        n => filled += n,
                    }
                }
                if filled == 0 {
                    return Ok(());
                }
                chunk.truncate(filled);
                if tx.send(Ok(chunk)).is_err() || filled < CHUNK_BYTES {
                    return Ok(());
                }
            }
        };
        if let Err(e) = run() {
            let _ = tx.send(Err(e));
        }
    });
    (rx, worker)
}

impl Stream {
    fn open(pending: Pending) -> std::io::Result<Stream> {
        let (chunks, worker) = decompress(pending.path.clone());
        let first = match chunks.recv() {
            Ok(chunk) => chunk?,
            Err(_) => Vec::new(),
        };
        if first.len() < 100 || &first[..16] != HEADER {
            return Err(std::io::Error::other("not a SQLite database"));
        }
        let page_size = match u16::from_be_bytes([first[16], first[17]]) {
            1 => 65536,
            n => u64::from(n),
        };
        let pages = u64::from(u32::from_be_bytes([first[28], first[29], first[30], first[31]]));
        let size = page_size * pages;
        if size == 0 {
            return Err(std::io::Error::other("the database header gives no size"));
        }
        let current_start = first.len() as u64;
        Ok(Stream {
            path: pending.path,
            progress: pending.progress,
            chunks,
            worker: Some(worker),
            first,
            current: Vec::new(),
            current_start,
            size,
        })
    }

    /// Moves `current` to the next chunk. Errors when the content ends early or cannot be
    /// decompressed.
    fn advance(&mut self) -> std::io::Result<()> {
        let next = self.current_start + self.current.len() as u64;
        let chunk = match self.chunks.recv() {
            Ok(chunk) => chunk?,
            Err(_) => return Err(std::io::Error::other("the snapshot ends before its database does")),
        };
        self.current_start = next;
        self.current = chunk;
        if let Some(ProgressPtr(progress)) = self.progress {
            // SAFETY: see `ProgressPtr`; reads run on the thread that holds the borrow.
            unsafe { (*progress)(next.min(self.size), self.size) };
        }
        Ok(())
    }

    /// Starts decompressing from the beginning again, for a read behind `current`.
    fn rewind(&mut self) -> std::io::Result<()> {
        #[cfg(test)]
        tests::REWINDS.fetch_add(1, Ordering::Relaxed);
        self.stop();
        let (chunks, worker) = decompress(self.path.clone());
        self.chunks = chunks;
        self.worker = Some(worker);
        self.chunks.recv().map_err(|_| std::io::Error::other("the snapshot went away"))??;
        self.current = Vec::new();
        self.current_start = self.first.len() as u64;
        Ok(())
    }

    fn stop(&mut self) {
        // Dropping the receiver makes the worker's next send fail, so it ends.
        let (_, dead) = sync_channel(0);
        drop(std::mem::replace(&mut self.chunks, dead));
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }

    /// Fills `buf` from `offset`. Returns whether the read went past the end (the rest of
    /// `buf` is then zeros, as SQLite expects).
    fn read(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<bool> {
        let mut done = 0;
        while done < buf.len() {
            let pos = offset + done as u64;
            if pos >= self.size {
                buf[done..].fill(0);
                return Ok(true);
            }
            let (start, chunk) = if pos < self.first.len() as u64 {
                (0, &self.first)
            } else {
                if pos < self.current_start {
                    self.rewind()?;
                }
                while pos >= self.current_start + self.current.len() as u64 {
                    self.advance()?;
                }
                (self.current_start, &self.current)
            };
            let from = (pos - start) as usize;
            let n = (chunk.len() - from).min(buf.len() - done).min((self.size - pos) as usize);
            buf[done..done + n].copy_from_slice(&chunk[from..from + n]);
            done += n;
        }
        Ok(false)
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.stop();
    }
}

static IO_METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 1,
    xClose: Some(x_close),
    xRead: Some(x_read),
    xWrite: Some(x_write),
    xTruncate: Some(x_truncate),
    xSync: Some(x_sync),
    xFileSize: Some(x_file_size),
    xLock: Some(x_lock),
    xUnlock: Some(x_lock),
    xCheckReservedLock: Some(x_check_reserved_lock),
    xFileControl: Some(x_file_control),
    xSectorSize: Some(x_sector_size),
    xDeviceCharacteristics: Some(x_device_characteristics),
    xShmMap: None,
    xShmLock: None,
    xShmBarrier: None,
    xShmUnmap: None,
    xFetch: None,
    xUnfetch: None,
};

unsafe extern "C" fn x_open(
    _vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    let file = file.cast::<StreamFile>();
    (*file).base.pMethods = ptr::null();
    (*file).stream = ptr::null_mut();
    if name.is_null() || flags & ffi::SQLITE_OPEN_MAIN_DB == 0 {
        return ffi::SQLITE_CANTOPEN;
    }
    let Ok(name) = CStr::from_ptr(name).to_str() else { return ffi::SQLITE_CANTOPEN };
    let Some(pending) = pending().lock().unwrap_or_else(|e| e.into_inner()).remove(name) else {
        return ffi::SQLITE_CANTOPEN;
    };
    let Ok(stream) = Stream::open(pending) else { return ffi::SQLITE_CANTOPEN };
    (*file).stream = Box::into_raw(Box::new(stream));
    (*file).base.pMethods = &IO_METHODS;
    if !out_flags.is_null() {
        *out_flags = ffi::SQLITE_OPEN_READONLY | ffi::SQLITE_OPEN_MAIN_DB;
    }
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_delete(_vfs: *mut ffi::sqlite3_vfs, _name: *const c_char, _sync_dir: c_int) -> c_int {
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_access(
    _vfs: *mut ffi::sqlite3_vfs,
    _name: *const c_char,
    _flags: c_int,
    out: *mut c_int,
) -> c_int {
    // No journal, no WAL: only the database itself exists.
    *out = 0;
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_full_pathname(
    _vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    n_out: c_int,
    out: *mut c_char,
) -> c_int {
    let bytes = CStr::from_ptr(name).to_bytes_with_nul();
    if bytes.len() > n_out.max(0) as usize {
        return ffi::SQLITE_CANTOPEN;
    }
    ptr::copy_nonoverlapping(bytes.as_ptr().cast::<c_char>(), out, bytes.len());
    ffi::SQLITE_OK
}

unsafe fn default_vfs(vfs: *mut ffi::sqlite3_vfs) -> *mut ffi::sqlite3_vfs {
    (*vfs).pAppData.cast()
}

unsafe extern "C" fn x_randomness(vfs: *mut ffi::sqlite3_vfs, n: c_int, out: *mut c_char) -> c_int {
    let d = default_vfs(vfs);
    (*d).xRandomness.map_or(0, |f| f(d, n, out))
}

unsafe extern "C" fn x_sleep(vfs: *mut ffi::sqlite3_vfs, micros: c_int) -> c_int {
    let d = default_vfs(vfs);
    (*d).xSleep.map_or(0, |f| f(d, micros))
}

unsafe extern "C" fn x_current_time(vfs: *mut ffi::sqlite3_vfs, out: *mut f64) -> c_int {
    let d = default_vfs(vfs);
    (*d).xCurrentTime.map_or(ffi::SQLITE_ERROR, |f| f(d, out))
}

unsafe extern "C" fn x_current_time_int64(vfs: *mut ffi::sqlite3_vfs, out: *mut ffi::sqlite3_int64) -> c_int {
    let d = default_vfs(vfs);
    (*d).xCurrentTimeInt64.map_or(ffi::SQLITE_ERROR, |f| f(d, out))
}

unsafe extern "C" fn x_get_last_error(_vfs: *mut ffi::sqlite3_vfs, _n: c_int, _out: *mut c_char) -> c_int {
    0
}

unsafe extern "C" fn x_close(file: *mut ffi::sqlite3_file) -> c_int {
    let file = file.cast::<StreamFile>();
    if !(*file).stream.is_null() {
        drop(Box::from_raw((*file).stream));
        (*file).stream = ptr::null_mut();
    }
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_read(file: *mut ffi::sqlite3_file, buf: *mut c_void, amount: c_int, offset: i64) -> c_int {
    let stream = &mut *(*file.cast::<StreamFile>()).stream;
    let buf = std::slice::from_raw_parts_mut(buf.cast::<u8>(), amount.max(0) as usize);
    match stream.read(buf, offset.max(0) as u64) {
        Ok(false) => ffi::SQLITE_OK,
        Ok(true) => ffi::SQLITE_IOERR_SHORT_READ,
        // A hard error (not a short read, which SQLite would fill with zeros): the backup
        // fails and its destination is left as it was.
        Err(_) => ffi::SQLITE_IOERR_READ,
    }
}

unsafe extern "C" fn x_write(_file: *mut ffi::sqlite3_file, _buf: *const c_void, _n: c_int, _off: i64) -> c_int {
    ffi::SQLITE_READONLY
}

unsafe extern "C" fn x_truncate(_file: *mut ffi::sqlite3_file, _size: i64) -> c_int {
    ffi::SQLITE_READONLY
}

unsafe extern "C" fn x_sync(_file: *mut ffi::sqlite3_file, _flags: c_int) -> c_int {
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_file_size(file: *mut ffi::sqlite3_file, size: *mut i64) -> c_int {
    *size = (*(*file.cast::<StreamFile>()).stream).size as i64;
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_lock(_file: *mut ffi::sqlite3_file, _level: c_int) -> c_int {
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_check_reserved_lock(_file: *mut ffi::sqlite3_file, out: *mut c_int) -> c_int {
    *out = 0;
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_file_control(_file: *mut ffi::sqlite3_file, _op: c_int, _arg: *mut c_void) -> c_int {
    ffi::SQLITE_NOTFOUND
}

unsafe extern "C" fn x_sector_size(_file: *mut ffi::sqlite3_file) -> c_int {
    4096
}

unsafe extern "C" fn x_device_characteristics(_file: *mut ffi::sqlite3_file) -> c_int {
    ffi::SQLITE_IOCAP_IMMUTABLE
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) static REWINDS: AtomicU64 = AtomicU64::new(0);

    fn sample_db(dir: &Path, rows: i64) -> PathBuf {
        let path = dir.join("plain.db");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB, s TEXT);").unwrap();
        conn.execute(
            "WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < ?1) \
             INSERT INTO t SELECT i, randomblob(300), hex(randomblob(200)) FROM c",
            [rows],
        )
        .unwrap();
        path
    }

    fn compress(plain: &Path, out: &Path) {
        let input = File::open(plain).unwrap();
        let output = File::create(out).unwrap();
        zstd::stream::copy_encode(input, output, 3).unwrap();
    }

    /// Row count and a hash of every row, in key order.
    fn digest(conn: &Connection) -> (u64, u128) {
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        let mut rows = 0;
        let mut stmt = conn.prepare("SELECT id, v, s FROM t ORDER BY id").unwrap();
        let mut cursor = stmt.query([]).unwrap();
        while let Some(row) = cursor.next().unwrap() {
            hasher.update(&row.get::<_, i64>(0).unwrap().to_le_bytes());
            hasher.update(&row.get::<_, Vec<u8>>(1).unwrap());
            hasher.update(row.get::<_, String>(2).unwrap().as_bytes());
            rows += 1;
        }
        (rows, hasher.digest128())
    }

    #[test]
    fn a_backup_from_the_compressed_file_equals_the_plain_file() {
        let dir = tempfile::tempdir().unwrap();
        // Several chunks' worth, so reads cross chunk boundaries.
        let plain = sample_db(dir.path(), 8_000);
        let zst = dir.path().join("plain.db.zst");
        compress(&plain, &zst);
        let mut calls = 0u64;
        let mut last = (0, 0);
        let mut progress = |done, total| {
            calls += 1;
            last = (done, total);
        };
        let source = open(&zst, Some(&mut progress)).unwrap();
        let mut dest = Connection::open(dir.path().join("dest.db")).unwrap();
        let backup = rusqlite::backup::Backup::new(&source.conn, &mut dest).unwrap();
        assert_eq!(backup.step(-1).unwrap(), rusqlite::backup::StepResult::Done);
        drop(backup);
        drop(source);
        let original = Connection::open(&plain).unwrap();
        assert_eq!(digest(&dest), digest(&original));
        let size = std::fs::metadata(&plain).unwrap().len();
        assert!(calls >= size / CHUNK_BYTES as u64, "progress reported per chunk: {calls} calls");
        assert_eq!(last.1, size, "progress total is the database size");
    }

    #[test]
    fn queries_that_read_backwards_still_see_the_right_pages() {
        let dir = tempfile::tempdir().unwrap();
        let plain = sample_db(dir.path(), 3_000);
        let zst = dir.path().join("plain.db.zst");
        compress(&plain, &zst);
        let source = open(&zst, None).unwrap();
        let ok: String = source.conn.query_row("PRAGMA quick_check", [], |r| r.get(0)).unwrap();
        assert_eq!(ok, "ok");
        let original = Connection::open(&plain).unwrap();
        assert_eq!(digest(&source.conn), digest(&original));
        let one: String = source.conn.query_row("SELECT s FROM t WHERE id = 1", [], |r| r.get(0)).unwrap();
        let want: String = original.query_row("SELECT s FROM t WHERE id = 1", [], |r| r.get(0)).unwrap();
        assert_eq!(one, want);
        assert!(REWINDS.load(Ordering::Relaxed) > 0, "the queries read backwards at least once");
    }

    #[test]
    fn a_truncated_stream_fails_the_backup_and_leaves_the_destination_alone() {
        let dir = tempfile::tempdir().unwrap();
        let plain = sample_db(dir.path(), 8_000);
        let zst = dir.path().join("plain.db.zst");
        compress(&plain, &zst);
        let len = std::fs::metadata(&zst).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(&zst).unwrap().set_len(len / 2).unwrap();
        let dest_path = dir.path().join("dest.db");
        let mut dest = Connection::open(&dest_path).unwrap();
        dest.execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE keep(x); INSERT INTO keep VALUES (42);").unwrap();
        let source = open(&zst, None).unwrap();
        let result = rusqlite::backup::Backup::new(&source.conn, &mut dest).unwrap().step(-1);
        assert!(result.is_err(), "a backup from a truncated snapshot must fail, got {result:?}");
        drop(source);
        let kept: i64 = dest.query_row("SELECT x FROM keep", [], |r| r.get(0)).unwrap();
        assert_eq!(kept, 42);
    }

    #[test]
    fn a_file_that_is_not_a_compressed_database_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.zst");
        std::fs::write(&junk, b"definitely not zstd").unwrap();
        let err = open(&junk, None).err().expect("refused");
        assert!(matches!(err, Error::Corrupt(_)), "{err:?}");
        let not_db = dir.path().join("text.zst");
        zstd::stream::copy_encode(&b"hello world, not a database at all"[..], File::create(&not_db).unwrap(), 3)
            .unwrap();
        assert!(open(&not_db, None).is_err());
    }
}
