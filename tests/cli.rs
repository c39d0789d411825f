//! Command line behaviour: startup errors, printed URIs, upstream address
//! forms and what happens when the upstream is unreachable.

mod common;

use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::time::Duration;

use common::*;
use tempfile::TempDir;

const MIB: u64 = 1 << 20;

/// Runs nbdfault expecting a startup failure: it must exit (within 20 s)
/// with a non-zero status, print nothing on stdout and exactly one line on
/// stderr, which mentions `needle`. Returns that line.
fn startup_error(args: &[&str], needle: &str) -> String {
    let o = run_with_timeout(nbdfault_bin(), args, Duration::from_secs(20));
    assert!(
        !o.success(),
        "expected a non-zero exit status\n{}",
        o.describe()
    );
    assert_eq!(
        o.stdout,
        "",
        "nothing must be printed on stdout\n{}",
        o.describe()
    );
    let err = o.stderr.trim();
    assert_eq!(
        err.lines().count(),
        1,
        "expected exactly one line on stderr\n{}",
        o.describe()
    );
    assert!(
        err.contains(needle),
        "stderr does not mention {needle:?}\n{}",
        o.describe()
    );
    err.to_string()
}

#[test]
fn bad_listen_address() {
    startup_error(
        &[
            "proxy",
            "--listen",
            "nonsense",
            "--upstream",
            "127.0.0.1:10809",
        ],
        "nonsense",
    );
    startup_error(&["null", "--listen", "nonsense"], "nonsense");
    startup_error(
        &["null", "--listen", "127.0.0.1:notaport"],
        "127.0.0.1:notaport",
    );
    startup_error(&["null", "--listen", "127.0.0.1:70000"], "127.0.0.1:70000");
}

#[test]
fn port_in_use() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("127.0.0.1:{}", taken.local_addr().unwrap().port());
    startup_error(
        &["proxy", "--listen", &addr, "--upstream", "127.0.0.1:10809"],
        &addr,
    );
    startup_error(&["null", "--listen", &addr], &addr);
    drop(taken);
}

#[test]
fn bad_upstream_uri() {
    startup_error(
        &[
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "nbds://x/",
        ],
        "nbds://x/",
    );
    startup_error(
        &[
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "nbd://host:port:x/",
        ],
        "nbd://host:port:x/",
    );
}

#[test]
fn existing_unix_socket_path() {
    let dir = TempDir::new().unwrap();
    // A live socket at the path.
    let sock = dir.path().join("taken.sock");
    let _listener = UnixListener::bind(&sock).unwrap();
    let s = sock.to_str().unwrap();
    startup_error(
        &["proxy", "--listen", s, "--upstream", "127.0.0.1:10809"],
        s,
    );
    startup_error(&["null", "--listen", s], s);
    startup_error(&["null", "--listen", &format!("unix:{s}")], s);
    // A regular file at the path: never clobbered.
    let file = dir.path().join("regular-file");
    std::fs::write(&file, b"precious").unwrap();
    let f = file.to_str().unwrap();
    startup_error(&["null", "--listen", f], f);
    assert_eq!(std::fs::read(&file).unwrap(), b"precious");
}

#[test]
fn bad_size() {
    let o = run_with_timeout(
        nbdfault_bin(),
        &["null", "--listen", "127.0.0.1:0", "--size", "12Q"],
        Duration::from_secs(20),
    );
    assert!(!o.success(), "{}", o.describe());
    assert!(o.stderr.contains("12Q"), "{}", o.describe());
}

#[test]
fn listening_uris() {
    let n = Nbdfault::start(&["null", "--listen", "127.0.0.1:0"]);
    let port: u16 = n
        .uri()
        .strip_prefix("nbd://127.0.0.1:")
        .unwrap_or_else(|| panic!("unexpected URI {:?}", n.uri()))
        .parse()
        .unwrap_or_else(|_| panic!("no port in {:?}", n.uri()));
    assert_ne!(port, 0, "the real port must be printed");

    let dir = TempDir::new().unwrap();
    let sock = dir.path().join("n.sock");
    let n2 = Nbdfault::start(&["null", "--listen", sock.to_str().unwrap()]);
    assert_eq!(n2.uri(), format!("nbd+unix:///?socket={}", sock.display()));
    assert!(n2.more_stdout().is_empty());
}

#[test]
fn upstream_address_forms() {
    let kit = Nbdkit::start_tcp(&["memory", "8M"]);
    let port = kit.port.unwrap();
    let dir = TempDir::new().unwrap();
    let file = dir.path().join("disk.raw");
    write_sparse_file(&file, 4 * MIB, &[(0, b"hello")]);
    let q = QemuNbd::raw(&file);
    let sock = q.sock.to_str().unwrap().to_string();

    let cases = [
        (format!("127.0.0.1:{port}"), "8388608"),
        (format!("nbd://127.0.0.1:{port}"), "8388608"),
        (format!("nbd://127.0.0.1:{port}/"), "8388608"),
        (sock.clone(), "4194304"),
        (format!("nbd+unix:///?socket={sock}"), "4194304"),
    ];
    for (upstream, size) in cases {
        let p = Nbdfault::proxy(&upstream);
        let o = run("nbdinfo", &["--size", p.uri()]);
        assert!(
            o.success(),
            "upstream {upstream}\n{}\n--- proxy stderr ---\n{}",
            o.describe(),
            p.stderr()
        );
        assert_eq!(o.stdout.trim(), size, "upstream {upstream}");
    }
}

#[test]
fn ipv6_upstream_and_listen() {
    // nbdfault's own null server as an IPv6 upstream.
    let up = Nbdfault::start(&["null", "--listen", "[::1]:0", "--size", "3M"]);
    let hostport = up
        .uri()
        .strip_prefix("nbd://")
        .unwrap_or_else(|| panic!("unexpected URI {:?}", up.uri()))
        .to_string();
    assert!(hostport.starts_with("[::1]:"), "{hostport}");
    for upstream in [hostport.clone(), format!("nbd://{hostport}/")] {
        let p = Nbdfault::proxy_on("[::1]:0", &upstream);
        assert!(p.uri().starts_with("nbd://[::1]:"), "{}", p.uri());
        let o = run("nbdinfo", &["--size", p.uri()]);
        assert!(
            o.success(),
            "upstream {upstream}\n{}\n--- proxy stderr ---\n{}",
            o.describe(),
            p.stderr()
        );
        assert_eq!(o.stdout.trim(), "3145728", "upstream {upstream}");
    }
}

/// Starts a proxy to an unreachable upstream; a client fails, the proxy
/// keeps running and names the target in its log.
fn unreachable(upstream: &str) -> Nbdfault {
    let mut p = Nbdfault::proxy(upstream);
    let o = run("nbdinfo", &[p.uri()]);
    assert!(
        !o.success(),
        "nbdinfo succeeded through a proxy with no upstream\n{}",
        o.describe()
    );
    assert!(
        p.wait_for_stderr(upstream, Duration::from_secs(10)),
        "proxy stderr does not mention {upstream:?}:\n{}",
        p.stderr()
    );
    assert!(p.is_running(), "proxy exited\n{}", p.stderr());
    // And again: still serving (and still failing the same way).
    let o2 = run("nbdinfo", &[p.uri()]);
    assert!(!o2.success(), "{}", o2.describe());
    assert!(p.is_running(), "proxy exited\n{}", p.stderr());
    p
}

#[test]
fn unreachable_tcp_upstream() {
    unreachable("127.0.0.1:1");
}

#[test]
fn unreachable_unix_upstream() {
    let dir = TempDir::new().unwrap();
    let sock = dir.path().join("nobody-here.sock");
    unreachable(sock.to_str().unwrap());
}

#[test]
fn proxy_keeps_serving_after_upstream_appears() {
    let dir = TempDir::new().unwrap();
    let sock = dir.path().join("later.sock");
    let mut p = unreachable(sock.to_str().unwrap());

    let file = dir.path().join("disk.raw");
    write_sparse_file(&file, 6 * MIB, &[(MIB, b"now it works")]);
    let q = QemuNbd::start_at(&sock, "raw", &file, &[]);
    let o = run("nbdinfo", &["--size", p.uri()]);
    assert!(
        o.success(),
        "nbdinfo failed once the upstream exists\n{}\n--- proxy stderr ---\n{}",
        o.describe(),
        p.stderr()
    );
    assert_eq!(o.stdout.trim(), (6 * MIB).to_string());
    let out = nbdsh(p.uri(), "print(h.pread(12, 1048576))");
    assert_eq!(out.trim(), "bytearray(b'now it works')");
    assert!(p.is_running());
    drop(q);
}

#[test]
fn upstream_dies_between_clients() {
    // The upstream goes away and comes back: the proxy survives both.
    let dir = TempDir::new().unwrap();
    let file = dir.path().join("disk.raw");
    write_sparse_file(&file, 2 * MIB, &[]);
    let sock = dir.path().join("up.sock");
    let q = QemuNbd::start_at(&sock, "raw", &file, &[]);
    let mut p = Nbdfault::proxy(sock.to_str().unwrap());
    assert_eq!(run_ok("nbdinfo", &["--size", p.uri()]).trim(), "2097152");
    drop(q);
    let _ = std::fs::remove_file(&sock);
    let o = run("nbdinfo", &["--size", p.uri()]);
    assert!(!o.success(), "{}", o.describe());
    assert!(p.is_running(), "proxy exited\n{}", p.stderr());
    let _q2 = QemuNbd::start_at(&sock, "raw", &file, &[]);
    assert_eq!(run_ok("nbdinfo", &["--size", p.uri()]).trim(), "2097152");
}

/// The listening unix socket is owner-only unless `--socket-mode` says
/// otherwise; the mode is checked and only means something for a socket.
#[test]
fn unix_socket_mode() {
    use std::os::unix::fs::PermissionsExt;
    require_tool("nbdinfo");
    let dir = TempDir::new().unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    let default = dir.path().join("default.sock");
    let p = Nbdfault::start(&["null", "--listen", default.to_str().unwrap()]);
    assert_eq!(mode(&default), 0o600);
    drop(p);
    let group = dir.path().join("group.sock");
    let p = Nbdfault::start(&[
        "null",
        "--listen",
        group.to_str().unwrap(),
        "--socket-mode",
        "660",
    ]);
    assert_eq!(mode(&group), 0o660);
    assert_eq!(run_ok("nbdinfo", &["--size", p.uri()]).trim(), "8589934592");
    drop(p);

    startup_error(
        &["null", "--listen", "127.0.0.1:0", "--socket-mode", "660"],
        "--socket-mode applies to a unix socket",
    );
    for bad in ["1777", "69", "rw"] {
        let o = run_with_timeout(
            nbdfault_bin(),
            &["null", "--listen", "x.sock", "--socket-mode", bad],
            Duration::from_secs(20),
        );
        assert!(!o.success(), "{}", o.describe());
        assert!(o.stderr.contains("--socket-mode"), "{}", o.describe());
    }
}

/// `--busy-poll` is bounded and needs single-threaded runtimes; each
/// refusal names the flag and what is allowed, and starts nothing.
#[test]
fn busy_poll_limits() {
    startup_error(
        &["null", "--listen", "127.0.0.1:0", "--busy-poll", "2ms"],
        "--busy-poll 2ms is too long: at most 1ms",
    );
    startup_error(
        &[
            "null",
            "--listen",
            "127.0.0.1:0",
            "--threads",
            "0",
            "--busy-poll",
            "50us",
        ],
        "--busy-poll needs --threads 1 or more",
    );
    let o = run_with_timeout(
        nbdfault_bin(),
        &["null", "--listen", "127.0.0.1:0", "--busy-poll", "fast"],
        Duration::from_secs(20),
    );
    assert!(!o.success(), "{}", o.describe());
    assert!(
        o.stderr
            .contains("invalid value 'fast' for '--busy-poll <DURATION>'"),
        "{}",
        o.describe()
    );
}

/// By default the null server runs one thread per core and the proxy one
/// per two cores (its client and server need the others); `--threads`
/// overrides both. Counted as the shard threads besides the main one.
#[test]
fn default_threads_per_mode() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let shards = |p: &Nbdfault| {
        std::fs::read_dir(format!("/proc/{}/task", p.pid()))
            .unwrap()
            .filter(|t| {
                let comm = t.as_ref().unwrap().path().join("comm");
                std::fs::read_to_string(comm).is_ok_and(|c| c.starts_with("nbdfault-shard"))
            })
            .count()
    };
    // A thread names itself once it runs, which may be just after
    // `Listening on`: give the count a moment to settle.
    let settled = |p: &Nbdfault, n: usize| {
        wait_until(Duration::from_secs(5), || shards(p) == n);
        shards(p)
    };
    let null = Nbdfault::start(&["null", "--listen", "127.0.0.1:0"]);
    assert_eq!(settled(&null, cores - 1), cores - 1);
    let proxy = Nbdfault::start(&["proxy", "--listen", "127.0.0.1:0", "--upstream", null.uri()]);
    assert_eq!(
        settled(&proxy, cores.div_ceil(2) - 1),
        cores.div_ceil(2) - 1
    );
    let three = Nbdfault::start(&[
        "proxy",
        "--threads",
        "3",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        null.uri(),
    ]);
    assert_eq!(settled(&three, 2), 2);
}
