//! `provider = "static"`: a fixed list of upstream URLs, one replica each.

use std::fmt;

use http::uri::{Authority, Scheme};

use crate::config::line;
use crate::config::table::table;

table! {
    /// The keys of `provider = "static"`, as written.
    struct RawStatic;

    /// `provider = "static"`.
    #[derive(Clone, Debug, PartialEq)]
    pub struct StaticConfig {}

    keys {
        upstreams: Vec<String> => {
            /// `http://host:port` of each upstream.
            pub upstreams: Vec<Upstream> = upstream_list(upstreams),
        },
    }
}

impl StaticConfig {
    /// Appends the `check-config` lines of the static provider's keys.
    pub(super) fn describe(&self, out: &mut String) {
        let list: Vec<String> = self.upstreams.iter().map(ToString::to_string).collect();
        line(out, "upstreams", format!("{list:?}"));
    }
}

/// One upstream base URL: scheme and authority; requests keep their own path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstream {
    /// Always `http` for now.
    pub scheme: Scheme,
    /// `host:port`.
    pub authority: Authority,
    /// `authority` as a `Host` header value, built once.
    pub host_header: http::HeaderValue,
}

impl Upstream {
    /// An `http://` upstream at `authority`.
    pub fn http(authority: Authority) -> Upstream {
        let host_header = http::HeaderValue::from_str(authority.as_str())
            .expect("an authority is a valid header value");
        Upstream {
            scheme: Scheme::HTTP,
            authority,
            host_header,
        }
    }
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme, self.authority)
    }
}

fn upstream_list(written: Option<Vec<String>>) -> Result<Vec<Upstream>, String> {
    let list = written.unwrap_or_default();
    if list.is_empty() {
        let example = "upstreams = [\"http://127.0.0.1:9000\"]";
        return Err(format!(
            "provider \"static\" needs at least one upstream, e.g. {example}"
        ));
    }
    list.iter().map(|u| parse_upstream(u)).collect()
}

fn parse_upstream(text: &str) -> Result<Upstream, String> {
    let uri: http::Uri = text
        .parse()
        .map_err(|_| format!("`{text}` is not a URL like \"http://127.0.0.1:9000\""))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => {
            return Err(format!(
                "`{text}`: scheme `{other}` is not supported (only http)"
            ))
        }
        None => return Err(format!("`{text}` needs a scheme, e.g. \"http://{text}\"")),
    }
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| format!("`{text}` has no host"))?;
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err(format!(
            "`{text}`: an upstream is scheme://host:port only; a path prefix is not supported"
        ));
    }
    Ok(Upstream::http(authority))
}
