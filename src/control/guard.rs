//! Who may talk to the control API, and how much of it at once.
//!
//! Without a token the API trusts whoever can reach it: local users, over
//! loopback or a unix socket. A web page in the developer's browser can
//! reach loopback too, so what a browser sends on a page's behalf is
//! refused:
//! - a `Host` that is not the bound address (DNS rebinding: a page on
//!   `evil.example` that resolves to 127.0.0.1 would otherwise read
//!   `/rules` and `/metrics`);
//! - an `Origin` that is not the API itself, and `Sec-Fetch-Site` other than
//!   `same-origin` or `none` (a form post or a `no-cors` fetch from any
//!   page, which no browser preflights);
//! - a body that is not JSON or YAML by its `Content-Type`: a page can send
//!   `text/plain` or a form cross-site without asking, but not those.
//!
//! curl and scripts send no `Origin` or `Sec-Fetch-*` headers and name the
//! address they connect to, so they are unaffected.
//!
//! The limits bound what all callers together can make the process hold:
//! connections served at once, and request-body bytes buffered at once.

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::header::{self, HeaderMap};
use hyper::{Method, StatusCode};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Control connections served at once; more are answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 64;

/// Request-body bytes buffered at once, over all connections.
pub const MAX_BUFFERED: usize = 8 << 20;

/// Body types a rules document may be sent as.
const BODY_TYPES: &[&str] = &[
    "application/json",
    "application/yaml",
    "application/x-yaml",
    "text/yaml",
    "text/x-yaml",
];

/// A refused request: its status and why.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub message: String,
}

fn refuse(status: StatusCode, message: String) -> Refusal {
    Refusal { status, message }
}

/// Where the API is bound, as a browser would name it.
#[derive(Debug, Clone)]
pub struct Site {
    /// `Host` values that name this API (`127.0.0.1:PORT`, `localhost:PORT`);
    /// empty on a unix socket, which no web page can reach, so any `Host`
    /// does (curl sends `localhost`).
    hosts: Vec<String>,
}

impl Site {
    /// The API bound at `addr` (TCP).
    pub fn tcp(addr: SocketAddr) -> Site {
        let port = addr.port();
        let ip = match addr {
            SocketAddr::V4(a) => a.ip().to_string(),
            SocketAddr::V6(a) => format!("[{}]", a.ip()),
        };
        Site {
            hosts: vec![format!("{ip}:{port}"), format!("localhost:{port}")],
        }
    }

    /// The API on a unix socket.
    pub fn unix() -> Site {
        Site { hosts: Vec::new() }
    }

    /// Refuses what a web page could have made a browser send. `body` says
    /// whether the request carries a rules document.
    pub fn check(&self, method: &Method, headers: &HeaderMap, body: bool) -> Result<(), Refusal> {
        let get = |name: header::HeaderName| {
            headers
                .get(name)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).trim().to_string())
        };
        let listed = || self.hosts.join(" or ");
        if !self.hosts.is_empty()
            && let Some(host) = get(header::HOST)
            && !self.hosts.iter().any(|h| h.eq_ignore_ascii_case(&host))
        {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                format!(
                    "Host {host:?} does not name this control API (use {}): refused, as a web \
                     page reaching it through DNS rebinding would send it",
                    listed()
                ),
            ));
        }
        if let Some(site) = get(header::HeaderName::from_static("sec-fetch-site"))
            && !matches!(site.as_str(), "same-origin" | "none")
        {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                format!(
                    "a {site} request from a web page is refused (Sec-Fetch-Site: {site}); \
                     the control API is for local tools such as curl"
                ),
            ));
        }
        if let Some(origin) = get(header::ORIGIN) {
            let own = self
                .hosts
                .iter()
                .any(|h| origin.eq_ignore_ascii_case(&format!("http://{h}")));
            if !own {
                return Err(refuse(
                    StatusCode::FORBIDDEN,
                    format!(
                        "requests from the web page at {origin:?} are refused; the control \
                         API is for local tools such as curl"
                    ),
                ));
            }
        }
        if body && matches!(*method, Method::POST | Method::PUT) {
            let ctype = get(header::CONTENT_TYPE).unwrap_or_default();
            let essence = ctype.split(';').next().unwrap_or("").trim();
            if !BODY_TYPES.iter().any(|t| t.eq_ignore_ascii_case(essence)) {
                let found = if ctype.is_empty() {
                    "none".to_string()
                } else {
                    format!("{ctype:?}")
                };
                return Err(refuse(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    format!(
                        "a rules document needs Content-Type {} (found {found}), e.g. curl -H \
                         'Content-Type: application/yaml' --data-binary @rules.yaml",
                        BODY_TYPES.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// What every control connection shares: the connection slots and the
/// body-byte budget.
#[derive(Debug)]
pub struct Budget {
    connections: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            connections: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            bytes: Arc::new(Semaphore::new(MAX_BUFFERED)),
        }
    }
}

impl Budget {
    /// A slot for one more connection, if there is one.
    pub fn connection(&self) -> Option<OwnedSemaphorePermit> {
        self.connections.clone().try_acquire_owned().ok()
    }

    /// Room to buffer a body of up to `len` bytes, if there is that much.
    pub fn body(&self, len: usize) -> Option<OwnedSemaphorePermit> {
        let n = u32::try_from(len.min(MAX_BUFFERED)).ok()?;
        self.bytes.clone().try_acquire_many_owned(n).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn site() -> Site {
        Site::tcp("127.0.0.1:10810".parse().unwrap())
    }

    #[test]
    fn curl_as_it_comes_passes() {
        let s = site();
        for host in ["127.0.0.1:10810", "localhost:10810", "LOCALHOST:10810"] {
            assert_eq!(
                s.check(&Method::GET, &headers(&[("host", host)]), false),
                Ok(())
            );
        }
        let post = headers(&[
            ("host", "127.0.0.1:10810"),
            ("content-type", "application/yaml; charset=utf-8"),
        ]);
        assert_eq!(s.check(&Method::POST, &post, true), Ok(()));
        // No Host at all is no browser.
        assert_eq!(s.check(&Method::GET, &HeaderMap::new(), false), Ok(()));
        // The API's own page, were there one.
        let own = headers(&[
            ("origin", "http://127.0.0.1:10810"),
            ("sec-fetch-site", "same-origin"),
        ]);
        assert_eq!(s.check(&Method::GET, &own, false), Ok(()));
    }

    #[test]
    fn what_a_web_page_sends_is_refused() {
        let s = site();
        let status = |method: &Method, h: &[(&'static str, &str)], body| {
            s.check(method, &headers(h), body).map_err(|r| r.status)
        };
        // DNS rebinding.
        assert_eq!(
            status(&Method::GET, &[("host", "evil.example:10810")], false),
            Err(StatusCode::FORBIDDEN)
        );
        assert_eq!(
            status(&Method::GET, &[("host", "127.0.0.1:9999")], false),
            Err(StatusCode::FORBIDDEN)
        );
        // A no-cors fetch or form post from another page.
        assert_eq!(
            status(
                &Method::POST,
                &[
                    ("origin", "http://evil.example"),
                    ("content-type", "text/plain")
                ],
                true
            ),
            Err(StatusCode::FORBIDDEN)
        );
        assert_eq!(
            status(&Method::POST, &[("origin", "null")], false),
            Err(StatusCode::FORBIDDEN)
        );
        // Another port of localhost is another origin, but the same site.
        for fetch_site in ["cross-site", "same-site"] {
            assert_eq!(
                status(&Method::POST, &[("sec-fetch-site", fetch_site)], false),
                Err(StatusCode::FORBIDDEN)
            );
        }
        // A simple request's body types.
        for ctype in ["text/plain", "application/x-www-form-urlencoded", ""] {
            let h: Vec<(&'static str, &str)> = if ctype.is_empty() {
                vec![]
            } else {
                vec![("content-type", ctype)]
            };
            assert_eq!(
                status(&Method::PUT, &h, true),
                Err(StatusCode::UNSUPPORTED_MEDIA_TYPE),
                "{ctype}"
            );
        }
    }

    #[test]
    fn a_unix_socket_takes_any_host_but_no_origin() {
        let s = Site::unix();
        assert_eq!(
            s.check(&Method::GET, &headers(&[("host", "localhost")]), false),
            Ok(())
        );
        assert!(
            s.check(
                &Method::GET,
                &headers(&[("origin", "http://localhost")]),
                false
            )
            .is_err()
        );
    }

    #[test]
    fn budgets_run_out_and_come_back() {
        let b = Budget::default();
        let slots: Vec<_> = (0..MAX_CONNECTIONS).map_while(|_| b.connection()).collect();
        assert_eq!(slots.len(), MAX_CONNECTIONS);
        assert!(b.connection().is_none());
        drop(slots);
        assert!(b.connection().is_some());
        let bodies: Vec<_> = (0..100).map_while(|_| b.body(1 << 20)).collect();
        assert_eq!(bodies.len(), MAX_BUFFERED >> 20);
        assert!(b.body(1).is_none());
        drop(bodies);
        assert!(b.body(1 << 20).is_some());
    }
}
