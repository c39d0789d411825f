//! `stall`: stop passing this flow on with both sockets kept open, for
//! `duration` or until the connection ends — a reply that never comes, for
//! exercising a client's timeout paths.

use std::time::Duration;

use crate::intercept::Plan;

pub fn plan(at: u64, duration: Option<Duration>) -> Plan {
    Plan::Hold { at, duration }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stall_without_duration_holds_until_the_end() {
        assert_eq!(
            plan(0, None),
            Plan::Hold {
                at: 0,
                duration: None
            }
        );
    }
}
