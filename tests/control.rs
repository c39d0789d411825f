//! The control API, end to end: a null server and its control server run
//! in the test's runtime, real clients (qemu-io, curl) drive them as
//! subprocesses.

mod common;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tempfile::TempDir;

use nbdfault::backend::Backend;
use nbdfault::backend::null::NullConfig;
use nbdfault::control::{Control, ControlError, ControlState};
use nbdfault::io::addr::ListenAddr;
use nbdfault::observe::telemetry::Telemetry;
use nbdfault::rules::{self, live::LiveRules};
use nbdfault::server::{Limits, Server, ServerConfig};

const TIMEOUT: Duration = Duration::from_secs(20);

const INITIAL: &str = "\
seed: 7
rules:
  - name: slow-flush
    event: reply
    command: flush
    action: delay
    duration: 200ms
";

/// A null server with live rules and its control server, both running on
/// the test's runtime.
struct Fixture {
    nbd_uri: String,
    control_url: String,
    /// `--unix-socket` for curl when the control server is on one.
    control_socket: Option<PathBuf>,
    token: Option<String>,
    rules: Arc<LiveRules>,
    dir: TempDir,
}

async fn start(control: &str, token: Option<&str>) -> Fixture {
    common::require_tool("curl");
    common::require_tool("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let control = control.replace("DIR", &dir.path().display().to_string());
    let rules = Arc::new(LiveRules::new(
        rules::parse_str("initial.yaml", INITIAL).unwrap(),
        vec![],
        None,
    ));
    let telemetry = Arc::new(Telemetry::off());
    let server = Server::bind(ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        backend: Backend::Null(NullConfig {
            size: 64 << 20,
            oldstyle: false,
        }),
        limits: Limits::default(),
        interceptor: rules.clone(),
        telemetry: telemetry.clone(),
    })
    .await
    .unwrap();
    let addr: ListenAddr = control.parse().unwrap();
    let ctl = Control::bind(
        &addr,
        ControlState {
            rules: rules.clone(),
            registry: server.registry(),
            telemetry,
            token: token.map(str::to_string),
        },
    )
    .await
    .unwrap();
    let url = ctl.url();
    let (control_url, control_socket) = match url.strip_prefix("unix:") {
        Some(path) => ("http://localhost".to_string(), Some(PathBuf::from(path))),
        None => (url, None),
    };
    let nbd_uri = server.uri();
    tokio::spawn(server.run());
    tokio::spawn(ctl.run());
    Fixture {
        nbd_uri,
        control_url,
        control_socket,
        token: token.map(str::to_string),
        rules,
        dir,
    }
}

/// One HTTP exchange as curl saw it.
#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "{self:?}"
        );
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {self:?}"))
    }

    fn error(&self) -> String {
        self.json()["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error message: {self:?}"))
            .to_string()
    }
}

/// What a request carries besides its method and path.
#[derive(Default)]
struct Opts<'a> {
    /// (content type, body)
    body: Option<(&'a str, &'a [u8])>,
    /// `Authorization` value; `None`: the fixture's token, if any.
    auth: Option<&'a str>,
    chunked: bool,
    /// More `Name: value` headers, as a browser would add them.
    headers: &'a [&'a str],
}

impl Fixture {
    fn request(&self, method: &str, path: &str, opts: Opts) -> Resp {
        let url = format!("{}{path}", self.control_url);
        let mut args: Vec<String> = vec![
            "-sS".into(),
            "-i".into(),
            "--max-time".into(),
            "20".into(),
            "-X".into(),
            method.into(),
        ];
        if let Some(sock) = &self.control_socket {
            args.push("--unix-socket".into());
            args.push(sock.display().to_string());
        }
        let auth = match (opts.auth, &self.token) {
            (Some(a), _) => Some(a.to_string()),
            (None, Some(t)) => Some(format!("Bearer {t}")),
            (None, None) => None,
        };
        if let Some(a) = auth {
            args.push("-H".into());
            args.push(format!("Authorization: {a}"));
        }
        if let Some((ctype, body)) = opts.body {
            let file = self.dir.path().join("body");
            std::fs::write(&file, body).unwrap();
            args.push("-H".into());
            args.push(format!("Content-Type: {ctype}"));
            args.push("--data-binary".into());
            args.push(format!("@{}", file.display()));
        }
        if opts.chunked {
            args.push("-H".into());
            args.push("Transfer-Encoding: chunked".into());
        }
        for h in opts.headers {
            args.push("-H".into());
            args.push(h.to_string());
        }
        args.push(url);
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = common::run("curl", &argv);
        assert!(out.success(), "{}", out.describe());
        parse_response(&out.stdout).unwrap_or_else(|| panic!("{}", out.describe()))
    }

    fn get(&self, path: &str) -> Resp {
        self.request("GET", path, Opts::default())
    }

    fn send(&self, method: &str, path: &str, ctype: &str, body: &str) -> Resp {
        self.request(
            method,
            path,
            Opts {
                body: Some((ctype, body.as_bytes())),
                ..Opts::default()
            },
        )
    }

    fn rule_names(&self) -> Vec<String> {
        let r = self.get("/rules");
        assert_eq!(r.status, 200, "{r:?}");
        r.json()["rules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap().to_string())
            .collect()
    }

    /// The id of the only live connection.
    fn only_connection(&self) -> Value {
        let mut last = Value::Null;
        let found = common::wait_until(TIMEOUT, || {
            last = self.get("/connections").json();
            last["connections"].as_array().unwrap().len() == 1
        });
        assert!(found, "expected one connection: {last}");
        last["connections"][0].clone()
    }

    fn qemu_io(&self) -> Interactive {
        let args = common::QemuIo::new(&self.nbd_uri).args();
        let mut s = Interactive::spawn("qemu-io", &common::as_strs(&args));
        s.expect("qemu-io> ");
        s
    }
}

/// Status, headers and body of curl's `-i` output (skipping any
/// `100 Continue`).
fn parse_response(out: &str) -> Option<Resp> {
    let mut rest = out;
    loop {
        let (head, body) = rest.split_once("\r\n\r\n")?;
        let mut lines = head.lines();
        let status: u16 = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
        if (100..200).contains(&status) {
            rest = body;
            continue;
        }
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
            .collect();
        return Some(Resp {
            status,
            headers,
            body: body.to_string(),
        });
    }
}

/// A client driven through its stdin, its output (stdout and stderr)
/// gathered as it comes.
struct Interactive {
    child: Child,
    stdin: Option<ChildStdin>,
    out: Arc<Mutex<String>>,
    /// Output before this was already matched.
    cursor: usize,
}

impl Interactive {
    fn spawn(cmd: &str, args: &[&str]) -> Interactive {
        let mut child = common::spawn_piped(cmd, args, Stdio::piped());
        let out = Arc::new(Mutex::new(String::new()));
        let pump = |mut r: Box<dyn Read + Send>| {
            let out = out.clone();
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = r.read(&mut buf) {
                    out.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        };
        pump(Box::new(child.stdout.take().unwrap()));
        pump(Box::new(child.stderr.take().unwrap()));
        Interactive {
            stdin: child.stdin.take(),
            child,
            out,
            cursor: 0,
        }
    }

    /// Runs one qemu-io command; returns its output, up to the next prompt.
    fn cmd(&mut self, line: &str) -> String {
        self.send(line);
        self.expect("qemu-io> ")
    }

    /// Runs a command that must succeed, printing `needle`.
    fn ok(&mut self, line: &str, needle: &str) {
        let out = self.cmd(line);
        assert!(
            out.contains(needle) && !out.contains("failed"),
            "{line}: {out}"
        );
    }

    fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    fn unmatched(&self) -> String {
        self.out.lock().unwrap()[self.cursor..].to_string()
    }

    fn all(&self) -> String {
        self.out.lock().unwrap().clone()
    }

    /// Waits for `needle` in the output after the last match; returns
    /// the output up to and including it.
    fn expect(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            {
                let out = self.out.lock().unwrap();
                if let Some(i) = out[self.cursor..].find(needle) {
                    let end = self.cursor + i + needle.len();
                    let seen = out[self.cursor..end].to_string();
                    self.cursor = end;
                    return seen;
                }
            }
            if Instant::now() >= deadline {
                panic!("no {needle:?} within {TIMEOUT:?}; output:\n{}", self.all());
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Interactive {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const READ_OK: &str = "read 4096/4096 bytes at offset 0";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_rules_and_connections_are_listed() {
    let fx = start("127.0.0.1:0", None).await;
    assert!(
        fx.control_url.starts_with("http://127.0.0.1:"),
        "{}",
        fx.control_url
    );

    let m = fx.get("/metrics");
    assert_eq!(m.status, 200, "{m:?}");
    assert_eq!(m.header("content-type"), Some("text/plain; version=0.0.4"));

    let r = fx.get("/rules");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.json(),
        json!({
            "seed": 7,
            "rules": [{
                "name": "slow-flush", "file": "initial.yaml", "line": 3,
                "event": ["reply"], "direction": "both", "command": ["flush"],
                "offset": null, "option": null, "when": "before", "after": 0,
                "times": null, "every": 1, "probability": 1.0, "per-connection": false,
                "action": "delay", "duration": "200ms", "jitter": "0s",
                "matched": 0, "fired": 0,
            }],
        })
    );

    let c = fx.get("/connections");
    assert_eq!(c.status, 200);
    assert_eq!(c.json(), json!({ "connections": [] }));

    let mut q = fx.qemu_io();
    q.ok("read 0 4096", READ_OK);
    q.ok("flush", "");
    let conn = fx.only_connection();
    let id = conn["id"].as_u64().unwrap();
    assert!(
        conn["client"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{conn}"
    );
    // qemu-io asks for the default export, "". The pipeline only catches
    // a name that arrives in the same read as its option header, so it
    // may not be known.
    assert!(conn["export"] == "" || conn["export"].is_null(), "{conn}");
    let started = conn["started"].as_str().unwrap();
    assert_eq!(
        started.len(),
        "2024-01-02T03:04:05.123456Z".len(),
        "{started}"
    );
    assert!(
        started.ends_with('Z') && started.as_bytes()[10] == b'T',
        "{started}"
    );
    assert!(conn["bytes_to_server"].as_u64().unwrap() > 28, "{conn}");
    assert!(conn["bytes_to_client"].as_u64().unwrap() >= 4096, "{conn}");
    assert_eq!(conn["requests_in_flight"], 0);
    assert_eq!(conn["paused"], false);

    // The flush reply went through the delay rule.
    let rule = &fx.get("/rules").json()["rules"][0];
    assert!(rule["fired"].as_u64().unwrap() >= 1, "{rule}");
    assert_eq!(rule["matched"], rule["fired"]);

    let one = fx.get(&format!("/connections/{id}"));
    assert_eq!(one.status, 200);
    assert_eq!(one.json()["id"], id);

    // Unknown things are 404, wrong methods 405 with Allow.
    for path in [
        "/",
        "/nope",
        "/connections/999",
        "/connections/abc",
        "/connections/999/pause",
        &format!("/connections/{id}/stop"),
    ] {
        let method = if path.ends_with("pause") {
            "POST"
        } else {
            "GET"
        };
        let r = fx.request(method, path, Opts::default());
        assert_eq!(r.status, 404, "{path}: {r:?}");
        assert!(!r.error().is_empty());
    }
    for (method, path, allow) in [
        ("POST", "/metrics", "GET"),
        ("DELETE", "/rules", "GET, POST, PUT"),
        ("GET", "/rules/slow-flush", "DELETE"),
        ("PUT", "/connections", "GET, DELETE"),
        ("POST", "/connections/1", "GET, DELETE"),
        ("GET", "/connections/1/pause", "POST"),
        ("DELETE", "/connections/1/resume", "POST"),
    ] {
        let r = fx.request(method, path, Opts::default());
        assert_eq!(r.status, 405, "{method} {path}: {r:?}");
        assert_eq!(r.header("allow"), Some(allow), "{method} {path}");
        assert!(r.error().contains(method), "{r:?}");
    }
    q.send("quit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_added_live_fires_and_goes_when_deleted() {
    let fx = start("127.0.0.1:0", None).await;
    let mut q = fx.qemu_io();
    q.ok("read 0 4096", READ_OK);

    // JSON body, a name that needs percent-encoding in the URL.
    let body = r#"{"rules": [{"name": "eio on reads", "event": "request",
        "command": "read", "action": "error", "errno": "EIO"}]}"#;
    let r = fx.send("POST", "/rules", "application/json", body);
    assert_eq!(r.status, 201, "{r:?}");
    let v = r.json();
    assert_eq!(v["seed"], 7, "POST keeps the seed in force");
    let added = &v["rules"][1];
    assert_eq!(added["name"], "eio on reads");
    assert_eq!(added["file"], "request body");
    assert_eq!(added["line"], 1);
    assert_eq!(added["errno"], "EIO");
    assert_eq!(added["command"], json!(["read"]));
    assert_eq!(fx.rule_names(), ["slow-flush", "eio on reads"]);

    // The live connection sees it from its next request.
    let seen = q.cmd("read 0 4096");
    assert!(seen.contains("Input/output error"), "{seen}");
    q.ok("write 0 4096", "wrote 4096/4096 bytes at offset 0");
    let rule = fx.get("/rules").json()["rules"][1].clone();
    assert_eq!(
        (rule["matched"].as_u64(), rule["fired"].as_u64()),
        (Some(1), Some(1))
    );

    let r = fx.request("DELETE", "/rules/eio%20on%20reads", Opts::default());
    assert_eq!(r.status, 204, "{r:?}");
    assert!(r.body.is_empty());
    assert_eq!(fx.rule_names(), ["slow-flush"]);
    q.ok("read 0 4096", READ_OK);

    let r = fx.request("DELETE", "/rules/eio%20on%20reads", Opts::default());
    assert_eq!(r.status, 404, "{r:?}");
    assert!(r.error().contains("eio on reads"), "{r:?}");
    let r = fx.request("DELETE", "/rules/bad%zzescape", Opts::default());
    assert_eq!(r.status, 400, "{r:?}");
    q.send("quit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_replaces_every_rule_and_the_seed() {
    let fx = start("127.0.0.1:0", None).await;
    let yaml = "seed: 42\nrules:\n  - name: stall-reads\n    event: reply\n    command: read\n    \
                action: stall\n  - event: data\n    direction: to-client\n    action: corrupt\n    \
                at: 3\n    xor: 0x0f\n    offset: 1MiB..2MiB\n";
    let r = fx.send("PUT", "/rules", "application/yaml", yaml);
    assert_eq!(r.status, 200, "{r:?}");
    let v = r.json();
    assert_eq!(v["seed"], 42);
    assert_eq!(v["rules"].as_array().unwrap().len(), 2);
    assert_eq!(v["rules"][0]["duration"], Value::Null);
    let c = &v["rules"][1];
    assert_eq!(c["name"], "rule-2");
    assert_eq!(c["direction"], "to-client");
    assert_eq!((c["at"].as_u64(), c["xor"].as_u64()), (Some(3), Some(15)));
    assert_eq!(c["offset"], json!({"start": 1 << 20, "end": 2 << 20}));
    assert_eq!(fx.get("/rules").json(), v);
    assert_eq!(fx.rules.current().seed(), 42);

    // text/yaml is YAML too; an empty document clears everything.
    let r = fx.send("PUT", "/rules", "text/yaml", "rules: []\n");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json(), json!({"rules": [], "seed": 0}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_rule_body_is_refused_with_the_check_message() {
    let fx = start("127.0.0.1:0", None).await;
    let before = fx.get("/rules").json();
    let bad = "rules:\n  - name: typo\n    event: requset\n    action: drop\n";
    let expected = rules::parse_str("request body", bad)
        .unwrap_err()
        .to_string();
    assert!(expected.starts_with("request body:3:"), "{expected}");
    for method in ["POST", "PUT"] {
        let r = fx.send(method, "/rules", "application/yaml", bad);
        assert_eq!(r.status, 400, "{r:?}");
        assert_eq!(r.error(), expected);
    }
    // Bad JSON is reported the same way, with its position.
    let r = fx.send(
        "POST",
        "/rules",
        "application/json",
        "{\"rules\": [\n  {\"event\": 3}\n]}",
    );
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.error().starts_with("request body:2:"), "{r:?}");
    // Not text.
    let r = fx.request(
        "POST",
        "/rules",
        Opts {
            body: Some(("application/yaml", b"rules: [\xff]\n")),
            ..Opts::default()
        },
    );
    assert_eq!(r.status, 400, "{r:?}");
    // Too big, announced or not.
    let big = format!("# {}\nrules: []\n", "x".repeat(1 << 20));
    let r = fx.send("PUT", "/rules", "application/yaml", &big);
    assert_eq!(r.status, 413, "{r:?}");
    let r = fx.request(
        "PUT",
        "/rules",
        Opts {
            body: Some(("application/yaml", big.as_bytes())),
            chunked: true,
            ..Opts::default()
        },
    );
    assert_eq!(r.status, 413, "{r:?}");
    assert_eq!(fx.get("/rules").json(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_name_is_a_conflict() {
    let fx = start("127.0.0.1:0", None).await;
    let dup = "rules:\n  - name: fresh\n    event: request\n  - name: slow-flush\n    \
               event: request\n";
    let r = fx.send("POST", "/rules", "application/yaml", dup);
    assert_eq!(r.status, 409, "{r:?}");
    assert_eq!(r.error(), "a rule named \"slow-flush\" already exists");
    assert_eq!(fx.rule_names(), ["slow-flush"], "nothing was added");
    let r = fx.send(
        "POST",
        "/rules",
        "application/yaml",
        "rules:\n  - name: fresh\n    event: request\n",
    );
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(fx.rule_names(), ["slow-flush", "fresh"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_holds_a_read_until_resume() {
    let fx = start("127.0.0.1:0", None).await;
    let mut q = fx.qemu_io();
    let id = fx.only_connection()["id"].as_u64().unwrap();

    let r = fx.request("POST", &format!("/connections/{id}/pause"), Opts::default());
    assert_eq!(r.status, 200, "{r:?}");
    let v = r.json();
    assert_eq!(
        (v["id"].as_u64(), v["paused"].as_bool()),
        (Some(id), Some(true))
    );

    q.send("read 0 4096");
    thread::sleep(Duration::from_secs(1));
    assert!(q.is_running());
    assert!(!q.unmatched().contains("read 4096"), "{}", q.all());
    assert_eq!(
        fx.get("/connections").json()["connections"][0]["paused"],
        true
    );

    let r = fx.request(
        "POST",
        &format!("/connections/{id}/resume"),
        Opts::default(),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["paused"], false);
    let seen = q.expect("qemu-io> ");
    assert!(seen.contains(READ_OK), "{seen}");

    let r = fx.request("POST", "/connections/12345/pause", Opts::default());
    assert_eq!(r.status, 404, "{r:?}");
    q.send("quit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_connection_cuts_it() {
    let fx = start("127.0.0.1:0", None).await;
    let mut q = fx.qemu_io();
    q.ok("read 0 4096", READ_OK);
    let id = fx.only_connection()["id"].as_u64().unwrap();

    let r = fx.request("DELETE", &format!("/connections/{id}"), Opts::default());
    assert_eq!(r.status, 204, "{r:?}");
    assert!(common::wait_until(TIMEOUT, || {
        fx.get("/connections").json()["connections"]
            .as_array()
            .unwrap()
            .is_empty()
    }));
    let seen = q.cmd("read 0 4096");
    assert!(seen.contains("read failed"), "{seen}");

    let r = fx.request("DELETE", &format!("/connections/{id}"), Opts::default());
    assert_eq!(r.status, 404, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_is_checked_on_every_request() {
    let fx = start("127.0.0.1:0", Some("s3cret-token")).await;
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("Bearer s3cret-toke"),
        Some("s3cret-token"),
    ] {
        let r = fx.request(
            "GET",
            "/rules",
            Opts {
                // A header without a value makes curl send none at all.
                auth: Some(auth.unwrap_or("")),
                ..Opts::default()
            },
        );
        assert_eq!(r.status, 401, "{auth:?}: {r:?}");
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        assert!(r.error().contains("token"), "{r:?}");
    }
    // Before anything else, even a 404.
    let r = fx.request(
        "GET",
        "/nope",
        Opts {
            auth: Some(""),
            ..Opts::default()
        },
    );
    assert_eq!(r.status, 401, "{r:?}");

    assert_eq!(fx.get("/rules").status, 200);
    let r = fx.request(
        "GET",
        "/connections",
        Opts {
            auth: Some("bearer s3cret-token"),
            ..Opts::default()
        },
    );
    assert_eq!(r.status, 200, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binding_beyond_loopback_needs_a_token() {
    let state = |token: Option<&str>| ControlState {
        rules: Arc::new(LiveRules::new(
            rules::parse_str("t", "").unwrap(),
            vec![],
            None,
        )),
        registry: Default::default(),
        telemetry: Arc::new(Telemetry::off()),
        token: token.map(str::to_string),
    };
    let any: ListenAddr = "0.0.0.0:0".parse().unwrap();
    let Err(e) = Control::bind(&any, state(None)).await else {
        panic!("bound 0.0.0.0 without a token");
    };
    assert!(matches!(e, ControlError::TokenRequired { .. }), "{e:?}");
    assert!(e.to_string().contains("--control-token is required"), "{e}");
    let Err(e) = Control::bind(&any, state(Some(""))).await else {
        panic!("bound with an empty token");
    };
    assert!(matches!(e, ControlError::EmptyToken), "{e:?}");
    let c = Control::bind(&any, state(Some("t"))).await.unwrap();
    assert!(c.url().starts_with("http://0.0.0.0:"), "{}", c.url());
    for local in ["127.0.0.1:0", "localhost:0", "[::1]:0"] {
        let addr: ListenAddr = local.parse().unwrap();
        match Control::bind(&addr, state(None)).await {
            Ok(_) => {}
            // A machine without IPv6 cannot bind ::1 at all.
            Err(ControlError::Listen { .. }) if local.starts_with('[') => {}
            Err(e) => panic!("{local}: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unix_socket_is_local() {
    let fx = start("DIR/control.sock", None).await;
    let sock = fx.control_socket.clone().unwrap();
    assert!(sock.starts_with(fx.dir.path()), "{}", sock.display());
    let r = fx.get("/rules");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(fx.rule_names(), ["slow-flush"]);
}

/// What a web page can make the developer's browser send to a loopback
/// API without asking first, each refused, and nothing changes. (curl sends
/// exactly the headers a browser adds for such a page.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_web_page_can_send_is_refused() {
    let fx = start("127.0.0.1:0", None).await;
    let before = fx.get("/rules").json();
    let evil = "rules:\n  - name: corrupt-every-write\n    event: data\n    direction: to-server\n    \
                action: corrupt\n";
    // fetch(..., {method: "POST", mode: "no-cors", body}) from another page.
    let r = fx.request(
        "POST",
        "/rules",
        Opts {
            body: Some(("text/plain;charset=UTF-8", evil.as_bytes())),
            headers: &["Origin: http://evil.example", "Sec-Fetch-Site: cross-site"],
            ..Opts::default()
        },
    );
    assert_eq!(r.status, 403, "{r:?}");
    assert!(
        r.error()
            .contains("a cross-site request from a web page is refused"),
        "{r:?}"
    );
    // An older browser without Sec-Fetch-*: the Origin alone is enough.
    let r = fx.request(
        "POST",
        "/rules",
        Opts {
            body: Some(("text/plain", evil.as_bytes())),
            headers: &["Origin: http://evil.example"],
            ..Opts::default()
        },
    );
    assert_eq!(r.status, 403, "{r:?}");
    assert!(
        r.error().contains("\"http://evil.example\" are refused"),
        "{r:?}"
    );
    // Another port of localhost is the same site, not the same origin.
    let r = fx.request(
        "PUT",
        "/rules",
        Opts {
            body: Some(("application/yaml", evil.as_bytes())),
            headers: &["Sec-Fetch-Site: same-site"],
            ..Opts::default()
        },
    );
    assert_eq!(r.status, 403, "{r:?}");
    // A form post's body type, even without any browser header.
    let r = fx.send("POST", "/rules", "application/x-www-form-urlencoded", evil);
    assert_eq!(r.status, 415, "{r:?}");
    assert!(
        r.error()
            .contains("a rules document needs Content-Type application/json"),
        "{r:?}"
    );
    // DNS rebinding: a page on evil.example resolving to 127.0.0.1 reads.
    let port = fx.control_url.rsplit(':').next().unwrap();
    let host = format!("Host: evil.example:{port}");
    for path in ["/rules", "/metrics", "/connections"] {
        let r = fx.request(
            "GET",
            path,
            Opts {
                headers: &[&host],
                ..Opts::default()
            },
        );
        assert_eq!(r.status, 403, "{path}: {r:?}");
        assert!(
            r.error().contains("does not name this control API"),
            "{r:?}"
        );
    }
    // Pausing a connection by guessing its id.
    let mut q = fx.qemu_io();
    let id = fx.only_connection()["id"].as_u64().unwrap();
    let r = fx.request(
        "POST",
        &format!("/connections/{id}/pause"),
        Opts {
            headers: &["Origin: http://evil.example"],
            ..Opts::default()
        },
    );
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(fx.only_connection()["paused"], false);
    q.send("read 0 4k");
    q.expect("read 4096/4096 bytes");
    assert_eq!(fx.get("/rules").json(), before, "nothing changed");
    // The address itself, and localhost, are this API.
    let r = fx.request(
        "GET",
        "/rules",
        Opts {
            headers: &[&format!("Host: localhost:{port}")],
            ..Opts::default()
        },
    );
    assert_eq!(r.status, 200, "{r:?}");
}

/// Connections and buffered bodies are bounded over all callers: past the
/// bounds a caller is told to come back, and the API serves again once
/// they are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_connections_and_bodies_are_bounded_in_all() {
    use nbdfault::control::guard::{MAX_BUFFERED, MAX_CONNECTIONS};
    let fx = start("127.0.0.1:0", None).await;
    let addr = fx.control_url.trim_start_matches("http://").to_string();
    // Bodies announced at just under 1 MiB each, sent in part and held.
    let mut held = Vec::new();
    for _ in 0..MAX_BUFFERED >> 20 {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        write!(
            s,
            "PUT /rules HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/yaml\r\n\
             Content-Length: {}\r\n\r\n# partial",
            (1 << 20) - 1
        )
        .unwrap();
        held.push(s);
    }
    // Give the server time to reserve room for each.
    let full = common::wait_until(TIMEOUT, || {
        fx.send("PUT", "/rules", "application/yaml", "rules: []\n")
            .status
            == 503
    });
    assert!(full, "the body budget never ran out");
    let r = fx.send("PUT", "/rules", "application/yaml", "rules: []\n");
    assert!(r.error().contains("too many request bodies"), "{r:?}");
    drop(held);
    let freed = common::wait_until(TIMEOUT, || {
        fx.send("POST", "/rules", "application/yaml", "rules: []\n")
            .status
            == 201
    });
    assert!(freed, "the budget did not come back");
    // Idle connections up to the limit; the next one is answered 503.
    let idle: Vec<_> = (0..MAX_CONNECTIONS)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    let busy = common::wait_until(TIMEOUT, || fx.get("/metrics").status == 503);
    assert!(busy, "connections were not bounded");
    let r = fx.get("/metrics");
    assert!(r.error().contains("too many control connections"), "{r:?}");
    drop(idle);
    assert!(common::wait_until(TIMEOUT, || fx.get("/metrics").status == 200));
}
