//! The forwarding rules: what the gateway changes in a request on its way to a replica and in a
//! response on its way back. A leaf: header names and pure functions on header maps, no I/O.
//!
//! * hop-by-hop headers (RFC 9110 §7.6.1, and those named in `Connection`) never cross;
//! * `X-Forwarded-For` (the client's address appended), `X-Forwarded-Proto`, `X-Forwarded-Host`,
//!   `X-Call-Id` and `X-Sluicegate-Token-Name` replace whatever the client sent ([`Forwarded`]);
//!   the last is set only for a caller that presented a service token ([`TokenName`]), and a
//!   client's own copy never reaches a replica;
//! * the replica sees the path after `/function/{name}` (at least `/`) and the original query.
//!
//! The sync path applies these while encoding the request head (`upstream::send`), so the client's
//! header map is never edited; async invocations store the rewritten map
//! ([`rewrite_request_headers`]).

use std::net::SocketAddr;

use bytes::{BufMut, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Uri};

/// The request/response header carrying the invocation's id.
pub static CALL_ID: HeaderName = HeaderName::from_static("x-call-id");
/// Response header set when the request waited for a cold start; the value is the wait in seconds.
pub static COLD_START: HeaderName = HeaderName::from_static("x-sluicegate-cold-start");
/// Response header with the time the gateway received the request (Unix nanoseconds, as OpenFaaS).
pub static START_TIME: HeaderName = HeaderName::from_static("x-start-time");
/// Request header naming the service token a caller presented (functions with `auth = "token"`).
pub static TOKEN_NAME: HeaderName = HeaderName::from_static("x-sluicegate-token-name");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

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

/// The header rules for a request on its way to a replica: hop-by-hop headers and `Host` out
/// (the upgrade pair kept with `upgrade`), then [`Forwarded`] applied (with the caller's
/// `token_name`, if it presented a service token). Async invocations store the result; the sync
/// path applies the same rules while encoding (see `proxy::forward`).
pub fn rewrite_request_headers(
    headers: &mut HeaderMap,
    peer: &Peer,
    forwarded_host: Option<HeaderValue>,
    call_id: &HeaderValue,
    upgrade: bool,
    token_name: Option<TokenName>,
) {
    strip_hop_by_hop(headers, upgrade);
    headers.remove(header::HOST);
    let mut forwarded = Forwarded::new(headers, peer, forwarded_host, call_id);
    forwarded.set_token_name(token_name);
    forwarded.apply(headers);
}

/// A request extension set by the service-token check: the name of the token the caller
/// presented, sent to the replica as `X-Sluicegate-Token-Name`.
#[derive(Clone, Debug)]
pub struct TokenName(pub HeaderValue);

/// The headers the gateway sets on every request it forwards: the client's address appended to
/// `X-Forwarded-For`, `X-Forwarded-Proto`, `X-Forwarded-Host` (the host the client addressed),
/// `X-Call-Id`, and `X-Sluicegate-Token-Name` when the caller presented a service token. They
/// replace any the client sent.
#[derive(Debug)]
pub struct Forwarded {
    values: [Option<HeaderValue>; 5],
}

const FORWARDED_NAMES: [&HeaderName; 5] = [
    &X_FORWARDED_FOR,
    &X_FORWARDED_PROTO,
    &X_FORWARDED_HOST,
    &CALL_ID,
    &TOKEN_NAME,
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
                None,
            ],
        }
    }

    /// Names the service token the caller presented (`X-Sluicegate-Token-Name`).
    pub fn set_token_name(&mut self, name: Option<TokenName>) {
        self.values[4] = name.map(|n| n.0);
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
pub fn is_upgrade(headers: &HeaderMap) -> bool {
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

/// The client's `X-Call-Id` (non-empty, at most 128 bytes), else a new one.
pub fn call_id<B>(req: &Request<B>) -> HeaderValue {
    req.headers()
        .get(&CALL_ID)
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .cloned()
        .unwrap_or_else(new_call_id)
}

fn new_call_id() -> HeaderValue {
    let mut buf = uuid::Uuid::encode_buffer();
    let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
    HeaderValue::from_str(id).expect("a uuid is a valid header value")
}

/// `X-Start-Time`: now, in Unix nanoseconds.
pub fn start_time() -> HeaderValue {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    HeaderValue::from(nanos)
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
