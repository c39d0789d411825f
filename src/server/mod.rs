//! The accept loop: one connection, its upstream and its pipeline per client.
//!
//! Every accepted client gets one upstream connection — a socket to the real
//! server, or a fresh null server on an in-memory stream — and one pipeline
//! between the two. The null server sits behind the very same pipeline as a
//! real server, so every event and fault behaves identically in front of it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

pub mod registry;

use crate::backend::Backend;
use crate::cache::WriteCache;
use crate::intercept::{ConnId, Event, Interceptor, OutageMode, Plan, Verdict};
use crate::io::addr::ListenAddr;
use crate::io::net::{Listener, Stream};
use crate::io::shards::Shards;
use crate::observe::telemetry::Telemetry;
use crate::protocol::transmission::ReplyMode;
use crate::protocol::{EventKind, EventSet, MessageMeta};
use crate::proxy::{self, Connection, DEFAULT_MAX_PAYLOAD, Linger};
use crate::server::registry::{Outage, Registry};

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
    /// Start listening this long after starting (`--listen-delay`): until
    /// then the address refuses connections.
    pub listen_delay: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_payload: None,
            handshake_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            max_connections: 1024,
            listen_delay: Duration::ZERO,
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

    /// Puts every connection behind one volatile write cache per export
    /// (`--write-cache volatile`), writing back over connections of its
    /// own.
    pub fn with_write_cache(self, config: crate::cache::CacheConfig) -> Self {
        let backend = self.shared.backend.clone();
        let timeout = self.shared.limits.connect_timeout;
        let opener: crate::cache::Opener = Arc::new(move || {
            let backend = backend.clone();
            Box::pin(async move { backend.open(0, timeout).await })
        });
        self.shared
            .registry
            .set_write_cache(Arc::new(WriteCache::new(config, opener)));
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
    pub async fn run(mut self) {
        let delay = self.shared.limits.listen_delay;
        if !delay.is_zero() {
            self.listener = listen_late(self.listener, delay).await;
        }
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
                // At -v (info), as `--help` promises: connections come and go.
                info!(conn = id, %peer, "accepted");
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

/// Closes `listener` and listens again on the same address after `delay`,
/// so that meanwhile connecting fails as with no server there. Closed at
/// once when the loop starts: only a client that knew the address before
/// it was announced can have been queued, and it sees its connection
/// reset. A unix socket keeps its file mode (`--socket-mode`).
async fn listen_late(listener: Listener, delay: Duration) -> Listener {
    let addr = match &listener {
        Listener::Tcp(l) => match l.local_addr() {
            Ok(a) => ListenAddr::Tcp {
                host: a.ip().to_string(),
                port: a.port(),
            },
            Err(e) => {
                warn!("--listen-delay: cannot tell the listening address ({e}); listening at once");
                return listener;
            }
        },
        Listener::Unix { path, .. } => ListenAddr::Unix(path.clone()),
    };
    let mode = match &addr {
        ListenAddr::Unix(path) => std::fs::metadata(path).ok().map(|m| m.permissions()),
        ListenAddr::Tcp { .. } => None,
    };
    drop(listener);
    info!(
        "--listen-delay: not listening on {addr} for {}",
        humantime::format_duration(delay)
    );
    tokio::time::sleep(delay).await;
    loop {
        match Listener::bind(&addr).await {
            Ok(l) => {
                if let (Some(mode), ListenAddr::Unix(path)) = (mode.clone(), &addr)
                    && let Err(e) = std::fs::set_permissions(path, mode)
                {
                    warn!(
                        "--listen-delay: cannot set the mode of {}: {e}",
                        path.display()
                    );
                }
                info!("--listen-delay: listening on {addr} now");
                return l;
            }
            Err(e) => {
                // Taken meanwhile, say: keep trying, the server has
                // nothing else to do.
                warn!("--listen-delay: cannot listen on {addr} again: {e}; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Carries out `outage` on a connection that arrived during it.
/// `over` resolves when a blackhole ends.
async fn suffer_outage(
    id: ConnId,
    client: Stream,
    peer: &str,
    outage: &Outage,
    registry: &Registry,
    over: impl std::future::Future<Output = ()>,
) {
    registry.count_outage(outage.mode);
    match outage.mode {
        OutageMode::Refuse { reset } => {
            info!(conn = id, %peer, "outage ({}): refusing the connection", outage.by);
            if reset {
                let (r, _w) = client.into_split();
                r.set_linger_zero();
            }
        }
        OutageMode::Blackhole => {
            info!(conn = id, %peer, "outage ({}): holding the connection unanswered", outage.by);
            // Nothing is sent; what the client sends is read and dropped,
            // so its leaving is noticed at once.
            let mut client = client;
            let mut sink = [0u8; 4096];
            let gone = async {
                while let Ok(n) = client.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            };
            tokio::select! {
                () = gone => debug!(conn = id, "blackholed client left"),
                () = over => {
                    debug!(conn = id, "outage over: closing the blackholed connection")
                }
            }
        }
    }
}

async fn serve_client(id: ConnId, client: Stream, peer: String, shared: &Shared) {
    if let Some(outage) = shared.registry.outage() {
        let over = shared.registry.outage_over(&outage);
        suffer_outage(id, client, &peer, &outage, &shared.registry, over).await;
        return;
    }
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
            // A slow close: accepted, never answered, closed after a while.
            Plan::Cut { linger, .. } if !linger.is_zero() => {
                tokio::time::sleep(linger).await;
                return;
            }
            Plan::Outage { mode, duration } => {
                let by = format!("rule {}", f.rule);
                let r = &shared.registry;
                match duration.and_then(|d| {
                    r.start_outage(mode, Some(d), &by);
                    r.outage()
                }) {
                    Some(outage) => {
                        let over = r.outage_over(&outage);
                        suffer_outage(id, client, &conn.peer, &outage, r, over).await;
                    }
                    None => {
                        // This connection alone, for as long as it stays.
                        let outage = Outage {
                            mode,
                            until: None,
                            by,
                        };
                        let over = std::future::pending();
                        suffer_outage(id, client, &conn.peer, &outage, r, over).await;
                    }
                }
                return;
            }
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
                conn.unreachable(&format!("cannot reach upstream {target}: {e}"));
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
