//! The chart as plain text at most 100 columns wide, for CI logs and
//! terminals: one line per row, lanes as `|`, faults noted on the right.

use super::model::{Lane, Message};
use super::view::{Row, View, end_text, millis};

/// No line is wider than this (in characters).
pub const WIDTH: usize = 100;
const TIME: usize = 9;
const INDEX: usize = 5;
const CLIENT: usize = TIME + 1 + INDEX + 2;
const GAP: usize = 30;
const PROXY: usize = CLIENT + GAP;
const SERVER: usize = PROXY + GAP;
const NOTE: usize = SERVER + 2;

fn col(l: Lane) -> usize {
    match l {
        Lane::Client => CLIENT,
        Lane::Proxy => PROXY,
        Lane::Server => SERVER,
    }
}

/// `s`, cut to `n` characters with an ellipsis.
fn fit(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// The time column: milliseconds, or seconds past 100 s so it stays narrow.
fn time(us: u64) -> String {
    if us < 100_000_000 {
        millis(us)
    } else {
        format!("{:.1}s", us as f64 / 1e6)
    }
}

struct Line(Vec<char>);

impl Line {
    fn new(lane: char) -> Self {
        let mut l = Line(vec![' '; WIDTH]);
        for c in [CLIENT, PROXY, SERVER] {
            l.0[c] = lane;
        }
        l
    }

    fn put(&mut self, at: usize, s: &str) {
        for (i, c) in s.chars().enumerate() {
            if let Some(slot) = self.0.get_mut(at + i) {
                *slot = c;
            }
        }
    }

    fn left(&mut self, time: &str, index: &str) {
        self.put(0, &format!("{time:>TIME$} {index:>INDEX$}"));
    }

    fn done(self) -> String {
        let s: String = self.0.into_iter().collect();
        s.trim_end().to_string()
    }
}

fn arrow(m: &Message) -> String {
    let mut l = Line::new('|');
    l.left(&time(m.at_us), &m.index.to_string());
    let (a, b) = (col(m.from), col(m.to));
    let (lo, hi) = (a.min(b), a.max(b));
    for x in lo + 1..hi {
        l.0[x] = '-';
    }
    let head = if b > a { b - 1 } else { b + 1 };
    l.0[head] = match (m.stopped(), b > a) {
        (true, _) => 'x',
        (false, true) => '>',
        (false, false) => '<',
    };
    if m.crosses_proxy() {
        l.0[PROXY] = if m.faults.is_empty() { '+' } else { '*' };
    }
    // The label sits in the gap next to where the arrow starts.
    let label = format!(" {} ", fit(&m.kind.label(), GAP - 5));
    let start = if b > a {
        a + 2
    } else {
        a - 1 - label.chars().count()
    };
    l.put(start, &label);
    let notes = m.notes("! ");
    // An arrow that ends at nbdfault leaves the server's side free for its
    // notes; others' notes too long for their column go on under it.
    let at = if m.crosses_proxy() { NOTE } else { PROXY + 3 };
    let mut lines = vec![l];
    for (i, part) in wrap(&notes.join("; "), WIDTH - at).into_iter().enumerate() {
        if i > 0 {
            lines.push(Line::new('|'));
        }
        lines[i].put(at, &part);
    }
    lines
        .into_iter()
        .map(Line::done)
        .collect::<Vec<_>>()
        .join("\n")
}

/// `s` in lines of at most `n` characters, broken at spaces where it can.
fn wrap(s: &str, n: usize) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut cur = String::new();
    for word in s.split(' ') {
        let extra = usize::from(!cur.is_empty());
        if cur.chars().count() + extra + word.chars().count() > n && !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push(' ');
        }
        cur.push_str(word);
        while cur.chars().count() > n {
            let rest: String = cur.chars().skip(n).collect();
            out.push(cur.chars().take(n).collect());
            cur = rest;
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Every row, with a heading that says which connection and how it ended.
pub fn render(v: &View) -> String {
    let s = v.session;
    let mut out = format!(
        "connection {}: {} messages, {} faults{}\n",
        s.conn,
        s.messages.len(),
        s.faults(),
        if s.started.is_empty() {
            String::new()
        } else {
            format!(", from {}", s.started)
        }
    );
    let mut head = Line(vec![' '; WIDTH]);
    head.left("ms", "#");
    for (c, name) in [
        (CLIENT - 1, "client"),
        (PROXY - 4, "nbdfault"),
        (SERVER - 3, "server"),
    ] {
        head.put(c, name);
    }
    out += &head.done();
    out.push('\n');
    for row in &v.rows {
        let line = match (row, row.note()) {
            (Row::Message(m), _) => arrow(m),
            (_, Some((at, note))) => {
                let mut l = Line::new(':');
                l.left(&at.map(time).unwrap_or_default(), "");
                l.put(CLIENT + 2, &format!(" {} ", fit(&note, WIDTH - CLIENT - 4)));
                l.done()
            }
            (_, None) => continue,
        };
        out += &line;
        out.push('\n');
    }
    let mut end = Line(vec![' '; WIDTH]);
    end.left(&time(s.end.at_us), "end");
    let reason = format!(" {} ", end_text(s));
    let reason = fit(&reason, WIDTH - CLIENT - 4);
    end.put(CLIENT, &format!("=={reason}"));
    let used = CLIENT + 2 + reason.chars().count();
    end.put(used, &"=".repeat((SERVER + 1).saturating_sub(used)));
    out += &end.done();
    out.push('\n');
    out
}
