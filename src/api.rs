//! The Rust API: a proxy or a null server started inside a Rust program
//! (a test suite, most often), steered and stopped through a handle.
//!
//! It exists so that a Rust test needs no harness of its own around the
//! binary (spawn it, read `Listening on`, talk HTTP to the control API,
//! never leak it): [`Proxy::builder`] and [`Null::builder`] make a
//! [`Builder`], whose `spawn()` binds the listener before it returns and
//! serves on a thread of its own; the [`Running`] handle changes rules,
//! lists connections and stops everything on [`Running::shutdown`] or when
//! dropped. It runs the very code the command line runs
//! ([`crate::process::Ready`], the control API's rule store and connection
//! registry): only the process around it (signals, `--run`, stdout) is
//! left out.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::SystemTime;

use thiserror::Error;
use tokio::sync::oneshot;

use crate::backend::Backend;
use crate::backend::null::{MAX_EXPORT_SIZE, NullConfig};
use crate::cache::DEFAULT_CACHE_SIZE;
use crate::intercept::{ConnState, Event, Interceptor, Verdict};
use crate::io::addr::{AddrError, ListenAddr, Target};
use crate::observe::telemetry::Telemetry;
use crate::observe::trace::TraceTarget;
use crate::process::{PrivateDir, Ready, ServeError, ServerOptions, UpstreamCheck, startup_rules};
use crate::protocol::consts::command_name;
use crate::rules::live::{ChangeError, LiveRules};
use crate::rules::{RuleError, Source};
use crate::server::registry::Registry;

pub use crate::cache::WriteBack;
pub use crate::intercept::ConnId;
pub use crate::proxy::ConnectionInfo;
pub use crate::rules::RuleStats;
pub use crate::server::Limits;

/// What [`Builder::rules_yaml`] documents are called in error messages
/// and in each of their rules' origin.
pub const RULES_YAML: &str = "rules_yaml";

/// What [`Running::add_rules`] and [`Running::replace_rules`] documents are
/// called in error messages.
pub const ADD_RULES: &str = "add_rules";

/// Why the API could not do what it was asked. Messages leave out their
/// source, as is the custom: print the chain (`{:#}` with `anyhow`, or walk
/// [`std::error::Error::source`]) to see the operating system's reason.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// A rules document is wrong: `FILE:LINE:COLUMN: what`, the message
    /// `nbdfault proxy --rules FILE` prints for the same text (a
    /// [`Builder::rules_yaml`] document is called [`RULES_YAML`]).
    #[error("{0}")]
    Rules(#[from] RuleError),
    /// A rule of that name is in force already.
    #[error("{0}")]
    Change(#[from] ChangeError),
    #[error("no rule named {0:?}")]
    NoSuchRule(String),
    #[error("no connection {0}")]
    NoSuchConnection(ConnId),
    /// [`Builder::listen`] or [`Builder::upstream`] is not an address.
    #[error("{what}: {source}")]
    Address {
        what: &'static str,
        #[source]
        source: AddrError,
    },
    #[error("a proxy needs an upstream: call .upstream(TARGET) on its builder")]
    NoUpstream,
    #[error("size {0} is too large: at most {MAX_EXPORT_SIZE} bytes, as in qemu-img")]
    Size(u64),
    /// Starting the server failed (the address is taken, the upstream is
    /// not there with [`Builder::check_upstream`], ...).
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error("cannot open the trace {}", .path.display())]
    Trace {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the server's thread")]
    Thread(#[source] std::io::Error),
    /// The server's thread ended without saying why (it panicked).
    #[error("the server's thread ended unexpectedly")]
    Died,
}

/// A proxy in front of a real NBD server: `Proxy::builder().upstream(..)`.
pub struct Proxy;

/// The built-in null server (reads zeroes, discards writes) behind the
/// same pipeline as a proxy: `Null::builder().size(..)`.
pub struct Null;

impl Proxy {
    /// A proxy's builder; [`Builder::upstream`] is required.
    pub fn builder() -> Builder<ProxyTo> {
        Builder::new(ProxyTo {
            upstream: None,
            check_upstream: false,
        })
    }
}

impl Null {
    /// A null server's builder: 8 GiB, fixed newstyle, unless told.
    pub fn builder() -> Builder<NullDisk> {
        Builder::new(NullDisk {
            size: 8 << 30,
            oldstyle: false,
        })
    }
}

/// What a [`Proxy`] forwards to.
#[derive(Debug, Clone)]
pub struct ProxyTo {
    upstream: Option<String>,
    check_upstream: bool,
}

/// What a [`Null`] server exports.
#[derive(Debug, Clone)]
pub struct NullDisk {
    size: u64,
    oldstyle: bool,
}

/// How to start a server: one builder for both, `B` saying which (its
/// own setters are on `Builder<ProxyTo>` and `Builder<NullDisk>`), the
/// rest shared. Nothing happens until `spawn()`.
#[derive(Debug, Clone)]
pub struct Builder<B> {
    backend: B,
    listen: Option<String>,
    rules: Vec<Source>,
    seed: Option<u64>,
    control: Option<(String, Option<String>)>,
    trace: Option<PathBuf>,
    threads: usize,
    socket_mode: Option<u32>,
    limits: Limits,
    write_cache: Option<crate::cache::CacheConfig>,
}

impl<B> Builder<B> {
    fn new(backend: B) -> Self {
        Self {
            backend,
            listen: None,
            rules: Vec::new(),
            seed: None,
            control: None,
            trace: None,
            threads: 1,
            socket_mode: None,
            limits: Limits::default(),
            write_cache: None,
        }
    }

    /// Where to listen, as `--listen` takes it: `127.0.0.1:0` (a free
    /// port), `HOST:PORT`, a unix socket path or `unix:PATH`. Default: a
    /// unix socket in a private directory, both removed at shutdown.
    pub fn listen(mut self, addr: impl Into<String>) -> Self {
        self.listen = Some(addr.into());
        self
    }

    /// A rules document (YAML, or the INI of QEMU's injector), as a rules
    /// file holds it; repeatable, concatenated in order with the files.
    /// Errors name it [`RULES_YAML`].
    pub fn rules_yaml(mut self, text: impl Into<String>) -> Self {
        self.rules.push(Source::Text {
            name: RULES_YAML.to_string(),
            text: text.into(),
        });
        self
    }

    /// A rules file, as `--rules FILE`; repeatable.
    pub fn rules_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.rules.push(Source::File(path.into()));
        self
    }

    /// `--seed`: the seed of probabilities and random corruption,
    /// overriding the documents'.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Also serve the HTTP control API on `addr` (`--control`), with this
    /// bearer token if any (`--control-token`).
    pub fn control(mut self, addr: impl Into<String>, token: Option<String>) -> Self {
        self.control = Some((addr.into(), token));
        self
    }

    /// `--trace FILE`: one JSON line per event.
    pub fn trace(mut self, path: impl Into<PathBuf>) -> Self {
        self.trace = Some(path.into());
        self
    }

    /// `--threads`: threads serving connections [default: 1, the server's
    /// own]; 0: tokio's work-stealing runtime.
    pub fn threads(mut self, n: usize) -> Self {
        self.threads = n;
        self
    }

    /// `--socket-mode`: the permission bits of a unix socket it listens
    /// on (default 0o600, owner only), e.g. `0o660` for a group's clients.
    /// Nothing for a TCP `listen`.
    pub fn socket_mode(mut self, mode: u32) -> Self {
        self.socket_mode = Some(mode);
        self
    }

    /// The limits against hostile peers (`--max-payload`,
    /// `--handshake-timeout`, ...).
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// `--write-cache volatile` holding at most `bytes` of write data per
    /// export (`None`: the default `--cache-size`, 256 MiB), writing back
    /// in the background once an eighth of that is held.
    pub fn write_cache(self, bytes: Option<u64>) -> Self {
        self.write_cache_with(bytes, WriteBack::Background)
    }

    /// `--write-cache volatile` with `--write-back`: with
    /// [`WriteBack::WhenFull`], what a power loss takes does not depend on
    /// timing.
    pub fn write_cache_with(mut self, bytes: Option<u64>, write_back: WriteBack) -> Self {
        let limit = bytes.unwrap_or(DEFAULT_CACHE_SIZE);
        self.write_cache = Some(crate::cache::CacheConfig::new(limit, write_back));
        self
    }

    /// Binds and starts serving on a thread of its own; clients can
    /// connect once this returns.
    fn launch(self, backend: Backend, upstream_check: UpstreamCheck) -> Result<Running, Error> {
        let listen = match &self.listen {
            Some(l) => Some(l.parse::<ListenAddr>().map_err(|source| Error::Address {
                what: "listen",
                source,
            })?),
            None => None,
        };
        let control = match self.control {
            Some((addr, token)) => Some((
                addr.parse::<ListenAddr>()
                    .map_err(|source| Error::Address {
                        what: "control",
                        source,
                    })?,
                token,
            )),
            None => None,
        };
        let rules = Arc::new(startup_rules(&self.rules, self.seed)?);
        let trace = self.trace.as_ref().map(TraceTarget::from_arg);
        // Metrics are on: one atomic add per event, for `metrics()`.
        let telemetry = Arc::new(Telemetry::new(true, trace).map_err(|source| Error::Trace {
            path: self.trace.clone().unwrap_or_default(),
            source,
        })?);
        let (listen, private) = match listen {
            Some(l) => (l, None),
            None => {
                let (listen, dir) = PrivateDir::socket()?;
                (listen, Some(dir))
            }
        };
        let socket = match &listen {
            ListenAddr::Unix(path) => Some(path.clone()),
            ListenAddr::Tcp { .. } => None,
        };
        let faults = Arc::new(Recorder {
            rules: rules.clone(),
            fired: Mutex::new(VecDeque::new()),
        });
        let opts = ServerOptions {
            backend,
            rules: rules.clone(),
            interceptor: Some(faults.clone()),
            telemetry: telemetry.clone(),
            upstream_check,
            limits: self.limits,
            control,
            socket_mode: self.socket_mode,
            threads: self.threads,
            busy_poll: std::time::Duration::ZERO,
            write_cache: self.write_cache,
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let (started_tx, started) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("nbdfault-api".into())
            .spawn(move || serve(listen, opts, started_tx, stopped))
            .map_err(Error::Thread)?;
        let (uri, control_url, registry) = match started.recv() {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e.into());
            }
            Err(_) => {
                let _ = thread.join();
                return Err(Error::Died);
            }
        };
        Ok(Running {
            uri,
            control_url,
            socket,
            rules,
            faults,
            registry,
            telemetry,
            stop: Some(stop),
            thread: Some(thread),
            _private: private,
        })
    }
}

/// What the server's thread reports once clients can connect.
type Started = Result<(String, Option<String>, Arc<Registry>), ServeError>;

/// The server's thread: binds, reports, serves until `stopped`, then ends
/// every connection; its runtime (and every thread of it) ends with it.
fn serve(
    listen: ListenAddr,
    opts: ServerOptions,
    started: std::sync::mpsc::SyncSender<Started>,
    stopped: oneshot::Receiver<()>,
) {
    let rt = match crate::process::runtime(opts.threads) {
        Ok(rt) => rt,
        Err(e) => {
            let _ = started.send(Err(e));
            return;
        }
    };
    rt.block_on(async move {
        let ready = match Ready::bind(listen, opts).await {
            Ok(r) => r,
            Err(e) => {
                let _ = started.send(Err(e));
                return;
            }
        };
        let report = (
            ready.uri().to_string(),
            ready.control_url(),
            ready.registry(),
        );
        if started.send(Ok(report)).is_err() {
            return;
        }
        // A dropped handle (its sender gone) stops the server as well.
        ready
            .serve_until(async {
                let _ = stopped.await;
            })
            .await;
    });
}

impl Builder<ProxyTo> {
    /// The real server, as `--upstream` takes it: `HOST:PORT`, a unix
    /// socket path, `nbd://HOST[:PORT]` or `nbd+unix:///?socket=PATH`.
    pub fn upstream(mut self, target: impl Into<String>) -> Self {
        self.backend.upstream = Some(target.into());
        self
    }

    /// `--check-upstream`: connect to the upstream before listening, and
    /// fail `spawn()` if that fails (without it, an upstream that is not
    /// there is a warning in the log).
    pub fn check_upstream(mut self, check: bool) -> Self {
        self.backend.check_upstream = check;
        self
    }

    /// Starts the proxy.
    ///
    /// A proxy in front of a null server, with a rule that cuts every
    /// connection before its greeting (any client sees the connection
    /// close at once), added while it runs:
    ///
    /// ```
    /// use std::io::Read;
    /// use std::os::unix::net::UnixStream;
    ///
    /// let disk = nbdfault::Null::builder().size(1 << 20).spawn()?;
    /// let proxy = nbdfault::Proxy::builder().upstream(disk.uri()).spawn()?;
    /// let greeting = |path| -> std::io::Result<Vec<u8>> {
    ///     let mut bytes = Vec::new();
    ///     UnixStream::connect(path)?.take(8).read_to_end(&mut bytes)?;
    ///     Ok(bytes)
    /// };
    /// let socket = proxy.socket().expect("a unix socket by default");
    /// assert_eq!(greeting(socket)?, b"NBDMAGIC");
    /// proxy.add_rules(
    ///     "rules:\n  - name: cut\n    event: neg1\n    action: disconnect\n",
    /// )?;
    /// assert_eq!(greeting(socket)?, b"");
    /// assert_eq!(proxy.rules()[0].fired, 1);
    /// proxy.shutdown()?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn spawn(self) -> Result<Running, Error> {
        let target = self.backend.upstream.as_deref().ok_or(Error::NoUpstream)?;
        let target = target.parse::<Target>().map_err(|source| Error::Address {
            what: "upstream",
            source,
        })?;
        let check = if self.backend.check_upstream {
            UpstreamCheck::Refuse
        } else {
            UpstreamCheck::Warn
        };
        self.launch(Backend::Upstream(target), check)
    }
}

impl Builder<NullDisk> {
    /// The export's size in bytes (at most [`MAX_EXPORT_SIZE`], as
    /// qemu-img allows).
    pub fn size(mut self, bytes: u64) -> Self {
        self.backend.size = bytes;
        self
    }

    /// The oldstyle handshake instead of fixed newstyle.
    pub fn oldstyle(mut self, oldstyle: bool) -> Self {
        self.backend.oldstyle = oldstyle;
        self
    }

    /// Starts the null server.
    ///
    /// On TCP, read by `nbdinfo` (libnbd's):
    ///
    /// ```
    /// let null = nbdfault::Null::builder()
    ///     .size(1 << 20)
    ///     .listen("127.0.0.1:0")
    ///     .spawn()?;
    /// assert!(null.uri().starts_with("nbd://127.0.0.1:"));
    /// let out = std::process::Command::new("nbdinfo")
    ///     .args(["--size", null.uri()])
    ///     .output()?;
    /// assert_eq!(String::from_utf8_lossy(&out.stdout), "1048576\n");
    /// null.shutdown()?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn spawn(self) -> Result<Running, Error> {
        let NullDisk { size, oldstyle } = self.backend;
        if size > MAX_EXPORT_SIZE {
            return Err(Error::Size(size));
        }
        self.launch(
            Backend::Null(NullConfig { size, oldstyle }),
            UpstreamCheck::Skip,
        )
    }
}

/// A server started by `spawn()`, serving on its own thread until
/// [`Running::shutdown`] or until dropped (which does the same, quietly).
/// Either way every connection is ended, the listener closed (a unix
/// socket and the private directory removed) and every thread it started
/// joined; that blocks the caller up to about a second while connections
/// close (in async code, stop it through `spawn_blocking`). Its log lines
/// go to the program's `tracing` subscriber, if there is one.
pub struct Running {
    uri: String,
    control_url: Option<String>,
    socket: Option<PathBuf>,
    rules: Arc<LiveRules>,
    faults: Arc<Recorder>,
    registry: Arc<Registry>,
    telemetry: Arc<Telemetry>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    /// After the thread: the socket in it is gone by then.
    _private: Option<PrivateDir>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("uri", &self.uri)
            .field("control_url", &self.control_url)
            .finish_non_exhaustive()
    }
}

impl Running {
    /// The NBD URI clients connect to (`nbd+unix:///?socket=PATH` or
    /// `nbd://HOST:PORT`).
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The unix socket's path, when it listens on one.
    pub fn socket(&self) -> Option<&Path> {
        self.socket.as_deref()
    }

    /// The control API's URL (`http://...` or `unix:PATH`), when
    /// [`Builder::control`] asked for it.
    pub fn control_url(&self) -> Option<&str> {
        self.control_url.as_deref()
    }

    /// Adds a rules document's rules after those in force, as `POST
    /// /rules` does: live connections see them from their next event.
    /// Nothing changes when the document is bad or a name is taken.
    pub fn add_rules(&self, yaml: &str) -> Result<(), Error> {
        let set = crate::rules::parse_str(ADD_RULES, yaml)?;
        self.rules.add(set)?;
        Ok(())
    }

    /// Replaces every rule (and the seed, unless [`Builder::seed`] fixed
    /// it), as `PUT /rules` does.
    pub fn replace_rules(&self, yaml: &str) -> Result<(), Error> {
        let set = crate::rules::parse_str(ADD_RULES, yaml)?;
        self.rules.replace(set);
        Ok(())
    }

    /// Removes the rule named `name`, as `DELETE /rules/NAME` does.
    pub fn remove_rule(&self, name: &str) -> Result<(), Error> {
        if self.rules.remove(name) {
            Ok(())
        } else {
            Err(Error::NoSuchRule(name.to_string()))
        }
    }

    /// The rules in force, in order, with how often each matched and
    /// fired.
    pub fn rules(&self) -> Vec<RuleStats> {
        self.rules.current().stats()
    }

    /// The live connections, oldest first.
    pub fn connections(&self) -> Vec<ConnectionInfo> {
        self.registry.list().iter().map(|c| c.info()).collect()
    }

    fn connection(&self, id: ConnId) -> Result<Arc<crate::proxy::Connection>, Error> {
        self.registry.get(id).ok_or(Error::NoSuchConnection(id))
    }

    /// Holds connection `id` between messages until [`Running::resume`].
    pub fn pause(&self, id: ConnId) -> Result<(), Error> {
        self.connection(id).map(|c| c.pause())
    }

    pub fn resume(&self, id: ConnId) -> Result<(), Error> {
        self.connection(id).map(|c| c.resume())
    }

    /// Closes both sides of connection `id` at once.
    pub fn disconnect(&self, id: ConnId) -> Result<(), Error> {
        self.connection(id).map(|c| c.kill())
    }

    /// Every fault fired so far, oldest first (the last [`MAX_FAULTS`]
    /// of them), as the rules decided it.
    pub fn faults(&self) -> Vec<FaultRecord> {
        self.faults.fired().iter().cloned().collect()
    }

    /// The Prometheus text `GET /metrics` serves.
    pub fn metrics(&self) -> String {
        crate::control::metrics(&self.registry, &self.telemetry)
    }

    /// Stops the server: ends every connection (waiting up to a second for
    /// each to close), closes the listener and joins its threads.
    pub fn shutdown(mut self) -> Result<(), Error> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Result<(), Error> {
        drop(self.stop.take());
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| Error::Died),
            None => Ok(()),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.stop_and_join();
    }
}

/// Most faults [`Running::faults`] keeps: the oldest go first.
pub const MAX_FAULTS: usize = 10_000;

/// A fault a rule fired, and the event it fired on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultRecord {
    /// When it was decided.
    pub at: SystemTime,
    pub conn: ConnId,
    pub rule: String,
    /// The rule's action (`error`, `disconnect`, `delay`, ...).
    pub action: &'static str,
    /// The names the event answers to (`request`, `data`, ...).
    pub events: Vec<&'static str>,
    /// `to-server` or `to-client`; `None` for `connect`.
    pub direction: Option<&'static str>,
    /// The request's command (`read`, `write`, ...), its offset and length.
    pub command: Option<&'static str>,
    pub offset: Option<u64>,
    pub length: Option<u64>,
}

/// The rules, and a bounded record of what they fired: a lock taken only
/// when a rule fires, so a pass costs nothing more.
struct Recorder {
    rules: Arc<LiveRules>,
    fired: Mutex<VecDeque<FaultRecord>>,
}

impl Recorder {
    fn fired(&self) -> MutexGuard<'_, VecDeque<FaultRecord>> {
        self.fired.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Interceptor for Recorder {
    fn on_event(&self, event: &Event, state: &mut ConnState) -> Verdict {
        let verdict = self.rules.on_event(event, state);
        if let Verdict::Fault(f) = &verdict {
            let record = FaultRecord {
                at: SystemTime::now(),
                conn: event.conn,
                rule: f.rule.to_string(),
                action: f.action,
                events: event.kinds.iter().map(|k| k.name()).collect(),
                direction: event.direction.map(|d| d.name()),
                command: event.meta.command.and_then(command_name),
                offset: event.meta.offset,
                length: event.meta.length,
            };
            let mut fired = self.fired();
            if fired.len() >= MAX_FAULTS {
                fired.pop_front();
            }
            fired.push_back(record);
        }
        verdict
    }

    fn is_idle(&self) -> bool {
        self.rules.is_idle()
    }

    fn after_cut(&self, fault: &crate::intercept::Fault) {
        self.rules.after_cut(fault);
    }
}
