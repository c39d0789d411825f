//! The control API (`--control ADDR`): a small HTTP/1.1 server to look at
//! and change a running proxy — its rules, its connections, its metrics.
//!
//! JSON in and out; rule bodies are rules documents (YAML or JSON, which is
//! YAML) checked exactly like a rules file, so a bad one is refused with the
//! message `nbdfault check` prints and nothing changes. Rule changes go
//! through [`LiveRules`], so live connections see them from their next
//! event.
//!
//! Anyone who can reach the API can cut connections and inject faults, so it
//! serves only loopback and unix sockets unless a bearer token is set.
//!
//! Besides rules and connections it starts and ends outages of the
//! listener (`/outage`) and lists, waits for and resumes requests held by
//! `break` rules (`/breaks`, kept in `proxy::breaks`).

use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use thiserror::Error;
use tracing::{debug, info, warn};

pub mod guard;

use guard::{Budget, Site};

use crate::intercept::OutageMode;
use crate::io::addr::ListenAddr;
use crate::io::net::Listener;
use crate::io::percent;
use crate::observe::telemetry::Telemetry;
use crate::observe::time::Rfc3339;
use crate::protocol::consts::command_name;
use crate::proxy::Connection;
use crate::proxy::breaks::{HeldInfo, breaks};
use crate::rules;
use crate::rules::format::doc::{self, RulesDoc};
use crate::rules::live::{ChangeError, LiveRules};
use crate::server::registry::{Outage, Registry};

/// Largest request body accepted (413 beyond).
pub const MAX_BODY: usize = 1 << 20;

/// How long a client may take to send its request headers, then its body.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// The file name rules sent to the API are reported under (in error
/// messages and in each rule's `file`).
pub const BODY_FILE: &str = "request body";

const JSON: &str = "application/json";
const METRICS_TYPE: &str = "text/plain; version=0.0.4";

/// What the control API looks at and changes.
pub struct ControlState {
    pub rules: Arc<LiveRules>,
    pub registry: Arc<Registry>,
    pub telemetry: Arc<Telemetry>,
    /// Required as `Authorization: Bearer TOKEN` on every request when set.
    pub token: Option<String>,
}

#[derive(Debug, Error)]
pub enum ControlError {
    #[error(
        "control address {addr} is not a loopback address: --control-token is required to \
         serve the control API beyond this machine (or use 127.0.0.1:PORT, [::1]:PORT or a \
         unix socket)"
    )]
    TokenRequired { addr: String },
    #[error("--control-token must not be empty")]
    EmptyToken,
    #[error("cannot listen on {addr}")]
    Listen {
        addr: String,
        #[source]
        source: io::Error,
    },
}

/// A bound, not yet running control server.
pub struct Control {
    listener: Listener,
    state: Arc<ControlState>,
    site: Site,
    budget: Arc<Budget>,
}

impl Control {
    /// Binds `addr`. A TCP address that is not loopback needs a token;
    /// unix sockets are local (and created owner-only).
    pub async fn bind(addr: &ListenAddr, state: ControlState) -> Result<Control, ControlError> {
        if state.token.as_deref() == Some("") {
            return Err(ControlError::EmptyToken);
        }
        let listen_err = |source| ControlError::Listen {
            addr: addr.to_string(),
            source,
        };
        let token_required = || ControlError::TokenRequired {
            addr: addr.to_string(),
        };
        // Refuse before binding, so the message is about the token rather
        // than, say, a privileged port.
        if state.token.is_none()
            && let ListenAddr::Tcp { host, port } = addr
        {
            let first = tokio::net::lookup_host((host.as_str(), *port))
                .await
                .map_err(listen_err)?
                .next();
            if first.is_some_and(|a| !is_loopback(a)) {
                return Err(token_required());
            }
        }
        let listener = Listener::bind(addr).await.map_err(listen_err)?;
        // And check what was really bound (a name may resolve differently
        // the second time).
        if state.token.is_none()
            && let Listener::Tcp(l) = &listener
            && !l.local_addr().is_ok_and(is_loopback)
        {
            return Err(token_required());
        }
        let site = match &listener {
            Listener::Tcp(l) => Site::tcp(l.local_addr().map_err(listen_err)?),
            Listener::Unix { .. } => Site::unix(),
        };
        Ok(Control {
            listener,
            state: Arc::new(state),
            site,
            budget: Arc::default(),
        })
    }

    /// `http://127.0.0.1:PORT`, `http://[::1]:PORT` or `unix:PATH`.
    pub fn url(&self) -> String {
        match &self.listener {
            Listener::Tcp(l) => match l.local_addr() {
                Ok(SocketAddr::V4(a)) => format!("http://{}:{}", a.ip(), a.port()),
                Ok(SocketAddr::V6(a)) => format!("http://[{}]:{}", a.ip(), a.port()),
                Err(e) => format!("http://(unknown address: {e})"),
            },
            Listener::Unix { path, .. } => format!("unix:{}", path.display()),
        }
    }

    /// Serves until the future is dropped (which removes a unix socket);
    /// each connection on its own task.
    pub async fn run(self) {
        loop {
            let (stream, peer) = match self.listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    warn!("control: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Some(slot) = self.budget.connection() else {
                debug!(%peer, "control: {} connections open, refusing one", guard::MAX_CONNECTIONS);
                tokio::spawn(busy(stream));
                continue;
            };
            let state = self.state.clone();
            let site = self.site.clone();
            let budget = self.budget.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let (state, site, budget) = (state.clone(), site.clone(), budget.clone());
                    async move { Ok::<_, Infallible>(handle(&state, &site, &budget, req).await) }
                });
                let mut builder = http1::Builder::new();
                builder
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT);
                if let Err(e) = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    debug!(%peer, "control connection: {e}");
                }
                drop(slot);
            });
        }
    }
}

/// Answers a connection beyond [`guard::MAX_CONNECTIONS`] with a 503 and
/// closes it, without reading it (a peer that does not read gets nothing).
async fn busy(stream: crate::io::net::Stream) {
    use tokio::io::AsyncWriteExt;
    let body = "{\"error\": \"too many control connections at once; try again\"}\n";
    let reply = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: {JSON}\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    );
    let mut stream = stream;
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(reply.as_bytes())).await;
}

fn is_loopback(a: SocketAddr) -> bool {
    match a.ip() {
        IpAddr::V4(ip) => ip.is_loopback(),
        IpAddr::V6(ip) => {
            ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

// ---------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------

type Reply = Response<Full<Bytes>>;

async fn handle(
    state: &ControlState,
    site: &Site,
    budget: &Budget,
    req: Request<Incoming>,
) -> Reply {
    let body = (matches!(req.uri().path(), "/rules" | "/outage")
        || (req.uri().path() == "/power-loss" && has_body(&req)))
        && matches!(*req.method(), Method::POST | Method::PUT);
    if let Err(r) = site.check(req.method(), req.headers(), body) {
        info!(
            "control: refused {} {}: {}",
            req.method(),
            req.uri().path(),
            r.message
        );
        return error(r.status, &r.message);
    }
    if let Some(token) = &state.token
        && !authorized(&req, token)
    {
        let mut r = error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token (send Authorization: Bearer TOKEN)",
        );
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return r;
    }
    let path = req.uri().path().to_string();
    let Some(route) = Route::of(&path) else {
        return error(
            StatusCode::NOT_FOUND,
            &format!(
                "no such endpoint {path:?} (endpoints: /metrics, /rules, /rules/NAME, \
                 /connections, /connections/ID, /connections/ID/pause, /connections/ID/resume, \
                 /outage, /breaks, /breaks/TAG/resume, /breaks/TAG/wait, /power-loss)"
            ),
        );
    };
    let allowed = route.methods();
    if !allowed.contains(req.method()) {
        let list = allowed
            .iter()
            .map(Method::as_str)
            .collect::<Vec<_>>()
            .join(", ");
        let mut r = error(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!(
                "method {} is not allowed on {path} (allowed: {list})",
                req.method()
            ),
        );
        if let Ok(v) = HeaderValue::from_str(&list) {
            r.headers_mut().insert(header::ALLOW, v);
        }
        return r;
    }
    match route {
        Route::Metrics => text(StatusCode::OK, metrics(&state.registry, &state.telemetry)),
        Route::Rules => match *req.method() {
            Method::GET => json(StatusCode::OK, &rules_body(&state.rules)),
            ref m => {
                let replace = m == Method::PUT;
                let text = match body_text(req, budget).await {
                    Ok(t) => t,
                    Err(r) => return r,
                };
                // Off the event loop: a hostile document may take long to
                // parse, and this thread also serves NBD connections.
                let parsed =
                    tokio::task::spawn_blocking(move || rules::parse_str(BODY_FILE, &text)).await;
                match parsed {
                    Ok(Ok(set)) => change_rules(state, set, replace),
                    Ok(Err(e)) => error(StatusCode::BAD_REQUEST, &e.to_string()),
                    Err(e) => error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        &format!("parsing the rules failed: {e}"),
                    ),
                }
            }
        },
        Route::Rule(name) => {
            let name = match percent_decode(name) {
                Ok(n) => n,
                Err(msg) => return error(StatusCode::BAD_REQUEST, &msg),
            };
            if state.rules.remove(&name) {
                info!("control: removed rule {name:?}");
                empty(StatusCode::NO_CONTENT)
            } else {
                error(
                    StatusCode::NOT_FOUND,
                    &format!("no rule named {name:?} (GET /rules lists them)"),
                )
            }
        }
        Route::Connections if req.method() == Method::DELETE => {
            let n = state.registry.kill_all();
            info!("control: closed all {n} connections");
            json(StatusCode::OK, &serde_json::json!({ "closed": n }))
        }
        Route::PowerLoss => {
            let text = match body_text(req, budget).await {
                Ok(t) => t,
                Err(r) => return r,
            };
            power_loss(state, &text).await
        }
        Route::Connections => {
            // A struct, not json!(): a serde_json map would sort each
            // connection's keys, unlike POST /connections/ID/pause's.
            let connections = state.registry.list().iter().map(|c| conn_json(c)).collect();
            json(StatusCode::OK, &ConnList { connections })
        }
        Route::Outage => match *req.method() {
            Method::GET => json(
                StatusCode::OK,
                &serde_json::json!({ "outage": state.registry.outage().map(|o| outage_json(&o)) }),
            ),
            Method::DELETE => {
                if state.registry.end_outage() {
                    info!("control: ended the outage");
                    empty(StatusCode::NO_CONTENT)
                } else {
                    error(StatusCode::NOT_FOUND, "no outage is in force")
                }
            }
            _ => {
                let text = match body_text(req, budget).await {
                    Ok(t) => t,
                    Err(r) => return r,
                };
                match outage_request(&text) {
                    Ok(o) => start_outage(state, &o),
                    Err(msg) => error(StatusCode::BAD_REQUEST, &format!("{BODY_FILE}: {msg}")),
                }
            }
        },
        Route::Breaks => json(
            StatusCode::OK,
            &BreaksJson {
                breaks: breaks().list().iter().map(held_json).collect(),
            },
        ),
        Route::Break(tag, op) => {
            let tag = match percent_decode(tag) {
                Ok(t) => t,
                Err(msg) => return error(StatusCode::BAD_REQUEST, &msg),
            };
            let query = req.uri().query().unwrap_or("");
            match op {
                BreakOp::Resume => {
                    let all = match query_value(query, "all") {
                        None => false,
                        Some("1" | "true") => true,
                        Some("0" | "false") => false,
                        Some(v) => {
                            return error(
                                StatusCode::BAD_REQUEST,
                                &format!("all must be 1 or 0, found {v:?}"),
                            );
                        }
                    };
                    match breaks().resume(&tag, all) {
                        0 => error(
                            StatusCode::NOT_FOUND,
                            &format!(
                                "no request is held under tag {tag:?} (GET /breaks lists them)"
                            ),
                        ),
                        n => {
                            info!("control: resumed {n} request(s) held under tag {tag:?}");
                            json(StatusCode::OK, &serde_json::json!({ "resumed": n }))
                        }
                    }
                }
                BreakOp::Wait => {
                    let timeout = match query_value(query, "timeout") {
                        None => Duration::from_secs(5),
                        Some(t) => match wait_timeout(t) {
                            Ok(d) => d,
                            Err(msg) => return error(StatusCode::BAD_REQUEST, &msg),
                        },
                    };
                    if breaks().wait(&tag, timeout).await {
                        let held: Vec<_> = breaks()
                            .list()
                            .iter()
                            .filter(|h| *h.tag == *tag)
                            .map(held_json)
                            .collect();
                        json(StatusCode::OK, &BreaksJson { breaks: held })
                    } else {
                        error(
                            StatusCode::REQUEST_TIMEOUT,
                            &format!(
                                "no request was held under tag {tag:?} within {}",
                                humantime::format_duration(timeout)
                            ),
                        )
                    }
                }
            }
        }
        Route::Connection(id, op) => {
            let Some(conn) = id.parse().ok().and_then(|id| state.registry.get(id)) else {
                return error(
                    StatusCode::NOT_FOUND,
                    &format!("no connection {id:?} (GET /connections lists them)"),
                );
            };
            match (op, req.method()) {
                (ConnOp::Pause, _) => {
                    conn.pause();
                    info!("control: paused connection {}", conn.id);
                    json(StatusCode::OK, &conn_json(&conn))
                }
                (ConnOp::Resume, _) => {
                    conn.resume();
                    info!("control: resumed connection {}", conn.id);
                    json(StatusCode::OK, &conn_json(&conn))
                }
                (ConnOp::Itself, &Method::DELETE) => {
                    conn.kill();
                    info!("control: closed connection {}", conn.id);
                    empty(StatusCode::NO_CONTENT)
                }
                (ConnOp::Itself, _) => json(StatusCode::OK, &conn_json(&conn)),
            }
        }
    }
}

enum Route<'a> {
    Metrics,
    Rules,
    /// The still percent-encoded name.
    Rule(&'a str),
    Connections,
    PowerLoss,
    /// The id as given (404 unless it is a live connection's).
    Connection(&'a str, ConnOp),
    Outage,
    Breaks,
    /// The still percent-encoded tag.
    Break(&'a str, BreakOp),
}

#[derive(Clone, Copy)]
enum BreakOp {
    Resume,
    Wait,
}

#[derive(Clone, Copy)]
enum ConnOp {
    Itself,
    Pause,
    Resume,
}

impl<'a> Route<'a> {
    fn of(path: &'a str) -> Option<Route<'a>> {
        match path {
            "/metrics" => return Some(Route::Metrics),
            "/rules" => return Some(Route::Rules),
            "/connections" => return Some(Route::Connections),
            "/outage" => return Some(Route::Outage),
            "/breaks" => return Some(Route::Breaks),
            "/power-loss" => return Some(Route::PowerLoss),
            _ => {}
        }
        if let Some(rest) = path.strip_prefix("/breaks/") {
            return match rest.rsplit_once('/') {
                Some((tag, "resume")) if !tag.is_empty() => {
                    Some(Route::Break(tag, BreakOp::Resume))
                }
                Some((tag, "wait")) if !tag.is_empty() => Some(Route::Break(tag, BreakOp::Wait)),
                _ => None,
            };
        }
        if let Some(name) = path.strip_prefix("/rules/") {
            return Some(Route::Rule(name));
        }
        let rest = path.strip_prefix("/connections/")?;
        let (id, op) = match rest.split_once('/') {
            None => (rest, ConnOp::Itself),
            Some((id, "pause")) => (id, ConnOp::Pause),
            Some((id, "resume")) => (id, ConnOp::Resume),
            Some(_) => return None,
        };
        Some(Route::Connection(id, op))
    }

    fn methods(&self) -> &'static [Method] {
        match self {
            Route::Metrics | Route::Breaks => &[Method::GET],
            Route::Connections => &[Method::GET, Method::DELETE],
            Route::Outage => &[Method::GET, Method::POST, Method::DELETE],
            Route::Break(_, BreakOp::Resume) => &[Method::POST],
            Route::Break(_, BreakOp::Wait) => &[Method::GET],
            Route::Rules => &[Method::GET, Method::POST, Method::PUT],
            Route::PowerLoss => &[Method::POST],
            Route::Rule(_) => &[Method::DELETE],
            Route::Connection(_, ConnOp::Itself) => &[Method::GET, Method::DELETE],
            Route::Connection(_, _) => &[Method::POST],
        }
    }
}

/// Whether the request carries `Authorization: Bearer TOKEN` (the scheme
/// in any case), compared in constant time.
fn authorized(req: &Request<Incoming>, token: &str) -> bool {
    let Some(value) = req.headers().get(header::AUTHORIZATION) else {
        return false;
    };
    let value = value.as_bytes();
    let Some((scheme, given)) = value.split_at_checked(7) else {
        return false;
    };
    scheme.eq_ignore_ascii_case(b"bearer ") && constant_time_eq(given, token.as_bytes())
}

/// Equality whose time depends only on the lengths, not on where the
/// first difference is.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= std::hint::black_box(x ^ y);
    }
    diff == 0
}

/// The body as text, at most [`MAX_BODY`] bytes.
async fn body_text(req: Request<Incoming>, budget: &Budget) -> Result<String, Reply> {
    let too_big = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("request body is larger than {} bytes (1 MiB)", MAX_BODY),
        )
    };
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(too_big());
    }
    // Held until the body is parsed and dropped.
    let room = announced.map_or(MAX_BODY, |n| n as usize);
    let Some(_room) = budget.body(room) else {
        return Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!(
                "too many request bodies are being received at once ({} MiB in all); try again",
                guard::MAX_BUFFERED >> 20
            ),
        ));
    };
    let collect = Limited::new(req.into_body(), MAX_BODY).collect();
    let bytes = match tokio::time::timeout(BODY_TIMEOUT, collect).await {
        Err(_) => {
            return Err(error(
                StatusCode::REQUEST_TIMEOUT,
                "the request body did not arrive in time",
            ));
        }
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => return Err(too_big()),
        Ok(Err(e)) => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                &format!("reading the request body: {e}"),
            ));
        }
        Ok(Ok(c)) => c.to_bytes(),
    };
    String::from_utf8(bytes.to_vec()).map_err(|_| {
        error(
            StatusCode::BAD_REQUEST,
            "the request body is not UTF-8 text",
        )
    })
}

/// POST (add) or PUT (replace) a rules document.
fn change_rules(state: &ControlState, set: rules::RuleSet, replace: bool) -> Reply {
    let names = set
        .rules
        .iter()
        .map(|r| format!("{:?}", r.name))
        .collect::<Vec<_>>()
        .join(", ");
    if replace {
        state.rules.replace(set);
        info!("control: replaced all rules with [{names}]");
        json(StatusCode::OK, &rules_body(&state.rules))
    } else {
        match state.rules.add(set) {
            Ok(()) => {
                info!("control: added rules [{names}]");
                json(StatusCode::CREATED, &rules_body(&state.rules))
            }
            Err(e @ ChangeError::Duplicate(_)) => error(StatusCode::CONFLICT, &e.to_string()),
        }
    }
}

/// What `POST /outage` asks for.
#[derive(Debug, Clone, PartialEq)]
struct OutageRequest {
    mode: OutageMode,
    duration: Option<Duration>,
    kill: bool,
}

/// Reads a `POST /outage` body: `{"duration": "1s", "mode": "refuse" |
/// "blackhole", "reset": false, "kill": false}`, each optional (the
/// default: refuse until `DELETE /outage`).
fn outage_request(text: &str) -> Result<OutageRequest, String> {
    const KEYS: &str = "keys: duration, mode, reset, kill";
    let v: serde_json::Value = if text.trim().is_empty() {
        serde_json::Value::Object(Default::default())
    } else {
        serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?
    };
    let serde_json::Value::Object(map) = v else {
        return Err(format!("an outage is a JSON object ({KEYS}), found {v}"));
    };
    if let Some(k) = map
        .keys()
        .find(|k| !matches!(k.as_str(), "duration" | "mode" | "reset" | "kill"))
    {
        return Err(format!("unknown key {k:?} ({KEYS})"));
    }
    let flag = |key: &str| match map.get(key) {
        None => Ok(false),
        Some(serde_json::Value::Bool(b)) => Ok(*b),
        Some(v) => Err(format!("{key} must be true or false, found {v}")),
    };
    let reset = flag("reset")?;
    let mode = match map.get("mode").map(|m| m.as_str().ok_or(m)) {
        None | Some(Ok("refuse")) => OutageMode::Refuse { reset },
        Some(Ok("blackhole")) if !reset => OutageMode::Blackhole,
        Some(Ok("blackhole")) => {
            return Err("reset applies only to mode refuse (a blackhole closes nothing)".into());
        }
        Some(Ok(m)) => return Err(format!("mode must be refuse or blackhole, found {m:?}")),
        Some(Err(m)) => return Err(format!("mode must be refuse or blackhole, found {m}")),
    };
    let duration = match map.get("duration") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(d)) => {
            let parsed = humantime::parse_duration(d.trim()).map_err(|e| {
                format!("invalid duration {d:?}: {e} (a number with a unit, e.g. 200ms, 1s)")
            })?;
            if parsed > rules::fields::MAX_DURATION {
                return Err(format!("duration must be at most 24h (1 day), found {d:?}"));
            }
            Some(parsed)
        }
        Some(v) => {
            return Err(format!(
                "duration must be a string such as \"1s\" (or null: until DELETE /outage), found {v}"
            ));
        }
    };
    Ok(OutageRequest {
        mode,
        duration,
        kill: flag("kill")?,
    })
}

fn start_outage(state: &ControlState, o: &OutageRequest) -> Reply {
    state
        .registry
        .start_outage(o.mode, o.duration, "POST /outage");
    let killed = if o.kill { state.registry.kill_all() } else { 0 };
    let until = o.duration.map_or("until DELETE /outage".to_string(), |d| {
        format!("for {}", humantime::format_duration(d))
    });
    info!("control: outage started {until}, {killed} connection(s) closed");
    let mut body = state
        .registry
        .outage()
        .map_or(serde_json::Value::Null, |o| outage_json(&o));
    if let serde_json::Value::Object(m) = &mut body {
        m.insert("closed".into(), killed.into());
    }
    json(StatusCode::OK, &body)
}

/// An outage in `GET /outage` and `POST /outage`.
#[derive(Serialize)]
struct OutageJson {
    mode: &'static str,
    reset: bool,
    by: String,
    /// `null`: until `DELETE /outage`.
    remaining: Option<String>,
}

fn outage_json(o: &Outage) -> serde_json::Value {
    let (mode, reset) = match o.mode {
        OutageMode::Refuse { reset } => ("refuse", reset),
        OutageMode::Blackhole => ("blackhole", false),
    };
    // Whole milliseconds: the nanoseconds would only be noise.
    let remaining = o.until.map(|u| {
        let left = u.saturating_duration_since(tokio::time::Instant::now());
        humantime::format_duration(Duration::from_millis(left.as_millis() as u64)).to_string()
    });
    serde_json::to_value(OutageJson {
        mode,
        reset,
        by: o.by.clone(),
        remaining,
    })
    .unwrap_or_default()
}

/// `GET /breaks` and `GET /breaks/TAG/wait`: held requests, oldest first.
#[derive(Serialize)]
struct BreaksJson {
    breaks: Vec<HeldJson>,
}

/// A held request in `GET /breaks`, its fields in this order.
#[derive(Serialize)]
struct HeldJson {
    tag: String,
    connection: u64,
    event: &'static str,
    command: Option<String>,
    cookie: Option<u64>,
    offset: Option<u64>,
    length: Option<u64>,
    bytes: u64,
    since: String,
}

fn held_json(h: &HeldInfo) -> HeldJson {
    HeldJson {
        tag: h.tag.to_string(),
        connection: h.conn,
        event: "request",
        command: h
            .meta
            .command
            .map(|c| command_name(c).map_or(c.to_string(), str::to_string)),
        cookie: h.meta.cookie,
        offset: h.meta.offset,
        length: h.meta.length,
        bytes: h.bytes,
        since: Rfc3339(h.since).to_string(),
    }
}

/// The value of `key` in a query string (`a=1&b=2`), as written.
fn query_value<'q>(query: &'q str, key: &str) -> Option<&'q str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

/// `?timeout=` of `/breaks/TAG/wait`: a duration up to an hour.
fn wait_timeout(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text)
        .map_err(|e| format!("invalid timeout {text:?}: {e} (e.g. timeout=5s)"))?;
    if d > Duration::from_secs(3600) {
        return Err(format!("timeout must be at most 1h, found {text:?}"));
    }
    Ok(d)
}

/// `GET /metrics` (and the Rust API's `metrics()`): the telemetry's, then
/// the outages' and breaks' counts, then the write cache's.
pub fn metrics(registry: &Registry, telemetry: &Telemetry) -> String {
    let mut text = telemetry.render_metrics();
    let (refused, blackholed) = registry.outage_counts();
    let b = breaks().counts();
    for (name, kind, help, value) in [
        (
            "nbdfault_outage_refused_total",
            "counter",
            "Connections refused by outages.",
            refused,
        ),
        (
            "nbdfault_outage_blackholed_total",
            "counter",
            "Connections held unanswered by outages.",
            blackholed,
        ),
        (
            "nbdfault_breaks_held",
            "gauge",
            "Requests held by break rules now.",
            b.held,
        ),
        (
            "nbdfault_breaks_resumed_total",
            "counter",
            "Held requests resumed.",
            b.resumed,
        ),
        (
            "nbdfault_breaks_abandoned_total",
            "counter",
            "Held requests released because their connection ended.",
            b.abandoned,
        ),
        (
            "nbdfault_breaks_refused_total",
            "counter",
            "Requests passed on unheld: over the break size limits.",
            b.refused,
        ),
    ] {
        text.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        ));
    }
    if let Some(c) = registry.write_cache() {
        text.push_str(&c.render_metrics());
    }
    text
}

/// `/rules/NAME` with `%XX` escapes decoded (by the one strict decoder the
/// `socket=` path of a URI uses too).
/// Whether a request says it carries a body.
fn has_body(req: &Request<Incoming>) -> bool {
    let h = req.headers();
    h.contains_key(header::TRANSFER_ENCODING)
        || h.get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() != "0")
}

/// `POST /power-loss`: the body's mode (JSON or YAML, all optional:
/// `lose`, `torn`, `seed`, as the `power-loss` action spells them; the seed
/// defaults to the rules' seed), carried out on every export.
async fn power_loss(state: &ControlState, text: &str) -> Reply {
    #[derive(serde::Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    struct Body {
        lose: Option<String>,
        torn: Option<i64>,
        seed: Option<u64>,
    }
    let body = if text.trim().is_empty() {
        Body::default()
    } else {
        match serde_yaml::from_str::<Body>(text) {
            Ok(b) => b,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    &format!("power-loss body: {e} (fields: lose, torn, seed)"),
                );
            }
        }
    };
    let mode =
        match rules::actions::power_loss::mode(body.lose.as_deref(), body.torn.map(i128::from)) {
            Ok(m) => m.with_seed(body.seed.unwrap_or_else(|| state.rules.current().seed())),
            Err((_, msg)) => return error(StatusCode::BAD_REQUEST, &msg),
        };
    let Some(cache) = state.registry.write_cache() else {
        return error(
            StatusCode::CONFLICT,
            "POST /power-loss needs --write-cache volatile: without it nothing is cached to lose",
        );
    };
    let loss = cache.power_loss(mode).await;
    info!(
        "control: power loss: {} cached writes ({} bytes) lost, {} pieces kept, {} connections reset",
        loss.writes, loss.bytes, loss.kept, loss.connections
    );
    json(
        StatusCode::OK,
        &serde_json::json!({
            "lost_writes": loss.writes,
            "lost_bytes": loss.bytes,
            "kept": loss.kept,
            "connections_reset": loss.connections,
        }),
    )
}

fn percent_decode(s: &str) -> Result<String, String> {
    let out =
        percent::decode(s).ok_or_else(|| format!("invalid percent-encoding in rule name {s:?}"))?;
    String::from_utf8(out).map_err(|_| format!("rule name {s:?} is not UTF-8 once decoded"))
}

// ---------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------

fn respond(status: StatusCode, content_type: &'static str, body: Bytes) -> Reply {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Reply {
    let mut text = serde_json::to_string_pretty(value).expect("JSON of plain data");
    text.push('\n');
    respond(status, JSON, Bytes::from(text))
}

fn error(status: StatusCode, message: &str) -> Reply {
    json(status, &serde_json::json!({ "error": message }))
}

fn text(status: StatusCode, body: String) -> Reply {
    respond(status, METRICS_TYPE, Bytes::from(body))
}

fn empty(status: StatusCode) -> Reply {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = status;
    r
}

// ---------------------------------------------------------------------------
// JSON of rules and connections
// ---------------------------------------------------------------------------

/// `GET /rules`: the listing is built in `rules::format::doc`.
fn rules_body(live: &LiveRules) -> RulesDoc {
    doc::rules(&live.current())
}

#[derive(Serialize)]
struct ConnList {
    connections: Vec<ConnJson>,
}

#[derive(Serialize)]
struct ConnJson {
    id: u64,
    client: String,
    export: Option<String>,
    started: String,
    bytes_to_server: u64,
    bytes_to_client: u64,
    requests_in_flight: usize,
    paused: bool,
}

fn conn_json(c: &Connection) -> ConnJson {
    let info = c.info();
    ConnJson {
        id: info.id,
        client: info.peer,
        export: info.export,
        started: Rfc3339(info.started).to_string(),
        bytes_to_server: info.bytes_to_server,
        bytes_to_client: info.bytes_to_client,
        requests_in_flight: info.requests_in_flight,
        paused: info.paused,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn constant_time_equality() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b").unwrap(), "a b");
        assert_eq!(
            percent_decode("inject-error%20%22x%22").unwrap(),
            "inject-error \"x\""
        );
        assert_eq!(percent_decode("caf%C3%A9").unwrap(), "café");
        assert!(percent_decode("a%2").is_err());
        assert!(percent_decode("a%zz").is_err());
        assert!(percent_decode("%FF").is_err());
        assert!(percent_decode("%+1").is_err());
    }

    #[test]
    fn routes() {
        assert!(matches!(
            Route::of("/rules/a%20b"),
            Some(Route::Rule("a%20b"))
        ));
        assert!(matches!(
            Route::of("/connections/7/pause"),
            Some(Route::Connection("7", ConnOp::Pause))
        ));
        assert!(matches!(
            Route::of("/connections/x"),
            Some(Route::Connection("x", ConnOp::Itself))
        ));
        assert!(Route::of("/connections/7/stop").is_none());
        assert!(Route::of("/").is_none());
        assert!(Route::of("/rules/").is_some());
    }

    #[test]
    fn rules_json_spelling() {
        let text = "seed: 3\nrules:\n  - name: r\n    event: [request, reply]\n    \
                    command: [read, write]\n    offset: 1MiB..\n    action: error\n    \
                    errno: EIO\n    times: 2\n  - event: data\n    action: corrupt\n    \
                    bits: 3\n    per-connection: true\n  - event: reply\n    action: stall\n  \
                    - event: request\n    action: delay\n    duration: 200ms\n    when: 4\n";
        let live = LiveRules::new(rules::parse_str("t.yaml", text).unwrap(), vec![], None);
        let v = serde_json::to_value(rules_body(&live)).unwrap();
        assert_eq!(v["seed"], 3);
        let r = &v["rules"][0];
        assert_eq!(r["name"], "r");
        assert_eq!(r["file"], "t.yaml");
        assert_eq!(r["line"], 3);
        assert_eq!(r["event"], serde_json::json!(["request", "reply"]));
        assert_eq!(r["direction"], "both");
        assert_eq!(r["command"], serde_json::json!(["read", "write"]));
        assert_eq!(
            r["offset"],
            serde_json::json!({"start": 1 << 20, "end": null})
        );
        assert_eq!(r["option"], Value::Null);
        assert_eq!(r["when"], "before");
        assert_eq!(r["times"], 2);
        assert_eq!(r["errno"], "EIO");
        assert_eq!(r["action"], "error");
        assert!(r.get("duration").is_none());
        let r = &v["rules"][1];
        assert_eq!(r["name"], "rule-2");
        assert_eq!(r["bits"], 3);
        assert_eq!(r["per-connection"], true);
        assert_eq!(r["times"], Value::Null);
        let r = &v["rules"][2];
        assert_eq!(r["duration"], Value::Null);
        assert!(r.as_object().unwrap().contains_key("duration"));
        let r = &v["rules"][3];
        assert_eq!(r["duration"], "200ms");
        assert_eq!(r["jitter"], "0s");
        assert_eq!(r["when"], 4);
        assert_eq!(r["direction"], "both");
    }

    /// The injector's `when` below -1 (all but N bytes) is shown as the INI
    /// writes it; -1 is "after".
    #[test]
    fn injector_when_spelling() {
        let text = "[inject-error \"a\"]\nevent=neg1\nwhen=-2\n[inject-error \"b\"]\nevent=neg1\nwhen=-1\n";
        let live = LiveRules::new(rules::parse_str("t.ini", text).unwrap(), vec![], None);
        let v = serde_json::to_value(rules_body(&live)).unwrap();
        assert_eq!(v["rules"][0]["when"], -2);
        assert_eq!(v["rules"][1]["when"], "after");
    }
}
