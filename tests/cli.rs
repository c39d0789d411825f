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

// ---------------------------------------------------------------------------
// Issue 18: a new user's friction.
// ---------------------------------------------------------------------------

/// The first stderr line containing `needle`, waiting up to 10 s for it.
fn stderr_line(p: &Nbdfault, needle: &str) -> String {
    assert!(
        p.wait_for_stderr(needle, Duration::from_secs(10)),
        "no {needle:?} on stderr\n{}",
        p.stderr()
    );
    let err = p.stderr();
    err.lines()
        .find(|l| l.contains(needle))
        .unwrap_or_default()
        .to_string()
}

/// `-v` logs each connection's accept and close (INFO), as `--help` says;
/// without it, neither shows.
#[test]
fn verbose_logs_connections() {
    require_tool("nbdinfo");
    let p = Nbdfault::start(&["-v", "null", "--listen", "127.0.0.1:0"]);
    run_ok("nbdinfo", &["--size", p.uri()]);
    stderr_line(&p, "connection closed conn=1");
    let accepted = stderr_line(&p, " accepted conn=1 peer=127.0.0.1:");
    assert!(accepted.contains(" INFO nbdfault::server: "), "{accepted}");

    let quiet = Nbdfault::start(&["null", "--listen", "127.0.0.1:0"]);
    run_ok("nbdinfo", &["--size", quiet.uri()]);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(quiet.stderr(), "", "nothing logged without -v");
}

/// The upstream is looked at once at start: a socket path that is not
/// there, a warning names it and the OS error; with `--check-upstream` it
/// is connected to, and a failure is a startup error (one line, exit 1,
/// nothing listening). A reachable one: neither.
#[test]
fn upstream_is_tried_at_start() {
    let dir = TempDir::new().unwrap();
    let sock = dir.path().join("typo.sock");
    let s = sock.to_str().unwrap();
    let p = Nbdfault::proxy(s);
    let warning = format!(
        "WARN nbdfault::process: upstream unix:{s} is not there at start: No such file or \
         directory (os error 2); every client will fail until it is (--check-upstream connects \
         to it and refuses to start without it)"
    );
    assert!(
        p.wait_for_stderr(&warning, Duration::from_secs(5)),
        "{}",
        p.stderr()
    );
    assert_eq!(p.stderr().lines().count(), 1, "{}", p.stderr());

    let line = startup_error(
        &[
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            s,
            "--check-upstream",
        ],
        "--check-upstream",
    );
    assert_eq!(
        line,
        format!(
            "nbdfault: cannot reach upstream unix:{s} (--check-upstream): No such file or \
             directory (os error 2)"
        )
    );
    startup_error(
        &[
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "127.0.0.1:1",
            "--check-upstream",
        ],
        "nbdfault: cannot reach upstream 127.0.0.1:1 (--check-upstream): Connection refused \
         (os error 111)",
    );

    let up = Nbdfault::start(&["null", "--listen", "127.0.0.1:0", "--size", "1M"]);
    let p = Nbdfault::start(&[
        "proxy",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        up.uri(),
        "--check-upstream",
    ]);
    assert_eq!(run_ok("nbdinfo", &["--size", p.uri()]).trim(), "1048576");
    assert_eq!(p.stderr(), "", "no warning for a reachable upstream");
}

/// `--help` is grouped, wrapped to the terminal, and ends with examples
/// and a pointer to the rule reference; `check --help` describes FILE|DIR.
#[test]
fn help_is_grouped_with_examples() {
    for cmd in ["proxy", "null"] {
        let o = run_with_timeout(
            "env",
            &["COLUMNS=80", nbdfault_bin(), cmd, "--help"],
            Duration::from_secs(20),
        );
        assert!(o.success(), "{}", o.describe());
        let headings: Vec<&str> = o
            .stdout
            .lines()
            .filter(|l| l.ends_with(':') && !l.starts_with(' '))
            .collect();
        assert_eq!(
            headings,
            [
                "Options:",
                "Listening:",
                "Rules and faults:",
                "Observing and steering:",
                "Limits:",
                "Performance:",
                "Examples:"
            ],
            "{cmd} --help\n{}",
            o.stdout
        );
        let widest = o.stdout.lines().map(|l| l.chars().count()).max();
        assert!(
            widest <= Some(80),
            "{cmd} --help is wider than 80\n{}",
            o.stdout
        );
        assert!(
            o.stdout
                .contains("the \"Rules\" section of README.md is the reference"),
            "{}",
            o.stdout
        );
    }
    let o = run_with_timeout(
        nbdfault_bin(),
        &["check", "--help"],
        Duration::from_secs(20),
    );
    assert!(
        o.stdout
            .contains("<FILE|DIR>...  Rules files (YAML or QEMU injector INI), or directories"),
        "{}",
        o.stdout
    );
}

/// `--version` names the commit the binary was built from.
#[test]
fn version_names_the_commit() {
    let o = run_with_timeout(nbdfault_bin(), &["--version"], Duration::from_secs(20));
    assert!(o.success(), "{}", o.describe());
    let head = run_with_timeout(
        "git",
        &[
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "rev-parse",
            "--short=12",
            "HEAD",
        ],
        Duration::from_secs(20),
    );
    let commit = if head.success() {
        head.stdout.trim().to_string()
    } else {
        "unknown".to_string()
    };
    assert_eq!(
        o.stdout,
        format!("nbdfault {} (commit {commit})\n", env!("CARGO_PKG_VERSION"))
    );
}

/// The man pages and completion scripts come from the clap definitions:
/// `man` renders, and bash completes a flag from the script.
#[test]
fn man_pages_and_completions() {
    let dir = TempDir::new().unwrap();
    let out = run_with_timeout(
        nbdfault_bin(),
        &["man", "--dir", dir.path().to_str().unwrap()],
        Duration::from_secs(20),
    );
    assert!(out.success(), "{}", out.describe());
    let mut pages: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    pages.sort();
    assert_eq!(
        pages,
        [
            "nbdfault-chart.1",
            "nbdfault-check.1",
            "nbdfault-legacy.1",
            "nbdfault-null.1",
            "nbdfault-proxy.1",
            "nbdfault-sweep.1",
            "nbdfault-trace.1",
            "nbdfault.1"
        ]
    );
    let proxy = std::fs::read_to_string(dir.path().join("nbdfault-proxy.1")).unwrap();
    assert!(proxy.contains("check\\-upstream"), "{proxy}");
    let main = run_with_timeout(nbdfault_bin(), &["man"], Duration::from_secs(20));
    assert!(
        main.stdout.contains(".TH nbdfault 1"),
        "{}",
        main.describe()
    );

    let script = run_with_timeout(
        nbdfault_bin(),
        &["completions", "bash"],
        Duration::from_secs(20),
    );
    assert!(script.success(), "{}", script.describe());
    let file = dir.path().join("nbdfault.bash");
    std::fs::write(&file, &script.stdout).unwrap();
    let o = run_with_timeout(
        "bash",
        &[
            "-c",
            "source \"$0\"; COMP_WORDS=(nbdfault proxy --check-up); COMP_CWORD=2; \
             _nbdfault nbdfault --check-up proxy; echo \"${COMPREPLY[@]}\"",
            file.to_str().unwrap(),
        ],
        Duration::from_secs(20),
    );
    assert_eq!(o.stdout, "--check-upstream\n", "{}", o.describe());
    for shell in ["zsh", "fish"] {
        let o = run_with_timeout(
            nbdfault_bin(),
            &["completions", shell],
            Duration::from_secs(20),
        );
        assert!(
            o.success() && o.stdout.contains("check-upstream"),
            "{shell}\n{}",
            o.describe()
        );
    }
}

/// Sizes are what qemu-img makes of them, byte for byte, and what it
/// refuses is refused: each checked against a real `qemu-img create`.
#[test]
fn sizes_match_qemu_img() {
    require_tool("qemu-img");
    let dir = TempDir::new().unwrap();
    let img = dir.path().join("x.img");
    // The size qemu-img parsed, from `Formatting 'x.img', fmt=raw size=N`
    // (the file itself is rounded up to whole sectors).
    let qemu = |size: &str| -> Option<u64> {
        let o = run(
            "qemu-img",
            &["create", "-f", "raw", img.to_str().unwrap(), size],
        );
        let n = o.stdout.split("size=").nth(1)?.trim().parse().ok();
        o.success().then_some(n).flatten()
    };
    for size in [
        "1.5G", "8G", "8g", "512", "1k", "1.7k", "0.1k", ".5M", "1.M", "0x10", "1.0", "1b", "8GB",
        "8gb", "8GiB", "1.5", "1.5B", "1e3", "1 M",
    ] {
        let ours = run_with_timeout(
            nbdfault_bin(),
            &["null", "--size", size, "--run", "nbdinfo --size \"$uri\""],
            Duration::from_secs(20),
        );
        let ours = ours
            .success()
            .then(|| ours.stdout.trim().parse::<u64>().ok())
            .flatten();
        assert_eq!(ours, qemu(size), "--size {size:?}: nbdfault vs qemu-img");
    }
}

/// A null server on a free port with the control API on another; its URL.
fn null_with_control(extra: &[&str]) -> (Nbdfault, String) {
    let mut args = vec![
        "null",
        "--listen",
        "127.0.0.1:0",
        "--control",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    let p = Nbdfault::start(&args);
    let url = p.control_url();
    (p, url)
}

/// INI rules get names that survive `key=value` log parsing and URLs: the
/// fault line's fields split on spaces, and `DELETE /rules/NAME` works.
#[test]
fn ini_rule_names_are_log_and_url_safe() {
    require_tool("curl");
    let dir = TempDir::new().unwrap();
    let ini = dir.path().join("r.ini");
    std::fs::write(
        &ini,
        "[inject-error \"disconnect neg1\"]\nevent=neg1\nwhen=before\n",
    )
    .unwrap();
    let (p, url) = null_with_control(&["--rules", ini.to_str().unwrap()]);
    let o = run("nbdinfo", &[p.uri()]);
    assert!(!o.success(), "{}", o.describe());
    let line = stderr_line(&p, " fault conn=1 ");
    let fields: Vec<&str> = line
        .split(" fault ")
        .nth(1)
        .unwrap_or("")
        .split(' ')
        .collect();
    assert_eq!(
        fields,
        [
            "conn=1",
            "rule=disconnect-neg1",
            "action=disconnect",
            "event=neg1",
            "direction=to-client",
            "bytes=18",
            "stream_offset=0"
        ],
        "{line}"
    );
    let body = curl(&[&format!("{url}/rules")]);
    assert!(body.contains("\"name\": \"disconnect-neg1\""), "{body}");
    assert_eq!(
        curl(&["-X", "DELETE", &format!("{url}/rules/disconnect-neg1")]),
        "\n204"
    );
}

/// `/metrics` has no series that cannot happen, and a connection's keys
/// come in the same order from GET and POST.
#[test]
fn metrics_and_connection_listings() {
    require_tool("curl");
    require_tool("qemu-io");
    let (p, url) = null_with_control(&[]);
    let mut idle = QemuIo::new(p.uri()).spawn_idle();
    assert!(wait_until(Duration::from_secs(10), || curl(&[&format!(
        "{url}/connections"
    )])
    .contains("\"id\": 1")));
    let metrics = curl(&[&format!("{url}/metrics")]);
    let series: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("nbdfault_events_total{"))
        .map(|l| l.rsplit_once(' ').map_or(l, |(s, _)| s))
        .collect();
    let ev = |e: &str, d: &str| format!("nbdfault_events_total{{event=\"{e}\",direction=\"{d}\"}}");
    let mut want = vec![ev("connect", "none")];
    for e in ["neg-classic", "neg1", "option-reply", "neg2", "reply"] {
        want.push(ev(e, "to-client"));
    }
    for e in ["export", "export-name", "request"] {
        want.push(ev(e, "to-server"));
    }
    want.push(ev("data", "to-server"));
    want.push(ev("data", "to-client"));
    let mut got: Vec<String> = series.iter().map(|s| s.to_string()).collect();
    got.sort();
    want.sort();
    assert_eq!(got, want, "{metrics}");

    let keys = |json: &str| -> Vec<String> {
        // Keys in the order they are written, from the first connection
        // (pretty-printed: one key a line).
        let obj = &json[json.find("\"id\"").unwrap_or(0)..];
        let obj = &obj[..obj.find('}').unwrap_or(obj.len())];
        obj.lines()
            .filter_map(|l| l.trim().strip_prefix('"')?.split_once("\":"))
            .map(|(k, _)| k.to_string())
            .collect()
    };
    let listed = curl(&[&format!("{url}/connections")]);
    let paused = curl(&["-X", "POST", &format!("{url}/connections/1/pause")]);
    let one = curl(&[&format!("{url}/connections/1")]);
    assert_eq!(keys(&listed), keys(&paused), "{listed}\n{paused}");
    assert_eq!(keys(&one), keys(&paused), "{one}\n{paused}");
    assert_eq!(
        keys(&paused),
        [
            "id",
            "client",
            "export",
            "started",
            "bytes_to_server",
            "bytes_to_client",
            "requests_in_flight",
            "paused"
        ]
    );
    let _ = idle.kill();
    let _ = idle.wait();
}
