//! Errors on the request path, and THE one function that turns an error into an HTTP response.
//!
//! Every response the gateway makes itself comes from [`GatewayError::into_response`]: one arm per
//! reason, a one-line body naming it, `Retry-After` on every capacity `503`, and an
//! `X-Sluicegate-Reason` header so a client can tell a gateway error from a function's own.
//! Errors are tagged by side: downstream (the client's request) → 4xx, upstream (the replica) →
//! 502/504, capacity → 503, internal → 500.

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{Response, StatusCode};

use crate::body::ResponseBody;
use crate::function::Rejection;
use crate::metrics::RejectReason;

/// Header naming the reason of a gateway-made response.
pub const REASON_HEADER: &str = "x-sluicegate-reason";
/// `Retry-After` when the async store is unavailable: a store that failed to open or write does
/// not come back by itself within seconds.
pub const ASYNC_STORE_RETRY_AFTER: u64 = 30;

/// Why the gateway answered a request itself.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    // Downstream: the client's request.
    /// No function of that name is configured.
    #[error("function {0} not found")]
    UnknownFunction(String),
    /// No route matches the path.
    #[error("no route for {0}")]
    NoRoute(String),
    /// The function name in the path is not a valid name.
    #[error("malformed function name: must match [a-z0-9]([-a-z0-9]*[a-z0-9])? and be at most 63 characters")]
    MalformedName,
    /// The method is not allowed on this route.
    #[error("method not allowed; use {0}")]
    MethodNotAllowed(&'static str),
    /// The request body is larger than `max_body_bytes`.
    #[error("request body exceeds max_body_bytes ({0} bytes)")]
    BodyTooLarge(u64),
    /// The client's request body could not be read.
    #[error("could not read the request body: {0}")]
    ClientBody(String),
    /// A malformed admin request.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// `X-Callback-Url` is not an absolute `http://` URL.
    #[error("invalid X-Callback-Url: {0}")]
    BadCallbackUrl(String),
    /// The request body is in a transfer coding the gateway cannot pass on (only `chunked`).
    #[error("transfer coding `{0}` is not supported (only chunked)")]
    TransferCoding(String),
    /// No record of an async invocation with that call id (unknown, or expired).
    #[error("no async invocation with call id {0:?}: unknown, or finished longer ago than [gateway] async_record_retention")]
    NoAsyncRecord(String),
    /// No such dead letter.
    #[error("no dead letter {id} of function {function}")]
    NoDeadLetter {
        /// The function named.
        function: String,
        /// The dead letter's id named.
        id: u64,
    },
    /// `POST /system/reload` with a config file that does not load: the running config stays.
    /// The message is the line `sluicegate check-config` prints.
    #[error("sluicegate: invalid configuration: {0}")]
    InvalidConfig(String),
    /// `/system` without the right bearer token.
    #[error("missing or wrong bearer token")]
    Unauthorized,
    /// `/system` on a listener that is not loopback, with no admin token and `admin_open` off.
    #[error("{0}")]
    AdminClosed(&'static str),
    /// A function with `auth = "token"` called without a valid service token.
    #[error("{}", .0.message())]
    TokenRefused(TokenRefusal),
    /// No service token with that id (`DELETE /system/function/{name}/tokens/{id}`).
    #[error("function {function} has no service token {id}")]
    UnknownToken {
        /// The function named.
        function: String,
        /// The token id named.
        id: String,
    },
    /// An admin change that a paused function cannot take (a manual scale).
    #[error("function {0} is paused: resume it first (POST /system/resume-function/{0})")]
    FunctionPaused(String),
    /// The gateway's state store (pauses, service tokens) could not be read or written: nothing
    /// was changed.
    #[error("state store unavailable, nothing was changed: {0}")]
    StateUnavailable(String),

    // Capacity.
    /// Admission turned the request away.
    #[error("{}", rejection_message(.0))]
    Rejected(Rejection),
    /// The gateway is shutting down.
    #[error("gateway is draining for shutdown")]
    Draining,
    /// `async_max_backlog` async invocations of the function are accepted and not yet finished.
    #[error("function's async backlog is full: {max} invocations accepted and not yet finished (async_max_backlog)")]
    AsyncBacklogFull {
        /// The function's `async_max_backlog`.
        max: u64,
        /// Suggested `Retry-After`, whole seconds ≥ 1.
        retry_after: u64,
    },
    /// The async store could not be opened or written: nothing was stored.
    #[error("async store unavailable, nothing was stored: {0}")]
    AsyncStoreUnavailable(String),

    // Upstream: the replica.
    /// The replica refused the connection.
    #[error("function replica refused the connection: {0}")]
    UpstreamConnect(String),
    /// The replica closed or reset the connection before a response began.
    #[error("function replica closed the connection before responding: {0}")]
    UpstreamReset(String),
    /// The replica did not start its response within the function's `timeout`.
    #[error("function did not respond within its timeout ({0:?})")]
    UpstreamTimeout(std::time::Duration),
    /// The upstream answered something we cannot forward.
    #[error("function replica sent an invalid response: {0}")]
    UpstreamInvalid(String),

    // Internal.
    /// A bug or an impossible state; logged.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Why a service token was refused (`401`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenRefusal {
    /// No `Authorization: Bearer` header and no token query parameter.
    Missing,
    /// No token of the function has that value.
    Unknown,
    /// The token's `expiresAt` has passed.
    Expired,
    /// The token was revoked.
    Revoked,
}

impl TokenRefusal {
    /// The `X-Sluicegate-Reason` code.
    pub fn code(self) -> &'static str {
        match self {
            TokenRefusal::Missing => "token_missing",
            TokenRefusal::Unknown => "token_invalid",
            TokenRefusal::Expired => "token_expired",
            TokenRefusal::Revoked => "token_revoked",
        }
    }

    /// The body line.
    pub fn message(self) -> &'static str {
        match self {
            TokenRefusal::Missing => {
                "this function needs a service token (Authorization: Bearer TOKEN)"
            }
            TokenRefusal::Unknown => "service token not recognised",
            TokenRefusal::Expired => "service token expired",
            TokenRefusal::Revoked => "service token revoked",
        }
    }

    /// The `WWW-Authenticate` challenge (RFC 6750 §3: no error code when no token was sent).
    fn challenge(self) -> &'static str {
        match self {
            TokenRefusal::Missing => "Bearer realm=\"sluicegate\"",
            TokenRefusal::Unknown => "Bearer realm=\"sluicegate\", error=\"invalid_token\", error_description=\"token not recognised\"",
            TokenRefusal::Expired => "Bearer realm=\"sluicegate\", error=\"invalid_token\", error_description=\"token expired\"",
            TokenRefusal::Revoked => "Bearer realm=\"sluicegate\", error=\"invalid_token\", error_description=\"token revoked\"",
        }
    }
}

fn rejection_message(r: &Rejection) -> String {
    match r {
        Rejection::QueueFull { .. } => {
            "function is at capacity: max_queued_requests reached".to_owned()
        }
        Rejection::QueueTimeout { .. } => {
            "function is at capacity: waited queue_timeout without a free replica".to_owned()
        }
        Rejection::ColdStartTimeout { .. } => {
            "no replica became ready within cold_start_timeout".to_owned()
        }
        Rejection::StartFailed { reason, .. } => reason.to_string(),
        Rejection::Paused { .. } => "function is paused".to_owned(),
    }
}

impl From<Rejection> for GatewayError {
    fn from(r: Rejection) -> Self {
        GatewayError::Rejected(r)
    }
}

impl GatewayError {
    /// The HTTP status for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::UnknownFunction(_)
            | GatewayError::NoRoute(_)
            | GatewayError::NoAsyncRecord(_)
            | GatewayError::NoDeadLetter { .. } => StatusCode::NOT_FOUND,
            GatewayError::MalformedName
            | GatewayError::ClientBody(_)
            | GatewayError::BadRequest(_)
            | GatewayError::InvalidConfig(_)
            | GatewayError::BadCallbackUrl(_) => StatusCode::BAD_REQUEST,
            GatewayError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            GatewayError::TransferCoding(_) => StatusCode::NOT_IMPLEMENTED,
            GatewayError::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::Unauthorized | GatewayError::TokenRefused(_) => StatusCode::UNAUTHORIZED,
            GatewayError::UnknownToken { .. } => StatusCode::NOT_FOUND,
            GatewayError::FunctionPaused(_) => StatusCode::CONFLICT,
            GatewayError::AdminClosed(_) => StatusCode::FORBIDDEN,
            GatewayError::Rejected(_)
            | GatewayError::Draining
            | GatewayError::AsyncBacklogFull { .. }
            | GatewayError::AsyncStoreUnavailable(_)
            | GatewayError::StateUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::UpstreamConnect(_)
            | GatewayError::UpstreamReset(_)
            | GatewayError::UpstreamInvalid(_) => StatusCode::BAD_GATEWAY,
            GatewayError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A short machine-readable reason, sent as `X-Sluicegate-Reason`.
    pub fn code(&self) -> &'static str {
        match self {
            GatewayError::UnknownFunction(_) => "unknown_function",
            GatewayError::NoRoute(_) => "no_route",
            GatewayError::NoAsyncRecord(_) => "unknown_call_id",
            GatewayError::NoDeadLetter { .. } => "unknown_dead_letter",
            GatewayError::MalformedName => "malformed_name",
            GatewayError::MethodNotAllowed(_) => "method_not_allowed",
            GatewayError::BodyTooLarge(_) => "body_too_large",
            GatewayError::ClientBody(_) => "client_body",
            GatewayError::BadRequest(_) => "bad_request",
            GatewayError::InvalidConfig(_) => "invalid_config",
            GatewayError::BadCallbackUrl(_) => "bad_callback_url",
            GatewayError::TransferCoding(_) => "unsupported_transfer_coding",
            GatewayError::Unauthorized => "unauthorized",
            GatewayError::AdminClosed(_) => "admin_closed",
            GatewayError::TokenRefused(r) => r.code(),
            GatewayError::UnknownToken { .. } => "unknown_token",
            GatewayError::FunctionPaused(_) => "function_paused",
            GatewayError::StateUnavailable(_) => "state_unavailable",
            GatewayError::Rejected(r) => r.reason().label(),
            GatewayError::Draining => "draining",
            GatewayError::AsyncBacklogFull { .. } => "async_backlog_full",
            GatewayError::AsyncStoreUnavailable(_) => "async_store_unavailable",
            GatewayError::UpstreamConnect(_) => "upstream_refused",
            GatewayError::UpstreamReset(_) => "upstream_reset",
            GatewayError::UpstreamTimeout(_) => "upstream_timeout",
            GatewayError::UpstreamInvalid(_) => "upstream_invalid",
            GatewayError::Internal(_) => "internal",
        }
    }

    /// The rejection counter this error increments, if any.
    pub fn reject_reason(&self) -> Option<RejectReason> {
        match self {
            GatewayError::Rejected(r) => Some(r.reason()),
            GatewayError::Draining => Some(RejectReason::Draining),
            GatewayError::BodyTooLarge(_) => Some(RejectReason::BodyTooLarge),
            GatewayError::AsyncBacklogFull { .. } => Some(RejectReason::AsyncBacklogFull),
            GatewayError::AsyncStoreUnavailable(_) => Some(RejectReason::AsyncStoreUnavailable),
            _ => None,
        }
    }

    /// `Retry-After` seconds, on capacity errors.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            GatewayError::Rejected(
                Rejection::QueueFull { retry_after }
                | Rejection::QueueTimeout { retry_after }
                | Rejection::ColdStartTimeout { retry_after }
                | Rejection::StartFailed { retry_after, .. }
                | Rejection::Paused { retry_after },
            ) => Some(*retry_after),
            GatewayError::StateUnavailable(_) => Some(ASYNC_STORE_RETRY_AFTER),
            GatewayError::Draining => Some(1),
            GatewayError::AsyncBacklogFull { retry_after, .. } => Some(*retry_after),
            GatewayError::AsyncStoreUnavailable(_) => Some(ASYNC_STORE_RETRY_AFTER),
            _ => None,
        }
    }

    /// The response the client gets: status, one-line body, reason header, `Retry-After`.
    pub fn into_response(self) -> Response<ResponseBody> {
        let status = self.status();
        let mut body = self.to_string();
        body.push('\n');
        let mut resp = Response::new(ResponseBody::full(Bytes::from(body)));
        *resp.status_mut() = status;
        let headers = resp.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        headers.insert(REASON_HEADER, HeaderValue::from_static(self.code()));
        if let Some(secs) = self.retry_after() {
            headers.insert(RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        if let GatewayError::Unauthorized = self {
            headers.insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"sluicegate\""),
            );
        }
        if let GatewayError::TokenRefused(refusal) = self {
            headers.insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static(refusal.challenge()),
            );
        }
        if let GatewayError::MethodNotAllowed(allow) = self {
            headers.insert(http::header::ALLOW, HeaderValue::from_static(allow));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_errors_carry_retry_after_and_a_reason_line() {
        let resp = GatewayError::from(Rejection::QueueFull { retry_after: 3 }).into_response();
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.headers()[RETRY_AFTER], "3");
        assert_eq!(resp.headers()[REASON_HEADER], "queue_full");
    }

    #[test]
    fn upstream_errors_are_502_and_504() {
        assert_eq!(GatewayError::UpstreamConnect("x".into()).status(), 502);
        assert_eq!(GatewayError::UpstreamReset("x".into()).status(), 502);
        assert_eq!(
            GatewayError::UpstreamTimeout(std::time::Duration::from_secs(1)).status(),
            504
        );
        assert!(
            GatewayError::UpstreamTimeout(std::time::Duration::from_secs(1))
                .into_response()
                .headers()
                .get(RETRY_AFTER)
                .is_none()
        );
    }
}
