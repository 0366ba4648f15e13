//! Forwarding one admitted request to the replica its permit holds a slot on: the request
//! rewritten by the forwarding rules, the function's `timeout` on the response head, the response
//! streamed back with the permit riding in its body, upstream failures mapped to statuses.
//!
//! [`forward`] is the sync path's "forward with the permit" phase (see `gateway::invoke` for the
//! phases before it):
//! 1. rewrite the request: path `/{rest}` plus the query, hop-by-hop headers out, `X-Forwarded-*`
//!    and `X-Call-Id` in (the rules are in `forwarding`; the sync path applies them while encoding);
//! 2. send it with the function's `timeout` on the response head (`504` past it, `502` when the
//!    replica refuses or resets);
//! 3. stream the response back, hop-by-hop headers out, the slot freed when the body ends;
//!    a `101 Switching Protocols` becomes a bidirectional tunnel that holds the slot.
//!
//! A stored async invocation takes the same phase through [`send_stored`], with its headers
//! already rewritten when it was accepted and its body held in memory.

use std::error::Error as StdError;

use crate::incoming::Incoming;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::time::Instant;
use tracing::debug;

use crate::body::ResponseBody;
use crate::config::Auth;
use crate::error::GatewayError;
use crate::forwarding::{
    content_length, forwarded_host, is_upgrade, replica_path, replica_path_and_query,
    strip_hop_by_hop, Forwarded, Peer, TokenName, CALL_ID, COLD_START,
};
use crate::function::{Function, Permit, Waited};
use crate::incoming::OnUpgrade;
use crate::upstream::{
    self, BodyLimitExceeded, ClientBodyError, PooledBody, UpstreamBody, UpstreamError,
};

/// Forwards `req` to the replica `permit` holds a slot on and returns the replica's response,
/// which carries the permit. The replica's path is what follows byte `name_end` of the request
/// path (`/` when nothing does); `declared` is the request's valid `Content-Length`, if any.
pub async fn forward(
    function: &Function,
    permit: Permit,
    mut req: Request<Incoming>,
    name_end: usize,
    peer: &Peer,
    call_id: &HeaderValue,
    declared: Option<u64>,
) -> Result<Response<ResponseBody>, GatewayError> {
    let config = &function.config;
    let limit = config.max_body_bytes;

    // 1. The upstream request. The sync path applies the header rules while encoding the head
    //    (no insertions into the client's header map); upgrades go through hyper with the map
    //    rewritten.
    // Only an HTTP/1 connection can switch protocols; it put the client's end in the extensions.
    let upgrade = if is_upgrade(req.headers()) {
        req.extensions_mut().remove::<OnUpgrade>()
    } else {
        None
    };
    let (mut parts, body) = req.into_parts();
    let forwarded_host = forwarded_host(&parts);
    let endpoint = permit.endpoint().clone();
    strip_hop_by_hop(&mut parts.headers, upgrade.is_some());
    let mut forwarded = Forwarded::new(&parts.headers, peer, forwarded_host, call_id);
    if function.config.auth == Auth::Token {
        forwarded.set_token_name(parts.extensions.remove::<TokenName>());
    }
    let body = UpstreamBody::stream(body, limit);

    // 2. Send, bounded by the function's timeout on the response head.
    let mut resp = if upgrade.is_some() {
        parts.uri = origin_form(replica_path_and_query(&parts.uri, name_end))?;
        parts.version = http::Version::HTTP_11;
        forwarded.apply(&mut parts.headers);
        parts
            .headers
            .insert(header::HOST, endpoint.upstream.host_header.clone());
        let upstream_req = Request::from_parts(parts, body);
        // Boxed: hyper's client handshake is large, and upgrades are rare.
        let exchange = Box::pin(upstream::send_upgrade(&endpoint, upstream_req));
        tokio::time::timeout(config.timeout, exchange)
            .await
            .unwrap_or(Err(UpstreamError::Timeout))
            .map_err(|e| classify(&e, limit, config.timeout))?
    } else {
        let outgoing = upstream::Outgoing {
            method: &parts.method,
            path: replica_path(&parts.uri, name_end),
            query: parts.uri.query(),
            headers: &parts.headers,
            forwarded: Some(&forwarded),
            content_length: declared,
            now: permit.granted(),
            deadline: Instant::now() + config.timeout,
            body_idle: config.response_idle_timeout,
        };
        // The deadline is enforced by the connection's own reusable timer (see `upstream`).
        upstream::send(&endpoint, outgoing, body)
            .await
            .map_err(|e| classify(&e, limit, config.timeout))?
    };

    // 3. The response, streamed back; the permit rides in the body (or the tunnel).
    let waited = permit.waited();
    let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    strip_hop_by_hop(resp.headers_mut(), switching && upgrade.is_some());
    let headers = resp.headers_mut();
    headers.insert(CALL_ID.clone(), call_id.clone());
    if let Waited::ColdStart(held) = waited {
        if let Ok(v) = HeaderValue::from_str(&format!("{:.3}", held.as_secs_f64())) {
            headers.insert(COLD_START.clone(), v);
        }
    }
    if switching {
        let Some(client_side) = upgrade else {
            return Err(GatewayError::UpstreamInvalid(
                "101 Switching Protocols to a request that asked for no upgrade".into(),
            ));
        };
        let upstream_side = hyper::upgrade::on(&mut resp);
        let name = function.name.clone();
        tokio::spawn(async move {
            let _slot = permit;
            let client_side = async { client_side.await.map_err(|e| e.to_string()) };
            let upstream_side = async { upstream_side.await.map_err(|e| e.to_string()) };
            match tokio::try_join!(client_side, upstream_side) {
                Ok((mut client_io, upstream_io)) => {
                    let mut upstream_io = TokioIo::new(upstream_io);
                    let _ = tokio::io::copy_bidirectional(&mut client_io, &mut upstream_io).await;
                }
                Err(e) => debug!(function = %name, error = %e, "upgrade failed"),
            }
        });
        let (parts, _) = resp.into_parts();
        return Ok(Response::from_parts(parts, ResponseBody::empty()));
    }
    let (parts, body) = resp.into_parts();
    Ok(Response::from_parts(
        parts,
        ResponseBody::upstream(body, permit),
    ))
}

/// Sends a stored async invocation (headers already rewritten by
/// [`rewrite_request_headers`](crate::forwarding::rewrite_request_headers),
/// body in memory) as `POST path_and_query` to the replica `permit` holds a slot on, with the
/// function's `timeout` on the response head. The response comes back with hop-by-hop headers
/// removed; its body is the caller's to read (the slot stays taken until `permit` is dropped).
pub async fn send_stored(
    function: &Function,
    permit: &Permit,
    path_and_query: &str,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response<PooledBody>, GatewayError> {
    let timeout = function.config.timeout;
    // Stored data goes on the request line: make sure it is a valid origin-form target.
    let target = origin_form(path_and_query.to_owned())?;
    let body = UpstreamBody::Full((!body.is_empty()).then_some(body));
    let outgoing = upstream::Outgoing {
        method: &http::Method::POST,
        path: target.path(),
        query: target.query(),
        headers: &headers,
        forwarded: None,
        content_length: content_length(&headers),
        now: permit.granted(),
        deadline: Instant::now() + timeout,
        body_idle: function.config.response_idle_timeout,
    };
    let mut resp = upstream::send(permit.endpoint(), outgoing, body)
        .await
        .map_err(|e| classify(&e, 0, timeout))?;
    strip_hop_by_hop(resp.headers_mut(), false);
    Ok(resp)
}

/// An origin-form request target (the replica's address goes in `Host`).
fn origin_form(path_and_query: String) -> Result<Uri, GatewayError> {
    Uri::try_from(path_and_query).map_err(|e| GatewayError::Internal(format!("upstream uri: {e}")))
}

/// Maps an upstream failure to the gateway's status: no response head within `timeout` → 504,
/// body limit → 413, client body → 400, refused → 502, a response that breaks HTTP → 502,
/// anything else before a response → 502.
fn classify(e: &UpstreamError, limit: u64, timeout: std::time::Duration) -> GatewayError {
    let e = match e {
        UpstreamError::Timeout => return GatewayError::UpstreamTimeout(timeout),
        UpstreamError::Connect(reason) => return GatewayError::UpstreamConnect(reason.clone()),
        UpstreamError::Protocol(p) => return GatewayError::UpstreamInvalid(p.to_string()),
        UpstreamError::Closed | UpstreamError::Io(_) => {
            return GatewayError::UpstreamReset(e.to_string())
        }
        UpstreamError::RequestBody(body) => {
            if body.downcast_ref::<BodyLimitExceeded>().is_some() {
                return GatewayError::BodyTooLarge(limit);
            }
            return GatewayError::ClientBody(body.to_string());
        }
        UpstreamError::Http(e) => e,
    };
    let mut source: Option<&(dyn StdError + 'static)> = e.source();
    let mut deepest = e.to_string();
    while let Some(s) = source {
        if s.downcast_ref::<BodyLimitExceeded>().is_some() {
            return GatewayError::BodyTooLarge(limit);
        }
        if let Some(c) = s.downcast_ref::<ClientBodyError>() {
            return GatewayError::ClientBody(c.to_string());
        }
        deepest = s.to_string();
        source = s.source();
    }
    GatewayError::UpstreamReset(deepest)
}
