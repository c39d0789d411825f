//! The `nbdfault` command line: parse arguments, start the library, report
//! startup errors as one line. Everything else lives in the library.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use nbdfault::addr::{ListenAddr, Target, parse_size};
use nbdfault::intercept::Interceptor;
use nbdfault::legacy;
use nbdfault::null::NullConfig;
use nbdfault::pipeline::DEFAULT_MAX_PAYLOAD;
use nbdfault::rules::{self, RuleSet, live::LiveRules};
use nbdfault::server::{Backend, Server, ServerConfig};
use nbdfault::telemetry::Telemetry;

#[derive(Parser)]
#[command(
    name = "nbdfault",
    version,
    about = "A fault-injecting NBD proxy and null server"
)]
struct Cli {
    /// More logging (-v: connections, -vv: debug). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Forward every client to a real NBD server.
    Proxy {
        /// HOST:PORT, [IPV6]:PORT, a unix socket path or unix:PATH.
        #[arg(long, value_name = "ADDR", default_value = nbdfault::addr::DEFAULT_LISTEN)]
        listen: String,
        /// HOST:PORT, a unix socket path, nbd://HOST[:PORT]/ or nbd+unix:///?socket=PATH.
        #[arg(long, value_name = "TARGET")]
        upstream: String,
        #[command(flatten)]
        rules: RuleArgs,
    },
    /// Serve a disk that reads zeroes and discards writes.
    Null {
        /// HOST:PORT, [IPV6]:PORT, a unix socket path or unix:PATH.
        #[arg(long, value_name = "ADDR", default_value = nbdfault::addr::DEFAULT_LISTEN)]
        listen: String,
        /// Export size: bytes, or with a binary unit (512M, 8G, 1TiB).
        #[arg(long, value_name = "SIZE", default_value = "8G")]
        size: String,
        /// Oldstyle negotiation instead of fixed newstyle.
        #[arg(long)]
        oldstyle: bool,
        #[command(flatten)]
        rules: RuleArgs,
    },
    /// Validate rule files without serving; exit 0 when all are good.
    Check {
        #[arg(value_name = "FILE", required = true)]
        files: Vec<PathBuf>,
    },
    /// Behave exactly like QEMU's nbd-fault-injector.py:
    /// legacy [--classic-negotiation] HOST:PORT|UNIX-PATH CONFIG
    Legacy {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(clap::Args)]
struct RuleArgs {
    /// A rules file (YAML, or the INI of QEMU's injector); repeatable.
    #[arg(long = "rules", value_name = "FILE")]
    files: Vec<PathBuf>,
    /// Seed for probabilities and random corruption; overrides the files'.
    #[arg(long, value_name = "N")]
    seed: Option<u64>,
}

impl RuleArgs {
    /// The rules in force at startup (none: an empty set, which costs one
    /// pointer load per event and can be filled at run time).
    fn live(&self) -> Result<LiveRules> {
        let set = if self.files.is_empty() {
            RuleSet {
                seed: self.seed.unwrap_or(0),
                rules: Vec::new(),
            }
        } else {
            rules::load_files(&self.files, self.seed)?
        };
        Ok(LiveRules::new(set, self.files.clone(), self.seed))
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    // QEMU's harnesses run the injector by its own name and arguments,
    // which clap must not see.
    if let Some(argv0) = args.first()
        && legacy::invoked_as_injector(argv0)
    {
        init_logging(0, "error");
        return legacy::main(argv0, &args[1..]);
    }
    if args.get(1).map(String::as_str) == Some("legacy") {
        init_logging(0, "error");
        return legacy::main("nbdfault legacy", &args[2..]);
    }
    let cli = Cli::parse();
    if let Command::Legacy { args } = &cli.command {
        init_logging(cli.verbose, "error");
        return legacy::main("nbdfault legacy", args);
    }
    init_logging(
        cli.verbose,
        "warn,nbdfault::fault=info,nbdfault::control=info",
    );
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nbdfault: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(verbose: u8, quiet: &str) {
    let default = match verbose {
        0 => quiet,
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
}

fn run(cli: Cli) -> Result<()> {
    let (listen, backend, rules) = match cli.command {
        Command::Proxy {
            listen,
            upstream,
            rules,
        } => (
            listen,
            Backend::Upstream(upstream.parse::<Target>().context("--upstream")?),
            rules,
        ),
        Command::Null {
            listen,
            size,
            oldstyle,
            rules,
        } => (
            listen,
            Backend::Null(NullConfig {
                size: parse_size(&size).context("--size")?,
                oldstyle,
            }),
            rules,
        ),
        Command::Check { files } => return check(&files),
        // Dispatched in main, before the runtime and logging are set up.
        Command::Legacy { .. } => anyhow::bail!("legacy mode is handled in main"),
    };
    // A bad rules file never starts a server.
    let live = Arc::new(rules.live()?);
    let interceptor: Arc<dyn Interceptor> = live.clone();
    let listen: ListenAddr = listen.parse().context("--listen")?;
    let cfg = ServerConfig {
        listen: listen.clone(),
        backend,
        max_payload: DEFAULT_MAX_PAYLOAD,
        interceptor,
        telemetry: Arc::new(Telemetry::off()),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        let server = Server::bind(cfg)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        println!("Listening on {}", server.uri());
        std::io::stdout().flush().context("stdout")?;
        tokio::select! {
            () = server.run() => {}
            r = signals(&live) => r?,
        }
        Ok(())
    })
}

/// SIGHUP re-reads the rules files (a bad file keeps the rules in force);
/// SIGINT or SIGTERM return, which drops the server and removes a unix
/// socket file.
async fn signals(live: &LiveRules) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            _ = hup.recv() => match live.reload() {
                Ok(n) => tracing::info!(target: "nbdfault::control", "SIGHUP: rules reloaded, {n} rule(s) in force"),
                Err(e) => tracing::warn!(target: "nbdfault::control", "SIGHUP: keeping the rules in force: {e}"),
            },
        }
    }
}

/// `nbdfault check`: every file on its own, every error reported.
fn check(files: &[PathBuf]) -> Result<()> {
    let mut bad = 0;
    for f in files {
        match rules::load_files(std::slice::from_ref(f), None) {
            Ok(set) => println!("{}: ok, {} rule(s)", f.display(), set.rules.len()),
            Err(e) => {
                eprintln!("{e}");
                bad += 1;
            }
        }
    }
    if bad > 0 {
        anyhow::bail!("{bad} of {} rule file(s) invalid", files.len());
    }
    Ok(())
}
