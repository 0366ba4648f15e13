//! The `static` provider: a fixed list of upstream URLs, always ready, never scaled.
//!
//! For fronting endpoints that something else runs. Each upstream is one replica, so
//! `max_ongoing_requests` applies per upstream and requests go to the least-loaded one.

use crate::config::StaticConfig;
use crate::provider::{Backend, BoxFuture, Endpoints, Publisher, Replica};

/// A fixed set of upstreams.
#[derive(Debug)]
pub struct StaticBackend {
    count: u32,
}

impl StaticBackend {
    /// Publishes every upstream as a ready replica at once.
    pub fn start(config: &StaticConfig, publisher: Publisher) -> StaticBackend {
        let replicas = config
            .upstreams
            .iter()
            .map(|u| Replica::new(u.clone()))
            .collect::<Vec<_>>();
        let count = replicas.len() as u32;
        publisher.publish(Endpoints {
            replicas,
            failure: None,
        });
        StaticBackend { count }
    }
}

impl Backend for StaticBackend {
    fn kind(&self) -> &'static str {
        "static"
    }

    fn scalable(&self) -> bool {
        false
    }

    fn replicas(&self) -> u32 {
        self.count
    }

    fn set_replicas(&self, _n: u32) {}

    fn scale_from_zero(&self, _n: u32) -> bool {
        false
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}
