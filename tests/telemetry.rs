//! Telemetry fed by the real pipeline: a server run in-process (through the
//! library, since the command line has no telemetry flags yet) with metrics
//! and a trace file, driven by a libnbd client.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use nbdfault::backend::Backend;
use nbdfault::backend::null::NullConfig;
use nbdfault::intercept::{Interceptor, PassThrough};
use nbdfault::observe::telemetry::Telemetry;
use nbdfault::server::{Limits, Server, ServerConfig};
use serde_json::Value;
use tempfile::TempDir;

/// A server on a runtime of its own with the telemetry it is given (the
/// Rust API always has metrics on); dropping it stops it.
struct InProcess {
    rt: tokio::runtime::Runtime,
    uri: String,
    telemetry: Arc<Telemetry>,
}

impl InProcess {
    fn start(backend: Backend, interceptor: Arc<dyn Interceptor>, telemetry: Telemetry) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let telemetry = Arc::new(telemetry);
        let cfg = ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            backend,
            limits: Limits::default(),
            interceptor,
            telemetry: telemetry.clone(),
        };
        let server = rt.block_on(Server::bind(cfg)).expect("bind");
        let uri = server.uri();
        rt.spawn(server.run());
        Self { rt, uri, telemetry }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        let rt = std::mem::replace(
            &mut self.rt,
            tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap(),
        );
        rt.shutdown_timeout(Duration::from_secs(5));
    }
}

fn null_backend() -> Backend {
    Backend::Null(NullConfig {
        size: 1 << 20,
        oldstyle: false,
    })
}

fn has_line(text: &str, line: &str) {
    assert!(
        text.lines().any(|l| l == line),
        "no line {line:?} in:\n{text}"
    );
}

/// The counter's value on the line starting with `prefix` (labels
/// included).
fn value(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(prefix)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {prefix:?} in:\n{text}"))
        .parse()
        .unwrap()
}

fn trace(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[test]
fn metrics_and_trace_follow_a_session() {
    let dir = TempDir::new().unwrap();
    let trace_path = dir.path().join("trace.jsonl");
    // Through the Rust API, which has metrics on.
    let p = nbdfault::Null::builder()
        .size(1 << 20)
        .listen("127.0.0.1:0")
        .rules_yaml(
            "rules:\n\
             \x20 - name: eio-writes\n\
             \x20   event: request\n\
             \x20   command: write\n\
             \x20   action: error\n\
             \x20   errno: EIO\n",
        )
        .trace(&trace_path)
        .spawn()
        .unwrap();

    let out = nbdsh(
        p.uri(),
        "buf = h.pread(4096, 8192)\n\
         print(len(buf))\n\
         try:\n\
         \x20   h.pwrite(b'x' * 512, 0)\n\
         \x20   print('written')\n\
         except nbd.Error as e:\n\
         \x20   print('refused', e.errno)\n\
         h.flush()\n\
         h.shutdown()\n",
    );
    assert_eq!(out, "4096\nrefused EIO\n");

    let m = wait_for_metric(&p, "nbdfault_connections_active 0");
    has_line(&m, "nbdfault_connections_total 1");
    has_line(&m, "nbdfault_upstream_errors_total 0");
    has_line(
        &m,
        r#"nbdfault_events_total{event="connect",direction="none"} 1"#,
    );
    has_line(
        &m,
        r#"nbdfault_events_total{event="neg1",direction="to-client"} 1"#,
    );
    has_line(
        &m,
        r#"nbdfault_faults_total{rule="eio-writes",action="error"} 1"#,
    );
    // read, write, flush and disc.
    has_line(
        &m,
        r#"nbdfault_events_total{event="request",direction="to-server"} 4"#,
    );
    let neg2 = value(
        &m,
        r#"nbdfault_events_total{event="neg2",direction="to-client"}"#,
    );
    assert!(neg2 >= 1.0, "{m}");
    let up = value(&m, r#"nbdfault_bytes_total{direction="to-server"}"#);
    let down = value(&m, r#"nbdfault_bytes_total{direction="to-client"}"#);
    assert!(up > 4.0 * 28.0, "{m}");
    assert!(down > 4096.0, "{m}");
    // The read and the flush reached the server and were answered; the
    // refused write never did.
    has_line(
        &m,
        r#"nbdfault_request_duration_seconds_count{command="read"} 1"#,
    );
    has_line(
        &m,
        r#"nbdfault_request_duration_seconds_count{command="flush"} 1"#,
    );
    has_line(
        &m,
        r#"nbdfault_request_duration_seconds_bucket{command="read",le="+Inf"} 1"#,
    );
    assert!(
        !m.contains(r#"nbdfault_request_duration_seconds_count{command="write"}"#),
        "{m}"
    );

    // Stopping writes the trace out.
    p.shutdown().unwrap();
    let lines = trace(&trace_path);
    assert_eq!(lines[0]["event"], "connect", "{lines:#?}");
    assert_eq!(lines[0]["direction"], Value::Null);
    let conn = lines[0]["conn"].clone();
    assert!(lines.iter().all(|l| l["conn"] == conn));
    let read = lines
        .iter()
        .find(|l| l["event"] == "request" && l["command"] == "read")
        .unwrap_or_else(|| panic!("no read request in {lines:#?}"));
    assert_eq!(read["direction"], "to-server");
    assert_eq!(read["offset"], 8192);
    assert_eq!(read["length"], 4096);
    assert!(read["cookie"].is_u64(), "{read}");
    let faulted: Vec<&Value> = lines
        .iter()
        .filter(|l| l["record"] == "message" && l.get("rule").is_some())
        .collect();
    assert_eq!(faulted.len(), 1, "{lines:#?}");
    assert_eq!(faulted[0]["rule"], "eio-writes");
    assert_eq!(faulted[0]["action"], "error");
    assert_eq!(faulted[0]["command"], "write");
    assert_eq!(faulted[0]["length"], 512);
    // The option negotiation is traced with option names.
    assert!(
        lines
            .iter()
            .any(|l| l["direction"] == "to-server" && l["option"] == "go"),
        "{lines:#?}"
    );
    // One line per event offered: the events counted in the metrics.
    let counted: f64 = m
        .lines()
        .filter(|l| l.starts_with("nbdfault_events_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    let named: usize = lines
        .iter()
        .filter(|l| l["record"] == "message")
        .map(|l| match &l["event"] {
            Value::Array(names) => names.len(),
            _ => 1,
        })
        .sum();
    assert_eq!(counted as usize, named, "{m}\n{lines:#?}");
}

#[test]
fn unreachable_upstream_is_counted() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let p = nbdfault::Proxy::builder()
        .upstream(format!("127.0.0.1:{port}"))
        .listen("127.0.0.1:0")
        .spawn()
        .unwrap();
    let out = nbdinfo(&[p.uri()]);
    assert!(!out.success(), "{}", out.describe());
    let m = wait_for_metric(&p, "nbdfault_upstream_errors_total 1");
    let m = if m.lines().any(|l| l == "nbdfault_connections_active 0") {
        m
    } else {
        wait_for_metric(&p, "nbdfault_connections_active 0")
    };
    has_line(&m, "nbdfault_connections_total 1");
    has_line(
        &m,
        r#"nbdfault_events_total{event="connect",direction="none"} 1"#,
    );
    has_line(&m, r#"nbdfault_bytes_total{direction="to-server"} 0"#);
}

#[test]
fn telemetry_off_costs_nothing_visible() {
    let p = InProcess::start(null_backend(), Arc::new(PassThrough), Telemetry::off());
    let out = nbdsh(&p.uri, "print(h.get_size())");
    assert_eq!(out, "1048576\n");
    assert_eq!(p.telemetry.render_metrics(), "");
}
