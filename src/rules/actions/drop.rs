//! `drop`: swallow the message whole — a request the server never sees, a
//! reply the client never gets, an option nobody answers.

use crate::intercept::{Event, Plan};

pub fn plan(ev: &Event) -> Plan {
    Plan::Discard {
        keep: super::kept_prefix(ev),
        answer: None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::event;
    use super::*;
    use crate::protocol::{Direction, EventKind, MessageMeta};

    #[test]
    fn first_option_keeps_the_client_flags() {
        let ev = event(
            EventKind::Export,
            Direction::ToServer,
            20,
            MessageMeta::default(),
        );
        assert_eq!(
            plan(&ev),
            Plan::Discard {
                keep: 4,
                answer: None
            }
        );
        let ev = event(
            EventKind::Request,
            Direction::ToServer,
            28,
            MessageMeta::default(),
        );
        assert_eq!(
            plan(&ev),
            Plan::Discard {
                keep: 0,
                answer: None
            }
        );
    }
}
