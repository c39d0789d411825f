//! `power-loss`: the power goes. With `--write-cache volatile` the cache
//! loses what the NBD spec lets a disk lose (every write, write-zeroes and
//! trim answered since the last answered flush; `lose: some` lets a seeded
//! random subset through, `torn: 512|4096` parts of them), then every
//! connection to the export is reset. Without the cache, only the reset.

use serde_json::Value;

use super::kind::{Context, Firing, Kind, Spec};
use crate::intercept::{Lose, Plan, PowerLoss as Mode};
use crate::rules::fields::{Fields, RuleError};
use crate::rules::rng;

/// The spellings `lose` takes.
pub const LOSE: &str = "all or some";
/// The sector sizes `torn` takes.
pub const TORN: &[u32] = &[512, 4096];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PowerLoss {
    pub lose: Lose,
    pub torn: Option<u32>,
}

/// Reads the mode fields as a rules file or a `POST /power-loss` body
/// spells them; the message names what is wrong.
pub fn mode(lose: Option<&str>, torn: Option<i128>) -> Result<PowerLoss, (&'static str, String)> {
    let lose = match lose {
        None | Some("all") => Lose::All,
        Some("some") => Lose::Some,
        Some(s) => return Err(("lose", format!("lose must be {LOSE}, found {s:?}"))),
    };
    let torn = match torn {
        None => None,
        Some(n) if TORN.iter().any(|&t| i128::from(t) == n) => Some(n as u32),
        Some(n) => {
            return Err((
                "torn",
                format!("torn must be 512 or 4096 (bytes per sector), found {n}"),
            ));
        }
    };
    if torn.is_some() && lose == Lose::All {
        return Err((
            "torn",
            "torn needs lose: some (with lose: all no write reaches the server, whole or torn)"
                .into(),
        ));
    }
    Ok(PowerLoss { lose, torn })
}

impl PowerLoss {
    /// The plan's mode, with the seed of its random choices.
    pub fn with_seed(&self, seed: u64) -> Mode {
        Mode {
            lose: self.lose,
            torn: self.torn,
            seed,
        }
    }
}

impl Kind for PowerLoss {
    const SPEC: Spec = Spec {
        name: "power-loss",
        fields: &["lose", "torn"],
        partial: false,
        connect: false,
        doc: "lose the volatile write cache (lose: all|some, torn: 512|4096), reset every connection to the export",
    };

    fn check(fields: &dyn Fields, _: &Context) -> Result<Self, RuleError> {
        let lose = fields.name("lose", LOSE)?;
        let torn = match fields.value("torn") {
            None => None,
            Some(crate::rules::fields::Scalar::Int(n)) => Some(n),
            Some(v) => return Err(fields.must_be("torn", "512 or 4096 (bytes per sector)", v)),
        };
        mode(lose, torn).map_err(|(field, msg)| fields.at_value(field, msg))
    }

    fn describe(&self) -> Vec<(&'static str, Value)> {
        let lose = match self.lose {
            Lose::All => "all",
            Lose::Some => "some",
        };
        let mut out = vec![("lose", Value::from(lose))];
        if let Some(t) = self.torn {
            out.push(("torn", Value::from(t)));
        }
        out
    }

    fn plan(&self, fire: &mut Firing) -> Plan {
        Plan::PowerLoss(self.with_seed(rng::next_u64(fire.rng)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{Given, plan_of, request};
    use super::*;
    use crate::protocol::{EventKind, EventSet};
    use crate::rules::fields::Scalar;

    fn check(given: &[(&'static str, Scalar<'static>)]) -> Result<PowerLoss, String> {
        let ctx = Context {
            events: EventSet::of(EventKind::Request),
        };
        PowerLoss::check(&Given::of(given), &ctx).map_err(|e| e.to_string())
    }

    #[test]
    fn modes_and_their_refusals() {
        assert_eq!(
            check(&[]),
            Ok(PowerLoss {
                lose: Lose::All,
                torn: None
            })
        );
        assert_eq!(
            check(&[("lose", Scalar::Str("some")), ("torn", Scalar::Int(512))]),
            Ok(PowerLoss {
                lose: Lose::Some,
                torn: Some(512)
            })
        );
        assert_eq!(
            check(&[("lose", Scalar::Str("most"))]).unwrap_err(),
            "given:2:10: lose must be all or some, found \"most\""
        );
        assert_eq!(
            check(&[("lose", Scalar::Str("some")), ("torn", Scalar::Int(100))]).unwrap_err(),
            "given:3:10: torn must be 512 or 4096 (bytes per sector), found 100"
        );
        assert!(
            check(&[("torn", Scalar::Int(512))])
                .unwrap_err()
                .contains("torn needs lose: some")
        );
    }

    #[test]
    fn the_seed_comes_from_the_rule_stream() {
        let a = PowerLoss {
            lose: Lose::Some,
            torn: None,
        };
        let ev = request();
        let (mut r1, mut r2) = (5, 5);
        assert_eq!(plan_of(&a, &ev, 0, &mut r1), plan_of(&a, &ev, 0, &mut r2));
        assert!(matches!(
            plan_of(&a, &ev, 0, &mut 6),
            Plan::PowerLoss(Mode {
                lose: Lose::Some,
                ..
            })
        ));
    }
}
