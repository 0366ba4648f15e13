//! The callback client: POSTs an async invocation's outcome to its client-supplied
//! `X-Callback-Url`, but only to addresses the gateway's [`CallbackRules`] allow. The name is
//! resolved here, every address checked, and the connection made to exactly the addresses
//! checked, so a name that resolves (or re-resolves) to a refused address is refused too.
//!
//! Always refused: link-local addresses (169.254.0.0/16, fe80::/10, where cloud metadata
//! services live) and other metadata addresses, unspecified, multicast and broadcast
//! addresses, and the gateway's own listener (so a callback cannot reach `/system`).

use std::error::Error as StdError;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Uri};
use hyper_util::client::legacy::{Client, ResponseFuture};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::UpstreamBody;
use crate::config::CallbackRules;

/// Time to connect to a callback receiver (all its allowed addresses together).
pub const CALLBACK_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Most addresses of one name that are checked and tried.
const MAX_ADDRESSES: usize = 16;

/// Why a callback URL may not be called, in one line.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// Checks `text` as an `X-Callback-Url`: an absolute `http://` URL with a host. Pure: no
/// resolution (see [`CallbackClient::check`]).
pub fn parse_callback_url(text: &str) -> Result<Uri, Refused> {
    let text = text.trim();
    let uri: Uri = text
        .parse()
        .map_err(|_| Refused(format!("`{text}` is not a URL")))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => {
            return Err(Refused(format!(
                "`{text}`: scheme `{other}` is not supported (only http)"
            )))
        }
        None => return Err(Refused(format!("`{text}` is not an absolute http:// URL"))),
    }
    // `http://[]:80/` parses with the host `[]`: no host either.
    let bare = uri
        .host()
        .map(|h| h.trim_start_matches('[').trim_end_matches(']'));
    if bare.is_none_or(str::is_empty) {
        return Err(Refused(format!("`{text}` has no host")));
    }
    Ok(uri)
}

/// The rules and the gateway's own listener: what every callback address is checked against.
#[derive(Clone, Debug)]
pub struct CallbackGuard {
    rules: Arc<CallbackRules>,
    own: Option<SocketAddr>,
}

impl CallbackGuard {
    /// Checks against `rules`, and refuses `own` (the gateway's listener, as bound).
    pub fn new(rules: CallbackRules, own: Option<SocketAddr>) -> CallbackGuard {
        CallbackGuard {
            rules: Arc::new(rules),
            own,
        }
    }

    /// The checks that need no resolution: the port, and whether the host is named in the
    /// allowlist. Returns the host (without IPv6 brackets), its port, and whether it is named.
    pub fn check_uri<'u>(&self, uri: &'u Uri) -> Result<(&'u str, u16, bool), Refused> {
        let host = uri.host().unwrap_or("");
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let port = uri.port_u16().unwrap_or(80);
        if !self.rules.ports.is_empty() && !self.rules.ports.contains(&port) {
            return Err(Refused(format!(
                "port {port} is not in [gateway] callback_ports"
            )));
        }
        Ok((host, port, self.rules.names(host)))
    }

    /// Checks one resolved address of a host (`named`: the host is in the allowlist by name).
    pub fn check_addr(&self, addr: SocketAddr, named: bool) -> Result<(), Refused> {
        let ip = addr.ip().to_canonical();
        if let Some(why) = always_refused(ip) {
            return Err(Refused(format!("{ip} is {why}")));
        }
        if self.is_own_listener(ip, addr.port()) {
            return Err(Refused(format!("{addr} is the gateway's own listener")));
        }
        if ip.is_loopback() && !self.rules.allow_loopback {
            return Err(Refused(format!(
                "{ip} is loopback ([gateway] callback_allow_loopback = false)"
            )));
        }
        if self.rules.has_allowlist() && !named && !self.rules.covers(ip) {
            return Err(Refused(format!("{ip} is not in [gateway] callback_allow")));
        }
        Ok(())
    }

    fn is_own_listener(&self, ip: IpAddr, port: u16) -> bool {
        let Some(own) = self.own else { return false };
        if own.port() != port {
            return false;
        }
        let own_ip = own.ip().to_canonical();
        if own_ip == ip {
            return true;
        }
        // A wildcard listener is reachable on every local address: an address is local when a
        // socket can be bound to it.
        own_ip.is_unspecified()
            && (ip.is_loopback() || std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok())
    }

    /// Resolves `uri`'s host and checks every address: all must pass (a name that resolves to
    /// any refused address is refused). Returns the addresses to connect to.
    pub async fn resolve(&self, uri: &Uri) -> Result<Vec<SocketAddr>, Refused> {
        let (host, port, named) = self.check_uri(uri)?;
        let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => tokio::net::lookup_host((host, port))
                .await
                .map_err(|e| Refused(format!("`{host}` does not resolve: {e}")))?
                .take(MAX_ADDRESSES)
                .collect(),
        };
        if addrs.is_empty() {
            return Err(Refused(format!("`{host}` resolves to no address")));
        }
        for addr in &addrs {
            self.check_addr(*addr, named)
                .map_err(|Refused(why)| match host.parse::<IpAddr>() {
                    Ok(_) => Refused(why),
                    Err(_) => Refused(format!("`{host}` resolves to {}: {why}", addr.ip())),
                })?;
        }
        Ok(addrs)
    }
}

/// Why `ip` is refused whatever the rules say, if it is.
fn always_refused(ip: IpAddr) -> Option<&'static str> {
    const AWS_V6_METADATA: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);
    const ALIBABA_METADATA: Ipv4Addr = Ipv4Addr::new(100, 100, 100, 200);
    match ip {
        IpAddr::V4(v4) if v4.is_link_local() => Some("link-local (169.254.0.0/16, metadata)"),
        IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80 => {
            Some("link-local (fe80::/10, metadata)")
        }
        IpAddr::V4(ALIBABA_METADATA) => Some("a cloud metadata address"),
        IpAddr::V6(AWS_V6_METADATA) => Some("a cloud metadata address"),
        IpAddr::V4(v4) if v4.is_broadcast() => Some("the broadcast address"),
        ip if ip.is_unspecified() => Some("unspecified (it reaches this host)"),
        ip if ip.is_multicast() => Some("multicast"),
        _ => None,
    }
}

/// The connector of the callback client: resolves, checks, connects to a checked address.
#[derive(Clone, Debug)]
pub struct CallbackConnector {
    guard: CallbackGuard,
}

type Connecting = Pin<
    Box<dyn Future<Output = Result<TokioIo<TcpStream>, Box<dyn StdError + Send + Sync>>> + Send>,
>;

impl tower_service::Service<Uri> for CallbackConnector {
    type Response = TokioIo<TcpStream>;
    type Error = Box<dyn StdError + Send + Sync>;
    type Future = Connecting;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Connecting {
        let guard = self.guard.clone();
        Box::pin(async move {
            let addrs = guard.resolve(&uri).await?;
            let connect = async {
                let mut last = None;
                for addr in addrs {
                    match TcpStream::connect(addr).await {
                        Ok(stream) => return Ok(stream),
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.unwrap_or_else(|| std::io::Error::other("no address")))
            };
            let stream = tokio::time::timeout(CALLBACK_CONNECT_TIMEOUT, connect)
                .await
                .map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
                })??;
            let _ = stream.set_nodelay(true);
            Ok(TokioIo::new(stream))
        })
    }
}

/// hyper-util's pooled HTTP/1.1 client behind a [`CallbackConnector`], for URLs outside any
/// replica set (async callbacks). Replicas are reached through `upstream::send` instead.
#[derive(Clone, Debug)]
pub struct CallbackClient {
    http: Client<CallbackConnector, UpstreamBody>,
    guard: CallbackGuard,
}

impl CallbackClient {
    /// A client calling back only where `rules` allow, never to `own` (the gateway's listener).
    pub fn new(rules: CallbackRules, own: Option<SocketAddr>) -> CallbackClient {
        use hyper_util::rt::{TokioExecutor, TokioTimer};
        let guard = CallbackGuard::new(rules, own);
        let http = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(1024)
            .build(CallbackConnector {
                guard: guard.clone(),
            });
        CallbackClient { http, guard }
    }

    /// Checks a callback URL now, resolution included.
    pub async fn check(&self, uri: &Uri) -> Result<(), Refused> {
        self.guard.resolve(uri).await.map(drop)
    }

    /// Sends `req`; a connection is made only to an allowed address.
    pub fn request(&self, req: Request<UpstreamBody>) -> ResponseFuture {
        self.http.request(req)
    }
}

/// The refusal in an error's chain, if the request failed because its address was refused.
pub fn refusal<'e>(e: &'e (dyn StdError + 'static)) -> Option<&'e Refused> {
    let mut next = Some(e);
    for _ in 0..16 {
        let e = next?;
        if let Some(refused) = e.downcast_ref::<Refused>() {
            return Some(refused);
        }
        next = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Cidr;

    fn guard(rules: CallbackRules) -> CallbackGuard {
        CallbackGuard::new(rules, Some("127.0.0.1:8080".parse().unwrap()))
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn link_local_metadata_and_own_listener_are_always_refused() {
        let g = guard(CallbackRules::default());
        for refused in [
            "169.254.169.254:80",
            "[fe80::1]:80",
            "[::ffff:169.254.169.254]:80",
            "[fd00:ec2::254]:80",
            "0.0.0.0:80",
            "[::]:80",
            "224.0.0.1:80",
            "255.255.255.255:80",
            "127.0.0.1:8080",
        ] {
            assert!(g.check_addr(addr(refused), true).is_err(), "{refused}");
        }
        assert!(g.check_addr(addr("127.0.0.1:8081"), false).is_ok());
        assert!(g.check_addr(addr("10.1.2.3:80"), false).is_ok());
    }

    #[test]
    fn a_wildcard_listener_is_refused_on_every_local_address() {
        let g = CallbackGuard::new(CallbackRules::default(), Some(addr("0.0.0.0:8080")));
        assert!(g.check_addr(addr("127.0.0.1:8080"), false).is_err());
        assert!(g.check_addr(addr("127.0.0.2:8080"), false).is_err());
        assert!(g.check_addr(addr("127.0.0.2:8081"), false).is_ok());
    }

    #[test]
    fn an_allowlist_admits_only_its_names_networks_and_ports() {
        let rules = CallbackRules {
            hosts: vec!["hooks.test".into()],
            nets: vec![Cidr::parse("10.0.0.0/8").unwrap()],
            ports: vec![80, 8080],
            allow_loopback: false,
        };
        let g = guard(rules);
        assert!(g.check_addr(addr("10.9.9.9:80"), false).is_ok());
        assert!(g.check_addr(addr("192.168.1.1:80"), false).is_err());
        assert!(g.check_addr(addr("192.168.1.1:80"), true).is_ok());
        assert!(g.check_addr(addr("127.0.0.1:80"), true).is_err());
        let uri: Uri = "http://hooks.test:9000/".parse().unwrap();
        assert!(g.check_uri(&uri).is_err());
        let uri: Uri = "http://HOOKS.test/".parse().unwrap();
        assert_eq!(g.check_uri(&uri).unwrap(), ("HOOKS.test", 80, true));
    }

    #[tokio::test]
    async fn a_name_is_checked_after_resolution() {
        let g = guard(CallbackRules {
            allow_loopback: false,
            ..CallbackRules::default()
        });
        let uri: Uri = "http://localhost:9/cb".parse().unwrap();
        let Refused(why) = g.resolve(&uri).await.unwrap_err();
        assert!(why.contains("`localhost` resolves to"), "{why}");
        let g = guard(CallbackRules::default());
        assert!(g.resolve(&uri).await.is_ok());
    }

    #[test]
    fn callback_urls_must_be_absolute_http() {
        assert!(parse_callback_url("http://127.0.0.1:9/cb?x=1").is_ok());
        assert!(parse_callback_url("https://example.com/").is_err());
        assert!(parse_callback_url("/relative").is_err());
        assert!(parse_callback_url("example.com/cb").is_err());
        assert!(parse_callback_url("not a url").is_err());
        assert!(parse_callback_url("ftp://x/").is_err());
    }
}
