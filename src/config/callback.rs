//! `[gateway]`'s callback rules as written and checked: which hosts, networks and ports an
//! `X-Callback-Url` may name. The addresses are checked against them (after DNS resolution) by
//! the callback client, `upstream::callback`.

use std::net::IpAddr;

/// Where async callbacks may go, besides the refusals that always apply (link-local and
/// metadata addresses, the gateway's own listener).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallbackRules {
    /// Host names allowed whatever they resolve to (still subject to the fixed refusals),
    /// lower-case; `*.example.com` allows every name under `example.com`.
    pub hosts: Vec<String>,
    /// Networks every resolved address must lie in (unless the host is named in `hosts`).
    pub nets: Vec<Cidr>,
    /// Ports allowed; empty: any.
    pub ports: Vec<u16>,
    /// Whether loopback addresses (127.0.0.0/8, ::1) may be called back.
    pub allow_loopback: bool,
}

impl Default for CallbackRules {
    fn default() -> Self {
        CallbackRules {
            hosts: Vec::new(),
            nets: Vec::new(),
            ports: Vec::new(),
            allow_loopback: true,
        }
    }
}

impl CallbackRules {
    /// Whether any host or network is listed (then only those are allowed).
    pub fn has_allowlist(&self) -> bool {
        !self.hosts.is_empty() || !self.nets.is_empty()
    }

    /// Whether `host` (as written in a URL) is one of the allowed names.
    pub fn names(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.hosts
            .iter()
            .any(|allowed| match allowed.strip_prefix("*.") {
                Some(domain) => host
                    .strip_suffix(domain)
                    .is_some_and(|sub| sub.len() > 1 && sub.ends_with('.')),
                None => *allowed == host,
            })
    }

    /// Whether `ip` lies in an allowed network.
    pub fn covers(&self, ip: IpAddr) -> bool {
        self.nets.iter().any(|net| net.contains(ip))
    }

    /// One line for `check-config`.
    pub fn describe(&self) -> String {
        let mut parts: Vec<String> = self.hosts.clone();
        parts.extend(self.nets.iter().map(ToString::to_string));
        format!(
            "callback_allow = {}, callback_ports = {}, callback_allow_loopback = {}",
            if parts.is_empty() {
                "(any but link-local, metadata, the gateway)".to_owned()
            } else {
                parts.join(" ")
            },
            if self.ports.is_empty() {
                "(any)".to_owned()
            } else {
                let ports: Vec<String> = self.ports.iter().map(u16::to_string).collect();
                ports.join(" ")
            },
            self.allow_loopback
        )
    }
}

/// A network: an address and a prefix length (`10.0.0.0/8`, `fd00::/8`; a bare address is a
/// network of one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Reads `a.b.c.d/n`, `x::y/n`, or a bare address.
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("`{text}` is not an address or a network"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("`{text}`: the prefix length must be 0..={max}"))?,
        };
        Ok(Cidr { addr, prefix })
    }

    /// Whether `ip` is in this network (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// The rule of `callback_allow`, `callback_ports` and `callback_allow_loopback`.
pub(super) fn callback_rules(
    allow: Option<Vec<String>>,
    ports: Option<Vec<u16>>,
    allow_loopback: Option<bool>,
) -> Result<CallbackRules, String> {
    let mut rules = CallbackRules {
        ports: ports.unwrap_or_default(),
        allow_loopback: allow_loopback.unwrap_or(true),
        ..CallbackRules::default()
    };
    if rules.ports.contains(&0) {
        return Err("callback_ports: 0 is not a port".into());
    }
    for entry in allow.unwrap_or_default() {
        let entry = entry.trim().to_ascii_lowercase();
        let looks_numeric = entry.contains('/')
            || entry.contains(':')
            || entry.bytes().all(|b| b.is_ascii_digit() || b == b'.');
        if looks_numeric {
            rules.nets.push(Cidr::parse(&entry)?);
        } else if is_host_name(entry.strip_prefix("*.").unwrap_or(&entry)) {
            rules.hosts.push(entry);
        } else {
            return Err(format!(
                "`{entry}` is neither a host name, an address nor a network like \"10.0.0.0/8\""
            ));
        }
    }
    Ok(rules)
}

fn is_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_contain_their_addresses_only() {
        let net = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(net.contains("10.255.1.2".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.1.1".parse().unwrap()));
        assert!(!net.contains("11.0.0.1".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0")
            .unwrap()
            .contains("1.2.3.4".parse().unwrap()));
        assert!(Cidr::parse("fe80::/10")
            .unwrap()
            .contains("febf::1".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("nonsense/8").is_err());
    }

    #[test]
    fn allowed_names_match_exactly_or_under_a_wildcard() {
        let rules = callback_rules(
            Some(vec!["Hooks.Example.com".into(), "*.corp.test".into()]),
            None,
            None,
        )
        .unwrap();
        assert!(rules.names("hooks.example.com"));
        assert!(rules.names("HOOKS.example.com."));
        assert!(!rules.names("evil-hooks.example.com"));
        assert!(rules.names("a.corp.test"));
        assert!(!rules.names("corp.test"));
        assert!(!rules.names("xcorp.test"));
        assert!(callback_rules(Some(vec!["bad host".into()]), None, None).is_err());
        assert!(callback_rules(None, Some(vec![0]), None).is_err());
    }
}
