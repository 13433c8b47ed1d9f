//! WebDAV: Marmot v1's URL form, basic authentication, and the streaming upload that
//! `object_store`'s HTTP store lacks.
//!
//! `object_store`'s HTTP store reads, lists and deletes; it uploads only from memory. This
//! module streams the local file in a `PUT` to a hidden temporary name beside the object
//! ([`crate::names::upload_name`]), then `MOVE`s it over the object (`Overwrite: T`), so a
//! reader sees the old object or the new one, never part of one. Parent collections are
//! created with `MKCOL` first.

use std::time::Duration;

use ::object_store::{HeaderMap, HeaderValue};
use base64::Engine;
use marmot_core::{Error, Result};
use reqwest::{header, Method, StatusCode};
use tokio_util::io::ReaderStream;
use url::Url;

use crate::names::upload_name;
use crate::redact::{percent_decode, redact_url, Scrubber};
use crate::store_error;

/// Bytes read from the local file per body chunk.
const BODY_CHUNK_BYTES: usize = 256 * 1024;

/// A WebDAV location and the client that uploads to it.
pub(crate) struct WebDavUploader {
    client: reqwest::Client,
    /// The URL's path without the `dir` parameter: assumed to exist.
    base: Url,
    /// `dir`'s segments, created under `base` when missing.
    dir: Vec<String>,
    /// `base` + `dir` + `/`: where objects live.
    root: Url,
    /// See [`WebDavUploader::root_path`].
    root_path: String,
    authorization: Option<HeaderValue>,
    scrubber: Scrubber,
}

impl WebDavUploader {
    /// Parses `https://host/path?dir=/snapshots/path&login=USER&secret=PASS`.
    pub(crate) fn parse(url: &str, connect: Duration, idle: Duration) -> Result<WebDavUploader> {
        let shown = redact_url(url);
        let mut base = Url::parse(url).map_err(|e| store_error(format!("invalid WebDAV URL {shown}: {e}"), false))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(store_error(format!("WebDAV URL {shown} must be http(s)://"), false));
        }
        let (mut dir, mut login, mut secret) = (String::new(), String::new(), String::new());
        for (k, v) in base.query_pairs() {
            match k.as_ref() {
                "dir" => dir = v.into_owned(),
                "login" => login = v.into_owned(),
                "secret" => secret = v.into_owned(),
                _ => {}
            }
        }
        if !base.username().is_empty() {
            login = percent_decode(base.username());
            secret = base.password().map(percent_decode).unwrap_or_default();
        }
        base.set_query(None);
        let _ = base.set_username("");
        let _ = base.set_password(None);
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        let dir: Vec<String> = dir.split('/').filter(|s| !s.is_empty()).map(str::to_string).collect();
        let mut root = base.clone();
        root.path_segments_mut()
            .map_err(|_| store_error(format!("WebDAV URL {shown} cannot hold a path"), false))?
            .pop_if_empty()
            .extend(&dir)
            .push("");
        let authorization = (!login.is_empty()).then(|| {
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{login}:{secret}"));
            let mut value = HeaderValue::from_str(&format!("Basic {token}")).expect("base64 is a valid header value");
            value.set_sensitive(true);
            value
        });
        let client = reqwest::Client::builder()
            .connect_timeout(connect)
            .read_timeout(idle)
            .build()
            .map_err(|e| store_error(format!("WebDAV client for {shown}: {e}"), false))?;
        let scrubber = Scrubber::new([secret.as_str()]);
        let root_path = percent_decode(root.path().trim_start_matches('/'));
        Ok(WebDavUploader { client, base, dir, root, root_path, authorization, scrubber })
    }

    /// Where objects live, without credentials.
    pub(crate) fn root(&self) -> &Url {
        &self.root
    }

    /// The path of [`root`](Self::root) without the leading `/`, decoded, as
    /// `object_store` names listed objects (`marmot/snapshots/`).
    pub(crate) fn root_path(&self) -> &str {
        &self.root_path
    }

    /// The `Authorization` header for every request of `object_store`'s HTTP store.
    pub(crate) fn auth_headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(value) = &self.authorization {
            headers.insert(header::AUTHORIZATION, value.clone());
        }
        headers
    }

    pub(crate) fn scrubber(&self) -> Scrubber {
        self.scrubber.clone()
    }

    pub(crate) fn scrub(&self, message: &str) -> String {
        self.scrubber.scrub(message)
    }

    /// Streams `file` (`size` bytes) to `name` through a temporary name and a `MOVE`.
    pub(crate) async fn put(&self, name: &str, file: tokio::fs::File, size: u64) -> Result<()> {
        let segments: Vec<&str> = name.split('/').collect();
        self.make_collections(&segments[..segments.len() - 1]).await?;
        let temp = self.url_for(&upload_name(name));
        let target = self.url_for(name);
        let body = reqwest::Body::wrap_stream(ReaderStream::with_capacity(file, BODY_CHUNK_BYTES));
        let put = self.request(Method::PUT, &temp).header(header::CONTENT_LENGTH, size).body(body).send().await;
        self.check("PUT", name, put)?;
        let moved = self
            .request(Method::from_bytes(b"MOVE").expect("MOVE is a valid method"), &temp)
            .header("Destination", target.as_str())
            .header("Overwrite", "T")
            .send()
            .await;
        if let Err(e) = self.check("MOVE", name, moved) {
            let _ = self.request(Method::DELETE, &temp).send().await;
            return Err(e);
        }
        Ok(())
    }

    /// `MKCOL` for `dir`'s segments and then `parents`, outermost first; existing
    /// collections answer 405 and are fine.
    async fn make_collections(&self, parents: &[&str]) -> Result<()> {
        let mut url = self.base.clone();
        let all = self.dir.iter().map(String::as_str).chain(parents.iter().copied());
        for segment in all {
            url.path_segments_mut().expect("http URL").pop_if_empty().push(segment).push("");
            let mkcol = Method::from_bytes(b"MKCOL").expect("MKCOL is a valid method");
            let response = self.request(mkcol, &url).send().await;
            match response {
                Ok(r) if r.status() == StatusCode::METHOD_NOT_ALLOWED => {}
                other => self.check("MKCOL", url.path(), other)?,
            }
        }
        Ok(())
    }

    fn url_for(&self, name: &str) -> Url {
        let mut url = self.root.clone();
        url.path_segments_mut().expect("http URL").pop_if_empty().extend(name.split('/'));
        url
    }

    fn request(&self, method: Method, url: &Url) -> reqwest::RequestBuilder {
        let builder = self.client.request(method, url.clone());
        match &self.authorization {
            Some(value) => builder.header(header::AUTHORIZATION, value.clone()),
            None => builder,
        }
    }

    /// Maps a response to success or a store error: 401/403 and other 4xx are final,
    /// 5xx and connection failures retryable.
    fn check(&self, op: &str, name: &str, response: reqwest::Result<reqwest::Response>) -> Result<()> {
        let (message, retryable) = match response {
            Ok(r) if r.status().is_success() => return Ok(()),
            Ok(r) if matches!(r.status(), StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => {
                (format!("authentication failed (HTTP {})", r.status()), false)
            }
            Ok(r) => (format!("HTTP {}", r.status()), r.status().is_server_error()),
            Err(e) => (format!("{e}"), true),
        };
        let message = self.scrub(&format!("webdav {}: {op} {name:?}: {message}", self.root));
        Err(Error::Store { message, retryable })
    }
}
