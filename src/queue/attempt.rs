//! One attempt at an invocation: the call to the replica, reading its answer, and what follows
//! from it (a retry for the store to schedule, or the final [`Report`]: callback, then settled).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use http_body_util::{BodyExt, Limited};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::callback::{deliver_callback, Delivery};
use super::dispatch::Ctx;
use super::retry::{retry_after_header, retry_wait, retryable};
use super::store::{Pending, Settlement};
use crate::error::GatewayError;
use crate::function::{Permit, Rejection};
use crate::metrics::AsyncOutcome;
use crate::proxy;

/// The final word on an invocation: what the callback receives.
pub(super) struct Report {
    /// The function's status, or the gateway's when it got none.
    pub(super) status: u16,
    /// The function's `Content-Type` (or the gateway's `text/plain` for its own errors).
    pub(super) content_type: Option<HeaderValue>,
    /// The function's response body, or the gateway's reason line.
    pub(super) body: Bytes,
    /// The gateway's reason code when it answered itself.
    pub(super) reason: Option<&'static str>,
    /// The failure in one line (for the dead letter), empty on success.
    pub(super) detail: String,
    /// Attempts made.
    pub(super) attempts: u32,
    /// Time the final attempt took, from admission to the end of the response body.
    pub(super) duration: Duration,
}

impl Report {
    /// For an invocation that is final without an attempt now (out of attempts at a restart).
    pub(super) fn without_answer(pending: &Pending, detail: &str) -> Report {
        Report {
            status: pending.last_status,
            content_type: None,
            body: Bytes::new(),
            reason: None,
            detail: detail.to_owned(),
            attempts: pending.attempts,
            duration: Duration::ZERO,
        }
    }

    fn gateway(error: &GatewayError, attempts: u32, duration: Duration) -> Report {
        let mut line = error.to_string();
        line.push('\n');
        Report {
            status: error.status().as_u16(),
            content_type: Some(HeaderValue::from_static("text/plain; charset=utf-8")),
            body: Bytes::from(line),
            reason: Some(error.code()),
            detail: error.to_string(),
            attempts,
            duration,
        }
    }
}

/// The function's answer to one attempt, read whole.
struct Answer {
    status: u16,
    headers: HeaderMap,
    body: Bytes,
}

/// Why an attempt got no usable answer, and whether another attempt could help.
struct AttemptError {
    error: GatewayError,
    retry: bool,
}

impl From<GatewayError> for AttemptError {
    fn from(error: GatewayError) -> Self {
        let retry = retryable(error.status().as_u16());
        AttemptError { error, retry }
    }
}

/// Sends the invocation to the replica `permit` holds a slot on and reads the answer whole (kept
/// only when there is a callback to give it to). The slot is freed when this returns.
async fn call(ctx: &Ctx, pending: &Pending, permit: Permit) -> Result<Answer, AttemptError> {
    let function = ctx.function();
    let inv = &pending.invocation;
    let mut headers = HeaderMap::with_capacity(inv.headers.len() + 1);
    for (name, value) in &inv.headers {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_maybe_shared(value.clone()),
        ) {
            headers.append(n, v);
        }
    }
    headers.insert(CONTENT_LENGTH, HeaderValue::from(inv.body.len()));
    let resp = proxy::send_stored(
        function,
        &permit,
        &inv.path_and_query,
        headers,
        inv.body.clone(),
    )
    .await?;
    let (parts, body) = resp.into_parts();
    let timeout = function.config.timeout;
    let body = if inv.callback.is_some() {
        let limit = function.config.async_max_body_bytes();
        match tokio::time::timeout(timeout, Limited::new(body, limit as usize).collect()).await {
            Err(_) => return Err(GatewayError::UpstreamTimeout(timeout).into()),
            Ok(Ok(collected)) => collected.to_bytes(),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
                // Another attempt would send the same body: final.
                return Err(AttemptError {
                    error: GatewayError::UpstreamInvalid(format!(
                        "response body exceeds the async limit ({limit} bytes) for the callback"
                    )),
                    retry: false,
                });
            }
            Ok(Err(e)) => return Err(GatewayError::UpstreamReset(e.to_string()).into()),
        }
    } else {
        // Nobody will read it: drain it to free the connection and the slot.
        let drained = tokio::time::timeout(timeout, async {
            let mut body = body;
            while let Some(frame) = body.frame().await {
                frame?;
            }
            Ok::<(), crate::upstream::BoxError>(())
        })
        .await;
        match drained {
            Err(_) => return Err(GatewayError::UpstreamTimeout(timeout).into()),
            Ok(Err(e)) => return Err(GatewayError::UpstreamReset(e.to_string()).into()),
            Ok(Ok(())) => Bytes::new(),
        }
    };
    drop(permit);
    Ok(Answer {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    })
}

/// One attempt: forward (if admitted), read the answer, then have the store retry it later, or
/// finish. `slot` is the dispatcher's count of attempts in flight: held until the attempt is over.
pub(super) async fn attempt(
    ctx: Arc<Ctx>,
    pending: Pending,
    admitted: Result<Permit, Rejection>,
    arrived: Instant,
    slot: OwnedSemaphorePermit,
) {
    let function = ctx.function().clone();
    let config = &function.config;
    let result = match admitted {
        Ok(permit) => call(&ctx, &pending, permit).await,
        Err(rejection) => Err(GatewayError::Rejected(rejection).into()),
    };
    let duration = arrived.elapsed();
    let attempts = pending.attempts + 1;
    // Counted like any invocation of the function, with the status it got.
    let (status, retry, retry_after) = match &result {
        Ok(answer) => (
            answer.status,
            retryable(answer.status),
            retry_after_header(&answer.headers),
        ),
        Err(e) => {
            if let Some(reason) = e.error.reject_reason() {
                function.metrics.rejected(reason);
            }
            (
                e.error.status().as_u16(),
                e.retry,
                e.error.retry_after().map(Duration::from_secs),
            )
        }
    };
    function.metrics.observe(status, duration.as_secs_f64());

    if retry && attempts < config.async_max_attempts {
        let wait = retry_wait(
            config.async_initial_retry_wait,
            config.async_max_retry_wait,
            attempts,
            retry_after,
        );
        function.metrics.async_outcome(AsyncOutcome::Retried);
        debug!(function = %function.name, call_id = %pending.invocation.call_id, status, attempts, wait_ms = wait.as_millis() as u64, "async attempt failed; retrying");
        // When it runs again is the store's to keep.
        let retry = Settlement::Retry {
            attempts,
            status,
            after: wait,
        };
        if let Err(e) = ctx.store.settle(&function.name, pending.seq, retry).await {
            warn!(error = %e, seq = pending.seq, "async store: could not record an attempt");
        }
        drop(slot);
        return;
    }

    let (outcome, report) = match result {
        Ok(answer) => {
            let outcome = if retry {
                AsyncOutcome::DeadLettered
            } else if answer.status < 400 {
                AsyncOutcome::Succeeded
            } else {
                AsyncOutcome::Failed
            };
            let detail = if outcome == AsyncOutcome::Succeeded {
                String::new()
            } else {
                format!("function answered {}", answer.status)
            };
            let report = Report {
                status: answer.status,
                content_type: answer.headers.get(CONTENT_TYPE).cloned(),
                body: answer.body,
                reason: None,
                detail,
                attempts,
                duration,
            };
            (outcome, report)
        }
        Err(e) => {
            let outcome = if e.retry {
                AsyncOutcome::DeadLettered
            } else {
                AsyncOutcome::Failed
            };
            (outcome, Report::gateway(&e.error, attempts, duration))
        }
    };
    finish(ctx, pending, report, outcome, slot).await;
}

/// The outcome is final: count it, free the dispatcher's slot, deliver the callback, then settle
/// the invocation in the store (done, or a dead letter).
pub(super) async fn finish(
    ctx: Arc<Ctx>,
    pending: Pending,
    report: Report,
    outcome: AsyncOutcome,
    slot: OwnedSemaphorePermit,
) {
    let function = ctx.function().clone();
    function.metrics.async_outcome(outcome);
    function.metrics.async_backlog.dec();
    // The callback runs beside the queue: it does not count against `async_concurrency`.
    drop(slot);
    let inv = &pending.invocation;
    match outcome {
        AsyncOutcome::DeadLettered => {
            warn!(function = %function.name, call_id = %inv.call_id, status = report.status, attempts = report.attempts, reason = %report.detail, "async invocation dead-lettered")
        }
        _ => {
            debug!(function = %function.name, call_id = %inv.call_id, status = report.status, attempts = report.attempts, "async invocation finished")
        }
    }
    let mut refused = None;
    if let Some(url) = &inv.callback {
        match deliver_callback(&ctx, url, &inv.call_id, &report).await {
            Delivery::Settled => {}
            // Shutting down mid-delivery: keep the invocation stored, it runs again at the next start.
            Delivery::Stopping => return,
            Delivery::Refused(reason) => refused = Some(reason),
        }
    }
    let settlement = if let Some(reason) = refused {
        Settlement::DeadLetter {
            attempts: report.attempts,
            status: report.status,
            reason,
        }
    } else if outcome == AsyncOutcome::DeadLettered {
        Settlement::DeadLetter {
            attempts: report.attempts,
            status: report.status,
            reason: report.detail,
        }
    } else {
        Settlement::Done {
            attempts: report.attempts,
            status: report.status,
            reason: report.detail,
        }
    };
    if let Err(e) = ctx
        .store
        .settle(&function.name, pending.seq, settlement)
        .await
    {
        warn!(error = %e, "async store: could not finish an invocation; it may run again after a restart");
    }
    ctx.lane.release();
}
