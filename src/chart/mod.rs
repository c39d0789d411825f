//! `nbdfault chart`: a trace drawn as a sequence chart (client | nbdfault |
//! server), as text for CI logs, or as self-contained SVG or HTML for
//! reports (the sweep's HTML report draws each finding with it).
//!
//! Without I/O, in three steps a test can look at one by one:
//! - [`model`]: trace lines → sessions of messages, faults and ends;
//! - [`view`]: a session → the rows to draw (zoomed, runs collapsed);
//! - [`text`], [`svg`], [`html`]: rows → output.

pub mod html;
pub mod model;
pub mod svg;
pub mod text;
pub mod view;

use std::str::FromStr;

pub use model::{Session, Trace, parse};
pub use view::{Bound, View};

/// The output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Svg,
    Html,
}

impl FromStr for Format {
    type Err = ChartError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Format::Text),
            "svg" => Ok(Format::Svg),
            "html" => Ok(Format::Html),
            _ => Err(ChartError::Format(s.to_string())),
        }
    }
}

/// What to draw.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// One connection; `None`: each in turn.
    pub conn: Option<u64>,
    pub from: Option<Bound>,
    pub to: Option<Bound>,
    /// Draw every message, even in long runs of alike ones.
    pub no_collapse: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChartError {
    #[error("unknown format {0:?}: text, svg or html")]
    Format(String),
    #[error(
        "{0:?} is neither a message number (120) nor a time since the connection's start \
         (1.5s, 250ms, 40us)"
    )]
    Bound(String),
    #[error("the trace has no records (is it a --trace file?)")]
    Empty,
    #[error("the trace has no connection {0} (it has {1})")]
    NoConnection(u64, String),
}

/// The sessions `opts` asks for.
pub fn select<'a>(trace: &'a Trace, opts: &Options) -> Result<Vec<&'a Session>, ChartError> {
    if trace.sessions.is_empty() {
        return Err(ChartError::Empty);
    }
    match opts.conn {
        None => Ok(trace.sessions.iter().collect()),
        Some(c) => match trace.sessions.iter().find(|s| s.conn == c) {
            Some(s) => Ok(vec![s]),
            None => Err(ChartError::NoConnection(
                c,
                trace
                    .sessions
                    .iter()
                    .map(|s| s.conn.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            )),
        },
    }
}

/// A whole trace's chart in `format`.
pub fn render(input: &str, format: Format, opts: &Options) -> Result<String, ChartError> {
    let trace = parse(input);
    let sessions = select(&trace, opts)?;
    let views: Vec<View> = sessions.iter().map(|s| View::new(s, opts)).collect();
    Ok(match format {
        Format::Text => {
            let mut out = String::new();
            for (i, v) in views.iter().enumerate() {
                if i > 0 {
                    out.push('\n');
                }
                out += &text::render(v);
            }
            if trace.unreadable > 0 {
                out += &format!("({} trace lines were not JSON objects)\n", trace.unreadable);
            }
            out
        }
        Format::Svg => svg::document(&views),
        Format::Html => html::page("nbdfault chart", &views, trace.unreadable),
    })
}
