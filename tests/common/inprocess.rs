//! Servers in the test process through the library's Rust API
//! (`nbdfault::Null`, `nbdfault::Proxy`): no binary to spawn, no
//! `Listening on` to read, stopped when dropped. For tests that look at
//! what the API gives (metrics, rules' counters, connections) rather than
//! at the command line.

use std::time::Duration;

use super::process::wait_until;

/// A null server of `size` bytes on 127.0.0.1 (a free port) with these
/// rules (YAML; empty for none).
pub fn null_in_process(size: u64, rules_yaml: &str) -> nbdfault::Running {
    let mut b = nbdfault::Null::builder().size(size).listen("127.0.0.1:0");
    if !rules_yaml.is_empty() {
        b = b.rules_yaml(rules_yaml);
    }
    b.spawn()
        .unwrap_or_else(|e| panic!("cannot start an in-process null server: {e}"))
}

/// Waits (at most 10 s) until `p.metrics()` has the line `line`
/// (connections close asynchronously after the client has gone); the
/// metrics then.
pub fn wait_for_metric(p: &nbdfault::Running, line: &str) -> String {
    let mut out = String::new();
    let seen = wait_until(Duration::from_secs(10), || {
        out = p.metrics();
        out.lines().any(|l| l == line)
    });
    assert!(seen, "no line {line:?} in:\n{out}");
    out
}
