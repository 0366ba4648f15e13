//! Kubernetes discovery: every Deployment labelled `sluicegate.io/function=<name>` in the
//! gateway's namespace is served as function `<name>` with `provider = "kubernetes"`, its
//! settings read from `sluicegate.io/<key>` annotations (the config file's keys;
//! `sluicegate.io/autoscaler.<key>` for the autoscaler's) over the file's `[defaults]`.
//!
//! Functions are picked up and dropped while the gateway runs, from one watch of Deployments:
//! a new or changed Deployment (re)creates its function (backend, async lane, autoscaler); a
//! deleted or unlabelled one removes it, failing the requests it still holds with a reason. A
//! function the config file names is never replaced by a discovered one. A bad annotation is
//! logged with the object and the key, and that function answers `503` naming it: it is never
//! silently defaulted, and it never stops the gateway.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::Api;
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinHandle};
use tracing::{error, info, warn};

use crate::autoscaler::Autoscaler;
use crate::config::Config;
use crate::function::{ClusterView, Function};
use crate::gateway::Gateway;
use crate::provider::{self, Backend, Endpoints, Providers, StartFailure};

/// The label naming the function a Deployment is.
pub const FUNCTION_LABEL: &str = "sluicegate.io/function";
/// The prefix of the annotations that carry a discovered function's settings.
pub const ANNOTATION_PREFIX: &str = "sluicegate.io/";

/// Starts watching. Ends when `stop` turns true.
pub fn start(
    gateway: Arc<Gateway>,
    config: Arc<Config>,
    providers: Providers,
    cluster: Option<Arc<dyn ClusterView>>,
    stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(
        Discovery {
            gateway,
            config,
            providers,
            cluster,
            stop,
            found: HashMap::new(),
        }
        .run(),
    )
}

/// What made a discovered function: re-created only when this changes.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Spec {
    deployment: String,
    annotations: BTreeMap<String, String>,
}

struct Found {
    spec: Spec,
    function: Arc<Function>,
    /// The autoscaler's task, once started: at once, or (a function at rest from the start) at
    /// its first arrival, cold start or manual scale.
    autoscaler: Arc<Mutex<Option<AbortHandle>>>,
}

impl Found {
    fn stop_autoscaler(&self) {
        if let Some(a) = self.autoscaler.lock().unwrap().take() {
            a.abort();
        }
    }
}

struct Discovery {
    gateway: Arc<Gateway>,
    config: Arc<Config>,
    providers: Providers,
    cluster: Option<Arc<dyn ClusterView>>,
    stop: watch::Receiver<bool>,
    found: HashMap<String, Found>,
}

impl Discovery {
    async fn run(mut self) {
        let Some(cluster) = self.providers.cluster.clone() else {
            error!("kubernetes_discovery is on but no cluster is connected");
            return;
        };
        let api: Api<Deployment> = Api::namespaced(cluster.client().clone(), cluster.namespace());
        info!(
            namespace = cluster.namespace(),
            label = FUNCTION_LABEL,
            "discovering functions"
        );
        let events = watcher(api, watcher::Config::default().labels(FUNCTION_LABEL))
            .default_backoff()
            .boxed();
        tokio::pin!(events);
        let mut listing: Option<HashSet<String>> = None;
        let mut stop = self.stop.clone();
        loop {
            let event = tokio::select! {
                event = events.next() => match event {
                    Some(event) => event,
                    None => return,
                },
                _ = stop.wait_for(|s| *s) => break,
            };
            match event {
                Ok(Event::Init) => listing = Some(HashSet::new()),
                Ok(Event::InitApply(d)) => {
                    if let Some(name) = self.apply(&d, cluster.namespace()).await {
                        if let Some(seen) = listing.as_mut() {
                            seen.insert(name);
                        }
                    }
                }
                Ok(Event::InitDone) => {
                    let seen = listing.take().unwrap_or_default();
                    let gone: Vec<String> = self
                        .found
                        .keys()
                        .filter(|n| !seen.contains(*n))
                        .cloned()
                        .collect();
                    for name in gone {
                        self.remove(&name, "its Deployment is gone");
                    }
                }
                Ok(Event::Apply(d)) => {
                    self.apply(&d, cluster.namespace()).await;
                }
                Ok(Event::Delete(d)) => {
                    if let Some(name) = self.name_of(&d) {
                        self.remove(&name, "its Deployment was deleted");
                    }
                }
                Err(e) => {
                    warn!(error = %e, "Deployment discovery watch failed; keeping the functions it found")
                }
            }
        }
        for found in self.found.values() {
            found.stop_autoscaler();
        }
    }

    /// The function a Deployment names through its label, if it is a discovered one.
    fn name_of(&self, d: &Deployment) -> Option<String> {
        let name = d.metadata.labels.as_ref()?.get(FUNCTION_LABEL)?;
        self.found.contains_key(name).then(|| name.clone())
    }

    /// Serves (or updates) the function Deployment `d` names; returns its name.
    async fn apply(&mut self, d: &Deployment, default_ns: &str) -> Option<String> {
        let object = d.metadata.name.clone().unwrap_or_default();
        let namespace = d
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| default_ns.to_owned());
        let name = d.metadata.labels.as_ref()?.get(FUNCTION_LABEL)?.clone();
        if !crate::config::is_valid_function_name(&name) {
            warn!(deployment = %format!("{namespace}/{object}"), label = %name, "label {FUNCTION_LABEL} is not a valid function name; not served");
            return None;
        }
        if self.config.functions.contains_key(&name) {
            warn!(deployment = %format!("{namespace}/{object}"), function = %name, "function is configured in the config file; the file's settings are served");
            return None;
        }
        let spec = Spec {
            deployment: object.clone(),
            annotations: d
                .metadata
                .annotations
                .iter()
                .flatten()
                .filter_map(|(k, v)| {
                    Some((k.strip_prefix(ANNOTATION_PREFIX)?.to_owned(), v.clone()))
                })
                .collect(),
        };
        if self.found.get(&name).is_some_and(|f| f.spec == spec) {
            return Some(name);
        }
        if self.found.contains_key(&name) {
            self.remove(&name, "its Deployment changed");
        }
        let (function, backend) = match self.config.discovered(
            &name,
            &namespace,
            &object,
            &spec.annotations,
        ) {
            Ok(fc) => {
                let function = Function::new(fc.clone(), &self.gateway.metrics);
                let backend = provider::start(&fc, function.publisher(), &self.providers);
                (function, backend)
            }
            Err(e) => {
                let reason = format!("function {name} is misconfigured: {e}");
                error!(deployment = %format!("{namespace}/{object}"), function = %name, error = %e, "bad sluicegate.io annotation; the function answers 503 until it is fixed");
                // The function exists, so that its requests get the reason rather than a 404.
                let Ok(fc) = self
                    .config
                    .discovered(&name, &namespace, &object, &BTreeMap::new())
                else {
                    return None;
                };
                let function = Function::new(fc, &self.gateway.metrics);
                let backend: Arc<dyn Backend> = Arc::new(provider::Unavailable::start(
                    "kubernetes",
                    &reason,
                    function.publisher(),
                ));
                (function, backend)
            }
        };
        function.attach(backend);
        if let Some(view) = &self.cluster {
            function.join_cluster(view.clone());
        }
        self.gateway.controls().adopt(&function);
        // The autoscaler is parked (or started) before the function is reachable: a request
        // that finds it must find its start too.
        let autoscaler = Arc::new(Mutex::new(None));
        let state = self.gateway.state().ok();
        if Autoscaler::at_rest_from_the_start(&function) {
            // As for the file's functions: no task until the function first does something.
            let (weak, slot, stop) = (
                Arc::downgrade(&function),
                Arc::downgrade(&autoscaler),
                self.stop.clone(),
            );
            function.park_autoscaler(Box::new(move || {
                let (Some(scaler), Some(slot)) = (
                    weak.upgrade()
                        .and_then(Autoscaler::new)
                        .map(|s| with_state(s, state)),
                    slot.upgrade(),
                ) else {
                    return;
                };
                if !*stop.borrow() {
                    *slot.lock().unwrap() = Some(tokio::spawn(scaler.run(stop)).abort_handle());
                }
            }));
        } else if let Some(scaler) = Autoscaler::new(function.clone()) {
            let scaler = with_state(scaler, state);
            *autoscaler.lock().unwrap() =
                Some(tokio::spawn(scaler.run(self.stop.clone())).abort_handle());
        }
        self.gateway.functions.insert(function.clone());
        if let Some(queue) = self.gateway.queue() {
            queue.add_function(function.clone()).await;
        }
        info!(function = %name, deployment = %format!("{namespace}/{object}"), "discovered function");
        self.found.insert(
            name.clone(),
            Found {
                spec,
                function,
                autoscaler,
            },
        );
        Some(name)
    }

    /// Stops serving a discovered function; the requests it holds fail with `why`.
    fn remove(&mut self, name: &str, why: &str) {
        let Some(found) = self.found.remove(name) else {
            return;
        };
        info!(function = %name, reason = why, "dropping discovered function");
        self.gateway.functions.remove(name);
        if let Some(queue) = self.gateway.queue() {
            queue.remove_function(name);
        }
        found.stop_autoscaler();
        let function = found.function;
        function.publisher().publish(Endpoints {
            replicas: Vec::new(),
            failure: Some(StartFailure {
                reason: Arc::from(format!("function {name} was removed: {why}")),
                retry_at: None,
            }),
        });
        tokio::spawn(async move { function.backend().shutdown().await });
    }
}

/// `scaler` keeping what it learns in `state`, when there is one.
fn with_state(scaler: Autoscaler, state: Option<Arc<dyn crate::state::StateStore>>) -> Autoscaler {
    match state {
        Some(state) => scaler.with_state(state),
        None => scaler,
    }
}
