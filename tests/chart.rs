//! `nbdfault chart` on a fixed trace: the text chart against its golden
//! file, the SVG as well-formed XML with one arrow per message, the HTML
//! self-contained, and the command line's options and errors.
//!
//! The trace (tests/data/chart/session.jsonl) is a real qemu-io session
//! through `nbdfault null --rules` (a torn write, a corrupted read, a
//! delayed flush, an EIO answer, a long run of reads); regenerate the
//! golden files with `NBDFAULT_BLESS=1 cargo test --test chart` after a
//! deliberate change of the drawing, and read the diff.

use std::path::{Path, PathBuf};
use std::process::Command;

use nbdfault::chart::{self, Format, Options, View};

const BIN: &str = env!("CARGO_BIN_EXE_nbdfault");

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/chart")
        .join(name)
}

fn trace() -> String {
    std::fs::read_to_string(data("session.jsonl")).unwrap()
}

/// Compares `got` with a golden file, or rewrites it when blessing.
fn golden(name: &str, got: &str) {
    let path = data(name);
    if std::env::var_os("NBDFAULT_BLESS").is_some() {
        std::fs::write(&path, got).unwrap();
    }
    let want = std::fs::read_to_string(&path).unwrap();
    assert!(
        got == want,
        "{name} differs from its golden file (NBDFAULT_BLESS=1 rewrites it):\n{got}"
    );
}

#[test]
fn text_chart_matches_its_golden_file_and_fits_100_columns() {
    let text = chart::render(&trace(), Format::Text, &Options::default()).unwrap();
    golden("session.txt", &text);
    for line in text.lines() {
        assert!(line.chars().count() <= 100, "too wide: {line}");
    }
    // What the session's story needs to show.
    for want in [
        "! sweep-corrupt:",
        "corrupt bits 206398",
        "! eio: error",
        "reply #1 EIO",
        "held 21.139 ms",
        "torn-write: disconnect after 1000 bytes",
        "! slow-flush: delay",
        "sent by nbdfault",
        " 10 × READ 4K / reply DATA 4K … (#22–#41)",
        "closed: fault: to-server: disconnected by rule torn-write",
    ] {
        assert!(text.contains(want), "no {want:?} in\n{text}");
    }
}

#[test]
fn zoomed_and_uncollapsed_text() {
    let opts = Options {
        conn: Some(1),
        from: Some("20".parse().unwrap()),
        to: Some("23".parse().unwrap()),
        ..Options::default()
    };
    let text = chart::render(&trace(), Format::Text, &opts).unwrap();
    golden("zoom.txt", &text);
    let all = chart::render(
        &trace(),
        Format::Text,
        &Options {
            no_collapse: true,
            ..Options::default()
        },
    )
    .unwrap();
    assert!(!all.contains(" × "));
    let t = chart::parse(&trace());
    let messages: usize = t.sessions.iter().map(|s| s.messages.len()).sum();
    // One line per message: time, number, the client's lane.
    let arrows = all
        .lines()
        .filter(|l| {
            let mut w = l.split_whitespace();
            let t = w.next().is_some_and(|t| t.parse::<f64>().is_ok());
            let n = w.next().is_some_and(|n| n.parse::<usize>().is_ok());
            t && n && w.next().is_some_and(|c| c.starts_with('|'))
        })
        .count();
    assert_eq!(arrows, messages);
}

/// An element's name and attributes.
type Element = (String, Vec<(String, String)>);

/// A small XML well-formedness check: balanced tags, quoted attributes,
/// known entities, one root. Returns each element's name and attributes.
fn elements(xml: &str) -> Result<Vec<Element>, String> {
    fn entities(text: &str) -> Result<(), String> {
        let mut rest = text;
        while let Some(i) = rest.find('&') {
            rest = &rest[i + 1..];
            let end = rest.find(';').ok_or("& without ;")?;
            let name = &rest[..end];
            let ok = matches!(name, "amp" | "lt" | "gt" | "quot" | "apos")
                || name
                    .strip_prefix('#')
                    .is_some_and(|n| n.chars().all(|c| c.is_ascii_digit()));
            if !ok {
                return Err(format!("unknown entity &{name};"));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    let mut stack: Vec<String> = Vec::new();
    let mut roots = 0;
    let mut rest = xml;
    while let Some(i) = rest.find('<') {
        let text = &rest[..i];
        if text.contains('>') {
            return Err(format!("stray > in {text:?}"));
        }
        entities(text)?;
        if stack.is_empty() && !text.trim().is_empty() {
            return Err(format!("text outside the root: {text:?}"));
        }
        rest = &rest[i..];
        if let Some(r) = rest.strip_prefix("<?") {
            rest = &r[r.find("?>").ok_or("unclosed <?")? + 2..];
            continue;
        }
        let end = rest.find('>').ok_or("unclosed tag")?;
        let tag = &rest[1..end];
        rest = &rest[end + 1..];
        if let Some(name) = tag.strip_prefix('/') {
            match stack.pop() {
                Some(open) if open == name.trim() => continue,
                other => return Err(format!("</{name}> closes {other:?}")),
            }
        }
        let closed = tag.ends_with('/');
        let tag = tag.trim_end_matches('/');
        let (name, mut attrs) = tag.split_once(char::is_whitespace).unwrap_or((tag, ""));
        let mut list = Vec::new();
        loop {
            attrs = attrs.trim_start();
            if attrs.is_empty() {
                break;
            }
            let (key, after) = attrs
                .split_once("=\"")
                .ok_or(format!("bad attribute in <{tag}>"))?;
            let close = after.find('"').ok_or("unquoted attribute")?;
            let value = &after[..close];
            if value.contains('<') {
                return Err(format!("< in an attribute of <{tag}>"));
            }
            entities(value)?;
            if list.iter().any(|(k, _): &(String, String)| k == key) {
                return Err(format!("attribute {key} twice in <{tag}>"));
            }
            list.push((key.to_string(), value.to_string()));
            attrs = &after[close + 1..];
        }
        if stack.is_empty() {
            roots += 1;
        }
        out.push((name.to_string(), list));
        if !closed {
            stack.push(name.to_string());
        }
    }
    if !rest.trim().is_empty() || !stack.is_empty() {
        return Err(format!("unclosed elements {stack:?}"));
    }
    if roots != 1 {
        return Err(format!("{roots} root elements"));
    }
    Ok(out)
}

fn arrows(els: &[Element]) -> usize {
    els.iter()
        .filter(|(_, a)| a.iter().any(|(k, v)| k == "class" && v == "arrow"))
        .count()
}

#[test]
fn svg_is_xml_with_one_arrow_per_message() {
    let input = trace();
    let t = chart::parse(&input);
    assert!(t.sessions.len() >= 2);
    for collapse in [true, false] {
        let opts = Options {
            no_collapse: !collapse,
            ..Options::default()
        };
        let svg = chart::render(&input, Format::Svg, &opts).unwrap();
        let els = elements(&svg).unwrap_or_else(|e| panic!("not XML: {e}\n{svg}"));
        let drawn: usize = t
            .sessions
            .iter()
            .map(|s| View::new(s, &opts).arrows())
            .sum();
        assert_eq!(arrows(&els), drawn);
        if !collapse {
            let messages: usize = t.sessions.iter().map(|s| s.messages.len()).sum();
            assert_eq!(arrows(&els), messages);
        }
        // Ids are unique, so charts can share a page.
        let mut ids: Vec<&String> = els
            .iter()
            .flat_map(|(_, a)| a.iter().filter(|(k, _)| k == "id").map(|(_, v)| v))
            .collect();
        let n = ids.len();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), n);
    }
    // One connection alone is a plain chart.
    let one = chart::render(
        &input,
        Format::Svg,
        &Options {
            conn: Some(2),
            ..Options::default()
        },
    )
    .unwrap();
    let els = elements(&one).unwrap();
    assert_eq!(arrows(&els), t.sessions[1].messages.len());
}

#[test]
fn html_is_self_contained() {
    let html = chart::render(&trace(), Format::Html, &Options::default()).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>"));
    assert!(!html.contains("<script"));
    assert!(!html.contains("@import") && !html.contains("<link"));
    // No URL at all (inline SVG needs no namespace); markers are in-page.
    assert!(!html.contains("http"));
    assert_eq!(html.matches("url(").count(), html.matches("url(#").count());
    // The body between the page's own tags is XML too.
    let body = &html[html.find("<body>").unwrap()..html.find("</body>").unwrap() + 7];
    elements(body).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn command_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("c.svg");
    let st = Command::new(BIN)
        .arg("chart")
        .arg(data("session.jsonl"))
        .args(["--conn", "2", "--format", "svg", "-o"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(st.status.success(), "{st:?}");
    assert!(st.stdout.is_empty());
    let svg = std::fs::read_to_string(&out).unwrap();
    assert!(svg.contains("connection 2:"));
    let text = Command::new(BIN)
        .arg("chart")
        .arg(data("session.jsonl"))
        .output()
        .unwrap();
    assert!(text.status.success());
    assert_eq!(
        String::from_utf8_lossy(&text.stdout),
        std::fs::read_to_string(data("session.txt")).unwrap()
    );
    for (args, want) in [
        (
            &["--from", "soon"][..],
            "nbdfault: --from: \"soon\" is neither a message number (120) nor a time since the \
             connection's start (1.5s, 250ms, 40us)\n",
        ),
        (
            &["--conn", "9"][..],
            "nbdfault: the trace has no connection 9 (it has 1, 2)\n",
        ),
        (
            &["--format", "png"][..],
            "nbdfault: --format: unknown format \"png\": text, svg or html\n",
        ),
    ] {
        let st = Command::new(BIN)
            .arg("chart")
            .arg(data("session.jsonl"))
            .args(args)
            .output()
            .unwrap();
        assert_eq!(st.status.code(), Some(1));
        assert_eq!(String::from_utf8_lossy(&st.stderr), want);
    }
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let st = Command::new(BIN).arg("chart").arg(&empty).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&st.stderr),
        "nbdfault: the trace has no records (is it a --trace file?)\n"
    );
}
