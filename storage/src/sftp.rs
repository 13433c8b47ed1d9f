//! [`SftpSnapshotStore`]: snapshots on an SFTP server, with the server's host key pinned.
//!
//! Marmot v1 accepted any host key, which lets anyone on the path impersonate the server
//! and collect the password and the snapshots. Here the host key must be configured, as a
//! known-hosts line (`[host]:port ssh-ed25519 AAAA…`, or just `ssh-ed25519 AAAA…`) or as a
//! `SHA256:…` fingerprint as `ssh-keygen -lf` prints it; a different key, or none
//! configured, is a clear, non-retryable error. Only the key is compared, not the host
//! name of a known-hosts line.
//!
//! Uploads stream to a hidden temporary name in the target directory and are renamed into
//! place, so a reader never sees a partial object; downloads stream to the local file.
//! One SSH connection is shared by all calls and re-established after it breaks.

use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex as SyncMutex};
use std::time::Duration;

use async_trait::async_trait;
use marmot_core::{Error, ObjectInfo, Result, SnapshotStore};
use russh::keys::{HashAlg, PublicKeyOrCertificate};
use russh_sftp::client::error::Error as SftpError;
use russh_sftp::client::SftpSession;
use russh_sftp::protocol::StatusCode;
use tokio::io::{AsyncWriteExt, BufReader};
use url::Url;

use crate::local::{open_source, LocalSink};
use crate::names::{check_name, upload_name, UPLOAD_MARKER};
use crate::redact::{percent_decode, redact_url, Scrubber, MASK};
use crate::store_error;

/// How long connecting, the SSH handshake and authentication may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long one SFTP request may wait for its answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes read from the local file at a time when uploading.
const READ_BUFFER_BYTES: usize = 256 * 1024;
/// Directory levels [`SnapshotStore::list`] descends at most.
const LIST_DEPTH_MAX: usize = 16;

/// Marmot v1's `[snapshot.sftp]`, plus the pinned host key.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SftpOptions {
    /// `sftp://user:password@host:port/path` (port 22 when absent; the path is the
    /// directory that holds the snapshots, created when missing).
    pub url: String,
    /// The server's host key: a known-hosts line or a `SHA256:…` fingerprint; several
    /// may be given, one per line. Required.
    pub host_key: Option<String>,
}

impl fmt::Debug for SftpOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SftpOptions").field("url", &redact_url(&self.url)).field("host_key", &self.host_key).finish()
    }
}

/// An accepted host key.
#[derive(Clone, Debug, PartialEq, Eq)]
enum PinnedKey {
    /// `SHA256:<base64 without padding>`.
    Fingerprint(String),
    /// Algorithm name and base64 key blob, from a known-hosts line.
    Key { algorithm: String, blob: String },
}

/// Parses `snapshot.sftp.host_key`: one known-hosts line or fingerprint per line.
fn parse_host_keys(text: &str) -> Result<Vec<PinnedKey>> {
    let bad = |line: &str| {
        store_error(
            format!(
                "snapshot.sftp.host_key: {line:?} is neither a known-hosts line \
                 (\"host ssh-ed25519 AAAA…\") nor a fingerprint (\"SHA256:…\", from ssh-keygen -lf)"
            ),
            false,
        )
    };
    let mut keys = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        if let Some(fp) = line.strip_prefix("SHA256:") {
            let fp = fp.split_whitespace().next().unwrap_or("").trim_end_matches('=');
            if fp.is_empty() {
                return Err(bad(line));
            }
            keys.push(PinnedKey::Fingerprint(format!("SHA256:{fp}")));
            continue;
        }
        if line.starts_with('@') {
            return Err(store_error(
                format!("snapshot.sftp.host_key: markers such as {line:?} are not supported"),
                false,
            ));
        }
        let tokens: Vec<&str> = line.split_whitespace().collect();
        let at = tokens.iter().position(|t| is_key_algorithm(t)).ok_or_else(|| bad(line))?;
        let blob = tokens.get(at + 1).ok_or_else(|| bad(line))?;
        keys.push(PinnedKey::Key { algorithm: tokens[at].to_string(), blob: blob.to_string() });
    }
    if keys.is_empty() {
        return Err(bad(text));
    }
    Ok(keys)
}

fn is_key_algorithm(token: &str) -> bool {
    ["ssh-", "ecdsa-sha2-", "sk-ssh-", "sk-ecdsa-"].iter().any(|p| token.starts_with(p))
}

/// What the server presented: its fingerprint, and its key as `(algorithm, blob)`.
fn presented(key: &PublicKeyOrCertificate) -> (String, Option<(String, String)>) {
    match key {
        PublicKeyOrCertificate::PublicKey { key, .. } => {
            let fingerprint = key.fingerprint(HashAlg::Sha256).to_string();
            let openssh = key.to_openssh().unwrap_or_default();
            let mut parts = openssh.split_whitespace();
            let pair = match (parts.next(), parts.next()) {
                (Some(a), Some(b)) => Some((a.to_string(), b.to_string())),
                _ => None,
            };
            (fingerprint.trim_end_matches('=').to_string(), pair)
        }
        PublicKeyOrCertificate::Certificate(_) => ("a certificate".to_string(), None),
    }
}

/// The russh client handler: accepts the server only if its key is pinned, and records
/// what was presented for the error message.
struct PinnedHostKey {
    accepted: Arc<Vec<PinnedKey>>,
    presented: Arc<SyncMutex<Option<String>>>,
}

impl russh::client::Handler for PinnedHostKey {
    type Error = russh::Error;

    async fn check_server_key(&mut self, key: &PublicKeyOrCertificate) -> std::result::Result<bool, Self::Error> {
        let (fingerprint, pair) = presented(key);
        let ok = self.accepted.iter().any(|k| match (k, &pair) {
            (PinnedKey::Fingerprint(f), _) => *f == fingerprint,
            (PinnedKey::Key { algorithm, blob }, Some((a, b))) => algorithm == a && blob == b,
            (PinnedKey::Key { .. }, None) => false,
        });
        let shown = match &pair {
            Some((a, _)) => format!("{a} {fingerprint}"),
            None => fingerprint,
        };
        *self.presented.lock().expect("host key record") = Some(shown);
        Ok(ok)
    }
}

/// One SSH connection with its SFTP session.
struct Connection {
    ssh: russh::client::Handle<PinnedHostKey>,
    sftp: SftpSession,
}

/// A [`SnapshotStore`] on an SFTP server.
pub struct SftpSnapshotStore {
    host: String,
    port: u16,
    user: String,
    password: String,
    /// The directory holding the objects, without a trailing `/` (`.` for the login
    /// directory).
    root: String,
    accepted: Arc<Vec<PinnedKey>>,
    connection: tokio::sync::Mutex<Option<Arc<Connection>>>,
    describe: String,
    scrubber: Scrubber,
}

impl SftpSnapshotStore {
    /// Parses the options and connects, so that a wrong address, password or host key
    /// shows at once.
    pub async fn connect(options: SftpOptions) -> Result<SftpSnapshotStore> {
        let store = SftpSnapshotStore::new(&options)?;
        store.connection().await?;
        Ok(store)
    }

    /// Parses the options without connecting; the first call connects.
    pub fn new(options: &SftpOptions) -> Result<SftpSnapshotStore> {
        let shown = redact_url(&options.url);
        let url = Url::parse(&options.url).map_err(|e| store_error(format!("invalid SFTP URL {shown}: {e}"), false))?;
        if url.scheme() != "sftp" {
            return Err(store_error(format!("SFTP URL {shown} must start with sftp://"), false));
        }
        let host = url.host_str().unwrap_or_default().trim_matches(['[', ']']).to_string();
        if host.is_empty() {
            return Err(store_error(format!("SFTP URL {shown} has no host"), false));
        }
        let port = url.port().unwrap_or(22);
        let user = percent_decode(url.username());
        let password = url.password().map(percent_decode).unwrap_or_default();
        let host_key = options.host_key.as_deref().map(str::trim).unwrap_or("");
        if host_key.is_empty() {
            return Err(store_error(
                format!(
                    "snapshot.sftp.host_key is required for {shown}: the server's key is \
                     checked, never accepted blindly; give its known-hosts line \
                     (ssh-keyscan -p {port} {host}) or its SHA256 fingerprint \
                     (ssh-keyscan -p {port} {host} | ssh-keygen -lf -)"
                ),
                false,
            ));
        }
        let accepted = Arc::new(parse_host_keys(host_key)?);
        let path = percent_decode(url.path());
        let root = match path.trim_end_matches('/') {
            "" if path.starts_with('/') => String::new(),
            "" => ".".to_string(),
            p => p.to_string(),
        };
        let describe = format!("sftp://{user}@{host}:{port}{}", url.path());
        let scrubber = Scrubber::new([password.as_str()]);
        Ok(SftpSnapshotStore {
            host,
            port,
            user,
            password,
            root,
            accepted,
            connection: tokio::sync::Mutex::new(None),
            describe,
            scrubber,
        })
    }

    /// The shared connection, established when there is none or it broke.
    async fn connection(&self) -> Result<Arc<Connection>> {
        let mut slot = self.connection.lock().await;
        if let Some(c) = slot.as_ref() {
            if !c.ssh.is_closed() {
                return Ok(c.clone());
            }
        }
        let c = Arc::new(
            tokio::time::timeout(CONNECT_TIMEOUT, self.open_connection())
                .await
                .map_err(|_| self.fail("connect", format!("timed out after {CONNECT_TIMEOUT:?}"), true))??,
        );
        *slot = Some(c.clone());
        Ok(c)
    }

    async fn open_connection(&self) -> Result<Connection> {
        let config =
            Arc::new(russh::client::Config { keepalive_interval: Some(Duration::from_secs(15)), ..Default::default() });
        let presented = Arc::new(SyncMutex::new(None));
        let handler = PinnedHostKey { accepted: self.accepted.clone(), presented: presented.clone() };
        let mut ssh = match russh::client::connect(config, (self.host.as_str(), self.port), handler).await {
            Ok(ssh) => ssh,
            Err(russh::Error::UnknownKey) => {
                let seen = presented.lock().expect("host key record").take().unwrap_or_default();
                return Err(self.fail(
                    "connect",
                    format!(
                        "host key mismatch: the server presented {seen}, which is not the \
                         configured snapshot.sftp.host_key"
                    ),
                    false,
                ));
            }
            Err(e) => return Err(self.fail("connect", e.to_string(), true)),
        };
        let auth = ssh
            .authenticate_password(self.user.clone(), self.password.clone())
            .await
            .map_err(|e| self.fail("authenticate", e.to_string(), true))?;
        if !auth.success() {
            return Err(self.fail(
                "authenticate",
                format!("the server refused the password of user {:?}", self.user),
                false,
            ));
        }
        let channel = ssh.channel_open_session().await.map_err(|e| self.fail("open session", e.to_string(), true))?;
        channel.request_subsystem(true, "sftp").await.map_err(|e| self.fail("start sftp", e.to_string(), true))?;
        let config =
            russh_sftp::client::Config { request_timeout_secs: REQUEST_TIMEOUT.as_secs(), ..Default::default() };
        let sftp = SftpSession::new_with_config(channel.into_stream(), config)
            .await
            .map_err(|e| self.fail("start sftp", e.to_string(), true))?;
        Ok(Connection { ssh, sftp })
    }

    fn fail(&self, op: &str, detail: String, retryable: bool) -> Error {
        store_error(self.scrubber.scrub(&format!("{}: {op}: {detail}", self.describe)), retryable)
    }

    /// Maps an SFTP error on `name`; drops the connection unless the server answered.
    async fn sftp_error(&self, c: &Arc<Connection>, op: &str, name: &str, e: SftpError) -> Error {
        let retryable = match &e {
            SftpError::Status(s) => match s.status_code {
                StatusCode::NoSuchFile => return Error::NotFound(format!("{name} in {}", self.describe)),
                StatusCode::PermissionDenied | StatusCode::OpUnsupported => false,
                _ => true,
            },
            _ => {
                self.forget(c).await;
                true
            }
        };
        self.fail(op, format!("{name:?}: {e}"), retryable)
    }

    async fn forget(&self, c: &Arc<Connection>) {
        let mut slot = self.connection.lock().await;
        if slot.as_ref().is_some_and(|s| Arc::ptr_eq(s, c)) {
            *slot = None;
        }
    }

    fn remote(&self, name: &str) -> String {
        format!("{}/{name}", self.root)
    }

    /// Creates the root and `name`'s parent directories when missing.
    async fn make_dirs(&self, c: &Arc<Connection>, name: &str) -> Result<()> {
        let mut dir = if self.root.starts_with('/') || self.root.is_empty() { String::new() } else { ".".to_string() };
        let root_segments = self.root.split('/').filter(|s| !s.is_empty() && *s != ".");
        let name_segments = name.split('/').collect::<Vec<_>>();
        let parents = name_segments[..name_segments.len() - 1].iter().copied();
        for segment in root_segments.chain(parents) {
            dir = format!("{dir}/{segment}");
            match c.sftp.metadata(dir.clone()).await {
                Ok(m) if m.is_dir() => continue,
                Ok(_) => return Err(self.fail("mkdir", format!("{dir:?} is not a directory"), false)),
                Err(SftpError::Status(_)) => {}
                Err(e) => return Err(self.sftp_error(c, "stat", &dir, e).await),
            }
            if let Err(e) = c.sftp.create_dir(dir.clone()).await {
                // Another writer may have created it meanwhile.
                if !matches!(c.sftp.metadata(dir.clone()).await, Ok(m) if m.is_dir()) {
                    return Err(self.sftp_error(c, "mkdir", &dir, e).await);
                }
            }
        }
        Ok(())
    }

    async fn upload(&self, c: &Arc<Connection>, temp: &str, file: tokio::fs::File) -> Result<()> {
        let mut remote = match c.sftp.create(temp.to_string()).await {
            Ok(f) => f,
            Err(e) => return Err(self.sftp_error(c, "create", temp, e).await),
        };
        let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, file);
        let copied = tokio::io::copy_buf(&mut reader, &mut remote).await;
        let closed = remote.shutdown().await;
        if let Err(e) = copied.and(closed) {
            self.forget(c).await;
            return Err(self.fail("upload", format!("{temp:?}: {e}"), true));
        }
        Ok(())
    }
}

impl fmt::Display for SftpSnapshotStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe)
    }
}

impl fmt::Debug for SftpSnapshotStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SftpSnapshotStore")
            .field("server", &self.describe)
            .field("password", &MASK)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl SnapshotStore for SftpSnapshotStore {
    async fn put(&self, name: &str, from: &Path) -> Result<()> {
        check_name(name)?;
        let (file, _size) = open_source(from).await?;
        let c = self.connection().await?;
        self.make_dirs(&c, name).await?;
        let temp = self.remote(&upload_name(name));
        let target = self.remote(name);
        if let Err(e) = self.upload(&c, &temp, file).await {
            let _ = c.sftp.remove_file(temp.clone()).await;
            return Err(e);
        }
        let refused = match c.sftp.rename(temp.clone(), target.clone()).await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        // SFTP v3 servers refuse to rename over an existing file (a generic failure):
        // remove it first, so the old object is briefly absent, never partial.
        let over_existing = matches!(&refused, SftpError::Status(s) if s.status_code == StatusCode::Failure)
            && c.sftp.try_exists(target.clone()).await.unwrap_or(false);
        let result = if over_existing {
            let _ = c.sftp.remove_file(target.clone()).await;
            c.sftp.rename(temp.clone(), target).await
        } else {
            Err(refused)
        };
        match result {
            Ok(()) => Ok(()),
            Err(e) => {
                let _ = c.sftp.remove_file(temp).await;
                Err(self.sftp_error(&c, "rename", name, e).await)
            }
        }
    }

    async fn get(&self, name: &str, to: &Path) -> Result<()> {
        check_name(name)?;
        let c = self.connection().await?;
        let path = self.remote(name);
        let before = match c.sftp.metadata(path.clone()).await {
            Ok(m) => m,
            Err(e) => return Err(self.sftp_error(&c, "get", name, e).await),
        };
        let mut remote = match c.sftp.open(path.clone()).await {
            Ok(f) => f,
            Err(e) => return Err(self.sftp_error(&c, "get", name, e).await),
        };
        let mut sink = LocalSink::create(to).await?;
        let copied = match tokio::io::copy(&mut remote, sink.file()).await {
            Ok(n) => n,
            Err(e) => {
                self.forget(&c).await;
                return Err(self.fail("get", format!("{name:?}: {e}"), true));
            }
        };
        // A put replacing the object (remove, then rename) while it is read: a server that
        // reads by path (rclone's) can hand out the end of the new object after the start
        // of the old one. Keep the copy only if the object stayed the one opened.
        let after = c.sftp.metadata(path).await.ok();
        let unchanged =
            copied == before.len() && after.is_some_and(|a| a.len() == before.len() && a.mtime == before.mtime);
        if !unchanged {
            return Err(self.fail("get", format!("{name:?} was replaced while it was read; read it again"), true));
        }
        sink.commit().await
    }

    async fn list(&self) -> Result<Vec<ObjectInfo>> {
        let c = self.connection().await?;
        let mut out = Vec::new();
        let mut pending = vec![(String::new(), 0usize)];
        while let Some((dir, depth)) = pending.pop() {
            let remote = if dir.is_empty() { self.root.clone() } else { self.remote(&dir) };
            let remote = if remote.is_empty() { "/".to_string() } else { remote };
            let entries = match c.sftp.read_dir(remote).await {
                Ok(entries) => entries,
                Err(SftpError::Status(s)) if s.status_code == StatusCode::NoSuchFile => continue,
                Err(e) => return Err(self.sftp_error(&c, "list", &dir, e).await),
            };
            for entry in entries {
                let file = entry.file_name();
                if file == "." || file == ".." || file.starts_with(UPLOAD_MARKER) {
                    continue;
                }
                let name = if dir.is_empty() { file } else { format!("{dir}/{file}") };
                let kind = entry.file_type();
                if kind.is_dir() && depth < LIST_DEPTH_MAX {
                    pending.push((name, depth + 1));
                } else if kind.is_file() {
                    out.push(ObjectInfo { name, size_bytes: entry.metadata().len() });
                }
            }
        }
        Ok(out)
    }

    async fn delete(&self, name: &str) -> Result<()> {
        check_name(name)?;
        let c = self.connection().await?;
        match c.sftp.remove_file(self.remote(name)).await {
            Ok(()) => Ok(()),
            Err(SftpError::Status(s)) if s.status_code == StatusCode::NoSuchFile => Ok(()),
            Err(e) => Err(self.sftp_error(&c, "delete", name, e).await),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_key_forms_are_parsed() {
        let keys =
            parse_host_keys("[127.0.0.1]:2222 ssh-ed25519 AAAAC3Nza comment\n# note\nSHA256:abcDEF+/=\nssh-rsa AAAAB3")
                .unwrap();
        assert_eq!(
            keys,
            vec![
                PinnedKey::Key { algorithm: "ssh-ed25519".into(), blob: "AAAAC3Nza".into() },
                PinnedKey::Fingerprint("SHA256:abcDEF+/".into()),
                PinnedKey::Key { algorithm: "ssh-rsa".into(), blob: "AAAAB3".into() },
            ]
        );
        assert!(parse_host_keys("host only").is_err());
        assert!(parse_host_keys("@cert-authority * ssh-ed25519 AAAA").is_err());
        assert!(parse_host_keys("SHA256:").is_err());
    }

    #[test]
    fn missing_host_key_is_a_clear_error_without_the_password() {
        let options = SftpOptions { url: "sftp://u:hunter2@h:2022/snaps".into(), host_key: None };
        let e = SftpSnapshotStore::new(&options).unwrap_err().to_string();
        assert!(e.contains("snapshot.sftp.host_key is required"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
        assert!(!format!("{options:?}").contains("hunter2"));
    }
}
