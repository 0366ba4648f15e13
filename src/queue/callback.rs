//! Callbacks: the `X-Callback-Url` an accept checks, and the delivery of an invocation's final
//! answer to it.

use std::time::Duration;

use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Request, Uri};
use http_body_util::BodyExt;
use tracing::{debug, warn};

use super::attempt::Report;
use super::dispatch::Ctx;
use super::retry::{retry_after_header, retry_wait, retryable};
use crate::error::{GatewayError, REASON_HEADER};
use crate::forwarding::CALL_ID;
use crate::metrics::CallbackResult;
use crate::upstream::{self, refusal, CallbackClient, Refused, UpstreamBody};

/// Request header naming where to POST the outcome.
pub static CALLBACK_URL: HeaderName = HeaderName::from_static("x-callback-url");
/// Callback header: the function's name.
pub static FUNCTION_NAME: HeaderName = HeaderName::from_static("x-function-name");
/// Callback header: the function's status code (or the gateway's, when it could not get one).
pub static FUNCTION_STATUS: HeaderName = HeaderName::from_static("x-function-status");
/// Callback header: how long the final attempt took, seconds.
pub static DURATION_SECONDS: HeaderName = HeaderName::from_static("x-duration-seconds");
/// Callback header: attempts made.
pub static ATTEMPTS: HeaderName = HeaderName::from_static("x-sluicegate-attempts");

/// Callback deliveries per outcome before it is given up.
pub const CALLBACK_ATTEMPTS: u32 = 4;
/// Time a callback receiver has to answer.
pub const CALLBACK_TIMEOUT: Duration = Duration::from_secs(30);

/// Checks `X-Callback-Url`: an absolute `http://` URL with a host, whose every address the
/// gateway's callback rules allow (resolved now; a refusal is `400 bad_callback_url`).
pub(super) async fn parse_callback_url(
    value: &HeaderValue,
    client: &CallbackClient,
) -> Result<String, GatewayError> {
    let text = value
        .to_str()
        .map_err(|_| GatewayError::BadCallbackUrl("not visible ASCII".into()))?
        .trim();
    let uri = upstream::parse_callback_url(text)
        .map_err(|Refused(why)| GatewayError::BadCallbackUrl(why))?;
    client
        .check(&uri)
        .await
        .map_err(|Refused(why)| GatewayError::BadCallbackUrl(format!("`{text}`: {why}")))?;
    Ok(text.to_owned())
}

/// How a callback delivery ended.
pub(super) enum Delivery {
    /// Delivered, or given up after its attempts: the invocation is settled as it ended.
    Settled,
    /// The gateway began shutting down first: the invocation stays stored.
    Stopping,
    /// The URL's address is refused now (its name resolves elsewhere than at accept, or the
    /// rules changed): the invocation becomes a dead letter with this reason.
    Refused(String),
}

/// POSTs the report to the callback URL, retrying a few times; the address is checked again
/// first (and at every connection).
pub(super) async fn deliver_callback(
    ctx: &Ctx,
    url: &str,
    call_id: &str,
    report: &Report,
) -> Delivery {
    let function = ctx.function();
    let config = &function.config;
    let Ok(uri) = url.parse::<Uri>() else {
        function.metrics.callback(CallbackResult::Failed);
        return Delivery::Settled;
    };
    if let Err(Refused(why)) = ctx.client.check(&uri).await {
        function.metrics.callback(CallbackResult::Failed);
        warn!(function = %function.name, call_id, reason = %why, "async callback refused");
        return Delivery::Refused(format!("callback refused: {why}"));
    }
    let mut stop = ctx.stop.clone();
    for n in 1..=CALLBACK_ATTEMPTS {
        let mut req = Request::new(UpstreamBody::Full(
            (!report.body.is_empty()).then(|| report.body.clone()),
        ));
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = uri.clone();
        let h = req.headers_mut();
        if let Ok(v) = HeaderValue::from_str(call_id) {
            h.insert(CALL_ID.clone(), v);
        }
        if let Ok(v) = HeaderValue::from_str(&function.name) {
            h.insert(FUNCTION_NAME.clone(), v);
        }
        h.insert(FUNCTION_STATUS.clone(), HeaderValue::from(report.status));
        if let Ok(v) = HeaderValue::from_str(&format!("{:.6}", report.duration.as_secs_f64())) {
            h.insert(DURATION_SECONDS.clone(), v);
        }
        h.insert(ATTEMPTS.clone(), HeaderValue::from(report.attempts));
        h.insert(CONTENT_LENGTH, HeaderValue::from(report.body.len()));
        if let Some(ct) = &report.content_type {
            h.insert(CONTENT_TYPE, ct.clone());
        }
        if let Some(reason) = report.reason {
            h.insert(REASON_HEADER, HeaderValue::from_static(reason));
        }
        let sent = tokio::time::timeout(CALLBACK_TIMEOUT, ctx.client.request(req)).await;
        let (status, retry_after) = match sent {
            Ok(Ok(resp)) => {
                let status = resp.status();
                let retry_after = retry_after_header(resp.headers());
                let _ = resp.into_body().collect().await;
                (Some(status), retry_after)
            }
            Ok(Err(e)) => {
                if let Some(Refused(why)) = refusal(&e) {
                    function.metrics.callback(CallbackResult::Failed);
                    warn!(function = %function.name, call_id, reason = %why, "async callback refused");
                    return Delivery::Refused(format!("callback refused: {why}"));
                }
                debug!(function = %function.name, call_id, error = %e, "callback failed");
                (None, None)
            }
            Err(_) => (None, None),
        };
        if status.is_some_and(|s| s.is_success()) {
            function.metrics.callback(CallbackResult::Delivered);
            return Delivery::Settled;
        }
        let again = status.is_none_or(|s| retryable(s.as_u16()));
        if !again || n == CALLBACK_ATTEMPTS {
            function.metrics.callback(CallbackResult::Failed);
            warn!(function = %function.name, call_id, url, status = status.map(|s| s.as_u16()), attempts = n, "async callback not delivered; giving up");
            return Delivery::Settled;
        }
        function.metrics.callback(CallbackResult::Retried);
        let wait = retry_wait(
            config.async_initial_retry_wait,
            config.async_max_retry_wait,
            n,
            retry_after,
        );
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => return Delivery::Stopping,
        }
    }
    Delivery::Settled
}
