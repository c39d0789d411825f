//! A session as the rows a chart draws: zoomed to `--from`/`--to`, with
//! long runs of alike messages collapsed into one row, so every renderer
//! draws the same thing.

use std::str::FromStr;

pub use super::model::millis;
use super::model::{Message, Session};
use super::{ChartError, Options};

/// One end of a zoom: a message number (the chart's `#` column) or a time
/// since the connection's first record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    Index(usize),
    Micros(u64),
}

impl FromStr for Bound {
    type Err = ChartError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ChartError::Bound(s.to_string());
        if let Ok(n) = s.parse::<usize>() {
            return Ok(Bound::Index(n));
        }
        let (number, scale) = [("us", 1.0), ("ms", 1e3), ("s", 1e6)]
            .into_iter()
            .find_map(|(unit, scale)| s.strip_suffix(unit).map(|n| (n, scale)))
            .ok_or_else(bad)?;
        let n: f64 = number.parse().map_err(|_| bad())?;
        if !n.is_finite() || n < 0.0 {
            return Err(bad());
        }
        Ok(Bound::Micros((n * scale).round() as u64))
    }
}

impl Bound {
    fn admits_from(self, m: &Message) -> bool {
        match self {
            Bound::Index(i) => m.index >= i,
            Bound::Micros(t) => m.at_us >= t,
        }
    }

    fn admits_to(self, m: &Message) -> bool {
        match self {
            Bound::Index(i) => m.index <= i,
            Bound::Micros(t) => m.at_us <= t,
        }
    }
}

/// A run of alike messages shows its first and last repetition; at least
/// this many repetitions collapse.
pub const COLLAPSE_AT: usize = 4;
/// The longest repeating group looked for (a request and its reply is 2;
/// a client with a few requests in flight repeats a longer group).
const LONGEST_GROUP: usize = 8;

/// One row of a chart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Row<'a> {
    Message(&'a Message),
    /// `count` repetitions of a group of `keys`, not drawn one by one.
    Collapsed {
        count: usize,
        keys: Vec<String>,
        first: usize,
        last: usize,
        at_us: u64,
    },
    /// Messages left out by `--from`/`--to`.
    Hidden {
        count: usize,
        before: bool,
    },
    /// Trace lines the trace's writer did not keep.
    Skipped {
        lines: u64,
    },
}

/// What one chart draws.
#[derive(Debug, Clone)]
pub struct View<'a> {
    pub session: &'a Session,
    pub rows: Vec<Row<'a>>,
}

fn alike(a: &Message, b: &Message) -> bool {
    a.faults.is_empty()
        && b.faults.is_empty()
        && a.from == b.from
        && a.to == b.to
        && a.made == b.made
        && a.by_cache == b.by_cache
        && a.kind.key() == b.kind.key()
}

/// The longest run at the start of `ms`: (group length, repetitions).
fn run_at(ms: &[&Message]) -> Option<(usize, usize)> {
    let mut best: Option<(usize, usize)> = None;
    for p in 1..=LONGEST_GROUP.min(ms.len()) {
        let mut reps = 1;
        while (reps + 1) * p <= ms.len() && (0..p).all(|k| alike(ms[k], ms[reps * p + k])) {
            reps += 1;
        }
        if reps >= COLLAPSE_AT && best.is_none_or(|(bp, br)| reps * p > bp * br) {
            best = Some((p, reps));
        }
    }
    best
}

impl<'a> View<'a> {
    pub fn new(session: &'a Session, opts: &Options) -> Self {
        let shown: Vec<&Message> = session
            .messages
            .iter()
            .filter(|m| opts.from.is_none_or(|b| b.admits_from(m)))
            .filter(|m| opts.to.is_none_or(|b| b.admits_to(m)))
            .collect();
        let mut rows = Vec::new();
        let before = shown
            .first()
            .map_or(session.messages.len(), |m| m.index - 1);
        if before > 0 {
            rows.push(Row::Hidden {
                count: before,
                before: true,
            });
        }
        let mut gaps = session.gaps.iter().peekable();
        let mut i = 0;
        while i < shown.len() {
            while let Some(g) = gaps.next_if(|g| g.before <= shown[i].index) {
                rows.push(Row::Skipped { lines: g.lines });
            }
            let run = if opts.no_collapse {
                None
            } else {
                run_at(&shown[i..])
            };
            match run {
                Some((p, reps)) => {
                    let group = &shown[i..i + p];
                    let last = &shown[i + (reps - 1) * p..i + reps * p];
                    rows.extend(group.iter().map(|m| Row::Message(m)));
                    rows.push(Row::Collapsed {
                        count: reps - 2,
                        keys: group.iter().map(|m| m.kind.key()).collect(),
                        first: shown[i + p].index,
                        last: shown[i + (reps - 1) * p - 1].index,
                        at_us: shown[i + p].at_us,
                    });
                    rows.extend(last.iter().map(|m| Row::Message(m)));
                    i += reps * p;
                }
                None => {
                    rows.push(Row::Message(shown[i]));
                    i += 1;
                }
            }
        }
        rows.extend(gaps.map(|g| Row::Skipped { lines: g.lines }));
        let after = shown.last().map_or(0, |m| session.messages.len() - m.index);
        if after > 0 {
            rows.push(Row::Hidden {
                count: after,
                before: false,
            });
        }
        View { session, rows }
    }

    /// The messages drawn as arrows.
    pub fn arrows(&self) -> usize {
        self.rows
            .iter()
            .filter(|r| matches!(r, Row::Message(_)))
            .count()
    }
}

/// `… 248 × READ 64K / reply OK 64K …` and the messages it stands for.
pub fn collapsed_text(count: usize, keys: &[String], first: usize, last: usize) -> String {
    format!("… {count} × {} … (#{first}–#{last})", keys.join(" / "))
}

impl Row<'_> {
    /// A row that is not an arrow: its time, where it has one, and what it
    /// says.
    pub fn note(&self) -> Option<(Option<u64>, String)> {
        match self {
            Row::Message(_) => None,
            Row::Collapsed {
                count,
                keys,
                first,
                last,
                at_us,
            } => Some((Some(*at_us), collapsed_text(*count, keys, *first, *last))),
            Row::Hidden {
                count,
                before: true,
            } => Some((None, format!("… {count} messages before --from …"))),
            Row::Hidden {
                count,
                before: false,
            } => Some((None, format!("… {count} messages after --to …"))),
            Row::Skipped { lines } => Some((None, format!("… {lines} trace lines not kept …"))),
        }
    }
}

/// How the session ended, as the last row says it.
pub fn end_text(s: &Session) -> String {
    if s.end.inferred {
        format!("{} (no close record)", s.end.reason)
    } else {
        format!("closed: {}", s.end.reason)
    }
}

#[cfg(test)]
mod tests {
    use super::super::model::parse;
    use super::*;

    fn reads(n: usize) -> String {
        let mut t = String::from("{\"conn\":1,\"event\":\"connect\",\"direction\":null}\n");
        for i in 0..n {
            t += &format!(
                "{{\"conn\":1,\"event\":\"request\",\"direction\":\"to-server\",\"command\":\"read\",\"cookie\":{i},\"offset\":{},\"length\":65536}}\n\
                 {{\"conn\":1,\"event\":\"reply\",\"direction\":\"to-client\",\"cookie\":{i}}}\n",
                i * 65536
            );
        }
        t
    }

    #[test]
    fn runs_collapse_into_their_first_and_last_group() {
        let trace = parse(&reads(250));
        let v = View::new(&trace.sessions[0], &Options::default());
        // connect, the first pair, the collapsed row, the last pair.
        assert_eq!(v.rows.len(), 6);
        assert_eq!(v.arrows(), 5);
        match &v.rows[3] {
            Row::Collapsed {
                count,
                keys,
                first,
                last,
                ..
            } => {
                assert_eq!(*count, 248);
                assert_eq!(keys, &["READ 64K", "reply OK"]);
                assert_eq!(
                    collapsed_text(*count, keys, *first, *last),
                    "… 248 × READ 64K / reply OK … (#4–#499)"
                );
            }
            r => panic!("{r:?}"),
        }
        let all = View::new(
            &trace.sessions[0],
            &Options {
                no_collapse: true,
                ..Options::default()
            },
        );
        assert_eq!(all.arrows(), 501);
    }

    #[test]
    fn short_runs_stay_and_zoom_hides_the_rest() {
        let trace = parse(&reads(3));
        let v = View::new(&trace.sessions[0], &Options::default());
        assert_eq!(v.arrows(), 7);
        let z = View::new(
            &trace.sessions[0],
            &Options {
                from: Some("2".parse().unwrap()),
                to: Some(Bound::Index(3)),
                ..Options::default()
            },
        );
        assert_eq!(
            z.rows.first(),
            Some(&Row::Hidden {
                count: 1,
                before: true
            })
        );
        assert_eq!(
            z.rows.last(),
            Some(&Row::Hidden {
                count: 4,
                before: false
            })
        );
        assert_eq!(z.arrows(), 2);
    }

    #[test]
    fn bounds() {
        assert_eq!("120".parse::<Bound>(), Ok(Bound::Index(120)));
        assert_eq!("1.5s".parse::<Bound>(), Ok(Bound::Micros(1_500_000)));
        assert_eq!("250ms".parse::<Bound>(), Ok(Bound::Micros(250_000)));
        assert_eq!("40us".parse::<Bound>(), Ok(Bound::Micros(40)));
        assert!("soon".parse::<Bound>().is_err());
        assert!("-1s".parse::<Bound>().is_err());
    }
}
