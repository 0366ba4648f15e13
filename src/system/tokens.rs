//! Service tokens: bearer tokens a function with `auth = "token"` requires of its callers.
//!
//! A token is 32 bytes from the operating system's random generator, shown once, at creation,
//! as `sgt_` and 64 hex digits. The gateway keeps only its SHA-256 (in memory and in the state
//! store, bucket [`TOKENS_BUCKET`], key `{function}={id}`), with an id, a name and an expiry. A
//! request's token is hashed and compared with each of the function's hashes in constant time,
//! so that neither a token nor a stored hash shows in the timing.
//!
//! Several tokens of one function are valid at once (rotation: create the new one, move the
//! callers, revoke the old one). A revoked or expired token is remembered until a day after its
//! expiry, so that a caller still using it is told why it is refused; then it is forgotten.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::Duration;

use http::HeaderValue;
use ring::rand::SecureRandom;
use serde::{Deserialize, Serialize};

use crate::error::TokenRefusal;
use crate::state::rfc3339;

/// The state-store bucket of service tokens (key `{function}={id}`).
pub const TOKENS_BUCKET: &str = "tokens";
/// A token's lifetime when `expires_in` is not given.
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// The longest `expires_in` accepted.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(366 * 24 * 3600);
/// How long a revoked or expired token is remembered after its expiry.
const REMEMBERED_AFTER_EXPIRY: u64 = 24 * 3600 * 1000;
/// What every token starts with (so that a leaked one is easy to recognise in a scan).
pub const TOKEN_PREFIX: &str = "sgt_";
/// Longest token name.
const MAX_NAME_LEN: usize = 64;

/// One token as stored (its hash, never its value).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StoredToken {
    /// Its id (16 hex digits), for revocation.
    pub id: String,
    /// The function it opens.
    pub function: String,
    /// Its name, sent to the replica as `X-Sluicegate-Token-Name`.
    pub name: String,
    /// SHA-256 of the token, 64 hex digits.
    pub sha256: String,
    /// When it was created, Unix milliseconds.
    pub created_unix_ms: u64,
    /// When it stops being accepted, Unix milliseconds.
    pub expires_unix_ms: u64,
    /// When it was revoked, if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_unix_ms: Option<u64>,
}

impl StoredToken {
    /// Its key in [`TOKENS_BUCKET`].
    pub fn key(&self) -> String {
        format!("{}={}", self.function, self.id)
    }

    /// Whether it can be forgotten at `now_ms`.
    fn forgotten(&self, now_ms: u64) -> bool {
        self.expires_unix_ms.saturating_add(REMEMBERED_AFTER_EXPIRY) <= now_ms
    }

    /// What the admin API shows of it (never the token).
    pub fn info(&self, now_ms: u64) -> TokenInfo {
        let state = if self.revoked_unix_ms.is_some() {
            "revoked"
        } else if self.expires_unix_ms <= now_ms {
            "expired"
        } else {
            "active"
        };
        TokenInfo {
            id: self.id.clone(),
            name: self.name.clone(),
            created_at: rfc3339(self.created_unix_ms),
            expires_at: rfc3339(self.expires_unix_ms),
            revoked_at: self.revoked_unix_ms.map(rfc3339),
            state,
        }
    }
}

/// A token as the admin API lists it.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TokenInfo {
    /// Its id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// When it was created (RFC 3339).
    pub created_at: String,
    /// When it stops (or stopped) being accepted.
    pub expires_at: String,
    /// When it was revoked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
    /// `active`, `expired` or `revoked`.
    pub state: &'static str,
}

/// One token in memory.
struct Held {
    stored: StoredToken,
    hash: [u8; 32],
    header: HeaderValue,
}

/// Every function's tokens, in memory (the state store holds the same).
#[derive(Default)]
pub struct Tokens {
    by_function: RwLock<HashMap<String, Vec<Held>>>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens").finish_non_exhaustive()
    }
}

impl Tokens {
    /// Adds (or replaces, by id) a stored token; `false` when its record is not usable.
    pub fn insert(&self, stored: StoredToken) -> bool {
        let (Some(hash), Ok(header)) = (
            from_hex(&stored.sha256),
            HeaderValue::from_str(&stored.name),
        ) else {
            return false;
        };
        let mut all = self.by_function.write().unwrap();
        let tokens = all.entry(stored.function.clone()).or_default();
        tokens.retain(|t| t.stored.id != stored.id);
        tokens.push(Held {
            stored,
            hash,
            header,
        });
        true
    }

    /// Removes a token from memory.
    pub fn remove(&self, function: &str, id: &str) {
        if let Some(tokens) = self.by_function.write().unwrap().get_mut(function) {
            tokens.retain(|t| t.stored.id != id);
        }
    }

    /// The token `id` of `function`, as stored.
    pub fn get(&self, function: &str, id: &str) -> Option<StoredToken> {
        let all = self.by_function.read().unwrap();
        all.get(function)?
            .iter()
            .find(|t| t.stored.id == id)
            .map(|t| t.stored.clone())
    }

    /// Every token of `function`, oldest first.
    pub fn list(&self, function: &str) -> Vec<StoredToken> {
        let all = self.by_function.read().unwrap();
        let mut list: Vec<StoredToken> = all
            .get(function)
            .map(|ts| ts.iter().map(|t| t.stored.clone()).collect())
            .unwrap_or_default();
        list.sort_by(|a, b| (a.created_unix_ms, &a.id).cmp(&(b.created_unix_ms, &b.id)));
        list
    }

    /// Tokens that can be forgotten at `now_ms` (the caller deletes them from the store, then
    /// from here).
    pub fn forgettable(&self, now_ms: u64) -> Vec<StoredToken> {
        let all = self.by_function.read().unwrap();
        all.values()
            .flatten()
            .filter(|t| t.stored.forgotten(now_ms))
            .map(|t| t.stored.clone())
            .collect()
    }

    /// The name (as a header value) of `function`'s token `presented` if it is valid at
    /// `now_ms`, else why not.
    pub fn verify(
        &self,
        function: &str,
        presented: &str,
        now_ms: u64,
    ) -> Result<HeaderValue, TokenRefusal> {
        let digest = sha256(presented.as_bytes());
        let all = self.by_function.read().unwrap();
        let mut found: Option<&Held> = None;
        // Every hash compared, whatever matched: the time depends on the count only.
        for t in all.get(function).into_iter().flatten() {
            if constant_time_eq(&t.hash, &digest) {
                found = Some(t);
            }
        }
        let t = found.ok_or(TokenRefusal::Unknown)?;
        if t.stored.revoked_unix_ms.is_some() {
            return Err(TokenRefusal::Revoked);
        }
        if t.stored.expires_unix_ms <= now_ms {
            return Err(TokenRefusal::Expired);
        }
        Ok(t.header.clone())
    }
}

/// A new token of `function` named `name`, valid for `lifetime` from `now_ms`: its value (shown
/// once) and its record. `Err` names what is wrong with the name or lifetime.
pub fn mint(
    function: &str,
    name: &str,
    lifetime: Duration,
    now_ms: u64,
) -> Result<(String, StoredToken), String> {
    if name.is_empty()
        || name.len() > MAX_NAME_LEN
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@' | b':'))
    {
        return Err(format!(
            "name must be 1 to {MAX_NAME_LEN} letters, digits, '-', '_', '.', '@' or ':'"
        ));
    }
    if lifetime.is_zero() || lifetime > MAX_TOKEN_LIFETIME {
        return Err(format!(
            "expires_in must be more than 0 and at most {} days",
            MAX_TOKEN_LIFETIME.as_secs() / 86_400
        ));
    }
    let rng = ring::rand::SystemRandom::new();
    let mut secret = [0u8; 32];
    let mut id = [0u8; 8];
    rng.fill(&mut secret)
        .and_then(|()| rng.fill(&mut id))
        .map_err(|_| "the operating system's random generator failed".to_owned())?;
    let token = format!("{TOKEN_PREFIX}{}", hex(&secret));
    let stored = StoredToken {
        id: hex(&id),
        function: function.to_owned(),
        name: name.to_owned(),
        sha256: hex(&sha256(token.as_bytes())),
        created_unix_ms: now_ms,
        expires_unix_ms: now_ms.saturating_add(lifetime.as_millis() as u64),
        revoked_unix_ms: None,
    };
    Ok((token, stored))
}

fn sha256(data: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y));
    std::hint::black_box(diff) == 0
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn from_hex(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn a_minted_token_verifies_until_it_expires_and_only_its_hash_is_kept() {
        let tokens = Tokens::default();
        let (token, stored) = mint("job", "ci", HOUR, 1_000).unwrap();
        assert!(token.starts_with(TOKEN_PREFIX) && token.len() == 4 + 64);
        assert_eq!(stored.id.len(), 16);
        let json = serde_json::to_string(&stored).unwrap();
        assert!(
            !json.contains(&token[4..]),
            "the token is not in its record"
        );
        assert!(tokens.insert(stored.clone()));
        assert_eq!(tokens.verify("job", &token, 2_000).unwrap(), "ci");
        let end = 1_000 + HOUR.as_millis() as u64;
        assert_eq!(tokens.verify("job", &token, end - 1).unwrap(), "ci");
        assert_eq!(
            tokens.verify("job", &token, end),
            Err(TokenRefusal::Expired)
        );
        assert_eq!(
            tokens.verify("other", &token, 2_000),
            Err(TokenRefusal::Unknown)
        );
        assert_eq!(
            tokens.verify("job", "sgt_nope", 2_000),
            Err(TokenRefusal::Unknown)
        );
        assert_eq!(stored.info(end).state, "expired");
        assert!(tokens.forgettable(end).is_empty());
        let forgotten = end + REMEMBERED_AFTER_EXPIRY;
        assert_eq!(tokens.forgettable(forgotten), [stored]);
    }

    #[test]
    fn two_tokens_are_valid_at_once_and_a_revoked_one_says_so() {
        let tokens = Tokens::default();
        let (old, mut old_record) = mint("job", "v1", HOUR, 0).unwrap();
        let (new, new_record) = mint("job", "v2", HOUR, 10).unwrap();
        tokens.insert(old_record.clone());
        tokens.insert(new_record);
        assert_eq!(tokens.verify("job", &old, 20).unwrap(), "v1");
        assert_eq!(tokens.verify("job", &new, 20).unwrap(), "v2");
        old_record.revoked_unix_ms = Some(30);
        tokens.insert(old_record);
        assert_eq!(tokens.verify("job", &old, 40), Err(TokenRefusal::Revoked));
        assert_eq!(tokens.verify("job", &new, 40).unwrap(), "v2");
        let listed: Vec<_> = tokens
            .list("job")
            .iter()
            .map(|t| t.info(40).state)
            .collect();
        assert_eq!(listed, ["revoked", "active"]);
    }

    #[test]
    fn names_and_lifetimes_are_checked() {
        assert!(mint("job", "", HOUR, 0).is_err());
        assert!(mint("job", "a b", HOUR, 0).is_err());
        assert!(mint("job", &"x".repeat(65), HOUR, 0).is_err());
        assert!(mint("job", "ci@team:1", HOUR, 0).is_ok());
        assert!(mint("job", "ci", Duration::ZERO, 0).is_err());
        assert!(mint("job", "ci", MAX_TOKEN_LIFETIME + HOUR, 0).is_err());
    }

    #[test]
    fn hex_round_trips() {
        let bytes = sha256(b"x");
        assert_eq!(from_hex(&hex(&bytes)), Some(bytes));
        assert_eq!(from_hex("zz"), None);
    }
}
