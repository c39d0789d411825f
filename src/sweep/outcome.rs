//! What a run's end says about the client: the sweep's verdicts, decided
//! from facts about the run alone (so they are unit-tested without one).

use std::fmt;

use serde::Serialize;

/// How a run ended, best to worst-but-one (`corrupt` is the worst).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Exit 0 (and `--verify` passed): the client survived.
    Ok,
    /// Exited non-zero in time: it noticed and said so.
    Error,
    /// Killed at the timeout.
    Hang,
    /// Killed by a signal, or a sanitizer or abort report.
    Crash,
    /// Exit 0 but `--verify` failed: silent corruption.
    Corrupt,
    /// The targeted message never came: the client took another path.
    Unreached,
}

pub const ALL: [Outcome; 6] = [
    Outcome::Ok,
    Outcome::Error,
    Outcome::Hang,
    Outcome::Crash,
    Outcome::Corrupt,
    Outcome::Unreached,
];

impl Outcome {
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Hang => "hang",
            Outcome::Crash => "crash",
            Outcome::Corrupt => "corrupt",
            Outcome::Unreached => "unreached",
        }
    }

    pub fn from_name(s: &str) -> Option<Outcome> {
        ALL.into_iter().find(|o| o.name() == s)
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How the client process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Exit {
    Code(i32),
    Signal(i32),
    /// Still running at the timeout (then killed).
    TimedOut,
}

/// Signals that mean the program itself crashed, as a shell reports them
/// (128 + N) when the client ran under `sh -c`: SIGILL, SIGABRT, SIGBUS,
/// SIGFPE, SIGSEGV.
const CRASH_SIGNALS: [i32; 5] = [4, 6, 7, 8, 11];

/// What stderr says when a sanitizer or an assertion stopped a program.
const CRASH_REPORTS: [&str; 5] = [
    "ERROR: AddressSanitizer",
    "ERROR: LeakSanitizer",
    "runtime error:",
    "Assertion `",
    "panicked at",
];

/// The verdict on one run. `fired` says whether the targeted rule fired;
/// `verified` is `--verify`'s result, asked only when the client exited 0.
/// A power loss ends the client as a crash of its machine would: what it
/// printed and how it exited say nothing; `--verify` on what the disk kept
/// decides (`None` for other kinds, or a run that hung or never fired).
pub fn after_power_loss(
    kind: &str,
    exit: Exit,
    fired: bool,
    verified: Option<bool>,
) -> Option<Outcome> {
    if kind != "power-loss" || !fired || exit == Exit::TimedOut {
        return None;
    }
    Some(match verified {
        Some(false) => Outcome::Corrupt,
        _ => Outcome::Ok,
    })
}

pub fn classify(exit: Exit, fired: bool, stderr: &str, verified: impl FnOnce() -> bool) -> Outcome {
    let crashed = match exit {
        Exit::Signal(_) => true,
        Exit::Code(c) => c > 128 && CRASH_SIGNALS.contains(&(c - 128)),
        Exit::TimedOut => false,
    } || CRASH_REPORTS.iter().any(|r| stderr.contains(r));
    if !fired {
        return Outcome::Unreached;
    }
    if crashed {
        return Outcome::Crash;
    }
    match exit {
        Exit::TimedOut => Outcome::Hang,
        Exit::Code(0) if verified() => Outcome::Ok,
        Exit::Code(0) => Outcome::Corrupt,
        _ => Outcome::Error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts() {
        let ok = || true;
        assert_eq!(classify(Exit::Code(0), true, "", ok), Outcome::Ok);
        assert_eq!(
            classify(Exit::Code(0), true, "", || false),
            Outcome::Corrupt
        );
        assert_eq!(
            classify(Exit::Code(1), true, "read failed: EIO", ok),
            Outcome::Error
        );
        assert_eq!(classify(Exit::TimedOut, true, "", ok), Outcome::Hang);
        assert_eq!(classify(Exit::Signal(11), true, "", ok), Outcome::Crash);
        // A crash under `sh -c`, and one reported on stderr.
        assert_eq!(classify(Exit::Code(139), true, "", ok), Outcome::Crash);
        assert_eq!(classify(Exit::Code(130), true, "", ok), Outcome::Error);
        assert_eq!(
            classify(
                Exit::Code(1),
                true,
                "==1==ERROR: AddressSanitizer: heap",
                ok
            ),
            Outcome::Crash
        );
        assert_eq!(classify(Exit::Code(1), false, "", ok), Outcome::Unreached);
        // verify is only asked after exit 0.
        assert_eq!(
            classify(Exit::Code(2), true, "", || panic!("asked")),
            Outcome::Error
        );
        for o in ALL {
            assert_eq!(Outcome::from_name(o.name()), Some(o));
        }
    }
}
