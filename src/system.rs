//! The admin API under `/system`: function status (OpenFaaS field names), manual scaling, pause
//! and resume, service tokens (what survives a restart of those is in `controls.rs`).
//!
//! When an admin token is configured, every `/system` request needs `Authorization: Bearer TOKEN`;
//! without it the answer is `401`. Without a token, a listener that is not loopback refuses
//! `/system` with `403` unless `[gateway] admin_open` is set.

mod controls;
mod reload;
mod tokens;

use std::sync::Arc;

use crate::incoming::Incoming;
use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use http::{Request, Response};
use http_body_util::{BodyExt, Limited};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tracing::info;

pub use controls::{Controls, CreatedToken, PausedRecord, PAUSED_BUCKET};
pub use reload::{reload, Reload, ReloadReport};
pub use tokens::{
    StoredToken, TokenInfo, DEFAULT_TOKEN_LIFETIME, MAX_TOKEN_LIFETIME, TOKENS_BUCKET, TOKEN_PREFIX,
};

use crate::body::ResponseBody;
use crate::error::GatewayError;
use crate::function::{Function, Functions};

/// Largest `/system/scale-function` body accepted.
const MAX_ADMIN_BODY: usize = 64 * 1024;

/// One function's status, as `GET /system/function/{name}` returns it.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FunctionStatus {
    /// The function's name.
    pub name: String,
    /// `process` or `static`.
    pub provider: String,
    /// Replicas asked of the provider (OpenFaaS `replicas`).
    pub replicas: u32,
    /// Ready replicas (OpenFaaS `availableReplicas`).
    pub available_replicas: u32,
    /// Responses so far, every status (OpenFaaS `invocationCount`).
    pub invocation_count: u64,
    /// Requests being served now.
    pub ongoing: u64,
    /// Requests waiting now.
    pub queued: u64,
    /// Arrivals in the sliding window.
    pub window_requests: u64,
    /// Replicas the gateway last asked for (autoscaler, cold start or manual).
    pub desired_replicas: i64,
    /// Autoscaler bounds.
    pub min_replicas: u32,
    /// Autoscaler bounds.
    pub max_replicas: u32,
    /// Autoscaler mode.
    pub autoscaler: String,
    /// `cooldown_period`: a duration (`300s`), or `adaptive` with its bounds.
    #[serde(default)]
    pub cooldown: String,
    /// `cooldown_period = "adaptive"`: the idle time after which the function goes to zero, as
    /// learned now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_alive_seconds: Option<f64>,
    /// `cooldown_period = "adaptive"`: the idle time after which one replica is started again
    /// before the predicted next request (absent: no pre-warm).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prewarm_seconds: Option<f64>,
    /// Whether the function is paused (`POST /system/pause-function/{name}`).
    #[serde(default)]
    pub paused: bool,
    /// What its sync requests get while paused: `refuse` or `hold`.
    #[serde(default)]
    pub when_paused: String,
    /// Who may invoke it: `none` or `token` (service tokens).
    #[serde(default)]
    pub auth: String,
    /// When this gateway is one of several: the whole cluster's figures for the function.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterStatus>,
}

/// A function's figures over every live gateway of a cluster (this one included).
#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClusterStatus {
    /// Live gateways.
    pub gateways: u32,
    /// Requests being served, all gateways.
    pub ongoing: u64,
    /// Requests waiting, all gateways.
    pub queued: u64,
    /// Arrivals in the window, all gateways.
    pub window_requests: u64,
    /// This gateway's share of `max_ongoing_requests` per replica.
    pub share: u32,
    /// Whether this gateway is the autoscaler leader.
    pub leader: bool,
}

/// Status of one function now.
pub fn status(f: &Function) -> FunctionStatus {
    let now = Instant::now();
    let figures = f.figures(now);
    let cluster = f.peer_figures(now).map(|p| ClusterStatus {
        gateways: p.gateways + 1,
        ongoing: figures.ongoing + p.ongoing,
        queued: figures.queued + p.queued,
        window_requests: figures.window_requests + p.window_requests,
        share: f.share(),
        leader: f.is_leader(),
    });
    let adaptive = f.metrics.adaptive_windows();
    FunctionStatus {
        name: f.name.to_string(),
        provider: f.backend().kind().to_owned(),
        replicas: figures.replicas,
        available_replicas: figures.ready,
        invocation_count: f.metrics.invocation_count(),
        ongoing: figures.ongoing,
        queued: figures.queued,
        window_requests: figures.window_requests,
        desired_replicas: f.metrics.desired.get(),
        min_replicas: f.config.autoscaler.min_replicas,
        max_replicas: f.config.autoscaler.max_replicas,
        autoscaler: f.config.autoscaler.mode.name().to_owned(),
        cooldown: f.config.autoscaler.describe_cooldown(),
        keep_alive_seconds: adaptive.map(|(k, _)| k.as_secs_f64()),
        prewarm_seconds: adaptive.and_then(|(_, p)| p).map(|p| p.as_secs_f64()),
        paused: f.is_paused(),
        when_paused: f.config.when_paused.name().to_owned(),
        auth: f.config.auth.name().to_owned(),
        cluster,
    }
}

/// What the admin API works on: the functions, and the bearer token `/system` requires (if any).
#[derive(Clone, Copy, Debug)]
pub struct Admin<'a> {
    /// Every function.
    pub functions: &'a Functions,
    /// `Authorization: Bearer TOKEN` is required when set.
    pub token: Option<&'a str>,
    /// Without a token: why `/system` is refused (a listener that is not loopback), if it is.
    pub refusal: Option<&'static str>,
    /// Pauses and service tokens.
    pub controls: &'a Controls,
}

/// `Ok` when `req` may use `/system`: the bearer token when one is configured, else a loopback
/// listener (or `admin_open`).
pub fn authorize<B>(admin: Admin<'_>, req: &Request<B>) -> Result<(), GatewayError> {
    let Some(token) = admin.token else {
        return match admin.refusal {
            Some(reason) => Err(GatewayError::AdminClosed(reason)),
            None => Ok(()),
        };
    };
    let given = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or("");
    if constant_time_eq(given.as_bytes(), token.as_bytes()) {
        Ok(())
    } else {
        Err(GatewayError::Unauthorized)
    }
}

/// `given == secret`, in a time that depends only on `given`'s length: every byte of `given` is
/// compared (against `secret` repeated), with no early exit, so neither the position of the
/// first difference nor the secret's length shows in the timing.
fn constant_time_eq(given: &[u8], secret: &[u8]) -> bool {
    if secret.is_empty() {
        return false;
    }
    let mut diff = u8::from(given.len() != secret.len());
    for (i, g) in given.iter().enumerate() {
        diff |= g ^ secret[i % secret.len()];
    }
    std::hint::black_box(diff) == 0
}

fn json<T: Serialize>(value: &T) -> Response<ResponseBody> {
    json_sized(value, 512)
}

/// `value` as pretty JSON into a buffer of `capacity` bytes to start with.
fn json_sized<T: Serialize>(value: &T, capacity: usize) -> Response<ResponseBody> {
    let mut body = Vec::with_capacity(capacity);
    serde_json::to_writer_pretty(&mut body, value).expect("status serializes");
    let mut resp = Response::new(ResponseBody::full(Bytes::from(body)));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// `GET /system/functions`.
pub fn list<B>(admin: Admin<'_>, req: &Request<B>) -> Result<Response<ResponseBody>, GatewayError> {
    authorize(admin, req)?;
    let mut all = admin.functions.all();
    all.sort_by(|a, b| a.name.cmp(&b.name));
    // One status at a time, straight into the body (about 300 bytes each).
    Ok(json_sized(&Statuses(&all), 512 + all.len() * 320))
}

/// Serializes as the list of the functions' statuses, each built as it is written.
struct Statuses<'a>(&'a [Arc<Function>]);

impl Serialize for Statuses<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(|f| status(f)))
    }
}

/// `GET /system/function/{name}`.
pub fn get<B>(
    admin: Admin<'_>,
    req: &Request<B>,
    name: &str,
) -> Result<Response<ResponseBody>, GatewayError> {
    authorize(admin, req)?;
    let f = admin
        .functions
        .get(name)
        .ok_or_else(|| GatewayError::UnknownFunction(name.to_owned()))?;
    Ok(json(&status(&f)))
}

#[derive(Debug, Deserialize)]
struct ScaleRequest {
    replicas: i64,
    // OpenFaaS clients also send these; accepted and ignored.
    #[serde(default, rename = "serviceName")]
    _service_name: Option<String>,
    #[serde(default)]
    _namespace: Option<String>,
}

/// `POST /system/scale-function/{name}` with `{"replicas": N}`, clamped to the function's bounds.
pub async fn scale(
    admin: Admin<'_>,
    req: Request<Incoming>,
    name: &str,
) -> Result<Response<ResponseBody>, GatewayError> {
    authorize(admin, &req)?;
    let f = function(admin, name)?;
    let request: ScaleRequest = json_body(req, r#"{"replicas": 2}"#).await?;
    if f.is_paused() {
        return Err(GatewayError::FunctionPaused(name.to_owned()));
    }
    if !f.backend().scalable() {
        return Err(GatewayError::BadRequest(format!(
            "function {name} uses provider {} and cannot be scaled",
            f.backend().kind()
        )));
    }
    if request.replicas < 0 {
        return Err(GatewayError::BadRequest("replicas must be >= 0".into()));
    }
    let bounds = &f.config.autoscaler;
    let replicas = (request.replicas.min(u32::MAX as i64) as u32)
        .clamp(bounds.min_replicas, bounds.max_replicas);
    info!(function = %name, asked = request.replicas, replicas, "manual scale");
    f.scale_manually(replicas);
    Ok(json(&status(&f)))
}

/// The function named, or `404`.
/// An admin request's JSON body (at most `MAX_ADMIN_BODY`); a `400` naming `example` otherwise.
async fn json_body<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
    example: &str,
) -> Result<T, GatewayError> {
    let body = Limited::new(req.into_body(), MAX_ADMIN_BODY)
        .collect()
        .await
        .map_err(|e| GatewayError::BadRequest(format!("cannot read body: {e}")))?
        .to_bytes();
    serde_json::from_slice(&body)
        .map_err(|e| GatewayError::BadRequest(format!("expected a JSON body like {example}: {e}")))
}

fn function(admin: Admin<'_>, name: &str) -> Result<Arc<Function>, GatewayError> {
    admin
        .functions
        .get(name)
        .ok_or_else(|| GatewayError::UnknownFunction(name.to_owned()))
}

/// `POST /system/pause-function/{name}`: the function goes to zero replicas and its requests
/// are refused (`503 paused`) or held (`when_paused = "hold"`) until the resume; its autoscaler
/// stops; async invocations are accepted and wait. Answers its status.
pub async fn pause<B>(
    admin: Admin<'_>,
    req: Request<B>,
    name: &str,
) -> Result<Response<ResponseBody>, GatewayError> {
    authorize(admin, &req)?;
    let f = function(admin, name)?;
    admin.controls.pause(&f).await?;
    Ok(json(&status(&f)))
}

/// `POST /system/resume-function/{name}`: the replica count it had when paused is asked for
/// again, its autoscaler goes on, held requests and waiting async invocations are served.
pub async fn resume<B>(
    admin: Admin<'_>,
    req: Request<B>,
    name: &str,
) -> Result<Response<ResponseBody>, GatewayError> {
    authorize(admin, &req)?;
    let f = function(admin, name)?;
    admin.controls.resume(&f).await?;
    Ok(json(&status(&f)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRequest {
    name: String,
    #[serde(default)]
    expires_in: Option<Lifetime>,
}

/// `expires_in`: seconds, or a duration string (`"30m"`, `"7d"` is not one: `"168h"`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Lifetime {
    Seconds(u64),
    Text(String),
}

/// `POST /system/function/{name}/tokens` with `{"name": …, "expires_in": …}`: `201` with the
/// token, shown this once.
pub async fn create_token(
    admin: Admin<'_>,
    req: Request<Incoming>,
    name: &str,
) -> Result<Response<ResponseBody>, GatewayError> {
    authorize(admin, &req)?;
    let f = function(admin, name)?;
    let request: TokenRequest = json_body(req, r#"{"name": "ci", "expires_in": "24h"}"#).await?;
    let lifetime = match request.expires_in {
        None => DEFAULT_TOKEN_LIFETIME,
        Some(Lifetime::Seconds(s)) => std::time::Duration::from_secs(s),
        Some(Lifetime::Text(text)) => crate::config::parse_duration(&text)
            .map_err(|e| GatewayError::BadRequest(format!("expires_in: {e}")))?,
    };
    let created = admin
        .controls
        .create_token(&f, &request.name, lifetime)
        .await?;
    let mut resp = json(&created);
    *resp.status_mut() = http::StatusCode::CREATED;
    Ok(resp)
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TokenList {
    function: String,
    auth: &'static str,
    tokens: Vec<TokenInfo>,
}

/// `GET /system/function/{name}/tokens`: the function's tokens, without their values.
pub fn list_tokens<B>(
    admin: Admin<'_>,
    req: &Request<B>,
    name: &str,
) -> Result<Response<ResponseBody>, GatewayError> {
    authorize(admin, req)?;
    let f = function(admin, name)?;
    Ok(json(&TokenList {
        function: name.to_owned(),
        auth: f.config.auth.name(),
        tokens: admin.controls.list_tokens(name),
    }))
}

/// `DELETE /system/function/{name}/tokens/{id}`: refused from now on; answers the token's
/// record (`revoked`).
pub async fn revoke_token<B>(
    admin: Admin<'_>,
    req: Request<B>,
    name: &str,
    id: &str,
) -> Result<Response<ResponseBody>, GatewayError> {
    authorize(admin, &req)?;
    function(admin, name)?;
    let info = admin.controls.revoke_token(name, id).await?;
    Ok(json(&info))
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn token_comparison_needs_every_byte_and_the_length() {
        assert!(constant_time_eq(b"s3cret", b"s3cret"));
        assert!(!constant_time_eq(b"s3cre", b"s3cret"));
        assert!(!constant_time_eq(b"s3crets3cret", b"s3cret"));
        assert!(!constant_time_eq(b"s3creT", b"s3cret"));
        assert!(!constant_time_eq(b"", b"s3cret"));
        assert!(!constant_time_eq(b"", b""));
    }
}
