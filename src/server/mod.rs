//! The accept loop: one connection, its upstream and its pipeline per client.
//!
//! Every accepted client gets one upstream connection — a socket to the real
//! server, or a fresh null server on an in-memory stream — and one pipeline
//! between the two. The null server sits behind the very same pipeline as a
//! real server, so every event and fault behaves identically in front of it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Semaphore;
use tracing::{debug, warn};

pub mod registry;

use crate::backend::Backend;
use crate::cache::WriteCache;
use crate::intercept::{ConnId, Event, Interceptor, Plan, Verdict};
use crate::io::addr::ListenAddr;
use crate::io::net::{Listener, Stream};
use crate::io::shards::Shards;
use crate::observe::telemetry::Telemetry;
use crate::protocol::transmission::ReplyMode;
use crate::protocol::{EventKind, EventSet, MessageMeta};
use crate::proxy::{self, Connection, DEFAULT_MAX_PAYLOAD};
use crate::server::registry::Registry;

/// Everything a server needs to run.
#[derive(Clone)]
pub struct ServerConfig {
    pub listen: ListenAddr,
    pub backend: Backend,
    pub limits: Limits,
    pub interceptor: Arc<dyn Interceptor>,
    pub telemetry: Arc<Telemetry>,
}

/// What a server allows, each a flag with a default; each logged when hit.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest payload one request may carry or ask for (a write's payload,
    /// a read's length); a request over it is answered with EINVAL by the
    /// proxy and never forwarded. `None`: no limit, the server decides
    /// (payloads are streamed, never held whole).
    pub max_payload: Option<u64>,
    /// A client still negotiating after this long is closed.
    pub handshake_timeout: Duration,
    /// Connecting to the upstream may take this long.
    pub connect_timeout: Duration,
    /// Connections served at once; further clients wait to be accepted.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_payload: None,
            handshake_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            max_connections: 1024,
        }
    }
}

/// A bound, not yet running server.
pub struct Server {
    listener: Listener,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    /// Where connections run; `None`: tasks of the current runtime.
    shards: Option<Arc<Shards>>,
}

/// What every connection of a server uses.
struct Shared {
    backend: Backend,
    limits: Limits,
    interceptor: Arc<dyn Interceptor>,
    telemetry: Arc<Telemetry>,
    registry: Arc<Registry>,
}

impl Server {
    /// Binds the listening socket; errors here are startup errors.
    pub async fn bind(cfg: ServerConfig) -> std::io::Result<Self> {
        let listener = Listener::bind(&cfg.listen).await?;
        Ok(Self {
            listener,
            shared: Arc::new(Shared {
                backend: cfg.backend,
                limits: cfg.limits,
                interceptor: cfg.interceptor,
                telemetry: cfg.telemetry,
                registry: Arc::new(Registry::default()),
            }),
            next_id: AtomicU64::new(1),
            shards: None,
        })
    }

    /// Deals connections to these threads instead of spawning them on the
    /// current runtime.
    pub fn with_shards(mut self, shards: Arc<Shards>) -> Self {
        self.shards = Some(shards);
        self
    }

    /// Puts every connection behind one volatile write cache holding at
    /// most `limit` bytes of write data per export (`--write-cache
    /// volatile`), writing back over connections of its own.
    pub fn with_write_cache(self, limit: u64) -> Self {
        let backend = self.shared.backend.clone();
        let timeout = self.shared.limits.connect_timeout;
        let opener: crate::cache::Opener = Arc::new(move || {
            let backend = backend.clone();
            Box::pin(async move { backend.open(0, timeout).await })
        });
        self.shared
            .registry
            .set_write_cache(Arc::new(WriteCache::new(limit, opener)));
        self
    }

    /// The live connections.
    pub fn registry(&self) -> Arc<Registry> {
        self.shared.registry.clone()
    }

    /// NBD URI clients connect to.
    pub fn uri(&self) -> String {
        self.listener.uri()
    }

    /// Accepts and serves clients until the future is dropped. Dropping it
    /// (and so the listener) removes a unix socket file.
    pub async fn run(self) {
        let max = self.shared.limits.max_connections.max(1);
        let slots = Arc::new(Semaphore::new(max));
        loop {
            if slots.available_permits() == 0 {
                warn!("{max} connections open (--max-connections): further clients wait");
            }
            // Waiting here leaves further clients in the listen backlog.
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let (stream, peer) = match self.listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors and the like: keep serving the
                    // clients we have and try again shortly.
                    warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let shared = self.shared.clone();
            let serve = move |stream| async move {
                debug!(conn = id, %peer, "accepted");
                shared.telemetry.connection_opened();
                serve_client(id, stream, peer, &shared).await;
                shared.telemetry.connection_closed();
                drop(slot);
            };
            match &self.shards {
                Some(shards) => shards.spawn(stream, serve),
                None => drop(tokio::spawn(serve(stream))),
            }
        }
    }
}

async fn serve_client(id: ConnId, client: Stream, peer: String, shared: &Shared) {
    let conn = Connection::new(
        id,
        peer,
        shared.limits.max_payload.unwrap_or(DEFAULT_MAX_PAYLOAD),
        shared.interceptor.clone(),
        shared.telemetry.clone(),
    );
    if let Some(cache) = shared.registry.write_cache() {
        conn.set_write_cache(cache.clone());
    }
    let connect = Event {
        conn: id,
        direction: None,
        kinds: EventSet::of(EventKind::Connect),
        meta: MessageMeta::default(),
        size: 0,
        mode: ReplyMode::Simple,
    };
    if let Verdict::Fault(f) = conn.offer(&connect) {
        proxy::log_fault(&connect, &f, 0);
        match f.plan {
            Plan::Hold {
                duration: Some(d), ..
            } => tokio::time::sleep(d).await,
            // Refused: dropping the stream closes it before a byte is sent.
            _ => return,
        }
    }
    let upstream = match shared.backend.open(id, shared.limits.connect_timeout).await {
        Ok(s) => s,
        Err(e) => {
            shared.telemetry.upstream_error();
            if let Backend::Upstream(target) = &shared.backend {
                warn!(conn = id, peer = %conn.peer, "cannot reach upstream {target}: {e}; closing the client connection");
            }
            return;
        }
    };
    shared.registry.insert(conn.clone());
    let result = proxy::run(
        conn.clone(),
        client.into_split(),
        upstream.into_split(),
        Some(shared.limits.handshake_timeout),
    )
    .await;
    shared.registry.remove(id);
    proxy::log_outcome(&conn, &result);
}
