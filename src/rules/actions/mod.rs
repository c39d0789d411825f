//! Rule actions, one file each, and their registry.
//!
//! An action's file holds all of it: its parameters (a type), its
//! descriptor ([`Spec`]: name, fields, where it may apply), its check (how
//! its fields are read and what is refused, with the messages), its
//! spelling in `GET /rules` ([`Kind::describe`]) and its [`Plan`] when it
//! fires. The vocabulary they share is in `kind.rs`.
//!
//! Adding an action is a new file here, its `mod` line and one line in the
//! `registry!` invocation below; the [`Action`] enum, the name and field
//! lists the checks and messages use, and the dispatch come from that line.
//! (The `mod` lines stay outside the macro so rustfmt still sees the files.)

pub mod blackhole;
pub mod r#break;
pub mod corrupt;
pub mod delay;
pub mod disconnect;
pub mod drop;
pub mod error;
mod kind;
pub mod none;
pub mod power_loss;
pub mod refuse;
pub mod slice;
pub mod stall;
pub mod throttle;

use serde_json::Value;

pub(crate) use kind::joined;
#[cfg(test)]
pub(crate) use kind::test_support;
pub use kind::{Context, Firing, Kind, Spec};

use crate::intercept::Plan;
use crate::rules::fields::{Fields, RuleError};

/// An action as the checks find it: its descriptor, and its check wrapped
/// to give an [`Action`].
pub struct Registered {
    pub spec: &'static Spec,
    check: fn(&dyn Fields, &Context) -> Result<Action, RuleError>,
}

impl Registered {
    /// See [`Kind::check`].
    pub fn check(&self, fields: &dyn Fields, ctx: &Context) -> Result<Action, RuleError> {
        (self.check)(fields, ctx)
    }
}

/// The [`Registered`] entry of one action.
macro_rules! entry {
    ($variant:ident($ty:ty)) => {
        Registered {
            spec: &<$ty as Kind>::SPEC,
            check: |f, c| <$ty as Kind>::check(f, c).map(Action::$variant),
        }
    };
}

/// Generates [`Action`] (one variant per registered action, wrapping its
/// parameter type), the registry [`REGISTRY`] and the dispatch.
macro_rules! registry {
    ($($variant:ident($ty:ty),)*) => {
        /// A rule's action and its parameters.
        #[derive(Debug, Clone, PartialEq)]
        pub enum Action {
            $($variant($ty),)*
        }

        /// Every action, in registration order.
        pub static REGISTRY: &[Registered] = &[$(entry!($variant($ty)),)*];

        impl Action {
            pub fn name(&self) -> &'static str {
                self.spec().name
            }

            pub fn spec(&self) -> &'static Spec {
                match self {
                    $(Action::$variant(_) => &<$ty as Kind>::SPEC,)*
                }
            }

            /// See [`Kind::describe`].
            pub fn describe(&self) -> Vec<(&'static str, Value)> {
                match self {
                    $(Action::$variant(a) => a.describe(),)*
                }
            }

            /// The plan for this action firing.
            pub fn plan(&self, fire: &mut Firing) -> Plan {
                match self {
                    $(Action::$variant(a) => a.plan(fire),)*
                }
            }
        }
    };
}

// Registration order is the order of the field list in messages (each
// action's fields in turn); the default action is listed first among the
// names.
registry! {
    Error(error::Error),
    Delay(delay::Delay),
    Stall(stall::Stall),
    Disconnect(disconnect::Disconnect),
    Drop(drop::Drop),
    Corrupt(corrupt::Corruption),
    Throttle(throttle::Throttle),
    Slice(slice::Slice),
    Refuse(refuse::Refuse),
    Blackhole(blackhole::Blackhole),
    Nothing(none::Nothing),
    Break(r#break::Break),
    PowerLoss(power_loss::PowerLoss),
}

/// The action of a rule that names none: hang up, as QEMU's injector does.
pub static DEFAULT: Registered = entry!(Disconnect(disconnect::Disconnect));

/// The registered action called `name`.
pub fn find(name: &str) -> Option<&'static Registered> {
    REGISTRY.iter().find(|r| r.spec.name == name)
}

fn specs() -> impl Iterator<Item = &'static Spec> {
    REGISTRY.iter().map(|r| r.spec)
}

/// Action names as messages list them: the default first, then the others
/// in registration order.
pub fn names() -> Vec<&'static str> {
    let default = DEFAULT.spec.name;
    std::iter::once(default)
        .chain(specs().map(|s| s.name).filter(|&n| n != default))
        .collect()
}

/// Every action's own fields, each once, in registration order.
pub fn fields() -> Vec<&'static str> {
    let mut all: Vec<&'static str> = Vec::new();
    for f in specs().flat_map(|s| s.fields) {
        if !all.contains(f) {
            all.push(f);
        }
    }
    all
}

/// The actions taking `field`, in registration order.
pub fn taking(field: &str) -> Vec<&'static str> {
    specs()
        .filter(|s| s.fields.contains(&field))
        .map(|s| s.name)
        .collect()
}

/// Names of the actions whose spec says yes, as messages list them.
pub fn names_where(pick: impl Fn(&Spec) -> bool) -> Vec<&'static str> {
    names()
        .into_iter()
        .filter(|&n| specs().any(|s| s.name == n && pick(s)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{EventKind, EventSet};

    #[test]
    fn names_and_fields_keep_their_order() {
        assert_eq!(
            names(),
            [
                "disconnect",
                "error",
                "delay",
                "stall",
                "drop",
                "corrupt",
                "throttle",
                "slice",
                "refuse",
                "blackhole",
                "none",
                "break",
                "power-loss"
            ]
        );
        assert_eq!(
            fields(),
            [
                "errno",
                "duration",
                "jitter",
                "reset",
                "slow-close",
                "at",
                "xor",
                "bits",
                "rate",
                "size",
                "delay",
                "tag",
                "lose",
                "torn"
            ]
        );
        assert_eq!(
            taking("duration"),
            ["delay", "stall", "refuse", "blackhole"]
        );
        assert_eq!(
            names_where(|s| s.partial),
            ["disconnect", "delay", "stall", "slice"]
        );
        assert_eq!(
            names_where(|s| s.connect),
            ["disconnect", "delay", "refuse", "blackhole", "none"]
        );
    }

    #[test]
    fn every_spec_is_well_formed() {
        let all = fields();
        let specs: Vec<&Spec> = specs().collect();
        for (i, s) in specs.iter().enumerate() {
            assert!(!s.doc.is_empty(), "{}", s.name);
            assert!(
                specs[..i].iter().all(|o| o.name != s.name),
                "{} twice",
                s.name
            );
            for f in s.fields {
                assert!(all.contains(f), "{f} of {}", s.name);
                assert!(taking(f).contains(&s.name));
            }
        }
        assert!(
            find(DEFAULT.spec.name).is_some(),
            "the default is registered"
        );
    }

    /// Every action's describe() shows only its own fields, in its order.
    #[test]
    fn describe_shows_only_own_fields() {
        use crate::rules::fields::Scalar;
        let given = test_support::Given::of(&[
            ("errno", Scalar::Str("EIO")),
            ("duration", Scalar::Str("1s")),
            ("reset", Scalar::Bool(true)),
            ("at", Scalar::Int(3)),
            ("rate", Scalar::Str("1M/s")),
            ("size", Scalar::Int(1)),
            ("slow-close", Scalar::Str("1s")),
            ("tag", Scalar::Str("t")),
            ("set-state", Scalar::Int(1)),
        ]);
        for r in REGISTRY {
            let s = r.spec;
            // The outages apply to connect alone.
            let only_connect = matches!(s.name, "refuse" | "blackhole");
            let ctx = Context {
                events: EventSet::of(if only_connect {
                    EventKind::Connect
                } else {
                    EventKind::Request
                }),
            };
            let a = r
                .check(&given, &ctx)
                .unwrap_or_else(|e| panic!("{} refused: {e}", s.name));
            assert_eq!(a.name(), s.name);
            let keys: Vec<&str> = a.describe().into_iter().map(|(k, _)| k).collect();
            let own: Vec<&str> = s
                .fields
                .iter()
                .copied()
                .filter(|f| keys.contains(f))
                .collect();
            assert_eq!(keys, own, "{}", s.name);
        }
        assert!(find("bogus").is_none());
    }
}
