//! Shared unit-test fixtures: fake backends and a function built from config text.

use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::{Config, Upstream};
use crate::function::Function;
use crate::metrics::Metrics;
use crate::provider::{Backend, BoxFuture, Endpoints, Replica};

/// A backend that only records what it is asked for.
#[derive(Debug, Default)]
pub struct Fake {
    pub desired: AtomicU32,
    pub wakes: AtomicU32,
    /// CPU milliseconds its replicas have used (what `cpu_seconds` reports).
    pub cpu_ms: std::sync::atomic::AtomicU64,
}

impl Backend for Fake {
    fn kind(&self) -> &'static str {
        "fake"
    }
    fn scalable(&self) -> bool {
        true
    }
    fn replicas(&self) -> u32 {
        self.desired.load(Ordering::SeqCst)
    }
    fn set_replicas(&self, n: u32) {
        self.desired.store(n, Ordering::SeqCst);
    }
    fn scale_from_zero(&self, n: u32) -> bool {
        let changed = self
            .desired
            .compare_exchange(0, n, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok();
        if changed {
            self.wakes.fetch_add(1, Ordering::SeqCst);
        }
        changed
    }
    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
    fn cpu_seconds(&self) -> Option<f64> {
        Some(self.cpu_ms.load(Ordering::SeqCst) as f64 / 1000.0)
    }
}

/// A backend whose replicas become ready a fixed `cold_start` after they are asked for (on
/// tokio's clock, so it runs on paused time), and are removed the way the process provider
/// removes them: starting ones first, then the least-loaded ready one. It publishes every change
/// of the ready set through `publish` and logs `(time since origin, asked, ready)` as the
/// simulator's timeline does.
pub struct Delayed(Arc<DelayedInner>);

struct DelayedInner {
    publish: Box<dyn Fn(Endpoints) + Send + Sync>,
    cold_start: Duration,
    origin: Instant,
    /// The replicas asked for (ready or starting), and the last id given.
    slots: Mutex<(Vec<Slot>, u64)>,
    log: Mutex<Vec<(Duration, u32, u32)>>,
}

struct Slot {
    id: u64,
    ready: Option<Arc<Replica>>,
    starting: Option<JoinHandle<()>>,
}

impl Delayed {
    /// No replicas yet; `publish` is given each new ready set (e.g. a function's publisher).
    pub fn new(
        publish: impl Fn(Endpoints) + Send + Sync + 'static,
        cold_start: Duration,
        origin: Instant,
    ) -> Delayed {
        Delayed(Arc::new(DelayedInner {
            publish: Box::new(publish),
            cold_start,
            origin,
            slots: Mutex::new((Vec::new(), 0)),
            log: Mutex::new(vec![(Duration::ZERO, 0, 0)]),
        }))
    }

    /// Every change so far: time since `origin`, replicas asked for, replicas ready.
    pub fn log(&self) -> Vec<(Duration, u32, u32)> {
        self.0.log.lock().unwrap().clone()
    }
}

impl DelayedInner {
    /// Publishes the ready set and logs the counts (outside the slots lock).
    fn changed(&self) {
        let (asked, ready): (u32, Vec<Arc<Replica>>) = {
            let slots = self.slots.lock().unwrap();
            (
                slots.0.len() as u32,
                slots.0.iter().filter_map(|s| s.ready.clone()).collect(),
            )
        };
        let point = (
            Instant::now().duration_since(self.origin),
            asked,
            ready.len() as u32,
        );
        {
            let mut log = self.log.lock().unwrap();
            match log.last_mut() {
                Some(last) if (last.1, last.2) == (point.1, point.2) => {}
                Some(last) if last.0 == point.0 => *last = point,
                _ => log.push(point),
            }
        }
        (self.publish)(Endpoints {
            replicas: ready,
            failure: None,
        });
    }

    fn reconcile(self: &Arc<Self>, want: u32) {
        {
            let mut guard = self.slots.lock().unwrap();
            let (slots, next) = &mut *guard;
            while slots.len() < want as usize {
                *next += 1;
                let (id, inner) = (*next, self.clone());
                let starting = tokio::spawn(async move {
                    tokio::time::sleep(inner.cold_start).await;
                    inner.ready(id);
                });
                slots.push(Slot {
                    id,
                    ready: None,
                    starting: Some(starting),
                });
            }
            while slots.len() > want as usize {
                let index = slots
                    .iter()
                    .rposition(|s| s.ready.is_none())
                    .or_else(|| {
                        slots
                            .iter()
                            .enumerate()
                            .min_by_key(|(_, s)| s.ready.as_ref().map_or(0, |r| r.inflight()))
                            .map(|(i, _)| i)
                    })
                    .unwrap();
                if let Some(task) = slots.remove(index).starting {
                    task.abort();
                }
            }
        }
        self.changed();
    }

    fn ready(&self, id: u64) {
        {
            let mut slots = self.slots.lock().unwrap();
            let Some(slot) = slots.0.iter_mut().find(|s| s.id == id) else {
                return;
            };
            slot.starting = None;
            slot.ready = Some(replica(1000 + id as u16));
        }
        self.changed();
    }
}

impl fmt::Debug for Delayed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (slots, _) = &*self.0.slots.lock().unwrap();
        f.debug_struct("Delayed")
            .field("cold_start", &self.0.cold_start)
            .field("asked", &slots.len())
            .finish_non_exhaustive()
    }
}

impl Backend for Delayed {
    fn kind(&self) -> &'static str {
        "delayed"
    }
    fn scalable(&self) -> bool {
        true
    }
    fn replicas(&self) -> u32 {
        self.0.slots.lock().unwrap().0.len() as u32
    }
    fn set_replicas(&self, n: u32) {
        self.0.reconcile(n);
    }
    fn scale_from_zero(&self, n: u32) -> bool {
        if self.replicas() == 0 && n > 0 {
            self.0.reconcile(n);
            true
        } else {
            false
        }
    }
    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// Function `f` (provider "process", command "x") with `extra` appended to its table, on a fake backend.
pub fn function(extra: &str) -> (Arc<Function>, Arc<Fake>) {
    let text = format!("[functions.f]\nprovider = \"process\"\ncommand = [\"x\"]\n{extra}\n");
    let config = Config::parse(std::path::Path::new("t.toml"), &text, None).unwrap();
    let metrics = Metrics::new();
    let f = Function::new(config.functions["f"].clone(), &metrics);
    let fake = Arc::new(Fake::default());
    f.attach(fake.clone());
    (f, fake)
}

/// A replica at 127.0.0.1:`port` (never contacted).
pub fn replica(port: u16) -> Arc<Replica> {
    Replica::new(Upstream::http(format!("127.0.0.1:{port}").parse().unwrap()))
}
