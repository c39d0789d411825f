//! Drop-in replacement for QEMU's tests/qemu-iotests/nbd-fault-injector.py.
//!
//! `nbdfault legacy [--classic-negotiation] HOST:PORT|UNIX-PATH CONFIG`, or
//! the binary started under a name beginning with `nbd-fault-injector`,
//! behaves like the Python tool so that QEMU's tests run unchanged: the same
//! arguments and usage message, the same INI and its error messages, the
//! same lines on stdout, the same bytes on the wire (non-fixed newstyle with
//! handshake flags 0, an 8 GiB export, transmission flags 0, the 124 zero
//! bytes, simple replies; oldstyle with `--classic-negotiation`), one client
//! at a time, and a rule match ends the process with status 0.
//!
//! The fake disk is served behind the ordinary pipeline and rule engine, so
//! `when` counts exactly the bytes the Python tool counts. Unlike the Python
//! tool, a client that drops without NBD_CMD_DISC does not end the process.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use tracing::debug;

use crate::backend::null;
use crate::intercept::{ConnState, Event, Fault, Interceptor, Plan, Verdict};
use crate::io::addr::ListenAddr;
use crate::io::net::{Listener, Stream};
use crate::observe::telemetry::Telemetry;
use crate::protocol::event::Direction;
use crate::proxy::{self, Connection, DEFAULT_MAX_PAYLOAD, FLOW_BUFFER, RESET_CLIENT};
use crate::rules::{Rule, When, ini};

/// The Python tool's fake disk size.
pub const FAKE_DISK_SIZE: u64 = 8 << 30;

/// Whether the binary was started under the injector's name.
pub fn invoked_as_injector(argv0: &str) -> bool {
    Path::new(argv0)
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("nbd-fault-injector"))
}

fn usage(prog: &str) -> ExitCode {
    eprintln!("usage: {prog} [--classic-negotiation] <tcp-port>|<unix-path> <config-file>");
    eprintln!("Run an fault injector NBD server with rules defined in a config file.");
    ExitCode::from(1)
}

/// Runs the injector. `prog` is what the usage message calls it; `args`
/// are the arguments after it.
pub fn main(prog: &str, args: &[String]) -> ExitCode {
    let (classic, addr, config) = match args {
        [flag, addr, config] if flag == "--classic-negotiation" => (true, addr, config),
        // The Python tool takes the flag, then finds no address: it fails.
        [flag, _] if flag == "--classic-negotiation" => return usage(prog),
        [addr, config] => (false, addr, config),
        _ => return usage(prog),
    };
    let listen = if let Some((host, port)) = addr.split_once(':') {
        let Ok(port) = port.parse::<u16>() else {
            eprintln!("invalid port in {addr:?}");
            return ExitCode::from(1);
        };
        let host = if host.is_empty() { "0.0.0.0" } else { host };
        ListenAddr::Tcp {
            host: host.to_string(),
            port,
        }
    } else {
        ListenAddr::Unix(addr.into())
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    rt.block_on(run(listen, addr, config, classic))
}

async fn run(listen: ListenAddr, shown: &str, config: &str, classic: bool) -> ExitCode {
    let listener = match Listener::bind(&listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cannot listen on {shown}: {e}");
            return ExitCode::from(1);
        }
    };
    // Like the Python tool: TCP shows the bound address with the real port,
    // a unix socket its path as given.
    let shown = match &listener {
        Listener::Tcp(l) => match l.local_addr() {
            Ok(a) => format!("{}:{}", a.ip(), a.port()),
            Err(_) => shown.to_string(),
        },
        Listener::Unix { .. } => shown.to_string(),
    };
    println!("Listening on {shown}");
    let _ = std::io::stdout().flush();
    // The Python tool reads its config after it starts listening.
    let text = match std::fs::read_to_string(config) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("cannot read {config}: {e}");
            return ExitCode::from(1);
        }
    };
    let rules = match ini::parse_ini(config, &text) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{}", e.message);
            return ExitCode::from(1);
        }
    };
    let interceptor: Arc<dyn Interceptor> = Arc::new(InjectorRules(rules.rules));
    let telemetry = Arc::new(Telemetry::off());
    let mut id = 0;
    loop {
        let (client, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                debug!("accept failed: {e}");
                continue;
            }
        };
        id += 1;
        let conn = Connection::new(
            id,
            peer,
            DEFAULT_MAX_PAYLOAD,
            interceptor.clone(),
            telemetry.clone(),
        );
        // One client at a time, as the Python tool serves them.
        let (near, far) = crate::io::mempipe::pair(FLOW_BUFFER);
        let server = {
            let conn = conn.clone();
            tokio::spawn(async move {
                let mut far = far;
                let end = match null::serve_injector(&mut far, FAKE_DISK_SIZE, classic).await {
                    Ok(end) => end,
                    Err(e) => {
                        debug!("fake disk: {e}");
                        return None;
                    }
                };
                if let Some(command) = end.unrecognized {
                    println!("unrecognized command type {command:#x}");
                    let _ = std::io::stdout().flush();
                }
                if end.unread {
                    // The Python tool closes with client bytes unread: its
                    // kernel resets the connection, with no orderly end of
                    // stream first. Close at once, with SO_LINGER 0, and
                    // keep our end open until then so that no end of
                    // stream reaches the client before the reset.
                    conn.reset_on_close(RESET_CLIENT);
                    conn.kill();
                    return Some(far);
                }
                None
            })
        };
        let pipe = tokio::spawn(proxy::run(
            conn.clone(),
            client.into_split(),
            Stream::Mem(near).into_split(),
            // The Python tool waits for a slow client forever.
            None,
        ));
        // When the fake server is done with a client (NBD_CMD_DISC, an
        // unknown command), the Python tool closes that socket and accepts
        // the next client at once: once what the server sent has reached
        // the client, close the connection whatever the client does.
        let held = server.await.ok().flatten();
        if held.is_none() {
            conn.ended().await;
            conn.kill();
        }
        match pipe.await {
            Ok(result) => proxy::log_outcome(&conn, &result),
            Err(e) => debug!("connection task: {e}"),
        }
        drop(held);
    }
}

/// The Python tool's rules, matched the way it matches them: every rule
/// naming the event (in the direction given) is looked at in order; the
/// first whose `when` is not "after" decides how many bytes pass (0 ends
/// the connection at once, naming that rule); after the bytes have passed,
/// the first matching rule of all ends the process, naming itself. So an
/// "after" rule does not hide a later rule's byte count.
struct InjectorRules(Vec<Rule>);

impl Interceptor for InjectorRules {
    fn on_event(&self, ev: &Event, _state: &mut ConnState) -> Verdict {
        let mut matching = self.0.iter().filter(|r| {
            r.filter.events.iter().any(|k| ev.kinds.contains(k))
                && (r.filter.direction.is_none() || r.filter.direction == ev.direction)
        });
        let Some(first) = matching.next() else {
            return Verdict::Pass;
        };
        let decides = std::iter::once(first)
            .chain(matching)
            .find(|r| r.when != When::After);
        let (name, at) = match decides {
            Some(r) if r.when == When::Before => (&r.name, 0),
            // Python's recvall of a negative size reads nothing.
            Some(r)
                if matches!(r.when, When::AllBut(_))
                    && ev.direction == Some(Direction::ToServer) =>
            {
                (&first.name, 0)
            }
            Some(r) => (&first.name, r.when.bytes(ev.size)),
            None => (&first.name, ev.size),
        };
        Verdict::Fault(Fault {
            rule: Arc::from(name.as_str()),
            action: "disconnect",
            plan: Plan::Cut { at, reset: false },
        })
    }

    fn after_cut(&self, fault: &Fault) {
        println!("Closing connection on rule match {}", fault.rule);
        let _ = std::io::stdout().flush();
        std::process::exit(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn injector_names() {
        assert!(invoked_as_injector("/usr/bin/nbd-fault-injector.py"));
        assert!(invoked_as_injector("nbd-fault-injector"));
        assert!(!invoked_as_injector("/usr/bin/nbdfault"));
    }
}
