//! The async record and the dead letters through the admin API: `GET /system/async/{call_id}`,
//! `GET /system/async-dead-letters`, and the replay and discard of one dead letter. The gateway
//! checks the admin token first; this answers with JSON.

use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Response, StatusCode};
use serde::Serialize;
use tracing::info;

use super::store::{AsyncRecord, DeadLetter, DEFAULT_LISTED_DEAD_LETTERS};
use super::AsyncQueue;
use crate::body::ResponseBody;
use crate::error::GatewayError;
pub use crate::state::rfc3339;

/// Most dead letters one `GET /system/async-dead-letters` lists (`limit`).
pub const MAX_LISTED_DEAD_LETTERS: usize = 1000;

/// What an admin request does to one dead letter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeadLetterAction {
    /// `POST …/{function}/{id}/replay`.
    Replay,
    /// `DELETE …/{function}/{id}`.
    Discard,
}

/// A record as JSON.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct RecordView<'a> {
    call_id: &'a str,
    function: &'a str,
    state: &'static str,
    attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
    #[serde(skip_serializing_if = "str::is_empty")]
    reason: &'a str,
    accepted_at: String,
    updated_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dead_letter: Option<DeadLetterRef<'a>>,
    replays: u32,
}

#[derive(Debug, Serialize)]
struct DeadLetterRef<'a> {
    function: &'a str,
    id: u64,
}

impl<'a> RecordView<'a> {
    fn new(record: &'a AsyncRecord, retention: Duration) -> RecordView<'a> {
        RecordView {
            call_id: &record.call_id,
            function: &record.function,
            state: record.state.name(),
            attempts: record.attempts,
            status: (record.status != 0).then_some(record.status),
            reason: &record.reason,
            accepted_at: rfc3339(record.accepted_unix_ms),
            updated_at: rfc3339(record.updated_unix_ms),
            expires_at: record.expires_unix_ms(retention).map(rfc3339),
            dead_letter: record.dead_letter.map(|id| DeadLetterRef {
                function: &record.function,
                id,
            }),
            replays: record.replays,
        }
    }
}

/// A dead letter as JSON (without its body).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct DeadLetterView<'a> {
    id: u64,
    function: &'a str,
    call_id: &'a str,
    attempts: u32,
    status: u16,
    reason: &'a str,
    accepted_at: String,
    dead_at: String,
    path: &'a str,
    callback: bool,
    body_bytes: usize,
}

impl<'a> DeadLetterView<'a> {
    fn new(function: &'a str, letter: &'a DeadLetter) -> DeadLetterView<'a> {
        let inv = &letter.invocation;
        DeadLetterView {
            id: letter.seq,
            function,
            call_id: &inv.call_id,
            attempts: letter.attempts,
            status: letter.status,
            reason: &letter.reason,
            accepted_at: rfc3339(inv.accepted_unix_ms),
            dead_at: rfc3339(letter.dead_unix_ms),
            path: &inv.path_and_query,
            callback: inv.callback.is_some(),
            body_bytes: inv.body.len(),
        }
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct DeadLettersView<'a> {
    total: u64,
    dead_letters: Vec<DeadLetterView<'a>>,
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<ResponseBody> {
    let body = serde_json::to_vec_pretty(value).expect("views serialize");
    let mut resp = Response::new(ResponseBody::full(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn unavailable(e: impl std::fmt::Display) -> GatewayError {
    GatewayError::AsyncStoreUnavailable(e.to_string())
}

impl AsyncQueue {
    fn open_store(&self) -> Result<&std::sync::Arc<dyn super::AsyncStore>, GatewayError> {
        self.store
            .as_ref()
            .map_err(|reason| GatewayError::AsyncStoreUnavailable(reason.clone()))
    }

    /// `GET /system/async/{call_id}` (`call_id` as in the path, percent-encoded).
    pub async fn record_response(
        &self,
        call_id: &str,
    ) -> Result<Response<ResponseBody>, GatewayError> {
        let call_id = percent_decode(call_id)
            .ok_or_else(|| GatewayError::BadRequest("the call id is not valid UTF-8".into()))?;
        let record = self
            .open_store()?
            .record(&call_id)
            .await
            .map_err(unavailable)?
            .ok_or(GatewayError::NoAsyncRecord(call_id))?;
        Ok(json(
            StatusCode::OK,
            &RecordView::new(&record, self.retention),
        ))
    }

    /// `GET /system/async-dead-letters[?function=NAME][&limit=N]`: the oldest `limit` (default
    /// 100, at most 1000) dead letters, and how many there are.
    pub async fn dead_letters_response(
        &self,
        query: Option<&str>,
    ) -> Result<Response<ResponseBody>, GatewayError> {
        let mut function = None;
        let mut limit = DEFAULT_LISTED_DEAD_LETTERS;
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "function" if crate::config::is_valid_function_name(value) => {
                    function = Some(value.to_owned())
                }
                "function" => return Err(GatewayError::MalformedName),
                "limit" => {
                    limit = value
                        .parse::<usize>()
                        .ok()
                        .filter(|n| (1..=MAX_LISTED_DEAD_LETTERS).contains(n))
                        .ok_or_else(|| {
                            GatewayError::BadRequest(format!(
                                "limit must be a number from 1 to {MAX_LISTED_DEAD_LETTERS}"
                            ))
                        })?
                }
                other => {
                    return Err(GatewayError::BadRequest(format!(
                        "unknown parameter `{other}` (function, limit)"
                    )))
                }
            }
        }
        let page = self
            .open_store()?
            .list_dead_letters(function.as_deref(), limit)
            .await
            .map_err(unavailable)?;
        let view = DeadLettersView {
            total: page.total,
            dead_letters: page
                .letters
                .iter()
                .map(|(f, letter)| DeadLetterView::new(f, letter))
                .collect(),
        };
        Ok(json(StatusCode::OK, &view))
    }

    /// `POST /system/async-dead-letters/{function}/{id}/replay` (`202` and the record: stored
    /// again as a new invocation, `async_max_backlog` applying) or `DELETE …/{function}/{id}`
    /// (`200` and the record: gone for good).
    pub async fn dead_letter_response(
        &self,
        function: &str,
        id: u64,
        action: DeadLetterAction,
    ) -> Result<Response<ResponseBody>, GatewayError> {
        let store = self.open_store()?;
        let no_letter = || GatewayError::NoDeadLetter {
            function: function.to_owned(),
            id,
        };
        match action {
            DeadLetterAction::Replay => {
                let lane = self
                    .lanes
                    .get(function)
                    .map(|l| l.value().clone())
                    .ok_or_else(|| GatewayError::UnknownFunction(function.to_owned()))?;
                let reservation = lane.reserve()?;
                let record = store
                    .replay(function, id)
                    .await
                    .map_err(unavailable)?
                    .ok_or_else(no_letter)?;
                reservation.stored();
                self.ensure_dispatcher(&lane);
                info!(function, dead_letter = id, call_id = %record.call_id, seq = record.seq, replays = record.replays, "async dead letter replayed");
                let mut resp = json(
                    StatusCode::ACCEPTED,
                    &RecordView::new(&record, self.retention),
                );
                if let Ok(value) = HeaderValue::from_str(&record.call_id) {
                    resp.headers_mut()
                        .insert(&crate::forwarding::CALL_ID, value);
                }
                Ok(resp)
            }
            DeadLetterAction::Discard => {
                let record = store
                    .discard(function, id)
                    .await
                    .map_err(unavailable)?
                    .ok_or_else(no_letter)?;
                info!(function, dead_letter = id, call_id = %record.call_id, "async dead letter discarded");
                Ok(json(
                    StatusCode::OK,
                    &RecordView::new(&record, self.retention),
                ))
            }
        }
    }
}

/// `%XX` escapes decoded; `None` when the result is not UTF-8 or an escape is malformed.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_250), "2000-02-29T00:00:00.250Z");
        assert_eq!(rfc3339(1_735_689_599_999), "2024-12-31T23:59:59.999Z");
    }

    #[test]
    fn call_ids_are_percent_decoded() {
        assert_eq!(percent_decode("a%20b%2Fc").as_deref(), Some("a b/c"));
        assert_eq!(percent_decode("plain-id").as_deref(), Some("plain-id"));
        assert_eq!(percent_decode("bad%2"), None);
        assert_eq!(percent_decode("%ff"), None);
    }
}
