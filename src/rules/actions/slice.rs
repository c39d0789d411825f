//! `slice`: pass the event on in writes of at most `size` bytes, with an
//! optional `delay` between them, so the peer reads the message in pieces
//! — a test of its handling of short reads (toxiproxy's slicer).

use std::time::Duration;

use serde_json::Value;

use super::kind::{Context, Firing, Kind, Spec, shown};
use crate::intercept::Plan;
use crate::rules::fields::{Fields, RuleError};

/// The most bytes a piece may be: past that, slicing slices nothing.
pub const MAX_PIECE: u64 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slice {
    /// Bytes per write.
    pub size: u64,
    /// Between two writes.
    pub delay: Duration,
}

impl Kind for Slice {
    const SPEC: Spec = Spec {
        name: "slice",
        fields: &["size", "delay"],
        partial: true,
        connect: false,
        doc: "pass the event on in writes of `size` bytes, `delay` apart",
    };

    fn check(fields: &dyn Fields, _: &Context) -> Result<Self, RuleError> {
        let Some(size) = fields.size("size")? else {
            return Err(fields.at_action(
                "action slice needs a size: the bytes per write (e.g. size: 1)".to_string(),
            ));
        };
        if !(1..=MAX_PIECE).contains(&size) {
            return Err(fields.at_value(
                "size",
                format!(
                    "size must be from 1 to {MAX_PIECE} bytes (1MiB), found {}",
                    fields.found("size")
                ),
            ));
        }
        Ok(Slice {
            size,
            delay: fields.duration("delay")?.unwrap_or(Duration::ZERO),
        })
    }

    fn describe(&self) -> Vec<(&'static str, Value)> {
        vec![
            ("size", Value::from(self.size)),
            ("delay", shown(self.delay)),
        ]
    }

    fn plan(&self, fire: &mut Firing) -> Plan {
        Plan::Pace {
            at: fire.at,
            size: self.size,
            first: Duration::ZERO,
            gap: self.delay,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{Given, plan_of, request};
    use super::*;
    use crate::protocol::{EventKind, EventSet};
    use crate::rules::fields::Scalar;

    fn check(given: &[(&'static str, Scalar<'static>)]) -> Result<Slice, String> {
        let ctx = Context {
            events: EventSet::of(EventKind::Data),
        };
        Slice::check(&Given::of(given), &ctx).map_err(|e| e.to_string())
    }

    #[test]
    fn pieces_start_after_when_with_no_hold_before_the_first() {
        let s = Slice {
            size: 3,
            delay: Duration::from_millis(5),
        };
        assert_eq!(
            plan_of(&s, &request(), 4, &mut 0),
            Plan::Pace {
                at: 4,
                size: 3,
                first: Duration::ZERO,
                gap: Duration::from_millis(5)
            }
        );
    }

    #[test]
    fn size_is_required_and_bounded() {
        assert_eq!(
            check(&[]),
            Err("given:1:1: action slice needs a size: the bytes per write (e.g. size: 1)".into())
        );
        assert_eq!(
            check(&[("size", Scalar::Int(0))]),
            Err("given:2:10: size must be from 1 to 1048576 bytes (1MiB), found 0".into())
        );
        assert_eq!(
            check(&[("size", Scalar::Str("2M"))]),
            Err("given:2:10: size must be from 1 to 1048576 bytes (1MiB), found \"2M\"".into())
        );
        assert_eq!(
            check(&[("size", Scalar::Str("4K")), ("delay", Scalar::Str("1ms"))]),
            Ok(Slice {
                size: 4096,
                delay: Duration::from_millis(1)
            })
        );
        assert_eq!(
            check(&[("size", Scalar::Int(1))]),
            Ok(Slice {
                size: 1,
                delay: Duration::ZERO
            })
        );
    }
}
