//! `disconnect`: pass `when` bytes of the message on, then close both the
//! client's and the upstream connection — a server that dies mid-reply, a
//! client that vanishes mid-request. `reset: true` closes with a TCP reset.

use crate::intercept::Plan;

pub fn plan(at: u64, reset: bool) -> Plan {
    Plan::Cut { at, reset }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_at_the_given_byte() {
        assert_eq!(plan(4, true), Plan::Cut { at: 4, reset: true });
    }
}
