//! The binary under test: `nbdfault` started as a child process, ready
//! once it printed `Listening on URI`, with its stderr captured to a file
//! and its later stdout lines kept for the test to read.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::process::{
    START_TIMEOUT, command_line, kill_child, read_to_string_lossy, wait_child_exit, wait_until,
};

pub fn nbdfault_bin() -> &'static str {
    env!("CARGO_BIN_EXE_nbdfault")
}

/// A running `nbdfault` process that announced `Listening on URI`.
pub struct Nbdfault {
    child: Child,
    pub uri: String,
    /// Lines printed on stdout after the `Listening on` line.
    stdout_rest: mpsc::Receiver<String>,
    stderr_path: PathBuf,
    pub args: Vec<String>,
    _dir: TempDir,
}

impl Nbdfault {
    /// Spawns `nbdfault ARGS...` and waits (at most 20 s) for its
    /// `Listening on URI` line. Panics with the captured stderr on timeout
    /// or early exit.
    pub fn start(args: &[&str]) -> Nbdfault {
        Nbdfault::start_with_env(args, &[])
    }

    /// [`Nbdfault::start`] with extra environment variables.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Nbdfault {
        let dir = TempDir::new().expect("tempdir");
        let stderr_path = dir.path().join("nbdfault.stderr");
        let stderr_file = File::create(&stderr_path).expect("create stderr log");
        let line = command_line(nbdfault_bin(), args);
        let mut child = Command::new(nbdfault_bin())
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr_file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn `{line}`: {e}"));

        let (tx, rx) = mpsc::channel::<String>();
        let stdout = child.stdout.take().unwrap();
        thread::spawn(move || {
            // Keep draining stdout for the whole life of the process so it
            // never blocks or dies of SIGPIPE.
            for l in BufReader::new(stdout).lines() {
                match l {
                    Ok(l) => {
                        if tx.send(l).is_err() {
                            // Receiver gone: keep draining silently.
                        }
                    }
                    Err(_) => break,
                }
            }
        });

        let deadline = Instant::now() + START_TIMEOUT;
        let mut seen = Vec::new();
        let uri = loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(l) => {
                    if let Some(uri) = l.strip_prefix("Listening on ") {
                        break uri.trim().to_string();
                    }
                    seen.push(l);
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    // stdout closed: the process exited (or closed stdout).
                    let _ = wait_until(Duration::from_secs(2), || {
                        matches!(child.try_wait(), Ok(Some(_)))
                    });
                    let status = child.try_wait().ok().flatten();
                    kill_child(&mut child);
                    panic!(
                        "`{line}` closed stdout without printing `Listening on URI` (exit status: {status:?})\n--- stdout ---\n{}\n--- stderr ---\n{}",
                        seen.join("\n"),
                        read_to_string_lossy(&stderr_path)
                    );
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                // Give the reader a moment to deliver a last line.
                if let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
                    if let Some(uri) = l.strip_prefix("Listening on ") {
                        panic!(
                            "`{line}` printed `Listening on {uri}` but exited with {status}\n--- stderr ---\n{}",
                            read_to_string_lossy(&stderr_path)
                        );
                    }
                    seen.push(l);
                }
                panic!(
                    "`{line}` exited with {status} before printing `Listening on URI`\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    seen.join("\n"),
                    read_to_string_lossy(&stderr_path)
                );
            }
            if Instant::now() >= deadline {
                kill_child(&mut child);
                panic!(
                    "`{line}` did not print `Listening on URI` within {START_TIMEOUT:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    seen.join("\n"),
                    read_to_string_lossy(&stderr_path)
                );
            }
        };
        assert!(
            seen.is_empty(),
            "`{line}` printed something before `Listening on`: {seen:?}"
        );
        Nbdfault {
            child,
            uri,
            stdout_rest: rx,
            stderr_path,
            args: args.iter().map(|s| s.to_string()).collect(),
            _dir: dir,
        }
    }

    /// `nbdfault proxy --listen 127.0.0.1:0 --upstream UPSTREAM`.
    pub fn proxy(upstream: &str) -> Nbdfault {
        Nbdfault::start(&["proxy", "--listen", "127.0.0.1:0", "--upstream", upstream])
    }

    /// [`Nbdfault::proxy`] with `more` arguments after it.
    pub fn proxy_with(upstream: &str, more: &[&str]) -> Nbdfault {
        let mut args = vec!["proxy", "--listen", "127.0.0.1:0", "--upstream", upstream];
        args.extend_from_slice(more);
        Nbdfault::start(&args)
    }

    /// `nbdfault proxy --listen LISTEN --upstream UPSTREAM`.
    pub fn proxy_on(listen: &str, upstream: &str) -> Nbdfault {
        Nbdfault::start(&["proxy", "--listen", listen, "--upstream", upstream])
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Everything the process wrote on stderr so far.
    pub fn stderr(&self) -> String {
        read_to_string_lossy(&self.stderr_path)
    }

    /// Lines the process printed on stdout after `Listening on` (so far).
    pub fn more_stdout(&self) -> Vec<String> {
        self.stdout_rest.try_iter().collect()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The URL of the `Control on URL` line that follows `Listening on`
    /// (waits up to 5 s for it). Reads the lines after `Listening on`:
    /// call it once.
    pub fn control_url(&self) -> String {
        let mut url = None;
        assert!(
            wait_until(Duration::from_secs(5), || {
                url = self
                    .more_stdout()
                    .into_iter()
                    .find_map(|l| l.strip_prefix("Control on ").map(str::to_string));
                url.is_some()
            }),
            "no `Control on` line\n{}",
            self.stderr()
        );
        url.unwrap_or_default()
    }

    /// Polls the stderr log until it contains `needle` (or `timeout` passes).
    pub fn wait_for_stderr(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.stderr().contains(needle))
    }

    /// Waits (at most `timeout`) for the process to exit; its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_child_exit(&mut self.child, timeout)
    }
}

impl Drop for Nbdfault {
    fn drop(&mut self) {
        kill_child(&mut self.child);
    }
}
