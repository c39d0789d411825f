//! Real NBD servers the proxy is put in front of (qemu-nbd, nbdkit),
//! started on a fresh unix socket or TCP port and ready once they accept
//! a connection, plus the NBD URI forms the tests build for them.

use std::fs::{self, File};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::process::{START_TIMEOUT, kill_child, read_to_string_lossy, require_tool, spawn_logged};

/// `nbd+unix:///?socket=PATH`
pub fn unix_uri(sock: &Path) -> String {
    format!("nbd+unix:///?socket={}", sock.display())
}

/// `HOST:PORT` of a TCP NBD URI (`nbd://HOST:PORT[/]`), to connect a raw
/// socket to it; panics on any other URI.
pub fn tcp_addr(uri: &str) -> String {
    uri.strip_prefix("nbd://")
        .unwrap_or_else(|| panic!("not a TCP NBD URI: {uri}"))
        .trim_end_matches('/')
        .to_string()
}

/// Inserts an export name into an NBD URI
/// (`nbd://h:p` → `nbd://h:p/NAME`, `nbd+unix:///?socket=S` → `nbd+unix:///NAME?socket=S`).
pub fn uri_with_export(uri: &str, name: &str) -> String {
    let (scheme, rest) = uri.split_once("://").expect("URI has a scheme");
    let (authority_path, query) = match rest.split_once('?') {
        Some((a, q)) => (a, Some(q)),
        None => (rest, None),
    };
    let authority = authority_path
        .split_once('/')
        .map(|(a, _)| a)
        .unwrap_or(authority_path);
    let mut out = format!("{scheme}://{authority}/{name}");
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// Waits until something accepts connections on the unix socket `sock`,
/// while `child` is still alive. Panics with `log`'s content otherwise.
fn wait_for_unix_socket(child: &mut Child, sock: &Path, what: &str, log: &Path) {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "{what} exited with {status} before listening on {}\n--- its output ---\n{}",
                sock.display(),
                read_to_string_lossy(log)
            );
        }
        if UnixStream::connect(sock).is_ok() {
            return;
        }
        if Instant::now() >= deadline {
            kill_child(child);
            panic!(
                "{what} did not listen on {} within {START_TIMEOUT:?}\n--- its output ---\n{}",
                sock.display(),
                read_to_string_lossy(log)
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A qemu-nbd serving one image on a unix socket.
pub struct QemuNbd {
    child: Child,
    pub sock: PathBuf,
    log: PathBuf,
    dir: TempDir,
}

impl QemuNbd {
    /// `qemu-nbd -f raw --persistent --shared=16 -k SOCK FILE`
    pub fn raw(file: &Path) -> QemuNbd {
        QemuNbd::start("raw", file, &[])
    }

    /// `qemu-nbd -f FORMAT --persistent --shared=16 -k SOCK EXTRA... FILE`
    /// with the socket in a fresh temporary directory.
    pub fn start(format: &str, file: &Path, extra: &[&str]) -> QemuNbd {
        let dir = TempDir::new().expect("tempdir");
        let sock = dir.path().join("qemu-nbd.sock");
        QemuNbd::start_at_in(dir, &sock, format, file, extra)
    }

    /// Like [`QemuNbd::start`] but listening on the given socket path.
    pub fn start_at(sock: &Path, format: &str, file: &Path, extra: &[&str]) -> QemuNbd {
        let dir = TempDir::new().expect("tempdir");
        QemuNbd::start_at_in(dir, sock, format, file, extra)
    }

    fn start_at_in(
        dir: TempDir,
        sock: &Path,
        format: &str,
        file: &Path,
        extra: &[&str],
    ) -> QemuNbd {
        require_tool("qemu-nbd");
        let log = dir.path().join("qemu-nbd.log");
        let sock_s = sock.to_str().expect("utf-8 path").to_string();
        let file_s = file.to_str().expect("utf-8 path").to_string();
        let mut args: Vec<&str> = vec!["-f", format, "--persistent", "--shared=16", "-k", &sock_s];
        args.extend_from_slice(extra);
        args.push(&file_s);
        let logf = File::create(&log).expect("create log");
        let mut child = Command::new("qemu-nbd")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("dup log"))
            .stderr(logf)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn qemu-nbd: {e}"));
        wait_for_unix_socket(&mut child, sock, "qemu-nbd", &log);
        QemuNbd {
            child,
            sock: sock.to_path_buf(),
            log,
            dir,
        }
    }

    pub fn uri(&self) -> String {
        unix_uri(&self.sock)
    }

    pub fn log(&self) -> String {
        read_to_string_lossy(&self.log)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        kill_child(&mut self.child);
    }
}

/// An nbdkit serving on a unix socket (or on TCP, see [`Nbdkit::start_tcp`]).
pub struct Nbdkit {
    child: Child,
    /// Unix socket path, if listening on a unix socket.
    pub sock: Option<PathBuf>,
    /// TCP port on 127.0.0.1, if listening on TCP.
    pub port: Option<u16>,
    log: PathBuf,
    _dir: TempDir,
}

impl Nbdkit {
    /// `nbdkit -f -U SOCK ARGS...`, e.g. `&["memory", "64M"]`,
    /// `&["--no-sr", "memory", "64M"]`, `&["-o", "memory", "64M"]`.
    pub fn start(args: &[&str]) -> Nbdkit {
        require_tool("nbdkit");
        let dir = TempDir::new().expect("tempdir");
        let sock = dir.path().join("nbdkit.sock");
        let log = dir.path().join("nbdkit.log");
        let sock_s = sock.to_str().unwrap().to_string();
        let mut all: Vec<&str> = vec!["-f", "-U", &sock_s];
        all.extend_from_slice(args);
        let mut child = spawn_logged("nbdkit", &all, &log);
        wait_for_unix_socket(&mut child, &sock, "nbdkit", &log);
        Nbdkit {
            child,
            sock: Some(sock),
            port: None,
            log,
            _dir: dir,
        }
    }

    /// `nbdkit -f -i 127.0.0.1 -p 0 ARGS...`: nbdkit picks a free port, which
    /// is found through /proc (no port-guessing races).
    pub fn start_tcp(args: &[&str]) -> Nbdkit {
        require_tool("nbdkit");
        let dir = TempDir::new().expect("tempdir");
        let log = dir.path().join("nbdkit.log");
        let mut all: Vec<&str> = vec!["-f", "-i", "127.0.0.1", "-p", "0"];
        all.extend_from_slice(args);
        let mut child = spawn_logged("nbdkit", &all, &log);
        let deadline = Instant::now() + START_TIMEOUT;
        let port = loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "nbdkit exited with {status} before listening\n--- its output ---\n{}",
                    read_to_string_lossy(&log)
                );
            }
            if let Some(port) = listening_tcp_port(child.id())
                && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            {
                break port;
            }
            if Instant::now() >= deadline {
                kill_child(&mut child);
                panic!(
                    "nbdkit did not listen on TCP within {START_TIMEOUT:?}\n--- its output ---\n{}",
                    read_to_string_lossy(&log)
                );
            }
            thread::sleep(Duration::from_millis(20));
        };
        Nbdkit {
            child,
            sock: None,
            port: Some(port),
            log,
            _dir: dir,
        }
    }

    pub fn uri(&self) -> String {
        match (&self.sock, self.port) {
            (Some(sock), _) => unix_uri(sock),
            (None, Some(port)) => format!("nbd://127.0.0.1:{port}"),
            _ => unreachable!(),
        }
    }

    pub fn log(&self) -> String {
        read_to_string_lossy(&self.log)
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        kill_child(&mut self.child);
    }
}

/// The TCP port `pid` listens on (IPv4), found via /proc/PID/fd and /proc/net/tcp.
fn listening_tcp_port(pid: u32) -> Option<u16> {
    let mut inodes = Vec::new();
    for entry in fs::read_dir(format!("/proc/{pid}/fd")).ok()? {
        let Ok(entry) = entry else { continue };
        if let Ok(target) = fs::read_link(entry.path()) {
            let t = target.to_string_lossy();
            if let Some(inode) = t.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')) {
                inodes.push(inode.to_string());
            }
        }
    }
    let tcp = fs::read_to_string("/proc/net/tcp").ok()?;
    for line in tcp.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
        if f.len() < 10 || f[3] != "0A" || !inodes.iter().any(|i| i == f[9]) {
            continue;
        }
        let port_hex = f[1].rsplit(':').next()?;
        return u16::from_str_radix(port_hex, 16).ok();
    }
    None
}
