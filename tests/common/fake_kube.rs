//! A fake Kubernetes API server on 127.0.0.1 that speaks the real JSON and watch protocol, so the
//! real `kube` client and `kube::runtime::watcher` run against it in integration tests.
//!
//! It serves, namespaced or across namespaces:
//!
//! * Deployments (`apps/v1`): list, watch, get, and the `scale` subresource (`autoscaling/v1`
//!   Scale): get, put and merge patch, with `409 Conflict` on a stale resourceVersion;
//! * EndpointSlices (`discovery.k8s.io/v1`) and Pods (`v1`): list, watch, get.
//!
//! One global resourceVersion counter is bumped by every write. Each resource keeps a bounded log
//! of its changes: a watch from resourceVersion X replays the changes after X, then streams new
//! ones (one JSON event per line, BOOKMARKs when idle) until its `timeoutSeconds`; when X is older
//! than the log it gets `200` and one `ERROR` event with the `410 Expired` Status, as the real
//! server answers.
//!
//! Tests drive the cluster through [`FakeKube`]: objects, replicas simulated on real sockets that
//! turn ready after a delay, injected failures, an outage, dropped and expired watches, and the
//! list of requests seen.
//!
//! What the real API server does and this fake does not:
//! * writes through the API other than the scale subresource (create, update, delete, status):
//!   `405`; the test changes objects through [`FakeKube`] instead;
//! * json-patch and server-side apply of the scale (`415`); a strategic merge patch is applied as
//!   a JSON merge patch (the same thing for a Scale);
//! * pagination: `limit` is ignored, a list is one page and never carries `continue`;
//! * field selectors other than `metadata.name` / `metadata.namespace` (`400`);
//! * controllers: a Deployment's `status.replicas` follows `spec.replicas` at once, there are no
//!   ReplicaSets and no Pods unless the test applies them, `readyReplicas` is never set (readiness
//!   lives in the EndpointSlices), and EndpointSlices change only through [`FakeKube`];
//! * authentication, authorization, admission, `managedFields`, finalizers, gzip, HTTP/2,
//!   `resourceVersionMatch` on lists (a list is always the latest state), a watch from a future
//!   resourceVersion (the real server waits, then `504`).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{sleep, sleep_until, timeout, Instant};

/// Changes each resource's log keeps; a watch from a resourceVersion older than the log gets
/// `410 Expired`.
const LOG_CAPACITY: usize = 1000;
/// How long a watch that asked for bookmarks stays idle before it gets a BOOKMARK.
const BOOKMARK_EVERY: Duration = Duration::from_millis(500);
/// How long [`FakeKube::until_watching`] waits before it fails the test.
const WAIT_LIMIT: Duration = Duration::from_secs(10);
/// Lines a watch stream buffers before it waits for the client to read.
const WATCH_BUFFER: usize = 64;

/// The label the EndpointSlice controller puts on every slice of a Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The name of the port in the EndpointSlices that [`FakeKube::bind_replicas`] publishes.
pub const BOUND_PORT_NAME: &str = "http";
/// The container name in the Deployments' pod template and in applied Pods.
pub const CONTAINER_NAME: &str = "function";

/// A resource the fake serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resource {
    /// `apps/v1` Deployments (and their `scale` subresource).
    Deployments,
    /// `discovery.k8s.io/v1` EndpointSlices.
    EndpointSlices,
    /// `v1` Pods.
    Pods,
    /// `coordination.k8s.io/v1` Leases (create and replace with resourceVersion checks).
    Leases,
}

impl Resource {
    const ALL: [Resource; 4] = [
        Self::Deployments,
        Self::EndpointSlices,
        Self::Pods,
        Self::Leases,
    ];

    fn group(self) -> &'static str {
        match self {
            Self::Deployments => "apps",
            Self::EndpointSlices => "discovery.k8s.io",
            Self::Pods => "",
            Self::Leases => "coordination.k8s.io",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Self::Deployments => "apps/v1",
            Self::EndpointSlices => "discovery.k8s.io/v1",
            Self::Pods => "v1",
            Self::Leases => "coordination.k8s.io/v1",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Self::Deployments => "Deployment",
            Self::EndpointSlices => "EndpointSlice",
            Self::Pods => "Pod",
            Self::Leases => "Lease",
        }
    }

    fn plural(self) -> &'static str {
        match self {
            Self::Deployments => "deployments",
            Self::EndpointSlices => "endpointslices",
            Self::Pods => "pods",
            Self::Leases => "leases",
        }
    }

    /// `deployments.apps`, `pods`: how the API server names the resource in its messages.
    fn qualified(self) -> String {
        match self.group() {
            "" => self.plural().to_owned(),
            group => format!("{}.{group}", self.plural()),
        }
    }

    fn from_path(api_version: &str, plural: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|r| r.api_version() == api_version && r.plural() == plural)
    }
}

/// One endpoint of a Service, as it appears in an EndpointSlice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FakeEndpoint {
    /// The pod's address; the slice carries the IP, its `ports` the port.
    pub addr: SocketAddr,
    /// `conditions.ready`: the pod takes new requests.
    pub ready: bool,
    /// `conditions.serving`: the pod passes its readiness probe (even while terminating).
    pub serving: bool,
    /// `conditions.terminating`: the pod is being deleted.
    pub terminating: bool,
}

impl FakeEndpoint {
    /// A running pod that passes its readiness probe.
    pub fn ready(addr: SocketAddr) -> Self {
        Self {
            addr,
            ready: true,
            serving: true,
            terminating: false,
        }
    }

    /// A pod that is starting (or failing its readiness probe).
    pub fn not_ready(addr: SocketAddr) -> Self {
        Self {
            addr,
            ready: false,
            serving: false,
            terminating: false,
        }
    }

    /// A pod being deleted that still serves its in-flight requests.
    pub fn terminating(addr: SocketAddr) -> Self {
        Self {
            addr,
            ready: false,
            serving: true,
            terminating: true,
        }
    }
}

/// A request the fake received, recorded before it was answered.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// `GET`, `PUT`, `PATCH`, …
    pub method: String,
    /// E.g. `/apis/apps/v1/namespaces/fns/deployments/f/scale`.
    pub path: String,
    /// The raw query string, without `?` (kube's start with `&`).
    pub query: String,
    pub content_type: Option<String>,
    /// The request body, as text (empty for a GET).
    pub body: String,
}

impl Recorded {
    /// The decoded value of query parameter `key`.
    pub fn param(&self, key: &str) -> Option<String> {
        form_urlencoded::parse(self.query.as_bytes())
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.into_owned())
    }

    /// Whether this is a watch (`watch=true`).
    pub fn is_watch(&self) -> bool {
        matches!(self.param("watch").as_deref(), Some("true" | "1"))
    }

    /// Whether this is a list: a GET of a collection that is not a watch.
    pub fn is_list(&self, resource: Resource) -> bool {
        self.method == "GET"
            && self.path.ends_with(&format!("/{}", resource.plural()))
            && !self.is_watch()
    }
}

/// A handle on a running fake API server; clones share it.
#[derive(Clone)]
pub struct FakeKube {
    inner: Arc<Inner>,
}

struct Inner {
    addr: SocketAddr,
    state: Mutex<State>,
    /// The latest resourceVersion: open watches wait on it for new changes.
    latest: watch::Sender<u64>,
    /// Bumped whenever a watch opens or closes, for `until_watching`.
    watches_changed: watch::Sender<u64>,
    /// The accept loop, absent while the server is down.
    serving: Mutex<Option<Serving>>,
}

struct Serving {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl FakeKube {
    /// Starts a fake API server on `127.0.0.1:0`.
    pub async fn start() -> FakeKube {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake API server");
        let addr = listener.local_addr().expect("local addr");
        let inner = Arc::new(Inner {
            addr,
            state: Mutex::new(State::default()),
            latest: watch::Sender::new(0),
            watches_changed: watch::Sender::new(0),
            serving: Mutex::new(None),
        });
        inner.serve(listener);
        FakeKube { inner }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.inner.addr)
    }

    /// A kube client for this server, without kube's retry layer (which would retry injected
    /// 429/503/504s for seconds).
    pub fn client(&self, namespace: &str) -> kube::Client {
        let mut config = kube::Config::new(self.url().parse().expect("fake url"));
        config.default_namespace = namespace.to_owned();
        config.default_retry = false;
        kube::Client::try_from(config).expect("kube client for the fake API server")
    }

    /// Writes a kubeconfig for this server into `dir`: one cluster (`http://127.0.0.1:PORT`), one
    /// user with a dummy token, and the current context with `namespace`. Returns its path.
    pub fn write_kubeconfig(&self, dir: &Path, namespace: &str) -> PathBuf {
        let path = dir.join(format!("kubeconfig-{}", self.inner.addr.port()));
        let text = format!(
            "apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster:
    server: {url}
users:
- name: fake
  user:
    token: fake-token
contexts:
- name: fake
  context:
    cluster: fake
    user: fake
    namespace: {namespace}
current-context: fake
preferences: {{}}
",
            url = self.url()
        );
        std::fs::write(&path, text).expect("write the kubeconfig");
        path
    }

    /// The global resourceVersion: that of the latest write.
    pub fn resource_version(&self) -> u64 {
        self.inner.lock().rv
    }

    /// An object as the API server would return it from a GET.
    pub fn object(&self, resource: Resource, namespace: &str, name: &str) -> Option<Value> {
        self.inner.lock().get(resource, namespace, name).cloned()
    }

    /// Creates or replaces a Deployment (keeping its uid, creation time and conditions); one
    /// `ADDED` or `MODIFIED` event, none if nothing changed. Its pods carry `selector`.
    pub fn apply_deployment(
        &self,
        namespace: &str,
        name: &str,
        replicas: i32,
        labels: &[(&str, &str)],
        annotations: &[(&str, &str)],
        selector: &[(&str, &str)],
    ) {
        self.inner.mutate(|st| {
            let mut deployment = json!({
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": metadata(namespace, name, labels, annotations),
                "spec": {
                    "replicas": replicas,
                    "selector": {"matchLabels": string_map(selector)},
                    "template": {
                        "metadata": {"labels": string_map(selector)},
                        "spec": {"containers": [{"name": CONTAINER_NAME, "image": "fake.invalid/function:latest"}]},
                    },
                    "progressDeadlineSeconds": 600,
                },
            });
            if let Some(conditions) = st
                .get(Resource::Deployments, namespace, name)
                .map(|d| d["status"]["conditions"].clone())
                .filter(|c| !c.is_null())
            {
                deployment["status"]["conditions"] = conditions;
            }
            st.put(Resource::Deployments, deployment);
        });
    }

    /// Deletes a Deployment (one `DELETED` event). False if there was none.
    pub fn delete_deployment(&self, namespace: &str, name: &str) -> bool {
        self.inner
            .mutate(|st| st.remove(Resource::Deployments, namespace, name))
    }

    /// Sets one condition of a Deployment's status, e.g. `("Progressing", "False",
    /// "ProgressDeadlineExceeded", "…")`, replacing the one of the same type. False if there is no
    /// such Deployment.
    pub fn set_deployment_condition(
        &self,
        namespace: &str,
        name: &str,
        type_: &str,
        status: &str,
        reason: &str,
        message: &str,
    ) -> bool {
        self.inner.mutate(|st| {
            let Some(mut deployment) = st.get(Resource::Deployments, namespace, name).cloned()
            else {
                return false;
            };
            let now = now();
            let mut conditions = match deployment["status"]["conditions"].take() {
                Value::Array(conditions) => conditions,
                _ => Vec::new(),
            };
            let previous = conditions.iter().position(|c| c["type"] == type_);
            let transition = match previous.map(|i| &conditions[i]) {
                Some(c) if c["status"] == status => c["lastTransitionTime"].clone(),
                _ => json!(now),
            };
            let condition = json!({
                "type": type_,
                "status": status,
                "reason": reason,
                "message": message,
                "lastUpdateTime": now,
                "lastTransitionTime": transition,
            });
            match previous {
                Some(i) => conditions[i] = condition,
                None => conditions.push(condition),
            }
            deployment["status"]["conditions"] = Value::Array(conditions);
            st.put(Resource::Deployments, deployment);
            true
        })
    }

    /// A Deployment's `spec.replicas`.
    pub fn deployment_replicas(&self, namespace: &str, name: &str) -> Option<i32> {
        let st = self.inner.lock();
        let replicas =
            st.get(Resource::Deployments, namespace, name)?["spec"]["replicas"].as_i64()?;
        i32::try_from(replicas).ok()
    }

    /// Publishes a Service's endpoints as the EndpointSlice controller would: one slice
    /// `{service}-xxxxx` per distinct port (a slice has one port list), reused across calls so a
    /// change is a `MODIFIED` event; no endpoints leaves one empty placeholder slice.
    pub fn set_endpoints(
        &self,
        namespace: &str,
        service: &str,
        endpoints: Vec<FakeEndpoint>,
        port_name: &str,
    ) {
        self.set_endpoint_slices(namespace, service, vec![endpoints], port_name);
    }

    /// Like [`set_endpoints`](Self::set_endpoints), with the endpoints split over several slices:
    /// each group becomes its own slice(s).
    pub fn set_endpoint_slices(
        &self,
        namespace: &str,
        service: &str,
        groups: Vec<Vec<FakeEndpoint>>,
        port_name: &str,
    ) {
        self.inner
            .mutate(|st| st.set_slices(namespace, service, groups, port_name));
    }

    /// Deletes every EndpointSlice of a Service (as when the Service is deleted).
    pub fn delete_endpoints(&self, namespace: &str, service: &str) {
        self.inner.mutate(|st| {
            let names = st
                .slices
                .remove(&(namespace.to_owned(), service.to_owned()))
                .unwrap_or_default();
            for name in names {
                st.remove(Resource::EndpointSlices, namespace, &name);
            }
        });
    }

    /// Creates or replaces a Pod with `status` (see [`crash_loop_status`] and
    /// [`unschedulable_status`]).
    pub fn apply_pod(&self, namespace: &str, name: &str, labels: &[(&str, &str)], status: Value) {
        self.inner.mutate(|st| {
            st.put(
                Resource::Pods,
                json!({
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": metadata(namespace, name, labels, &[]),
                    "spec": {"containers": [{"name": CONTAINER_NAME, "image": "fake.invalid/function:latest"}]},
                    "status": status,
                }),
            );
        });
    }

    /// Deletes a Pod. False if there was none.
    pub fn delete_pod(&self, namespace: &str, name: &str) -> bool {
        self.inner
            .mutate(|st| st.remove(Resource::Pods, namespace, name))
    }

    /// Simulates a Deployment's pods at `addrs` (real sockets the test serves): whenever its
    /// `spec.replicas` is N, the first N addresses are endpoints of `service` (port named
    /// [`BOUND_PORT_NAME`]), each not ready until `ready_after` after it was asked for, then
    /// ready; on scale-down the surplus turns terminating for `ready_after`, then is gone.
    /// Publishes at once (a placeholder slice if N is 0).
    pub fn bind_replicas(
        &self,
        namespace: &str,
        deployment: &str,
        service: &str,
        addrs: Vec<SocketAddr>,
        ready_after: Duration,
    ) {
        self.inner.mutate(|st| {
            let binding = Binding {
                service: service.to_owned(),
                phases: vec![Phase::Absent; addrs.len()],
                addrs,
                ready_after,
            };
            st.bindings
                .insert((namespace.to_owned(), deployment.to_owned()), binding);
        });
    }

    /// Answers the next `n` requests with `status` and its Status body instead of serving them.
    pub fn fail_next(&self, n: u32, status: u16) {
        self.inner.lock().injected = (n > 0).then_some((n, status));
    }

    /// Takes the server down (stops listening and closes every open connection, so a client sees
    /// connections refused or reset) or brings it back up on the same port.
    pub async fn set_down(&self, down: bool) {
        if down {
            let serving = self.inner.serving_slot().take();
            if let Some(serving) = serving {
                let _ = serving.stop.send(());
                let _ = serving.task.await;
            }
            self.inner.end_watches(|_| Control::Drop);
        } else if self.inner.serving_slot().is_none() {
            let listener = TcpListener::bind(self.inner.addr)
                .await
                .expect("rebind the fake API server's port");
            self.inner.serve(listener);
        }
    }

    /// Ends every open watch stream now, cleanly, as its timeout would.
    pub fn drop_watches(&self) {
        self.inner.end_watches(|_| Control::Drop);
    }

    /// Sends the `410 Expired` ERROR event on every open watch and empties the event logs, so a
    /// watch resumed from any older resourceVersion also gets 410.
    pub fn expire_watches(&self) {
        let floor = {
            let mut st = self.inner.lock();
            let floor = st.rv;
            for resource in Resource::ALL {
                let log = st.logs.entry(resource).or_default();
                log.changes.clear();
                log.floor = floor;
            }
            floor
        };
        self.inner.end_watches(|_| Control::Expire(floor));
    }

    /// Every request seen since the start or the last [`clear_requests`](Self::clear_requests),
    /// in order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.inner.lock().requests.clone()
    }

    /// Forgets the requests seen so far.
    pub fn clear_requests(&self) {
        self.inner.lock().requests.clear();
    }

    /// How many watches on `resource` are open now.
    pub fn watching(&self, resource: Resource) -> usize {
        self.inner
            .lock()
            .watches
            .iter()
            .filter(|w| w.resource == resource)
            .count()
    }

    /// Waits until a watch on `resource` is open (panics after 10 s). A watch ended by
    /// [`drop_watches`](Self::drop_watches), [`expire_watches`](Self::expire_watches) or
    /// [`set_down`](Self::set_down) no longer counts when those return.
    pub async fn until_watching(&self, resource: Resource) {
        self.until_watches(resource, 1).await;
    }

    /// Waits until at least `n` watches on `resource` are open (panics after 10 s).
    pub async fn until_watches(&self, resource: Resource, n: usize) {
        let mut changed = self.inner.watches_changed.subscribe();
        let opened = async {
            while self.watching(resource) < n {
                if changed.changed().await.is_err() {
                    return;
                }
            }
        };
        if timeout(WAIT_LIMIT, opened).await.is_err() {
            panic!(
                "{} watch(es) on {resource:?} open after {WAIT_LIMIT:?}, wanted {n}",
                self.watching(resource)
            );
        }
    }
}

/// A Pod status whose one container is in `CrashLoopBackOff`, its last run having exited with
/// `exit_code` and `message`.
pub fn crash_loop_status(exit_code: i32, message: &str) -> Value {
    let now = now();
    json!({
        "phase": "Running",
        "conditions": [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
            {"type": "Ready", "status": "False", "reason": "ContainersNotReady", "lastTransitionTime": now},
        ],
        "containerStatuses": [{
            "name": CONTAINER_NAME,
            "image": "fake.invalid/function:latest",
            "imageID": "",
            "ready": false,
            "started": false,
            "restartCount": 3,
            "state": {"waiting": {
                "reason": "CrashLoopBackOff",
                "message": format!("back-off 40s restarting failed container={CONTAINER_NAME}"),
            }},
            "lastState": {"terminated": {
                "exitCode": exit_code,
                "reason": "Error",
                "message": message,
                "startedAt": now,
                "finishedAt": now,
            }},
        }],
    })
}

/// A Pod status the scheduler could not place: `PodScheduled=False`, reason `Unschedulable`.
pub fn unschedulable_status(message: &str) -> Value {
    json!({
        "phase": "Pending",
        "conditions": [{
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": message,
            "lastTransitionTime": now(),
        }],
    })
}

// ---------------------------------------------------------------------------------------------
// The cluster state.

#[derive(Default)]
struct State {
    /// The global resourceVersion, bumped by every write.
    rv: u64,
    /// Objects by (resource, namespace, name), as a GET returns them.
    objects: BTreeMap<(Resource, String, String), Value>,
    logs: HashMap<Resource, Log>,
    /// A Service's slice names, in the order `set_slices` fills them.
    slices: HashMap<(String, String), Vec<String>>,
    /// Simulated replicas by (namespace, deployment).
    bindings: HashMap<(String, String), Binding>,
    /// Requests still to fail, and with what status.
    injected: Option<(u32, u16)>,
    requests: Vec<Recorded>,
    watches: Vec<OpenWatch>,
    next_watch: u64,
}

/// A resource's recent changes; those at or below `floor` are gone.
#[derive(Default)]
struct Log {
    changes: VecDeque<Change>,
    floor: u64,
}

struct Change {
    rv: u64,
    /// `ADDED`, `MODIFIED` or `DELETED`.
    kind: &'static str,
    /// The object after the change (for `DELETED`, its last state stamped with the change's RV).
    object: Value,
    /// The object before a `MODIFIED`, so a selective watch sees objects enter and leave.
    previous: Option<Value>,
}

struct OpenWatch {
    id: u64,
    resource: Resource,
    control: oneshot::Sender<Control>,
}

enum Control {
    /// End the stream cleanly.
    Drop,
    /// Send `410 Expired` (the log now starts after this RV), then end.
    Expire(u64),
}

struct Binding {
    service: String,
    addrs: Vec<SocketAddr>,
    ready_after: Duration,
    /// Per address.
    phases: Vec<Phase>,
}

#[derive(Clone, Copy)]
enum Phase {
    Absent,
    Starting(Instant),
    Ready,
    Terminating { since: Instant, serving: bool },
}

impl State {
    fn get(&self, resource: Resource, namespace: &str, name: &str) -> Option<&Value> {
        self.objects
            .get(&(resource, namespace.to_owned(), name.to_owned()))
    }

    /// Creates or replaces an object, filling the system metadata; no write (and no event) when
    /// nothing changed, as on the real server.
    fn put(&mut self, resource: Resource, mut object: Value) {
        let key = (
            resource,
            object["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            object["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        );
        let previous = self.objects.get(&key).cloned();
        let meta = &mut object["metadata"];
        match &previous {
            Some(previous) => {
                for field in ["uid", "creationTimestamp", "resourceVersion", "generation"] {
                    if !previous["metadata"][field].is_null() {
                        meta[field] = previous["metadata"][field].clone();
                    }
                }
            }
            None => {
                meta["uid"] = json!(uuid::Uuid::new_v4().to_string());
                meta["creationTimestamp"] = json!(now());
            }
        }
        if resource != Resource::Pods {
            // The generation counts changes of the desired state (all but metadata and status).
            let generation = previous
                .as_ref()
                .map(|p| {
                    p["metadata"]["generation"].as_i64().unwrap_or(1)
                        + i64::from(desired(p) != desired(&object))
                })
                .unwrap_or(1);
            object["metadata"]["generation"] = json!(generation);
        }
        if resource == Resource::Deployments {
            settle_deployment(&mut object);
        }
        if previous.as_ref() == Some(&object) {
            return;
        }
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.objects.insert(key, object.clone());
        let kind = if previous.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.record(resource, kind, object, previous);
    }

    fn remove(&mut self, resource: Resource, namespace: &str, name: &str) -> bool {
        let Some(mut object) =
            self.objects
                .remove(&(resource, namespace.to_owned(), name.to_owned()))
        else {
            return false;
        };
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.record(resource, "DELETED", object, None);
        true
    }

    fn record(
        &mut self,
        resource: Resource,
        kind: &'static str,
        object: Value,
        previous: Option<Value>,
    ) {
        let rv = self.rv;
        let log = self.logs.entry(resource).or_default();
        log.changes.push_back(Change {
            rv,
            kind,
            object,
            previous,
        });
        while log.changes.len() > LOG_CAPACITY {
            if let Some(evicted) = log.changes.pop_front() {
                log.floor = evicted.rv;
            }
        }
    }

    /// The watch events a watch from `since` has not seen, and the RV they bring it to; or the
    /// log's floor when `since` is older than the log.
    fn pending(&self, selection: &Selection, since: u64) -> Result<(Vec<Bytes>, u64), u64> {
        let Some(log) = self.logs.get(&selection.resource) else {
            return Ok((Vec::new(), self.rv));
        };
        if since < log.floor {
            return Err(log.floor);
        }
        let lines = log
            .changes
            .iter()
            .filter(|c| c.rv > since)
            .filter_map(|c| selection.view(c))
            .collect();
        Ok((lines, self.rv))
    }

    /// Makes a Service's slices hold `groups`, reusing existing slices in order.
    fn set_slices(
        &mut self,
        namespace: &str,
        service: &str,
        groups: Vec<Vec<FakeEndpoint>>,
        port_name: &str,
    ) {
        // A slice has one address type and one port list: split each group by both.
        let mut wanted: Vec<(&'static str, u16, Vec<FakeEndpoint>)> = Vec::new();
        for group in groups {
            let start = wanted.len();
            for endpoint in group {
                let family = if endpoint.addr.is_ipv4() {
                    "IPv4"
                } else {
                    "IPv6"
                };
                let port = endpoint.addr.port();
                match wanted[start..]
                    .iter_mut()
                    .find(|(f, p, _)| *f == family && *p == port)
                {
                    Some((_, _, endpoints)) => endpoints.push(endpoint),
                    None => wanted.push((family, port, vec![endpoint])),
                }
            }
        }
        let bodies: Vec<Value> = if wanted.is_empty() {
            // The controller keeps one empty slice for a Service without endpoints.
            vec![json!({"addressType": "IPv4", "endpoints": null})]
        } else {
            wanted
                .into_iter()
                .map(|(family, port, endpoints)| {
                    json!({
                        "addressType": family,
                        "endpoints": endpoints.iter().map(|e| json!({
                            "addresses": [e.addr.ip().to_string()],
                            "conditions": {"ready": e.ready, "serving": e.serving, "terminating": e.terminating},
                            "targetRef": {"kind": "Pod", "namespace": namespace, "name": format!("{service}-{}", e.addr.port())},
                            "nodeName": "fake-node",
                        })).collect::<Vec<_>>(),
                        "ports": [{"name": port_name, "port": port, "protocol": "TCP"}],
                    })
                })
                .collect()
        };
        let key = (namespace.to_owned(), service.to_owned());
        let existing = self.slices.remove(&key).unwrap_or_default();
        let mut names = Vec::with_capacity(bodies.len());
        for (i, body) in bodies.into_iter().enumerate() {
            let name = existing
                .get(i)
                .cloned()
                .unwrap_or_else(|| format!("{service}-{}", name_suffix()));
            let mut slice = json!({
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": metadata(
                    namespace,
                    &name,
                    &[
                        (SERVICE_NAME_LABEL, service),
                        ("endpointslice.kubernetes.io/managed-by", "endpointslice-controller.k8s.io"),
                    ],
                    &[],
                ),
            });
            slice["metadata"]["generateName"] = json!(format!("{service}-"));
            for (field, value) in body.as_object().into_iter().flatten() {
                slice[field] = value.clone();
            }
            self.put(Resource::EndpointSlices, slice);
            names.push(name);
        }
        for name in existing.iter().skip(names.len()) {
            self.remove(Resource::EndpointSlices, namespace, name);
        }
        self.slices.insert(key, names);
    }

    /// Moves every simulated replica along (start, ready, terminate, gone) and publishes the
    /// endpoints. Returns when a replica's next step is due.
    fn reconcile_bindings(&mut self) -> Vec<Instant> {
        let now = Instant::now();
        let mut due = Vec::new();
        let keys: Vec<(String, String)> = self.bindings.keys().cloned().collect();
        for (namespace, deployment) in keys {
            let replicas = self
                .get(Resource::Deployments, &namespace, &deployment)
                .and_then(|d| d["spec"]["replicas"].as_u64())
                .unwrap_or(0);
            let Some(binding) = self.bindings.get_mut(&(namespace.clone(), deployment)) else {
                continue;
            };
            let after = binding.ready_after;
            let mut endpoints = Vec::new();
            for (i, (phase, addr)) in binding.phases.iter_mut().zip(&binding.addrs).enumerate() {
                let wanted = (i as u64) < replicas;
                *phase = match (*phase, wanted) {
                    (Phase::Absent | Phase::Terminating { .. }, true) => {
                        due.push(now + after);
                        Phase::Starting(now)
                    }
                    (Phase::Starting(_), false) => {
                        due.push(now + after);
                        Phase::Terminating {
                            since: now,
                            serving: false,
                        }
                    }
                    (Phase::Ready, false) => {
                        due.push(now + after);
                        Phase::Terminating {
                            since: now,
                            serving: true,
                        }
                    }
                    (phase, _) => phase,
                };
                *phase = match *phase {
                    Phase::Starting(since) if now >= since + after => Phase::Ready,
                    Phase::Terminating { since, .. } if now >= since + after => Phase::Absent,
                    phase => phase,
                };
                match *phase {
                    Phase::Absent => {}
                    Phase::Starting(_) => endpoints.push(FakeEndpoint::not_ready(*addr)),
                    Phase::Ready => endpoints.push(FakeEndpoint::ready(*addr)),
                    Phase::Terminating { serving, .. } => endpoints.push(FakeEndpoint {
                        serving,
                        ..FakeEndpoint::terminating(*addr)
                    }),
                }
            }
            let service = binding.service.clone();
            self.set_slices(&namespace, &service, vec![endpoints], BOUND_PORT_NAME);
        }
        due
    }
}

/// The part of an object that counts for `metadata.generation`.
fn desired(object: &Value) -> Map<String, Value> {
    let mut desired = object.as_object().cloned().unwrap_or_default();
    for field in ["metadata", "status", "apiVersion", "kind"] {
        desired.remove(field);
    }
    desired
}

/// What the Deployment controller would report at once: the desired replicas, observed.
fn settle_deployment(deployment: &mut Value) {
    let generation = deployment["metadata"]["generation"].clone();
    let replicas = deployment["spec"]["replicas"].as_i64().unwrap_or(1);
    let status = &mut deployment["status"];
    status["observedGeneration"] = generation;
    let fields = status.as_object_mut().expect("status is an object");
    for field in ["replicas", "updatedReplicas"] {
        // Zero counts are omitted, as the real server's `omitempty` does.
        if replicas > 0 {
            fields.insert(field.to_owned(), json!(replicas));
        } else {
            fields.remove(field);
        }
    }
}

fn metadata(
    namespace: &str,
    name: &str,
    labels: &[(&str, &str)],
    annotations: &[(&str, &str)],
) -> Value {
    let mut meta = json!({"name": name, "namespace": namespace});
    if !labels.is_empty() {
        meta["labels"] = string_map(labels);
    }
    if !annotations.is_empty() {
        meta["annotations"] = string_map(annotations);
    }
    meta
}

fn string_map(pairs: &[(&str, &str)]) -> Value {
    Value::Object(
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), json!(v)))
            .collect(),
    )
}

/// Now, as the API server writes timestamps (RFC 3339, seconds, UTC).
fn now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// Five characters from the alphabet `generateName` uses.
fn name_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    uuid::Uuid::new_v4().as_bytes()[..5]
        .iter()
        .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Serving.

type ApiBody = BoxBody<Bytes, Infallible>;

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn serving_slot(&self) -> MutexGuard<'_, Option<Serving>> {
        self.serving.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn serve(self: &Arc<Self>, listener: TcpListener) {
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(accept(self.clone(), listener, stopped));
        *self.serving_slot() = Some(Serving { stop, task });
    }

    /// Changes the state, moves the simulated replicas along, and wakes the watches.
    fn mutate<R>(self: &Arc<Self>, change: impl FnOnce(&mut State) -> R) -> R {
        let (result, due, rv) = {
            let mut st = self.lock();
            let result = change(&mut st);
            let due = st.reconcile_bindings();
            (result, due, st.rv)
        };
        self.changed(rv, due);
        result
    }

    /// Wakes the watches for `rv`, and schedules the simulated replicas' next steps.
    fn changed(self: &Arc<Self>, rv: u64, due: Vec<Instant>) {
        self.latest
            .send_if_modified(|latest| std::mem::replace(latest, rv) != rv);
        for at in due {
            let inner = self.clone();
            tokio::spawn(async move {
                sleep_until(at).await;
                inner.mutate(|_| ());
            });
        }
    }

    /// Ends every open watch with the control `how` gives it.
    fn end_watches(&self, how: impl Fn(&OpenWatch) -> Control) {
        let open = std::mem::take(&mut self.lock().watches);
        for watch in open {
            let control = how(&watch);
            let _ = watch.control.send(control);
        }
        self.watches_changed.send_modify(|n| *n += 1);
    }
}

async fn accept(inner: Arc<Inner>, listener: TcpListener, mut stop: oneshot::Receiver<()>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let inner = inner.clone();
                connections.spawn(async move {
                    let service = service_fn(move |req| handle(inner.clone(), req));
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            Some(_) = connections.join_next() => {}
        }
    }
    drop(listener);
    connections.shutdown().await;
}

async fn handle(
    inner: Arc<Inner>,
    req: Request<Incoming>,
) -> Result<Response<ApiBody>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let request = Recorded {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().unwrap_or_default().to_owned(),
        content_type: parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        body: String::from_utf8_lossy(&body).into_owned(),
    };
    let injected = {
        let mut st = inner.lock();
        st.requests.push(request.clone());
        match &mut st.injected {
            Some((left, status)) => {
                let status = *status;
                *left -= 1;
                if *left == 0 {
                    st.injected = None;
                }
                Some(status)
            }
            None => None,
        }
    };
    let response = match injected {
        Some(code) => Err(ApiError::new(
            code,
            format!("fake API server: injected failure {code}"),
        )),
        None => route(&inner, &parts.method, &request),
    };
    Ok(response.unwrap_or_else(ApiError::into_response))
}

/// Where a request path points.
struct Target {
    resource: Resource,
    /// None: across all namespaces.
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

impl Target {
    fn parse(path: &str) -> Option<Target> {
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let (api_version, rest) = match segments.as_slice() {
            ["api", version, rest @ ..] => ((*version).to_owned(), rest),
            ["apis", group, version, rest @ ..] => (format!("{group}/{version}"), rest),
            _ => return None,
        };
        let (namespace, plural, name, subresource) = match rest {
            [plural] => (None, *plural, None, None),
            ["namespaces", ns, plural] => (Some(*ns), *plural, None, None),
            ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name), None),
            ["namespaces", ns, plural, name, sub] => (Some(*ns), *plural, Some(*name), Some(*sub)),
            _ => return None,
        };
        Some(Target {
            resource: Resource::from_path(&api_version, plural)?,
            namespace: namespace.map(str::to_owned),
            name: name.map(str::to_owned),
            subresource: subresource.map(str::to_owned),
        })
    }
}

fn route(
    inner: &Arc<Inner>,
    method: &Method,
    request: &Recorded,
) -> Result<Response<ApiBody>, ApiError> {
    let target = Target::parse(&request.path).ok_or_else(|| {
        ApiError::new(
            404,
            "the server could not find the requested resource".to_owned(),
        )
    })?;
    let query: HashMap<String, String> = form_urlencoded::parse(request.query.as_bytes())
        .into_owned()
        .collect();
    let namespace = target.namespace.clone().unwrap_or_default();
    let scale =
        target.resource == Resource::Deployments && target.subresource.as_deref() == Some("scale");
    match (method, target.name.as_deref()) {
        (_, Some(_)) if target.subresource.is_some() && !scale => Err(ApiError::new(
            404,
            "the server could not find the requested resource".to_owned(),
        )),
        (&Method::GET, None) if request.is_watch() => open_watch(inner, &target, &query),
        (&Method::GET, None) => {
            let selection = Selection::parse(&target, &query)?;
            Ok(json_response(200, &inner.lock().list(&selection)))
        }
        (&Method::GET, Some(name)) => {
            let st = inner.lock();
            let object = st
                .get(target.resource, &namespace, name)
                .ok_or_else(|| ApiError::not_found(target.resource, name))?;
            Ok(json_response(
                200,
                &if scale {
                    scale_of(object)
                } else {
                    object.clone()
                },
            ))
        }
        (&Method::PUT, Some(name)) if scale => {
            let body: Value = serde_json::from_str(&request.body)
                .map_err(|e| ApiError::new(400, format!("couldn't decode the Scale: {e}")))?;
            let scale = inner.mutate(|st| st.write_scale(&namespace, name, body))?;
            Ok(json_response(200, &scale))
        }
        (&Method::PATCH, Some(name)) if scale => {
            let content_type = request.content_type.as_deref().unwrap_or_default();
            if !matches!(
                content_type,
                "application/merge-patch+json" | "application/strategic-merge-patch+json"
            ) {
                return Err(ApiError::new(
                    415,
                    format!(
                        "the body of the request was in an unknown format ({content_type}) - accepted media types \
                         include: application/merge-patch+json, application/strategic-merge-patch+json"
                    ),
                ));
            }
            let patch: Value = serde_json::from_str(&request.body)
                .map_err(|e| ApiError::new(400, format!("couldn't decode the patch: {e}")))?;
            if !patch.is_object() {
                return Err(ApiError::new(
                    400,
                    "a merge patch must be a JSON object".to_owned(),
                ));
            }
            let scale = inner.mutate(|st| {
                let deployment = st
                    .get(Resource::Deployments, &namespace, name)
                    .ok_or_else(|| ApiError::not_found(Resource::Deployments, name))?;
                let mut scale = scale_of(deployment);
                merge_patch(&mut scale, &patch);
                st.write_scale(&namespace, name, scale)
            })?;
            Ok(json_response(200, &scale))
        }
        (&Method::POST, None) if target.resource == Resource::Leases => {
            let mut lease: Value = serde_json::from_str(&request.body)
                .map_err(|e| ApiError::new(400, format!("couldn't decode the Lease: {e}")))?;
            let name = lease["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            inner
                .mutate(|st| {
                    if st.get(Resource::Leases, &namespace, &name).is_some() {
                        return Err(ApiError::new(
                            409,
                            format!("leases.coordination.k8s.io {name:?} already exists"),
                        ));
                    }
                    lease["metadata"]["namespace"] = json!(namespace);
                    lease["apiVersion"] = json!("coordination.k8s.io/v1");
                    lease["kind"] = json!("Lease");
                    st.put(Resource::Leases, lease);
                    Ok(st
                        .get(Resource::Leases, &namespace, &name)
                        .cloned()
                        .unwrap_or_default())
                })
                .map(|created| json_response(201, &created))
        }
        (&Method::PUT, Some(name)) if target.resource == Resource::Leases => {
            let mut lease: Value = serde_json::from_str(&request.body)
                .map_err(|e| ApiError::new(400, format!("couldn't decode the Lease: {e}")))?;
            inner
                .mutate(|st| {
                    let current = st
                        .get(Resource::Leases, &namespace, name)
                        .ok_or_else(|| ApiError::not_found(Resource::Leases, name))?;
                    let given = lease["metadata"]["resourceVersion"]
                        .as_str()
                        .unwrap_or_default();
                    if given
                        != current["metadata"]["resourceVersion"]
                            .as_str()
                            .unwrap_or_default()
                    {
                        return Err(ApiError::conflict(Resource::Leases, name));
                    }
                    lease["metadata"]["namespace"] = json!(namespace);
                    lease["metadata"]["name"] = json!(name);
                    lease["apiVersion"] = json!("coordination.k8s.io/v1");
                    lease["kind"] = json!("Lease");
                    st.put(Resource::Leases, lease);
                    Ok(st
                        .get(Resource::Leases, &namespace, name)
                        .cloned()
                        .unwrap_or_default())
                })
                .map(|replaced| json_response(200, &replaced))
        }
        _ => Err(ApiError::new(
            405,
            format!(
                "the fake API server does not serve {method} {}",
                request.path
            ),
        )),
    }
}

impl State {
    fn list(&self, selection: &Selection) -> Value {
        let resource = selection.resource;
        let items: Vec<Value> = self
            .objects
            .iter()
            .filter(|((r, _, _), object)| *r == resource && selection.matches(object))
            .map(|(_, object)| {
                // List items carry no kind/apiVersion on the real server.
                let mut item = object.clone();
                if let Some(fields) = item.as_object_mut() {
                    fields.remove("kind");
                    fields.remove("apiVersion");
                }
                item
            })
            .collect();
        json!({
            "kind": format!("{}List", resource.kind()),
            "apiVersion": resource.api_version(),
            "metadata": {"resourceVersion": self.rv.to_string()},
            "items": items,
        })
    }

    /// A PUT of the Deployment's Scale: conflicts on a stale resourceVersion, else sets
    /// `spec.replicas` (no write if unchanged) and returns the new Scale.
    fn write_scale(
        &mut self,
        namespace: &str,
        name: &str,
        scale: Value,
    ) -> Result<Value, ApiError> {
        let mut deployment = self
            .get(Resource::Deployments, namespace, name)
            .ok_or_else(|| ApiError::not_found(Resource::Deployments, name))?
            .clone();
        for (field, expected) in [("kind", "Scale"), ("apiVersion", "autoscaling/v1")] {
            if let Some(found) = scale[field].as_str().filter(|f| *f != expected) {
                return Err(ApiError::new(
                    400,
                    format!("{field} {found:?} is not {expected:?}"),
                ));
            }
        }
        if let Some(other) = scale["metadata"]["name"]
            .as_str()
            .filter(|n| !n.is_empty() && *n != name)
        {
            return Err(ApiError::new(
                400,
                format!(
                    "the name of the object ({other}) does not match the name on the URL ({name})"
                ),
            ));
        }
        let current = deployment["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or_default();
        if scale["metadata"]["resourceVersion"]
            .as_str()
            .is_some_and(|rv| !rv.is_empty() && rv != current)
        {
            return Err(ApiError::conflict(Resource::Deployments, name));
        }
        let replicas = match &scale["spec"]["replicas"] {
            Value::Null => 0,
            value => value
                .as_i64()
                .and_then(|n| i32::try_from(n).ok())
                .ok_or_else(|| {
                    ApiError::invalid(name, format!("spec.replicas: Invalid value: {value}"))
                })?,
        };
        if replicas < 0 {
            return Err(ApiError::invalid(
                name,
                format!(
                    "spec.replicas: Invalid value: {replicas}: must be greater than or equal to 0"
                ),
            ));
        }
        deployment["spec"]["replicas"] = json!(replicas);
        self.put(Resource::Deployments, deployment);
        Ok(scale_of(
            self.get(Resource::Deployments, namespace, name)
                .expect("the deployment just written"),
        ))
    }
}

/// A Deployment's `autoscaling/v1` Scale, as the subresource returns it.
fn scale_of(deployment: &Value) -> Value {
    let meta = &deployment["metadata"];
    let mut scale = json!({
        "apiVersion": "autoscaling/v1",
        "kind": "Scale",
        "metadata": {
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta["uid"],
            "resourceVersion": meta["resourceVersion"],
            "creationTimestamp": meta["creationTimestamp"],
        },
        "spec": {},
        "status": {"replicas": deployment["status"]["replicas"].as_i64().unwrap_or(0)},
    });
    // `spec.replicas` is `omitempty` in autoscaling/v1: a Scale of 0 has an empty spec.
    if let Some(replicas) = deployment["spec"]["replicas"].as_i64().filter(|r| *r != 0) {
        scale["spec"]["replicas"] = json!(replicas);
    }
    let selector: Vec<String> = deployment["spec"]["selector"]["matchLabels"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
        .collect();
    if !selector.is_empty() {
        scale["status"]["selector"] = json!(selector.join(","));
    }
    scale
}

/// RFC 7386: `null` removes, objects merge, anything else replaces.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let fields = target.as_object_mut().expect("made an object");
    for (key, value) in patch {
        if value.is_null() {
            fields.remove(key);
        } else {
            merge_patch(fields.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Watches.

/// A watch from the moment the handler accepts it.
struct WatchSpec {
    selection: Selection,
    since: u64,
    timeout: Option<Duration>,
    bookmarks: bool,
}

fn open_watch(
    inner: &Arc<Inner>,
    target: &Target,
    query: &HashMap<String, String>,
) -> Result<Response<ApiBody>, ApiError> {
    let selection = Selection::parse(target, query)?;
    let timeout = match query.get("timeoutSeconds") {
        Some(t) => Some(Duration::from_secs(t.parse().map_err(|_| {
            ApiError::new(400, format!("invalid timeoutSeconds {t:?}"))
        })?)),
        None => None,
    };
    let bookmarks = query
        .get("allowWatchBookmarks")
        .is_some_and(|v| v == "true");
    let initial_events = query.get("sendInitialEvents").is_some_and(|v| v == "true");
    let from = match query.get("resourceVersion").map(String::as_str) {
        None | Some("" | "0") => None,
        Some(rv) => Some(
            rv.parse::<u64>()
                .map_err(|_| ApiError::new(400, format!("invalid resource version {rv:?}")))?,
        ),
    };
    let resource = target.resource;
    let (control, controlled) = oneshot::channel();
    let (first, id, since) = {
        let mut st = inner.lock();
        let mut first = Vec::new();
        let since = match from {
            Some(from) if !initial_events => {
                let floor = st.logs.get(&resource).map_or(0, |l| l.floor);
                if from < floor {
                    drop(st);
                    let line = expired_line(from, floor);
                    return Ok(watch_response(Full::new(line).boxed()));
                }
                from
            }
            _ => {
                // No resourceVersion: the current objects first, as synthetic ADDED events.
                for object in st
                    .objects
                    .iter()
                    .filter(|((r, _, _), object)| *r == resource && selection.matches(object))
                    .map(|(_, object)| object)
                {
                    first.push(event_line("ADDED", object));
                }
                if initial_events {
                    first.push(bookmark_line(resource, st.rv, true));
                }
                st.rv
            }
        };
        st.next_watch += 1;
        let id = st.next_watch;
        st.watches.push(OpenWatch {
            id,
            resource,
            control,
        });
        (first, id, since)
    };
    inner.watches_changed.send_modify(|n| *n += 1);
    let (lines, body) = mpsc::channel(WATCH_BUFFER);
    let spec = WatchSpec {
        selection,
        since,
        timeout,
        bookmarks,
    };
    let registration = Registration {
        inner: inner.clone(),
        id,
    };
    tokio::spawn(stream_watch(registration, spec, first, lines, controlled));
    Ok(watch_response(LineBody(body).boxed()))
}

/// Keeps a watch listed as open while its stream runs.
struct Registration {
    inner: Arc<Inner>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let removed = {
            let mut st = self.inner.lock();
            let before = st.watches.len();
            st.watches.retain(|w| w.id != self.id);
            st.watches.len() != before
        };
        if removed {
            self.inner.watches_changed.send_modify(|n| *n += 1);
        }
    }
}

async fn stream_watch(
    registration: Registration,
    spec: WatchSpec,
    first: Vec<Bytes>,
    lines: mpsc::Sender<Bytes>,
    mut control: oneshot::Receiver<Control>,
) {
    let inner = registration.inner.clone();
    for line in first {
        if lines.send(line).await.is_err() {
            return;
        }
    }
    let mut latest = inner.latest.subscribe();
    let deadline = spec.timeout.map(|t| Instant::now() + t);
    let mut since = spec.since;
    let mut bookmark_due = false;
    loop {
        latest.borrow_and_update();
        let pending = inner.lock().pending(&spec.selection, since);
        match pending {
            Ok((events, rv)) => {
                since = rv;
                for line in events {
                    if lines.send(line).await.is_err() {
                        return;
                    }
                }
            }
            Err(floor) => {
                let _ = lines.send(expired_line(since, floor)).await;
                return;
            }
        }
        if std::mem::take(&mut bookmark_due)
            && lines
                .send(bookmark_line(spec.selection.resource, since, false))
                .await
                .is_err()
        {
            return;
        }
        tokio::select! {
            control = &mut control => {
                if let Ok(Control::Expire(floor)) = control {
                    let _ = lines.send(expired_line(since, floor)).await;
                }
                return;
            }
            _ = lines.closed() => return,
            _ = until(deadline) => return,
            changed = latest.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = sleep(BOOKMARK_EVERY), if spec.bookmarks => bookmark_due = true,
        }
    }
}

async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

fn watch_response(body: ApiBody) -> Response<ApiBody> {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-cache, private")
        .body(body)
        .expect("a valid response")
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    line(&json!({"type": kind, "object": object}))
}

fn bookmark_line(resource: Resource, rv: u64, initial_events_end: bool) -> Bytes {
    let mut object = json!({
        "kind": resource.kind(),
        "apiVersion": resource.api_version(),
        "metadata": {"resourceVersion": rv.to_string()},
    });
    if initial_events_end {
        object["metadata"]["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    line(&json!({"type": "BOOKMARK", "object": object}))
}

fn expired_line(from: u64, floor: u64) -> Bytes {
    let status = ApiError {
        code: 410,
        reason: "Expired",
        message: format!("too old resource version: {from} ({floor})"),
        details: None,
    };
    line(&json!({"type": "ERROR", "object": status.to_json()}))
}

fn line(value: &Value) -> Bytes {
    let mut bytes = serde_json::to_vec(value).expect("JSON");
    bytes.push(b'\n');
    Bytes::from(bytes)
}

/// A response body fed line by line from a watch's task; chunked, as it has no length.
struct LineBody(mpsc::Receiver<Bytes>);

impl http_body::Body for LineBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|line| line.map(|l| Ok(Frame::data(l))))
    }
}

// ---------------------------------------------------------------------------------------------
// Selectors.

/// What a list or watch asks for: a namespace and label and field selectors.
struct Selection {
    resource: Resource,
    namespace: Option<String>,
    labels: Vec<LabelRequirement>,
    fields: Vec<FieldRequirement>,
}

impl Selection {
    fn parse(target: &Target, query: &HashMap<String, String>) -> Result<Selection, ApiError> {
        let labels = match query.get("labelSelector") {
            Some(text) => parse_label_selector(text)
                .map_err(|e| ApiError::new(400, format!("unable to parse requirement: {e}")))?,
            None => Vec::new(),
        };
        let fields = match query.get("fieldSelector") {
            Some(text) => parse_field_selector(text).map_err(|e| ApiError::new(400, e))?,
            None => Vec::new(),
        };
        Ok(Selection {
            resource: target.resource,
            namespace: target.namespace.clone(),
            labels,
            fields,
        })
    }

    fn matches(&self, object: &Value) -> bool {
        let meta = &object["metadata"];
        let namespace = meta["namespace"].as_str().unwrap_or_default();
        if self.namespace.as_deref().is_some_and(|ns| ns != namespace) {
            return false;
        }
        let empty = Map::new();
        let labels = meta["labels"].as_object().unwrap_or(&empty);
        self.labels.iter().all(|r| r.matches(labels))
            && self.fields.iter().all(|r| {
                let value = meta[r.field].as_str().unwrap_or_default();
                (value == r.value) == r.equal
            })
    }

    /// The watch event line for a change seen through this selection: an object that starts
    /// matching is `ADDED`; one that stops is `DELETED`, carrying its previous state with the
    /// change's resourceVersion (as the API server's watch cache sends it).
    fn view(&self, change: &Change) -> Option<Bytes> {
        let now = self.matches(&change.object);
        let before = change.previous.as_ref().filter(|p| self.matches(p));
        match (change.kind, before, now) {
            ("MODIFIED", Some(_), true) => Some(event_line("MODIFIED", &change.object)),
            ("MODIFIED", None, true) => Some(event_line("ADDED", &change.object)),
            ("MODIFIED", Some(previous), false) => {
                let mut previous = previous.clone();
                previous["metadata"]["resourceVersion"] = json!(change.rv.to_string());
                Some(event_line("DELETED", &previous))
            }
            (_, _, false) => None,
            (kind, _, true) => Some(event_line(kind, &change.object)),
        }
    }
}

enum LabelRequirement {
    Exists(String),
    Absent(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

impl LabelRequirement {
    fn matches(&self, labels: &Map<String, Value>) -> bool {
        let value = |key: &String| labels.get(key).and_then(Value::as_str);
        match self {
            Self::Exists(key) => labels.contains_key(key),
            Self::Absent(key) => !labels.contains_key(key),
            Self::In(key, values) => value(key).is_some_and(|v| values.iter().any(|w| w == v)),
            Self::NotIn(key, values) => value(key).is_none_or(|v| values.iter().all(|w| w != v)),
        }
    }
}

/// `k`, `!k`, `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`, comma-joined.
fn parse_label_selector(text: &str) -> Result<Vec<LabelRequirement>, String> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0usize, 0);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
        .into_iter()
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(parse_label_requirement)
        .collect()
}

fn parse_label_requirement(text: &str) -> Result<LabelRequirement, String> {
    if let Some(key) = text.strip_prefix('!') {
        return Ok(LabelRequirement::Absent(label_key(key.trim())?));
    }
    if let Some((head, tail)) = text.split_once('(') {
        let values = tail
            .strip_suffix(')')
            .ok_or_else(|| format!("{text:?}: expected ')'"))?;
        let values: Vec<String> = values
            .split(',')
            .map(|v| label_value(v.trim()))
            .collect::<Result<_, _>>()?;
        return match head.split_whitespace().collect::<Vec<_>>().as_slice() {
            [key, "in"] => Ok(LabelRequirement::In(label_key(key)?, values)),
            [key, "notin"] => Ok(LabelRequirement::NotIn(label_key(key)?, values)),
            _ => Err(format!("{text:?}: expected 'in' or 'notin'")),
        };
    }
    if let Some((key, value)) = text.split_once("!=") {
        return Ok(LabelRequirement::NotIn(
            label_key(key.trim())?,
            vec![label_value(value.trim())?],
        ));
    }
    if let Some((key, value)) = text.split_once("==").or_else(|| text.split_once('=')) {
        return Ok(LabelRequirement::In(
            label_key(key.trim())?,
            vec![label_value(value.trim())?],
        ));
    }
    Ok(LabelRequirement::Exists(label_key(text)?))
}

fn label_key(key: &str) -> Result<String, String> {
    let valid = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    valid
        .then(|| key.to_owned())
        .ok_or_else(|| format!("invalid label key {key:?}"))
}

fn label_value(value: &str) -> Result<String, String> {
    let valid = value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    valid
        .then(|| value.to_owned())
        .ok_or_else(|| format!("invalid label value {value:?}"))
}

struct FieldRequirement {
    /// A key of `metadata`.
    field: &'static str,
    value: String,
    equal: bool,
}

/// `metadata.name=x`, `metadata.namespace!=y`, comma-joined.
fn parse_field_selector(text: &str) -> Result<Vec<FieldRequirement>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|part| {
            let (key, value, equal) = if let Some((k, v)) = part.split_once("!=") {
                (k, v, false)
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                (k, v, true)
            } else {
                return Err(format!(
                    "invalid selector: '{part}'; can't understand '{part}'"
                ));
            };
            let field = match key.trim() {
                "metadata.name" => "name",
                "metadata.namespace" => "namespace",
                other => return Err(format!("field label not supported: {other}")),
            };
            Ok(FieldRequirement {
                field,
                value: value.trim().to_owned(),
                equal,
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Errors.

/// A failure answered with a `Status` body, as the real server does.
struct ApiError {
    code: u16,
    reason: &'static str,
    message: String,
    details: Option<Value>,
}

impl ApiError {
    fn new(code: u16, message: String) -> Self {
        let reason = match code {
            400 => "BadRequest",
            401 => "Unauthorized",
            403 => "Forbidden",
            404 => "NotFound",
            405 => "MethodNotAllowed",
            409 => "Conflict",
            410 => "Expired",
            415 => "UnsupportedMediaType",
            422 => "Invalid",
            429 => "TooManyRequests",
            503 => "ServiceUnavailable",
            504 => "Timeout",
            _ => "InternalError",
        };
        ApiError {
            code,
            reason,
            message,
            details: None,
        }
    }

    fn not_found(resource: Resource, name: &str) -> Self {
        ApiError {
            details: Some(details(resource, name)),
            ..Self::new(404, format!("{} {name:?} not found", resource.qualified()))
        }
    }

    fn conflict(resource: Resource, name: &str) -> Self {
        ApiError {
            details: Some(details(resource, name)),
            ..Self::new(
                409,
                format!(
                    "Operation cannot be fulfilled on {} {name:?}: the object has been modified; please apply \
                     your changes to the latest version and try again",
                    resource.qualified()
                ),
            )
        }
    }

    fn invalid(name: &str, cause: String) -> Self {
        ApiError {
            details: Some(json!({"name": name, "group": "autoscaling", "kind": "Scale"})),
            ..Self::new(
                422,
                format!("Scale.autoscaling {name:?} is invalid: {cause}"),
            )
        }
    }

    fn to_json(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }

    fn into_response(self) -> Response<ApiBody> {
        json_response(self.code, &self.to_json())
    }
}

fn details(resource: Resource, name: &str) -> Value {
    let mut details = json!({"name": name, "kind": resource.plural()});
    if !resource.group().is_empty() {
        details["group"] = json!(resource.group());
    }
    details
}

fn json_response(code: u16, body: &Value) -> Response<ApiBody> {
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(body).expect("JSON"))).boxed())
        .expect("a valid response")
}
