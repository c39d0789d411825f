//! The `nbdfault` command line: parse arguments, start the library, report
//! startup errors as one line. Everything else lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser, Subcommand};

use nbdfault::backend::Backend;
use nbdfault::backend::null::{MAX_EXPORT_SIZE, NullConfig};
use nbdfault::chart;
use nbdfault::injector;
use nbdfault::io::addr::{ListenAddr, Target, parse_size};
use nbdfault::observe::log;
use nbdfault::observe::telemetry::Telemetry;
use nbdfault::observe::trace::TraceTarget;
use nbdfault::process::{ServeOptions, ServerOptions, UpstreamCheck, serve, startup_rules};
use nbdfault::rules::{self, Source};
use nbdfault::server::Limits;
use nbdfault::sweep;

/// `--version`: the crate's version and the commit it was built from
/// (build.rs; "unknown" outside a git checkout).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("NBDFAULT_GIT_COMMIT"),
    ")"
);

// The groups of `--help`, so each flag says where it belongs in one word.
const LISTENING: &str = "Listening";
const RULES: &str = "Rules and faults";
const OBSERVING: &str = "Observing and steering";
const LIMITS: &str = "Limits";
const PERFORMANCE: &str = "Performance";

/// Shown after every serving command's options.
const SERVE_EXAMPLES: &str = "\
Examples:
  nbdfault null --size 1G
  nbdfault proxy --upstream /tmp/qemu-nbd.sock --rules rules/full-disk.yaml
  nbdfault null --size 1M --run 'nbdinfo --size \"$uri\"'
  nbdfault null --listen 127.0.0.1:0 --control 127.0.0.1:10810

Rules files: the \"Rules\" section of README.md is the reference; rules/ holds ready
scenarios, each commented with a command to try it. `nbdfault check FILE|DIR` validates.";

#[derive(Parser)]
#[command(
    name = "nbdfault",
    version = VERSION,
    about = "A fault-injecting NBD proxy and null server",
    after_help = SERVE_EXAMPLES
)]
struct Cli {
    /// More logging (-v: connections, -vv: debug). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true, help_heading = OBSERVING)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Forward every client to a real NBD server.
    #[command(after_help = SERVE_EXAMPLES)]
    Proxy {
        /// HOST:PORT, a unix socket path, nbd://HOST[:PORT]/ or nbd+unix:///?socket=PATH.
        #[arg(long, value_name = "TARGET")]
        upstream: String,
        /// Refuse to start (exit 1, no listener) when the upstream cannot
        /// be connected to at start; without it, that is a warning.
        #[arg(long)]
        check_upstream: bool,
        #[command(flatten)]
        serve: ServeArgs,
    },
    /// Serve a disk that reads zeroes and discards writes.
    #[command(after_help = SERVE_EXAMPLES)]
    Null {
        /// Export size, as qemu-img takes it: bytes, or a number with one
        /// binary unit (512M, 8G, 1.5G; not 8GB).
        #[arg(long, value_name = "SIZE", default_value = "8G")]
        size: String,
        /// Oldstyle negotiation instead of fixed newstyle.
        #[arg(long)]
        oldstyle: bool,
        #[command(flatten)]
        serve: ServeArgs,
    },
    /// Run a client once per fault point of its session and report what it
    /// mishandles: nbdfault sweep [SERVER] [OPTIONS] -- CMD [ARG...]
    ///
    /// CMD runs directly (no shell, in a process group of its own) with $uri,
    /// $nbd, $unixsocket, $port and $dir (a private directory per run); use
    /// `sh -c '...'` for a command line. --server, --setup and --verify are
    /// shell command lines with the same environment. A --server that goes
    /// into the background (nbdkit without -f) escapes the run: it is
    /// detected and refused.
    Sweep(Box<SweepArgs>),
    /// Read an event trace back: nbdfault trace --summary FILE
    Trace {
        /// Per connection: messages by kind, bytes each way, faults, and
        /// how it ended.
        #[arg(long)]
        summary: bool,
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Draw a --trace file as a sequence chart: client | nbdfault | server,
    /// an arrow per message, faults in red, each connection's end.
    Chart {
        /// The JSON-lines trace of proxy, null or sweep (--trace FILE).
        #[arg(value_name = "TRACE")]
        trace: PathBuf,
        /// Only this connection [default: each in turn].
        #[arg(long, value_name = "N")]
        conn: Option<u64>,
        /// text (100 columns, for CI logs), svg or html (self-contained).
        #[arg(long, value_name = "FORMAT", default_value = "text")]
        format: String,
        /// Write here instead of stdout.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Start at this message number (the # column), or at this time
        /// since the connection's start (1.5s, 250ms, 40us).
        #[arg(long, value_name = "N|TIME")]
        from: Option<String>,
        /// End at this message number or time (included).
        #[arg(long, value_name = "N|TIME")]
        to: Option<String>,
        /// Draw every message, even in long runs of alike ones.
        #[arg(long)]
        no_collapse: bool,
    },
    /// Validate rule files without serving; exit 0 when all are good.
    Check {
        /// Rules files (YAML or QEMU injector INI), or directories: every
        /// *.yaml, *.yml and *.ini file directly in one is checked.
        #[arg(value_name = "FILE|DIR", required = true)]
        files: Vec<PathBuf>,
    },
    /// Write the man pages (nbdfault.1, nbdfault-proxy.1, ...) into DIR, or
    /// nbdfault.1 alone on stdout.
    #[command(hide = true)]
    Man {
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Print a completion script for SHELL on stdout.
    #[command(hide = true)]
    Completions {
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
    /// Behave exactly like QEMU's nbd-fault-injector.py:
    /// legacy [--classic-negotiation] HOST:PORT|UNIX-PATH CONFIG
    Legacy {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(clap::Args)]
struct SweepArgs {
    /// The built-in null server behind each run (the default).
    #[arg(long, conflicts_with_all = ["upstream", "server"])]
    null: bool,
    /// With --null: its size.
    #[arg(long, value_name = "SIZE", default_value = "1G")]
    size: String,
    /// A running server behind each run.
    #[arg(long, value_name = "TARGET", conflicts_with = "server")]
    upstream: Option<String>,
    /// A server started fresh for every run (sh -c), in the foreground,
    /// listening on the private unix socket "$unixsocket", e.g.
    /// 'qemu-nbd -f raw -k "$unixsocket" "$dir/disk.img"'.
    #[arg(long, value_name = "CMD")]
    server: Option<String>,
    /// Run before each run, e.g. 'cp base.img "$dir/disk.img"'.
    #[arg(long, value_name = "CMD")]
    setup: Option<String>,
    /// Run after each run whose client exited 0; non-zero means silent
    /// corruption.
    #[arg(long, value_name = "CMD")]
    verify: Option<String>,
    /// Fault kinds to try: disconnect, error, drop, corrupt, stall, delay,
    /// power-loss (through a volatile write cache; --verify decides).
    #[arg(
        long,
        value_name = "LIST",
        default_value = "disconnect,error,drop,corrupt"
    )]
    faults: String,
    /// With power-loss: what a crash loses. all: every write since the last
    /// flush (the disk holds a flushed state); some: a seeded random subset
    /// of them reaches the disk first, in any order (a disk's reordering).
    #[arg(long, value_name = "MODE", default_value = "all", value_parser = ["all", "some"])]
    lose: String,
    /// With --lose some: a kept write may reach the disk only in part, in
    /// sectors of this many bytes.
    #[arg(long, value_name = "BYTES", value_parser = ["512", "4096"])]
    torn: Option<String>,
    /// Event names to target [default: every event the baseline saw].
    #[arg(long, value_name = "LIST")]
    events: Option<String>,
    /// Cut each handshake message after every one of its bytes (as QEMU's
    /// iotest 083 does), not only before, in the middle and after.
    #[arg(long)]
    every_byte: bool,
    /// A run longer than this is a hang; its whole process group is killed.
    #[arg(long, value_name = "DURATION", default_value = "10s")]
    timeout: humantime::Duration,
    /// Runs in parallel [default: the number of cores].
    #[arg(long, value_name = "N")]
    jobs: Option<usize>,
    /// Sample that many runs, reproducibly for --seed, when there are more.
    #[arg(long, value_name = "N")]
    max_points: Option<usize>,
    /// Seed of the sample and of the rules' random choices.
    #[arg(long, value_name = "N", default_value_t = 1)]
    seed: u64,
    /// Write index.html, runs.json and repro/NNN.yaml (one per finding) here.
    #[arg(long, value_name = "DIR")]
    report: Option<PathBuf>,
    /// Capture every run as pcapng and keep, in DIR, the baseline's
    /// (baseline.pcapng) and each finding's (NNN.pcapng, the run's number).
    #[arg(long, value_name = "DIR")]
    pcap: Option<PathBuf>,
    /// With --pcap: keep at most BYTES of each message [default: all].
    #[arg(long, value_name = "BYTES", requires = "pcap")]
    pcap_snaplen: Option<u64>,
    /// Outcomes that make the exit status 1: ok, error, hang, crash,
    /// corrupt, unreached.
    #[arg(long, value_name = "LIST", default_value = "hang,crash,corrupt")]
    fail_on: String,
    /// The client: CMD [ARG...], after --.
    #[arg(last = true, required = true, value_name = "CMD")]
    cmd: Vec<String>,
}

/// Most connections `--max-connections` may allow: far above any file
/// limit, and below what a semaphore can count (more panicked).
const MAX_CONNECTIONS: u64 = 1_000_000;

/// Most `--threads`: each is an OS thread with its own runtime.
const MAX_THREADS: u64 = 1024;

/// What `proxy` and `null` share. Each flag names its `--help` group
/// (flattened groups set theirs with `next_help_heading`); the groups show
/// in the order they first appear here.
#[derive(clap::Args)]
struct ServeArgs {
    /// HOST:PORT, [IPV6]:PORT, a unix socket path or unix:PATH
    /// [default: 127.0.0.1:10809; with --run, a private unix socket].
    #[arg(long, value_name = "ADDR", help_heading = LISTENING)]
    listen: Option<String>,
    /// Permissions of the --listen unix socket, in octal [default: 600,
    /// owner only]; 660 lets the socket's group connect too.
    #[arg(long, value_name = "MODE", value_parser = parse_mode, help_heading = LISTENING)]
    socket_mode: Option<u32>,
    /// Captive mode: run CMD through `sh -c` with $uri, $nbd, $port,
    /// $unixsocket and $control (the --control URL) set; when it exits,
    /// stop and exit with its status.
    /// Stdout is then CMD's alone (no `Listening on` line).
    #[arg(long, value_name = "CMD", help_heading = LISTENING)]
    run: Option<String>,
    /// Print the NBD URI alone on stdout once listening (with --run,
    /// before CMD starts), instead of `Listening on URI`.
    #[arg(long, help_heading = LISTENING)]
    print_uri: bool,
    #[command(flatten)]
    rules: RuleArgs,
    /// Write one JSON line per event to FILE (`-` for stderr).
    #[arg(long, value_name = "FILE", help_heading = OBSERVING)]
    trace: Option<String>,
    /// Capture both legs of every connection (client <-> nbdfault <->
    /// server) to FILE as pcapng, for Wireshark or tshark.
    #[arg(long, value_name = "FILE", help_heading = OBSERVING)]
    pcap: Option<PathBuf>,
    /// Keep at most BYTES of each message in the capture [default: all].
    #[arg(long, value_name = "BYTES", requires = "pcap", help_heading = OBSERVING)]
    pcap_snaplen: Option<u64>,
    /// Record every write, write-zeroes, trim, flush and FUA the server
    /// completes to FILE in the dm-log-writes format (as the kernel's
    /// log-writes target and QEMU's blklogwrites), for replay-log and
    /// similar tools to rebuild the disk at any flush. A request not
    /// aligned to 512 bytes, or a write over 64M, is refused with EINVAL.
    #[arg(long, value_name = "FILE", help_heading = OBSERVING)]
    log_writes: Option<PathBuf>,
    /// Serve the HTTP control API (metrics, rules, connections) on ADDR:
    /// HOST:PORT or a unix socket path. Off unless asked for.
    #[arg(long, value_name = "ADDR", help_heading = OBSERVING)]
    control: Option<String>,
    /// Bearer token the control API requires (needed for a non-loopback
    /// --control address).
    #[arg(long, value_name = "TOKEN", requires = "control", help_heading = OBSERVING)]
    control_token: Option<String>,
    #[command(flatten)]
    limits: LimitArgs,
    /// Threads serving connections, each connection on one of them
    /// [default: proxy, one per two cores; null, one per core; at most
    /// 1024]; 0: tokio's work-stealing runtime.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(..=MAX_THREADS),
          help_heading = PERFORMANCE)]
    threads: Option<u64>,
    /// After traffic, keep each thread polling its sockets this long (like
    /// 50us) instead of sleeping: lower latency for more CPU [default: 0,
    /// off; at most 1ms; needs --threads 1 or more].
    #[arg(long, value_name = "DURATION", help_heading = PERFORMANCE)]
    busy_poll: Option<humantime::Duration>,
    /// Stop (as on SIGTERM) when the process that started nbdfault exits,
    /// as nbdkit's --exit-with-parent: a harness that dies leaves nothing
    /// running.
    #[arg(long, help_heading = LISTENING)]
    exit_with_parent: bool,
    /// Write the process id to FILE once clients can connect; removed on
    /// exit.
    #[arg(long, value_name = "FILE", help_heading = LISTENING)]
    pidfile: Option<PathBuf>,
    /// off: writes go straight through (default). volatile: nbdfault keeps
    /// a disk's volatile write cache per export, answering writes, zeroes
    /// and trims once held and writing them back at FLUSH (or FUA), so
    /// `action: power-loss` and POST /power-loss can lose exactly what the
    /// NBD spec lets a disk lose.
    #[arg(long, value_name = "MODE", default_value = "off", value_parser = ["off", "volatile"],
          help_heading = RULES)]
    write_cache: String,
    /// Write data the volatile cache holds per export, at least 64K; when
    /// full, the oldest is written back before a write is answered
    /// [default: 256M].
    #[arg(long, value_name = "SIZE", help_heading = RULES)]
    cache_size: Option<String>,
    /// background: once an eighth of --cache-size is held, the oldest
    /// writes go to the server in the background (default; what a power
    /// loss takes beyond that eighth depends on timing). when-full: only a
    /// full cache writes back early, so a loss repeats exactly at any size,
    /// slower.
    #[arg(long, value_name = "MODE", value_parser = ["background", "when-full"],
          help_heading = RULES)]
    write_back: Option<String>,
}

/// The smallest `--cache-size`: a few writes of the usual sizes.
const MIN_CACHE_SIZE: u64 = 64 << 10;

impl ServeArgs {
    /// `--write-cache`, `--cache-size` and `--write-back`: the cache, `None`
    /// if off.
    fn write_cache(&self) -> Result<Option<nbdfault::cache::CacheConfig>> {
        use nbdfault::cache::{CacheConfig, DEFAULT_CACHE_SIZE, WriteBack};
        let size = match &self.cache_size {
            Some(s) => {
                let n = parse_size(s).with_context(|| format!("--cache-size {s}"))?;
                if n < MIN_CACHE_SIZE {
                    anyhow::bail!(
                        "--cache-size {s}: must be at least 64K ({MIN_CACHE_SIZE} bytes)"
                    );
                }
                Some(n)
            }
            None => None,
        };
        let write_back = match self.write_back.as_deref() {
            Some("when-full") => WriteBack::WhenFull,
            _ => WriteBack::Background,
        };
        match (self.write_cache.as_str(), size, &self.write_back) {
            ("volatile", size, _) => Ok(Some(CacheConfig::new(
                size.unwrap_or(DEFAULT_CACHE_SIZE),
                write_back,
            ))),
            (_, Some(_), _) => anyhow::bail!("--cache-size needs --write-cache volatile"),
            (_, _, Some(_)) => anyhow::bail!("--write-back needs --write-cache volatile"),
            _ => Ok(None),
        }
    }
}

/// Limits against hostile or broken peers; each is logged when hit.
#[derive(clap::Args)]
#[command(next_help_heading = LIMITS)]
struct LimitArgs {
    /// Largest payload one request may carry or ask for (a write's payload,
    /// a read's length), 512 to 4G: the proxy answers a larger request with
    /// EINVAL itself, never forwards it, and the connection goes on
    /// [default: no limit; the server decides].
    #[arg(long, value_name = "SIZE")]
    max_payload: Option<String>,
    /// Close a client that has not finished the handshake after this long.
    #[arg(long, value_name = "DURATION", default_value = "30s")]
    handshake_timeout: humantime::Duration,
    /// Give up connecting to the upstream after this long.
    #[arg(long, value_name = "DURATION", default_value = "10s")]
    connect_timeout: humantime::Duration,
    /// Connections served at once; further clients wait to be accepted
    /// [at most 1000000].
    #[arg(long, value_name = "N", default_value_t = 1024,
          value_parser = clap::value_parser!(u64).range(..=MAX_CONNECTIONS))]
    max_connections: u64,
    /// Start listening this long after starting (the "Listening on" line
    /// comes at once): until then connecting fails, as with a server that
    /// appears after its client.
    #[arg(long, value_name = "DURATION", default_value = "0s")]
    listen_delay: humantime::Duration,
}

impl LimitArgs {
    fn limits(&self) -> Result<Limits> {
        let max_payload = self.max_payload.as_deref().map(max_payload).transpose()?;
        Ok(Limits {
            max_payload,
            handshake_timeout: self.handshake_timeout.into(),
            connect_timeout: self.connect_timeout.into(),
            max_connections: self.max_connections as usize,
            listen_delay: self.listen_delay.into(),
        })
    }
}

/// Below the 512-byte block every client may use, every read and write
/// would be refused; above 4G no compact request can reach it and no server
/// can advertise it (NBD_INFO_BLOCK_SIZE is 32 bits): leave it out instead.
const MAX_PAYLOAD_RANGE: std::ops::RangeInclusive<u64> = 512..=(4 << 30);

fn max_payload(s: &str) -> Result<u64> {
    let n = parse_size(s).context("--max-payload")?;
    if !MAX_PAYLOAD_RANGE.contains(&n) {
        anyhow::bail!(
            "--max-payload {s}: must be from 512 bytes to 4G ({} bytes); leave it out for no limit",
            MAX_PAYLOAD_RANGE.end()
        );
    }
    Ok(n)
}

#[derive(clap::Args)]
#[command(next_help_heading = RULES)]
struct RuleArgs {
    /// A rules file (YAML, or the INI of QEMU's injector); repeatable.
    #[arg(long = "rules", value_name = "FILE")]
    files: Vec<PathBuf>,
    /// Seed for probabilities and random corruption; overrides the files'.
    #[arg(long, value_name = "N")]
    seed: Option<u64>,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    // QEMU's harnesses run the injector by its own name and arguments,
    // which clap must not see.
    if let Some(argv0) = args.first()
        && injector::invoked_as_injector(argv0)
    {
        let _log = log::init(0, "error", false);
        return injector::main(argv0, &args[1..]);
    }
    if args.get(1).map(String::as_str) == Some("legacy") {
        let _log = log::init(0, "error", false);
        return injector::main("nbdfault legacy", &args[2..]);
    }
    let cli = Cli::parse();
    if let Command::Sweep(args) = cli.command {
        let _log = log::init(cli.verbose, "error", true);
        return match sweep_options(*args) {
            Ok(opts) => {
                let dir = opts.setup.dir.clone();
                let code = sweep::main(opts);
                let _ = std::fs::remove_dir_all(dir);
                ExitCode::from(code as u8)
            }
            Err(e) => {
                eprintln!("nbdfault sweep: {e:#}");
                ExitCode::from(sweep::EXIT_UNUSABLE as u8)
            }
        };
    }
    if let Command::Legacy { args } = &cli.command {
        let _log = log::init(cli.verbose, "error", false);
        return injector::main("nbdfault legacy", args);
    }
    let _log = log::init(
        cli.verbose,
        "warn,nbdfault::fault=info,nbdfault::control=info",
        true,
    );
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("nbdfault: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    // Before anything slow (rules files): the parent may exit any time.
    let parent = nix::unistd::getppid();
    let (backend, args, check_upstream) = match cli.command {
        Command::Proxy {
            upstream,
            check_upstream,
            serve,
        } => (
            Backend::Upstream(upstream.parse::<Target>().context("--upstream")?),
            serve,
            check_upstream,
        ),
        Command::Null {
            size,
            oldstyle,
            serve,
        } => (
            Backend::Null(NullConfig {
                size: export_size(&size)?,
                oldstyle,
            }),
            serve,
            false,
        ),
        Command::Check { files } => return check(&files).map(|()| ExitCode::SUCCESS),
        Command::Trace { summary, file } => return trace(summary, &file),
        Command::Chart {
            trace,
            conn,
            format,
            output,
            from,
            to,
            no_collapse,
        } => {
            let opts = chart::Options {
                conn,
                from: from.map(|f| f.parse()).transpose().context("--from")?,
                to: to.map(|t| t.parse()).transpose().context("--to")?,
                no_collapse,
            };
            let format: chart::Format = format.parse().context("--format")?;
            let input = std::fs::read_to_string(&trace)
                .with_context(|| format!("cannot read {}", trace.display()))?;
            let out = chart::render(&input, format, &opts)?;
            match output {
                Some(path) => std::fs::write(&path, out)
                    .with_context(|| format!("cannot write {}", path.display()))?,
                None => {
                    use std::io::Write as _;
                    let mut stdout = std::io::stdout().lock();
                    // A closed pipe (| head) is the reader's choice, not an error.
                    let _ = stdout
                        .write_all(out.as_bytes())
                        .and_then(|()| stdout.flush());
                }
            }
            return Ok(ExitCode::SUCCESS);
        }
        Command::Man { dir } => return man(dir).map(|()| ExitCode::SUCCESS),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "nbdfault",
                &mut std::io::stdout(),
            );
            return Ok(ExitCode::SUCCESS);
        }
        // Dispatched in main, before the runtime and logging are set up.
        Command::Legacy { .. } | Command::Sweep(_) => {
            anyhow::bail!("legacy and sweep are handled in main")
        }
    };
    let listen = match &args.listen {
        Some(l) => Some(l.parse::<ListenAddr>().context("--listen")?),
        None => None,
    };
    let socket_mode = match (args.socket_mode, &listen, &args.run) {
        (None, _, _) => None,
        (Some(m), Some(ListenAddr::Unix(_)), _) | (Some(m), None, Some(_)) => Some(m),
        (Some(_), _, _) => {
            anyhow::bail!("--socket-mode applies to a unix socket; --listen is not one")
        }
    };
    let control = match &args.control {
        Some(c) => Some((
            c.parse::<ListenAddr>().context("--control")?,
            args.control_token.clone(),
        )),
        None => None,
    };
    let threads = args.threads.map(|n| n as usize).unwrap_or_else(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        match backend {
            // A proxy's client and server run beside it and need cores
            // too: on 2 cores, one proxy thread read 6% faster than two,
            // for a quarter less CPU (see README, "Performance").
            Backend::Upstream(_) => cores.div_ceil(2),
            // The null server is the server: it works on the same threads.
            Backend::Null(_) => cores,
        }
    });
    let busy_poll = args.busy_poll.map(Duration::from).unwrap_or_default();
    if busy_poll > nbdfault::io::busypoll::MAX_WINDOW {
        anyhow::bail!("--busy-poll {busy_poll:?} is too long: at most 1ms");
    }
    if !busy_poll.is_zero() && threads == 0 {
        anyhow::bail!(
            "--busy-poll needs --threads 1 or more (it works per single-threaded runtime)"
        );
    }
    let write_cache = args.write_cache()?;
    if write_cache.is_some() && args.log_writes.is_some() {
        anyhow::bail!(
            "--log-writes records what reaches the server, and --write-cache volatile answers \
             writes in its place: use one or the other"
        );
    }
    // A bad rules file never starts a server.
    let sources: Vec<Source> = args.rules.files.into_iter().map(Source::File).collect();
    let rules = Arc::new(startup_rules(&sources, args.rules.seed)?);
    let mut telemetry = Telemetry::new(
        control.is_some(),
        args.trace.as_deref().map(TraceTarget::from_arg),
    )
    .context("--trace")?;
    if let Some(path) = &args.pcap {
        telemetry = telemetry
            .with_pcap(path, args.pcap_snaplen)
            .context("--pcap")?;
    }
    if let Some(path) = &args.log_writes {
        telemetry = telemetry
            .with_log_writes(path)
            .with_context(|| format!("--log-writes {}", path.display()))?;
    }
    let limits = args.limits.limits()?;
    let upstream_check = match (&backend, check_upstream) {
        (Backend::Null(_), _) => UpstreamCheck::Skip,
        (Backend::Upstream(_), false) => UpstreamCheck::Warn,
        (Backend::Upstream(_), true) => UpstreamCheck::Refuse,
    };
    let status = serve(ServeOptions {
        listen,
        server: ServerOptions {
            backend,
            rules,
            interceptor: None,
            telemetry: Arc::new(telemetry),
            upstream_check,
            limits,
            control,
            socket_mode,
            threads,
            busy_poll,
            write_cache,
        },
        run: args.run,
        print_uri: args.print_uri,
        exit_with_parent: args.exit_with_parent.then_some(parent),
        pidfile: args.pidfile,
    })?;
    Ok(ExitCode::from(u8::try_from(status).unwrap_or(1)))
}

/// `nbdfault trace`: reads a trace back.
fn trace(summary: bool, file: &std::path::Path) -> Result<ExitCode> {
    if !summary {
        anyhow::bail!("say what to do with the trace: --summary");
    }
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    print!("{}", nbdfault::observe::summary::summarize(&text));
    Ok(ExitCode::SUCCESS)
}

/// `--size` of a null server: qemu-img's syntax and its bound.
fn export_size(s: &str) -> Result<u64> {
    let n = parse_size(s).context("--size")?;
    if n > MAX_EXPORT_SIZE {
        anyhow::bail!("--size {s}: must be between 0 and {MAX_EXPORT_SIZE} bytes, as in qemu-img");
    }
    Ok(n)
}

/// The man pages, from the clap definitions: one per command into `dir`,
/// or the main page on stdout.
fn man(dir: Option<PathBuf>) -> Result<()> {
    let cmd = Cli::command().version(VERSION);
    match dir {
        Some(dir) => {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            clap_mangen::generate_to(cmd, &dir)
                .with_context(|| format!("cannot write man pages into {}", dir.display()))
        }
        None => clap_mangen::Man::new(cmd)
            .render(&mut std::io::stdout())
            .context("writing the man page"),
    }
}

/// The files `check` reads for one argument: the file itself, or every
/// `*.yaml`, `*.yml` and `*.ini` directly in a directory, in name order.
fn check_targets(arg: &std::path::Path) -> Result<Vec<PathBuf>, String> {
    if !arg.is_dir() {
        return Ok(vec![arg.to_path_buf()]);
    }
    let entries = std::fs::read_dir(arg)
        .map_err(|e| format!("{}: cannot read directory: {e}", arg.display()))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .is_some_and(|x| x == "yaml" || x == "yml" || x == "ini")
                && !p.is_dir()
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(format!(
            "{}: no *.yaml, *.yml or *.ini file in this directory",
            arg.display()
        ));
    }
    Ok(files)
}

/// `nbdfault check`: every file on its own (a directory: each rules file
/// in it), every error of each reported (see [`rules::check_file`]), and
/// warnings (no rules, no final newline) on stderr for files that pass.
fn check(args: &[PathBuf]) -> Result<()> {
    let (mut bad, mut total) = (0, 0);
    for arg in args {
        let files = match check_targets(arg) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("{e}");
                bad += 1;
                total += 1;
                continue;
            }
        };
        for f in files {
            total += 1;
            let checked = rules::check_file(&f);
            if checked.errors.is_empty() {
                println!("{}: ok, {} rule(s)", f.display(), checked.rules);
            } else {
                bad += 1;
            }
            for e in &checked.errors {
                eprintln!("{e}");
            }
            // Warnings only: the file is valid, or its errors said more.
            for n in &checked.notices {
                eprintln!("{n}");
            }
        }
    }
    if bad > 0 {
        anyhow::bail!("{bad} of {total} rule file(s) invalid");
    }
    Ok(())
}

/// An octal file mode for `--socket-mode`: permission bits only.
fn parse_mode(s: &str) -> Result<u32, String> {
    let m = u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .map_err(|_| format!("{s:?} is not an octal mode (like 600 or 660)"))?;
    if m > 0o777 {
        return Err(format!("{s:?} is more than permission bits (at most 777)"));
    }
    Ok(m)
}

/// Whether `cmd` names a program that can be run (a path, or a name on
/// PATH).
fn runnable(cmd: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let ok = |p: &std::path::Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if cmd.contains('/') {
        return ok(std::path::Path::new(cmd));
    }
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| ok(&d.join(cmd))))
}

fn sweep_options(a: SweepArgs) -> Result<sweep::Options> {
    let timeout = Duration::from(a.timeout);
    if timeout.is_zero() {
        anyhow::bail!("--timeout must be longer than 0 (e.g. 10s)");
    }
    if !runnable(&a.cmd[0]) {
        anyhow::bail!(
            "cannot run {:?}: no such program (the client runs without a shell; for a command \
             line, use -- sh -c '...')",
            a.cmd[0]
        );
    }
    let list = |s: &str| -> Vec<String> {
        s.split(',')
            .map(str::trim)
            .filter(|x| !x.is_empty())
            .map(String::from)
            .collect()
    };
    let mut faults = Vec::new();
    for f in list(&a.faults) {
        match sweep::plan::FAULT_KINDS.iter().find(|k| **k == f) {
            Some(k) => faults.push(*k),
            None => anyhow::bail!(
                "--faults: unknown fault kind {f:?} (kinds: {})",
                sweep::plan::FAULT_KINDS.join(", ")
            ),
        }
    }
    let mut power_loss = Vec::new();
    if a.lose != "all" || a.torn.is_some() {
        if !faults.contains(&"power-loss") {
            anyhow::bail!("--lose and --torn need --faults power-loss");
        }
        if a.lose == "all" {
            anyhow::bail!("--torn needs --lose some (with --lose all nothing reaches the disk)");
        }
        power_loss.push(format!("lose: {}", a.lose));
        power_loss.extend(a.torn.map(|t| format!("torn: {t}")));
    }
    let mut fail_on = Vec::new();
    for o in list(&a.fail_on) {
        match sweep::outcome::Outcome::from_name(&o) {
            Some(x) => fail_on.push(x),
            None => anyhow::bail!(
                "--fail-on: unknown outcome {o:?} (outcomes: ok, error, hang, crash, corrupt, \
                 unreached)"
            ),
        }
    }
    let (server, reproduce_with) = match (&a.upstream, &a.server) {
        (Some(t), _) => (
            sweep::run::ServerMode::Backend(Backend::Upstream(
                t.parse::<Target>().context("--upstream")?,
            )),
            format!("nbdfault proxy --upstream {t}"),
        ),
        (None, Some(cmd)) => (
            sweep::run::ServerMode::Command(cmd.clone()),
            "nbdfault proxy --upstream \"$unixsocket\" (with --server running on $unixsocket)"
                .to_string(),
        ),
        (None, None) => (
            sweep::run::ServerMode::Backend(Backend::Null(NullConfig {
                size: export_size(&a.size)?,
                oldstyle: false,
            })),
            format!("nbdfault null --size {}", a.size),
        ),
    };
    let jobs = a
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if jobs == 0 {
        anyhow::bail!("--jobs must be 1 or more");
    }
    if let Some(d) = &a.pcap {
        std::fs::create_dir_all(d)
            .with_context(|| format!("--pcap: cannot create {}", d.display()))?;
    }
    let dir = std::env::temp_dir().join(format!(
        "nbdfault-sweep-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos())
    ));
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    Ok(sweep::Options {
        setup: sweep::run::Setup {
            server,
            cmd: a.cmd,
            setup: a.setup,
            verify: a.verify,
            timeout,
            power_loss: faults.contains(&"power-loss"),
            dir,
            pcap: a.pcap.as_ref().map(|_| a.pcap_snaplen),
        },
        pcap: a.pcap,
        faults,
        power_loss,
        events: a.events.as_deref().map(list),
        every_byte: a.every_byte,
        jobs,
        max_points: a.max_points,
        seed: a.seed,
        report: a.report,
        fail_on,
        reproduce_with,
    })
}
