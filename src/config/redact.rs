//! Secrets kept out of logs: a password type that never prints, key fingerprints, Redis URLs
//! with their passwords redacted.

use std::fmt;
use std::str::FromStr;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// A secret string (a password): `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Sensitive(String);

impl Sensitive {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Sensitive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Sensitive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl FromStr for Sensitive {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_string()))
    }
}

/// A short, non-reversible name for a cluster key (8 hex digits of an HMAC keyed with it), so
/// logs and metrics can say which key a node uses without showing it.
pub fn key_fingerprint(key: &[u8]) -> String {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("hmac takes any key length");
    m.update(b"sigrouter cluster key fingerprint");
    m.finalize().into_bytes()[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A Redis URL (or comma-separated list of them) with any password replaced by `<redacted>`.
pub fn redact_url(url: &str) -> String {
    url.split(',')
        .map(|u| {
            let (scheme, rest) = match u.find("://") {
                Some(i) => u.split_at(i + 3),
                None => ("", u),
            };
            let auth_end = rest.find('/').unwrap_or(rest.len());
            let (authority, path) = rest.split_at(auth_end);
            match authority.rfind('@') {
                Some(at) => {
                    let (userinfo, host) = authority.split_at(at);
                    let user = userinfo.split(':').next().unwrap_or("");
                    if userinfo.contains(':') {
                        format!("{scheme}{user}:<redacted>{host}{path}")
                    } else {
                        // A bare userinfo is a password to the redis crate (redis://pw@host).
                        format!("{scheme}<redacted>{host}{path}")
                    }
                }
                None => u.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Whether a Redis URL carries a password of its own.
pub(super) fn url_has_password(url: &str) -> bool {
    redact_url(url) != url
}

/// Prints a key as its fingerprint.
pub(super) struct KeyName<'a>(pub(super) &'a [u8]);

impl fmt::Debug for KeyName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<redacted, fingerprint {}>", key_fingerprint(self.0))
    }
}
