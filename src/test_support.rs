//! Shared unit-test fixtures: a fake backend and a function built from config text.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use crate::config::{Config, Upstream};
use crate::function::Function;
use crate::metrics::Metrics;
use crate::provider::{Backend, BoxFuture, Replica};

/// A backend that only records what it is asked for.
#[derive(Debug, Default)]
pub struct Fake {
    pub desired: AtomicU32,
    pub wakes: AtomicU32,
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
