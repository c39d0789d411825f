//! The chart as SVG: self-contained (styles as attributes, the generic
//! `monospace` font, no scripts), so it opens alone in a browser and sits
//! inline in an HTML page (the sweep's report) without touching its styles.

use std::fmt::Write as _;

use super::model::{Lane, Message};
use super::view::{Row, View, end_text, millis};

pub const WIDTH: u32 = 1100;
const ROW: u32 = 24;
const TOP: u32 = 62;
const TIME_X: u32 = 70;
const INDEX_X: u32 = 112;
const CLIENT_X: u32 = 180;
const PROXY_X: u32 = 460;
const SERVER_X: u32 = 740;
const NOTE_X: u32 = 756;
const RED: &str = "#c0392b";
const INK: &str = "#333";

fn x(l: Lane) -> u32 {
    match l {
        Lane::Client => CLIENT_X,
        Lane::Proxy => PROXY_X,
        Lane::Server => SERVER_X,
    }
}

/// Text for an XML attribute or element.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if (c as u32) < 0x20 && c != '\n' && c != '\t' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

fn message(out: &mut String, m: &Message, y: u32, id: &str) {
    let faulty = m.faulty();
    let colour = if faulty { RED } else { INK };
    let (a, b) = (x(m.from), x(m.to));
    // A swallowed message stops short of the ✕ drawn on the lane.
    let b = match (m.stopped(), b > a) {
        (true, true) => b - 9,
        (true, false) => b + 9,
        (false, _) => b,
    };
    let line_y = y + 6;
    let _ = write!(
        out,
        "<g class=\"msg\"><title>#{} {}</title>\
         <text x=\"{TIME_X}\" y=\"{line_y}\" text-anchor=\"end\" fill=\"#777\">{}</text>\
         <text x=\"{INDEX_X}\" y=\"{line_y}\" text-anchor=\"end\" fill=\"#777\">{}</text>\
         <line class=\"arrow\" x1=\"{a}\" y1=\"{line_y}\" x2=\"{b}\" y2=\"{line_y}\" \
         stroke=\"{colour}\" stroke-width=\"{}\"{} marker-end=\"url(#{id}{})\"/>",
        m.index,
        esc(&m.detail),
        millis(m.at_us),
        m.index,
        if faulty { 2 } else { 1 },
        if m.made {
            " stroke-dasharray=\"6,3\""
        } else {
            ""
        },
        if faulty { "red" } else { "head" },
    );
    // The label above the arrow, in the gap where it starts.
    let (g0, g1) = if m.from == Lane::Server {
        (PROXY_X, SERVER_X)
    } else {
        (CLIENT_X, PROXY_X)
    };
    let _ = write!(
        out,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" fill=\"{colour}\">{}</text>",
        (g0 + g1) / 2,
        line_y - 4,
        esc(&m.kind.label())
    );
    if m.stopped() {
        // Where nbdfault swallowed or cut it.
        let (cx, cy) = (PROXY_X, line_y);
        let _ = write!(
            out,
            "<path class=\"stop\" d=\"M{} {} L{} {} M{} {} L{} {}\" stroke=\"{RED}\" \
             stroke-width=\"2.5\"/>",
            cx - 6,
            cy - 6,
            cx + 6,
            cy + 6,
            cx - 6,
            cy + 6,
            cx + 6,
            cy - 6
        );
    } else if m.crosses_proxy() && !m.faults.is_empty() {
        let _ = write!(
            out,
            "<circle cx=\"{PROXY_X}\" cy=\"{line_y}\" r=\"4\" fill=\"{RED}\"/>"
        );
    }
    let notes = m.notes("");
    if !notes.is_empty() {
        // An arrow that ends at nbdfault leaves the server's side free.
        let nx = if m.crosses_proxy() {
            NOTE_X
        } else {
            PROXY_X + 16
        };
        let _ = write!(
            out,
            "<text x=\"{nx}\" y=\"{line_y}\" fill=\"{colour}\" font-weight=\"bold\">{}</text>",
            esc(&notes.join("; "))
        );
    }
    out.push_str("</g>\n");
}

fn note_row(out: &mut String, y: u32, time: Option<u64>, text: &str) {
    if let Some(t) = time {
        let _ = write!(
            out,
            "<text x=\"{TIME_X}\" y=\"{}\" text-anchor=\"end\" fill=\"#777\">{}</text>",
            y + 6,
            millis(t)
        );
    }
    let _ = writeln!(
        out,
        "<text class=\"collapsed\" x=\"{}\" y=\"{}\" fill=\"#666\" font-style=\"italic\">{}</text>",
        CLIENT_X + 12,
        y + 6,
        esc(text)
    );
}

fn height(v: &View) -> u32 {
    TOP + ROW * (v.rows.len() as u32 + 1) + 30
}

/// One connection's chart as an `<svg>` element. `id` prefixes the
/// element ids, so several charts can share a page.
pub fn chart(v: &View, id: &str) -> String {
    let s = v.session;
    let height = height(v);
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" \
         viewBox=\"0 0 {WIDTH} {height}\" font-family=\"monospace\" font-size=\"12\">\n\
         <defs>\
         <marker id=\"{id}head\" markerWidth=\"8\" markerHeight=\"8\" refX=\"8\" refY=\"4\" \
         orient=\"auto\" markerUnits=\"userSpaceOnUse\"><path d=\"M0 0 L8 4 L0 8 z\" fill=\"{INK}\"/></marker>\
         <marker id=\"{id}red\" markerWidth=\"10\" markerHeight=\"10\" refX=\"10\" refY=\"5\" \
         orient=\"auto\" markerUnits=\"userSpaceOnUse\"><path d=\"M0 0 L10 5 L0 10 z\" fill=\"{RED}\"/></marker>\
         </defs>\n<rect width=\"{WIDTH}\" height=\"{height}\" fill=\"#fff\"/>\n"
    );
    let _ = writeln!(
        out,
        "<text x=\"10\" y=\"18\" font-size=\"14\" font-weight=\"bold\" fill=\"{INK}\">\
         connection {}: {} messages, {} faults</text>",
        s.conn,
        s.messages.len(),
        s.faults()
    );
    let _ = writeln!(
        out,
        "<text x=\"{TIME_X}\" y=\"{}\" text-anchor=\"end\" fill=\"#777\">ms</text>\
         <text x=\"{INDEX_X}\" y=\"{}\" text-anchor=\"end\" fill=\"#777\">#</text>",
        TOP - 14,
        TOP - 14
    );
    for (lx, name) in [
        (CLIENT_X, "client"),
        (PROXY_X, "nbdfault"),
        (SERVER_X, "server"),
    ] {
        let _ = writeln!(
            out,
            "<text x=\"{lx}\" y=\"{}\" text-anchor=\"middle\" font-weight=\"bold\" \
             fill=\"{INK}\">{name}</text><line class=\"lane\" x1=\"{lx}\" y1=\"{}\" x2=\"{lx}\" \
             y2=\"{}\" stroke=\"#bbb\" stroke-width=\"2\"/>",
            TOP - 14,
            TOP - 8,
            height - 26
        );
    }
    let mut y = TOP;
    for row in &v.rows {
        y += ROW;
        match (row, row.note()) {
            (Row::Message(m), _) => message(&mut out, m, y, id),
            (_, Some((at, note))) => note_row(&mut out, y, at, &note),
            (_, None) => {}
        }
    }
    y += ROW;
    let reason = end_text(s);
    let _ = writeln!(
        out,
        "<g class=\"end\"><text x=\"{TIME_X}\" y=\"{}\" text-anchor=\"end\" fill=\"#777\">{}</text>\
         <line x1=\"{CLIENT_X}\" y1=\"{}\" x2=\"{SERVER_X}\" y2=\"{}\" stroke=\"{INK}\" \
         stroke-width=\"3\"/><text x=\"{}\" y=\"{}\" text-anchor=\"middle\" fill=\"{INK}\" \
         font-weight=\"bold\">{}</text></g>",
        y + 6,
        millis(s.end.at_us),
        y - 4,
        y - 4,
        PROXY_X,
        y + 12,
        esc(&reason)
    );
    out.push_str("</svg>\n");
    out
}

/// A standalone SVG document of one chart per view, one under another.
pub fn document(views: &[View]) -> String {
    let charts: Vec<String> = views
        .iter()
        .enumerate()
        .map(|(i, v)| chart(v, &format!("c{i}-")))
        .collect();
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    if let [one] = charts.as_slice() {
        out += one;
        return out;
    }
    let heights: Vec<u32> = views.iter().map(height).collect();
    let total: u32 = heights.iter().sum();
    let _ = writeln!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{total}\" \
         viewBox=\"0 0 {WIDTH} {total}\">"
    );
    let mut y = 0;
    for (c, h) in charts.iter().zip(&heights) {
        // A nested chart placed by its own x/y.
        out += &c.replacen("<svg ", &format!("<svg x=\"0\" y=\"{y}\" "), 1);
        y += h;
    }
    out.push_str("</svg>\n");
    out
}
