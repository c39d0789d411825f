//! The `nbdfault` command line: parse arguments, start the library, report
//! startup errors as one line. Everything else lives in the library.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use nbdfault::addr::{ListenAddr, Target, parse_size};
use nbdfault::intercept::PassThrough;
use nbdfault::null::NullConfig;
use nbdfault::pipeline::DEFAULT_MAX_PAYLOAD;
use nbdfault::server::{Backend, Server, ServerConfig};

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
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nbdfault: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
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
    let (listen, backend) = match cli.command {
        Command::Proxy { listen, upstream } => (
            listen,
            Backend::Upstream(upstream.parse::<Target>().context("--upstream")?),
        ),
        Command::Null {
            listen,
            size,
            oldstyle,
        } => (
            listen,
            Backend::Null(NullConfig {
                size: parse_size(&size).context("--size")?,
                oldstyle,
            }),
        ),
    };
    let listen: ListenAddr = listen.parse().context("--listen")?;
    let cfg = ServerConfig {
        listen: listen.clone(),
        backend,
        max_payload: DEFAULT_MAX_PAYLOAD,
        interceptor: Arc::new(PassThrough),
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
            r = shutdown_signal() => r?,
        }
        Ok(())
    })
}

/// SIGINT or SIGTERM: return, which drops the server and removes a unix
/// socket file.
async fn shutdown_signal() -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
