//! The local side of a transfer: the file being uploaded, and the file a download is
//! written to.
//!
//! A download goes to a hidden temporary file beside the destination, which is renamed
//! over it only once every byte has arrived and been synced; a failed download removes
//! the temporary file and leaves the destination as it was.

use std::path::{Path, PathBuf};

use marmot_core::{Error, Result};
use tokio::io::AsyncWriteExt;

/// Opens the file to upload and returns it with its size.
pub(crate) async fn open_source(path: &Path) -> Result<(tokio::fs::File, u64)> {
    let io = |source| Error::Io { context: format!("open snapshot file {}", path.display()), source };
    let file = tokio::fs::File::open(path).await.map_err(io)?;
    let size = file.metadata().await.map_err(io)?.len();
    Ok((file, size))
}

/// A download in progress: a temporary file renamed over the destination on `commit`.
pub(crate) struct LocalSink {
    file: Option<tokio::fs::File>,
    committed: bool,
    temp: PathBuf,
    to: PathBuf,
}

impl LocalSink {
    /// Creates the temporary file beside `to`.
    pub(crate) async fn create(to: &Path) -> Result<LocalSink> {
        let unique: u64 = rand::random();
        let file_name = to.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let temp = to.with_file_name(format!(".{file_name}.download-{unique:016x}"));
        let file = tokio::fs::File::create(&temp)
            .await
            .map_err(|source| Error::Io { context: format!("create {}", temp.display()), source })?;
        Ok(LocalSink { file: Some(file), committed: false, temp, to: to.to_path_buf() })
    }

    /// The open temporary file, to write to.
    pub(crate) fn file(&mut self) -> &mut tokio::fs::File {
        self.file.as_mut().expect("LocalSink used after commit")
    }

    /// Appends `bytes`.
    pub(crate) async fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let temp = self.temp.clone();
        self.file()
            .write_all(bytes)
            .await
            .map_err(|source| Error::Io { context: format!("write {}", temp.display()), source })
    }

    /// Syncs the temporary file and renames it to the destination.
    pub(crate) async fn commit(mut self) -> Result<()> {
        let mut file = self.file.take().expect("LocalSink committed twice");
        let io = |context: String| move |source| Error::Io { context, source };
        file.flush().await.map_err(io(format!("flush {}", self.temp.display())))?;
        file.sync_all().await.map_err(io(format!("sync {}", self.temp.display())))?;
        drop(file);
        tokio::fs::rename(&self.temp, &self.to).await.map_err(io(format!("rename to {}", self.to.display())))?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for LocalSink {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}
