//! `nbdfault check` and rule-file validation at startup.
//!
//! Every shipped scenario (rules/*.yaml) and every QEMU 083 case
//! (rules/qemu-083/*.ini) must pass `check`; broken files must be rejected
//! with `file:LINE:COL: message` and exit status 1, and a server given a
//! broken file must never start listening.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use tempfile::TempDir;

/// A server that wrongly starts would run forever: bound every run.
const CHECK_TIMEOUT: Duration = Duration::from_secs(20);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Files in `dir` ending in `.ext`, sorted.
fn files_in(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    v.sort();
    v
}

/// Every shipped rules file: the scenarios, then QEMU's 083 cases.
fn shipped() -> Vec<PathBuf> {
    let mut v = files_in(&repo().join("rules"), "yaml");
    v.extend(files_in(&repo().join("rules/qemu-083"), "ini"));
    v
}

fn nbdfault(args: &[&str]) -> Output {
    run_with_timeout(nbdfault_bin(), args, CHECK_TIMEOUT)
}

fn check(files: &[&Path]) -> Output {
    let mut args = vec!["check"];
    args.extend(files.iter().map(|p| p.to_str().expect("utf-8 path")));
    nbdfault(&args)
}

fn write(dir: &TempDir, name: &str, text: &str) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Runs `check` on one bad file and returns its one error line, after
/// checking the exit status, the empty stdout and the summary line.
fn rejected(file: &Path) -> String {
    let o = check(&[file]);
    assert_eq!(o.status.code(), Some(1), "{}", o.describe());
    assert_eq!(o.stdout, "", "{}", o.describe());
    let lines: Vec<&str> = o.stderr.lines().collect();
    assert_eq!(lines.len(), 2, "one error and a summary\n{}", o.describe());
    assert_eq!(
        lines[1],
        "nbdfault: 1 of 1 rule file(s) invalid",
        "{}",
        o.describe()
    );
    lines[0].to_string()
}

fn assert_located(line: &str, file: &Path, row: usize, col: usize) {
    let prefix = format!("{}:{row}:{col}: ", file.display());
    assert!(
        line.starts_with(&prefix),
        "expected the error at {prefix:?}:\n{line}"
    );
}

#[test]
fn shipped_files_are_all_there() {
    let all = shipped();
    let yaml = all
        .iter()
        .filter(|p| p.extension().unwrap() == "yaml")
        .count();
    let ini = all.len() - yaml;
    assert!(yaml >= 9, "scenarios in rules/: {all:?}");
    // One per disconnect case of QEMU's iotest 083.
    assert_eq!(ini, 27, "{all:?}");
}

/// How many rules a shipped file holds: its YAML list items, or its INI
/// sections (most hold one; a state machine holds more).
fn rules_in(f: &Path) -> usize {
    let text = std::fs::read_to_string(f).unwrap();
    text.lines()
        .filter(|l| l.starts_with("  - ") || l.starts_with('['))
        .count()
}

#[test]
fn every_shipped_file_passes_alone() {
    for f in shipped() {
        let o = check(&[&f]);
        assert!(o.success(), "{}", o.describe());
        assert_eq!(
            o.stdout,
            format!("{}: ok, {} rule(s)\n", f.display(), rules_in(&f)),
            "{}",
            o.describe()
        );
        assert_eq!(o.stderr, "", "{}", o.describe());
    }
}

#[test]
fn every_shipped_file_passes_together_one_ok_line_each() {
    let all = shipped();
    let refs: Vec<&Path> = all.iter().map(PathBuf::as_path).collect();
    let o = check(&refs);
    assert!(o.success(), "{}", o.describe());
    let expected: String = all
        .iter()
        .map(|f| format!("{}: ok, {} rule(s)\n", f.display(), rules_in(f)))
        .collect();
    assert_same_lines("check of every shipped file", &expected, &o.stdout);
    assert_eq!(o.stderr, "", "{}", o.describe());
}

#[test]
fn unknown_event_is_located_with_a_suggestion() {
    let dir = TempDir::new().unwrap();
    let f = write(
        &dir,
        "typo.yaml",
        "rules:\n  - name: x\n    event: requset\n    action: drop\n",
    );
    let line = rejected(&f);
    assert_located(&line, &f, 3, 12);
    assert!(line.contains(r#"unknown event "requset""#), "{line}");
    assert!(line.contains(r#"did you mean "request""#), "{line}");
    // The allowed names are listed.
    assert!(
        line.contains("(events: connect, neg-classic, neg1, export, export-name, option-reply, neg2, request, reply, data)"),
        "{line}"
    );

    // In a list of events, the bad item itself is pointed at.
    let f = write(&dir, "list.yaml", "rules:\n  - event: [request, replly]\n");
    let line = rejected(&f);
    assert_located(&line, &f, 2, 22);
    assert!(line.contains(r#"did you mean "reply""#), "{line}");
}

#[test]
fn unknown_field() {
    let dir = TempDir::new().unwrap();
    let f = write(
        &dir,
        "field.yaml",
        "seed: 3\nrules:\n  - event: request\n    comand: read\n",
    );
    let line = rejected(&f);
    assert_located(&line, &f, 4, 5);
    assert!(line.contains(r#"unknown field "comand""#), "{line}");
    assert!(line.contains(r#"did you mean "command""#), "{line}");

    // Nothing close: no suggestion, but the list of fields.
    let f = write(
        &dir,
        "colour.yaml",
        "rules:\n  - event: request\n    colour: red\n",
    );
    let line = rejected(&f);
    assert_located(&line, &f, 3, 5);
    assert!(line.contains(r#"unknown field "colour""#), "{line}");
    assert!(!line.contains("did you mean"), "{line}");
    assert!(line.contains("(fields: name, event, direction,"), "{line}");

    // An unknown top-level key.
    let f = write(&dir, "top.yaml", "seed: 1\nrulez: []\n");
    let line = rejected(&f);
    assert_located(&line, &f, 2, 1);
    assert!(line.contains(r#"did you mean "rules""#), "{line}");
}

#[test]
fn bad_errno() {
    let dir = TempDir::new().unwrap();
    let f = write(
        &dir,
        "errno.yaml",
        "rules:\n  - event: request\n    action: error\n    errno: EIOO\n",
    );
    let line = rejected(&f);
    assert_located(&line, &f, 4, 12);
    assert!(line.contains(r#"unknown errno "EIOO""#), "{line}");
    assert!(line.contains(r#"did you mean "EIO""#), "{line}");

    // An option error on a request, and a transmission errno on an option.
    let f = write(
        &dir,
        "kind.yaml",
        "rules:\n  - event: request\n    action: error\n    errno: unsup\n",
    );
    let line = rejected(&f);
    assert_located(&line, &f, 4, 12);
    assert!(
        line.contains(
            r#"errno "unsup" is an option error, but event request takes a transmission errno"#
        ),
        "{line}"
    );
    let f = write(
        &dir,
        "opt.yaml",
        "rules:\n  - event: option\n    option: go\n    action: error\n    errno: EIO\n",
    );
    let line = rejected(&f);
    assert_located(&line, &f, 5, 12);
    assert!(
        line.contains(r#"errno "EIO" is a transmission errno"#),
        "{line}"
    );

    // An error without an errno.
    let f = write(
        &dir,
        "none.yaml",
        "rules:\n  - event: reply\n    action: error\n",
    );
    let line = rejected(&f);
    assert_located(&line, &f, 3, 13);
    assert!(line.contains("action error needs an errno"), "{line}");
}

#[test]
fn offset_range_ending_before_it_starts() {
    let dir = TempDir::new().unwrap();
    let f = write(
        &dir,
        "range.yaml",
        "rules:\n  - event: request\n    offset: 2MiB..1MiB\n",
    );
    let line = rejected(&f);
    assert_located(&line, &f, 3, 13);
    assert!(
        line.contains("offset range 2MiB..1MiB ends before it starts"),
        "{line}"
    );
    let f = write(
        &dir,
        "empty.yaml",
        "rules:\n  - event: request\n    offset: 1MiB..1MiB\n",
    );
    let line = rejected(&f);
    assert_located(&line, &f, 3, 13);
    assert!(line.contains("it ends where it starts"), "{line}");
    let f = write(
        &dir,
        "norange.yaml",
        "rules:\n  - event: request\n    offset: 1MiB\n",
    );
    let line = rejected(&f);
    assert!(line.contains(r#"offset "1MiB" is not a range"#), "{line}");
}

#[test]
fn command_filter_on_a_handshake_event() {
    let dir = TempDir::new().unwrap();
    let f = write(
        &dir,
        "neg1.yaml",
        "rules:\n  - event: neg1\n    command: read\n",
    );
    let line = rejected(&f);
    assert_located(&line, &f, 3, 5);
    assert!(
        line.contains(
            "command cannot apply to event neg1; command applies only to events: request, reply, data"
        ),
        "{line}"
    );
    // And the mirror image: an option filter on a transmission event.
    let f = write(
        &dir,
        "opt.yaml",
        "rules:\n  - event: request\n    option: go\n",
    );
    let line = rejected(&f);
    assert_located(&line, &f, 3, 5);
    assert!(
        line.contains("option cannot apply to event request"),
        "{line}"
    );
}

#[test]
fn other_mistakes_are_located() {
    let dir = TempDir::new().unwrap();
    // A direction the event never travels.
    let f = write(
        &dir,
        "dir.yaml",
        "rules:\n  - event: reply\n    direction: to-server\n",
    );
    let line = rejected(&f);
    assert_located(&line, &f, 3, 16);
    assert!(line.contains("reply only travels to-client"), "{line}");
    // when on an action that cannot fire part-way.
    let f = write(
        &dir,
        "when.yaml",
        "rules:\n  - event: reply\n    when: 4\n    action: drop\n",
    );
    let line = rejected(&f);
    assert_located(&line, &f, 3, 11);
    assert!(
        line.contains("when: 4 is not allowed with action drop"),
        "{line}"
    );
    // A field of another action.
    let f = write(
        &dir,
        "dur.yaml",
        "rules:\n  - event: reply\n    duration: 1s\n",
    );
    let line = rejected(&f);
    assert_located(&line, &f, 3, 5);
    assert!(
        line.contains("duration applies only to action delay or stall or refuse or blackhole, but this rule's action is disconnect (the default)"),
        "{line}"
    );
    // A probability out of range.
    let f = write(
        &dir,
        "p.yaml",
        "rules:\n  - event: request\n    probability: 1.5\n",
    );
    let line = rejected(&f);
    assert_located(&line, &f, 3, 18);
    assert!(
        line.contains("probability must be a number from 0.0 to 1.0, found 1.5"),
        "{line}"
    );
    // YAML that does not parse.
    let f = write(
        &dir,
        "syntax.yaml",
        "rules:\n  - event: request\n   action: drop\n",
    );
    let line = rejected(&f);
    assert_located(&line, &f, 3, 4);
    assert!(line.contains("invalid YAML"), "{line}");
    // Duplicate names.
    let f = write(
        &dir,
        "dup.yaml",
        "rules:\n  - name: a\n    event: request\n  - name: a\n    event: reply\n",
    );
    let line = rejected(&f);
    assert_located(&line, &f, 4, 11);
    assert!(line.contains(r#"duplicate rule name "a""#), "{line}");
}

#[test]
fn bad_injector_ini() {
    let dir = TempDir::new().unwrap();
    let f = write(&dir, "bad.ini", "[inject-error]\nevent=neg3\n");
    let line = rejected(&f);
    // The injector's own wording, located.
    assert_eq!(
        line,
        format!(
            "{}:2:1: invalid \"event\" option value \"neg3\" in inject-error",
            f.display()
        )
    );
    let f = write(&dir, "when.ini", "[inject-error]\nevent=reply\nwhen=-2.5\n");
    let line = rejected(&f);
    assert_located(&line, &f, 3, 1);
    assert!(
        line.contains(r#"invalid "when" option value "-2.5" in inject-error"#),
        "{line}"
    );
}

#[test]
fn missing_file() {
    let dir = TempDir::new().unwrap();
    let f = dir.path().join("nope.yaml");
    let line = rejected(&f);
    assert_located(&line, &f, 0, 0);
    assert!(line.contains("cannot read rules file"), "{line}");
}

#[test]
fn mixed_good_and_bad_files_report_each_and_exit_1() {
    let dir = TempDir::new().unwrap();
    let good = repo().join("rules/full-disk.yaml");
    let bad1 = write(&dir, "bad1.yaml", "rules:\n  - event: requset\n");
    let bad2 = write(
        &dir,
        "bad2.yaml",
        "rules:\n  - event: request\n    offset: 2MiB..1MiB\n",
    );
    let o = check(&[&bad1, &good, &bad2]);
    assert_eq!(o.status.code(), Some(1), "{}", o.describe());
    assert_eq!(
        o.stdout,
        format!("{}: ok, 1 rule(s)\n", good.display()),
        "{}",
        o.describe()
    );
    let lines: Vec<&str> = o.stderr.lines().collect();
    assert_eq!(lines.len(), 3, "{}", o.describe());
    assert_located(lines[0], &bad1, 2, 12);
    assert_located(lines[1], &bad2, 3, 13);
    assert_eq!(lines[2], "nbdfault: 2 of 3 rule file(s) invalid");
}

/// `check DIR` checks every *.yaml, *.yml and *.ini file directly in DIR
/// (in name order; not subdirectories, nor other files), each as if named.
#[test]
fn check_a_directory() {
    let o = check(&[&repo().join("rules")]);
    assert_eq!(o.status.code(), Some(0), "{}", o.describe());
    let want: String = files_in(&repo().join("rules"), "yaml")
        .iter()
        .map(|f| format!("{}: ok, {} rule(s)\n", f.display(), rules_in(f)))
        .collect();
    assert_eq!(o.stdout, want, "{}", o.describe());
    assert_eq!(o.stderr, "", "{}", o.describe());

    let dir = TempDir::new().unwrap();
    write(&dir, "a.yml", "rules:\n  - event: request\n");
    write(&dir, "b.ini", "[inject-error]\nevent=neg1\n");
    write(&dir, "c.yaml", "rules:\n  - event: requset\n");
    write(&dir, "notes.txt", "not a rules file\n");
    std::fs::create_dir(dir.path().join("sub.yaml")).unwrap();
    let o = check(&[dir.path()]);
    assert_eq!(o.status.code(), Some(1), "{}", o.describe());
    let p = |n: &str| dir.path().join(n).display().to_string();
    assert_eq!(
        o.stdout,
        format!(
            "{}: ok, 1 rule(s)\n{}: ok, 1 rule(s)\n",
            p("a.yml"),
            p("b.ini")
        ),
        "{}",
        o.describe()
    );
    let lines: Vec<&str> = o.stderr.lines().collect();
    assert_eq!(lines.len(), 2, "{}", o.describe());
    assert!(
        lines[0].starts_with(&format!("{}:2:12: ", p("c.yaml"))),
        "{}",
        o.describe()
    );
    assert_eq!(lines[1], "nbdfault: 1 of 3 rule file(s) invalid");

    // A directory without rules files is an error, not silence.
    let empty = TempDir::new().unwrap();
    let o = check(&[empty.path()]);
    assert_eq!(o.status.code(), Some(1), "{}", o.describe());
    assert_eq!(
        o.stderr,
        format!(
            "{}: no *.yaml, *.yml or *.ini file in this directory\n\
             nbdfault: 1 of 1 rule file(s) invalid\n",
            empty.path().display()
        ),
        "{}",
        o.describe()
    );
}

/// Every bad rule of a file is reported, each at its place, with its first
/// wrong field; a bad top-level key too. A YAML syntax error is reported
/// alone (past it the parser knows nothing), as is an INI structure error;
/// an INI file reports each bad section.
#[test]
fn check_reports_every_error_in_a_file() {
    let dir = TempDir::new().unwrap();
    let f = write(
        &dir,
        "many.yaml",
        "seed: -1\n\
         rules:\n\
         \x20 - event: requset\n\
         \x20 - event: request\n\
         \x20 - event: request\n\
         \x20   errno: EIO\n\
         \x20 - event: reply\n\
         \x20   action: delay\n\
         \x20   duration: forever\n\
         colour: red\n",
    );
    let o = check(&[&f]);
    assert_eq!(o.status.code(), Some(1), "{}", o.describe());
    assert_eq!(o.stdout, "", "{}", o.describe());
    let lines: Vec<&str> = o.stderr.lines().collect();
    assert_eq!(lines.len(), 6, "{}", o.describe());
    assert_eq!(lines[5], "nbdfault: 1 of 1 rule file(s) invalid");
    assert_located(lines[0], &f, 1, 7);
    assert_located(lines[1], &f, 3, 12);
    assert!(lines[1].contains("requset"), "{}", lines[1]);
    assert_located(lines[2], &f, 6, 5);
    assert!(lines[2].contains("errno"), "{}", lines[2]);
    assert_located(lines[3], &f, 9, 15);
    assert!(lines[3].contains("forever"), "{}", lines[3]);
    assert_located(lines[4], &f, 10, 1);
    assert!(lines[4].contains("colour"), "{}", lines[4]);

    // The first error is the one a server would refuse the file with.
    let o = nbdfault(&[
        "null",
        "--listen",
        "127.0.0.1:0",
        "--rules",
        f.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", o.describe());
    assert_eq!(
        o.stderr,
        format!("nbdfault: {}\n", lines[0]),
        "{}",
        o.describe()
    );

    // A syntax error: only it.
    let syntax = write(
        &dir,
        "syntax.yaml",
        "rules:\n  - event: [request\n  - event: requset\n",
    );
    assert!(rejected(&syntax).contains("invalid YAML"));

    // INI: each bad section.
    let ini = write(
        &dir,
        "many.ini",
        "[inject-error a]\nevent=neg3\n[inject-error b]\nevent=neg1\n[inject-error c]\nevent=reply\nwhen=soon\n",
    );
    let o = check(&[&ini]);
    assert_eq!(o.status.code(), Some(1), "{}", o.describe());
    let lines: Vec<&str> = o.stderr.lines().collect();
    assert_eq!(lines.len(), 3, "{}", o.describe());
    assert!(
        lines[0].contains("invalid \"event\" option value \"neg3\" in inject-error a"),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].contains("invalid \"when\" option value \"soon\" in inject-error c"),
        "{}",
        lines[1]
    );
}

/// An empty file (or only whitespace, or only comments) is a warning: it
/// passes, with 0 rules.
#[test]
fn check_warns_about_an_empty_file() {
    let dir = TempDir::new().unwrap();
    let empty = write(&dir, "empty.yaml", "");
    let o = check(&[&empty]);
    assert_eq!(o.status.code(), Some(0), "{}", o.describe());
    assert_eq!(o.stdout, format!("{}: ok, 0 rule(s)\n", empty.display()));
    assert_eq!(
        o.stderr,
        format!("{}: warning: no rules in this file\n", empty.display())
    );
}

#[test]
fn check_needs_a_file() {
    let o = nbdfault(&["check"]);
    assert_eq!(o.status.code(), Some(2), "{}", o.describe());
    assert!(o.stderr.contains("FILE"), "{}", o.describe());
}

/// A server given a bad rules file reports it like `check`, exits 1, and
/// never listens.
fn refuses_to_start(args: &[&str], needle: &str) {
    let o = nbdfault(args);
    assert_eq!(o.status.code(), Some(1), "{}", o.describe());
    assert!(!o.stdout.contains("Listening on"), "{}", o.describe());
    assert_eq!(o.stdout, "", "{}", o.describe());
    assert!(o.stderr.contains(needle), "{needle:?}\n{}", o.describe());
    assert_eq!(o.stderr.lines().count(), 1, "{}", o.describe());
}

#[test]
fn proxy_and_null_refuse_bad_rules_without_listening() {
    let dir = TempDir::new().unwrap();
    let bad = write(
        &dir,
        "bad.yaml",
        "rules:\n  - name: x\n    event: requset\n",
    );
    let bad_s = bad.to_str().unwrap();
    let expected =
        format!("nbdfault: {bad_s}:3:12: unknown event \"requset\" — did you mean \"request\"?");
    // The upstream does not even need to exist: nothing is started.
    let upstream = dir.path().join("no-server.sock");
    let upstream_s = upstream.to_str().unwrap();
    refuses_to_start(
        &[
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            upstream_s,
            "--rules",
            bad_s,
        ],
        &expected,
    );
    // A good file first does not help.
    let good = repo().join("rules/full-disk.yaml");
    refuses_to_start(
        &[
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            upstream_s,
            "--rules",
            good.to_str().unwrap(),
            "--rules",
            bad_s,
            "--seed",
            "5",
        ],
        &expected,
    );
    refuses_to_start(
        &["null", "--listen", "127.0.0.1:0", "--rules", bad_s],
        &expected,
    );
    // A unix socket is never created.
    let sock = dir.path().join("listen.sock");
    refuses_to_start(
        &["null", "--listen", sock.to_str().unwrap(), "--rules", bad_s],
        &expected,
    );
    assert!(!sock.exists(), "{} was created", sock.display());
    // A missing file, too.
    let missing = dir.path().join("missing.yaml");
    refuses_to_start(
        &[
            "null",
            "--listen",
            "127.0.0.1:0",
            "--rules",
            missing.to_str().unwrap(),
        ],
        "cannot read rules file",
    );
}

#[test]
fn duplicate_names_across_rules_files_refuse_to_start() {
    // Each 083 case names its rule "inject-error": two of them clash.
    let a = repo().join("rules/qemu-083/reply-4.ini");
    let b = repo().join("rules/qemu-083/reply-8.ini");
    let o = nbdfault(&[
        "null",
        "--listen",
        "127.0.0.1:0",
        "--rules",
        a.to_str().unwrap(),
        "--rules",
        b.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", o.describe());
    assert_eq!(o.stdout, "", "{}", o.describe());
    assert!(
        o.stderr.contains(&format!("{}:", b.display()))
            && o.stderr.contains(r#"duplicate rule name "inject-error""#),
        "{}",
        o.describe()
    );
}

/// A rule name is printed in fault log lines: one with a line break (which
/// could forge a log line) is refused, and the error itself stays one line.
#[test]
fn a_rule_name_with_a_control_character_is_refused() {
    let dir = TempDir::new().unwrap();
    let f = write(
        &dir,
        "forged.yaml",
        "rules:\n  - name: \"x\\nINFO nbdfault::fault: fault: rule y fires\"\n    event: request\n    action: disconnect\n",
    );
    let line = rejected(&f);
    assert_located(&line, &f, 2, 11);
    assert!(
        line.contains("name must be printable text") && line.contains(r#"\nINFO"#),
        "{line}"
    );
}
