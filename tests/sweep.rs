//! `nbdfault sweep` against real clients (qemu-io, qemu-img, nbdinfo,
//! nbdcopy) and real servers (the null server, qemu-nbd and nbdkit started
//! fresh per run), asserting the classifications a user would read in the
//! report, and that every reproducer does what the report says.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::Value;

/// Runs `nbdfault sweep ARGS`: (exit status, stdout, stderr).
fn sweep(args: &[&str]) -> (i32, String, String) {
    let out = run_with_timeout(
        nbdfault_bin(),
        &[&["sweep"], args].concat(),
        Duration::from_secs(300),
    );
    (
        out.status.code().unwrap_or(-1),
        out.stdout.clone(),
        out.stderr.clone(),
    )
}

fn runs(report: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(report.join("runs.json")).unwrap();
    serde_json::from_str::<Value>(&text)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// The runs of `kind` at `event` (first name) and command.
fn find<'a>(runs: &'a [Value], kind: &str, event: &str, what: &str) -> Vec<&'a Value> {
    runs.iter()
        .filter(|r| {
            r["fault"] == kind && r["point"]["event"] == event && r["point"]["what"] == what
        })
        .collect()
}

/// Processes whose command line holds `marker`.
fn processes_with(marker: &str) -> Vec<String> {
    let out = run("pgrep", &["-af", marker]);
    out.stdout
        .lines()
        .filter(|l| !l.contains("pgrep"))
        .map(String::from)
        .collect()
}

#[test]
fn qemu_io_against_the_null_server_stall_hangs_and_error_is_reported() {
    require_tool("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report");
    // A marker in the command line finds any qemu-io left behind.
    let script = "qemu-io -f raw -c 'read 0 64k' \"$uri\" # sweep-test-marker-1";
    let (code, stdout, stderr) = sweep(&[
        "--null",
        "--size",
        "1M",
        "--events",
        "request,reply",
        "--faults",
        "error,stall",
        "--timeout",
        "3s",
        "--report",
        report.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        script,
    ]);
    assert_eq!(code, 1, "hangs are findings\n{stdout}\n{stderr}");
    let all = runs(&report);
    let stall = find(&all, "stall", "reply", "read");
    assert_eq!(stall.len(), 1, "{all:?}");
    assert_eq!(stall[0]["outcome"], "hang");
    let error = find(&all, "error", "request", "read");
    assert_eq!(error[0]["outcome"], "error");
    assert!(
        error[0]["output_tail"]
            .as_str()
            .unwrap()
            .contains("read failed: Input/output error"),
        "{}",
        error[0]
    );
    assert!(stdout.contains("HANG (run "), "{stdout}");
    assert!(
        stdout.contains("stall forever at reply #1 to-client (read) on connection 1"),
        "{stdout}"
    );
    assert!(
        processes_with("sweep-test-marker-1").is_empty(),
        "{:?}",
        processes_with("sweep-test-marker-1")
    );
    // The page is whole and names the finding.
    let html = std::fs::read_to_string(report.join("index.html")).unwrap();
    assert!(html.contains("<table>") && html.contains("hang — stall forever at reply #1"));
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "self-contained"
    );
}

#[test]
fn a_reproducer_reproduces_its_finding_by_hand() {
    require_tool("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report");
    let script = "qemu-io -f raw -c 'read 0 64k' \"$uri\"";
    let (code, stdout, _) = sweep(&[
        "--size",
        "1M",
        "--events",
        "reply",
        "--faults",
        "stall",
        "--timeout",
        "2s",
        "--report",
        report.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        script,
    ]);
    assert_eq!(code, 1, "{stdout}");
    let hang = runs(&report)
        .into_iter()
        .find(|r| r["outcome"] == "hang")
        .unwrap();
    let repro = report.join(format!("repro/{:03}.yaml", hang["id"].as_u64().unwrap()));
    assert!(nbdfault_check_ok(&repro));
    // By hand: the same rule through `nbdfault proxy` hangs qemu-io the same
    // way (it is killed at the guard), and the fault fires.
    let backing = dir.path().join("disk.img");
    create_sparse(&backing, 1 << 20);
    let q = QemuNbd::raw(&backing);
    let p = Nbdfault::start(&[
        "proxy",
        "--upstream",
        &q.uri(),
        "--rules",
        repro.to_str().unwrap(),
    ]);
    QemuIo::new(p.uri()).cmd("read 0 64k").assert_hangs(2);
    assert!(
        p.wait_for_stderr(" rule=sweep-", Duration::from_secs(5)),
        "{}",
        p.stderr()
    );
}

fn nbdfault_check_ok(file: &Path) -> bool {
    run(nbdfault_bin(), &["check", file.to_str().unwrap()]).success()
}

#[test]
fn nbdcopy_against_qemu_nbd_finds_silent_corruption_with_verify() {
    require_tool("nbdcopy");
    require_tool("qemu-nbd");
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    write_random_file(&src, 1 << 20, 7);
    let report = dir.path().join("report");
    let server = format!(
        "exec qemu-nbd -f raw -r -k \"$unixsocket\" {}",
        src.display()
    );
    let verify = format!("cmp \"$dir/out.img\" {}", src.display());
    let (code, stdout, stderr) = sweep(&[
        "--server",
        &server,
        "--events",
        "data",
        "--faults",
        "corrupt",
        "--verify",
        &verify,
        "--timeout",
        "10s",
        "--report",
        report.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        "nbdcopy \"$uri\" \"$dir/out.img\"",
    ]);
    assert_eq!(code, 1, "{stdout}\n{stderr}");
    let all = runs(&report);
    let corrupt: Vec<_> = all.iter().filter(|r| r["outcome"] == "corrupt").collect();
    assert!(!corrupt.is_empty(), "{all:?}");
    assert!(
        corrupt
            .iter()
            .all(|r| r["point"]["event"] == "data" && r["fault"] == "corrupt")
    );
    assert!(stdout.contains("CORRUPT (run "), "{stdout}");
}

#[test]
fn a_client_that_crashes_is_a_crash() {
    require_tool("nbdinfo");
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report");
    // Sends itself SIGSEGV when its read fails.
    let script = "nbdinfo --size \"$uri\" >/dev/null || kill -SEGV $$";
    let (code, stdout, _) = sweep(&[
        "--size",
        "1M",
        "--events",
        "export",
        "--faults",
        "disconnect",
        "--report",
        report.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        script,
    ]);
    assert_eq!(code, 1, "{stdout}");
    let all = runs(&report);
    assert!(all.iter().any(|r| r["outcome"] == "crash"), "{all:?}");
    assert!(all.iter().all(|r| r["outcome"] != "hang"));
}

#[test]
fn the_same_seed_gives_the_same_report_whatever_the_jobs() {
    require_tool("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let out = |jobs: &str, name: &str| {
        let report = dir.path().join(name);
        // Errors and bit flips are answered the same whatever the timing;
        // a cut right after a message races the client's own next step.
        let (code, _, stderr) = sweep(&[
            "--size",
            "1M",
            "--faults",
            "error,corrupt",
            "--max-points",
            "12",
            "--seed",
            "5",
            "--jobs",
            jobs,
            "--report",
            report.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            "qemu-img convert -f raw -O raw \"$uri\" \"$dir/copy.img\"",
        ]);
        assert!(code == 0 || code == 1, "{stderr}");
        runs(&report)
            .iter()
            .map(|r| {
                (
                    r["id"].clone(),
                    r["point"].clone(),
                    r["fault"].clone(),
                    r["variant"].clone(),
                    r["outcome"].clone(),
                )
            })
            .collect::<Vec<_>>()
    };
    let one = out("1", "a");
    assert_eq!(one.len(), 12);
    assert_eq!(one, out("4", "b"));
}

#[test]
fn nbdkit_started_per_run_serves_every_run_fresh() {
    require_tool("nbdkit");
    require_tool("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report");
    let (code, stdout, stderr) = sweep(&[
        "--server",
        "nbdkit -f -U \"$unixsocket\" memory 1M",
        "--events",
        "request",
        "--faults",
        "error",
        "--report",
        report.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        "qemu-io -f raw -c 'write -P 7 0 64k' -c 'read -P 7 0 64k' \"$uri\"",
    ]);
    assert_eq!(
        code, 0,
        "errors are not findings by default\n{stdout}\n{stderr}"
    );
    let all = runs(&report);
    let write = find(&all, "error", "request", "write");
    assert_eq!(write[0]["variant"], "ENOSPC");
    assert_eq!(write[0]["outcome"], "error");
    assert!(
        write[0]["output_tail"]
            .as_str()
            .unwrap()
            .contains("No space left on device")
    );
    // The read after a failed write sees a fresh disk's zeroes, not 7s:
    // qemu-io reports the pattern mismatch.
    let read = find(&all, "error", "request", "read");
    assert_eq!(read[0]["outcome"], "error");
}

#[test]
fn what_cannot_be_swept_is_said_before_any_run() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["--", "no-such-client-program"],
            "cannot run \"no-such-client-program\"",
        ),
        (
            &["--timeout", "0s", "--", "true"],
            "--timeout must be longer than 0",
        ),
        (
            &["--faults", "explode", "--", "true"],
            "unknown fault kind \"explode\"",
        ),
        (
            &["--server", "sleep 30", "--", "true"],
            "--server did not listen on \"$unixsocket\" within 5 s",
        ),
        (
            &["--server", "echo starting; exit 3", "--", "true"],
            "--server exited (exit status: 3) before listening",
        ),
        (
            &["--verify", "false", "--", "true"],
            "the baseline run (no faults) failed: --verify failed after it",
        ),
        (&["--", "false"], "the baseline run (no faults) failed"),
        (&["--", "true"], "the baseline run made no NBD connection"),
    ];
    for (args, says) in cases {
        let (code, stdout, stderr) = sweep(args);
        assert_eq!(code, 2, "{args:?}: {stdout} {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}

#[test]
fn a_server_that_goes_into_the_background_is_refused() {
    require_tool("nbdkit");
    let (code, _, stderr) = sweep(&[
        "--server",
        // Without -f nbdkit forks and its first process exits.
        "nbdkit -U \"$unixsocket\" -P \"$dir/pid\" memory 1M",
        "--",
        "sh",
        "-c",
        "nbdinfo --size \"$uri\"",
    ]);
    // Whatever started in the background must go.
    let _ = run(
        "sh",
        &["-c", "pkill -f 'nbdkit -U /tmp/nbdfault-sweep' || true"],
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("went into the background"), "{stderr}");
}
