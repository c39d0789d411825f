//! A YAML document read into a small tree that remembers where each value
//! was written, so every message can point at the value that is wrong.
//!
//! serde_yaml does not hand out positions of values, only of errors; the
//! tree gets them by having each scalar "fail" with its own value encoded in
//! the message, which serde_yaml then stamps with the scalar's line and
//! column, and catching that at once (see `NodeVisitor`).

use std::cell::Cell;
use std::fmt::{self, Write as _};

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};

use crate::rules::fields::{Pos, RuleError, Scalar};

#[derive(Debug, Clone)]
pub struct Node {
    /// Where the value starts; for a list or mapping, where its first item
    /// or key does (`None` when it is empty).
    pub pos: Option<Pos>,
    pub value: Value,
}

#[derive(Debug, Clone)]
pub enum Value {
    Null,
    Bool(bool),
    /// Saturates outside i128 (only u128 beyond it can be written).
    Int(i128),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

impl Node {
    pub fn at(&self, fallback: Pos) -> Pos {
        self.pos.unwrap_or(fallback)
    }

    /// The value as the checks see it.
    pub fn scalar(&self) -> Scalar<'_> {
        match &self.value {
            Value::Null => Scalar::Null,
            Value::Bool(b) => Scalar::Bool(*b),
            Value::Int(n) => Scalar::Int(*n),
            Value::Float(x) => Scalar::Float(*x),
            Value::Str(s) => Scalar::Str(s),
            Value::Seq(_) => Scalar::List,
            Value::Map(_) => Scalar::Map,
        }
    }

    /// The value as written, for messages.
    pub fn found(&self) -> String {
        self.scalar().found()
    }

    pub fn str(&self) -> Option<&str> {
        match &self.value {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// Marks the message of a scalar's error. What follows it is hex or
/// digits, so the last occurrence in an error's display is always ours even
/// if a key in serde_yaml's path prefix happens to contain the marker.
const TOKEN: &str = "\u{1}nbdfault-scalar:";
const TOKEN_END: char = '\u{2}';

fn encode(value: &Value) -> String {
    let mut s = String::from(TOKEN);
    match value {
        Value::Null => s.push('n'),
        Value::Bool(b) => {
            s.push('b');
            s.push(if *b { '1' } else { '0' });
        }
        Value::Int(n) => {
            let _ = write!(s, "i{n}");
        }
        Value::Float(x) => {
            let _ = write!(s, "f{:016x}", x.to_bits());
        }
        Value::Str(text) => {
            s.push('s');
            for b in text.bytes() {
                let _ = write!(s, "{b:02x}");
            }
        }
        Value::Seq(_) | Value::Map(_) => unreachable!("only scalars are encoded"),
    }
    s.push(TOKEN_END);
    s
}

/// Reads a scalar back out of the display of the error it was sent up in:
/// `[path: ]TOKEN<value>END[ at line L column C]`. serde_yaml leaves the
/// position out when it is line 1 column 1.
fn decode(display: &str) -> Option<Node> {
    let start = display.rfind(TOKEN)? + TOKEN.len();
    let rest = &display[start..];
    let end = rest.find(TOKEN_END)?;
    let (body, tail) = (&rest[..end], &rest[end + TOKEN_END.len_utf8()..]);
    let pos = if tail.is_empty() {
        Pos::START
    } else {
        let (line, column) = tail.strip_prefix(" at line ")?.split_once(" column ")?;
        Pos {
            line: line.parse().ok()?,
            column: column.parse().ok()?,
        }
    };
    let mut chars = body.chars();
    let tag = chars.next()?;
    let payload = chars.as_str();
    let value = match tag {
        'n' => Value::Null,
        'b' => Value::Bool(payload == "1"),
        'i' => Value::Int(payload.parse().ok()?),
        'f' => Value::Float(f64::from_bits(u64::from_str_radix(payload, 16).ok()?)),
        's' => {
            if payload.len() % 2 != 0 || !payload.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            let bytes = (0..payload.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&payload[i..i + 2], 16).ok())
                .collect::<Option<Vec<u8>>>()?;
            Value::Str(String::from_utf8(bytes).ok()?)
        }
        _ => return None,
    };
    Some(Node {
        pos: Some(pos),
        value,
    })
}

/// Most values a document may hold, a value reached through an alias
/// counting each time: serde_yaml expands every alias in full, so 20,000
/// aliases of a 2,000-item list (50 KB of text) made 40 million nodes, 4 GB
/// and 40 s before this. 10,000 rules of a dozen fields fit easily.
///
/// A scalar's error also carries serde_yaml's path to it, the keys above
/// it spelt out, so a long key above many values cost its length for each
/// (100 KB × 30,000 values took a second, growing with the square of the
/// text). So a scalar costs one value per [`CHARS_PER_VALUE`] characters of
/// its error's text, which bounds that work too.
pub const MAX_VALUES: usize = 1_000_000;

/// See [`MAX_VALUES`].
const CHARS_PER_VALUE: usize = 64;

const TOO_MANY: &str = "more than 1000000 values (each use of an alias counts its values again; \
                        a long key or string counts once per 64 characters of it and of the \
                        keys above it)";

/// Values still allowed, shared by every node of one document.
#[derive(Clone, Copy)]
struct NodeSeed<'b>(&'b Cell<usize>);

impl<'de> DeserializeSeed<'de> for NodeSeed<'_> {
    type Value = Node;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Node, D::Error> {
        deserializer.deserialize_any(NodeVisitor(self.0))
    }
}

/// Builds a [`Node`]. Scalars come back as errors (see [`encode`]): serde_yaml
/// consumes a scalar before visiting it and stamps the error with its
/// position, and the caller one level up turns the error back into a node
/// with [`NodeVisitor::recover`] and carries on.
struct NodeVisitor<'b>(&'b Cell<usize>);

impl NodeVisitor<'_> {
    /// Takes `n` values from the budget; an error (stamped with where the
    /// value is) once it is spent.
    fn take<E: de::Error>(&self, n: usize) -> Result<(), E> {
        match self.0.get().checked_sub(n) {
            Some(left) => {
                self.0.set(left);
                Ok(())
            }
            None => Err(E::custom(TOO_MANY)),
        }
    }

    fn count<E: de::Error>(&self) -> Result<(), E> {
        self.take(1)
    }

    /// Turns an error back into the scalar it carries, or passes a real
    /// error on; charges the error's length (see [`MAX_VALUES`]).
    fn recover<E: de::Error>(&self, error: E) -> Result<Node, E> {
        let display = error.to_string();
        let node = decode(&display).ok_or(error)?;
        self.take(display.len() / CHARS_PER_VALUE)?;
        Ok(node)
    }

    fn scalar<E: de::Error>(&self, value: Value) -> Result<Node, E> {
        self.count()?;
        Err(E::custom(encode(&value)))
    }
}

impl<'de> Visitor<'de> for NodeVisitor<'_> {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a plain YAML value (tags are not supported)")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Node, E> {
        self.scalar(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Node, E> {
        self.scalar(Value::Int(v.into()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Node, E> {
        self.scalar(Value::Int(v.into()))
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Node, E> {
        self.scalar(Value::Int(v))
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Node, E> {
        self.scalar(Value::Int(i128::try_from(v).unwrap_or(i128::MAX)))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Node, E> {
        self.scalar(Value::Float(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Node, E> {
        self.scalar(Value::Str(v.to_string()))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Node, E> {
        self.scalar(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Node, E> {
        self.scalar(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        self.count()?;
        let mut items = Vec::new();
        loop {
            match seq.next_element_seed(NodeSeed(self.0)) {
                Ok(Some(node)) => items.push(node),
                Ok(None) => break,
                Err(e) => items.push(self.recover(e)?),
            }
        }
        Ok(Node {
            pos: items.first().and_then(|n| n.pos),
            value: Value::Seq(items),
        })
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        self.count()?;
        let mut entries = Vec::new();
        loop {
            let key = match map.next_key_seed(NodeSeed(self.0)) {
                Ok(Some(node)) => node,
                Ok(None) => break,
                Err(e) => self.recover(e)?,
            };
            let value = match map.next_value_seed(NodeSeed(self.0)) {
                Ok(node) => node,
                Err(e) => self.recover(e)?,
            };
            entries.push((key, value));
        }
        Ok(Node {
            pos: entries.first().and_then(|(k, _)| k.pos),
            value: Value::Map(entries),
        })
    }
}

pub fn load(text: &str) -> Result<Node, serde_yaml::Error> {
    if text
        .lines()
        .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
    {
        // serde_yaml reports "EOF while parsing a value" for a stream with
        // no document at all; an empty rules file is a valid one.
        return Ok(Node {
            pos: None,
            value: Value::Null,
        });
    }
    let budget = Cell::new(MAX_VALUES);
    match NodeSeed(&budget).deserialize(serde_yaml::Deserializer::from_str(text)) {
        Ok(node) => Ok(node),
        Err(e) => NodeVisitor(&budget).recover(e),
    }
}

pub fn yaml_error(file: &str, e: &serde_yaml::Error) -> RuleError {
    let (line, column) = e
        .location()
        .map(|l| (l.line(), l.column()))
        .unwrap_or((1, 1));
    // The position is already in front of the message.
    let message = e
        .to_string()
        .replacen(&format!(" at line {line} column {column}"), "", 1);
    // serde_yaml's path spells out keys as written: escape what a
    // terminal or a log line must not get raw.
    let message = crate::rules::check::quotable(&message);
    RuleError::new(file, line, column, format!("invalid YAML: {message}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// serde_yaml's path names the keys above an error as written.
    #[test]
    fn errors_escape_control_characters_in_keys() {
        let e = load("rules:\n  \"a\\e[2J\": !x 1\n").unwrap_err();
        let e = yaml_error("f", &e);
        assert!(e.message.contains("a\\u{1b}[2J"), "{e}");
        assert!(!e.message.contains('\u{1b}'), "{e}");
    }

    /// 100 KB keys above 60,000 values: each value's error spelt the key out.
    #[test]
    fn long_keys_count_against_the_value_budget() {
        let text = format!("? {}\n: [{}]\n", "k".repeat(200_000), "1, ".repeat(60_000));
        let e = load(&text).unwrap_err();
        assert!(e.to_string().contains(TOO_MANY), "{e}");
        // Long strings alone fit: 4 MB of one string is 131,072 values.
        let text = format!("name: {}\n", "x".repeat(4 << 20));
        assert!(load(&text).is_ok());
    }

    /// 20,000 aliases of a 2,000-item list: 40 million values from 50 KB,
    /// which took 4 GB and 40 s to build; now refused once the millionth
    /// is reached.
    #[test]
    fn aliases_count_against_the_value_budget() {
        let text = format!(
            "a: &x [{}]\nrules: [{}]\n",
            "b, ".repeat(2000),
            "*x, ".repeat(20_000)
        );
        let e = load(&text).unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("more than {MAX_VALUES} values")),
            "{e}"
        );
        assert!(TOO_MANY.contains(&format!("{MAX_VALUES} values")));
        assert!(TOO_MANY.contains(&format!("once per {CHARS_PER_VALUE} characters")));
        // Under the budget, aliases expand as before.
        let text = format!(
            "a: &x [{}]\nrules: [{}]\n",
            "b, ".repeat(100),
            "*x, ".repeat(100)
        );
        assert!(load(&text).is_ok());
    }

    #[test]
    fn positions_come_from_serde_yaml() {
        // Line 1 column 1 is the one position serde_yaml leaves out of its
        // messages; the scalar trick must still place it.
        let root = load("seed: 1\nrules:\n  - event: request\n").unwrap();
        let Value::Map(entries) = &root.value else {
            panic!("{root:?}")
        };
        assert_eq!(entries[0].0.pos, Some(Pos::START));
        assert_eq!(entries[1].0.pos, Some(Pos { line: 2, column: 1 }));
        let Value::Seq(items) = &entries[1].1.value else {
            panic!()
        };
        assert_eq!(items[0].pos, Some(Pos { line: 3, column: 5 }));
        // Awkward scalars survive the trip through an error message.
        let text = "a: \"x\\u0001nbdfault-scalar:s00\\u0002 at line 9 column 9\"\n\
                    b: 1.5\nc: -7\nd: ~\ne: false\nf: 340282366920938463463374607431768211455\n";
        let root = load(text).unwrap();
        let Value::Map(entries) = &root.value else {
            panic!()
        };
        assert!(
            matches!(&entries[0].1.value, Value::Str(s) if s == "x\u{1}nbdfault-scalar:s00\u{2} at line 9 column 9")
        );
        assert!(matches!(entries[1].1.value, Value::Float(x) if x == 1.5));
        assert!(matches!(entries[2].1.value, Value::Int(-7)));
        assert!(matches!(entries[3].1.value, Value::Null));
        assert!(matches!(entries[4].1.value, Value::Bool(false)));
        assert!(matches!(entries[5].1.value, Value::Int(i128::MAX)));
        assert_eq!(entries[5].1.pos, Some(Pos { line: 6, column: 4 }));
    }
}
