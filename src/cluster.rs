//! Several gateways acting as one, through NATS (`[gateway] cluster = "nats://…"`).
//!
//! * **Figures.** Every gateway publishes its per-function figures (window and burst counts,
//!   ongoing, queued, idle time) to `sluicegate.cluster.figures.<gateway id>` every
//!   [`REPORT_EVERY`], and keeps the latest report of every peer. A peer whose last report is
//!   older than [`PEER_EXPIRY`] no longer counts: its figures drop out and it leaves the
//!   membership. Nothing waits for a peer: a slow or dead one only stops counting.
//! * **One autoscaler leader**, holding a lease of `cluster_lease` that it renews every third of
//!   it. On Kubernetes (when a cluster is connected) the lease is a `coordination.k8s.io` Lease
//!   named [`LEASE_NAME`]: read, then written back with its resourceVersion (a concurrent writer
//!   gets `409` and loses), a rival's record trusted by *our* clock only — it is taken over once
//!   it has not changed for the lease duration since we first saw it, as client-go's leader
//!   election does. Elsewhere it is a JetStream key-value bucket whose entries live for
//!   `cluster_lease`, key `autoscaler`, created if absent and updated with its revision. Either
//!   way a gateway is leader only until the lease it last renewed would expire (from the moment
//!   it sent the renewal), so a leader cut off stops deciding within one lease period, and
//!   another takes over once the lease has expired. Only the leader's autoscalers write replica
//!   counts, deciding on the sum of everyone's figures; the others keep sampling.
//! * **Per-replica caps shared.** With G live gateways (sorted by id, this one at rank r), each
//!   admits at most `floor(max / G)` in flight per replica, the first `max mod G` of them one
//!   more, so the caps add up to exactly `max_ongoing_requests`; at least 1 each, so when G is
//!   larger than the cap a replica can see up to G requests at once. Rebalanced at every report
//!   and expiry. While a gateway joins or leaves, views differ for up to [`PEER_EXPIRY`]: in
//!   that window a replica can be offered up to one share more than its cap per gateway whose
//!   view is stale.
//! * Scaling from zero does not involve the leader: the gateway a cold request reaches asks
//!   the provider at once (the provider makes concurrent wakes from several gateways one
//!   scale-up).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use k8s_openapi::api::coordination::v1::Lease;

use crate::function::{ClusterView, PeerFigures};
use crate::gateway::Gateway;

/// How often a gateway publishes its figures.
pub const REPORT_EVERY: Duration = Duration::from_secs(1);
/// A peer silent for longer than this no longer counts.
pub const PEER_EXPIRY: Duration = Duration::from_secs(3);
/// The subject prefix of figure reports.
pub const FIGURES_SUBJECT: &str = "sluicegate.cluster.figures";
/// The key-value bucket holding the leader lease.
pub const LEASE_BUCKET: &str = "sluicegate_cluster";
/// The lease's key.
pub const LEASE_KEY: &str = "autoscaler";
/// The Kubernetes Lease's name (in the gateway's namespace).
pub const LEASE_NAME: &str = "sluicegate-autoscaler";

/// One gateway's report: per function `[window, burst, ongoing, queued, idle_ms]`.
#[derive(Debug, Serialize, Deserialize)]
struct Report {
    gateway: String,
    functions: BTreeMap<String, [u64; 5]>,
}

struct Peer {
    seen: Instant,
    functions: BTreeMap<String, [u64; 5]>,
}

/// This gateway's view of the cluster, shared by its functions and the cluster tasks.
pub struct View {
    id: String,
    origin: Instant,
    peers: Mutex<HashMap<String, Peer>>,
    leader: AtomicBool,
    /// Nanoseconds after `origin` until which the lease last renewed holds.
    leader_until: AtomicU64,
}

impl std::fmt::Debug for View {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("View")
            .field("id", &self.id)
            .field("leader", &self.is_leader())
            .finish_non_exhaustive()
    }
}

impl View {
    /// A view for gateway `id`, alone and not leader yet.
    pub fn new(id: &str) -> View {
        View {
            id: id.to_owned(),
            origin: Instant::now(),
            peers: Mutex::new(HashMap::new()),
            leader: AtomicBool::new(false),
            leader_until: AtomicU64::new(0),
        }
    }

    /// This gateway's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Live gateway ids, this one included, sorted.
    pub fn members(&self, now: Instant) -> Vec<String> {
        let peers = self.peers.lock().unwrap();
        let mut ids: Vec<String> = peers
            .iter()
            .filter(|(_, p)| now.saturating_duration_since(p.seen) <= PEER_EXPIRY)
            .map(|(id, _)| id.clone())
            .collect();
        ids.push(self.id.clone());
        ids.sort();
        ids.dedup();
        ids
    }

    /// This gateway's share of `max` per replica among the live members.
    pub fn share_of(&self, max: u32, now: Instant) -> u32 {
        let members = self.members(now);
        let g = members.len() as u32;
        let rank = members.iter().position(|m| *m == self.id).unwrap_or(0) as u32;
        share(max, g, rank)
    }

    fn record(&self, report: Report, now: Instant) {
        if report.gateway == self.id {
            return;
        }
        let mut peers = self.peers.lock().unwrap();
        peers.insert(
            report.gateway,
            Peer {
                seen: now,
                functions: report.functions,
            },
        );
        // Long-gone peers are forgotten (they already stopped counting after PEER_EXPIRY).
        peers.retain(|_, p| now.saturating_duration_since(p.seen) <= PEER_EXPIRY * 10);
    }

    fn lead_until(&self, until: Instant) {
        let nanos = until.saturating_duration_since(self.origin).as_nanos() as u64;
        self.leader_until.store(nanos, Ordering::Release);
        self.leader.store(true, Ordering::Release);
    }

    fn step_down(&self) {
        self.leader.store(false, Ordering::Release);
    }
}

/// `floor(max / g)`, plus one for the first `max mod g` ranks; at least 1.
pub fn share(max: u32, g: u32, rank: u32) -> u32 {
    let g = g.max(1);
    let base = max / g;
    let extra = u32::from(rank < max % g);
    (base + extra).max(1)
}

impl ClusterView for View {
    fn peers(&self, function: &str, now: Instant) -> PeerFigures {
        let peers = self.peers.lock().unwrap();
        let mut sum = PeerFigures::default();
        for p in peers.values() {
            if now.saturating_duration_since(p.seen) > PEER_EXPIRY {
                continue;
            }
            sum.gateways += 1;
            if let Some([window, burst, ongoing, queued, idle_ms]) = p.functions.get(function) {
                sum.window_requests += window;
                sum.burst_requests += burst;
                sum.ongoing += ongoing;
                sum.queued += queued;
                let idle = Duration::from_millis(*idle_ms);
                sum.idle_for = Some(sum.idle_for.map_or(idle, |i| i.min(idle)));
            }
        }
        sum
    }

    fn is_leader(&self) -> bool {
        if !self.leader.load(Ordering::Acquire) {
            return false;
        }
        let now = Instant::now()
            .saturating_duration_since(self.origin)
            .as_nanos() as u64;
        now < self.leader_until.load(Ordering::Acquire)
    }
}

/// The running cluster tasks.
pub struct Cluster {
    view: Arc<View>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("view", &self.view).finish()
    }
}

impl Cluster {
    /// Joins the cluster at `url` as `id`: every function of `gateway` gets the shared view,
    /// and the report, membership and lease tasks start. Connects in the background (NATS
    /// down at start only delays the joining).
    pub async fn join(
        gateway: Arc<Gateway>,
        url: &str,
        id: &str,
        lease: Duration,
        kubernetes: Option<&crate::provider::kubernetes::Cluster>,
        stop: watch::Receiver<bool>,
    ) -> Result<Cluster, String> {
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(2))
            .connect(url)
            .await
            .map_err(|e| format!("cluster: NATS at {url}: {e}"))?;
        let view = Arc::new(View::new(id));
        for f in gateway.functions.all() {
            f.join_cluster(view.clone());
        }
        info!(gateway = id, nats = url, lease = ?lease, "joining the gateway cluster");
        let tasks = vec![
            tokio::spawn(report(
                gateway.clone(),
                client.clone(),
                view.clone(),
                stop.clone(),
            )),
            tokio::spawn(listen(
                gateway.clone(),
                client.clone(),
                view.clone(),
                stop.clone(),
            )),
            match kubernetes {
                Some(k) => tokio::spawn(hold_kube_lease(
                    kube::Api::namespaced(k.client().clone(), k.namespace()),
                    view.clone(),
                    lease,
                    stop,
                )),
                None => tokio::spawn(hold_lease(client, view.clone(), lease, stop)),
            },
        ];
        Ok(Cluster { view, tasks })
    }

    /// This gateway's view.
    pub fn view(&self) -> &Arc<View> {
        &self.view
    }

    /// Stops the tasks (the lease then expires by itself).
    pub fn stop(self) {
        for t in self.tasks {
            t.abort();
        }
    }
}

/// The default gateway id: `$HOSTNAME` (a pod's name) or the host name, and the process id.
pub fn default_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_else(|| "gateway".into());
    format!("{host}-{}", std::process::id())
}

/// Publishes this gateway's figures every [`REPORT_EVERY`] and rebalances the shares.
async fn report(
    gateway: Arc<Gateway>,
    client: async_nats::Client,
    view: Arc<View>,
    mut stop: watch::Receiver<bool>,
) {
    let subject = format!("{FIGURES_SUBJECT}.{}", view.id);
    let mut tick = tokio::time::interval(REPORT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let now = Instant::now();
        let mut functions = BTreeMap::new();
        gateway.functions.for_each(|f| {
            let fig = f.figures(now);
            functions.insert(
                f.name.to_string(),
                [
                    fig.window_requests,
                    fig.burst_requests,
                    fig.ongoing,
                    fig.queued,
                    fig.idle_for.as_millis() as u64,
                ],
            );
        });
        let report = Report {
            gateway: view.id.clone(),
            functions,
        };
        let payload = Bytes::from(serde_json::to_vec(&report).expect("a report serializes"));
        // Fire and forget: a report lost while NATS is away only makes us count less.
        if let Err(e) = client.publish(subject.clone(), payload).await {
            debug!(error = %e, "cluster report not sent");
        }
        rebalance(&gateway, &view, now);
    }
}

/// Receives the peers' reports.
async fn listen(
    gateway: Arc<Gateway>,
    client: async_nats::Client,
    view: Arc<View>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut sub = match client.subscribe(format!("{FIGURES_SUBJECT}.*")).await {
            Ok(sub) => sub,
            Err(e) => {
                warn!(error = %e, "cluster: cannot subscribe to peers' figures; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        loop {
            let msg = tokio::select! {
                msg = sub.next() => match msg { Some(m) => m, None => break },
                _ = stop.wait_for(|s| *s) => return,
            };
            match serde_json::from_slice::<Report>(&msg.payload) {
                Ok(report) => {
                    let joined = !view.members(Instant::now()).contains(&report.gateway);
                    // Load only a peer sees must wake this gateway's dormant autoscalers.
                    for (name, [window, _, ongoing, queued, _]) in &report.functions {
                        if window + ongoing + queued > 0 {
                            if let Some(f) = gateway.function(name) {
                                f.peer_activity();
                            }
                        }
                    }
                    view.record(report, Instant::now());
                    if joined {
                        rebalance(&gateway, &view, Instant::now());
                    }
                }
                Err(e) => debug!(error = %e, "cluster: unreadable report ignored"),
            }
        }
    }
}

/// Sets every function's share of its per-replica cap from the live membership.
fn rebalance(gateway: &Gateway, view: &View, now: Instant) {
    let members = view.members(now);
    gateway.functions.for_each(|f| {
        let share = view.share_of(f.config.max_ongoing_requests, now);
        if share != f.share() {
            info!(function = %f.name, gateways = members.len(), share, "per-replica share rebalanced");
            f.set_share(share);
        }
    });
}

/// Holds (or waits for) the leader lease.
async fn hold_lease(
    client: async_nats::Client,
    view: Arc<View>,
    lease: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let js = async_nats::jetstream::new(client);
    let every = lease / 3;
    let mut kv = None;
    let mut revision: Option<u64> = None;
    loop {
        if kv.is_none() {
            kv = open_bucket(&js, lease).await;
        }
        if let Some(store) = &kv {
            let sent = Instant::now();
            let id = Bytes::from(view.id.clone());
            let attempt = match revision {
                Some(rev) => store
                    .update(LEASE_KEY, id, rev)
                    .await
                    .map_err(|e| e.to_string()),
                None => store.create(LEASE_KEY, id).await.map_err(|e| e.to_string()),
            };
            match attempt {
                Ok(rev) => {
                    if revision.is_none() {
                        info!(gateway = %view.id, "leader: this gateway runs the autoscalers");
                    }
                    revision = Some(rev);
                    view.lead_until(sent + lease);
                }
                Err(e) => {
                    if revision.take().is_some() {
                        warn!(gateway = %view.id, error = %e, "leader lease lost: autoscalers stop deciding here");
                    }
                    view.step_down();
                }
            }
        }
        let stopping = tokio::select! {
            _ = tokio::time::sleep(every) => false,
            _ = stop.wait_for(|s| *s) => true,
        };
        if stopping {
            // Hand over at once rather than after the lease expires.
            view.step_down();
            if let (Some(store), Some(_)) = (&kv, revision) {
                let _ = store.delete(LEASE_KEY).await;
            }
            return;
        }
    }
}

/// Holds (or waits for) the Kubernetes Lease, client-go style.
pub async fn hold_kube_lease(
    api: kube::Api<Lease>,
    view: Arc<View>,
    lease: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let every = lease / 3;
    // The rival's record as last seen, and when (our clock) it last changed.
    let mut seen: Option<(String, Instant)> = None;
    loop {
        let sent = Instant::now();
        match try_lease(&api, &view, lease, &mut seen, sent).await {
            Ok(true) => {
                if !view.leader.load(Ordering::Acquire) {
                    info!(gateway = %view.id, lease = LEASE_NAME, "leader: this gateway runs the autoscalers");
                }
                view.lead_until(sent + lease);
            }
            Ok(false) => {
                if view.leader.load(Ordering::Acquire) {
                    warn!(gateway = %view.id, "leader Lease taken by another gateway: autoscalers stop deciding here");
                }
                view.step_down();
            }
            // Unreachable: leadership lapses by itself when the renewal deadline passes.
            Err(e) => debug!(error = %e, "Lease not renewed"),
        }
        let stopping = tokio::select! {
            _ = tokio::time::sleep(every) => false,
            _ = stop.wait_for(|s| *s) => true,
        };
        if stopping {
            let was = view.leader.load(Ordering::Acquire);
            view.step_down();
            if was {
                // Release: an empty holder lets the next gateway take it at once.
                if let Ok(Some(mut l)) = api.get_opt(LEASE_NAME).await {
                    if let Some(spec) = l.spec.as_mut() {
                        spec.holder_identity = None;
                    }
                    let _ = api.replace(LEASE_NAME, &Default::default(), &l).await;
                }
            }
            return;
        }
    }
}

/// One round: `Ok(true)` when this gateway holds the Lease now.
async fn try_lease(
    api: &kube::Api<Lease>,
    view: &View,
    lease: Duration,
    seen: &mut Option<(String, Instant)>,
    now: Instant,
) -> Result<bool, kube::Error> {
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    let stamp = MicroTime(k8s_openapi::jiff::Timestamp::now());
    let seconds = lease.as_secs().max(1) as i32;
    let Some(mut current) = api.get_opt(LEASE_NAME).await? else {
        let fresh = Lease {
            metadata: kube::api::ObjectMeta {
                name: Some(LEASE_NAME.into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(view.id.clone()),
                lease_duration_seconds: Some(seconds),
                acquire_time: Some(stamp.clone()),
                renew_time: Some(stamp),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        return match api.create(&Default::default(), &fresh).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let spec = current.spec.get_or_insert_with(Default::default);
    let holder = spec.holder_identity.clone().unwrap_or_default();
    let ours = holder == view.id;
    if !ours && !holder.is_empty() {
        // Trust only our own clock: the record must stay unchanged for a whole lease duration.
        let record = format!(
            "{holder}@{}",
            current
                .metadata
                .resource_version
                .clone()
                .unwrap_or_default()
        );
        let duration = spec
            .lease_duration_seconds
            .map_or(lease, |s| Duration::from_secs(s.max(1) as u64));
        match seen {
            Some((last, since)) if *last == record => {
                if now.saturating_duration_since(*since) < duration {
                    return Ok(false);
                }
            }
            _ => {
                *seen = Some((record, now));
                return Ok(false);
            }
        }
    }
    if !ours {
        spec.acquire_time = Some(stamp.clone());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.holder_identity = Some(view.id.clone());
    spec.lease_duration_seconds = Some(seconds);
    spec.renew_time = Some(stamp);
    match api.replace(LEASE_NAME, &Default::default(), &current).await {
        Ok(_) => {
            *seen = None;
            Ok(true)
        }
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

async fn open_bucket(
    js: &async_nats::jetstream::Context,
    lease: Duration,
) -> Option<async_nats::jetstream::kv::Store> {
    if let Ok(store) = js.get_key_value(LEASE_BUCKET).await {
        return Some(store);
    }
    match js
        .create_key_value(async_nats::jetstream::kv::Config {
            bucket: LEASE_BUCKET.into(),
            description: "sluicegate's autoscaler leader lease".into(),
            history: 1,
            max_age: lease,
            storage: async_nats::jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
    {
        Ok(store) => Some(store),
        Err(e) => {
            // Another gateway may have created it meanwhile.
            match js.get_key_value(LEASE_BUCKET).await {
                Ok(store) => Some(store),
                Err(_) => {
                    debug!(error = %e, "cluster: lease bucket not available yet");
                    None
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up_to_the_cap_and_are_at_least_one() {
        for max in 1..40 {
            for g in 1..8 {
                let shares: Vec<u32> = (0..g).map(|r| share(max, g, r)).collect();
                let sum: u32 = shares.iter().sum();
                if max >= g {
                    assert_eq!(sum, max, "max {max}, {g} gateways: {shares:?}");
                } else {
                    assert_eq!(sum, g, "one each when there are more gateways than the cap");
                }
                assert!(shares.iter().all(|&s| s >= 1));
            }
        }
        assert_eq!(share(10, 3, 0), 4);
        assert_eq!(share(10, 3, 2), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn peers_count_until_they_go_silent() {
        let view = View::new("b");
        let now = Instant::now();
        view.record(
            Report {
                gateway: "a".into(),
                functions: [("f".to_owned(), [10, 1, 3, 2, 500])].into(),
            },
            now,
        );
        view.record(
            Report {
                gateway: "c".into(),
                functions: [("f".to_owned(), [5, 0, 1, 0, 200])].into(),
            },
            now,
        );
        let p = view.peers("f", now);
        assert_eq!(p.gateways, 2);
        assert_eq!((p.window_requests, p.ongoing, p.queued), (15, 4, 2));
        assert_eq!(p.idle_for, Some(Duration::from_millis(200)));
        assert_eq!(view.members(now), ["a", "b", "c"]);
        assert_eq!(view.share_of(10, now), 3, "rank 1 of 3: 10 = 4 + 3 + 3");
        // Silent for longer than the expiry: gone from the sums and the membership.
        tokio::time::advance(PEER_EXPIRY + Duration::from_millis(1)).await;
        let later = Instant::now();
        assert_eq!(view.peers("f", later), PeerFigures::default());
        assert_eq!(view.members(later), ["b"]);
        assert_eq!(view.share_of(10, later), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn leadership_ends_when_the_lease_would_expire() {
        let view = View::new("a");
        assert!(!view.is_leader());
        view.lead_until(Instant::now() + Duration::from_secs(10));
        assert!(view.is_leader());
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(view.is_leader());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(!view.is_leader(), "not renewed: no longer leader");
    }
}
