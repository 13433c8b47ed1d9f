//! [`ObjectSnapshotStore`]: snapshots in any store of the `object_store` crate.
//!
//! Owns the mapping of [`SnapshotStore`] onto `object_store`: a local directory, S3 and
//! S3-compatible servers (MinIO, moto, …), WebDAV, and every URL scheme `object_store`
//! parses (`gs://`, `az://`, `abfss://`, …; see [`StoreOptions::Url`](crate::StoreOptions)).
//!
//! Atomicity: files larger than one part go up as a multipart upload, which the server
//! makes visible only on completion (S3, GCS, Azure); a local directory writes a staging
//! file and renames it. WebDAV has no multipart upload in `object_store`, so this module
//! streams a `PUT` to a hidden temporary name and `MOVE`s it into place
//! ([`webdav`](crate::webdav)).
//!
//! Faults tolerated: transient HTTP failures are retried a bounded number of times
//! ([`RETRIES_MAX`] within [`RETRY_WINDOW`]); a stalled connection fails after
//! [`READ_IDLE_TIMEOUT`]. Errors name the store without credentials.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ::object_store::aws::AmazonS3Builder;
use ::object_store::http::HttpBuilder;
use ::object_store::local::LocalFileSystem;
use ::object_store::path::Path as ObjectPath;
use ::object_store::prefix::PrefixStore;
use ::object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig, WriteMultipart,
};
use async_trait::async_trait;
use futures::StreamExt;
use marmot_core::{Error, ObjectInfo, Result, SnapshotStore};
use tokio::io::AsyncReadExt;
use url::Url;

use crate::local::{open_source, LocalSink};
use crate::names::{check_name, is_upload_name};
use crate::redact::{redact_url, Scrubber, MASK};
use crate::store_error;
use crate::webdav::WebDavUploader;

/// Size of one multipart upload part (S3's minimum for all parts but the last).
pub const UPLOAD_PART_BYTES: usize = 5 * 1024 * 1024;
/// Parts uploaded concurrently; with [`UPLOAD_PART_BYTES`], bounds the memory of an upload.
pub const UPLOAD_PARTS_IN_FLIGHT: usize = 4;
/// Bytes read from the local file at a time.
const READ_BUFFER_BYTES: usize = 256 * 1024;
/// How long establishing a connection may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection may go without receiving a byte before it counts as stalled.
pub const READ_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Retries of one failed request (with exponential backoff)...
pub const RETRIES_MAX: usize = 3;
/// ...within this time from the first attempt.
pub const RETRY_WINDOW: Duration = Duration::from_secs(30);

/// S3 or an S3-compatible server: Marmot v1's `[snapshot.s3]`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct S3Options {
    /// `host[:port]` (v1 form; the scheme follows `use_ssl`) or a full `http(s)://` URL.
    /// Empty: AWS S3.
    pub endpoint: String,
    /// Key prefix inside the bucket (v1's `path`); empty for the bucket's root.
    pub path: String,
    /// Bucket name.
    pub bucket: String,
    /// Access key id; empty: credentials come from the environment's instance metadata.
    pub access_key: String,
    /// Secret access key.
    pub secret: String,
    /// Session token of temporary credentials; empty when not used.
    pub session_token: String,
    /// Use HTTPS with a `host[:port]` endpoint.
    pub use_ssl: bool,
    /// Region for request signing; empty means `us-east-1` (what S3-compatible servers
    /// accept).
    pub region: String,
}

impl fmt::Debug for S3Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mask = |s: &str| if s.is_empty() { "" } else { MASK };
        f.debug_struct("S3Options")
            .field("endpoint", &redact_url(&self.endpoint))
            .field("path", &self.path)
            .field("bucket", &self.bucket)
            .field("access_key", &self.access_key)
            .field("secret", &mask(&self.secret))
            .field("session_token", &mask(&self.session_token))
            .field("use_ssl", &self.use_ssl)
            .field("region", &self.region)
            .finish()
    }
}

/// A [`SnapshotStore`] over an `object_store` store.
pub struct ObjectSnapshotStore {
    store: Arc<dyn ObjectStore>,
    /// The store's name for messages, without credentials.
    describe: String,
    scrubber: Scrubber,
    /// WebDAV only: the streaming upload that `object_store`'s HTTP store lacks.
    webdav: Option<WebDavUploader>,
    /// Local directory only: downloads are plain file copies (object_store streams a
    /// local file in small chunks, several times slower).
    local_dir: Option<std::path::PathBuf>,
}

impl ObjectSnapshotStore {
    /// A local directory, given as a path or a `file://` URL; created when missing.
    pub fn local(location: &str) -> Result<ObjectSnapshotStore> {
        let dir = match location.strip_prefix("file://") {
            Some(_) => Url::parse(location)
                .ok()
                .and_then(|u| u.to_file_path().ok())
                .ok_or_else(|| store_error(format!("invalid file URL {location:?}"), false))?,
            None => std::path::PathBuf::from(location),
        };
        std::fs::create_dir_all(&dir)
            .map_err(|source| Error::Io { context: format!("create snapshot directory {}", dir.display()), source })?;
        let describe = format!("directory {}", dir.display());
        let store = LocalFileSystem::new_with_prefix(&dir)
            .map_err(|e| store_error(format!("{describe}: {e}"), false))?
            .with_automatic_cleanup(true);
        let mut wrapped = Self::wrap(Arc::new(store), describe, Scrubber::default());
        wrapped.local_dir = Some(dir);
        Ok(wrapped)
    }

    /// S3 or an S3-compatible server.
    pub fn s3(o: &S3Options) -> Result<ObjectSnapshotStore> {
        if o.bucket.is_empty() {
            return Err(store_error("snapshot.s3.bucket is required", false));
        }
        let region = if o.region.is_empty() { "us-east-1" } else { o.region.as_str() };
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&o.bucket)
            .with_region(region)
            .with_client_options(client_options())
            .with_retry(retry_config());
        let mut endpoint_shown = "AWS".to_string();
        if !o.endpoint.is_empty() {
            let endpoint = if o.endpoint.contains("://") {
                o.endpoint.clone()
            } else {
                format!("{}://{}", if o.use_ssl { "https" } else { "http" }, o.endpoint)
            };
            endpoint_shown = redact_url(&endpoint);
            let allow_http = endpoint.starts_with("http://");
            builder = builder.with_endpoint(endpoint).with_allow_http(allow_http);
        }
        if !o.access_key.is_empty() {
            builder = builder.with_access_key_id(&o.access_key).with_secret_access_key(&o.secret);
        }
        if !o.session_token.is_empty() {
            builder = builder.with_token(&o.session_token);
        }
        let prefix = o.path.trim_matches('/');
        let describe = format!("s3://{}/{} at {}", o.bucket, prefix, endpoint_shown);
        let scrubber = Scrubber::new([o.secret.as_str(), o.session_token.as_str(), o.access_key.as_str()]);
        let store = builder.build().map_err(|e| store_error(scrubber.scrub(&format!("{describe}: {e}")), false))?;
        Ok(Self::wrap(with_prefix(Arc::new(store), prefix), describe, scrubber))
    }

    /// A WebDAV server, in Marmot v1's form
    /// `https://host/path?dir=/snapshots/path&login=USER&secret=PASS`: objects live under
    /// `https://host/path/snapshots/path/`, reached with HTTP basic authentication.
    pub fn webdav(url: &str) -> Result<ObjectSnapshotStore> {
        let dav = WebDavUploader::parse(url, CONNECT_TIMEOUT, READ_IDLE_TIMEOUT)?;
        let options =
            client_options().with_default_headers(dav.auth_headers()).with_allow_http(dav.root().scheme() == "http");
        let store = HttpBuilder::new()
            .with_url(dav.root().as_str())
            .with_client_options(options)
            .with_retry(retry_config())
            .build()
            .map_err(|e| store_error(dav.scrub(&format!("webdav {}: {e}", dav.root())), false))?;
        let describe = format!("webdav {}", dav.root());
        let scrubber = dav.scrubber();
        let mut this = Self::wrap(Arc::new(store), describe, scrubber);
        this.webdav = Some(dav);
        Ok(this)
    }

    /// Any URL `object_store` parses (`s3://`, `gs://`, `az://`, `abfss://`, `file://`,
    /// `http(s)://`), with `object_store` configuration `options`. The URL's path is the
    /// key prefix.
    pub fn url(url: &str, options: Vec<(String, String)>) -> Result<ObjectSnapshotStore> {
        let shown = redact_url(url);
        let parsed = Url::parse(url).map_err(|e| store_error(format!("invalid URL {shown}: {e}"), false))?;
        if parsed.scheme() == "file" {
            return Self::local(url);
        }
        let secrets: Vec<String> = options
            .iter()
            .filter(|(k, _)| is_secret_option(k))
            .map(|(_, v)| v.clone())
            .chain(parsed.password().map(str::to_string))
            .collect();
        let scrubber = Scrubber::new(secrets.iter().map(String::as_str));
        let (store, prefix) = ::object_store::parse_url_opts(&parsed, options)
            .map_err(|e| store_error(scrubber.scrub(&format!("{shown}: {e}")), false))?;
        let store: Arc<dyn ObjectStore> = Arc::from(store);
        Ok(Self::wrap(with_prefix(store, prefix.as_ref()), shown, scrubber))
    }

    fn wrap(store: Arc<dyn ObjectStore>, describe: String, scrubber: Scrubber) -> Self {
        ObjectSnapshotStore { store, describe, scrubber, webdav: None, local_dir: None }
    }

    /// Maps an `object_store` error of operation `op` on `name` into the core error.
    fn error(&self, op: &str, name: &str, e: ::object_store::Error) -> Error {
        use ::object_store::Error as E;
        let retryable = match &e {
            E::NotFound { .. } => return Error::NotFound(format!("{name} in {}", self.describe)),
            E::Unauthenticated { .. } | E::PermissionDenied { .. } => false,
            E::InvalidPath { .. }
            | E::NotSupported { .. }
            | E::NotImplemented { .. }
            | E::UnknownConfigurationKey { .. }
            | E::AlreadyExists { .. }
            | E::Precondition { .. } => false,
            // A failed list or multipart step arrives as `Generic` around an error type that
            // object_store does not export; its status is only in the text.
            _ => http_status_in(&e.to_string()).is_none_or(|s| !(400..500).contains(&s) || s == 408 || s == 429),
        };
        let message = self.scrubber.scrub(&format!("{}: {op} {name:?}: {e}", self.describe));
        store_error(message, retryable)
    }

    async fn put_multipart(&self, path: &ObjectPath, file: &mut tokio::fs::File) -> Result<()> {
        let name = path.as_ref();
        let upload = self.store.put_multipart(path).await.map_err(|e| self.error("put", name, e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, UPLOAD_PART_BYTES);
        let mut buf = vec![0u8; READ_BUFFER_BYTES];
        loop {
            let n = match file.read(&mut buf).await {
                Ok(n) => n,
                Err(source) => {
                    let _ = writer.abort().await;
                    return Err(Error::Io { context: format!("read the file for {name}"), source });
                }
            };
            if n == 0 {
                break;
            }
            if let Err(e) = writer.wait_for_capacity(UPLOAD_PARTS_IN_FLIGHT).await {
                let _ = writer.abort().await;
                return Err(self.error("put", name, e));
            }
            writer.write(&buf[..n]);
        }
        writer.finish().await.map_err(|e| self.error("put", name, e))?;
        Ok(())
    }
}

impl fmt::Display for ObjectSnapshotStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe)
    }
}

impl fmt::Debug for ObjectSnapshotStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectSnapshotStore").field("store", &self.describe).finish()
    }
}

#[async_trait]
impl SnapshotStore for ObjectSnapshotStore {
    async fn put(&self, name: &str, from: &Path) -> Result<()> {
        check_name(name)?;
        let (mut file, size) = open_source(from).await?;
        if let Some(dav) = &self.webdav {
            return dav.put(name, file, size).await;
        }
        let path = object_path(name)?;
        if size >= UPLOAD_PART_BYTES as u64 {
            return self.put_multipart(&path, &mut file).await;
        }
        // Smaller than one part: a single request, at most one part in memory.
        let mut bytes = Vec::with_capacity(size as usize);
        file.read_to_end(&mut bytes)
            .await
            .map_err(|source| Error::Io { context: format!("read {}", from.display()), source })?;
        self.store.put(&path, PutPayload::from(bytes)).await.map_err(|e| self.error("put", name, e))?;
        Ok(())
    }

    async fn get(&self, name: &str, to: &Path) -> Result<()> {
        check_name(name)?;
        let path = object_path(name)?;
        if let Some(dir) = &self.local_dir {
            return copy_local(&dir.join(path.as_ref()), to, name, &self.describe).await;
        }
        let result = self.store.get(&path).await.map_err(|e| self.error("get", name, e))?;
        let mut stream = result.into_stream();
        let mut sink = LocalSink::create(to).await?;
        while let Some(chunk) = stream.next().await {
            let bytes = chunk.map_err(|e| self.error("get", name, e))?;
            sink.write(&bytes).await?;
        }
        sink.commit().await
    }

    async fn list(&self) -> Result<Vec<ObjectInfo>> {
        let mut listing = self.store.list(None);
        let mut out = Vec::new();
        while let Some(meta) = listing.next().await {
            let meta = match meta {
                Ok(meta) => meta,
                // A store whose root does not exist yet (WebDAV, a fresh directory) is empty.
                Err(::object_store::Error::NotFound { .. }) => return Ok(Vec::new()),
                Err(e) => return Err(self.error("list", "", e)),
            };
            let mut name = meta.location.as_ref().to_string();
            if let Some(dav) = &self.webdav {
                // object_store's HTTP store names listed objects by their path on the
                // server, not relative to the store's URL.
                if let Some(relative) = name.strip_prefix(dav.root_path()) {
                    name = relative.to_string();
                }
            }
            if !is_upload_name(&name) {
                out.push(ObjectInfo { name, size_bytes: meta.size });
            }
        }
        Ok(out)
    }

    async fn delete(&self, name: &str) -> Result<()> {
        check_name(name)?;
        match self.store.delete(&object_path(name)?).await {
            Ok(()) | Err(::object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error("delete", name, e)),
        }
    }
}

fn object_path(name: &str) -> Result<ObjectPath> {
    ObjectPath::parse(name).map_err(|e| store_error(format!("invalid object name {name:?}: {e}"), false))
}

fn with_prefix(store: Arc<dyn ObjectStore>, prefix: &str) -> Arc<dyn ObjectStore> {
    let prefix = prefix.trim_matches('/');
    if prefix.is_empty() {
        store
    } else {
        Arc::new(PrefixStore::new(store, prefix))
    }
}

fn client_options() -> ClientOptions {
    ClientOptions::new()
        .with_connect_timeout(CONNECT_TIMEOUT)
        .with_timeout_disabled()
        .with_read_timeout(READ_IDLE_TIMEOUT)
}

fn retry_config() -> RetryConfig {
    RetryConfig { backoff: BackoffConfig::default(), max_retries: RETRIES_MAX, retry_timeout: RETRY_WINDOW }
}

/// The HTTP status that object_store's error text reports ("…status code: 403 Forbidden…").
fn http_status_in(message: &str) -> Option<u16> {
    let (_, after) = message.split_once("status code: ")?;
    after.get(..3)?.parse().ok()
}

/// Whether an `object_store` configuration key holds a credential.
fn is_secret_option(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    ["secret", "token", "key", "password", "sas", "credential"].iter().any(|s| k.contains(s)) && !k.ends_with("key_id")
}

/// Copies a stored file to `to` through a temporary name, so `to` never holds a partial
/// object.
async fn copy_local(from: &Path, to: &Path, name: &str, describe: &str) -> Result<()> {
    let tmp = to.with_file_name(format!(
        ".{}.download",
        to.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default()
    ));
    match tokio::fs::copy(from, &tmp).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(Error::NotFound(format!("{name} in {describe}")));
        }
        Err(source) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(Error::Io { context: format!("copy {name} from {describe}"), source });
        }
    }
    tokio::fs::rename(&tmp, to)
        .await
        .map_err(|source| Error::Io { context: format!("move {} into place", to.display()), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_status_is_read_from_object_store_error_text() {
        assert_eq!(http_status_in("GET x - Server returned non-2xx status code: 403 Forbidden: <x/>"), Some(403));
        assert_eq!(http_status_in("error sending request"), None);
    }

    #[test]
    fn display_and_debug_of_stores_never_show_credentials() {
        let dav = ObjectSnapshotStore::webdav(
            "https://dav.example.com/remote.php/webdav?dir=/snapshots/a&login=bob&secret=dav-s3cret",
        )
        .unwrap();
        let shown = format!("{dav} {dav:?}");
        assert!(shown.contains("https://dav.example.com/remote.php/webdav/snapshots/a/"), "{shown}");
        assert!(!shown.contains("dav-s3cret"), "{shown}");

        let options = S3Options {
            endpoint: "minio.local:9000".into(),
            bucket: "b".into(),
            access_key: "AKIAEXAMPLE".into(),
            secret: "s3-s3cret".into(),
            session_token: "s3-t0ken".into(),
            ..S3Options::default()
        };
        let s3 = ObjectSnapshotStore::s3(&options).unwrap();
        let shown = format!("{s3} {s3:?} {options:?}");
        assert!(!shown.contains("s3-s3cret") && !shown.contains("s3-t0ken"), "{shown}");

        let url = ObjectSnapshotStore::url(
            "s3://b/p",
            vec![
                ("aws_access_key_id".into(), "AKIAEXAMPLE".into()),
                ("aws_secret_access_key".into(), "url-s3cret".into()),
            ],
        )
        .unwrap();
        assert!(!format!("{url} {url:?}").contains("url-s3cret"));
    }
}
