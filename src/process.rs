//! The process around a server: the runtime, signals, the captive command
//! (`--run`), and the lifetime of everything started with it.
//!
//! `main.rs` only turns arguments into [`ServeOptions`]; this is where a
//! server runs, so tests can drive the same code.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tracing::{debug, info, warn};

use crate::backend::Backend;
use crate::control::{Control, ControlError, ControlState};
use crate::intercept::Interceptor;
use crate::io::addr::ListenAddr;
use crate::io::shards::Shards;
use crate::observe::telemetry::Telemetry;
use crate::rules::live::LiveRules;
use crate::rules::{Notice, RuleError, RuleSet, Source};
use crate::server::registry::Registry;
use crate::server::{Limits, Server, ServerConfig};

// Error messages leave out their source: the binary prints the whole chain
// (`{:#}`), which would repeat it.

/// Log target of lifecycle and control messages.
pub const CONTROL_LOG: &str = "nbdfault::control";

/// Everything a server needs, whoever runs it: the command line's `proxy`
/// and `null` ([`serve`]) or a Rust program ([`crate::api`]), both through
/// [`Ready`].
pub struct ServerOptions {
    pub backend: Backend,
    pub rules: Arc<LiveRules>,
    /// What decides about faults, when not `rules` itself: something
    /// around it (the Rust API records what fired).
    pub interceptor: Option<Arc<dyn Interceptor>>,
    pub telemetry: Arc<Telemetry>,
    /// Whether to try a [`Backend::Upstream`] once at start.
    pub upstream_check: UpstreamCheck,
    pub limits: Limits,
    /// The HTTP control API's address, and the token it requires.
    pub control: Option<(ListenAddr, Option<String>)>,
    /// Permissions of a unix listening socket (default owner-only, 0600).
    pub socket_mode: Option<u32>,
    /// Threads serving connections, each a single-threaded runtime (see
    /// [`crate::io::shards`]); 0: tokio's work-stealing runtime instead.
    pub threads: usize,
    /// Busy-poll this long after activity on each thread (see
    /// [`crate::io::busypoll`]); zero: never. Needs `threads` ≥ 1.
    pub busy_poll: Duration,
    /// `--write-cache volatile` (`--cache-size`, `--write-back`); `None`:
    /// off.
    pub write_cache: Option<crate::cache::CacheConfig>,
}

/// Everything `proxy` and `null` need: a server, and what the process
/// around it does.
pub struct ServeOptions {
    /// `None`: the default address, or a private unix socket with `run`.
    pub listen: Option<ListenAddr>,
    pub server: ServerOptions,
    /// Captive mode: run this through `sh -c`, exit with its status.
    /// Stdout is then the command's alone, as with nbdkit's `--run`.
    pub run: Option<String>,
    /// Print the URI alone once listening, instead of `Listening on URI`
    /// (and, in captive mode, instead of nothing): nbdkit's `--print-uri`.
    pub print_uri: bool,
    /// `--exit-with-parent`: the parent process when this one started
    /// (taken as early as possible); stop as SIGTERM would once it exits.
    pub exit_with_parent: Option<nix::unistd::Pid>,
    /// `--pidfile`: written once clients can connect, removed on the way
    /// out.
    pub pidfile: Option<PathBuf>,
}

/// Trying the upstream once at start ([`crate::backend::upstream::probe`]),
/// so a typo'd address shows then, not as every client's failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamCheck {
    Skip,
    /// Once listening, a look that spends no connection (see
    /// [`crate::backend::upstream::look`]): a warning naming the address
    /// and the OS error.
    Warn,
    /// Before listening, a connection: a startup error (`--check-upstream`).
    Refuse,
}

#[derive(Debug, Error)]
pub enum ServeError {
    #[error("starting the runtime")]
    Runtime(#[source] std::io::Error),
    #[error("cannot listen on {addr}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create a private socket directory")]
    PrivateDir(#[source] std::io::Error),
    #[error("--control")]
    Control(#[from] ControlError),
    #[error("installing signal handlers")]
    Signals(#[source] std::io::Error),
    #[error("cannot write the pidfile {}", path.display())]
    Pidfile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot reach upstream {target} (--check-upstream)")]
    Upstream {
        target: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot run {cmd:?}")]
    Run {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
}

/// Serves until SIGINT/SIGTERM (exit status 0) or, in captive mode, until
/// the command exits (its status). Prints `Listening on URI` once clients
/// can connect (not in captive mode; see [`ServeOptions::print_uri`]).
pub fn serve(opts: ServeOptions) -> Result<i32, ServeError> {
    raise_fd_limit();
    runtime(opts.server.threads)?.block_on(serve_async(opts))
}

/// The runtime a server's accepting thread runs: single-threaded (shard
/// 0) unless `threads` is 0, which asks for tokio's work-stealing one.
pub fn runtime(threads: usize) -> Result<tokio::runtime::Runtime, ServeError> {
    match threads {
        0 => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
        _ => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
    }
    .map_err(ServeError::Runtime)
}

async fn serve_async(opts: ServeOptions) -> Result<i32, ServeError> {
    // A private directory for the socket of a captive server, removed on
    // the way out (after the listener, which removes the socket itself).
    let (listen, private) = match (&opts.listen, &opts.run) {
        (Some(l), _) => (l.clone(), None),
        (None, Some(_)) => {
            let (listen, dir) = PrivateDir::socket()?;
            (listen, Some(dir))
        }
        (None, None) => (
            crate::io::addr::DEFAULT_LISTEN
                .parse()
                .expect("the default address parses"),
            None,
        ),
    };
    let rules = opts.server.rules.clone();
    let ready = Ready::bind(listen.clone(), opts.server).await?;
    let uri = ready.uri().to_string();
    // Before anyone can know we listen: a SIGTERM right after the line must
    // find the handlers in place.
    let sigs = Signals::install()?;
    // Once the file exists, clients can connect (it appears whole, by a
    // rename); removed when dropped, with this function.
    let pidfile = match &opts.pidfile {
        Some(path) => Some(Pidfile::write(path)?),
        None => None,
    };
    match (opts.print_uri, &opts.run) {
        (true, _) => println!("{uri}"),
        (false, None) => println!("Listening on {uri}"),
        (false, Some(_)) => {}
    }
    if let (Some(url), None) = (ready.control_url(), &opts.run) {
        println!("Control on {url}");
    }
    let _ = std::io::stdout().flush();

    let signals = sigs.serve(&rules);
    let parent = parent_exited(opts.exit_with_parent);
    let signals = async {
        tokio::select! {
            r = signals => r,
            () = parent => Ok(()),
        }
    };
    let status = match &opts.run {
        None => ready.serve_until(async { signals.await.map(|()| 0) }).await,
        Some(cmd) => {
            let mut child = captive(cmd, &uri, &listen, ready.control_url())?;
            ready
                .serve_until(async {
                    tokio::select! {
                        r = signals => {
                            r?;
                            let _ = child.start_kill();
                            Ok(0)
                        }
                        s = child.wait() => s.map(exit_status).map_err(|source| ServeError::Run {
                            cmd: cmd.clone(),
                            source,
                        }),
                    }
                })
                .await
        }
    };
    drop(private);
    drop(pidfile);
    status
}

/// A server listening (clients can connect; they wait to be accepted) and
/// its control API bound, not yet serving: what [`serve`] and the Rust API
/// ([`crate::api`]) both start from.
pub struct Ready {
    server: Server,
    control: Option<Control>,
    uri: String,
    registry: Arc<Registry>,
    telemetry: Arc<Telemetry>,
    /// Kept past the listener, so connections on other threads end the
    /// way [`shut_down`] asks before their threads stop.
    shards: Option<Arc<Shards>>,
}

impl Ready {
    /// Binds `listen` (and the control API, if asked), after trying the
    /// upstream as `opts.upstream_check` says. Runs inside the runtime
    /// [`runtime`] built for `opts.threads`: busy-polling starts on it.
    pub async fn bind(listen: ListenAddr, opts: ServerOptions) -> Result<Ready, ServeError> {
        let probe = match (&opts.backend, opts.upstream_check) {
            (Backend::Upstream(t), check) if check != UpstreamCheck::Skip => {
                Some((t.clone(), check, opts.limits.connect_timeout))
            }
            _ => None,
        };
        if let Some((target, UpstreamCheck::Refuse, timeout)) = &probe {
            crate::backend::upstream::probe(target, *timeout)
                .await
                .map_err(|source| ServeError::Upstream {
                    target: target.to_string(),
                    source,
                })?;
        }
        let interceptor = match opts.interceptor {
            Some(i) => i,
            None => opts.rules.clone(),
        };
        let server = Server::bind(ServerConfig {
            listen: listen.clone(),
            backend: opts.backend,
            limits: opts.limits,
            interceptor,
            telemetry: opts.telemetry.clone(),
        })
        .await
        .map_err(|source| ServeError::Listen {
            addr: listen.to_string(),
            source,
        })?;
        if let (Some(mode), ListenAddr::Unix(path)) = (opts.socket_mode, &listen) {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(
                |source| ServeError::Listen {
                    addr: listen.to_string(),
                    source,
                },
            )?;
        }
        let server = match opts.write_cache {
            Some(config) => server.with_write_cache(config),
            None => server,
        };
        let shards = match opts.threads {
            0 | 1 => None,
            n => Some(Arc::new(
                Shards::start(n, opts.busy_poll).map_err(ServeError::Runtime)?,
            )),
        };
        let server = match &shards {
            Some(s) => server.with_shards(s.clone()),
            None => server,
        };
        if opts.threads >= 1 {
            // The accepting thread serves connections too (shard 0).
            crate::io::busypoll::start(opts.busy_poll);
        }
        // After the bind, so a startup error stays the only line.
        if let Some((target, UpstreamCheck::Warn, _)) = &probe
            && let Err(e) = crate::backend::upstream::look(target).await
        {
            warn!(
                "upstream {target} is not there at start: {e}; every client will fail until it \
                 is (--check-upstream connects to it and refuses to start without it)"
            );
        }
        let control = match opts.control {
            Some((addr, token)) => Some(
                Control::bind(
                    &addr,
                    ControlState {
                        rules: opts.rules.clone(),
                        registry: server.registry(),
                        telemetry: opts.telemetry.clone(),
                        token,
                    },
                )
                .await?,
            ),
            None => None,
        };
        Ok(Ready {
            uri: server.uri(),
            registry: server.registry(),
            server,
            control,
            telemetry: opts.telemetry,
            shards,
        })
    }

    /// The NBD URI clients connect to.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The control API's URL, when it has one.
    pub fn control_url(&self) -> Option<String> {
        self.control.as_ref().map(Control::url)
    }

    /// The live connections.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// Serves (and the control API) until `stop` resolves, then ends every
    /// connection, flushes the trace and closes the listeners (removing
    /// unix sockets); `stop`'s value.
    pub async fn serve_until<T>(self, stop: impl std::future::Future<Output = T>) -> T {
        // Dropped with this function: a unix control socket is removed.
        let control = self.control.map(|c| tokio::spawn(c.run()));
        let mut server = Box::pin(self.server.run());
        tokio::pin!(stop);
        let out = tokio::select! {
            r = &mut stop => r,
            // The accept loop never ends (nothing closes its slots); were
            // it to, `stop` still decides.
            () = &mut server => stop.await,
        };
        // The listener first: no client is accepted while the others end.
        drop(server);
        shut_down(&self.registry).await;
        self.telemetry.flush_trace();
        self.telemetry.finish_log_writes();
        if let Some(c) = control {
            c.abort();
            let _ = c.await;
        }
        // Joins the other threads (off this runtime's thread: a join here
        // would stall whatever else it runs).
        if let Some(shards) = self.shards {
            let _ = tokio::task::spawn_blocking(move || drop(shards)).await;
        }
        out
    }
}

/// The rules in force at startup, from `sources` (none: an empty set,
/// which costs one pointer load per event and can be filled at run time);
/// SIGHUP re-reads the files among them. A bad document is the error
/// `nbdfault check` prints first.
pub fn startup_rules(sources: &[Source], seed: Option<u64>) -> Result<LiveRules, RuleError> {
    let set = if sources.is_empty() {
        RuleSet {
            seed: seed.unwrap_or(0),
            ..RuleSet::default()
        }
    } else {
        let (set, notices) = crate::rules::load_noting(sources, seed)?;
        // A file without a final newline is accepted here: it is whole,
        // just written by its owner (JSON writers often leave the newline
        // out); only a reload, which may race a rewrite, refuses one.
        for n in notices {
            if let Notice::NoRules { .. } = n {
                warn!("{n}");
            }
        }
        set
    };
    let files = sources
        .iter()
        .filter_map(|s| match s {
            Source::File(path) => Some(path.clone()),
            Source::Text { .. } => None,
        })
        .collect();
    Ok(LiveRules::new(set, files, seed))
}

/// How often `--exit-with-parent` looks at the parent pid.
const PARENT_POLL: Duration = Duration::from_millis(100);

/// Resolves once `parent` is no longer this process's parent: it exited
/// and this process was adopted (by init or a subreaper); never with
/// `None`.
///
/// Why a poll of getppid(), not `PR_SET_PDEATHSIG`: the death signal fires
/// when the parent *thread* that forked us exits, so a harness that starts
/// the server from a worker thread (a Python thread pool, a Rust test
/// thread) would lose it while the harness still runs. A pidfd of the
/// parent would wake without polling, but needs a raw syscall (unsafe
/// code, which this crate has none of); one cheap syscall every 100 ms
/// costs nothing measurable and works on every Unix.
async fn parent_exited(parent: Option<nix::unistd::Pid>) {
    let Some(parent) = parent else {
        return std::future::pending().await;
    };
    let mut tick = tokio::time::interval(PARENT_POLL);
    loop {
        tick.tick().await;
        if nix::unistd::getppid() != parent {
            info!(target: CONTROL_LOG, "parent process {parent} exited: stopping (--exit-with-parent)");
            return;
        }
    }
}

/// The `--pidfile`, removed when dropped.
struct Pidfile(PathBuf);

impl Pidfile {
    /// Writes this process's pid and a newline to `path`, through a
    /// temporary file beside it renamed into place, so that a reader never
    /// sees it empty or half written.
    fn write(path: &std::path::Path) -> Result<Self, ServeError> {
        let err = |source| ServeError::Pidfile {
            path: path.to_path_buf(),
            source,
        };
        let name = path
            .file_name()
            .ok_or_else(|| err(std::io::Error::other("not a file name")))?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".{}.tmp", std::process::id()));
        let tmp = path.with_file_name(tmp_name);
        let written = std::fs::write(&tmp, format!("{}\n", std::process::id()))
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(err(e));
        }
        Ok(Self(path.to_path_buf()))
    }
}

impl Drop for Pidfile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Lets the process open as many descriptors as its hard limit allows. A
/// connection takes two sockets and, once it splices, a pipe per direction
/// (six descriptors), so the usual soft limit of 1,024 would run out well
/// before `--max-connections`' default of 1,024 connections. Children of
/// `--run` inherit the raised limit.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => debug!("open file limit raised from {soft} to {hard}"),
            Err(e) => debug!("open file limit stays at {soft}: {e}"),
        }
    }
}

/// Ends every connection and waits (up to a second) for each to close
/// the way a fault asked and log its end. Connections on other threads
/// would not end with this thread's runtime, only with their shards.
async fn shut_down(registry: &Registry) {
    for c in registry.list() {
        c.shut_down();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    while !registry.is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Starts the captive command with the server's address in its
/// environment, as nbdkit's `--run` does: `uri` and `nbd` (the NBD URI),
/// `port` and `unixsocket` (each empty when it does not apply).
fn captive(
    cmd: &str,
    uri: &str,
    listen: &ListenAddr,
    control: Option<String>,
) -> Result<tokio::process::Child, ServeError> {
    let (port, socket) = match listen {
        ListenAddr::Tcp { .. } => (
            uri.rsplit(':').next().unwrap_or_default().to_string(),
            String::new(),
        ),
        ListenAddr::Unix(p) => (String::new(), p.display().to_string()),
    };
    tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .env("uri", uri)
        .env("nbd", uri)
        .env("port", port)
        .env("unixsocket", socket)
        // The control API's URL (`http://HOST:PORT`, or `unix:PATH`), so
        // that CMD can find a `--control` on port 0.
        .env("control", control.unwrap_or_default())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| ServeError::Run {
            cmd: cmd.to_string(),
            source,
        })
}

/// A command's exit status as a shell reports it: its code, or 128 plus
/// the signal that killed it.
fn exit_status(s: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0))
}

/// The signals a server reacts to, installed before it announces itself.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Self, ServeError> {
        use tokio::signal::unix::{SignalKind, signal};
        let install = |k| signal(k).map_err(ServeError::Signals);
        Ok(Self {
            term: install(SignalKind::terminate())?,
            int: install(SignalKind::interrupt())?,
            hup: install(SignalKind::hangup())?,
        })
    }

    /// SIGHUP re-reads the rules files (a bad file keeps the rules in
    /// force); SIGINT or SIGTERM return.
    ///
    /// The files are read and parsed on a blocking thread: this loop runs
    /// on the thread that accepts clients and serves shard 0, which a slow
    /// parse must not stop. One reload at a time; a SIGHUP meanwhile is
    /// taken when it ends, so the last one always reads the latest files.
    async fn serve(mut self, rules: &Arc<LiveRules>) -> Result<(), ServeError> {
        let mut reloading: Option<tokio::task::JoinHandle<_>> = None;
        loop {
            tokio::select! {
                _ = self.term.recv() => return Ok(()),
                _ = self.int.recv() => return Ok(()),
                _ = self.hup.recv(), if reloading.is_none() => {
                    let rules = rules.clone();
                    reloading = Some(tokio::task::spawn_blocking(move || rules.reload()));
                }
                done = async {
                    match reloading.as_mut() {
                        Some(r) => r.await,
                        None => std::future::pending().await,
                    }
                } =>
                {
                    reloading = None;
                    match done {
                        Ok(Ok((n, notices))) => {
                            for notice in notices {
                                warn!(target: CONTROL_LOG, "SIGHUP: {notice}");
                            }
                            info!(target: CONTROL_LOG, "SIGHUP: rules reloaded, {n} rule(s) in force");
                        }
                        Ok(Err(e)) => {
                            warn!(target: CONTROL_LOG, "SIGHUP: keeping the rules in force: {e}")
                        }
                        Err(e) => {
                            warn!(target: CONTROL_LOG, "SIGHUP: keeping the rules in force: the reload failed: {e}")
                        }
                    }
                }
            }
        }
    }
}

/// An owner-only temporary directory, removed when dropped.
pub(crate) struct PrivateDir(PathBuf);

impl PrivateDir {
    /// A new private directory and a unix socket address in it.
    pub(crate) fn socket() -> Result<(ListenAddr, Self), ServeError> {
        let dir = Self::new().map_err(ServeError::PrivateDir)?;
        Ok((ListenAddr::Unix(dir.0.join("nbd.sock")), dir))
    }

    fn new() -> std::io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let base = std::env::temp_dir();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        // Several servers of one process (the Rust API) may start at once.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = base.join(format!("nbdfault-{}-{nanos}-{n}", std::process::id()));
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        Ok(Self(dir))
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
