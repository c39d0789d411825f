//! Parsing of the addresses and sizes given on the command line.
//!
//! This module does no I/O so that every accepted and rejected form can be
//! unit tested, and so that all user-facing wording about address syntax
//! lives in one place. Opening sockets is `net.rs`'s job.

use std::ffi::OsString;
use std::fmt::{self, Write as _};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::io::percent;

/// Where the proxy listens when the user does not say.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:10809";

/// Port implied by an `nbd://` URI without one (the IANA-assigned NBD port).
pub const DEFAULT_NBD_PORT: u16 = 10809;

const LISTEN_FORMS: &str = "expected HOST:PORT, [IPV6]:PORT, a unix socket path or unix:PATH";
const TARGET_FORMS: &str = "expected HOST:PORT, [IPV6]:PORT, a unix socket path, unix:PATH, \
                            nbd://HOST[:PORT] or nbd+unix:///?socket=PATH";
const SIZE_FORMS: &str = "expected a byte count (e.g. 8589934592, 512B or 0x200) or a number \
                          with one binary unit K, M, G, T, P or E, as qemu-img takes them \
                          (e.g. 512M, 8G, 1.5G; not 8GB)";

/// Why an address, URI or size was rejected. Each message is a single line
/// that quotes the input, so it can be shown to the user as is.
#[derive(Debug, thiserror::Error)]
pub enum AddrError {
    #[error("invalid address {input:?}: {reason}")]
    Address { input: String, reason: String },
    #[error("invalid NBD URI {input:?}: {reason}")]
    Uri { input: String, reason: String },
    #[error("invalid NBD URI {input:?}: TLS URIs are not supported (nbdfault speaks plain NBD)")]
    Tls { input: String },
    #[error(
        "invalid NBD URI {input:?}: the client's export name is forwarded unchanged; \
         drop {export:?} from the URI"
    )]
    ExportInUri { input: String, export: String },
    #[error("invalid size {input:?}: {reason}")]
    Size { input: String, reason: String },
}

/// Address the proxy accepts client connections on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// `host` is an IPv4 address, a host name, or an IPv6 address without
    /// brackets (optionally with a `%zone`). Port 0 asks for a free port.
    Tcp {
        host: String,
        port: u16,
    },
    Unix(PathBuf),
}

/// Upstream NBD server the proxy forwards to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Same host forms as [`ListenAddr::Tcp`]; the port is never 0.
    Tcp {
        host: String,
        port: u16,
    },
    Unix(PathBuf),
}

impl FromStr for ListenAddr {
    type Err = AddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| AddrError::Address {
            input: s.to_string(),
            reason,
        };
        // Checked before URIs so that `unix:` can introduce any path at all.
        if let Some(path) = s.strip_prefix("unix:") {
            return unix_path(path).map(ListenAddr::Unix).map_err(err);
        }
        if split_scheme(s).is_some() {
            return Err(err(format!("a URI cannot be listened on; {LISTEN_FORMS}")));
        }
        match parse_plain(s, LISTEN_FORMS).map_err(err)? {
            Endpoint::Tcp { host, port } => Ok(ListenAddr::Tcp { host, port }),
            Endpoint::Unix(path) => Ok(ListenAddr::Unix(path)),
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp { host, port } => fmt_host_port(f, host, *port),
            ListenAddr::Unix(path) => {
                let shown = path.display().to_string();
                // Only add "unix:" when the bare path would read back as
                // something else (HOST:PORT, a URI, or a "unix:" prefix).
                let reads_back = shown.contains('/')
                    && !shown.starts_with("unix:")
                    && split_scheme(&shown).is_none();
                if reads_back {
                    f.write_str(&shown)
                } else {
                    write!(f, "unix:{shown}")
                }
            }
        }
    }
}

impl FromStr for Target {
    type Err = AddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let addr_err = |reason: String| AddrError::Address {
            input: s.to_string(),
            reason,
        };
        if let Some(path) = s.strip_prefix("unix:") {
            return unix_path(path).map(Target::Unix).map_err(addr_err);
        }
        if let Some((scheme, rest)) = split_scheme(s) {
            return parse_uri(s, &scheme.to_ascii_lowercase(), rest);
        }
        // "nbd:PORT" is a host called "nbd", but anything else after an
        // NBD scheme and a single ':' is a mistyped URI.
        let lower = s.to_ascii_lowercase();
        let broken_uri = ["nbd:", "nbd+unix:", "nbds:", "nbds+unix:"]
            .iter()
            .filter_map(|p| lower.strip_prefix(p))
            .any(|rest| !rest.bytes().all(|b| b.is_ascii_digit()));
        if broken_uri {
            return Err(AddrError::Uri {
                input: s.to_string(),
                reason: format!("missing \"//\" after the scheme; {TARGET_FORMS}"),
            });
        }
        match parse_plain(s, TARGET_FORMS).map_err(addr_err)? {
            Endpoint::Tcp { port: 0, .. } => Err(addr_err(
                "port 0 is not allowed for an upstream server".to_string(),
            )),
            Endpoint::Tcp { host, port } => Ok(Target::Tcp { host, port }),
            Endpoint::Unix(path) => Ok(Target::Unix(path)),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Tcp { host, port } => fmt_host_port(f, host, *port),
            Target::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// Parses a size exactly as qemu-img does (QEMU's `qemu_strtosz`): a
/// decimal number, optionally with a decimal fraction, and at most one unit
/// letter `B K M G T P E` in either case, each a power of 1024 (`512`,
/// `1.5G`, `8g`); or a hexadecimal byte count (`0x10`). A fraction needs a
/// unit and is rounded to the nearest byte (`1.7K` is 1741); leading blanks
/// and a `+` are taken, as strtoull takes them. `8GB`, `8KiB`, `1e3` and
/// `1.5` are refused, as qemu-img refuses them.
pub fn parse_size(s: &str) -> Result<u64, AddrError> {
    let err = |reason: &str| AddrError::Size {
        input: s.to_string(),
        reason: reason.to_string(),
    };
    const TOO_LARGE: &str = "too large; the maximum is 18446744073709551615 bytes (just under 16E)";
    let body = s.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    let body = body.strip_prefix('+').unwrap_or(body);
    if let Some(hex) = body.strip_prefix("0x").or_else(|| body.strip_prefix("0X")) {
        // Hexadecimal is a plain byte count: `B` and `E` are digits there.
        if hex.is_empty() || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(err(SIZE_FORMS));
        }
        return u64::from_str_radix(hex, 16).map_err(|_| err(TOO_LARGE));
    }
    let int_end = body
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(body.len());
    let (int, rest) = body.split_at(int_end);
    let (frac, rest) = match rest.strip_prefix('.') {
        Some(r) => {
            let end = r.find(|c: char| !c.is_ascii_digit()).unwrap_or(r.len());
            (Some(&r[..end]), &r[end..])
        }
        None => (None, rest),
    };
    if int.is_empty() && frac.is_none_or(str::is_empty) {
        return Err(err(SIZE_FORMS));
    }
    let shift = match rest {
        "" | "b" | "B" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        "p" | "P" => 50,
        "e" | "E" => 60,
        _ => return Err(err(SIZE_FORMS)),
    };
    // Digits past the 20th change the result by less than a hundredth of
    // a byte: dropped, so the arithmetic fits in u128.
    let digits = frac.unwrap_or("").trim_end_matches('0');
    let digits = &digits[..digits.len().min(20)];
    if !digits.is_empty() && shift == 0 {
        return Err(err(
            "a fraction needs a unit, as in qemu-img (e.g. 1.5G; bytes are whole)",
        ));
    }
    let whole: u128 = if int.is_empty() {
        0
    } else {
        int.parse::<u64>().map_err(|_| err(TOO_LARGE))?.into()
    };
    let mut n = whole << shift;
    if !digits.is_empty() {
        let num: u128 = digits.parse().map_err(|_| err(SIZE_FORMS))?;
        let den = 10u128.pow(digits.len() as u32);
        // Rounded half up, as qemu-img rounds (0.5 bytes is 1).
        n += ((num << shift) + den / 2) / den;
    }
    u64::try_from(n).map_err(|_| err(TOO_LARGE))
}

/// A size in a rule (`offset`, `after-bytes`, `rate`...): what [`parse_size`] takes, and also the
/// IEC spellings `KiB MiB GiB TiB PiB EiB` (in either case), which cannot
/// be mistaken for powers of 1000.
pub fn parse_offset_size(s: &str) -> Result<u64, AddrError> {
    let lower = s.to_ascii_lowercase();
    match lower.strip_suffix("ib") {
        Some(head) if head.ends_with(['k', 'm', 'g', 't', 'p', 'e']) => {
            parse_size(&s[..head.len()]).map_err(|_| AddrError::Size {
                input: s.to_string(),
                reason: SIZE_FORMS.to_string(),
            })
        }
        _ => parse_size(s),
    }
}

/// `nbd://` URI for a bound TCP socket, e.g. `nbd://[::1]:10809`.
pub fn nbd_uri_for_tcp(addr: SocketAddr) -> String {
    match addr {
        SocketAddr::V4(a) => format!("nbd://{}:{}", a.ip(), a.port()),
        // RFC 6874: the zone separator '%' is itself percent-encoded in URIs.
        SocketAddr::V6(a) if a.scope_id() != 0 => {
            format!("nbd://[{}%25{}]:{}", a.ip(), a.scope_id(), a.port())
        }
        SocketAddr::V6(a) => format!("nbd://[{}]:{}", a.ip(), a.port()),
    }
}

/// `nbd+unix://` URI for a unix socket, e.g. `nbd+unix:///?socket=/tmp/x.sock`.
///
/// The path is kept as given (relative stays relative); only bytes that are
/// not allowed in a URI query, or that would split it, are percent-encoded.
pub fn nbd_uri_for_unix(path: &Path) -> String {
    let mut uri = String::from("nbd+unix:///?socket=");
    for &b in path.as_os_str().as_bytes() {
        // RFC 3986 query characters, minus '&', '+' and ';', which query
        // parsers commonly treat as separators or as a space.
        if b.is_ascii_alphanumeric() || b"-._~!$'()*,=:@/".contains(&b) {
            uri.push(char::from(b));
        } else {
            // Writing to a String cannot fail.
            let _ = write!(uri, "%{b:02X}");
        }
    }
    uri
}

/// What the forms shared by [`ListenAddr`] and [`Target`] parse to.
enum Endpoint {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

/// Parses `HOST:PORT`, `[IPV6]:PORT` or a path containing '/'. The error is
/// just the reason; callers wrap it with the input.
fn parse_plain(s: &str, forms: &str) -> Result<Endpoint, String> {
    if s.contains('/') {
        return unix_path(s).map(Endpoint::Unix);
    }
    if s.is_empty() {
        return Err(format!("empty address; {forms}"));
    }
    if let Some(rest) = s.strip_prefix('[') {
        let (inside, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("missing ']' after the IPv6 address; {forms}"))?;
        let host = ipv6_host(inside)?;
        let port = match after.strip_prefix(':') {
            Some(port) => parse_port(port)?,
            None if after.is_empty() => return Err(format!("missing port; {forms}")),
            None => return Err(format!("unexpected {after:?} after ']'; {forms}")),
        };
        return Ok(Endpoint::Tcp { host, port });
    }
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(format!("missing port; {forms}"));
    };
    if host.contains(':') {
        return Err("IPv6 addresses need brackets, e.g. [::1]:10809".to_string());
    }
    if host.is_empty() {
        return Err(format!(
            "missing host before ':'; use e.g. 127.0.0.1:{port} or [::1]:{port}"
        ));
    }
    check_host_name(host)?;
    let port = parse_port(port)?;
    Ok(Endpoint::Tcp {
        host: host.to_string(),
        port,
    })
}

fn unix_path(p: &str) -> Result<PathBuf, String> {
    if p.is_empty() {
        return Err("empty unix socket path".to_string());
    }
    // The kernel would reject it at bind/connect time with a vaguer message.
    if p.contains('\0') {
        return Err("unix socket path contains a NUL byte".to_string());
    }
    Ok(PathBuf::from(p))
}

fn parse_port(p: &str) -> Result<u16, String> {
    if p.is_empty() {
        return Err("missing port after ':'".to_string());
    }
    // u16::from_str would also take a leading '+'.
    if !p.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "invalid port {p:?}: expected a number from 0 to 65535"
        ));
    }
    p.parse()
        .map_err(|_| format!("invalid port {p:?}: expected a number from 0 to 65535"))
}

/// Validates the inside of `[...]`: an IPv6 address with an optional
/// `%zone` (interface name or index), needed for link-local addresses.
fn ipv6_host(inside: &str) -> Result<String, String> {
    let (ip, zone) = match inside.split_once('%') {
        Some((ip, zone)) => (ip, Some(zone)),
        None => (inside, None),
    };
    if ip.parse::<Ipv6Addr>().is_err() {
        return Err(format!("{inside:?} is not an IPv6 address"));
    }
    if let Some(zone) = zone {
        let ok = !zone.is_empty()
            && zone
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !ok {
            return Err(format!("invalid IPv6 zone {zone:?} in {inside:?}"));
        }
    }
    Ok(inside.to_string())
}

fn check_host_name(host: &str) -> Result<(), String> {
    // All digits and dots is meant as IPv4; catch typos like 127.0.0.256
    // here rather than as a confusing name-resolution failure.
    if host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return match host.parse::<Ipv4Addr>() {
            Ok(_) => Ok(()),
            Err(_) => Err(format!("{host:?} is not a valid IPv4 address")),
        };
    }
    if host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        Ok(())
    } else {
        Err(format!("invalid host name {host:?}"))
    }
}

fn fmt_host_port(f: &mut fmt::Formatter<'_>, host: &str, port: u16) -> fmt::Result {
    if host.contains(':') {
        write!(f, "[{host}]:{port}")
    } else {
        write!(f, "{host}:{port}")
    }
}

/// Splits `scheme://rest` if `s` starts with something shaped like a URI
/// scheme. Paths such as `./a://b` do not qualify, so they stay paths.
fn split_scheme(s: &str) -> Option<(&str, &str)> {
    let (scheme, rest) = s.split_once("://")?;
    let mut bytes = scheme.bytes();
    let first_ok = bytes.next().is_some_and(|b| b.is_ascii_alphabetic());
    let rest_ok = bytes.all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b));
    (first_ok && rest_ok).then_some((scheme, rest))
}

/// Parses what follows `scheme://` in an NBD URI. `scheme` is lowercased.
fn parse_uri(input: &str, scheme: &str, rest: &str) -> Result<Target, AddrError> {
    let err = |reason: String| AddrError::Uri {
        input: input.to_string(),
        reason,
    };
    match scheme {
        "nbd" | "nbd+unix" => {}
        "nbds" | "nbds+unix" | "nbds+vsock" => {
            return Err(AddrError::Tls {
                input: input.to_string(),
            });
        }
        "nbd+vsock" => return Err(err("vsock URIs are not supported".to_string())),
        other => {
            return Err(err(format!(
                "unknown scheme {other:?}; expected nbd:// or nbd+unix://"
            )));
        }
    }
    if rest.contains('#') {
        return Err(err("a URI fragment ('#...') is not allowed".to_string()));
    }
    let (rest, query) = match rest.split_once('?') {
        Some((rest, query)) => (rest, query),
        None => (rest, ""),
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    if !matches!(path, "" | "/") {
        return Err(AddrError::ExportInUri {
            input: input.to_string(),
            export: path.to_string(),
        });
    }
    let mut params = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")));

    if scheme == "nbd" {
        if let Some((name, _)) = params.next() {
            return Err(err(format!(
                "unknown query parameter {name:?}; nbd:// URIs take none"
            )));
        }
        let (host, port) = uri_authority(authority).map_err(err)?;
        return Ok(Target::Tcp { host, port });
    }

    if !authority.is_empty() {
        return Err(err(
            "nbd+unix:// URIs have no host; write nbd+unix:///?socket=PATH".to_string(),
        ));
    }
    let mut socket = None;
    for (name, value) in params {
        if name != "socket" {
            return Err(err(format!(
                "unknown query parameter {name:?}; only socket= is supported"
            )));
        }
        if socket.is_some() {
            return Err(err("socket= is given more than once".to_string()));
        }
        let bytes = percent_decode(value).map_err(err)?;
        if bytes.is_empty() {
            return Err(err("empty socket= path".to_string()));
        }
        if bytes.contains(&0) {
            return Err(err("socket= path contains a NUL byte".to_string()));
        }
        socket = Some(PathBuf::from(OsString::from_vec(bytes)));
    }
    match socket {
        Some(path) => Ok(Target::Unix(path)),
        None => Err(err(
            "missing socket= query parameter; write nbd+unix:///?socket=PATH".to_string(),
        )),
    }
}

/// Parses the `host[:port]` of an `nbd://` URI.
fn uri_authority(authority: &str) -> Result<(String, u16), String> {
    if authority.contains('@') {
        return Err("user information (\"user@\") is not supported".to_string());
    }
    if authority.is_empty() {
        return Err("missing host; write nbd://HOST[:PORT]".to_string());
    }
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (inside, after) = rest
            .split_once(']')
            .ok_or_else(|| "missing ']' after the IPv6 address".to_string())?;
        // In URIs the zone separator is written "%25" (RFC 6874).
        let host = ipv6_host(&inside.replacen("%25", "%", 1))?;
        let port = match after.strip_prefix(':') {
            Some(port) => Some(port),
            None if after.is_empty() => None,
            None => return Err(format!("unexpected {after:?} after ']'")),
        };
        (host, port)
    } else {
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        };
        if host.contains(':') {
            return Err("IPv6 addresses need brackets, e.g. nbd://[::1]:10809".to_string());
        }
        if host.is_empty() {
            return Err("missing host; write nbd://HOST[:PORT]".to_string());
        }
        check_host_name(host)?;
        (host.to_string(), port)
    };
    let port = match port {
        None => DEFAULT_NBD_PORT,
        Some(p) => parse_port(p)?,
    };
    if port == 0 {
        return Err("port 0 is not allowed for an upstream server".to_string());
    }
    Ok((host, port))
}

fn percent_decode(s: &str) -> Result<Vec<u8>, String> {
    percent::decode(s).ok_or_else(|| {
        format!("bad percent-encoding in {s:?}; '%' must be followed by two hex digits")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tcp_listen(host: &str, port: u16) -> ListenAddr {
        ListenAddr::Tcp {
            host: host.to_string(),
            port,
        }
    }

    fn tcp_target(host: &str, port: u16) -> Target {
        Target::Tcp {
            host: host.to_string(),
            port,
        }
    }

    fn unix_target(p: &str) -> Target {
        Target::Unix(PathBuf::from(p))
    }

    /// Asserts that parsing fails, that the message quotes the input and
    /// contains `needle`, and that it is a single line.
    fn assert_listen_err(s: &str, needle: &str) {
        let e = s.parse::<ListenAddr>().expect_err(s).to_string();
        check_msg(&e, s, needle);
    }

    fn assert_target_err(s: &str, needle: &str) {
        let e = s.parse::<Target>().expect_err(s).to_string();
        check_msg(&e, s, needle);
    }

    fn assert_size_err(s: &str, needle: &str) {
        let e = parse_size(s).expect_err(s).to_string();
        check_msg(&e, s, needle);
    }

    fn check_msg(msg: &str, input: &str, needle: &str) {
        assert!(msg.contains(&format!("{input:?}")), "{msg:?} lacks input");
        assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
        assert!(!msg.contains('\n'), "{msg:?} is not one line");
    }

    #[test]
    fn listen_valid() {
        let cases = [
            ("127.0.0.1:10809", tcp_listen("127.0.0.1", 10809)),
            ("0.0.0.0:0", tcp_listen("0.0.0.0", 0)),
            ("localhost:0", tcp_listen("localhost", 0)),
            (
                "my-host.example_1.org:65535",
                tcp_listen("my-host.example_1.org", 65535),
            ),
            ("[::1]:0", tcp_listen("::1", 0)),
            ("[::]:10809", tcp_listen("::", 10809)),
            ("[fe80::1%eth0]:80", tcp_listen("fe80::1%eth0", 80)),
            ("[::ffff:127.0.0.1]:1", tcp_listen("::ffff:127.0.0.1", 1)),
            ("127.0.0.1:00080", tcp_listen("127.0.0.1", 80)),
            ("/tmp/x.sock", ListenAddr::Unix("/tmp/x.sock".into())),
            ("./x.sock", ListenAddr::Unix("./x.sock".into())),
            ("dir/x:1", ListenAddr::Unix("dir/x:1".into())),
            ("unix:x.sock", ListenAddr::Unix("x.sock".into())),
            ("unix:nbd://x", ListenAddr::Unix("nbd://x".into())),
            ("unix:unix:/x", ListenAddr::Unix("unix:/x".into())),
            ("unix:/tmp/x.sock", ListenAddr::Unix("/tmp/x.sock".into())),
            ("./a://b", ListenAddr::Unix("./a://b".into())),
        ];
        for (s, want) in cases {
            assert_eq!(s.parse::<ListenAddr>().expect(s), want, "{s}");
        }
        assert_eq!(
            DEFAULT_LISTEN.parse::<ListenAddr>().unwrap(),
            tcp_listen("127.0.0.1", 10809)
        );
    }

    #[test]
    fn listen_invalid() {
        assert_listen_err("", "empty address");
        assert_listen_err(
            "foo",
            "expected HOST:PORT, [IPV6]:PORT, a unix socket path or unix:PATH",
        );
        assert_listen_err("127.0.0.1", "missing port");
        assert_listen_err("127.0.0.1:", "missing port");
        assert_listen_err(":10809", "missing host");
        assert_listen_err("::1", "IPv6 addresses need brackets");
        assert_listen_err("::1:80", "IPv6 addresses need brackets");
        assert_listen_err("fe80::1", "IPv6 addresses need brackets");
        assert_listen_err("localhost:http", "invalid port \"http\"");
        assert_listen_err("localhost:65536", "invalid port \"65536\"");
        assert_listen_err("localhost:+80", "invalid port");
        assert_listen_err("localhost:-1", "invalid port");
        assert_listen_err("[::1]", "missing port");
        assert_listen_err("[::1]:", "missing port");
        assert_listen_err("[::1]80", "after ']'");
        assert_listen_err("[::1:80", "missing ']'");
        assert_listen_err("[127.0.0.1]:80", "not an IPv6 address");
        assert_listen_err("[]:80", "not an IPv6 address");
        assert_listen_err("[fe80::1%]:80", "invalid IPv6 zone");
        assert_listen_err("127.0.0.256:80", "not a valid IPv4 address");
        assert_listen_err("1.2.3:80", "not a valid IPv4 address");
        assert_listen_err("bad host:80", "invalid host name");
        assert_listen_err("unix:", "empty unix socket path");
        assert_listen_err("unix:a\0b", "NUL");
        assert_listen_err("nbd://localhost:10809", "a URI cannot be listened on");
        assert_listen_err("line\nbreak", "expected HOST:PORT");
    }

    #[test]
    fn listen_display() {
        for (s, shown) in [
            ("127.0.0.1:10809", "127.0.0.1:10809"),
            ("localhost:0", "localhost:0"),
            ("[::1]:0", "[::1]:0"),
            ("[fe80::1%eth0]:80", "[fe80::1%eth0]:80"),
            ("/tmp/x.sock", "/tmp/x.sock"),
            ("./x.sock", "./x.sock"),
            ("unix:/tmp/x.sock", "/tmp/x.sock"),
            ("unix:x.sock", "unix:x.sock"),
            ("unix:nbd://x", "unix:nbd://x"),
            ("unix:unix:/x", "unix:unix:/x"),
            ("nbd:10809", "nbd:10809"),
        ] {
            let a: ListenAddr = s.parse().unwrap();
            assert_eq!(a.to_string(), shown);
            assert_eq!(shown.parse::<ListenAddr>().unwrap(), a, "round trip of {s}");
        }
    }

    #[test]
    fn target_plain_forms() {
        let cases = [
            ("127.0.0.1:10809", tcp_target("127.0.0.1", 10809)),
            ("localhost:1", tcp_target("localhost", 1)),
            ("[::1]:10809", tcp_target("::1", 10809)),
            ("/tmp/x.sock", unix_target("/tmp/x.sock")),
            ("./x.sock", unix_target("./x.sock")),
            ("unix:x.sock", unix_target("x.sock")),
            ("unix:/tmp/x.sock", unix_target("/tmp/x.sock")),
        ];
        for (s, want) in cases {
            assert_eq!(s.parse::<Target>().expect(s), want, "{s}");
        }
    }

    #[test]
    fn target_uris() {
        let cases = [
            ("nbd://localhost", tcp_target("localhost", 10809)),
            ("nbd://localhost/", tcp_target("localhost", 10809)),
            ("nbd://127.0.0.1:1234", tcp_target("127.0.0.1", 1234)),
            ("nbd://127.0.0.1:1234/", tcp_target("127.0.0.1", 1234)),
            ("NBD://example.com:5", tcp_target("example.com", 5)),
            ("nbd://[::1]", tcp_target("::1", 10809)),
            ("nbd://[::1]:10809/", tcp_target("::1", 10809)),
            ("nbd://[fe80::1%25eth0]:7/", tcp_target("fe80::1%eth0", 7)),
            ("nbd://h/?", tcp_target("h", 10809)),
            (
                "nbd+unix:///?socket=/tmp/x.sock",
                unix_target("/tmp/x.sock"),
            ),
            ("nbd+unix://?socket=/tmp/x.sock", unix_target("/tmp/x.sock")),
            ("nbd+unix:///?socket=rel.sock", unix_target("rel.sock")),
            ("nbd+unix:///?&socket=/a&", unix_target("/a")),
            ("Nbd+Unix:///?socket=/a", unix_target("/a")),
            (
                "nbd+unix:///?socket=/tmp/a%20b%26c%25d%2Be",
                unix_target("/tmp/a b&c%d+e"),
            ),
            ("nbd+unix:///?socket=/a=b", unix_target("/a=b")),
        ];
        for (s, want) in cases {
            assert_eq!(s.parse::<Target>().expect(s), want, "{s}");
        }
    }

    #[test]
    fn target_invalid() {
        assert_target_err("", "empty address");
        assert_target_err("foo", "nbd+unix:///?socket=PATH");
        assert_target_err("127.0.0.1:0", "port 0 is not allowed");
        assert_target_err("[::1]:0", "port 0 is not allowed");
        assert_target_err("::1", "IPv6 addresses need brackets");
        assert_target_err("host:99999", "invalid port");
        assert_target_err("nbd://h:0", "port 0 is not allowed");
        assert_target_err("nbd://h:x", "invalid port");
        assert_target_err("nbd://h:", "missing port");
        assert_target_err("nbd://", "missing host");
        assert_target_err("nbd:///", "missing host");
        assert_target_err("nbd://:10809", "missing host");
        assert_target_err("nbd://::1", "IPv6 addresses need brackets");
        assert_target_err("nbd://[::1", "missing ']'");
        assert_target_err("nbd://[::1]x", "after ']'");
        assert_target_err("nbd://user@h", "user information");
        assert_target_err("nbd://h#frag", "fragment");
        assert_target_err("nbd://h/?socket=/x", "unknown query parameter \"socket\"");
        assert_target_err("nbd+unix:///", "missing socket=");
        assert_target_err("nbd+unix://", "missing socket=");
        assert_target_err("nbd+unix:///?socket=", "empty socket= path");
        assert_target_err("nbd+unix:///?socket", "empty socket= path");
        assert_target_err("nbd+unix:///?socket=/a&socket=/b", "more than once");
        assert_target_err(
            "nbd+unix:///?socket=/a&tls=on",
            "unknown query parameter \"tls\"",
        );
        assert_target_err("nbd+unix:///?socket=%zz", "bad percent-encoding");
        assert_target_err("nbd+unix:///?socket=%4", "bad percent-encoding");
        assert_target_err("nbd+unix:///?socket=%+1", "bad percent-encoding");
        assert_target_err("nbd+unix:///?socket=/a%00", "NUL");
        assert_target_err("nbd+unix://host/?socket=/a", "have no host");
        assert_target_err("nbds://h", "TLS URIs are not supported");
        assert_target_err("nbds+unix:///?socket=/a", "TLS URIs are not supported");
        assert_target_err("NBDS://h", "TLS URIs are not supported");
        assert_target_err("nbd+vsock://1", "vsock");
        assert_target_err("http://h", "unknown scheme \"http\"");
        assert_target_err("nbd:h", "missing \"//\"");
        assert_target_err("nbd+unix:/tmp/x", "missing \"//\"");
        assert_target_err("nbds:x", "missing \"//\"");
    }

    #[test]
    fn target_export_name_rejected() {
        for (s, export) in [
            ("nbd://h/foo", "/foo"),
            ("nbd://h:1/foo/bar", "/foo/bar"),
            ("nbd://[::1]/disk", "/disk"),
            ("nbd+unix:///foo?socket=/tmp/x", "/foo"),
            ("nbd://h//", "//"),
        ] {
            let e = s.parse::<Target>().expect_err(s);
            assert!(matches!(&e, AddrError::ExportInUri { export: x, .. } if x == export));
            let msg = e.to_string();
            check_msg(
                &msg,
                s,
                &format!(
                    "the client's export name is forwarded unchanged; drop \"{export}\" from the URI"
                ),
            );
        }
    }

    #[test]
    fn target_display() {
        for (s, shown) in [
            ("127.0.0.1:10809", "127.0.0.1:10809"),
            ("nbd://[::1]/", "[::1]:10809"),
            ("nbd://example.com", "example.com:10809"),
            ("/tmp/x.sock", "unix:/tmp/x.sock"),
            ("unix:x.sock", "unix:x.sock"),
            ("nbd+unix:///?socket=/tmp/x.sock", "unix:/tmp/x.sock"),
        ] {
            let t: Target = s.parse().unwrap();
            assert_eq!(t.to_string(), shown);
            assert_eq!(shown.parse::<Target>().unwrap(), t, "round trip of {s}");
        }
    }

    #[test]
    fn sizes() {
        // Each checked against qemu-img 10.0's `create -f raw x SIZE`.
        let cases: &[(&str, u64)] = &[
            ("0", 0),
            ("1", 1),
            ("8589934592", 8 << 30),
            ("512B", 512),
            ("512b", 512),
            ("4k", 4096),
            ("4K", 4096),
            ("512M", 512 << 20),
            ("8G", 8 << 30),
            ("8g", 8 << 30),
            ("1T", 1 << 40),
            ("2P", 2 << 50),
            ("15E", 15 << 60),
            ("0G", 0),
            ("007K", 7 << 10),
            ("00010", 10),
            ("1.5G", 1_610_612_736),
            ("1.25M", 1_310_720),
            ("0.1k", 102),
            ("1.7k", 1741),
            ("1.9999k", 2048),
            ("1.0001k", 1024),
            ("0.00048828125k", 1),
            ("0.000244140625k", 0),
            ("3.3333333333333333333333G", 3_579_139_413),
            (".5G", 512 << 20),
            ("1.G", 1 << 30),
            ("1.", 1),
            ("1.0", 1),
            ("1.000b", 1),
            ("0x10", 16),
            ("0X10", 16),
            ("0x10B", 0x10b),
            (" 1G", 1 << 30),
            ("\t1G", 1 << 30),
            ("+1G", 1 << 30),
            ("18446744073709551615", u64::MAX),
            ("18446744073709551615B", u64::MAX),
        ];
        for &(s, want) in cases {
            assert_eq!(parse_size(s).expect(s), want, "{s}");
        }
    }

    #[test]
    fn sizes_invalid() {
        // Each refused by qemu-img 10.0 too.
        for s in [
            "", "B", "K", "G", "abc", "-1", "1 G", "8G ", "1G\t", "8X", "8Gb2", "8GB", "8gb",
            "4kb", "512MB", "8GiB", "1KiB", "8ib", "8kk", "0x", "0x10k", "0x1.5", "1e3", "1.5e1k",
            ".", ".G", "1,5G", "1.5.5G", "1..5G", "1M5", "8é",
        ] {
            assert_size_err(s, "expected a byte count");
        }
        for s in ["1.5", "0.5", "1.5B", "2.5b"] {
            assert_size_err(s, "a fraction needs a unit");
        }
        assert_size_err("16E", "too large");
        assert_size_err("16.0001E", "too large");
        assert_size_err("18446744073709551616", "too large");
        assert_size_err("99999999999999999999999K", "too large");
        assert_size_err("17179869184G", "too large");
        assert_size_err("0x10000000000000000", "too large");
    }

    #[test]
    fn offset_sizes_also_take_iec_units() {
        for (s, want) in [
            ("1MiB", 1u64 << 20),
            ("4kib", 4096),
            ("1.5GiB", 3 << 29),
            ("7", 7),
        ] {
            assert_eq!(parse_offset_size(s).expect(s), want, "{s}");
        }
        for s in ["8GB", "1XB", "iB", "1iB", "1MiBB"] {
            let e = parse_offset_size(s).expect_err(s).to_string();
            check_msg(&e, s, "expected a byte count");
        }
    }

    #[test]
    fn tcp_uris() {
        assert_eq!(
            nbd_uri_for_tcp("127.0.0.1:10809".parse().unwrap()),
            "nbd://127.0.0.1:10809"
        );
        assert_eq!(
            nbd_uri_for_tcp("[::1]:10809".parse().unwrap()),
            "nbd://[::1]:10809"
        );
        let scoped = SocketAddr::V6(std::net::SocketAddrV6::new(
            "fe80::1".parse().unwrap(),
            80,
            0,
            3,
        ));
        let uri = nbd_uri_for_tcp(scoped);
        assert_eq!(uri, "nbd://[fe80::1%253]:80");
        assert_eq!(uri.parse::<Target>().unwrap(), tcp_target("fe80::1%3", 80));
        for a in ["127.0.0.1:1", "[::1]:2", "[::ffff:10.0.0.1]:3"] {
            let sa: SocketAddr = a.parse().unwrap();
            let t: Target = nbd_uri_for_tcp(sa).parse().unwrap();
            assert_eq!(t.to_string(), a);
        }
    }

    #[test]
    fn unix_uris() {
        assert_eq!(
            nbd_uri_for_unix(Path::new("/tmp/x.sock")),
            "nbd+unix:///?socket=/tmp/x.sock"
        );
        assert_eq!(
            nbd_uri_for_unix(Path::new("./x.sock")),
            "nbd+unix:///?socket=./x.sock"
        );
        assert_eq!(
            nbd_uri_for_unix(Path::new("/tmp/a b%c&d#e?f+g;h")),
            "nbd+unix:///?socket=/tmp/a%20b%25c%26d%23e%3Ff%2Bg%3Bh"
        );
        assert_eq!(
            nbd_uri_for_unix(Path::new("/tmp/é")),
            "nbd+unix:///?socket=/tmp/%C3%A9"
        );
        let odd = PathBuf::from(OsString::from_vec(b"/tmp/\xff\x01x".to_vec()));
        let uri = nbd_uri_for_unix(&odd);
        assert_eq!(uri, "nbd+unix:///?socket=/tmp/%FF%01x");
        assert_eq!(uri.parse::<Target>().unwrap(), Target::Unix(odd));
    }

    proptest! {
        #[test]
        fn size_plain_bytes_roundtrip(n in any::<u64>()) {
            prop_assert_eq!(parse_size(&format!("{n}")).unwrap(), n);
            prop_assert_eq!(parse_size(&format!("{n}B")).unwrap(), n);
        }

        #[test]
        fn size_units_scale(n in 0u64..1024, unit in 0usize..6) {
            let letter = ["K", "m", "G", "t", "P", "e"][unit];
            let want = n.checked_mul(1 << (10 * (unit + 1)));
            prop_assert_eq!(parse_size(&format!("{n}{letter}")).ok(), want);
            prop_assert_eq!(parse_offset_size(&format!("{n}{letter}iB")).ok(), want);
        }

        #[test]
        fn parsers_never_panic(s in any::<String>()) {
            let _ = s.parse::<ListenAddr>();
            let _ = s.parse::<Target>();
            let _ = parse_size(&s);
        }

        #[test]
        fn parsers_never_panic_on_uri_like(s in "(nbd|nbd\\+unix|unix|nbds)?(:|://)?[\\[\\]:/?&=%#@a-z0-9.]{0,24}") {
            // Whatever parses must display as something that parses back
            // (Display is lossy only for non-UTF-8 paths).
            if let Ok(t) = s.parse::<Target>()
                && !matches!(&t, Target::Unix(p) if p.to_str().is_none())
            {
                prop_assert_eq!(t.to_string().parse::<Target>().unwrap(), t);
            }
            if let Ok(a) = s.parse::<ListenAddr>() {
                prop_assert_eq!(a.to_string().parse::<ListenAddr>().unwrap(), a);
            }
        }

        #[test]
        fn unix_uri_roundtrip(bytes in proptest::collection::vec(1u8..=255, 1..40)) {
            let path = PathBuf::from(OsString::from_vec(bytes));
            let t: Target = nbd_uri_for_unix(&path).parse().unwrap();
            prop_assert_eq!(t, Target::Unix(path));
        }
    }
}
