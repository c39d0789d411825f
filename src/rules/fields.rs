//! The seam between the rules formats and the checks: a rule's fields as
//! located scalars ([`Fields`], which each format implements), the typed
//! getters every check reads them with, and the located [`RuleError`] they
//! produce.
//!
//! The getters' messages are shared by every format and every action, so
//! "reset must be true or false, found 1" reads the same wherever it comes
//! from.

use std::time::Duration;

/// The longest duration a rule may give (`duration`, `jitter`): a day. A
/// longer hold is a stall without a duration; with the bound, no sum of
/// durations in a firing can overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 60 * 60);

/// Whether `c` may not appear in a rule name. Names go into log lines,
/// metric labels and URLs: a control character (a newline, an escape, a
/// NUL) could forge or garble them, and a line separator or a bidirectional
/// override could make a line read as something else.
pub(crate) fn unprintable(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Whether a rule name is one every format may accept: printable text.
pub(crate) fn printable_name(name: &str) -> bool {
    !name.chars().any(unprintable)
}

/// Why a rules file was rejected. Displays as `file:line:column: message`;
/// line and column are 1-based, and 0 when the file could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{column}: {message}")]
pub struct RuleError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl RuleError {
    pub(crate) fn new(file: &str, line: usize, column: usize, message: impl Into<String>) -> Self {
        RuleError {
            file: file.to_string(),
            line,
            column,
            message: message.into(),
        }
    }
}

/// A place in a rules file, 1-based.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

impl Pos {
    pub const START: Pos = Pos { line: 1, column: 1 };
}

/// A field's value as written, whatever the format.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scalar<'a> {
    Null,
    Bool(bool),
    /// Saturates outside i128.
    Int(i128),
    Float(f64),
    Str(&'a str),
    /// Compound values: only ever wrong where a scalar is expected (lists
    /// of names are read with [`Fields::items`]).
    List,
    Map,
}

impl Scalar<'_> {
    /// The value as written, for messages.
    pub fn found(&self) -> String {
        match self {
            Scalar::Null => "nothing".to_string(),
            Scalar::Bool(b) => b.to_string(),
            Scalar::Int(n) => n.to_string(),
            Scalar::Float(x) => x.to_string(),
            Scalar::Str(s) => format!("{s:?}"),
            Scalar::List => "a list".to_string(),
            Scalar::Map => "a mapping".to_string(),
        }
    }

    pub fn str(&self) -> Option<&str> {
        match self {
            Scalar::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// One rule's fields, as a format hands them to the checks. Field names are
/// the rules-file spellings (`per-connection`, `errno`...).
///
/// A format provides the values and where they are; the provided methods
/// read them as booleans, durations, numbers... with the shared messages.
/// Every `field` asked about by a check is one the format accepted as a
/// field name, so a `None` means "not given".
pub trait Fields {
    /// The file, for errors.
    fn file(&self) -> &str;
    /// Where the rule is (its first key), for errors about the whole rule.
    fn rule_pos(&self) -> Pos;
    /// The field's value, if the rule gives it.
    fn value(&self, field: &str) -> Option<Scalar<'_>>;
    /// The items of a list value, each with where it is; `None` when the
    /// value is not a list (or not given).
    fn items(&self, field: &str) -> Option<Vec<(Scalar<'_>, Pos)>>;
    /// Where the field's value is (its key when the value has no position
    /// of its own); the rule's position when not given.
    fn value_pos(&self, field: &str) -> Pos;
    /// Where the field's key is; the rule's position when not given.
    fn key_pos(&self, field: &str) -> Pos;

    fn has(&self, field: &str) -> bool {
        self.value(field).is_some()
    }

    fn found(&self, field: &str) -> String {
        self.value(field).map_or_else(String::new, |v| v.found())
    }

    fn at(&self, pos: Pos, message: String) -> RuleError {
        RuleError::new(self.file(), pos.line, pos.column, message)
    }

    /// An error pointing at the field's value.
    fn at_value(&self, field: &str, message: String) -> RuleError {
        self.at(self.value_pos(field), message)
    }

    /// An error pointing at the field's key.
    fn at_key(&self, field: &str, message: String) -> RuleError {
        self.at(self.key_pos(field), message)
    }

    /// Where the action is: its value, or the rule when the action is the
    /// default.
    fn action_pos(&self) -> Pos {
        if self.has("action") {
            self.value_pos("action")
        } else {
            self.rule_pos()
        }
    }

    fn at_action(&self, message: String) -> RuleError {
        self.at(self.action_pos(), message)
    }

    /// `{field} must be {what}, found {value}`, at the value.
    fn must_be(&self, field: &str, what: &str, value: Scalar) -> RuleError {
        self.at_value(
            field,
            format!("{field} must be {what}, found {}", value.found()),
        )
    }

    fn boolean(&self, field: &str) -> Result<Option<bool>, RuleError> {
        match self.value(field) {
            None => Ok(None),
            Some(Scalar::Bool(b)) => Ok(Some(b)),
            Some(v) => Err(self.must_be(field, "true or false", v)),
        }
    }

    /// A whole number in `min..=max`.
    fn uint(&self, field: &str, min: u64, max: u64) -> Result<Option<u64>, RuleError> {
        match self.value(field) {
            None => Ok(None),
            Some(Scalar::Int(n)) if (i128::from(min)..=i128::from(max)).contains(&n) => {
                Ok(Some(n as u64))
            }
            Some(v) => Err(self.must_be(field, &format!("a whole number from {min} to {max}"), v)),
        }
    }

    /// A size in bytes: a whole number, or text such as `64K` or `1MiB`
    /// (units as in `offset`: those of `--size`, and KiB, MiB...).
    fn size(&self, field: &str) -> Result<Option<u64>, RuleError> {
        match self.value(field) {
            None => Ok(None),
            Some(Scalar::Int(n)) if (0..=i128::from(u64::MAX)).contains(&n) => Ok(Some(n as u64)),
            Some(Scalar::Str(s)) => crate::io::addr::parse_offset_size(s.trim())
                .map(Some)
                .map_err(|e| self.at_value(field, format!("{field}: {e}"))),
            Some(v) => Err(self.must_be(field, "a size such as 4096, 64K or 1MiB", v)),
        }
    }

    /// A number from 0.0 to 1.0 (only `probability` is one).
    fn fraction(&self, field: &str) -> Result<Option<f64>, RuleError> {
        let Some(v) = self.value(field) else {
            return Ok(None);
        };
        let p = match v {
            Scalar::Int(n) => n as f64,
            Scalar::Float(x) => x,
            _ => f64::NAN,
        };
        if (0.0..=1.0).contains(&p) {
            Ok(Some(p))
        } else {
            Err(self.must_be(field, "a number from 0.0 to 1.0", v))
        }
    }

    /// A humantime duration (`200ms`, `1m 30s`), at most [`MAX_DURATION`].
    fn duration(&self, field: &str) -> Result<Option<Duration>, RuleError> {
        let Some(v) = self.value(field) else {
            return Ok(None);
        };
        let text = match v {
            Scalar::Str(s) => s.to_string(),
            Scalar::Int(n) => n.to_string(),
            Scalar::Float(x) => x.to_string(),
            _ => String::new(),
        };
        let d = humantime::parse_duration(text.trim()).map_err(|e| {
            self.at_value(
                field,
                format!(
                    "invalid duration {}: {e} (a number with a unit, e.g. 200ms, 1s, 1m 30s)",
                    v.found()
                ),
            )
        })?;
        if d > MAX_DURATION {
            return Err(self.must_be(field, "at most 24h (1 day)", v));
        }
        Ok(Some(d))
    }

    /// A byte mask from 1 to 255, decimal or `0x` hex.
    fn byte_mask(&self, field: &str) -> Result<Option<u8>, RuleError> {
        let Some(v) = self.value(field) else {
            return Ok(None);
        };
        let value: Option<i128> = match v {
            Scalar::Int(n) => Some(n),
            Scalar::Str(s) => {
                let s = s.trim();
                match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
                    Some(hex) => i128::from_str_radix(hex, 16).ok(),
                    None => s.parse().ok(),
                }
            }
            _ => None,
        };
        match value {
            Some(n @ 1..=255) => Ok(Some(n as u8)),
            _ => Err(self.must_be(field, "a byte mask from 1 to 255 (0x01 to 0xff)", v)),
        }
    }

    /// A name, as written; `allowed` (e.g. `errnos: EIO, ...`) is shown
    /// when it is not one.
    fn name(&self, field: &str, allowed: &str) -> Result<Option<&str>, RuleError> {
        match self.value(field) {
            None => Ok(None),
            Some(Scalar::Str(s)) => Ok(Some(s)),
            Some(v) => Err(self.at_value(
                field,
                format!("{field} must be a name, found {} ({allowed})", v.found()),
            )),
        }
    }
}
