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
use crate::upstream::UpstreamBody;

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

/// Checks `X-Callback-Url`: an absolute `http://` URL with a host.
pub(super) fn parse_callback_url(value: &HeaderValue) -> Result<String, GatewayError> {
    let text = value
        .to_str()
        .map_err(|_| GatewayError::BadCallbackUrl("not visible ASCII".into()))?
        .trim();
    let uri: Uri = text
        .parse()
        .map_err(|_| GatewayError::BadCallbackUrl(format!("`{text}` is not a URL")))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => {
            return Err(GatewayError::BadCallbackUrl(format!(
                "`{text}`: scheme `{other}` is not supported (only http)"
            )))
        }
        None => {
            return Err(GatewayError::BadCallbackUrl(format!(
                "`{text}` is not an absolute http:// URL"
            )))
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(GatewayError::BadCallbackUrl(format!(
            "`{text}` has no host"
        )));
    }
    Ok(text.to_owned())
}

/// POSTs the report to the callback URL, retrying a few times. `false` when the gateway began
/// shutting down before the delivery was settled.
pub(super) async fn deliver_callback(ctx: &Ctx, url: &str, call_id: &str, report: &Report) -> bool {
    let function = ctx.function();
    let config = &function.config;
    let Ok(uri) = url.parse::<Uri>() else {
        function.metrics.callback(CallbackResult::Failed);
        return true;
    };
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
                debug!(function = %function.name, call_id, error = %e, "callback failed");
                (None, None)
            }
            Err(_) => (None, None),
        };
        if status.is_some_and(|s| s.is_success()) {
            function.metrics.callback(CallbackResult::Delivered);
            return true;
        }
        let again = status.is_none_or(|s| retryable(s.as_u16()));
        if !again || n == CALLBACK_ATTEMPTS {
            function.metrics.callback(CallbackResult::Failed);
            warn!(function = %function.name, call_id, url, status = status.map(|s| s.as_u16()), attempts = n, "async callback not delivered; giving up");
            return true;
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
            _ = stop.wait_for(|s| *s) => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callback_urls_must_be_absolute_http() {
        let ok = |s: &'static str| parse_callback_url(&HeaderValue::from_static(s));
        assert_eq!(
            ok("http://127.0.0.1:9/cb?x=1").unwrap(),
            "http://127.0.0.1:9/cb?x=1"
        );
        assert!(ok("https://example.com/").is_err());
        assert!(ok("/relative").is_err());
        assert!(ok("example.com/cb").is_err());
        assert!(ok("not a url").is_err());
        assert!(ok("ftp://x/").is_err());
    }
}
