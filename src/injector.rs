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
//! The fake disk is the null server as `null::Dialect::Injector` (its
//! handshake; the Python tool's commands in `null/injector_disk.rs`),
//! served behind the ordinary pipeline, so `when` counts exactly the bytes
//! the Python tool counts. The rules are matched by the real engine; only
//! the Python tool's choice among matching rules is kept here. Unlike the
//! Python tool, a client that drops without NBD_CMD_DISC does not end the
//! process.

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
use crate::rules::engine::Engine;
use crate::rules::{Rule, RuleSet, When, ini};

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
    let interceptor: Arc<dyn Interceptor> = Arc::new(InjectorRules::new(rules.rules));
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
                // An error (logged there) closes the connection, as the
                // Python tool's exceptions and early returns do.
                let Ok(end) = null::serve_injector(&mut far, FAKE_DISK_SIZE, classic).await else {
                    return None;
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

/// The Python tool's rules. The real engine matches them (event and
/// direction); which match wins is the Python tool's own choice, which the
/// engine's first-match-wins cannot express, so it stays here: every rule
/// naming the event (in the direction given) is looked at in order; the
/// first whose `when` is not "after" decides how many bytes pass (0 ends
/// the connection at once, naming that rule); after the bytes have passed,
/// the first matching rule of all ends the process, naming itself. So an
/// "after" rule does not hide a later rule's byte count.
struct InjectorRules {
    /// Every rule: the first that matches names the fault.
    all: Engine,
    /// The rules whose `when` is not "after": the first that matches
    /// decides where the message is cut.
    deciding: Engine,
}

impl InjectorRules {
    fn new(rules: Vec<Rule>) -> Self {
        let deciding = rules
            .iter()
            .filter(|r| r.when != When::After)
            .cloned()
            .collect();
        InjectorRules {
            all: Engine::new(RuleSet {
                seed: 0,
                rules,
                ..RuleSet::default()
            }),
            deciding: Engine::new(RuleSet {
                seed: 0,
                rules: deciding,
                ..RuleSet::default()
            }),
        }
    }
}

impl Interceptor for InjectorRules {
    fn on_event(&self, ev: &Event, state: &mut ConnState) -> Verdict {
        // Every injector rule disconnects and fires on each match, so the
        // engine's verdict is "the first rule that matches", cut at its
        // `when`.
        let Verdict::Fault(first) = self.all.on_event(ev, state) else {
            return Verdict::Pass;
        };
        let Verdict::Fault(decided) = self.deciding.on_event(ev, state) else {
            // Only "after" rules match: all of the message passes.
            return Verdict::Fault(first);
        };
        // Section names are unique in an injector config.
        let when = self
            .deciding
            .rules()
            .iter()
            .map(|l| l.rule())
            .find(|r| *r.name == *decided.rule)
            .map(|r| r.when);
        match when {
            Some(When::Before) => Verdict::Fault(decided),
            // Python's recvall of a negative size reads nothing.
            Some(When::AllBut(_)) if ev.direction == Some(Direction::ToServer) => {
                Verdict::Fault(Fault {
                    plan: Plan::Cut {
                        at: 0,
                        reset: false,
                        linger: std::time::Duration::ZERO,
                    },
                    ..first
                })
            }
            _ => Verdict::Fault(Fault {
                plan: decided.plan,
                ..first
            }),
        }
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
    use crate::protocol::transmission::ReplyMode;
    use crate::protocol::{EventKind, EventSet, MessageMeta};

    #[test]
    fn injector_names() {
        assert!(invoked_as_injector("/usr/bin/nbd-fault-injector.py"));
        assert!(invoked_as_injector("nbd-fault-injector"));
        assert!(!invoked_as_injector("/usr/bin/nbdfault"));
    }

    fn cut(conf: &str, kind: EventKind, direction: Direction, size: u64) -> Option<(String, u64)> {
        let rules = InjectorRules::new(ini::parse_ini("t.ini", conf).unwrap().rules);
        let ev = Event {
            conn: 1,
            direction: Some(direction),
            kinds: EventSet::of(kind),
            meta: MessageMeta::default(),
            size,
            mode: ReplyMode::Simple,
        };
        match rules.on_event(&ev, &mut ConnState::default()) {
            Verdict::Fault(Fault {
                rule,
                plan:
                    Plan::Cut {
                        at,
                        reset: false,
                        linger: std::time::Duration::ZERO,
                    },
                ..
            }) => Some((rule.to_string(), at)),
            Verdict::Pass => None,
            other => panic!("{other:?}"),
        }
    }

    /// The Python tool's choice among matching rules (see InjectorRules).
    #[test]
    fn python_rule_choice() {
        use Direction::{ToClient, ToServer};
        let a_after = "[inject-error a]\nevent=neg1\nwhen=after\n";
        let hit = |n: &str, at| Some((format!("inject-error {n}"), at));
        assert_eq!(cut(a_after, EventKind::Neg1, ToClient, 18), hit("a", 18));
        assert_eq!(cut(a_after, EventKind::Data, ToClient, 18), None);
        let b = |when: &str| format!("{a_after}[inject-error b]\nevent=neg1\nwhen={when}\n");
        // A later rule's byte count, under the first rule's name ...
        assert_eq!(cut(&b("8"), EventKind::Neg1, ToClient, 18), hit("a", 8));
        // ... but "before" names itself.
        assert_eq!(
            cut(&b("before"), EventKind::Neg1, ToClient, 18),
            hit("b", 0)
        );
        assert_eq!(cut(&b("-2"), EventKind::Neg1, ToClient, 18), hit("a", 16));
        // Reading a negative size reads nothing.
        let reading = "[inject-error]\nevent=data\nio=read\nwhen=-2\n";
        assert_eq!(
            cut(reading, EventKind::Data, ToServer, 100),
            Some(("inject-error".to_string(), 0))
        );
        assert_eq!(cut(reading, EventKind::Data, ToClient, 100), None);
    }
}
