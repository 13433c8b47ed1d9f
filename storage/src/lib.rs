//! [`SnapshotStore`] implementations for Marmot.
//!
//! - [`object_store`](crate::object_store): one implementation over the `object_store` crate
//!   for a local directory, S3 and S3-compatible servers, WebDAV (Marmot v1's URL form),
//!   and whatever else `object_store` reads from a URL (`gs://`, `az://`, `abfss://`, …).
//! - [`nats`](crate::nats): the NATS JetStream object store (Marmot v1's default).
//! - [`sftp`](crate::sftp): SFTP, with the server's host key pinned.
//!
//! [`open`] builds one from a plain [`StoreOptions`]; the command line maps its
//! configuration into that enum. Every store streams files in bounded pieces, never
//! holding a whole snapshot in memory, and no error message, `Display` or `Debug` output
//! contains a password, secret key or token.
#![warn(missing_docs)]

use std::fmt;
use std::sync::Arc;

use marmot_core::{Result, SnapshotStore};

mod local;
mod names;
pub mod nats;
pub mod object_store;
pub mod redact;
pub mod sftp;
mod webdav;

pub use crate::nats::{NatsOptions, NatsSnapshotStore};
pub use crate::object_store::{ObjectSnapshotStore, S3Options};
pub use crate::redact::redact_url;
pub use crate::sftp::{SftpOptions, SftpSnapshotStore};

/// Where snapshots are stored, with everything needed to reach the store.
///
/// Plain data, independent of the command line's configuration types. `Debug` never
/// shows credentials.
#[non_exhaustive]
pub enum StoreOptions {
    /// A local directory (`store = "file"`): a plain path or a `file://` URL. Created when
    /// missing.
    File {
        /// The directory.
        location: String,
    },
    /// S3 or an S3-compatible server (`store = "s3"`, `[snapshot.s3]`).
    S3(S3Options),
    /// A WebDAV server (`store = "webdav"`), in Marmot v1's form
    /// `https://host/path?dir=/snapshots/path&login=USER&secret=PASS`.
    WebDav {
        /// The URL with `dir`, `login` and `secret` query parameters.
        url: String,
    },
    /// Any URL that the `object_store` crate understands: `s3://bucket/prefix`,
    /// `gs://bucket/prefix`, `az://container/prefix`, `abfss://…`, `file:///dir`,
    /// `http(s)://` (plain HTTP/WebDAV without authentication). `options` are
    /// `object_store` configuration keys, for example `aws_access_key_id`,
    /// `google_service_account`, `azure_storage_account_key`.
    Url {
        /// The URL; its path is the key prefix.
        url: String,
        /// `object_store` configuration keys and values.
        options: Vec<(String, String)>,
    },
    /// The NATS JetStream object store (`store = "nats"`, `[snapshot.nats]`).
    Nats(NatsOptions),
    /// An SFTP server (`store = "sftp"`, `[snapshot.sftp]`).
    Sftp(SftpOptions),
}

impl fmt::Debug for StoreOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreOptions::File { location } => f.debug_struct("File").field("location", &redact_url(location)).finish(),
            StoreOptions::S3(s3) => f.debug_tuple("S3").field(s3).finish(),
            StoreOptions::WebDav { url } => f.debug_struct("WebDav").field("url", &redact_url(url)).finish(),
            StoreOptions::Url { url, options } => {
                let keys: Vec<&str> = options.iter().map(|(k, _)| k.as_str()).collect();
                f.debug_struct("Url").field("url", &redact_url(url)).field("option_keys", &keys).finish()
            }
            StoreOptions::Nats(n) => f.debug_tuple("Nats").field(n).finish(),
            StoreOptions::Sftp(s) => f.debug_tuple("Sftp").field(s).finish(),
        }
    }
}

/// Builds the snapshot store that `options` describe.
///
/// Configuration errors (a malformed URL, a missing host key) are
/// [`Error::Store`](marmot_core::Error::Store) with `retryable: false`. The NATS store
/// creates its bucket here, and the SFTP store connects here so that a wrong password or
/// host key shows at startup; a server that cannot be reached is a retryable error.
pub async fn open(options: StoreOptions) -> Result<Arc<dyn SnapshotStore>> {
    Ok(match options {
        StoreOptions::File { location } => Arc::new(ObjectSnapshotStore::local(&location)?),
        StoreOptions::S3(s3) => Arc::new(ObjectSnapshotStore::s3(&s3)?),
        StoreOptions::WebDav { url } => Arc::new(ObjectSnapshotStore::webdav(&url)?),
        StoreOptions::Url { url, options } => Arc::new(ObjectSnapshotStore::url(&url, options)?),
        StoreOptions::Nats(n) => Arc::new(NatsSnapshotStore::open(n).await?),
        StoreOptions::Sftp(s) => Arc::new(SftpSnapshotStore::connect(s).await?),
    })
}

/// A [`marmot_core::Error::Store`] with `message`.
pub(crate) fn store_error(message: impl Into<String>, retryable: bool) -> marmot_core::Error {
    marmot_core::Error::Store { message: message.into(), retryable }
}
