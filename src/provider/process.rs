//! The `process` provider, the embedded default: each replica is a local child process.
//!
//! A supervisor task per function keeps as many children running as it is asked for:
//!
//! * a replica is started from `command` with env `PORT=<free port>` (plus the function's `env`
//!   and its secrets, `env_from_file` and `env_from_env`),
//!   in its own process group, with a parent-death signal so it cannot outlive the gateway;
//! * it is *ready* once `GET readiness_path` answers 2xx, probed every [`PROBE_INTERVAL`] (10 ms);
//!   readiness is published at once, so held requests reach it within milliseconds;
//! * scale-down first removes it from the endpoints, waits for its in-flight requests (at most the
//!   function's `timeout`), then sends SIGTERM to its group and SIGKILL after `termination_grace`;
//! * a replica that exits leaves the endpoints at once and is replaced with exponential backoff; a
//!   replica that cannot start publishes the reason so held requests fail fast instead of waiting;
//! * every line a replica prints is logged with `function` and `replica` fields.

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::cpu::{CpuMeter, Groups};
use crate::config::{ProcessConfig, Upstream};
use crate::provider::{Backend, BoxFuture, Endpoints, Publisher, Replica, StartFailure};

/// How often a starting replica's readiness path is probed.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(10);
/// How long one readiness probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// First delay before restarting a replica that failed; doubles per consecutive failure.
const BACKOFF_BASE: Duration = Duration::from_millis(250);
/// Longest delay between restarts.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A replica that stayed up this long resets the failure count when it exits.
const STABLE_AFTER: Duration = Duration::from_secs(10);
/// Longest line of replica output logged as one event.
const MAX_LOG_LINE: usize = 16 * 1024;

/// The handle the gateway holds for one function's processes.
///
/// The supervisor task, its channels and its probe client exist only once a replica has been
/// asked for: a function at zero that was never invoked costs a few hundred bytes and no task.
#[derive(Debug)]
pub struct ProcessBackend {
    state: Mutex<State>,
    /// The live replicas' process groups, for [`Backend::cpu_seconds`].
    groups: Groups,
    meter: Mutex<CpuMeter>,
}

#[derive(Debug)]
enum State {
    /// No replica asked for yet.
    Parked(Seed),
    /// The supervisor runs.
    Running {
        desired: watch::Sender<u32>,
        stop: watch::Sender<bool>,
        task: Option<JoinHandle<()>>,
    },
    /// Shut down (before or after running).
    Stopped,
}

/// What the supervisor is built from when it is first needed.
struct Seed {
    function: Arc<str>,
    groups: Groups,
    config: Arc<ProcessConfig>,
    drain_limit: Duration,
    publisher: Publisher,
}

impl std::fmt::Debug for Seed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Seed")
            .field("function", &self.function)
            .finish_non_exhaustive()
    }
}

impl Seed {
    fn start(self, initial: u32) -> State {
        let (desired, desired_rx) = watch::channel(initial);
        let (stop, stop_rx) = watch::channel(false);
        let (events_tx, events) = mpsc::unbounded_channel();
        let supervisor = Supervisor {
            function: self.function,
            groups: self.groups,
            config: self.config,
            drain_limit: self.drain_limit,
            publisher: self.publisher,
            desired: desired_rx,
            stop: stop_rx,
            events_tx,
            events,
            replicas: Vec::new(),
            stopping: HashMap::new(),
            failures: 0,
            retry_at: None,
            failure: None,
            // No pooled connections: every replica has its own port, so an idle connection
            // kept after its readiness probe would be kept per replica that ever started (the
            // pool has no timer to reap them), ~9 KB each.
            probe: Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(0)
                .build(HttpConnector::new()),
        };
        State::Running {
            desired,
            stop,
            task: Some(tokio::spawn(supervisor.run())),
        }
    }
}

impl ProcessBackend {
    /// Starts the supervisor with `initial` replicas asked for (at the first replica asked for,
    /// when `initial` is 0).
    pub fn start(
        function: &str,
        config: &ProcessConfig,
        initial: u32,
        drain_limit: Duration,
        publisher: Publisher,
    ) -> ProcessBackend {
        let groups = Groups::default();
        let seed = Seed {
            function: Arc::from(function),
            groups: groups.clone(),
            config: Arc::new(config.clone()),
            drain_limit,
            publisher,
        };
        let state = if initial > 0 {
            seed.start(initial)
        } else {
            State::Parked(seed)
        };
        ProcessBackend {
            state: Mutex::new(state),
            groups,
            meter: Mutex::default(),
        }
    }

    /// Applies `change` to the replica count asked for (starting the supervisor when it asks for
    /// one); returns whether it changed anything.
    fn ask(&self, change: impl FnOnce(&mut u32) -> bool) -> bool {
        let mut state = self.state.lock().unwrap();
        match &mut *state {
            State::Running { desired, .. } => desired.send_if_modified(change),
            State::Stopped => false,
            State::Parked(_) => {
                let mut n = 0;
                if !change(&mut n) {
                    return false;
                }
                let State::Parked(seed) = std::mem::replace(&mut *state, State::Stopped) else {
                    unreachable!("matched above");
                };
                *state = seed.start(n);
                true
            }
        }
    }
}

impl Backend for ProcessBackend {
    fn kind(&self) -> &'static str {
        "process"
    }

    fn scalable(&self) -> bool {
        true
    }

    fn replicas(&self) -> u32 {
        match &*self.state.lock().unwrap() {
            State::Running { desired, .. } => *desired.borrow(),
            State::Parked(_) | State::Stopped => 0,
        }
    }

    fn set_replicas(&self, n: u32) {
        self.ask(|d| std::mem::replace(d, n) != n);
    }

    fn scale_from_zero(&self, n: u32) -> bool {
        self.ask(|d| {
            if *d == 0 && n > 0 {
                *d = n;
                true
            } else {
                false
            }
        })
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let task = match std::mem::replace(&mut *self.state.lock().unwrap(), State::Stopped) {
                State::Running { stop, task, .. } => {
                    stop.send_replace(true);
                    task
                }
                State::Parked(_) | State::Stopped => None,
            };
            if let Some(task) = task {
                let _ = task.await;
            }
        })
    }

    fn cpu_seconds(&self) -> Option<f64> {
        Some(self.meter.lock().unwrap().read(&self.groups))
    }
}

#[derive(Debug)]
enum Event {
    Ready {
        id: u64,
        replica: Arc<Replica>,
    },
    /// The replica ended (or never started). `ran` is how long it had been ready, if it was.
    Exited {
        id: u64,
        reason: String,
        ran: Option<Duration>,
    },
}

struct Slot {
    id: u64,
    ready: Option<Arc<Replica>>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

struct Supervisor {
    function: Arc<str>,
    groups: Groups,
    config: Arc<ProcessConfig>,
    drain_limit: Duration,
    publisher: Publisher,
    desired: watch::Receiver<u32>,
    stop: watch::Receiver<bool>,
    events_tx: mpsc::UnboundedSender<Event>,
    events: mpsc::UnboundedReceiver<Event>,
    /// Starting and ready replicas, oldest first.
    replicas: Vec<Slot>,
    /// Replicas told to stop, still draining or terminating.
    stopping: HashMap<u64, JoinHandle<()>>,
    failures: u32,
    retry_at: Option<Instant>,
    failure: Option<StartFailure>,
    probe: Client<HttpConnector, Empty<Bytes>>,
}

impl Supervisor {
    async fn run(mut self) {
        let mut next_id: u64 = 0;
        loop {
            self.reconcile(&mut next_id);
            let backoff = self.retry_at;
            tokio::select! {
                changed = self.desired.changed() => if changed.is_err() { break },
                Some(event) = self.events.recv() => self.on_event(event),
                _ = tokio::time::sleep_until(backoff.unwrap_or_else(Instant::now)), if backoff.is_some() => {
                    self.retry_at = None;
                }
                _ = self.stop.changed() => break,
            }
            self.stopping.retain(|_, task| !task.is_finished());
        }
        self.shutdown().await;
    }

    fn publish(&self) {
        let replicas = self
            .replicas
            .iter()
            .filter_map(|s| s.ready.clone())
            .collect();
        self.publisher.publish(Endpoints {
            replicas,
            failure: self.failure.clone(),
        });
    }

    fn reconcile(&mut self, next_id: &mut u64) {
        let want = *self.desired.borrow() as usize;
        let have = self.replicas.len();
        if have < want {
            if self.retry_at.is_some_and(|at| at > Instant::now()) {
                return;
            }
            if self.failure.take().is_some() {
                // A new attempt: requests arriving now wait for it instead of failing.
                self.publish();
            }
            for _ in have..want {
                *next_id += 1;
                self.spawn_replica(*next_id);
            }
        } else if have > want {
            let mut removed = false;
            for _ in want..have {
                // Starting replicas go first, then the least-loaded ready one.
                let index = self
                    .replicas
                    .iter()
                    .rposition(|s| s.ready.is_none())
                    .or_else(|| {
                        self.replicas
                            .iter()
                            .enumerate()
                            .min_by_key(|(_, s)| s.ready.as_ref().map_or(0, |r| r.inflight()))
                            .map(|(i, _)| i)
                    })
                    .expect("have > want >= 0");
                let slot = self.replicas.remove(index);
                removed |= slot.ready.is_some();
                info!(function = %self.function, replica = slot.id, "scale-down: draining replica");
                let _ = slot.stop.send(());
                self.stopping.insert(slot.id, slot.task);
            }
            if removed {
                self.publish();
            }
        }
    }

    fn spawn_replica(&mut self, id: u64) {
        let (stop_tx, stop_rx) = oneshot::channel();
        let run = ReplicaRun {
            function: self.function.clone(),
            groups: self.groups.clone(),
            id,
            config: self.config.clone(),
            drain_limit: self.drain_limit,
            events: self.events_tx.clone(),
            probe: self.probe.clone(),
        };
        let task = tokio::spawn(run.run(stop_rx));
        self.replicas.push(Slot {
            id,
            ready: None,
            stop: stop_tx,
            task,
        });
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Ready { id, replica } => {
                if let Some(slot) = self.replicas.iter_mut().find(|s| s.id == id) {
                    slot.ready = Some(replica);
                    self.failure = None;
                    self.publish();
                }
            }
            Event::Exited { id, reason, ran } => {
                let Some(index) = self.replicas.iter().position(|s| s.id == id) else {
                    return; // a replica we stopped on purpose
                };
                self.replicas.remove(index);
                self.failures = match ran {
                    Some(up) if up >= STABLE_AFTER => 0,
                    _ => self.failures + 1,
                };
                let delay = backoff(self.failures);
                self.retry_at = Some(Instant::now() + delay);
                if ran.is_none() {
                    warn!(function = %self.function, replica = id, %reason, retry_in = ?delay, "replica failed to start");
                    self.failure = Some(StartFailure {
                        reason: Arc::from(format!(
                            "function {} cannot start: {reason}",
                            self.function
                        )),
                        retry_at: self.retry_at,
                    });
                } else {
                    warn!(function = %self.function, replica = id, %reason, retry_in = ?delay, "replica exited; replacing it");
                }
                self.publish();
            }
        }
    }

    async fn shutdown(mut self) {
        let slots: Vec<Slot> = self.replicas.drain(..).collect();
        self.publish();
        let mut tasks: Vec<JoinHandle<()>> = self.stopping.drain().map(|(_, t)| t).collect();
        for slot in slots {
            let _ = slot.stop.send(());
            tasks.push(slot.task);
        }
        for task in tasks {
            let _ = task.await;
        }
    }
}

/// A replica's entry in the function's live process groups, removed when dropped.
struct GroupEntry {
    groups: Groups,
    id: u64,
}

impl GroupEntry {
    fn new(groups: &Groups, id: u64, pgid: i32) -> GroupEntry {
        if pgid > 0 {
            groups.lock().unwrap().insert(id, pgid);
        }
        GroupEntry {
            groups: groups.clone(),
            id,
        }
    }
}

impl Drop for GroupEntry {
    fn drop(&mut self) {
        self.groups.lock().unwrap().remove(&self.id);
    }
}

/// Delay before the next start after `failures` consecutive failures.
fn backoff(failures: u32) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    BACKOFF_BASE
        .saturating_mul(1 << (failures - 1).min(16))
        .min(BACKOFF_MAX)
}

/// One child process, from spawn to exit.
struct ReplicaRun {
    function: Arc<str>,
    groups: Groups,
    id: u64,
    config: Arc<ProcessConfig>,
    drain_limit: Duration,
    events: mpsc::UnboundedSender<Event>,
    probe: Client<HttpConnector, Empty<Bytes>>,
}

impl ReplicaRun {
    async fn run(self, mut stop: oneshot::Receiver<()>) {
        let (function, id) = (self.function.clone(), self.id);
        let exited = |reason: String, ran: Option<Duration>| {
            let _ = self.events.send(Event::Exited { id, reason, ran });
        };
        let lease = match lease_port() {
            Ok(lease) => lease,
            Err(e) => return exited(format!("no free port: {e}"), None),
        };
        let port = lease.0;
        let last_line = Arc::new(Mutex::new(None::<String>));
        let (mut child, stderr_done) = match self.spawn(port, &last_line) {
            Ok(c) => c,
            Err(e) => {
                return exited(
                    format!("cannot run `{}`: {e}", self.config.command[0]),
                    None,
                )
            }
        };
        let pid = child.id().unwrap_or(0) as i32;
        // Its process group counts in the function's CPU time until the replica is over.
        let _group = GroupEntry::new(&self.groups, id, pid);
        let started = Instant::now();
        info!(%function, replica = id, pid, port, "replica starting");

        // Starting: wait for readiness, an early exit, the startup timeout or a stop.
        let upstream = Upstream::http(
            format!("127.0.0.1:{port}")
                .parse()
                .expect("valid authority"),
        );
        let probe = self.wait_ready(port);
        tokio::select! {
            status = child.wait() => {
                kill_group(pid, libc::SIGKILL);
                // Its last words are usually the reason: let the stderr reader reach the end.
                if let Some(done) = stderr_done {
                    let _ = tokio::time::timeout(Duration::from_millis(250), done).await;
                }
                let mut reason = format!("replica exited ({}) before becoming ready", describe_exit(status));
                if let Some(line) = last_line.lock().unwrap().take() {
                    reason.push_str(": ");
                    reason.push_str(&line);
                }
                return exited(reason, None);
            }
            ready = tokio::time::timeout(self.config.startup_timeout, probe) => {
                if ready.is_err() {
                    terminate(&mut child, pid, Duration::ZERO).await;
                    return exited(format!(
                        "replica did not answer GET {} with 2xx within startup_timeout ({:?})",
                        self.config.readiness_path, self.config.startup_timeout
                    ), None);
                }
            }
            _ = &mut stop => {
                terminate(&mut child, pid, self.config.termination_grace).await;
                return;
            }
        }

        let replica = Replica::new(upstream);
        let ready_at = Instant::now();
        info!(%function, replica = id, pid, port, startup_ms = ready_at.duration_since(started).as_millis() as u64, "replica ready");
        let _ = self.events.send(Event::Ready {
            id,
            replica: replica.clone(),
        });

        // Ready: serve until the child exits or we are told to stop.
        tokio::select! {
            status = child.wait() => {
                kill_group(pid, libc::SIGKILL);
                exited(format!("replica exited ({})", describe_exit(status)), Some(ready_at.elapsed()));
            }
            _ = &mut stop => {
                if tokio::time::timeout(self.drain_limit, replica.drain()).await.is_err() {
                    warn!(%function, replica = id, inflight = replica.inflight(), "drain limit reached; terminating with requests in flight");
                }
                terminate(&mut child, pid, self.config.termination_grace).await;
                info!(%function, replica = id, "replica stopped");
            }
        }
    }

    /// Starts the child; also returns the stderr reader's task, done when stderr closes.
    fn spawn(
        &self,
        port: u16,
        last_line: &Arc<Mutex<Option<String>>>,
    ) -> io::Result<(Child, Option<JoinHandle<()>>)> {
        let program = resolve_program(&self.config.command[0])?;
        let mut cmd = Command::new(program);
        cmd.args(&self.config.command[1..])
            .envs(self.config.environment())
            .env("PORT", port.to_string())
            .current_dir(&self.config.working_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        let parent = std::process::id();
        // SAFETY: the closure runs between fork and exec and calls only async-signal-safe
        // functions (prctl, getppid, _exit).
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The gateway may have died between fork and prctl.
                if libc::getppid() as u32 != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn()?;
        if let Some(out) = child.stdout.take() {
            tokio::spawn(forward_lines(
                out,
                self.function.clone(),
                self.id,
                "stdout",
                None,
            ));
        }
        let stderr_done = child.stderr.take().map(|err| {
            tokio::spawn(forward_lines(
                err,
                self.function.clone(),
                self.id,
                "stderr",
                Some(last_line.clone()),
            ))
        });
        Ok((child, stderr_done))
    }

    /// Probes `readiness_path` until it answers 2xx.
    async fn wait_ready(&self, port: u16) {
        let uri: http::Uri = format!("http://127.0.0.1:{port}{}", self.config.readiness_path)
            .parse()
            .expect("readiness_path validated as a path");
        let mut tick = tokio::time::interval(PROBE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let request = http::Request::get(uri.clone())
                .header(http::header::USER_AGENT, "sluicegate-probe")
                .body(Empty::new())
                .expect("valid request");
            match tokio::time::timeout(PROBE_TIMEOUT, self.probe.request(request)).await {
                Ok(Ok(resp)) if resp.status().is_success() => return,
                Ok(Ok(resp)) => {
                    debug!(function = %self.function, replica = self.id, status = resp.status().as_u16(), "not ready yet")
                }
                _ => {}
            }
        }
    }
}

/// `sluicegate` as the program means the running gateway binary (for the bundled demo function).
fn resolve_program(program: &str) -> io::Result<PathBuf> {
    if program == "sluicegate" {
        std::env::current_exe()
    } else {
        Ok(PathBuf::from(program))
    }
}

/// Ports handed to replicas that are alive. A port is found by binding port 0 and releasing it
/// for the child to bind; without this registry, replicas started together can be handed the same
/// port, and the second one's readiness probe is answered by the first (two "replicas", one process).
static PORTS_IN_USE: Mutex<std::collections::BTreeSet<u16>> =
    Mutex::new(std::collections::BTreeSet::new());

/// A port reserved for one replica until dropped.
#[derive(Debug)]
struct PortLease(u16);

impl Drop for PortLease {
    fn drop(&mut self) {
        PORTS_IN_USE.lock().unwrap().remove(&self.0);
    }
}

fn lease_port() -> io::Result<PortLease> {
    for _ in 0..256 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        if PORTS_IN_USE.lock().unwrap().insert(port) {
            return Ok(PortLease(port));
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        "no free port not already handed to a replica",
    ))
}

fn describe_exit(status: io::Result<std::process::ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exit status {code}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            _ => "unknown status".into(),
        },
        Err(e) => format!("wait failed: {e}"),
    }
}

fn kill_group(pid: i32, signal: i32) {
    if pid > 0 {
        // SAFETY: kill has no memory-safety preconditions; a negative pid names the process group.
        unsafe {
            libc::kill(-pid, signal);
        }
    }
}

/// SIGTERM to the replica's group, SIGKILL after `grace`, then reap.
async fn terminate(child: &mut Child, pid: i32, grace: Duration) {
    if !grace.is_zero() {
        kill_group(pid, libc::SIGTERM);
        if tokio::time::timeout(grace, child.wait()).await.is_ok() {
            kill_group(pid, libc::SIGKILL);
            return;
        }
    }
    kill_group(pid, libc::SIGKILL);
    let _ = child.wait().await;
}

/// Logs each line a replica prints, with function and replica fields.
async fn forward_lines(
    stream: impl AsyncRead + Unpin,
    function: Arc<str>,
    replica: u64,
    name: &'static str,
    last: Option<Arc<Mutex<Option<String>>>>,
) {
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        let (done, used) = match reader.fill_buf().await {
            Ok([]) | Err(_) => (true, 0),
            Ok(buf) => match buf.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    line.extend_from_slice(&buf[..i]);
                    (false, i + 1)
                }
                None => {
                    line.extend_from_slice(buf);
                    let n = buf.len();
                    reader.consume(n);
                    if line.len() < MAX_LOG_LINE {
                        continue;
                    }
                    (false, 0)
                }
            },
        };
        reader.consume(used);
        if !line.is_empty() {
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_end_matches('\r');
            info!(target: "sluicegate::replica", function = %function, replica, stream = name, "{text}");
            if let Some(last) = &last {
                *last.lock().unwrap() = Some(text.chars().take(200).collect());
            }
            line.clear();
        }
        if done {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leased_ports_are_unique_while_held() {
        let leases: Vec<PortLease> = (0..300).map(|_| lease_port().unwrap()).collect();
        let unique: std::collections::BTreeSet<u16> = leases.iter().map(|l| l.0).collect();
        assert_eq!(unique.len(), leases.len());
        let port = leases[0].0;
        drop(leases);
        assert!(!PORTS_IN_USE.lock().unwrap().contains(&port));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        assert_eq!(backoff(0), Duration::ZERO);
        assert_eq!(backoff(1), Duration::from_millis(250));
        assert_eq!(backoff(2), Duration::from_millis(500));
        assert_eq!(backoff(4), Duration::from_secs(2));
        assert_eq!(backoff(30), BACKOFF_MAX);
    }
}
