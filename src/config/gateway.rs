//! `[gateway]`: the listener, connection limits, shutdown, the admin token and the async store.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::callback::{callback_rules, CallbackRules};
use super::duration::Dur;
use super::function::RawFunctionKeys;
use super::table::{count, given, positive, table};

/// Address the gateway listens on when `[gateway] listen` is not set.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Time a client has, from its first byte (or from connecting), to send a complete request head.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head (request line plus headers) accepted, in bytes.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
/// Time an idle keep-alive connection is kept open.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(75);
/// Time in-flight requests have to finish after SIGTERM before the gateway exits anyway.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the autoscaler leader's lease lasts without renewal (`[gateway] cluster_lease`).
pub const DEFAULT_CLUSTER_LEASE: Duration = Duration::from_secs(10);
/// File name suffix of the default async store, next to the config file (`demo.toml` →
/// `demo.async.redb`).
pub const DEFAULT_ASYNC_STORE_SUFFIX: &str = ".async.redb";
/// How long a JetStream delivery is leased to the gateway that pulled it before JetStream hands
/// it to another (`async_ack_wait`); the gateway renews the lease while it works on it.
pub const DEFAULT_ASYNC_ACK_WAIT: Duration = Duration::from_secs(30);
/// How long the record of a finished async invocation (`GET /system/async/{call_id}`) is kept.
pub const DEFAULT_ASYNC_RECORD_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// Where accepted async invocations are kept (`[gateway] async_store`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AsyncStoreLocation {
    /// An embedded redb database file: one gateway's own store (the default).
    File(PathBuf),
    /// A NATS server with JetStream (`nats://host:port`): one store shared by every gateway
    /// that names it.
    Nats(String),
}

impl AsyncStoreLocation {
    /// `async_store` as written (or as `SLUICEGATE_ASYNC_STORE` gives it): a `nats://` URL
    /// selects JetStream, anything else is a file relative to `base_dir`.
    pub fn parse(written: &str, base_dir: &Path) -> Result<AsyncStoreLocation, String> {
        if written.is_empty() {
            return Err(
                "must name a file, e.g. \"/var/lib/sluicegate/async.redb\", or a NATS server, e.g. \"nats://127.0.0.1:4222\""
                    .into(),
            );
        }
        if let Some(rest) = written.strip_prefix("nats://") {
            if rest.is_empty() || rest.contains(char::is_whitespace) {
                return Err(format!(
                    "`{written}` is not a NATS URL like \"nats://127.0.0.1:4222\""
                ));
            }
            return Ok(AsyncStoreLocation::Nats(written.to_owned()));
        }
        Ok(AsyncStoreLocation::File(base_dir.join(written)))
    }

    /// The redb file, when the store is one.
    pub fn file(&self) -> Option<&Path> {
        match self {
            AsyncStoreLocation::File(path) => Some(path),
            AsyncStoreLocation::Nats(_) => None,
        }
    }
}

impl std::fmt::Display for AsyncStoreLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AsyncStoreLocation::File(path) => write!(f, "{}", path.display()),
            AsyncStoreLocation::Nats(url) => f.write_str(url),
        }
    }
}

table! {
    /// `[gateway]` as written.
    struct RawGateway;

    /// `[gateway]`: the listener, connection limits and shutdown.
    #[derive(Clone, Debug)]
    pub struct GatewayConfig {}

    given(path: &Path, base_dir: &Path, env_admin_token: Option<String>);

    keys {
        listen: String => {
            /// Socket address for functions, `/metrics`, `/healthz`, `/readyz` and `/system`.
            pub listen: SocketAddr = address(listen),
        },
        // The next three are gateway-wide defaults for the function keys of the same name.
        cold_start_timeout: Dur,
        queue_timeout: Dur,
        max_body_bytes: u64,
        header_read_timeout: Dur => {
            /// Time a client has to send a complete request head, counted from its first byte
            /// (or from connecting, for a new connection). Slow-loris protection.
            pub header_read_timeout: Duration =
                positive(header_read_timeout, DEFAULT_HEADER_READ_TIMEOUT),
        },
        max_header_bytes: usize => {
            /// Largest request head in bytes; larger heads get `431`.
            pub max_header_bytes: usize =
                count(max_header_bytes, DEFAULT_MAX_HEADER_BYTES, 8192..=16 * 1024 * 1024),
        },
        idle_timeout: Dur => {
            /// Time an idle keep-alive connection stays open.
            pub idle_timeout: Duration = positive(idle_timeout, DEFAULT_IDLE_TIMEOUT),
        },
        drain_timeout: Dur => {
            /// Time in-flight requests get to finish after SIGTERM.
            pub drain_timeout: Duration = given(drain_timeout, DEFAULT_DRAIN_TIMEOUT),
        },
        admin_token: String => {
            /// Bearer token required on `/system/*`; `None`: no token (then `/system` answers
            /// only on a loopback listener, unless `admin_open`). Its `Debug` is redacted.
            pub admin_token: Option<Secret> = token(env_admin_token, admin_token),
        },
        admin_open: bool => {
            /// Serve `/system/*` without a token on a listener that is not loopback. Off by
            /// default: such a listener with no `admin_token` answers `/system` with `403`.
            pub admin_open: bool = given(admin_open, false),
        },
        callback_allow: Vec<String> => {
            /// Where `X-Callback-Url` may point: host names (`hooks.example.com`,
            /// `*.example.com`), addresses and networks (`10.0.0.0/8`); empty: anywhere but the
            /// addresses always refused (link-local and metadata, the gateway's own listener).
            /// With `callback_ports` and `callback_allow_loopback`; checked after DNS resolution.
            pub callback: CallbackRules =
                callback_rules(callback_allow, callback_ports, callback_allow_loopback),
        },
        callback_ports: Vec<u16>,
        callback_allow_loopback: bool,
        worker_threads: usize => {
            /// Threads serving requests; `0` is one per available CPU. With one thread the
            /// gateway runs a single-threaded runtime, which costs measurably less CPU per
            /// request than a multi-threaded runtime with one worker.
            pub worker_threads: usize = count(worker_threads, 0, 0..=1024)
                .map_err(|reason| format!("{reason} (0: one per available CPU)")),
        },
        async_store: String => {
            /// Where accepted async invocations are kept. A `nats://host:port` URL selects NATS
            /// JetStream, shared by every gateway naming the same server; anything else is the
            /// file of an embedded redb database, relative to the config file's directory
            /// (default `<config name>.async.redb` beside the config file).
            /// `SLUICEGATE_ASYNC_STORE` overrides both.
            pub async_store: AsyncStoreLocation = store(async_store, path, base_dir),
        },
        async_ack_wait: Dur => {
            /// JetStream store only: how long a delivery is leased to the gateway that pulled
            /// it. The gateway renews the lease every third of it while the invocation is
            /// being worked on, so this is not a time limit on the function; it is how soon
            /// another gateway takes over an invocation whose gateway died.
            pub async_ack_wait: Duration = positive(async_ack_wait, DEFAULT_ASYNC_ACK_WAIT),
        },
        async_record_retention: Dur => {
            /// How long the record of a finished async invocation (succeeded, failed, or its dead
            /// letter discarded) is kept after it finished; then `GET /system/async/{call_id}`
            /// answers `404`. Records of invocations still pending and of dead letters are kept
            /// as long as they are. At least one second (JetStream counts whole seconds).
            pub async_record_retention: Duration =
                positive(async_record_retention, DEFAULT_ASYNC_RECORD_RETENTION).and_then(|d| {
                    if d < Duration::from_secs(1) {
                        Err(format!("{d:?} is less than one second"))
                    } else {
                        Ok(d)
                    }
                }),
        },
        cluster: String => {
            /// `nats://host:port` of the NATS server through which several gateways act as one:
            /// each publishes its per-function figures there about once a second, one leader
            /// (a JetStream key-value lease) runs the autoscalers on everyone's figures, and each
            /// admits its share of `max_ongoing_requests` per replica. `None`: a single gateway.
            pub cluster: Option<String> = nats_url(cluster),
        },
        cluster_lease: Dur => {
            /// How long the autoscaler leader's lease lasts without renewal: a leader that stops
            /// renewing stops deciding within it, and another takes over after it.
            pub cluster_lease: Duration = positive(cluster_lease, DEFAULT_CLUSTER_LEASE),
        },
        gateway_id: String => {
            /// This gateway's name among its peers (default: `$HOSTNAME` or the host name, plus
            /// the process id). Must be unique in the cluster.
            pub gateway_id: Option<String> = Ok(gateway_id.filter(|s| !s.is_empty())),
        },
        kubeconfig: String => {
            /// The kubeconfig file the `kubernetes` provider connects with (relative to the config
            /// file); `None` is kube's inference: `$KUBECONFIG` or `~/.kube/config`, then the
            /// in-cluster service account.
            pub kubeconfig: Option<PathBuf> = Ok(kubeconfig.map(|k| base_dir.join(k))),
        },
        kubernetes_namespace: String => {
            /// The namespace of `provider = "kubernetes"` functions that name none, and the one
            /// discovery watches; `None` is the client's (kubeconfig context or the pod's own).
            pub kubernetes_namespace: Option<String> = namespace_name(kubernetes_namespace),
        },
        kubernetes_discovery: bool => {
            /// Serve every Deployment labelled `sluicegate.io/function=<name>` in
            /// `kubernetes_namespace` as a `kubernetes` function, settings from its
            /// `sluicegate.io/<key>` annotations over `[defaults]`.
            pub kubernetes_discovery: bool = given(kubernetes_discovery, false),
        },
    }
}

fn nats_url(written: Option<String>) -> Result<Option<String>, String> {
    match written {
        Some(url) if !url.starts_with("nats://") => Err(format!(
            "`{url}` is not a NATS URL like \"nats://127.0.0.1:4222\""
        )),
        other => Ok(other),
    }
}

fn namespace_name(written: Option<String>) -> Result<Option<String>, String> {
    match written {
        Some(ns) if !crate::config::is_valid_function_name(&ns) => {
            Err(format!("`{ns}` is not a namespace name"))
        }
        other => Ok(other),
    }
}

impl RawGateway {
    /// The outermost defaults of every function: `[gateway]`'s keys of the same name.
    pub(super) fn function_defaults(&self) -> RawFunctionKeys {
        RawFunctionKeys {
            cold_start_timeout: self.cold_start_timeout,
            queue_timeout: self.queue_timeout,
            max_body_bytes: self.max_body_bytes,
            ..RawFunctionKeys::default()
        }
    }
}

impl GatewayConfig {
    /// Whether `/system` is served without a token although the listener is not loopback: only
    /// when `admin_open` says so. `Some` is the one-line reason `/system` is refused.
    pub fn admin_refusal(&self) -> Option<&'static str> {
        (self.admin_token.is_none() && !self.listen.ip().is_loopback() && !self.admin_open).then_some(
            "/system is closed: the listener is not loopback and [gateway] admin_token is not set (set admin_token, or admin_open = true to serve it without one)",
        )
    }

    /// The `[gateway]` keys whose values differ in `next` and that the running gateway reads
    /// only at start (a config reload does not apply them), as `gateway.<key>`. The function
    /// defaults of `[gateway]` are not among them: they reach the functions they change.
    pub fn fixed_differences(&self, next: &GatewayConfig) -> Vec<String> {
        let mut keys = Vec::new();
        let mut differs = |key: &str, same: bool| {
            if !same {
                keys.push(format!("gateway.{key}"));
            }
        };
        differs("listen", self.listen == next.listen);
        differs(
            "header_read_timeout",
            self.header_read_timeout == next.header_read_timeout,
        );
        differs(
            "max_header_bytes",
            self.max_header_bytes == next.max_header_bytes,
        );
        differs("idle_timeout", self.idle_timeout == next.idle_timeout);
        differs("drain_timeout", self.drain_timeout == next.drain_timeout);
        differs("admin_token", self.admin_token == next.admin_token);
        differs("admin_open", self.admin_open == next.admin_open);
        differs("callback_*", self.callback == next.callback);
        differs("worker_threads", self.worker_threads == next.worker_threads);
        differs("async_store", self.async_store == next.async_store);
        differs("async_ack_wait", self.async_ack_wait == next.async_ack_wait);
        differs(
            "async_record_retention",
            self.async_record_retention == next.async_record_retention,
        );
        differs("cluster", self.cluster == next.cluster);
        differs("cluster_lease", self.cluster_lease == next.cluster_lease);
        differs("gateway_id", self.gateway_id == next.gateway_id);
        differs("kubeconfig", self.kubeconfig == next.kubeconfig);
        differs(
            "kubernetes_namespace",
            self.kubernetes_namespace == next.kubernetes_namespace,
        );
        differs(
            "kubernetes_discovery",
            self.kubernetes_discovery == next.kubernetes_discovery,
        );
        keys
    }

    fn admin_access(&self) -> &'static str {
        match (&self.admin_token, self.admin_refusal()) {
            (Some(_), _) => "bearer token",
            (None, Some(_)) => "closed (not loopback, no admin_token)",
            (None, None) if self.listen.ip().is_loopback() => "open (loopback listener)",
            (None, None) => "open (admin_open = true)",
        }
    }

    /// Appends the `check-config` line of `[gateway]`.
    pub(super) fn describe(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "[gateway] listen = {}, worker_threads = {}, header_read_timeout = {:?}, max_header_bytes = {}, idle_timeout = {:?}, drain_timeout = {:?}, admin_token = {}, admin = {}, async_store = {}, async_record_retention = {:?}",
            self.listen,
            match self.worker_threads {
                0 => "one per CPU".to_owned(),
                n => n.to_string(),
            },
            self.header_read_timeout,
            self.max_header_bytes,
            self.idle_timeout,
            self.drain_timeout,
            if self.admin_token.is_some() { "set" } else { "not set" },
            self.admin_access(),
            self.async_store,
            self.async_record_retention
        );
        let _ = writeln!(out, "[gateway] {}", self.callback.describe());
        if let Some(url) = &self.cluster {
            let _ = writeln!(
                out,
                "[gateway] cluster = {url}, cluster_lease = {:?}, gateway_id = {}",
                self.cluster_lease,
                self.gateway_id
                    .as_deref()
                    .unwrap_or("(host name and process id)")
            );
        }
        if self.kubeconfig.is_some()
            || self.kubernetes_namespace.is_some()
            || self.kubernetes_discovery
        {
            let _ = writeln!(
                out,
                "[gateway] kubeconfig = {}, kubernetes_namespace = {}, kubernetes_discovery = {}",
                self.kubeconfig
                    .as_deref()
                    .map_or("(inferred)".into(), |p| p.display().to_string()),
                self.kubernetes_namespace
                    .as_deref()
                    .unwrap_or("(the client's)"),
                self.kubernetes_discovery
            );
        }
    }
}

fn address(listen: Option<String>) -> Result<SocketAddr, String> {
    let text = listen.as_deref().unwrap_or(DEFAULT_LISTEN);
    text.parse()
        .map_err(|_| format!("`{text}` is not an address like \"127.0.0.1:8080\""))
}

/// `SLUICEGATE_ADMIN_TOKEN` over the file's token; an empty token is none.
fn token(env: Option<String>, file: Option<String>) -> Result<Option<Secret>, String> {
    Ok(env.or(file).filter(|t| !t.is_empty()).map(Secret))
}

/// A secret value from the config (the admin token, a function's secret environment): its `Debug` and `Display` print
/// `<redacted>`, so that logging a config, an error or a status never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub(crate) fn new(value: String) -> Secret {
        Secret(value)
    }

    /// The value itself, for the one place that needs it (a comparison, a replica's
    /// environment).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

fn store(file: Option<String>, path: &Path, base_dir: &Path) -> Result<AsyncStoreLocation, String> {
    match file.as_deref() {
        Some(written) => AsyncStoreLocation::parse(written, base_dir),
        None => {
            let stem = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "sluicegate".to_owned());
            Ok(AsyncStoreLocation::File(
                base_dir.join(format!("{stem}{DEFAULT_ASYNC_STORE_SUFFIX}")),
            ))
        }
    }
}
