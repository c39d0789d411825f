//! Every ```sh block of README.md, run as a user would paste it.
//!
//! The README is the first thing a new user tries; a block that fails as
//! pasted (a file that does not exist on a fresh machine, a client started
//! before its server listens, a server left on a port the next block needs)
//! costs them more than any bug behind it. So this runs them all.
//!
//! How, and why so:
//!
//! - Section by section. Every heading starts a section; a section's blocks
//!   run in README order in one `bash` (as pasted into one terminal: `cd`,
//!   `export` and `$!` carry over from block to block). Sections are
//!   independent and run side by side.
//! - Each section gets a fresh HOME and a fresh working directory (a tmpfs)
//!   holding a copy of the repository's tracked files, as a fresh clone
//!   (the README's commands run "from the repository's top directory":
//!   `rules/`, `contrib/`, `python/` are there), with `target/release`
//!   pointing at the binary just built.
//!   `PATH` has that binary's directory first, as after the install step,
//!   then a fresh Debian machine's `PATH` (`FRESH_PATH`).
//! - Each section runs in namespaces of its own (`unshare --net --mount
//!   --pid`): a private loopback, so the README's fixed ports (10809,
//!   10810) never collide with another section or another test; a tmpfs on
//!   `/tmp`, so its fixed `/tmp` paths are fresh; and a pid namespace, so
//!   everything a block left running (`&`) dies with the section's shell.
//!   That needs root (CI runs as root); without it the test says so and
//!   passes without running anything.
//! - A block fails when one of its commands fails (bash's ERR trap: what
//!   `set -e` would stop at, but the section goes on, as a terminal would),
//!   when a job it put in the background has exited non-zero by the end of
//!   its section, or when its section is still running after
//!   `SECTION_TIMEOUT`. The report names the README line of the command
//!   (the generated script keeps README line numbers) and the block's
//!   output.
//! - Building is what `cargo test` just did, so the two build steps are not
//!   run again: `cargo install --path . --root ~/.local` is replaced by
//!   copying the built binary into `~/.local/bin` (the rest of the install
//!   block, `PATH`, man pages and completions, runs as written), and
//!   `cargo build --release` by a check that the binary is there. Any other
//!   `cargo` line fails the test until it is added to `BUILD_STEPS`.
//! - Markers, an HTML comment on the line right before a block's fence:
//!   - `<!-- readme-test: skip (REASON) -->`: not run (it cannot run in CI;
//!     REASON says why). Kept to a few: `MAX_SKIPS`.
//!   - `<!-- readme-test: serves until stopped; ready at "LINE" -->`: a
//!     server a user starts in a terminal of its own (a foreground command)
//!     or in the background (`&`), and whose output they watch: run in the
//!     background, and the section goes on once its output has the line
//!     LINE (which checks that line exactly), as the user would.
//!   - `<!-- readme-test: exits N (REASON) -->`: the block's last command
//!     exits with status N, as the README says it does (a sweep that finds
//!     something, a client that a fault made fail); only that command's
//!     status is checked in that block.
//!   - `<!-- readme-test: output of the block above -->`, on an output
//!     block (``` without `sh`): the preceding block prints exactly that
//!     (stdout and stderr, and what its background jobs print).
//!   Other blocks (``` without `sh`, ```yaml, ```python...) are not run.
//!
//! `README_SECTION=TEXT cargo test --release --test readme` runs only the
//! sections whose heading contains TEXT; with `README_KEEP=1` every
//! section's outputs stay in `target/tmp/readme/` (a failed one's always do).

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::{kill_child, wait_child_exit};

/// A fresh Debian machine's `PATH` (root's): the tools the README uses
/// come from apt. Not the caller's, which may hold shims (pyenv, a
/// rustup toolchain) that a fresh machine does not have.
const FRESH_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// A section still running after this has hung.
const SECTION_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a `serves` block may take to print its ready line.
const READY_TIMEOUT_TENTHS: u32 = 200;
/// Skipped blocks are a debt: keep the list short.
const MAX_SKIPS: usize = 6;

/// The README's build steps, and what stands for each (see the top).
const BUILD_STEPS: &[(&str, &str)] = &[
    (
        "cargo install --path . --root ~/.local",
        "mkdir -p ~/.local/bin && cp \"$README_TEST_BIN\" ~/.local/bin/nbdfault",
    ),
    ("cargo build --release", "test -x target/release/nbdfault"),
];

const SKIP: &str = "skip (";
const SERVES: &str = "serves until stopped; ready at \"";
const OUTPUT: &str = "output of the block above";
const EXITS: &str = "exits ";

#[derive(Debug)]
struct Block {
    /// 1-based README line of the opening fence.
    line: usize,
    /// 1-based README line of the closing fence.
    end: usize,
    lang: String,
    body: Vec<String>,
    marker: Option<String>,
}

#[derive(Debug)]
struct Section {
    title: String,
    line: usize,
    blocks: Vec<Block>,
}

fn readme() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Splits the README into sections at every heading outside a fence, with
/// each fenced block and the marker comment right before it.
fn parse(text: &str) -> Vec<Section> {
    let lines: Vec<&str> = text.lines().collect();
    let mut sections = vec![Section {
        title: "(top)".into(),
        line: 1,
        blocks: vec![],
    }];
    let mut i = 0;
    while i < lines.len() {
        let l = lines[i];
        if let Some(lang) = l.trim_start().strip_prefix("```") {
            let start = i;
            let mut body = vec![];
            i += 1;
            while i < lines.len() && !lines[i].trim_start().starts_with("```") {
                body.push(lines[i].to_string());
                i += 1;
            }
            assert!(i < lines.len(), "README.md:{}: unclosed fence", start + 1);
            let marker = start
                .checked_sub(1)
                .and_then(|p| lines[p].trim().strip_prefix("<!-- readme-test:"))
                .map(|m| m.trim_end_matches("-->").trim().to_string());
            if let Some(s) = sections.last_mut() {
                s.blocks.push(Block {
                    line: start + 1,
                    end: i + 1,
                    lang: lang.trim().to_string(),
                    body,
                    marker,
                });
            }
        } else if l.starts_with('#') && l.trim_start_matches('#').starts_with(' ') {
            sections.push(Section {
                title: l.trim_start_matches('#').trim().to_string(),
                line: i + 1,
                blocks: vec![],
            });
        } else {
            assert!(
                !l.trim_start().starts_with("<!-- readme-test:")
                    || lines
                        .get(i + 1)
                        .is_some_and(|n| n.trim_start().starts_with("```")),
                "README.md:{}: a readme-test marker must be right before a fence",
                i + 1
            );
        }
        i += 1;
    }
    sections
}

fn runs(b: &Block) -> bool {
    b.lang == "sh" && !b.marker.as_deref().is_some_and(|m| m.starts_with(SKIP))
}

/// The line a `serves` block must print, if it is one.
fn ready_line(b: &Block) -> Option<&str> {
    b.marker.as_deref()?.strip_prefix(SERVES)?.strip_suffix('"')
}

/// The exit status an `exits` block's last command must have.
fn expected_exit(b: &Block) -> Option<u8> {
    let rest = b.marker.as_deref()?.strip_prefix(EXITS)?;
    let (n, reason) = rest.split_once(' ')?;
    (reason.starts_with('(') && reason.ends_with(')') && reason.len() > 10)
        .then(|| n.parse().ok())
        .flatten()
}

/// A block's lines as run: the build steps replaced (see the top).
fn body_as_run(b: &Block) -> Result<Vec<String>, String> {
    b.body
        .iter()
        .map(|l| {
            if !l.trim_start().starts_with("cargo ") {
                return Ok(l.clone());
            }
            BUILD_STEPS
                .iter()
                .find(|(step, _)| l.trim() == *step)
                .map(|(_, instead)| instead.to_string())
                .ok_or_else(|| {
                    format!(
                        "README.md:{}: a cargo command this test does not know: `{l}` \
                         (add it to BUILD_STEPS in tests/readme.rs)",
                        b.line
                    )
                })
        })
        .collect()
}

/// Helpers the section's script sources on its line 1. Block N's output
/// (stdout and stderr, its background jobs' too) goes to `out.N`; a failed
/// command appends `LINE STATUS` to `failures`.
const PRELUDE: &str = r#"
rt_begin() { echo "$1" > "$RT/current"; exec >"$RT/out.$1" 2>&1; }
rt_end() { echo "$1" >> "$RT/done"; }
rt_fail() { echo "$1 $2" >> "$RT/failures"; }
rt_exit_is() { [ "$1" = "$3" ] || echo "$2 $1-instead-of-$3" >> "$RT/failures"; }
rt_trap() { trap 'rt_fail "$LINENO" "$?"' ERR; }
rt_ready() {
    i=0
    while [ "$i" -lt "$READY_TENTHS" ]; do
        grep -qxF -f "$RT/ready.$1" "$RT/out.$1" && return 0
        sleep 0.1
        i=$((i + 1))
    done
    echo "$1 never-ready" >> "$RT/failures"
}
rt_finish() { jobs -l > "$RT/jobs"; echo finished > "$RT/finished"; }
set -E
rt_trap
"#;

/// The section as one bash script whose line N is README line N, so that
/// `$LINENO` names the README line of a failed command.
fn script(section: &Section, rt: &Path) -> Result<String, String> {
    let last = section
        .blocks
        .iter()
        .filter(|b| runs(b))
        .map(|b| b.end)
        .max();
    let Some(last) = last else {
        return Ok(String::new());
    };
    let mut lines = vec![String::new(); last + 1];
    lines[0] = ". \"$RT/prelude.sh\"".into();
    for b in section.blocks.iter().filter(|b| runs(b)) {
        let body = body_as_run(b)?;
        let ready = ready_line(b);
        let backgrounded = body
            .iter()
            .rev()
            .find(|l| !l.trim().is_empty())
            .is_some_and(|l| l.trim_end().ends_with('&'));
        // A server in the foreground: in a terminal of its own.
        let own_terminal = ready.is_some() && !backgrounded;
        let exits = expected_exit(b);
        lines[b.line - 1] = format!(
            "rt_begin {}{}{}",
            b.line,
            if exits.is_some() { "; trap - ERR" } else { "" },
            if own_terminal { "; (" } else { "" }
        );
        for (k, l) in body.into_iter().enumerate() {
            lines[b.line + k] = l;
        }
        let mut close = match exits {
            // `$?` first: it is the last command's status.
            Some(n) => format!("rt_exit_is \"$?\" {} {n}; rt_trap; ", b.line),
            None => String::new(),
        };
        close.push_str(&format!(
            "{}rt_end {}",
            if own_terminal { ") & " } else { "" },
            b.line
        ));
        if let Some(r) = ready {
            fs::write(rt.join(format!("ready.{}", b.line)), format!("{r}\n"))
                .map_err(|e| e.to_string())?;
            close.push_str(&format!("; rt_ready {}", b.line));
        }
        lines[b.end - 1] = close;
    }
    lines[last] = "rt_finish".into();
    Ok(lines.join("\n") + "\n")
}

/// The repository's tracked files, NUL-separated: what a fresh clone has
/// (untracked ones, such as what a README block left behind when run in
/// place, would hide a block that needs them). Outside a git checkout,
/// every regular file but `target/` and `.git/`.
fn tracked_files() -> Vec<u8> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let git = Command::new("git")
        .args(["ls-files", "-z"])
        .current_dir(root)
        .stderr(Stdio::null())
        .output();
    if let Ok(out) = git
        && out.status.success()
    {
        return out.stdout;
    }
    let mut list = vec![];
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for entry in fs::read_dir(root.join(&rel)).unwrap() {
            let entry = entry.unwrap();
            let (name, ty) = (entry.file_name(), entry.file_type().unwrap());
            if ty.is_dir() && name != "target" && name != ".git" {
                stack.push(rel.join(&name));
            } else if ty.is_file() {
                list.extend_from_slice(rel.join(&name).as_os_str().as_encoded_bytes());
                list.push(0);
            }
        }
    }
    list
}

/// What runs as the namespace's first process: the private loopback and
/// /tmp, the working directory (a tmpfs too: a thousand files written to
/// this machine's disk took seconds per section), then the script.
///
/// The test's own paths (the checkout, the binary, `$RT`, `$HOME`) may
/// lie under /tmp (CI may clone there), which the private /tmp would
/// hide: they are first bind-mounted below a private tmpfs on a directory
/// outside /tmp that every Debian machine has, and used from there.
const NAMESPACE_SETUP: &str = r#"set -e
ip link set lo up
keep=
for d in /srv /mnt /media /opt; do
    if [ -d "$d" ]; then keep=$d; break; fi
done
[ -n "$keep" ] || { echo "no /srv, /mnt, /media or /opt to mount on" >&2; exit 1; }
mount -t tmpfs tmpfs "$keep"
mkdir "$keep/src" "$keep/bin" "$keep/rt" "$keep/home" "$keep/work"
mount --bind "$README_TEST_SRC" "$keep/src"
mount --bind "$README_TEST_BIN_DIR" "$keep/bin"
mount --bind "$RT" "$keep/rt"
mount --bind "$HOME" "$keep/home"
mount -t tmpfs tmpfs "$keep/work"
export README_TEST_SRC="$keep/src" README_TEST_BIN_DIR="$keep/bin" RT="$keep/rt" \
    HOME="$keep/home" README_TEST_WORK="$keep/work"
export README_TEST_BIN="$keep/bin/${README_TEST_BIN##*/}" PATH="$keep/bin:${PATH#*:}"
mount -t tmpfs -o mode=1777 tmpfs /tmp
cd "$README_TEST_SRC"
xargs -0 cp -P --parents -t "$README_TEST_WORK" < "$RT/files"
mkdir "$README_TEST_WORK/target"
ln -s "$README_TEST_BIN_DIR" "$README_TEST_WORK/target/release"
cd "$README_TEST_WORK"
exec bash --noprofile --norc "$RT/script.sh"
"#;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_nbdfault"))
}

/// Runs one section in its namespaces; returns what failed, if anything.
fn run_section(section: &Section, base: &Path, index: usize, files: &[u8]) -> Vec<String> {
    let root = base.join(format!("{index:02}"));
    let (home, rt) = (root.join("home"), root.join("rt"));
    for d in [&home, &rt] {
        fs::create_dir_all(d).unwrap();
    }
    fs::write(rt.join("files"), files).unwrap();
    let bin_dir = bin().parent().unwrap();
    let text = match script(section, &rt) {
        Ok(t) => t,
        Err(e) => return vec![e],
    };
    fs::write(rt.join("prelude.sh"), PRELUDE).unwrap();
    fs::write(rt.join("script.sh"), &text).unwrap();
    let path = format!("{}:{FRESH_PATH}", bin_dir.display());
    let log = fs::File::create(rt.join("namespace.log")).unwrap();
    let mut child = Command::new("unshare")
        .args(["--net", "--mount", "--pid", "--fork", "--mount-proc"])
        .args(["--kill-child", "--", "bash", "-c"])
        .arg(NAMESPACE_SETUP)
        .env_clear()
        .env("PATH", path)
        .env("HOME", &home)
        .env("LANG", "C.UTF-8")
        .env("TERM", "dumb")
        .env("USER", "root")
        .env("RT", &rt)
        .env("READY_TENTHS", READY_TIMEOUT_TENTHS.to_string())
        .env("README_TEST_SRC", env!("CARGO_MANIFEST_DIR"))
        .env("README_TEST_BIN_DIR", bin_dir)
        .env("README_TEST_BIN", bin())
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("unshare");
    let mut failures = vec![];
    let status = wait_child_exit(&mut child, SECTION_TIMEOUT);
    // A hung section: its namespace's first process dies with unshare
    // (--kill-child), and everything else in it with that one.
    kill_child(&mut child);
    let read = |name: &str| fs::read_to_string(rt.join(name)).unwrap_or_default();
    let block_at = |line: usize| {
        section
            .blocks
            .iter()
            .filter(|b| runs(b))
            .find(|b| b.line <= line && line <= b.end)
    };
    let describe = |b: &Block, why: &str| {
        format!(
            "## {} (README.md:{}): the block at README.md:{} {why}\n--- block ---\n{}\n--- its output ---\n{}",
            section.title,
            section.line,
            b.line,
            b.body.join("\n"),
            read(&format!("out.{}", b.line))
        )
    };
    if status.is_none() {
        let current: usize = read("current").trim().parse().unwrap_or(0);
        match block_at(current) {
            Some(b) => failures.push(describe(
                b,
                &format!("was still running after {SECTION_TIMEOUT:?}"),
            )),
            None => failures.push(format!("## {}: timed out", section.title)),
        }
    } else if read("finished").is_empty() {
        failures.push(format!(
            "## {} (README.md:{}): its shell ended early ({status:?})\n{}",
            section.title,
            section.line,
            read("namespace.log")
        ));
    }
    // One report per block, naming each of its failed commands.
    let mut by_block: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for f in read("failures").lines() {
        let mut it = f.split_whitespace();
        let line: usize = it.next().and_then(|l| l.parse().ok()).unwrap_or(0);
        let what = it.next().unwrap_or("");
        let Some(b) = block_at(line) else {
            failures.push(format!("## {}: {f}", section.title));
            continue;
        };
        let why = if what == "never-ready" {
            format!(
                "never printed {:?} (within {} s)",
                ready_line(b).unwrap_or(""),
                READY_TIMEOUT_TENTHS / 10
            )
        } else if let Some((got, want)) = what.split_once("-instead-of-") {
            format!("ended with exit status {got}, where the README says {want}")
        } else {
            format!("failed at README.md:{line} with exit status {what}")
        };
        by_block.entry(b.line).or_default().push(why);
    }
    for (line, whys) in by_block {
        if let Some(b) = block_at(line) {
            failures.push(describe(b, &whys.join("; ")));
        }
    }
    for j in read("jobs").lines().filter(|j| j.contains(" Exit ")) {
        failures.push(format!(
            "## {} (README.md:{}): a background job exited non-zero: {j}\n{}",
            section.title,
            section.line,
            section
                .blocks
                .iter()
                .filter(|b| runs(b))
                .map(|b| format!(
                    "--- output of the block at README.md:{} ---\n{}",
                    b.line,
                    read(&format!("out.{}", b.line))
                ))
                .collect::<String>()
        ));
    }
    // Output blocks marked as the output of the block above.
    let mut previous: Option<&Block> = None;
    for b in &section.blocks {
        if b.marker.as_deref() == Some(OUTPUT) {
            match previous {
                Some(p) => {
                    let want = b.body.join("\n") + "\n";
                    let got = read(&format!("out.{}", p.line));
                    if got != want {
                        failures.push(describe(
                            p,
                            &format!(
                                "did not print what README.md:{} says\n--- README says ---\n{want}",
                                b.line
                            ),
                        ));
                    }
                }
                None => failures.push(format!(
                    "README.md:{}: an output block with no block above it",
                    b.line
                )),
            }
        }
        if runs(b) {
            previous = Some(b);
        }
    }
    if failures.is_empty() && std::env::var_os("README_KEEP").is_none() {
        let _ = fs::remove_dir_all(&root);
    } else if let Some(last) = failures.last_mut() {
        last.push_str(&format!("\n(every block's output is in {})", rt.display()));
    }
    failures
}

fn have_namespaces() -> bool {
    Command::new("unshare")
        .args(["--net", "--mount", "--pid", "--fork", "true"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Every README ```sh block works as pasted, section by section.
#[test]
fn every_readme_shell_block_works_as_pasted() {
    if !have_namespaces() {
        eprintln!(
            "SKIPPED tests/readme.rs: running README.md's blocks needs `unshare --net --mount --pid` \
             (root): they use fixed ports and /tmp paths"
        );
        return;
    }
    let sections = parse(&readme());
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("readme");
    let _ = fs::remove_dir_all(&base);
    fs::create_dir_all(&base).unwrap();
    let only = std::env::var("README_SECTION").ok();
    let files = tracked_files();
    let start = Instant::now();
    let results: BTreeMap<usize, (String, Vec<String>, Duration)> = thread::scope(|scope| {
        let handles: Vec<_> = sections
            .iter()
            .enumerate()
            .filter(|(_, s)| s.blocks.iter().any(runs))
            .filter(|(_, s)| only.as_deref().is_none_or(|o| s.title.contains(o)))
            .map(|(i, s)| {
                let (base, files) = (&base, &files);
                (
                    i,
                    scope.spawn(move || {
                        let t = Instant::now();
                        (s.title.clone(), run_section(s, base, i, files), t.elapsed())
                    }),
                )
            })
            .collect();
        handles
            .into_iter()
            .map(|(i, h)| (i, h.join().unwrap()))
            .collect()
    });
    let mut report = String::new();
    for (title, failures, took) in results.values() {
        eprintln!("{took:>8.1?}  {title}: {} failure(s)", failures.len());
        for f in failures {
            report.push_str(f);
            report.push_str("\n\n");
        }
    }
    eprintln!("{:>8.1?}  all sections", start.elapsed());
    assert!(report.is_empty(), "README.md blocks that fail:\n\n{report}");
}

/// The markers are the ones this test knows, skips say why and are few,
/// and every ```sh block is either run or skipped for a reason.
#[test]
fn readme_markers_are_known_and_skips_are_few() {
    let sections = parse(&readme());
    let blocks: Vec<&Block> = sections.iter().flat_map(|s| &s.blocks).collect();
    let mut skips = vec![];
    for b in &blocks {
        let Some(m) = b.marker.as_deref() else {
            continue;
        };
        if let Some(reason) = m.strip_prefix(SKIP) {
            assert!(
                reason.len() > 10 && reason.ends_with(')'),
                "README.md:{}: a skip needs a reason: {m}",
                b.line
            );
            assert_eq!(b.lang, "sh", "README.md:{}: only sh blocks run", b.line);
            skips.push(format!("README.md:{}: {m}", b.line));
        } else if ready_line(b).is_some() {
            assert_eq!(b.lang, "sh", "README.md:{}: only sh blocks serve", b.line);
        } else if m.starts_with(EXITS) {
            assert!(
                expected_exit(b).is_some() && b.lang == "sh",
                "README.md:{}: `exits N (REASON)` on an sh block: {m}",
                b.line
            );
        } else if m == OUTPUT {
            assert_ne!(b.lang, "sh", "README.md:{}: output is not sh", b.line);
        } else {
            panic!("README.md:{}: unknown readme-test marker: {m}", b.line);
        }
    }
    assert!(
        skips.len() <= MAX_SKIPS,
        "{} skipped blocks (at most {MAX_SKIPS}):\n{}",
        skips.len(),
        skips.join("\n")
    );
    for b in blocks.iter().filter(|b| runs(b)) {
        body_as_run(b).unwrap();
    }
    // The install block is what this test replaces it with.
    let install = blocks
        .iter()
        .find(|b| b.body.iter().any(|l| l.starts_with("cargo install")))
        .expect("README.md has no `cargo install` block");
    assert_eq!(install.body[0], BUILD_STEPS[0].0);
}
