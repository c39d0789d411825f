//! `break`: blkdebug's breakpoint on one request. The matched request
//! (header and payload) is set aside under `tag` and not sent on until it
//! is resumed through the control API (`POST /breaks/TAG/resume`); the
//! connection's other requests and replies keep flowing meanwhile. Held
//! requests are kept in `proxy::breaks`.

use std::sync::Arc;

use serde_json::Value;

use super::kind::{Context, Firing, Kind, Spec, only_on};
use crate::intercept::Plan;
use crate::protocol::EventKind;
use crate::rules::fields::{Fields, RuleError, printable_name};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Break {
    pub tag: Arc<str>,
}

impl Kind for Break {
    const SPEC: Spec = Spec {
        name: "break",
        fields: &["tag"],
        partial: false,
        connect: false,
        doc: "hold the request under `tag` until resumed; other messages keep flowing",
    };

    fn check(fields: &dyn Fields, ctx: &Context) -> Result<Self, RuleError> {
        only_on(fields, ctx, Self::SPEC.name, EventKind::Request)?;
        const ALLOWED: &str = "a tag names held requests in /breaks/TAG";
        let Some(tag) = fields.name("tag", ALLOWED)? else {
            return Err(
                fields.at_action("action break needs a tag (e.g. tag: third-write)".to_string())
            );
        };
        // Tags go into URLs, log lines and JSON, like rule names.
        if tag.trim().is_empty() || !printable_name(tag) || tag.contains('/') {
            return Err(fields.at_value(
                "tag",
                format!(
                    "tag must be printable text without a slash ({ALLOWED}), found {}",
                    fields.found("tag")
                ),
            ));
        }
        Ok(Break { tag: tag.into() })
    }

    fn describe(&self) -> Vec<(&'static str, Value)> {
        vec![("tag", Value::from(&*self.tag))]
    }

    fn plan(&self, _: &mut Firing) -> Plan {
        Plan::SetAside {
            tag: self.tag.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::Given;
    use super::*;
    use crate::protocol::EventSet;
    use crate::rules::fields::Scalar;

    #[test]
    fn tags_are_required_and_printable() {
        let ctx = Context {
            events: EventSet::of(EventKind::Request),
        };
        let e = Break::check(&Given::of(&[]), &ctx).unwrap_err();
        assert_eq!(
            e.to_string(),
            "given:1:1: action break needs a tag (e.g. tag: third-write)"
        );
        let e = Break::check(&Given::of(&[("tag", Scalar::Str("a/b"))]), &ctx).unwrap_err();
        assert_eq!(
            e.to_string(),
            "given:2:10: tag must be printable text without a slash (a tag names held \
             requests in /breaks/TAG), found \"a/b\""
        );
        let reply = Context {
            events: EventSet::of(EventKind::Reply),
        };
        let e = Break::check(&Given::of(&[("tag", Scalar::Str("t"))]), &reply).unwrap_err();
        assert!(
            e.message
                .starts_with("action break applies only to event request"),
            "{e}"
        );
    }
}
