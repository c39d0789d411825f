//! The Rust API (`nbdfault::Proxy`, `nbdfault::Null`, the `Running`
//! handle) with real peers: qemu-nbd behind it, qemu-io and nbdinfo in
//! front, rules changed through the handle while they run; its errors
//! against the command line's; its shutdown leaving no thread or socket;
//! and `examples/flaky_reads.rs`, run as README.md shows it.

mod common;

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use common::*;
use tempfile::TempDir;

/// Every test here runs alone: the thread count of one must not see the
/// servers of another.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

const EIO_READS: &str = "\
rules:
  - name: eio-reads
    event: request
    command: read
    offset: 1M..
    action: error
    errno: EIO
";

/// A 4 MiB sparse raw image behind qemu-nbd, in `dir`, and a proxy
/// builder in front of it.
fn qemu_nbd_disk(dir: &TempDir) -> (QemuNbd, nbdfault::Builder<nbdfault::api::ProxyTo>) {
    let image = dir.path().join("disk.img");
    create_sparse(&image, 4 << 20);
    let disk = QemuNbd::raw(&image);
    let proxy = nbdfault::Proxy::builder().upstream(disk.uri());
    (disk, proxy)
}

fn qemu_io_ok(uri: &str, cmd: &str) -> String {
    QemuIo::new(uri).cmd(cmd).run_ok()
}

/// A rule added through the handle fails exactly the reads it names, as
/// qemu-io reports them; removed, reads work again; the counters and the
/// metrics say so.
#[test]
fn rules_changed_through_the_handle_reach_qemu_io_through_qemu_nbd() {
    let _serial = serial();
    let dir = TempDir::new().unwrap();
    let (_disk, proxy) = qemu_nbd_disk(&dir);
    let proxy = proxy.check_upstream(true).spawn().unwrap();
    assert!(
        proxy.uri().starts_with("nbd+unix:///?socket="),
        "{}",
        proxy.uri()
    );
    let read = |cmd: &str| QemuIo::new(proxy.uri()).cmd(cmd).run();
    let out = read("read -q 1M 4k");
    assert_eq!(out.stdout, "", "{}", out.describe());

    proxy.add_rules(EIO_READS).unwrap();
    let out = read("read -q 1M 4k");
    assert_eq!(
        out.stdout,
        "read failed: Input/output error\n",
        "{}",
        out.describe()
    );
    // Below the rule's offsets, reads still pass.
    assert_eq!(qemu_io_ok(proxy.uri(), "read -q 0 4k"), "");
    let rules = proxy.rules();
    assert_eq!(rules.len(), 1);
    assert_eq!(
        (rules[0].name.as_str(), rules[0].matched, rules[0].fired),
        ("eio-reads", 1, 1)
    );
    let faults = proxy.faults();
    assert_eq!(faults.len(), 1, "{faults:?}");
    let f = &faults[0];
    assert_eq!(
        (
            f.rule.as_str(),
            f.action,
            f.events.as_slice(),
            f.direction,
            f.command,
            f.offset,
            f.length
        ),
        (
            "eio-reads",
            "error",
            &["request"][..],
            Some("to-server"),
            Some("read"),
            Some(1 << 20),
            Some(4096)
        )
    );
    let m = proxy.metrics();
    assert!(
        m.lines()
            .any(|l| l == r#"nbdfault_faults_total{rule="eio-reads",action="error"} 1"#),
        "{m}"
    );

    proxy.remove_rule("eio-reads").unwrap();
    assert_eq!(qemu_io_ok(proxy.uri(), "read -q 1M 4k"), "");
    assert!(proxy.rules().is_empty());
    let e = proxy.remove_rule("eio-reads").unwrap_err();
    assert_eq!(e.to_string(), "no rule named \"eio-reads\"");
    proxy.shutdown().unwrap();
}

/// `connections()` lists a live qemu-io, typed; pause, resume and
/// disconnect reach it.
#[test]
fn connections_lists_a_live_client_and_steers_it() {
    let _serial = serial();
    let dir = TempDir::new().unwrap();
    let (_disk, proxy) = qemu_nbd_disk(&dir);
    let proxy = proxy.listen("127.0.0.1:0").spawn().unwrap();
    assert!(proxy.connections().is_empty());
    let mut client = QemuIo::new(proxy.uri()).spawn_idle();
    let mut conns = Vec::new();
    let seen = wait_until(Duration::from_secs(10), || {
        conns = proxy.connections();
        conns.len() == 1 && conns[0].export.is_some()
    });
    assert!(seen, "{conns:?}");
    let c = &conns[0];
    assert_eq!(c.id, 1);
    assert!(c.peer.starts_with("127.0.0.1:"), "{c:?}");
    assert_eq!(c.export.as_deref(), Some(""));
    assert!(!c.paused);
    assert!(c.bytes_to_client > 0, "{c:?}");

    proxy.pause(c.id).unwrap();
    assert!(proxy.connections()[0].paused);
    proxy.resume(c.id).unwrap();
    assert!(!proxy.connections()[0].paused);
    assert_eq!(proxy.pause(99).unwrap_err().to_string(), "no connection 99");
    proxy.disconnect(c.id).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || proxy.connections().is_empty()),
        "{:?}",
        proxy.connections()
    );
    kill_child(&mut client);
    proxy.shutdown().unwrap();
}

/// The threads this crate and tokio start, by name (`nbdfault-api`,
/// `nbdfault-shard-N`, `nbdfault-telemetry`, `tokio-runtime-worker`):
/// the test harness's own come and go with other tests.
fn server_threads() -> Vec<String> {
    let mut names = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let Ok(comm) = std::fs::read_to_string(task.path().join("comm")) else {
            continue; // ended meanwhile
        };
        let comm = comm.trim_end().to_string();
        if comm.starts_with("nbdfault") || comm.starts_with("tokio") {
            names.push(comm);
        }
    }
    names.sort();
    names
}

/// Shutdown (or drop) ends a live connection, removes the unix socket so
/// that a second server can take the same path, and joins every thread
/// it started, whatever the threading.
/// A unix socket is the owner's alone unless `socket_mode` widens it, as
/// `--socket-mode` does.
#[test]
fn socket_mode_sets_the_unix_socket_s_permissions() {
    use std::os::unix::fs::PermissionsExt;
    // Its server threads must not count in another test's.
    let _serial = serial();
    let dir = TempDir::new().unwrap();
    for (mode, want) in [(None, 0o600), (Some(0o660), 0o660)] {
        let sock = dir.path().join(format!("{want:o}.sock"));
        let mut b = nbdfault::Null::builder().listen(sock.display().to_string());
        if let Some(m) = mode {
            b = b.socket_mode(m);
        }
        let null = b.spawn().unwrap();
        let got = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
        assert_eq!(got, want, "{mode:?}");
        null.shutdown().unwrap();
    }
}

#[test]
fn shutdown_frees_the_socket_and_leaves_no_thread() {
    let _serial = serial();
    require_tool("qemu-io");
    let dir = TempDir::new().unwrap();
    let sock = dir.path().join("nbd.sock");
    let before = server_threads();
    for threads in [1, 2, 0] {
        let null = nbdfault::Null::builder()
            .size(1 << 20)
            .listen(sock.display().to_string())
            .threads(threads)
            .spawn()
            .unwrap();
        assert!(sock.exists());
        assert!(server_threads().len() > before.len());
        let mut client = QemuIo::new(null.uri()).spawn_idle();
        assert!(
            wait_until(Duration::from_secs(10), || null.connections().len() == 1),
            "threads {threads}: no connection"
        );
        if threads == 2 {
            drop(null);
        } else {
            null.shutdown().unwrap();
        }
        assert!(!sock.exists(), "threads {threads}: the socket is left");
        // The client saw its connection end: qemu-io is still waiting on
        // stdin, but its connection is gone, as a fresh server shows.
        kill_child(&mut client);
        let mut now = Vec::new();
        let gone = wait_until(Duration::from_secs(5), || {
            now = server_threads();
            now == before
        });
        assert!(gone, "threads {threads}: {now:?} left, {before:?} before");
    }
    // The private directory of a default listener goes too.
    let null = nbdfault::Null::builder().spawn().unwrap();
    let private = null.socket().unwrap().parent().unwrap().to_path_buf();
    assert!(private.is_dir());
    null.shutdown().unwrap();
    assert!(!private.exists(), "{}", private.display());
}

/// The error of a bad rules document is the line the command line prints
/// for the same text (named `rules_yaml` when given as text); at run
/// time nothing changes on a bad document or a taken name.
#[test]
fn a_bad_rules_document_is_refused_with_the_command_lines_message() {
    let _serial = serial();
    let dir = TempDir::new().unwrap();
    let bad = "rules:\n  - name: eio\n    event: request\n    action: eror\n";
    let file = dir.path().join("bad.yaml");
    std::fs::write(&file, bad).unwrap();
    let file_s = file.display().to_string();
    let cli = run_fail(
        nbdfault_bin(),
        &["null", "--listen", "127.0.0.1:0", "--rules", &file_s],
    );
    let cli_line = cli.stderr.trim_end();
    assert!(
        cli_line.starts_with(&format!("nbdfault: {file_s}:4:")),
        "{}",
        cli.describe()
    );

    let e = nbdfault::Null::builder()
        .rules_file(&file)
        .spawn()
        .unwrap_err();
    assert!(matches!(e, nbdfault::Error::Rules(_)), "{e:?}");
    assert_eq!(format!("nbdfault: {e}"), cli_line);
    let e = nbdfault::Null::builder()
        .rules_yaml(bad)
        .spawn()
        .unwrap_err();
    assert_eq!(
        format!("nbdfault: {e}"),
        cli_line.replace(&file_s, nbdfault::api::RULES_YAML)
    );

    let null = null_in_process(1 << 20, EIO_READS);
    let e = null.add_rules(bad).unwrap_err();
    assert_eq!(
        format!("nbdfault: {e}"),
        cli_line.replace(&file_s, nbdfault::api::ADD_RULES)
    );
    let e = null.add_rules(EIO_READS).unwrap_err();
    assert_eq!(e.to_string(), "a rule named \"eio-reads\" already exists");
    let names: Vec<String> = null.rules().into_iter().map(|r| r.name).collect();
    assert_eq!(names, ["eio-reads"]);

    // Nothing to listen on, no upstream: errors, no panic.
    let e = nbdfault::Proxy::builder().spawn().unwrap_err();
    assert_eq!(
        e.to_string(),
        "a proxy needs an upstream: call .upstream(TARGET) on its builder"
    );
    let gone = dir.path().join("no.sock");
    let e = nbdfault::Proxy::builder()
        .upstream(gone.display().to_string())
        .check_upstream(true)
        .spawn()
        .unwrap_err();
    let chain = std::iter::successors(Some(&e as &dyn std::error::Error), |e| e.source())
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join(": ");
    assert_eq!(
        chain,
        format!(
            "cannot reach upstream unix:{} (--check-upstream): No such file or directory \
             (os error 2)",
            gone.display()
        )
    );
    let taken = null.uri().trim_start_matches("nbd://").to_string();
    let e = nbdfault::Null::builder()
        .listen(&taken)
        .spawn()
        .unwrap_err();
    assert_eq!(e.to_string(), format!("cannot listen on {taken}"));
    null.shutdown().unwrap();
}

/// The README's "From Rust" block, and what it says the program prints.
fn readme_from_rust() -> (String, String) {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let section = readme
        .split_once("### From Rust\n")
        .expect("README.md has a \"From Rust\" section")
        .1;
    let section = section.split("\n## ").next().unwrap();
    let block = |lang: &str| -> String {
        let start = format!("```{lang}\n");
        let from = section
            .find(&start)
            .unwrap_or_else(|| panic!("no ```{lang} block in \"From Rust\""));
        let rest = &section[from + start.len()..];
        rest[..rest.find("```\n").unwrap()].to_string()
    };
    (block("rust"), block("text"))
}

/// `examples/flaky_reads.rs` is the README's program, and prints what the
/// README says, run as it says (`cargo run --release --example`).
#[test]
fn the_example_runs_as_the_readme_shows() {
    let _serial = serial();
    require_tool("qemu-nbd");
    require_tool("qemu-io");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let source = std::fs::read_to_string(root.join("examples/flaky_reads.rs")).unwrap();
    let (code, printed) = readme_from_rust();
    assert_eq!(
        code, source,
        "README.md's \"From Rust\" block is not examples/flaky_reads.rs"
    );
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let manifest = root.join("Cargo.toml").display().to_string();
    let out = run_with_timeout(
        &cargo,
        &[
            "run",
            "--quiet",
            "--release",
            "--manifest-path",
            &manifest,
            "--example",
            "flaky_reads",
        ],
        Duration::from_secs(600),
    );
    assert!(out.success(), "{}", out.describe());
    assert_eq!(out.stdout, printed, "{}", out.describe());
}
