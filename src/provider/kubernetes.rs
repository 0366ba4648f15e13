//! The `kubernetes` provider: a function is a Deployment, scaled only through its `scale`
//! subresource; its replicas are the ready endpoints of its Service's EndpointSlices, watched.
//!
//! One task per function watches three things and publishes the ready set whenever one changes:
//!
//! * the Service's **EndpointSlices** (`kubernetes.io/service-name=<service>`): every endpoint that
//!   is ready and not terminating becomes a [`Replica`] with its own per-replica cap, keeping its
//!   identity (and its connection pool) across updates; one that turns not-ready or terminating
//!   leaves the rotation at once and is marked draining;
//! * the **Deployment** (by name): its `spec.replicas` is the count the gateway reports (read
//!   back, never assumed), its deletion fails held requests with a reason, and its conditions
//!   (`ProgressDeadlineExceeded`, `ReplicaFailure`) name why it cannot become ready;
//! * its **Pods** (the Deployment's selector): while no endpoint is ready, a container waiting in
//!   `CrashLoopBackOff`, `ImagePullBackOff`, `ErrImagePull`, … or a pod that cannot be scheduled is
//!   published as a start failure, so held requests fail fast with that reason instead of waiting
//!   out `cold_start_timeout`.
//!
//! Watches are kube-runtime watchers with the default backoff: a dropped watch resumes from its
//! resourceVersion, an expired one relists, and while the API server is unreachable the last
//! published endpoints keep serving (an error never publishes an empty set).
//!
//! Scale writes go through one writer task per function: `GET …/deployments/{name}/scale`, then
//! `PUT` of the same object with `spec.replicas` changed and the resourceVersion just read, so a
//! concurrent writer makes it fail with `409 Conflict` (re-read and retried) instead of being
//! overwritten blindly. Failures are retried with backoff (100 ms doubling to 10 s) on the latest
//! wish. A wake from zero writes only if the subresource still says 0: when KEDA or an HPA owns
//! the count (`autoscaler.type = "none"`) the gateway moves it 0 → 1 and never touches it above.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, PostParams};
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::config::{KubernetesConfig, Upstream};
use crate::provider::{Backend, BoxFuture, Endpoints, Publisher, Replica, StartFailure};

/// One RBAC rule: an API group, a resource (`resource/subresource` for subresources) and verbs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiRule {
    /// `""` is the core group.
    pub group: &'static str,
    /// E.g. `deployments/scale`.
    pub resource: &'static str,
    /// Exactly the verbs the provider uses.
    pub verbs: &'static [&'static str],
}

/// Every call the provider makes, as RBAC rules: the Role in `deploy/` grants exactly these.
pub const API_RULES: &[ApiRule] = &[
    ApiRule {
        group: "apps",
        resource: "deployments",
        verbs: &["list", "watch"],
    },
    ApiRule {
        group: "apps",
        resource: "deployments/scale",
        verbs: &["get", "update"],
    },
    ApiRule {
        group: "discovery.k8s.io",
        resource: "endpointslices",
        verbs: &["list", "watch"],
    },
    ApiRule {
        group: "",
        resource: "pods",
        verbs: &["list", "watch"],
    },
];

/// What several gateways add on Kubernetes (`[gateway] cluster`): the autoscaler leader's
/// Lease (see `cluster`). The Role in `deploy/` grants these too.
pub const LEASE_RULES: &[ApiRule] = &[ApiRule {
    group: "coordination.k8s.io",
    resource: "leases",
    verbs: &["get", "create", "update"],
}];

/// The label that names a Service on its EndpointSlices.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// First wait after a failed scale write; it doubles up to [`SCALE_RETRY_MAX`].
pub const SCALE_RETRY_MIN: Duration = Duration::from_millis(100);
/// Longest wait between two attempts of a scale write.
pub const SCALE_RETRY_MAX: Duration = Duration::from_secs(10);

/// A connection to the cluster, shared by every `kubernetes` function.
#[derive(Clone)]
pub struct Cluster {
    client: kube::Client,
    namespace: String,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Connects with `kubeconfig` if given, else as kube infers it (`$KUBECONFIG` or
    /// `~/.kube/config`, then the in-cluster service account). `namespace` overrides the
    /// client's default namespace.
    pub async fn connect(
        kubeconfig: Option<&std::path::Path>,
        namespace: Option<&str>,
    ) -> Result<Cluster, String> {
        let mut config = match kubeconfig {
            Some(path) => {
                let file = kube::config::Kubeconfig::read_from(path)
                    .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?;
                kube::Config::from_custom_kubeconfig(file, &Default::default())
                    .await
                    .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?
            }
            None => kube::Config::infer()
                .await
                .map_err(|e| format!("no Kubernetes configuration found: {e}"))?,
        };
        // Our own writer retries with backoff; kube's retry layer would hold a write for minutes.
        config.default_retry = false;
        config.connect_timeout = Some(Duration::from_secs(5));
        let client = kube::Client::try_from(config.clone())
            .map_err(|e| format!("Kubernetes client: {e}"))?;
        Ok(Cluster::new(
            client,
            namespace.unwrap_or(&config.default_namespace),
        ))
    }

    /// A cluster reached through `client` (tests use a `tower_test` mock or a loopback fake).
    pub fn new(client: kube::Client, namespace: &str) -> Cluster {
        Cluster {
            client,
            namespace: namespace.to_owned(),
        }
    }

    /// The namespace functions that name none live in.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The client.
    pub fn client(&self) -> &kube::Client {
        &self.client
    }
}

/// What the writer is asked to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wish {
    /// Nothing yet.
    None,
    /// Set the count to this.
    Set(u32),
    /// Set it to this only if it is 0 now.
    Wake(u32),
}

/// State shared by the backend's handle and its tasks.
struct Shared {
    function: Arc<str>,
    namespace: String,
    deployment: String,
    /// `spec.replicas` as last read back (from a scale response or the Deployment watch).
    observed: AtomicU32,
    /// Whether `observed` was read at least once.
    known: AtomicBool,
    wish: watch::Sender<Wish>,
}

/// A function's Deployment and its Service's endpoints.
pub struct KubernetesBackend {
    shared: Arc<Shared>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl fmt::Debug for KubernetesBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubernetesBackend")
            .field("namespace", &self.shared.namespace)
            .field("deployment", &self.shared.deployment)
            .finish_non_exhaustive()
    }
}

impl KubernetesBackend {
    /// Starts watching and the scale writer. Must be called inside a Tokio runtime.
    pub fn start(
        function: &str,
        config: &KubernetesConfig,
        cluster: &Cluster,
        publisher: Publisher,
    ) -> KubernetesBackend {
        let namespace = config
            .namespace
            .clone()
            .unwrap_or_else(|| cluster.namespace.clone());
        let (wish, wishes) = watch::channel(Wish::None);
        let shared = Arc::new(Shared {
            function: Arc::from(function),
            namespace: namespace.clone(),
            deployment: config.deployment.clone(),
            observed: AtomicU32::new(0),
            known: AtomicBool::new(false),
            wish,
        });
        let deployments: Api<Deployment> = Api::namespaced(cluster.client.clone(), &namespace);
        let writer = tokio::spawn(write_scale(shared.clone(), deployments.clone(), wishes));
        let watcher = tokio::spawn(
            Watch {
                shared: shared.clone(),
                publisher,
                port: config.port.clone(),
                slices: BTreeMap::new(),
                replicas: HashMap::new(),
                deployment: None,
                deleted: false,
                pods: BTreeMap::new(),
                published: None,
            }
            .run(cluster.client.clone(), config.service.clone()),
        );
        KubernetesBackend {
            shared,
            tasks: Mutex::new(vec![writer, watcher]),
        }
    }
}

impl Backend for KubernetesBackend {
    fn kind(&self) -> &'static str {
        "kubernetes"
    }

    fn scalable(&self) -> bool {
        true
    }

    fn replicas(&self) -> u32 {
        self.shared.observed.load(Ordering::Acquire)
    }

    fn set_replicas(&self, n: u32) {
        // The same wish again (the autoscaler repeats itself while a write is retried) does not
        // cut the writer's backoff short.
        self.shared.wish.send_if_modified(|wish| {
            let changed = *wish != Wish::Set(n);
            *wish = Wish::Set(n);
            changed
        });
    }

    fn scale_from_zero(&self, n: u32) -> bool {
        let s = &self.shared;
        // Exactly one of many arrivals wakes it: the first to turn the wish into a wake.
        let mut woke = false;
        s.wish.send_if_modified(|wish| {
            let at_zero = match *wish {
                // Going to zero, not written yet: wake instead.
                Wish::Set(0) => true,
                // Already on its way up.
                Wish::Set(_) | Wish::Wake(_) => false,
                // Nothing pending: what the API last said (unknown counts as zero).
                Wish::None => {
                    !(s.known.load(Ordering::Acquire) && s.observed.load(Ordering::Acquire) > 0)
                }
            };
            if at_zero {
                *wish = Wish::Wake(n);
                woke = true;
            }
            at_zero
        });
        woke
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        // The Deployment belongs to the cluster: it keeps its replicas when the gateway stops.
        let tasks: Vec<_> = self.tasks.lock().unwrap().drain(..).collect();
        Box::pin(async move {
            for task in tasks {
                task.abort();
                let _ = task.await;
            }
        })
    }
}

/// The scale writer: applies the latest wish, retrying with backoff until it is written.
async fn write_scale(shared: Arc<Shared>, api: Api<Deployment>, mut wishes: watch::Receiver<Wish>) {
    loop {
        if wishes.changed().await.is_err() {
            return;
        }
        let mut wait = SCALE_RETRY_MIN;
        loop {
            let wish = *wishes.borrow_and_update();
            match apply(&shared, &api, wish).await {
                Ok(()) => {
                    // Done: nothing is pending any more, unless a newer wish came meanwhile.
                    shared.wish.send_if_modified(|now| {
                        if *now == wish {
                            *now = Wish::None;
                        }
                        false
                    });
                    break;
                }
                Err(e) => {
                    warn!(function = %shared.function, deployment = %shared.deployment, namespace = %shared.namespace, error = %e, retry_in = ?wait, "scale write failed");
                    // A newer wish is applied at once; the same one after the backoff.
                    tokio::select! {
                        changed = wishes.changed() => if changed.is_err() { return },
                        _ = tokio::time::sleep(wait) => {}
                    }
                    wait = (wait * 2).min(SCALE_RETRY_MAX);
                }
            }
        }
    }
}

/// One write of `wish`: read the scale, write it back changed with its resourceVersion; on a
/// conflict (someone else wrote in between) read again.
pub async fn apply_wish(
    api: &Api<Deployment>,
    deployment: &str,
    set: Option<u32>,
    wake: Option<u32>,
) -> Result<Option<u32>, kube::Error> {
    for _ in 0..5 {
        let mut scale = api.get_scale(deployment).await?;
        let current = scale
            .spec
            .as_ref()
            .and_then(|s| s.replicas)
            .unwrap_or(0)
            .max(0) as u32;
        let target = match (set, wake) {
            (Some(n), _) => n,
            (None, Some(n)) if current == 0 => n,
            _ => return Ok(Some(current)),
        };
        if current == target {
            return Ok(Some(current));
        }
        scale.spec.get_or_insert_with(Default::default).replicas = Some(target as i32);
        match api
            .replace_scale(deployment, &PostParams::default(), &scale)
            .await
        {
            Ok(written) => {
                return Ok(Some(
                    written
                        .spec
                        .and_then(|s| s.replicas)
                        .unwrap_or(target as i32)
                        .max(0) as u32,
                ))
            }
            Err(kube::Error::Api(status)) if status.code == 409 => {
                debug!(deployment, "scale write conflicted; reading again");
                continue;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

async fn apply(shared: &Shared, api: &Api<Deployment>, wish: Wish) -> Result<(), String> {
    let (set, wake) = match wish {
        Wish::None => return Ok(()),
        Wish::Set(n) => (Some(n), None),
        Wish::Wake(n) => (None, Some(n)),
    };
    match apply_wish(api, &shared.deployment, set, wake).await {
        Ok(Some(now)) => {
            shared.observed.store(now, Ordering::Release);
            shared.known.store(true, Ordering::Release);
            info!(function = %shared.function, deployment = %shared.deployment, replicas = now, "scale written");
            Ok(())
        }
        Ok(None) => Err("the scale kept changing under five writes in a row".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// What one pod says about why it is not ready.
#[derive(Clone, Debug)]
struct PodTrouble {
    reason: String,
}

/// The watch task's state.
struct Watch {
    shared: Arc<Shared>,
    publisher: Publisher,
    port: Option<String>,
    slices: BTreeMap<String, EndpointSlice>,
    /// Published replicas by address, so each keeps its identity (cap, pool) across updates.
    replicas: HashMap<SocketAddr, Arc<Replica>>,
    deployment: Option<Deployment>,
    deleted: bool,
    pods: BTreeMap<String, PodTrouble>,
    /// What was published last: the ready addresses and the failure reason.
    published: Option<(Vec<SocketAddr>, Option<String>)>,
}

impl Watch {
    async fn run(mut self, client: kube::Client, service: String) {
        let ns = self.shared.namespace.clone();
        let slices = watcher(
            Api::<EndpointSlice>::namespaced(client.clone(), &ns),
            watcher::Config::default().labels(&format!("{SERVICE_NAME_LABEL}={service}")),
        )
        .default_backoff()
        .boxed();
        let deployments = watcher(
            Api::<Deployment>::namespaced(client.clone(), &ns),
            watcher::Config::default().fields(&format!("metadata.name={}", self.shared.deployment)),
        )
        .default_backoff()
        .boxed();
        tokio::pin!(slices, deployments);
        let mut slice_buffer: Option<BTreeMap<String, EndpointSlice>> = None;
        let mut deployment_buffer: Option<Option<Deployment>> = None;
        // The pods watch follows the Deployment's selector; restarted when it changes.
        let mut pods: Option<(String, futures::stream::BoxStream<'static, _>)> = None;
        let mut pod_buffer: Option<BTreeMap<String, PodTrouble>> = None;
        loop {
            let pod_next = async {
                match pods.as_mut() {
                    Some((_, stream)) => stream.next().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                Some(event) = slices.next() => match event {
                    Ok(Event::Init) => slice_buffer = Some(BTreeMap::new()),
                    Ok(Event::InitApply(s)) => {
                        if let Some(buf) = slice_buffer.as_mut() {
                            buf.insert(object_name(&s.metadata), s);
                        }
                    }
                    Ok(Event::InitDone) => {
                        if let Some(buf) = slice_buffer.take() {
                            self.slices = buf;
                        }
                        self.publish();
                    }
                    Ok(Event::Apply(s)) => {
                        self.slices.insert(object_name(&s.metadata), s);
                        self.publish();
                    }
                    Ok(Event::Delete(s)) => {
                        self.slices.remove(&object_name(&s.metadata));
                        self.publish();
                    }
                    Err(e) => warn!(function = %self.shared.function, error = %e, "EndpointSlice watch failed; keeping the endpoints it last saw"),
                },
                Some(event) = deployments.next() => {
                    let changed = match event {
                        Ok(Event::Init) => { deployment_buffer = Some(None); false }
                        Ok(Event::InitApply(d)) => {
                            if let Some(buf) = deployment_buffer.as_mut() { *buf = Some(d); }
                            false
                        }
                        Ok(Event::InitDone) => {
                            let seen = deployment_buffer.take().flatten();
                            self.deleted = seen.is_none();
                            self.deployment = seen;
                            true
                        }
                        Ok(Event::Apply(d)) => { self.deleted = false; self.deployment = Some(d); true }
                        Ok(Event::Delete(_)) => { self.deleted = true; self.deployment = None; true }
                        Err(e) => { warn!(function = %self.shared.function, error = %e, "Deployment watch failed; retrying"); false }
                    };
                    if changed {
                        self.deployment_changed();
                        let selector = self.deployment.as_ref().and_then(pod_selector);
                        if selector.as_deref() != pods.as_ref().map(|(s, _)| s.as_str()) {
                            pod_buffer = None;
                            self.pods.clear();
                            pods = selector.map(|sel| {
                                let stream = watcher(
                                    Api::<Pod>::namespaced(client.clone(), &ns),
                                    watcher::Config::default().labels(&sel),
                                )
                                .default_backoff()
                                .boxed();
                                (sel, stream)
                            });
                        }
                        self.publish();
                    }
                }
                Some(event) = pod_next => {
                    let changed = match event {
                        Ok(Event::Init) => { pod_buffer = Some(BTreeMap::new()); false }
                        Ok(Event::InitApply(p)) => {
                            if let Some(buf) = pod_buffer.as_mut() {
                                if let Some(t) = pod_trouble(&p) { buf.insert(object_name(&p.metadata), t); }
                            }
                            false
                        }
                        Ok(Event::InitDone) => {
                            if let Some(buf) = pod_buffer.take() { self.pods = buf; }
                            true
                        }
                        Ok(Event::Apply(p)) => {
                            let name = object_name(&p.metadata);
                            match pod_trouble(&p) {
                                Some(t) => { self.pods.insert(name, t); }
                                None => { self.pods.remove(&name); }
                            }
                            true
                        }
                        Ok(Event::Delete(p)) => { self.pods.remove(&object_name(&p.metadata)); true }
                        Err(e) => { debug!(function = %self.shared.function, error = %e, "Pod watch failed; retrying"); false }
                    };
                    if changed { self.publish(); }
                }
            }
        }
    }

    /// The Deployment changed: its `spec.replicas` is the count asked for.
    fn deployment_changed(&self) {
        let replicas = match &self.deployment {
            Some(d) => d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1).max(0) as u32,
            None => 0,
        };
        self.shared.observed.store(replicas, Ordering::Release);
        self.shared.known.store(true, Ordering::Release);
    }

    /// Publishes the ready set (and why there is none, when that is known), if it changed.
    fn publish(&mut self) {
        let ready = ready_addresses(self.slices.values(), self.port.as_deref());
        let failure = if !ready.is_empty() {
            None
        } else if self.deleted {
            Some(format!(
                "deployment {}/{} does not exist (deleted, or not created yet)",
                self.shared.namespace, self.shared.deployment
            ))
        } else if let Some(reason) = self.deployment.as_ref().and_then(deployment_trouble) {
            Some(reason)
        } else {
            self.pods.values().next().map(|t| t.reason.clone())
        };
        let now = (ready.clone(), failure.clone());
        if self.published.as_ref() == Some(&now) {
            return;
        }
        self.published = Some(now);
        let mut next = HashMap::with_capacity(ready.len());
        let mut replicas = Vec::with_capacity(ready.len());
        for addr in &ready {
            let replica = self.replicas.remove(addr).unwrap_or_else(|| {
                let authority = addr
                    .to_string()
                    .parse()
                    .expect("a socket address is an authority");
                Replica::new(Upstream::http(authority))
            });
            replicas.push(replica.clone());
            next.insert(*addr, replica);
        }
        // Whatever is left stopped being ready: no new requests (a request that loaded the old
        // set cannot take it either), the ones in flight finish.
        for (_, gone) in std::mem::replace(&mut self.replicas, next) {
            tokio::spawn(async move { gone.drain().await });
        }
        if let Some(reason) = &failure {
            warn!(function = %self.shared.function, reason = %reason, "function cannot become ready");
        }
        debug!(function = %self.shared.function, ready = replicas.len(), "endpoints");
        self.publisher.publish(Endpoints {
            replicas,
            failure: failure.map(|reason| StartFailure {
                reason: Arc::from(reason),
                retry_at: None,
            }),
        });
    }
}

fn object_name(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    meta.name.clone().unwrap_or_default()
}

/// The ready, not terminating endpoints of `slices`, each with the port named `port` (a name, or
/// a number) of its own slice, else the slice's first port; deduplicated and sorted.
pub fn ready_addresses<'a>(
    slices: impl Iterator<Item = &'a EndpointSlice>,
    port: Option<&str>,
) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for slice in slices {
        if slice.address_type == "FQDN" {
            continue;
        }
        let ports = slice.ports.as_deref().unwrap_or_default();
        let number = match port {
            Some(p) => match p.parse::<u16>() {
                Ok(n) => Some(n as i32),
                Err(_) => ports
                    .iter()
                    .find(|sp| sp.name.as_deref() == Some(p))
                    .and_then(|sp| sp.port),
            },
            None => ports.first().and_then(|sp| sp.port),
        };
        let Some(number) = number.and_then(|n| u16::try_from(n).ok()) else {
            continue;
        };
        for endpoint in &slice.endpoints {
            let conditions = endpoint.conditions.as_ref();
            let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
            let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
            if !ready || terminating {
                continue;
            }
            if let Some(ip) = endpoint
                .addresses
                .first()
                .and_then(|a| a.parse::<IpAddr>().ok())
            {
                out.push(SocketAddr::new(ip, number));
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The label selector of a Deployment's pods (`matchLabels` only), if it has one.
fn pod_selector(deployment: &Deployment) -> Option<String> {
    let labels = deployment.spec.as_ref()?.selector.match_labels.as_ref()?;
    if labels.is_empty() {
        return None;
    }
    Some(
        labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(","),
    )
}

/// Why a Deployment cannot make progress, from its conditions.
fn deployment_trouble(deployment: &Deployment) -> Option<String> {
    let name = deployment.metadata.name.as_deref().unwrap_or("");
    let conditions = deployment.status.as_ref()?.conditions.as_ref()?;
    conditions.iter().find_map(|c| {
        let failed = (c.type_ == "Progressing"
            && c.status == "False"
            && c.reason.as_deref() == Some("ProgressDeadlineExceeded"))
            || (c.type_ == "ReplicaFailure" && c.status == "True");
        failed.then(|| {
            format!(
                "deployment {name}: {}: {}",
                c.reason.as_deref().unwrap_or(&c.type_),
                c.message.as_deref().unwrap_or("")
            )
        })
    })
}

/// Container states that mean a pod will not become ready by waiting a little longer.
const STUCK: &[&str] = &[
    "CrashLoopBackOff",
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

/// Why a pod cannot become ready, read from its status, if it is stuck.
fn pod_trouble(pod: &Pod) -> Option<PodTrouble> {
    let name = pod.metadata.name.as_deref().unwrap_or("");
    let status = pod.status.as_ref()?;
    for c in status
        .init_container_statuses
        .iter()
        .chain(status.container_statuses.iter())
        .flatten()
    {
        let Some(waiting) = c.state.as_ref().and_then(|s| s.waiting.as_ref()) else {
            continue;
        };
        let Some(reason) = waiting.reason.as_deref().filter(|r| STUCK.contains(r)) else {
            continue;
        };
        let mut text = format!("pod {name}: container {}: {reason}", c.name);
        if let Some(message) = waiting.message.as_deref().filter(|m| !m.is_empty()) {
            text.push_str(": ");
            text.push_str(message);
        }
        if let Some(t) = c.last_state.as_ref().and_then(|s| s.terminated.as_ref()) {
            text.push_str(&format!(" (last exit code {}", t.exit_code));
            if let Some(m) = t.message.as_deref().or(t.reason.as_deref()) {
                text.push_str(&format!(": {m}"));
            }
            text.push(')');
        }
        return Some(PodTrouble { reason: text });
    }
    let unschedulable = status.conditions.iter().flatten().find(|c| {
        c.type_ == "PodScheduled"
            && c.status == "False"
            && c.reason.as_deref() == Some("Unschedulable")
    })?;
    Some(PodTrouble {
        reason: format!(
            "pod {name} cannot be scheduled: {}",
            unschedulable.message.as_deref().unwrap_or("Unschedulable")
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use http::{Method, Request, Response};
    use kube::client::Body;
    use serde_json::{json, Value};
    use tower_test::mock::{self, Handle};

    type ApiHandle = Handle<Request<Body>, Response<Body>>;

    fn mock_api() -> (Api<Deployment>, ApiHandle) {
        let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(svc, "fns");
        (Api::namespaced(client, "fns"), handle)
    }

    fn scale(replicas: i32, rv: &str) -> Value {
        json!({
            "apiVersion": "autoscaling/v1",
            "kind": "Scale",
            "metadata": {"name": "f", "namespace": "fns", "resourceVersion": rv},
            "spec": {"replicas": replicas},
            "status": {"replicas": replicas, "selector": "app=f"}
        })
    }

    fn reply(status: u16, body: Value) -> Response<Body> {
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(&body).unwrap()))
            .unwrap()
    }

    fn conflict() -> Value {
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "Operation cannot be fulfilled on deployments.apps \"f\": the object has been modified; please apply your changes to the latest version and try again",
            "reason": "Conflict", "details": {"name": "f", "group": "apps", "kind": "deployments"}, "code": 409
        })
    }

    const SCALE_URI: &str = "/apis/apps/v1/namespaces/fns/deployments/f/scale";

    /// Expects a `GET` of the scale and answers `replicas` at `rv`.
    async fn expect_get(handle: &mut ApiHandle, replicas: i32, rv: &str) {
        let (req, send) = handle.next_request().await.expect("a GET of the scale");
        assert_eq!(req.method(), Method::GET);
        assert_eq!(req.uri().to_string(), SCALE_URI);
        send.send_response(reply(200, scale(replicas, rv)));
    }

    /// Expects a `PUT` of the scale; returns its body.
    async fn expect_put(
        handle: &mut ApiHandle,
    ) -> (Value, tower_test::mock::SendResponse<Response<Body>>) {
        let (req, send) = handle.next_request().await.expect("a PUT of the scale");
        assert_eq!(req.method(), Method::PUT);
        assert_eq!(req.uri().to_string(), format!("{SCALE_URI}?"));
        assert_eq!(req.headers()["content-type"], "application/json");
        let body = req.into_body().collect_bytes().await.unwrap();
        (serde_json::from_slice(&body).unwrap(), send)
    }

    #[tokio::test]
    async fn a_scale_write_reads_then_writes_only_the_subresource_with_its_resource_version() {
        let (api, mut handle) = mock_api();
        let server = tokio::spawn(async move {
            expect_get(&mut handle, 0, "41").await;
            let (body, send) = expect_put(&mut handle).await;
            assert_eq!(body["kind"], "Scale");
            assert_eq!(body["spec"]["replicas"], 3);
            assert_eq!(body["metadata"]["resourceVersion"], "41");
            send.send_response(reply(200, scale(3, "42")));
        });
        let written = apply_wish(&api, "f", Some(3), None).await.unwrap();
        assert_eq!(written, Some(3));
        tokio::time::timeout(Duration::from_secs(1), server)
            .await
            .expect("every expected call made")
            .unwrap();
    }

    #[tokio::test]
    async fn a_conflicting_write_is_read_again_and_retried() {
        let (api, mut handle) = mock_api();
        let server = tokio::spawn(async move {
            expect_get(&mut handle, 1, "7").await;
            let (body, send) = expect_put(&mut handle).await;
            assert_eq!(body["metadata"]["resourceVersion"], "7");
            send.send_response(reply(409, conflict()));
            // Someone else wrote meanwhile: read the new version, write over it.
            expect_get(&mut handle, 2, "9").await;
            let (body, send) = expect_put(&mut handle).await;
            assert_eq!(body["metadata"]["resourceVersion"], "9");
            assert_eq!(body["spec"]["replicas"], 4);
            send.send_response(reply(200, scale(4, "10")));
        });
        assert_eq!(apply_wish(&api, "f", Some(4), None).await.unwrap(), Some(4));
        tokio::time::timeout(Duration::from_secs(1), server)
            .await
            .expect("every expected call made")
            .unwrap();
    }

    #[tokio::test]
    async fn a_wake_writes_only_when_the_count_is_still_zero() {
        let (api, mut handle) = mock_api();
        let server = tokio::spawn(async move {
            // An external scaler already moved it to 2: read, and no write.
            expect_get(&mut handle, 2, "5").await;
            // At zero: written to 1.
            expect_get(&mut handle, 0, "6").await;
            let (body, send) = expect_put(&mut handle).await;
            assert_eq!(body["spec"]["replicas"], 1);
            send.send_response(reply(200, scale(1, "7")));
            // No further call.
            assert!(
                tokio::time::timeout(Duration::from_millis(50), handle.next_request())
                    .await
                    .is_err(),
                "no call after the wake"
            );
        });
        assert_eq!(apply_wish(&api, "f", None, Some(1)).await.unwrap(), Some(2));
        assert_eq!(apply_wish(&api, "f", None, Some(1)).await.unwrap(), Some(1));
        tokio::time::timeout(Duration::from_secs(1), server)
            .await
            .expect("every expected call made")
            .unwrap();
    }

    #[tokio::test]
    async fn an_unchanged_count_is_not_written() {
        let (api, mut handle) = mock_api();
        let server = tokio::spawn(async move {
            expect_get(&mut handle, 3, "5").await;
        });
        assert_eq!(apply_wish(&api, "f", Some(3), None).await.unwrap(), Some(3));
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_server_error_is_returned_for_the_writer_to_retry() {
        let (api, mut handle) = mock_api();
        let server = tokio::spawn(async move {
            let (_, send) = handle.next_request().await.unwrap();
            send.send_response(reply(
                503,
                json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                       "message": "the server is currently unable to handle the request",
                       "reason": "ServiceUnavailable", "code": 503}),
            ));
        });
        let err = apply_wish(&api, "f", Some(2), None).await.unwrap_err();
        assert!(
            matches!(&err, kube::Error::Api(s) if s.code == 503),
            "{err}"
        );
        server.await.unwrap();
    }

    fn slice(value: Value) -> EndpointSlice {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn only_ready_not_terminating_endpoints_are_replicas_on_the_named_port() {
        let a = slice(json!({
            "metadata": {"name": "f-abc", "labels": {"kubernetes.io/service-name": "f"}},
            "addressType": "IPv4",
            "ports": [{"name": "metrics", "port": 9090}, {"name": "http", "port": 8080}],
            "endpoints": [
                {"addresses": ["10.0.0.1"], "conditions": {"ready": true}},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": false}},
                {"addresses": ["10.0.0.3"], "conditions": {"ready": true, "terminating": true}},
                {"addresses": ["10.0.0.4"]},
                {"addresses": ["10.0.0.1"], "conditions": {"ready": true}}
            ]
        }));
        let b = slice(json!({
            "metadata": {"name": "f-def"},
            "addressType": "IPv6",
            "ports": [{"name": "http", "port": 8081}],
            "endpoints": [{"addresses": ["fd00::5"], "conditions": {"ready": true}}]
        }));
        let fqdn = slice(json!({
            "metadata": {"name": "f-x"}, "addressType": "FQDN",
            "ports": [{"name": "http", "port": 80}],
            "endpoints": [{"addresses": ["a.example"]}]
        }));
        let all = [a.clone(), b, fqdn];
        let got: Vec<String> = ready_addresses(all.iter(), Some("http"))
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(got, ["10.0.0.1:8080", "10.0.0.4:8080", "[fd00::5]:8081"]);
        let first: Vec<String> = ready_addresses([a.clone()].iter(), None)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(first, ["10.0.0.1:9090", "10.0.0.4:9090"]);
        let numbered = ready_addresses([a.clone()].iter(), Some("7000"));
        assert_eq!(numbered[0].port(), 7000);
        assert!(ready_addresses([a].iter(), Some("grpc")).is_empty());
    }

    #[test]
    fn a_stuck_pod_names_its_reason_and_last_exit() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "f-7d9-x"},
            "status": {"containerStatuses": [{
                "name": "fn", "image": "f:1", "imageID": "", "ready": false, "restartCount": 4,
                "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting failed container"}},
                "lastState": {"terminated": {"exitCode": 3, "reason": "Error"}}
            }]}
        }))
        .unwrap();
        assert_eq!(
            pod_trouble(&pod).unwrap().reason,
            "pod f-7d9-x: container fn: CrashLoopBackOff: back-off 40s restarting failed container (last exit code 3: Error)"
        );
        let starting: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p"},
            "status": {"containerStatuses": [{
                "name": "fn", "image": "f:1", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"waiting": {"reason": "ContainerCreating"}}
            }]}
        }))
        .unwrap();
        assert!(
            pod_trouble(&starting).is_none(),
            "still starting is not stuck"
        );
        let pending: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p"},
            "status": {"conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                        "message": "0/3 nodes are available: 3 Insufficient cpu."}]}
        }))
        .unwrap();
        assert_eq!(
            pod_trouble(&pending).unwrap().reason,
            "pod p cannot be scheduled: 0/3 nodes are available: 3 Insufficient cpu."
        );
    }

    #[test]
    fn a_deployment_past_its_progress_deadline_is_trouble() {
        let d: Deployment = serde_json::from_value(json!({
            "metadata": {"name": "f"},
            "spec": {"selector": {"matchLabels": {"app": "f", "tier": "fn"}}, "template": {}},
            "status": {"conditions": [
                {"type": "Available", "status": "False"},
                {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                 "message": "ReplicaSet \"f-7d9\" has timed out progressing."}
            ]}
        }))
        .unwrap();
        assert_eq!(
            deployment_trouble(&d).unwrap(),
            "deployment f: ProgressDeadlineExceeded: ReplicaSet \"f-7d9\" has timed out progressing."
        );
        assert_eq!(pod_selector(&d).unwrap(), "app=f,tier=fn");
    }
}
