//! Forwarding one admitted request to one replica: headers, streaming bodies, upstream errors.
//!
//! The chain, in order (see [`forward`]):
//! 1. refuse a declared body over `max_body_bytes` before taking any capacity;
//! 2. admission: a slot on the least-loaded ready replica, or wait in the queue, or a `503`;
//! 3. rewrite the request: path `/{rest}` plus the query, hop-by-hop headers out, `X-Forwarded-*`
//!    and `X-Call-Id` in;
//! 4. send it with the function's `timeout` on the response head (`504` past it, `502` when the
//!    replica refuses or resets);
//! 5. stream the response back, hop-by-hop headers out, the slot freed when the body ends;
//!    a `101 Switching Protocols` becomes a bidirectional tunnel that holds the slot.
//!
//! Async invocations use the same pieces in two halves: at accept time [`rewrite_request_headers`]
//! (step 3's header rules) prepares the request that is stored; at dispatch time, after the queue
//! has taken a slot through the same admission, [`send_stored`] does steps 3-4 for a body held in
//! memory.

use std::error::Error as StdError;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::time::Instant;
use tracing::debug;

use crate::body::{BodyLimitExceeded, ClientBodyError, ResponseBody, UpstreamBody};
use crate::error::GatewayError;
use crate::function::{Function, Permit, Waited};
use crate::upstream::{self, PooledBody, UpstreamError};

/// The request/response header carrying the invocation's id.
pub static CALL_ID: HeaderName = HeaderName::from_static("x-call-id");
/// Response header set when the request waited for a cold start; the value is the wait in seconds.
pub static COLD_START: HeaderName = HeaderName::from_static("x-sluicegate-cold-start");
/// Response header with the time the gateway received the request (Unix nanoseconds, as OpenFaaS).
pub static START_TIME: HeaderName = HeaderName::from_static("x-start-time");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// The pooled HTTP/1.1 client used for every replica.
pub type UpstreamClient = Client<HttpConnector, UpstreamBody>;

/// Builds the upstream client: keep-alive pooling, no connect-level surprises.
pub fn upstream_client() -> UpstreamClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(std::time::Duration::from_secs(5)));
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(std::time::Duration::from_secs(60))
        .pool_max_idle_per_host(1024)
        .build(connector)
}

/// Forwards `req` to a replica of `function` and returns the replica's response. The replica's
/// path is what follows byte `name_end` of the request path (`/` when nothing does).
pub async fn forward(
    function: &Arc<Function>,
    mut req: Request<Incoming>,
    name_end: usize,
    peer: &Peer,
    call_id: &HeaderValue,
    arrived: Instant,
) -> Result<Response<ResponseBody>, GatewayError> {
    let config = &function.config;

    // 1. A declared body over the limit is refused before it takes any capacity.
    let limit = config.max_body_bytes;
    let declared = content_length(req.headers());
    if let Some(len) = declared {
        if limit > 0 && len > limit {
            return Err(GatewayError::BodyTooLarge(limit));
        }
    }

    // 2. Admission: a slot, a place in the queue, or a 503.
    let permit = function.admit(arrived).await?;

    // 3. The upstream request. The sync path applies the header rules while encoding the head
    //    (no insertions into the client's header map); upgrades go through hyper with the map
    //    rewritten.
    let upgrade = is_upgrade(req.headers()).then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let forwarded_host = forwarded_host(&parts);
    let replica = permit.replica().clone();
    strip_hop_by_hop(&mut parts.headers, upgrade.is_some());
    let forwarded = Forwarded::new(&parts.headers, peer, forwarded_host, call_id);
    let body = UpstreamBody::stream(body, limit);

    // 4. Send, bounded by the function's timeout on the response head.
    let mut resp = if upgrade.is_some() {
        parts.uri = origin_form(replica_path_and_query(&parts.uri, name_end))?;
        parts.version = http::Version::HTTP_11;
        forwarded.apply(&mut parts.headers);
        parts
            .headers
            .insert(header::HOST, replica.upstream.host_header.clone());
        let upstream_req = Request::from_parts(parts, body);
        // Boxed: hyper's client handshake is large, and upgrades are rare.
        let exchange = Box::pin(upstream::send_upgrade(&replica, upstream_req));
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
        upstream::send(&replica, outgoing, body)
            .await
            .map_err(|e| classify(&e, limit, config.timeout))?
    };

    // 5. The response, streamed back; the permit rides in the body (or the tunnel).
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
            match tokio::try_join!(client_side, upstream_side) {
                Ok((client_io, upstream_io)) => {
                    let mut client_io = TokioIo::new(client_io);
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

/// Sends a stored async invocation (headers already rewritten by [`rewrite_request_headers`],
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
    let replica = permit.replica();
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
    let mut resp = upstream::send(replica, outgoing, body)
        .await
        .map_err(|e| classify(&e, 0, timeout))?;
    strip_hop_by_hop(resp.headers_mut(), false);
    Ok(resp)
}

/// The host the client addressed (its `Host` header, else the URI's authority), for
/// `X-Forwarded-Host`.
pub fn forwarded_host(parts: &http::request::Parts) -> Option<HeaderValue> {
    parts.headers.get(header::HOST).cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    })
}

/// The replica's path: the request path after byte `name_end`, `/` when nothing follows.
pub fn replica_path(uri: &Uri, name_end: usize) -> &str {
    match uri.path().get(name_end..) {
        None | Some("") => "/",
        Some(path) => path,
    }
}

/// What the replica's request line carries: [`replica_path`] plus the original query.
pub fn replica_path_and_query(uri: &Uri, name_end: usize) -> String {
    let path = replica_path(uri, name_end);
    match uri.query() {
        Some(q) => {
            let mut s = String::with_capacity(path.len() + q.len() + 1);
            s.push_str(path);
            s.push('?');
            s.push_str(q);
            s
        }
        None => path.to_owned(),
    }
}

/// An origin-form request target (the replica's address goes in `Host`).
fn origin_form(path_and_query: String) -> Result<Uri, GatewayError> {
    Uri::try_from(path_and_query).map_err(|e| GatewayError::Internal(format!("upstream uri: {e}")))
}

/// The header rules for a request on its way to a replica: hop-by-hop headers and `Host` out
/// (the upgrade pair kept with `upgrade`), then [`Forwarded`] applied. Async invocations store
/// the result; the sync path applies the same rules while encoding (see [`forward`]).
pub fn rewrite_request_headers(
    headers: &mut HeaderMap,
    peer: &Peer,
    forwarded_host: Option<HeaderValue>,
    call_id: &HeaderValue,
    upgrade: bool,
) {
    strip_hop_by_hop(headers, upgrade);
    headers.remove(header::HOST);
    Forwarded::new(headers, peer, forwarded_host, call_id).apply(headers);
}

/// The headers the gateway sets on every request it forwards: the client's address appended to
/// `X-Forwarded-For`, `X-Forwarded-Proto`, `X-Forwarded-Host` (the host the client addressed) and
/// `X-Call-Id`. They replace any the client sent.
#[derive(Debug)]
pub struct Forwarded {
    values: [Option<HeaderValue>; 4],
}

const FORWARDED_NAMES: [&HeaderName; 4] = [
    &X_FORWARDED_FOR,
    &X_FORWARDED_PROTO,
    &X_FORWARDED_HOST,
    &CALL_ID,
];

impl Forwarded {
    /// The values for a request with `headers` from `peer`.
    pub fn new(
        headers: &HeaderMap,
        peer: &Peer,
        forwarded_host: Option<HeaderValue>,
        call_id: &HeaderValue,
    ) -> Forwarded {
        Forwarded {
            values: [
                Some(forwarded_for(headers, peer)),
                Some(HeaderValue::from_static("http")),
                forwarded_host,
                Some(call_id.clone()),
            ],
        }
    }

    /// Whether the client's header `name` is one of these (and is replaced).
    pub fn replaces(name: &HeaderName) -> bool {
        // Custom names compare as bytes: look at the prefix first.
        name.as_str().starts_with("x-") && FORWARDED_NAMES.contains(&name)
    }

    /// The headers, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
        FORWARDED_NAMES
            .into_iter()
            .zip(&self.values)
            .filter_map(|(n, v)| Some((n, v.as_ref()?)))
    }

    /// Sets them in `headers`.
    pub fn apply(self, headers: &mut HeaderMap) {
        for (name, value) in FORWARDED_NAMES.into_iter().zip(self.values) {
            match value {
                Some(v) => {
                    headers.insert(name.clone(), v);
                }
                None => {
                    headers.remove(name);
                }
            }
        }
    }
}

/// The declared `Content-Length`, if any and valid.
pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Whether the request asks to switch protocols (WebSocket and friends).
fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TE
        || name == header::TRAILER
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == header::PROXY_AUTHENTICATE
        || name == header::PROXY_AUTHORIZATION
        || name == KEEP_ALIVE
        || name == PROXY_CONNECTION
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), including those named in `Connection`.
/// With `upgrade`, `Connection: upgrade` and `Upgrade` are kept for the protocol switch.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // The common case has none: one pass over the names instead of a lookup per hop-by-hop name.
    if !headers.keys().any(is_hop_by_hop) {
        if upgrade {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| {
            !(t.eq_ignore_ascii_case("keep-alive")
                || t.eq_ignore_ascii_case("close")
                || t.eq_ignore_ascii_case("upgrade"))
        })
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(&name);
    }
    headers.remove(&KEEP_ALIVE);
    headers.remove(&PROXY_CONNECTION);
    headers.remove(header::PROXY_AUTHENTICATE);
    headers.remove(header::PROXY_AUTHORIZATION);
    headers.remove(header::TE);
    headers.remove(header::TRAILER);
    headers.remove(header::TRANSFER_ENCODING);
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
}

/// The client end of a connection, with its `X-Forwarded-For` entry rendered once per connection
/// (formatting an address on every request was the costliest line of our request path).
#[derive(Clone, Debug)]
pub struct Peer {
    /// The client's address.
    pub addr: SocketAddr,
    forwarded_for: HeaderValue,
}

impl Peer {
    /// A peer at `addr`.
    pub fn new(addr: SocketAddr) -> Peer {
        let forwarded_for = HeaderValue::from_str(&addr.ip().to_string())
            .expect("an IP address is a valid header value");
        Peer {
            addr,
            forwarded_for,
        }
    }
}

/// `X-Forwarded-For` with the client's address appended.
fn forwarded_for(headers: &HeaderMap, peer: &Peer) -> HeaderValue {
    let mut sent = headers.get_all(&X_FORWARDED_FOR).iter().peekable();
    if sent.peek().is_none() {
        return peer.forwarded_for.clone();
    }
    let mut buf = BytesMut::with_capacity(64);
    for part in sent {
        buf.put_slice(part.as_bytes());
        buf.put_slice(b", ");
    }
    buf.put_slice(peer.forwarded_for.as_bytes());
    HeaderValue::from_maybe_shared(buf.freeze()).unwrap_or_else(|_| peer.forwarded_for.clone())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_connection_named_ones_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        h.insert("x-end-to-end", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut h, false);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-end-to-end"]);
    }

    #[test]
    fn upgrade_keeps_the_upgrade_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h[header::CONNECTION], "upgrade");
    }

    #[test]
    fn forwarded_headers_replace_the_clients_and_append_to_x_forwarded_for() {
        let mut h = HeaderMap::new();
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.1"));
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.2"));
        h.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        h.insert(&X_FORWARDED_HOST, HeaderValue::from_static("spoofed"));
        h.insert("x-other", HeaderValue::from_static("kept"));
        let peer = Peer::new("127.0.0.9:1234".parse().unwrap());
        let call_id = HeaderValue::from_static("id-1");
        let fw = Forwarded::new(&h, &peer, None, &call_id);
        let set: Vec<_> = fw
            .iter()
            .map(|(n, v)| (n.as_str(), v.to_str().unwrap()))
            .collect();
        assert_eq!(
            set,
            [
                ("x-forwarded-for", "10.0.0.1, 10.0.0.2, 127.0.0.9"),
                ("x-forwarded-proto", "http"),
                ("x-call-id", "id-1"),
            ]
        );
        let replaced: Vec<_> = h
            .keys()
            .filter(|n| Forwarded::replaces(n))
            .map(|n| n.as_str())
            .collect();
        assert_eq!(
            replaced,
            ["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"]
        );
        // Applied to a map (as async invocations store it), the result is the same.
        fw.apply(&mut h);
        assert_eq!(h[&X_FORWARDED_FOR], "10.0.0.1, 10.0.0.2, 127.0.0.9");
        assert!(h.get(&X_FORWARDED_HOST).is_none());
        assert_eq!(h["x-other"], "kept");
        let fresh = Forwarded::new(
            &HeaderMap::new(),
            &Peer::new("[::1]:80".parse().unwrap()),
            None,
            &call_id,
        );
        assert_eq!(fresh.iter().next().unwrap().1, "::1");
    }
}
