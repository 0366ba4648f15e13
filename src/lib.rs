//! sluicegate: an HTTP gateway for serverless functions.
//!
//! # Layers
//!
//! The top-level modules depend on each other in one direction only: each uses the layers below
//! it, never one of its own layer or above (`tests/layering.rs` checks this on every test run;
//! docs/architecture.md walks a request through them, file by file).
//!
//! | layer | modules | what |
//! |---|---|---|
//! | 1 | [`server`], [`discovery`], [`cluster`], [`reload`] | accept, per-connection timeouts, drain; functions found in a cluster while running; several gateways as one; config reload |
//! | 2 | [`gateway`] | route once; a request's phases (count, limits, admit, forward, respond) |
//! | 3 | [`system`], [`queue`] | the admin API; async invocations: accept, store, dispatch, callbacks |
//! | 4 | [`proxy`] | forward with a permit: rewrite, send, stream back, map upstream errors |
//! | 5 | [`error`], [`body`] | the gateway's own answers; the body that carries permit and guard |
//! | 6 | [`simulate`] → [`autoscaler`] | the control loop (and its offline replay on virtual time) |
//! | 7 | [`function`] | per-function state: window, admission, queue, cold start, figures |
//! | 8 | [`provider`] | where replicas come from (`process`, `static`, `kubernetes`); the [`provider::Subscriber`] seam it publishes to |
//! | 9 | [`upstream`] | pooled HTTP/1.1 connections to an [`upstream::Endpoint`] |
//! | 10 | [`h1`], [`forwarding`], [`conn`], [`router`], [`metrics`], [`demo`] | leaves: codec, header rules, connection state, paths, metric families, the demo function |
//! | 11 | [`config`] | the only module that reads files or the environment |
//!
//! The autoscaler reads the same figures `/metrics` exports and sets replica counts through the
//! function's provider. Offline, [`simulate`] replays a request trace through the same autoscaler
//! on virtual time.

#![warn(missing_docs)]
#![forbid(unsafe_op_in_unsafe_fn)]

pub mod autoscaler;
pub mod body;
pub mod cluster;
pub mod config;
pub mod conn;
pub mod demo;
pub mod discovery;
pub mod error;
pub mod forwarding;
pub mod function;
pub mod fuzzing;
pub mod gateway;
pub mod h1;
pub mod http1;
pub mod incoming;
pub mod metrics;
pub mod provider;
pub mod proxy;
pub mod queue;
pub mod reload;
pub mod router;
pub mod server;
pub mod simulate;
pub mod state;
pub mod system;
#[cfg(test)]
mod test_support;
pub mod upstream;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::info;

use crate::config::Config;
use crate::function::{Function, Functions};
use crate::gateway::Gateway;
use crate::metrics::Metrics;
use crate::reload::{Loops, Reloader};
use crate::server::Server;

/// A running gateway: its listener, functions, providers and autoscaler loops.
pub struct Running {
    gateway: Arc<Gateway>,
    server: Server,
    stop_loops: watch::Sender<bool>,
    /// Autoscaler loops (some started after `start`, at their function's first arrival, or by
    /// a reload) and discovery.
    loops: Arc<Loops>,
    cluster: Option<cluster::Cluster>,
    reloader: Arc<Reloader>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("addr", &self.local_addr())
            .finish_non_exhaustive()
    }
}

/// Binds the listener, starts every function's provider and autoscaler, and starts serving.
pub async fn start(config: Config) -> io::Result<Running> {
    let listener = TcpListener::bind(config.gateway.listen).await?;
    let metrics = Metrics::new();
    let providers = provider::Providers {
        cluster: connect_cluster(&config).await?,
    };
    let functions = Functions::default();
    for fc in config.functions.values() {
        let function = Function::new(fc.clone(), &metrics);
        let backend = provider::start(fc, function.publisher(), &providers);
        function.attach(backend);
        functions.insert(function);
    }
    // The async queue before the autoscalers, so that their first look sees the stored backlog.
    let queue = queue::AsyncQueue::start(
        &config.gateway.async_store,
        config.gateway.async_ack_wait,
        config.gateway.async_record_retention,
        functions.all(),
        upstream::CallbackClient::new(
            config.gateway.callback.clone(),
            Some(listener.local_addr()?),
        ),
    )
    .await;
    let gateway = Arc::new(Gateway::new(
        config.gateway.clone(),
        metrics,
        functions,
        Some(queue),
    ));
    // Pauses and service tokens from the state store, before any autoscaler looks: a function
    // paused before the restart is paused again at once.
    gateway.controls().load().await;
    for f in gateway.functions.all() {
        if gateway.controls().adopt(&f) {
            info!(function = %f.name, "function paused (kept from before the restart)");
        }
    }
    let (stop_loops, stop_rx) = watch::channel(false);
    // The adaptive keep-alive's histograms live in the gateway's state store.
    let loops = Loops::new(stop_rx.clone(), gateway.state().ok());
    for f in gateway.functions.all() {
        // A function at rest gets its loop at its first arrival, cold start or manual scale.
        loops.start_autoscaler(&f);
    }
    let cluster = match &config.gateway.cluster {
        Some(url) => {
            let id = config
                .gateway
                .gateway_id
                .clone()
                .unwrap_or_else(cluster::default_id);
            let joined = cluster::Cluster::join(
                gateway.clone(),
                url,
                &id,
                config.gateway.cluster_lease,
                providers.cluster.as_ref(),
                stop_rx.clone(),
            )
            .await
            .map_err(io::Error::other)?;
            Some(joined)
        }
        None => None,
    };
    let view = cluster
        .as_ref()
        .map(|c| c.view().clone() as Arc<dyn function::ClusterView>);
    if config.gateway.kubernetes_discovery {
        loops.push(discovery::start(
            gateway.clone(),
            Arc::new(config.clone()),
            providers.clone(),
            view.clone(),
            stop_rx.clone(),
        ));
    }
    let reloader = Arc::new(Reloader::new(
        gateway.clone(),
        config.clone(),
        providers,
        view,
        loops.clone(),
    ));
    gateway.set_reloader(reloader.clone());
    let server = Server::start(listener, gateway.clone())?;
    info!(
        listen = %server.local_addr(),
        functions = gateway.functions.len(),
        async_store = %config.gateway.async_store,
        async_pending = gateway.queue().map_or(0, |q| q.pending_at_start()),
        "sluicegate listening"
    );
    Ok(Running {
        gateway,
        server,
        stop_loops,
        loops,
        cluster,
        reloader,
    })
}

impl Running {
    /// The address the gateway listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// This gateway's view of its cluster, when it is one of several.
    pub fn cluster(&self) -> Option<&Arc<cluster::View>> {
        self.cluster.as_ref().map(|c| c.view())
    }

    /// The gateway's shared state (for tests and embedding).
    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gateway
    }

    /// Reads the config file again and applies it (what `SIGHUP` and `POST /system/reload`
    /// do; see [`reload`]). `Err` is the one-line reason it was refused: the running config
    /// stays.
    pub async fn reload(&self) -> Result<system::ReloadReport, String> {
        self.reloader.reload().await
    }

    /// Drains and stops: `/readyz` turns 503 and new requests get 503, the async queue starts no
    /// new attempts; in-flight requests get `drain_timeout` to finish; then the loops stop (and
    /// save what they keep in the state store), async attempts get what is left of
    /// `drain_timeout`, the async store is closed and every replica is terminated.
    pub async fn shutdown(self) {
        info!("draining");
        let deadline = tokio::time::Instant::now() + self.gateway.config.drain_timeout;
        self.gateway.start_draining();
        if let Some(queue) = self.gateway.queue() {
            queue.begin_shutdown();
        }
        let clean = self.server.drain(self.gateway.config.drain_timeout).await;
        self.server.close();
        // The loops before the store: an adaptive autoscaler saves its histogram as it stops.
        let _ = self.stop_loops.send(true);
        for task in self.loops.take() {
            let _ = task.await;
        }
        if let Some(queue) = self.gateway.queue() {
            queue.shutdown(deadline).await;
        }
        if let Some(cluster) = self.cluster {
            // Give the lease task its moment to hand the lease over, then stop the rest.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            cluster.stop();
        }
        // Every function's replicas stop in parallel (those of functions a reload retired too).
        let mut stops = tokio::task::JoinSet::new();
        let mut all = self.gateway.functions.all();
        all.extend(self.loops.retiring());
        for f in all {
            let backend = f.backend().clone();
            stops.spawn(async move { backend.shutdown().await });
        }
        while stops.join_next().await.is_some() {}
        info!(clean, "stopped");
    }
}

/// The cluster connection, when some function uses `provider = "kubernetes"` or discovery is on.
/// No request is made here: an unreachable API server is handled by the watches and writes.
pub(crate) async fn connect_cluster(
    config: &Config,
) -> io::Result<Option<provider::kubernetes::Cluster>> {
    let needed = config.gateway.kubernetes_discovery
        || config
            .functions
            .values()
            .any(|f| matches!(f.provider, config::ProviderConfig::Kubernetes(_)));
    if !needed {
        return Ok(None);
    }
    provider::kubernetes::Cluster::connect(
        config.gateway.kubeconfig.as_deref(),
        config.gateway.kubernetes_namespace.as_deref(),
    )
    .await
    .map(Some)
    .map_err(io::Error::other)
}

/// Runs the gateway until `signal` completes, then shuts down gracefully.
pub async fn run(config: Config, signal: impl Future<Output = ()>) -> io::Result<()> {
    let running = start(config).await?;
    signal.await;
    running.shutdown().await;
    Ok(())
}

/// [`run`], reloading the config file at each signal `hangups` receives (`SIGHUP`, installed
/// by the caller before the listener is bound); a refused reload is logged and the running
/// config stays.
pub async fn run_with_reload(
    config: Config,
    signal: impl Future<Output = ()>,
    mut hangups: tokio::signal::unix::Signal,
) -> io::Result<()> {
    let running = start(config).await?;
    tokio::pin!(signal);
    loop {
        tokio::select! {
            _ = &mut signal => break,
            Some(()) = hangups.recv() => {
                info!("SIGHUP: reloading the configuration");
                // Logged inside, accepted or refused.
                let _ = running.reload().await;
            }
        }
    }
    running.shutdown().await;
    Ok(())
}
