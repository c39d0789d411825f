//! NBD clients the tests drive: qemu-io (one command-line builder,
//! [`QemuIo`], for every test), nbdinfo, and libnbd from the system
//! python. Each returns what the client printed for the test to compare.

use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use super::data::assert_same_lines;
use super::process::{Output, as_strs, require_tool, run, run_merged, run_ok};

/// The python interpreter that has the libnbd bindings (`nbd` module).
/// A pyenv python earlier on PATH usually lacks it, so never rely on PATH.
pub const SYSTEM_PYTHON: &str = "/usr/bin/python3";

/// Panics with an installation hint unless the system python can `import nbd`.
pub fn require_python_nbd() {
    let ok = Command::new(SYSTEM_PYTHON)
        .args(["-c", "import nbd"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        panic!(
            "{SYSTEM_PYTHON} cannot `import nbd`: install python3-libnbd (scripts/test.sh does it)"
        );
    }
}

/// Runs a Python snippet with `h`, an `nbd.NBD()` handle connected to `uri`
/// (and the `nbd` module imported). Returns what the snippet printed.
/// Panics with the full output if the snippet fails.
pub fn nbdsh(uri: &str, script: &str) -> String {
    let prelude = "import nbd, sys\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\n";
    python(&format!("{prelude}{script}\n"), &[uri])
}

/// Runs a Python snippet with the system python (which has the `nbd` module);
/// `args` are available as `sys.argv[1..]`. Returns stdout; panics on failure.
pub fn python(script: &str, args: &[&str]) -> String {
    let o = python_output(script, args);
    if !o.success() {
        panic!(
            "python snippet failed\n{}\n--- script ---\n{script}",
            o.describe()
        );
    }
    o.stdout
}

/// Like [`python`] but returns the [`Output`] whatever the exit status.
pub fn python_output(script: &str, args: &[&str]) -> Output {
    require_python_nbd();
    let mut all = vec!["-c", script];
    all.extend_from_slice(args);
    run(SYSTEM_PYTHON, &all)
}

/// `curl -s -w '\n%{http_code}' ARGS...`: the body, then a line with the
/// HTTP status. Panics with the full output unless curl succeeds.
pub fn curl(args: &[&str]) -> String {
    run_ok("curl", &[&["-s", "-w", "\n%{http_code}"], args].concat())
}

/// `nbdinfo ARGS...` (full output, whatever the status).
pub fn nbdinfo(args: &[&str]) -> Output {
    run("nbdinfo", args)
}

// ---------------------------------------------------------------------------
// qemu-io
// ---------------------------------------------------------------------------

/// One qemu-io command line,
/// `qemu-io [--cache MODE] [--aio MODE] -f raw [-c CMD]... TARGET`,
/// and the ways the tests run it. Every qemu-io of the tests is built
/// here, so its options read the same everywhere.
#[derive(Debug, Clone)]
pub struct QemuIo {
    target: String,
    cache: Option<String>,
    aio: Option<String>,
    cmds: Vec<String>,
}

impl QemuIo {
    /// qemu-io on the raw image at `target` (an NBD URI), no commands yet.
    pub fn new(target: &str) -> QemuIo {
        QemuIo {
            target: target.to_string(),
            cache: None,
            aio: None,
            cmds: Vec::new(),
        }
    }

    /// `--cache MODE`.
    pub fn cache(mut self, mode: &str) -> QemuIo {
        self.cache = Some(mode.to_string());
        self
    }

    /// `--aio MODE`.
    pub fn aio(mut self, mode: &str) -> QemuIo {
        self.aio = Some(mode.to_string());
        self
    }

    /// One more `-c CMD`, run after those already given.
    pub fn cmd(mut self, cmd: &str) -> QemuIo {
        self.cmds.push(cmd.to_string());
        self
    }

    /// `-c CMD` for each command, in order.
    pub fn cmds<S: AsRef<str>>(self, cmds: &[S]) -> QemuIo {
        cmds.iter().fold(self, |q, c| q.cmd(c.as_ref()))
    }

    /// The arguments after `qemu-io`.
    pub fn args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(mode) = &self.cache {
            args.extend(["--cache".to_string(), mode.clone()]);
        }
        if let Some(mode) = &self.aio {
            args.extend(["--aio".to_string(), mode.clone()]);
        }
        args.extend(["-f".to_string(), "raw".to_string()]);
        for c in &self.cmds {
            args.extend(["-c".to_string(), c.clone()]);
        }
        args.push(self.target.clone());
        args
    }

    /// Runs it to completion (see [`run`]), whatever its exit status.
    pub fn run(&self) -> Output {
        let args = self.args();
        run("qemu-io", &as_strs(&args))
    }

    /// Runs it and panics with its output unless it succeeds; its stdout.
    pub fn run_ok(&self) -> String {
        let args = self.args();
        run_ok("qemu-io", &as_strs(&args))
    }

    /// Runs it with stdout and stderr merged (see [`run_merged`]).
    pub fn run_merged(&self, timeout: Duration) -> (ExitStatus, String) {
        let args = self.args();
        run_merged("qemu-io", &as_strs(&args), timeout)
    }

    /// Runs it under `timeout --kill-after=5 SECS` and asserts it was still
    /// waiting when the time was up (exit status 124).
    pub fn assert_hangs(&self, secs: u32) {
        let secs = secs.to_string();
        let qemu_args = self.args();
        let mut args = vec!["--kill-after=5", &secs, "qemu-io"];
        args.extend(as_strs(&qemu_args));
        let o = run("timeout", &args);
        assert_eq!(
            o.status.code(),
            Some(124),
            "qemu-io should have hung until killed\n{}",
            o.describe()
        );
    }

    /// Starts it waiting on its stdin (a pipe, kept open), so it holds its
    /// connection until it reads `quit` or is killed. Output is dropped.
    pub fn spawn_idle(&self) -> Child {
        require_tool("qemu-io");
        Command::new("qemu-io")
            .args(self.args())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn qemu-io: {e}"))
    }
}

/// `qemu-io -f raw -c CMD... URI`, whatever its exit status.
pub fn qemu_io<S: AsRef<str>>(uri: &str, cmds: &[S]) -> Output {
    QemuIo::new(uri).cmds(cmds).run()
}

/// `qemu-io -f raw -c CMD... URI` under `timeout SECS`: asserts it was
/// still waiting when the time was up (exit status 124).
pub fn qemu_io_hangs(uri: &str, cmds: &[&str], secs: u32) {
    QemuIo::new(uri).cmds(cmds).assert_hangs(secs)
}

/// Masks the timing part of qemu-io statistics lines, e.g.
/// `1 MiB, 1 ops; 00.00 sec (521.618 MiB/sec and 521.6185 ops/sec)`
/// → `1 MiB, 1 ops; <timing>`.
pub fn mask_qemu_io_timing(text: &str) -> String {
    text.lines()
        .map(|l| match l.find(" ops; ") {
            Some(i) => format!("{} ops; <timing>", &l[..i]),
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Asserts two qemu-io runs printed the same stdout, line by line with
/// timings masked, and exited with the same status.
pub fn assert_same_qemu_io(what: &str, a: &Output, b: &Output) {
    assert_same_lines(
        what,
        &mask_qemu_io_timing(&a.stdout),
        &mask_qemu_io_timing(&b.stdout),
    );
    assert_eq!(a.status.code(), b.status.code(), "{what}");
}
