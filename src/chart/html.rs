//! The chart as one self-contained HTML page (inline SVG and styles, no
//! scripts, no external fonts), and the block the sweep's report embeds
//! for each finding.

use std::fmt::Write as _;

use super::svg::{chart, esc};
use super::view::View;

/// How to read a chart, once per page.
pub const LEGEND: &str = "<p class=\"chart-legend\">Time (ms since the connection's first record) \
     and message number on the left; an arrow per message. <b style=\"color:#c0392b\">Red</b>: \
     a fault changed it (the rule and its action on the right); ✕ on the nbdfault lane: \
     nbdfault swallowed it or cut the connection there; dashed: nbdfault sent it itself; \
     an arrow ending at nbdfault in black: the write cache took it (and answers it, dashed). \
     Hover over an arrow for its trace record.</p>\n";

/// One chart with a caption, for a page that has its own styles.
pub fn figure(v: &View, id: &str) -> String {
    let s = v.session;
    let mut out = String::from("<figure class=\"chart\" style=\"margin:1em 0\">\n");
    // Inline SVG in HTML needs no namespace: the page names no URL at all.
    out += &chart(v, id).replacen(" xmlns=\"http://www.w3.org/2000/svg\"", "", 1);
    if !s.started.is_empty() {
        let _ = writeln!(
            out,
            "<figcaption>connection {} from {}</figcaption>",
            s.conn,
            esc(&s.started)
        );
    }
    out.push_str("</figure>\n");
    out
}

/// A whole page of charts.
pub fn page(title: &str, views: &[View], unreadable: usize) -> String {
    let mut out = format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{}</title>\n<style>\
         body{{font-family:sans-serif;margin:2em;color:#222}}\
         figcaption{{font-size:13px;color:#555}}</style></head><body>\n<h1>{}</h1>\n",
        esc(title),
        esc(title)
    );
    out += LEGEND;
    for (i, v) in views.iter().enumerate() {
        out += &figure(v, &format!("c{i}-"));
    }
    if unreadable > 0 {
        let _ = writeln!(
            out,
            "<p>{unreadable} trace lines were not JSON objects and are not drawn.</p>"
        );
    }
    out.push_str("</body></html>\n");
    out
}
