//! The rules' random numbers: seeded streams, so a run is reproducible from
//! the rule set's seed. A leaf module: the engine draws from it for
//! probabilities, the actions for jitter and random corruption.

/// Seed of a rule's random stream: the rule set's seed, the rule's position
/// and, for per-connection rules, the connection, mixed so that nearby
/// inputs give unrelated streams.
pub fn stream_seed(seed: u64, rule: u64, conn: Option<u64>) -> u64 {
    let mut s = seed ^ mix(rule.wrapping_add(0x9e37_79b9_7f4a_7c15));
    if let Some(c) = conn {
        s ^= mix(c.wrapping_mul(0xd6e8_feb8_6659_fd93));
    }
    s
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// SplitMix64: small, fast, and ours; reproducible from the seed.
pub fn next_u64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    mix(*state)
}

/// A uniform draw in [0, 1).
pub fn unit(state: &mut u64) -> f64 {
    (next_u64(state) >> 11) as f64 / (1u64 << 53) as f64
}

/// A uniform draw in [0, n) (n > 0).
pub fn below(state: &mut u64, n: u64) -> u64 {
    // Multiply-shift: unbiased enough for fault placement, no division.
    ((u128::from(next_u64(state)) * u128::from(n)) >> 64) as u64
}
