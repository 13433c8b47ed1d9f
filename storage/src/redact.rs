//! Keeping credentials out of logs and error messages.
//!
//! Two tools: [`redact_url`] rewrites a URL for display (password and secret query
//! parameters replaced by `***`), and [`Scrubber`] removes every known secret string from a
//! message that came from a library (an HTTP body, an SSH error) whose content we do not
//! control.

use url::Url;

/// What replaces a credential.
pub const MASK: &str = "***";

/// Query parameters whose values are credentials (compared case-insensitively).
const SECRET_QUERY_KEYS: &[&str] = &[
    "secret",
    "password",
    "pass",
    "token",
    "session_token",
    "sig",
    "signature",
    "x-amz-signature",
    "x-amz-security-token",
    "access_key",
    "secret_key",
];

/// `url` with its password and credential query parameters replaced by `***`, for logs
/// and messages. Not a URL (a plain path): returned unchanged, unless it contains `@`,
/// when it is hidden entirely, since it might carry a password.
pub fn redact_url(url: &str) -> String {
    let opaque = || if url.contains('@') { MASK.to_string() } else { url.to_string() };
    let Ok(mut parsed) = Url::parse(url) else {
        return opaque();
    };
    if parsed.cannot_be_a_base() {
        // `user:pw@host` parses as scheme `user`: not a URL with an authority.
        return opaque();
    }
    if parsed.password().is_some() {
        let _ = parsed.set_password(Some(MASK));
    }
    if parsed.query().is_some() {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(k, v)| {
                let secret = SECRET_QUERY_KEYS.iter().any(|s| k.eq_ignore_ascii_case(s));
                (k.into_owned(), if secret { MASK.to_string() } else { v.into_owned() })
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    // The mask's `*` is percent-encoded by the URL serializer; show it plainly.
    parsed.to_string().replace("%2A%2A%2A", MASK)
}

/// Removes known secrets from messages.
#[derive(Clone, Default)]
pub(crate) struct Scrubber {
    secrets: Vec<String>,
}

impl Scrubber {
    /// A scrubber for the non-empty strings in `secrets` (and their percent-encodings).
    pub(crate) fn new<'a>(secrets: impl IntoIterator<Item = &'a str>) -> Scrubber {
        let mut all = Vec::new();
        for s in secrets.into_iter().filter(|s| !s.is_empty()) {
            let encoded: String = url::form_urlencoded::byte_serialize(s.as_bytes()).collect();
            if encoded != s {
                all.push(encoded);
            }
            all.push(s.to_string());
        }
        // Longest first, so that a secret containing another is masked whole.
        all.sort_by_key(|s| std::cmp::Reverse(s.len()));
        Scrubber { secrets: all }
    }

    /// `message` with every secret replaced by `***`.
    pub(crate) fn scrub(&self, message: &str) -> String {
        let mut out = message.to_string();
        for s in &self.secrets {
            if out.contains(s.as_str()) {
                out = out.replace(s.as_str(), MASK);
            }
        }
        out
    }
}

impl std::fmt::Debug for Scrubber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Scrubber({} secrets)", self.secrets.len())
    }
}

/// Decodes `%XX` escapes (as in a URL's user name or password); invalid escapes and
/// invalid UTF-8 are kept as they are.
pub(crate) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap_or_else(|_| s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_url_hides_password_and_secret_query_values() {
        let r = redact_url("sftp://marmot:hunter2@example.com:2222/snapshots");
        assert_eq!(r, "sftp://marmot:***@example.com:2222/snapshots");
        let r = redact_url("https://dav.example.com/remote.php?dir=/snap&login=bob&secret=s3cr%26t");
        assert!(!r.contains("s3cr"), "{r}");
        assert!(r.contains("login=bob") && r.contains("dir=%2Fsnap"), "{r}");
        assert!(r.contains("secret=***"), "{r}");
    }

    #[test]
    fn redact_url_leaves_plain_paths_and_hides_unparseable_urls_with_userinfo() {
        assert_eq!(redact_url("/var/lib/marmot/snapshots"), "/var/lib/marmot/snapshots");
        assert_eq!(redact_url("user:pw@host:22/x"), MASK);
    }

    #[test]
    fn percent_decode_decodes_escapes_and_keeps_plus() {
        assert_eq!(percent_decode("p%40ss+w%2Fd%"), "p@ss+w/d%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }

    #[test]
    fn scrubber_masks_secrets_and_their_percent_encoding() {
        let s = Scrubber::new(["p@ss word", "", "t0k3n"]);
        let m = s.scrub("auth p@ss word failed; url p%40ss+word; token t0k3n");
        assert_eq!(m, "auth *** failed; url ***; token ***");
    }
}
