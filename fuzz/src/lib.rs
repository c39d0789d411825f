//! Harnesses behind nbdfault's fuzz targets.
//!
//! Each target in `fuzz_targets/` is one line calling a function here, so the
//! same code also runs without libFuzzer: `cargo test` in this directory
//! replays every seed of `corpus/` through it on the stable toolchain.
//!
//! * [`session`]: the sans-IO framing state machine (`Session`), one
//!   direction at a time from reachable states, and both directions
//!   interleaved. Invariants: no panic, no empty frame, no segment larger
//!   than the payload limit, and framing independent of read boundaries.
//! * [`wire`]: the header parsers and builders (requests, replies, option
//!   headers, option data): parse/build round trips.
//! * [`rules`]: rule files, YAML and INI: no panic, parsing is
//!   deterministic, and whatever parses runs in the engine.

pub mod input;
pub mod rules;
pub mod session;
pub mod wire;

/// Whether a known finding is to be tolerated in this run: the
/// comma-separated names in `NBDFAULT_FUZZ_KNOWN` (see the checks that call
/// this for the names). Lets a long run look past a finding that is already
/// reported and not yet fixed, instead of stopping at it every time.
pub fn known(name: &str) -> bool {
    static KNOWN: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    KNOWN
        .get_or_init(|| {
            std::env::var("NBDFAULT_FUZZ_KNOWN")
                .unwrap_or_default()
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        })
        .iter()
        .any(|k| k == name || k == "all")
}
