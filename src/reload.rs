//! Config reload while the gateway runs (`SIGHUP`, `POST /system/reload`), and the autoscaler
//! tasks that reload starts and stops ([`Loops`]).
//!
//! A reload reads the config file again with the same checks as a start (an invalid file is
//! refused with the line `sluicegate check-config` prints, and the running config stays), then
//! compares each function's effective settings with the running ones:
//!
//! * **added**: built as at start (provider, async lane, autoscaler) and put in the function
//!   map; it answers from that moment;
//! * **changed**: a new function with the new settings takes the name at once (new requests go
//!   to it, its replicas start as at start: `min_replicas`, or at the first request); the old one
//!   is **retired**;
//! * **removed**: taken out of the map (new requests get `404`) and retired;
//! * **unchanged**: left alone: its replicas, queue, window and autoscaler memory go on.
//!
//! A retired function keeps its replicas until what it holds is done: requests in flight
//! finish, and requests waiting in its queue (or for its cold start) are served by its replicas,
//! within their own `queue_timeout`/`cold_start_timeout` as always. Its autoscaler stops, its
//! async dispatcher takes nothing new and lets its attempts finish; once it holds nothing (or
//! after `max(cold_start_timeout, queue_timeout) + timeout`), its provider is shut down as at a
//! gateway stop (replicas drain, then SIGTERM). Connections are never touched: a reload drops
//! none.
//!
//! `[gateway]` settings are read once at start (the listener, timeouts applied by the server,
//! the admin token, the async store, the cluster): a reload that changes one applies the
//! functions and names the keys it did not apply (logged, and `notApplied` in the answer).
//! `[gateway]`'s function defaults (`cold_start_timeout`, `queue_timeout`, `max_body_bytes`)
//! apply, through the functions they change.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::autoscaler::Autoscaler;
use crate::config::{Config, FunctionConfig};
use crate::function::{ClusterView, Function};
use crate::gateway::Gateway;
use crate::provider::{self, BoxFuture, Providers};
use crate::system::{Reload, ReloadReport};

/// How often a retired function is looked at until it holds nothing.
const RETIRE_POLL: Duration = Duration::from_millis(20);

/// The autoscaler tasks (and other background loops) of a running gateway.
pub struct Loops {
    stop: watch::Receiver<bool>,
    /// Where autoscalers keep what they learn (the adaptive keep-alive's histograms).
    state: Option<Arc<dyn crate::state::StateStore>>,
    /// Every task started, for the shutdown to wait on.
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Each function's autoscaler task, keyed by the function object (its address, valid for
    /// as long as the `Weak` lives).
    autoscalers: Mutex<HashMap<usize, (Weak<Function>, AbortHandle)>>,
    /// Functions retired by a reload whose replicas may still run.
    retiring: Mutex<Vec<Arc<Function>>>,
}

impl std::fmt::Debug for Loops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loops").finish_non_exhaustive()
    }
}

fn key(function: &Arc<Function>) -> usize {
    Arc::as_ptr(function) as usize
}

impl Loops {
    /// No loop yet; every loop started ends when `stop` turns true.
    pub fn new(
        stop: watch::Receiver<bool>,
        state: Option<Arc<dyn crate::state::StateStore>>,
    ) -> Arc<Loops> {
        Arc::new(Loops {
            stop,
            state,
            tasks: Mutex::new(Vec::new()),
            autoscalers: Mutex::new(HashMap::new()),
            retiring: Mutex::new(Vec::new()),
        })
    }

    /// Keeps `task` for the shutdown to wait on.
    pub fn push(&self, task: JoinHandle<()>) {
        let mut tasks = self.tasks.lock().unwrap();
        tasks.retain(|t| !t.is_finished());
        tasks.push(task);
    }

    /// Every task kept so far (the shutdown waits on them).
    pub fn take(&self) -> Vec<JoinHandle<()>> {
        std::mem::take(&mut *self.tasks.lock().unwrap())
    }

    /// Functions retired by a reload and not yet stopped.
    pub fn retiring(&self) -> Vec<Arc<Function>> {
        self.retiring.lock().unwrap().clone()
    }

    fn spawn_autoscaler(self: &Arc<Self>, function: &Arc<Function>, scaler: Autoscaler) {
        if *self.stop.borrow() {
            return;
        }
        let scaler = match &self.state {
            Some(state) => scaler.with_state(state.clone()),
            None => scaler,
        };
        let task = tokio::spawn(scaler.run(self.stop.clone()));
        self.autoscalers.lock().unwrap().insert(
            key(function),
            (Arc::downgrade(function), task.abort_handle()),
        );
        self.push(task);
    }

    /// Starts `function`'s autoscaler: now, or, for a function at rest, at its first arrival,
    /// cold start or manual scale.
    pub fn start_autoscaler(self: &Arc<Self>, function: &Arc<Function>) {
        if Autoscaler::at_rest_from_the_start(function) {
            let weak = Arc::downgrade(function);
            let loops = Arc::downgrade(self);
            function.park_autoscaler(Box::new(move || {
                let (Some(function), Some(loops)) = (weak.upgrade(), loops.upgrade()) else {
                    return;
                };
                if let Some(scaler) = Autoscaler::new(function.clone()) {
                    loops.spawn_autoscaler(&function, scaler);
                }
            }));
        } else if let Some(scaler) = Autoscaler::new(function.clone()) {
            self.spawn_autoscaler(function, scaler);
        }
    }

    /// Stops `function`'s autoscaler (running or parked).
    pub fn stop_autoscaler(&self, function: &Arc<Function>) {
        function.unpark_autoscaler();
        let mut all = self.autoscalers.lock().unwrap();
        all.retain(|_, (weak, _)| weak.strong_count() > 0);
        if let Some((_, task)) = all.remove(&key(function)) {
            task.abort();
        }
    }

    /// Retires `function` (see the module doc): its autoscaler stops now, its provider once it
    /// holds nothing.
    fn retire(self: &Arc<Self>, function: Arc<Function>) {
        self.stop_autoscaler(&function);
        self.retiring.lock().unwrap().push(function.clone());
        let loops = Arc::downgrade(self);
        tokio::spawn(async move {
            let config = &function.config;
            let bound = config.cold_start_timeout.max(config.queue_timeout) + config.timeout;
            let deadline = Instant::now() + bound;
            loop {
                let held = function.own_load();
                if held == 0 {
                    break;
                }
                if Instant::now() >= deadline {
                    warn!(function = %function.name, held, "retired function still busy; stopping its replicas (in-flight requests get their drain)");
                    break;
                }
                tokio::time::sleep(RETIRE_POLL).await;
            }
            function.backend().shutdown().await;
            info!(function = %function.name, "retired function stopped");
            if let Some(loops) = loops.upgrade() {
                loops
                    .retiring
                    .lock()
                    .unwrap()
                    .retain(|f| !Arc::ptr_eq(f, &function));
            }
        });
    }
}

/// Applies the config file to a running gateway; see the module doc.
pub struct Reloader {
    gateway: Arc<Gateway>,
    /// The config running now (the last one applied).
    config: tokio::sync::Mutex<Config>,
    providers: Mutex<Providers>,
    cluster: Option<Arc<dyn ClusterView>>,
    loops: Arc<Loops>,
}

impl Reloader {
    /// A reloader for `gateway`, started from `config`.
    pub fn new(
        gateway: Arc<Gateway>,
        config: Config,
        providers: Providers,
        cluster: Option<Arc<dyn ClusterView>>,
        loops: Arc<Loops>,
    ) -> Reloader {
        Reloader {
            gateway,
            config: tokio::sync::Mutex::new(config),
            providers: Mutex::new(providers),
            cluster,
            loops,
        }
    }

    /// Reads the config file again and applies it; one reload at a time.
    pub async fn reload(&self) -> Result<ReloadReport, String> {
        let mut running = self.config.lock().await;
        let path = running.path.clone();
        info!(path = %path.display(), "reloading the configuration");
        let read = tokio::task::spawn_blocking(move || Config::load(&path))
            .await
            .map_err(|e| format!("reading the config failed: {e}"))?;
        let next = match read {
            Ok(next) => next,
            Err(e) => {
                error!(error = %e, "reload refused: invalid configuration; the running configuration stays");
                return Err(e.to_string());
            }
        };
        let not_applied = running.gateway.fixed_differences(&next.gateway);
        if !not_applied.is_empty() {
            warn!(keys = %not_applied.join(", "), "reload: [gateway] settings changed that apply only at a restart; the running values stay");
        }
        if let Err(e) = self.connect_cluster(&next).await {
            error!(error = %e, "reload refused: cannot connect to the Kubernetes cluster a new function needs");
            return Err(format!("{}: {e}", next.path.display()));
        }

        let mut report = ReloadReport {
            not_applied,
            ..ReloadReport::default()
        };
        for (name, fc) in &next.functions {
            match running.functions.get(name) {
                Some(old) if old == fc => report.unchanged += 1,
                Some(_) => {
                    self.replace(fc).await;
                    info!(function = %name, "reload: function changed; replaced (the old one finishes what it holds)");
                    report.changed.push(name.clone());
                }
                None => {
                    self.add(fc).await;
                    info!(function = %name, "reload: function added");
                    report.added.push(name.clone());
                }
            }
        }
        for name in running.functions.keys() {
            if !next.functions.contains_key(name) {
                self.remove(name);
                info!(function = %name, "reload: function removed (what it holds finishes)");
                report.removed.push(name.clone());
            }
        }
        // The gateway settings that could not change stay as they run.
        let gateway = running.gateway.clone();
        *running = next;
        running.gateway = gateway;
        info!(
            added = report.added.len(),
            changed = report.changed.len(),
            removed = report.removed.len(),
            unchanged = report.unchanged,
            "configuration reloaded"
        );
        Ok(report)
    }

    /// Connects to Kubernetes when a `kubernetes` function appears and no cluster is connected.
    async fn connect_cluster(&self, next: &Config) -> std::io::Result<()> {
        let connected = self.providers.lock().unwrap().cluster.is_some();
        if connected {
            return Ok(());
        }
        if let Some(cluster) = crate::connect_cluster(next).await? {
            self.providers.lock().unwrap().cluster = Some(cluster);
        }
        Ok(())
    }

    /// A function built as at start, not yet in the map.
    fn build(&self, fc: &FunctionConfig) -> Arc<Function> {
        let function = Function::new(fc.clone(), &self.gateway.metrics);
        let providers = self.providers.lock().unwrap().clone();
        let backend = provider::start(fc, function.publisher(), &providers);
        function.attach(backend);
        if let Some(view) = &self.cluster {
            function.join_cluster(view.clone());
        }
        // A paused function stays paused through a reload (and one added back is paused again).
        self.gateway.controls().adopt(&function);
        function
    }

    async fn add(&self, fc: &FunctionConfig) {
        let function = self.build(fc);
        // Its autoscaler parked (or started) first: a request that finds the function must find
        // the start it wakes.
        self.loops.start_autoscaler(&function);
        self.gateway.functions.insert(function.clone());
        if let Some(queue) = self.gateway.queue() {
            queue.add_function(function.clone()).await;
        }
    }

    async fn replace(&self, fc: &FunctionConfig) {
        let function = self.build(fc);
        let old = self.gateway.functions.get(&fc.name);
        self.loops.start_autoscaler(&function);
        // One map write: every request from here on finds the new function.
        self.gateway.functions.insert(function.clone());
        if let Some(queue) = self.gateway.queue() {
            queue.add_function(function.clone()).await;
        }
        if let Some(old) = old {
            self.loops.retire(old);
        }
    }

    fn remove(&self, name: &str) {
        let old = self.gateway.functions.remove(name);
        if let Some(queue) = self.gateway.queue() {
            queue.remove_function(name);
        }
        if let Some(old) = old {
            self.loops.retire(old);
        }
    }
}

impl Reload for Reloader {
    fn reload(&self) -> BoxFuture<'_, Result<ReloadReport, String>> {
        Box::pin(Reloader::reload(self))
    }
}
