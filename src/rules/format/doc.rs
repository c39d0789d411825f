//! Rules as `GET /rules` shows them: each rule spelled as in a YAML rules
//! file (the same field names and value forms, so a listing can be edited
//! and sent back), with its counts. The control API only serializes this.
//!
//! The key order is fixed (clients and tests read the raw text): the rule
//! fields, then the action's own (from its file, `Kind::describe`), then
//! the counts.

use serde::ser::{Serialize, SerializeStruct, Serializer};
use serde_json::Value;

use crate::protocol::{Direction, consts};
use crate::rules::engine::RuleStats;
use crate::rules::engine::{Engine, Loaded};
use crate::rules::model::{Rule, When};

/// Every rule of an engine, and its seed.
#[derive(serde::Serialize)]
pub struct RulesDoc {
    rules: Vec<RuleDoc>,
    seed: u64,
}

/// One rule and its counts.
pub struct RuleDoc {
    rule: Rule,
    stats: RuleStats,
}

pub fn rules(engine: &Engine) -> RulesDoc {
    RulesDoc {
        rules: engine.rules().iter().map(|l| rule(l)).collect(),
        seed: engine.seed(),
    }
}

fn rule(loaded: &Loaded) -> RuleDoc {
    RuleDoc {
        rule: loaded.rule().clone(),
        stats: loaded.stats(),
    }
}

/// A number's name in one of protocol's tables, else the number.
fn name_or_number<T: Copy + PartialEq + ToString>(table: &[(T, &str)], v: T) -> String {
    table
        .iter()
        .find(|(n, _)| *n == v)
        .map_or_else(|| v.to_string(), |(_, name)| name.to_string())
}

#[derive(serde::Serialize)]
struct OffsetDoc {
    start: Option<u64>,
    end: Option<u64>,
}

impl Serialize for RuleDoc {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let r = &self.rule;
        let f = &r.filter;
        let c = &r.counters;
        let extra = r.action.describe();
        let mut m = s.serialize_struct("RuleJson", 19 + extra.len())?;
        m.serialize_field("name", &r.name)?;
        m.serialize_field("file", &r.origin.file)?;
        m.serialize_field("line", &r.origin.line)?;
        let events: Vec<&str> = f.events.iter().map(|k| k.name()).collect();
        m.serialize_field("event", &events)?;
        m.serialize_field("direction", f.direction.map_or("both", Direction::name))?;
        let commands = f.commands.as_ref().map(|cmds| {
            cmds.iter()
                .map(|&c| name_or_number(consts::COMMANDS, c))
                .collect::<Vec<_>>()
        });
        m.serialize_field("command", &commands)?;
        let offset = f.offset.map(|o| OffsetDoc {
            start: o.start,
            end: o.end,
        });
        m.serialize_field("offset", &offset)?;
        let options = f.options.as_ref().map(|opts| {
            opts.iter()
                .map(|&o| name_or_number(consts::OPTIONS, o))
                .collect::<Vec<_>>()
        });
        m.serialize_field("option", &options)?;
        // Only when given, so rules without it read as they always have.
        match &f.connections {
            Some(conns) => {
                let spelled: Vec<Value> = conns
                    .iter()
                    .map(|r| match r.last {
                        Some(l) if l == r.first => Value::from(l),
                        _ => Value::from(r.to_string()),
                    })
                    .collect();
                m.serialize_field("connection", &spelled)?;
            }
            None => m.skip_field("connection")?,
        }
        let when = match r.when {
            When::Before => Value::from("before"),
            When::After => Value::from("after"),
            When::Bytes(n) => Value::from(n),
            // As the injector's INI spells it (the only way to write it).
            When::AllBut(n) => Value::from(i64::try_from(n).map_or(i64::MIN, |n| -n)),
        };
        m.serialize_field("when", &when)?;
        m.serialize_field("after", &c.after)?;
        // Only when given, like `connection`.
        match c.after_bytes {
            Some(n) => m.serialize_field("after-bytes", &n)?,
            None => m.skip_field("after-bytes")?,
        }
        m.serialize_field("times", &c.times)?;
        m.serialize_field("every", &c.every)?;
        m.serialize_field("probability", &c.probability)?;
        m.serialize_field("per-connection", &c.per_connection)?;
        m.serialize_field("action", r.action.name())?;
        for (key, value) in &extra {
            m.serialize_field(key, value)?;
        }
        m.serialize_field("matched", &self.stats.matched)?;
        m.serialize_field("fired", &self.stats.fired)?;
        m.end()
    }
}
