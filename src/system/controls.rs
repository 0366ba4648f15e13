//! What the admin API changes on functions beyond their config, kept in the gateway's state
//! store (`crate::state`) so that it survives a restart, and shared by every function object of
//! one name (a reload replaces the object, not the pause or the tokens):
//!
//! * **pauses** (bucket [`PAUSED_BUCKET`], key the function's name): which functions are paused
//!   and the replica count each had, restored by the resume;
//! * **service tokens** (bucket [`TOKENS_BUCKET`](super::tokens::TOKENS_BUCKET), see
//!   `tokens.rs`).
//!
//! Every change is written to the store first and applied only once the store said it is
//! durable: a change the store refused is answered `503 state_unavailable` and changes nothing.
//! The request path reads only memory (the function's pause flag, the tokens' hashes).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::header::AUTHORIZATION;
use http::{Request, Uri};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::tokens::{self, StoredToken, TokenInfo, Tokens, TOKENS_BUCKET};
use crate::config::Auth;
use crate::error::{GatewayError, TokenRefusal};
use crate::forwarding::TokenName;
use crate::function::Function;
use crate::state::{rfc3339, unix_ms, StateStore};

/// The state-store bucket of paused functions (key: the function's name).
pub const PAUSED_BUCKET: &str = "paused";
/// Longest wait for the state store.
const STATE_TIMEOUT: Duration = Duration::from_secs(5);

/// A paused function, as stored.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PausedRecord {
    /// Replicas asked for when it was paused (what the resume restores).
    pub replicas: u32,
    /// When it was paused, Unix milliseconds.
    pub paused_unix_ms: u64,
}

/// Pauses and service tokens: see the module doc.
pub struct Controls {
    state: Result<Arc<dyn StateStore>, String>,
    paused: Mutex<BTreeMap<String, PausedRecord>>,
    tokens: Tokens,
    /// One change at a time (a store write, then memory).
    changes: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Controls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controls").finish_non_exhaustive()
    }
}

/// A token just created: the only time its value is shown.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CreatedToken {
    /// Its id (for `DELETE …/tokens/{id}`).
    pub id: String,
    /// Its name.
    pub name: String,
    /// The token itself.
    pub token: String,
    /// When it was created.
    pub created_at: String,
    /// When it stops being accepted.
    pub expires_at: String,
    /// Whether the function requires tokens now (`auth = "token"`); a token can be created
    /// beforehand, to switch a function to tokens without refusing its callers.
    pub enforced: bool,
}

/// `state`'s answer within [`STATE_TIMEOUT`], its failure as a one-line reason.
async fn within<T>(
    what: impl std::future::Future<Output = Result<T, crate::state::StateError>>,
) -> Result<T, String> {
    match tokio::time::timeout(STATE_TIMEOUT, what).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "the state store did not answer within {STATE_TIMEOUT:?}"
        )),
    }
}

impl Controls {
    /// Controls kept in `state` (or in memory only, refusing changes, when there is none: the
    /// reason). Nothing is read until [`Controls::load`].
    pub fn new(state: Result<Arc<dyn StateStore>, String>) -> Controls {
        Controls {
            state,
            paused: Mutex::new(BTreeMap::new()),
            tokens: Tokens::default(),
            changes: tokio::sync::Mutex::new(()),
        }
    }

    fn store(&self) -> Result<&Arc<dyn StateStore>, GatewayError> {
        self.state
            .as_ref()
            .map_err(|reason| GatewayError::StateUnavailable(reason.clone()))
    }

    /// Reads the pauses and tokens the store holds (at start, before any function is adopted).
    /// A store that cannot be read is logged: the gateway starts with none.
    pub async fn load(&self) {
        let Ok(state) = &self.state else {
            return;
        };
        match within(state.state_scan(PAUSED_BUCKET)).await {
            Ok(all) => {
                let mut paused = self.paused.lock().unwrap();
                for (name, bytes) in all {
                    match serde_json::from_slice::<PausedRecord>(&bytes) {
                        Ok(record) => {
                            paused.insert(name, record);
                        }
                        Err(e) => {
                            warn!(function = %name, error = %e, "state store: unreadable pause record; ignored")
                        }
                    }
                }
            }
            Err(e) => {
                warn!(error = %e, "state store: cannot read the paused functions; none is paused")
            }
        }
        match within(state.state_scan(TOKENS_BUCKET)).await {
            Ok(all) => {
                for (key, bytes) in all {
                    let usable = serde_json::from_slice::<StoredToken>(&bytes)
                        .is_ok_and(|t| t.key() == key && self.tokens.insert(t));
                    if !usable {
                        warn!(key = %key, "state store: unreadable service token record; ignored");
                    }
                }
            }
            Err(e) => {
                warn!(error = %e, "state store: cannot read the service tokens; every token function refuses its callers")
            }
        }
        self.forget_old_tokens().await;
    }

    /// Applies what is kept for `function`'s name to this function object (a function built at
    /// start, by a reload or by discovery): a paused one is paused at once. Returns whether it
    /// is paused.
    pub fn adopt(&self, function: &Arc<Function>) -> bool {
        let paused = self.paused.lock().unwrap().contains_key(&*function.name);
        if paused {
            function.pause();
        }
        paused
    }

    /// The functions paused now, by name.
    pub fn paused(&self) -> BTreeMap<String, PausedRecord> {
        self.paused.lock().unwrap().clone()
    }

    /// Pauses `function` (see `function::pause`), once the pause is stored. Pausing a paused
    /// function changes nothing.
    pub async fn pause(&self, function: &Arc<Function>) -> Result<(), GatewayError> {
        let _change = self.changes.lock().await;
        let name = function.name.to_string();
        if self.paused.lock().unwrap().contains_key(&name) {
            function.pause();
            return Ok(());
        }
        let record = PausedRecord {
            replicas: function.backend().replicas(),
            paused_unix_ms: unix_ms(),
        };
        let bytes = serde_json::to_vec(&record).expect("a pause record serializes");
        within(self.store()?.state_put(PAUSED_BUCKET, &name, bytes))
            .await
            .map_err(GatewayError::StateUnavailable)?;
        self.paused
            .lock()
            .unwrap()
            .insert(name.clone(), record.clone());
        function.pause();
        info!(function = %name, replicas_before = record.replicas, mode = function.config.when_paused.name(), "function paused");
        Ok(())
    }

    /// Resumes `function` with the replica count it had when paused, once the resume is stored.
    /// Resuming a function that is not paused changes nothing.
    pub async fn resume(&self, function: &Arc<Function>) -> Result<(), GatewayError> {
        let _change = self.changes.lock().await;
        let name = function.name.to_string();
        let Some(record) = self.paused.lock().unwrap().get(&name).cloned() else {
            function.resume(function.backend().replicas());
            return Ok(());
        };
        within(self.store()?.state_delete(PAUSED_BUCKET, &name))
            .await
            .map_err(GatewayError::StateUnavailable)?;
        self.paused.lock().unwrap().remove(&name);
        function.resume(record.replicas);
        info!(function = %name, replicas = record.replicas, paused_since = %rfc3339(record.paused_unix_ms), "function resumed");
        Ok(())
    }

    /// Checks the service token of a request to `function` (`auth = "token"`): from
    /// `Authorization: Bearer`, else from the function's `token_query_param`. When it is valid,
    /// both are removed from the request (the replica sees neither) and the token's name goes
    /// with it (`X-Sluicegate-Token-Name`); otherwise the `401` to answer.
    pub fn authenticate<B>(
        &self,
        function: &Function,
        req: &mut Request<B>,
    ) -> Result<(), GatewayError> {
        let param = function.config.token_query_param.as_deref();
        let from_header = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            });
        let from_query = param.and_then(|p| query_value(req.uri().query()?, p));
        let presented = from_header
            .or(from_query)
            .filter(|t| !t.is_empty())
            .ok_or(GatewayError::TokenRefused(TokenRefusal::Missing))?;
        let name = self
            .tokens
            .verify(&function.name, presented, unix_ms())
            .map_err(GatewayError::TokenRefused)?;
        req.headers_mut().remove(AUTHORIZATION);
        if let Some(param) = param {
            if let Some(uri) = without_query_param(req.uri(), param) {
                *req.uri_mut() = uri;
            }
        }
        req.extensions_mut().insert(TokenName(name));
        Ok(())
    }

    /// Creates a token of `function` named `name`, valid for `lifetime`, once it is stored.
    pub async fn create_token(
        &self,
        function: &Function,
        name: &str,
        lifetime: Duration,
    ) -> Result<CreatedToken, GatewayError> {
        let now = unix_ms();
        let (token, stored) =
            tokens::mint(&function.name, name, lifetime, now).map_err(GatewayError::BadRequest)?;
        let change = self.changes.lock().await;
        let bytes = serde_json::to_vec(&stored).expect("a token record serializes");
        within(self.store()?.state_put(TOKENS_BUCKET, &stored.key(), bytes))
            .await
            .map_err(GatewayError::StateUnavailable)?;
        self.tokens.insert(stored.clone());
        let info = stored.info(now);
        info!(function = %function.name, token_id = %stored.id, token_name = %stored.name, expires_at = %info.expires_at, "service token created");
        drop(change);
        self.forget_old_tokens().await;
        Ok(CreatedToken {
            id: stored.id,
            name: stored.name,
            token,
            created_at: info.created_at,
            expires_at: info.expires_at,
            enforced: function.config.auth == Auth::Token,
        })
    }

    /// Revokes token `id` of `function`, once stored: refused from then on (remembered as
    /// revoked until a day after its expiry). Revoking a revoked token changes nothing.
    pub async fn revoke_token(&self, function: &str, id: &str) -> Result<TokenInfo, GatewayError> {
        let _change = self.changes.lock().await;
        let unknown = || GatewayError::UnknownToken {
            function: function.to_owned(),
            id: id.to_owned(),
        };
        let mut stored = self.tokens.get(function, id).ok_or_else(unknown)?;
        let now = unix_ms();
        if stored.revoked_unix_ms.is_some() {
            return Ok(stored.info(now));
        }
        stored.revoked_unix_ms = Some(now);
        let bytes = serde_json::to_vec(&stored).expect("a token record serializes");
        within(self.store()?.state_put(TOKENS_BUCKET, &stored.key(), bytes))
            .await
            .map_err(GatewayError::StateUnavailable)?;
        self.tokens.insert(stored.clone());
        info!(function = %function, token_id = %stored.id, token_name = %stored.name, "service token revoked");
        Ok(stored.info(now))
    }

    /// Every token of `function`, oldest first, without their values.
    pub fn list_tokens(&self, function: &str) -> Vec<TokenInfo> {
        let now = unix_ms();
        self.tokens
            .list(function)
            .iter()
            .map(|t| t.info(now))
            .collect()
    }

    /// Deletes the tokens revoked or expired more than a day ago.
    async fn forget_old_tokens(&self) {
        let Ok(state) = &self.state else {
            return;
        };
        for old in self.tokens.forgettable(unix_ms()) {
            if within(state.state_delete(TOKENS_BUCKET, &old.key()))
                .await
                .is_ok()
            {
                self.tokens.remove(&old.function, &old.id);
            }
        }
    }
}

/// The value of `param` in `query` (the first one), as written.
fn query_value<'a>(query: &'a str, param: &str) -> Option<&'a str> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == param).then_some(v)
    })
}

/// `uri` without any `param=…` in its query; `None` when it has none.
fn without_query_param(uri: &Uri, param: &str) -> Option<Uri> {
    let query = uri.query()?;
    let key = |kv: &str| kv.split_once('=').map_or(kv, |(k, _)| k) == param;
    if !query.split('&').any(key) {
        return None;
    }
    let kept: Vec<&str> = query.split('&').filter(|kv| !key(kv)).collect();
    let mut path_and_query = uri.path().to_owned();
    if !kept.is_empty() {
        path_and_query.push('?');
        path_and_query.push_str(&kept.join("&"));
    }
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(path_and_query.parse().ok()?);
    Uri::from_parts(parts).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_parameter_is_taken_out_of_the_query_and_nothing_else() {
        let uri: Uri = "/function/job/x?a=1&token=sgt_1&b=2".parse().unwrap();
        assert_eq!(query_value(uri.query().unwrap(), "token"), Some("sgt_1"));
        let stripped = without_query_param(&uri, "token").unwrap();
        assert_eq!(stripped, "/function/job/x?a=1&b=2");
        let only: Uri = "/function/job?token=sgt_1".parse().unwrap();
        assert_eq!(
            without_query_param(&only, "token").unwrap(),
            "/function/job"
        );
        let none: Uri = "/function/job?tokens=1".parse().unwrap();
        assert!(without_query_param(&none, "token").is_none());
    }
}
