//! Rules files a hostile or careless writer can hand over, through the real
//! binary: deep nesting that froze serde_yaml, values that overflowed when
//! the rule fired, INI names carrying terminal escapes, and files a SIGHUP
//! catches half-written.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use tempfile::TempDir;

/// A hang guard, not a timing: the deep document took 40 s before.
const GUARD: Duration = Duration::from_secs(20);

fn write(dir: &TempDir, name: &str, text: &str) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn check(file: &Path) -> Output {
    run_with_timeout(nbdfault_bin(), &["check", file.to_str().unwrap()], GUARD)
}

/// `check` refuses `file` with exactly `error` (after the file name).
fn refused(file: &Path, error: &str) {
    let o = check(file);
    assert_eq!(o.status.code(), Some(1), "{}", o.describe());
    assert_eq!(
        o.stderr,
        format!(
            "{}{error}\nnbdfault: 1 of 1 rule file(s) invalid\n",
            file.display()
        ),
        "{}",
        o.describe()
    );
}

const TOO_DEEP: &str = ":1:72: invalid YAML: flow collections ([...] and {...}) nested deeper \
                        than 64 levels here (at most 64 are allowed)";

#[test]
fn deep_flow_nesting_is_refused_at_once_by_check_and_at_startup() {
    let dir = TempDir::new().unwrap();
    let n = 100_000;
    let deep = write(
        &dir,
        "deep.yaml",
        &format!("rules: {}{}\n", "[".repeat(n), "]".repeat(n)),
    );
    refused(&deep, TOO_DEEP);
    let o = run_with_timeout(
        nbdfault_bin(),
        &[
            "null",
            "--listen",
            "127.0.0.1:0",
            "--rules",
            deep.to_str().unwrap(),
        ],
        GUARD,
    );
    assert_eq!(o.status.code(), Some(1), "{}", o.describe());
    assert_eq!(o.stdout, "", "never listened: {}", o.describe());
    assert_eq!(
        o.stderr,
        format!("nbdfault: {}{TOO_DEEP}\n", deep.display()),
        "{}",
        o.describe()
    );
    // Normal documents with brackets in their text are not affected.
    let fine = write(
        &dir,
        "fine.yaml",
        &format!(
            "rules:\n  - name: \"{0}\"\n    event: [request, reply]\n    action: drop\n  \
             - name: a{0} # {0}\n    event: data\n",
            "[".repeat(100)
        ),
    );
    let o = check(&fine);
    assert!(o.success(), "{}", o.describe());
    assert_eq!(o.stdout, format!("{}: ok, 2 rule(s)\n", fine.display()));
}

#[test]
fn many_aliases_of_a_big_list_are_refused() {
    let dir = TempDir::new().unwrap();
    // 50 KB that expanded to 40 million values (4 GB, 40 s).
    let text = format!(
        "a: &x [{}]\nrules: [{}]\n",
        "b, ".repeat(2000),
        "*x, ".repeat(20_000)
    );
    let f = write(&dir, "alias.yaml", &text);
    let o = check(&f);
    assert_eq!(o.status.code(), Some(1), "{}", o.describe());
    assert!(
        o.stderr.contains(
            "invalid YAML: rules[498][1496]: more than 1000000 values (each use of an alias \
             counts its values again; a long key or string counts once per 64 characters of it \
             and of the keys above it)"
        ),
        "{}",
        o.describe()
    );
}

#[test]
fn durations_that_overflowed_when_fired_are_refused() {
    let dir = TempDir::new().unwrap();
    // Accepted before, then "overflow when adding durations" at the first
    // connection, leaving it counted active for good.
    let f = write(
        &dir,
        "huge.yaml",
        "rules:\n  - event: connect\n    action: delay\n    duration: 18446744073709551615s\n    \
         jitter: 10s\n",
    );
    refused(
        &f,
        ":4:15: duration must be at most 24h (1 day), found \"18446744073709551615s\"",
    );
    let f = write(
        &dir,
        "jitter.yaml",
        "rules:\n  - event: reply\n    action: delay\n    duration: 1s\n    jitter: 25h\n",
    );
    refused(
        &f,
        ":5:13: jitter must be at most 24h (1 day), found \"25h\"",
    );
    let f = write(
        &dir,
        "stall.yaml",
        "rules:\n  - event: reply\n    action: stall\n    duration: 100000d\n",
    );
    refused(
        &f,
        ":4:15: duration must be at most 24h (1 day), found \"100000d\"",
    );
    let f = write(
        &dir,
        "day.yaml",
        "rules:\n  - event: connect\n    action: delay\n    duration: 1day\n    jitter: 24h\n",
    );
    assert!(check(&f).success());
}

#[test]
fn ini_section_names_with_control_characters_are_refused() {
    let dir = TempDir::new().unwrap();
    let f = write(
        &dir,
        "esc.ini",
        "[inject-error \"x\u{1b}[31mRED\u{b}\0\"]\nevent=neg1\n",
    );
    refused(
        &f,
        ":1:1: invalid config section name: \"inject-error \\\"x\\u{1b}[31mRED\\u{b}\\0\\\"\" (a \
         section name must be printable text, without control characters: it names the rule \
         in logs and URLs)",
    );
    // Nor does any other message write them out raw.
    let f = write(&dir, "val.ini", "[inject-error]\nevent=neg1\u{1b}[2J\n");
    refused(
        &f,
        ":2:1: invalid \"event\" option value \"neg1\\u{1b}[2J\" in inject-error",
    );
    // Through the injector's own command line too (the names QEMU uses
    // are printable, and unchanged).
    let o = run_with_timeout(
        nbdfault_bin(),
        &["legacy", "127.0.0.1:0", f.to_str().unwrap()],
        GUARD,
    );
    assert!(!o.stderr.contains('\u{1b}'), "{}", o.describe());
}

#[test]
fn check_warns_about_empty_files_and_missing_final_newlines() {
    let dir = TempDir::new().unwrap();
    let empty = write(&dir, "empty.yaml", "");
    let o = check(&empty);
    assert!(o.success(), "{}", o.describe());
    assert_eq!(o.stdout, format!("{}: ok, 0 rule(s)\n", empty.display()));
    assert_eq!(
        o.stderr,
        format!("{}: warning: no rules in this file\n", empty.display())
    );
    let nonl = write(&dir, "nonl.yaml", "rules:\n  - event: request");
    let o = check(&nonl);
    assert!(o.success(), "{}", o.describe());
    assert_eq!(o.stdout, format!("{}: ok, 1 rule(s)\n", nonl.display()));
    assert_eq!(
        o.stderr,
        format!(
            "{}:2:19: warning: the last line does not end with a newline; SIGHUP refuses such \
             a file as one caught mid-write (replace a rules file atomically: write a temporary \
             file, then mv it over this one)\n",
            nonl.display()
        )
    );
}

fn hup(pid: u32) {
    let st = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(st.success());
}

fn errno_rule(errno: &str) -> String {
    format!(
        "rules:\n  - name: writes-{errno}\n    event: request\n    command: write\n    \
         action: error\n    errno: {errno}\n"
    )
}

fn qemu_io_write(uri: &str) -> String {
    let out = qemu_io(uri, &["write 0 4k"]);
    mask_qemu_io_timing(format!("{}{}", out.stdout, out.stderr).trim())
}

/// Waits for the `count`th occurrence of `needle` in the server's log.
fn wait_nth(p: &Nbdfault, needle: &str, count: usize) -> String {
    assert!(
        wait_until(Duration::from_secs(10), || p
            .stderr()
            .matches(needle)
            .count()
            >= count),
        "no {count} × {needle:?} in:\n{}",
        p.stderr()
    );
    p.stderr()
}

#[test]
fn sighup_refuses_files_caught_mid_write_and_loads_an_atomic_rename() {
    require_tool("qemu-io");
    let dir = TempDir::new().unwrap();
    let rules = write(&dir, "r.yaml", &errno_rule("ENOSPC"));
    let args = ["null", "--listen", "127.0.0.1:0", "--rules"];
    let p = Nbdfault::start(&[&args[..], &[rules.to_str().unwrap()]].concat());
    let nospace = "write failed: No space left on device";
    assert_eq!(qemu_io_write(p.uri()), nospace);
    let keeping = "SIGHUP: keeping the rules in force: ";

    // Between a rewrite's truncate and its write: kept, and said why.
    std::fs::write(&rules, "").unwrap();
    hup(p.pid());
    let log = wait_nth(&p, keeping, 1);
    assert!(
        log.contains(&format!(
            "{keeping}{}:1:1: the file is empty, as one caught mid-write can be, so it is not \
             loaded (to clear the rules, write rules: [] into it; replace a rules file \
             atomically: write a temporary file, then mv it over this one)",
            rules.display()
        )),
        "{log}"
    );
    assert_eq!(qemu_io_write(p.uri()), nospace);

    // Cut before its action line, the rule would load as a disconnect.
    let full = errno_rule("EPERM");
    let cut = &full[..full.find("\n    action").unwrap()];
    std::fs::write(&rules, cut).unwrap();
    hup(p.pid());
    let log = wait_nth(&p, keeping, 2);
    assert!(
        log.contains(&format!(
            "{keeping}{}:4:19: the last line does not end with a newline, as in a file caught \
             mid-write, so it is not loaded",
            rules.display()
        )),
        "{log}"
    );
    assert_eq!(qemu_io_write(p.uri()), nospace);

    // The way to do it: a temporary file renamed over the rules file.
    let tmp = write(&dir, "r.yaml.tmp", &errno_rule("EPERM"));
    std::fs::rename(&tmp, &rules).unwrap();
    hup(p.pid());
    wait_nth(&p, "SIGHUP: rules reloaded, 1 rule(s) in force", 1);
    assert_eq!(
        qemu_io_write(p.uri()),
        "write failed: Operation not permitted"
    );

    // A file with no rules but some text clears them, with a warning.
    std::fs::write(&tmp, "rules: []\n").unwrap();
    std::fs::rename(&tmp, &rules).unwrap();
    hup(p.pid());
    let log = wait_nth(&p, "SIGHUP: rules reloaded, 0 rule(s) in force", 1);
    assert!(
        log.contains(&format!(
            "SIGHUP: {}: warning: no rules in this file",
            rules.display()
        )),
        "{log}"
    );
    assert_eq!(
        qemu_io_write(p.uri()),
        "wrote 4096/4096 bytes at offset 0\n4 KiB, 1 ops; <timing>"
    );

    // The deep document through SIGHUP: refused, and the server answers.
    std::fs::write(
        &rules,
        format!("rules: {}{}\n", "[".repeat(100_000), "]".repeat(100_000)),
    )
    .unwrap();
    hup(p.pid());
    let log = wait_nth(&p, keeping, 3);
    assert!(
        log.contains(&format!("{keeping}{}{TOO_DEEP}", rules.display())),
        "{log}"
    );
    assert_eq!(
        qemu_io_write(p.uri()),
        "wrote 4096/4096 bytes at offset 0\n4 KiB, 1 ops; <timing>"
    );
}
