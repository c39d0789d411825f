//! A linear pre-scan of YAML text that refuses flow nesting deeper than
//! [`MAX_FLOW_DEPTH`] before serde_yaml sees it.
//!
//! libyaml's scanner (inside serde_yaml) does work proportional to the flow
//! depth for every token, so 100,000 `[` took it tens of seconds before its
//! own recursion limit said no: a 200 KB body could freeze whoever parsed
//! it. Block nesting (by indentation) was measured linear and is left to
//! serde_yaml's recursion limit.
//!
//! The scan only needs to be right about brackets that really open flow
//! collections; it errs towards not counting (a bracket it cannot place is
//! left to serde_yaml, which then sees at most a shallow document). It skips
//! quoted scalars, comments and block scalars (`|`, `>`), and counts `[`/`{`
//! in block context only where a flow collection can start (at the start of
//! a line or after whitespace), as a `[` inside `name: a[b` is text.

use crate::rules::fields::Pos;

/// Deepest flow nesting (`[...]` and `{...}` inside each other) a rules
/// document may have. Rules files need three or four levels.
pub const MAX_FLOW_DEPTH: usize = 64;

/// Where the first bracket past [`MAX_FLOW_DEPTH`] is, if there is one.
pub fn too_deep(text: &str) -> Option<Pos> {
    let mut depth = 0usize;
    let mut line = 1;
    let mut column = 0;
    // The character before the current one on its line (None at a line's
    // start), and the current line's indentation.
    let mut prev: Option<char> = None;
    let mut indent = 0usize;
    let mut at_indent = true;
    // A block scalar's content: lines indented more than `block` are text.
    let mut block: Option<usize> = None;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        column += 1;
        if c == '\n' {
            line += 1;
            column = 0;
            prev = None;
            indent = 0;
            at_indent = true;
            continue;
        }
        if at_indent {
            if c == ' ' {
                indent += 1;
                prev = Some(c);
                continue;
            }
            at_indent = false;
            if let Some(b) = block {
                if indent > b || c == '\r' || c == '\t' {
                    skip_line(&mut chars);
                    continue;
                }
                block = None;
            }
        }
        let token_start = match prev {
            None => true,
            Some(p) => p == ' ' || p == '\t' || (depth > 0 && matches!(p, '[' | '{' | ',' | ':')),
        };
        match c {
            '#' if token_start => {
                skip_line(&mut chars);
                continue;
            }
            '"' | '\'' if token_start => {
                skip_quoted(c, &mut chars, &mut line, &mut column);
            }
            '[' | '{' if depth > 0 || token_start => {
                depth += 1;
                if depth > MAX_FLOW_DEPTH {
                    return Some(Pos { line, column });
                }
            }
            ']' | '}' if depth > 0 => depth -= 1,
            '|' | '>' if depth == 0 && token_start => block = Some(indent),
            _ => {}
        }
        prev = Some(c);
    }
    None
}

type Chars<'a> = std::iter::Peekable<std::str::Chars<'a>>;

/// Skips to the end of the line; the newline is left for the caller's
/// loop, which starts the next line.
fn skip_line(chars: &mut Chars) {
    while chars.next_if(|&c| c != '\n').is_some() {}
}

/// Skips a quoted scalar up to and including its closing quote: `\` escapes
/// in double quotes, `''` is a quote in single quotes.
fn skip_quoted(quote: char, chars: &mut Chars, line: &mut usize, column: &mut usize) {
    while let Some(c) = chars.next() {
        *column += 1;
        match c {
            '\n' => {
                *line += 1;
                *column = 0;
            }
            // The escaped character (a newline is left to count as one).
            '\\' if quote == '"' && chars.next_if(|&n| n != '\n').is_some() => *column += 1,
            _ if c == quote => {
                if quote == '\'' && chars.next_if_eq(&'\'').is_some() {
                    *column += 1;
                    continue;
                }
                return;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(open: &str, n: usize) -> String {
        format!("rules: {}{}\n", open.repeat(n), "]".repeat(n))
    }

    #[test]
    fn counts_flow_nesting() {
        assert_eq!(too_deep(&nested("[", MAX_FLOW_DEPTH)), None);
        assert_eq!(
            too_deep(&nested("[", MAX_FLOW_DEPTH + 1)),
            Some(Pos {
                line: 1,
                column: 8 + MAX_FLOW_DEPTH
            })
        );
        assert!(too_deep(&format!("rules: {}", "{a: ".repeat(100))).is_some());
        assert!(too_deep(&format!("rules:\n  - {}", "[".repeat(100_000))).is_some());
        // Closed groups one after the other are not nested.
        let flat = format!("rules: [{}]\n", "[[]], ".repeat(1000));
        assert_eq!(too_deep(&flat), None);
    }

    #[test]
    fn brackets_in_text_do_not_count() {
        let many = "[".repeat(200);
        for text in [
            format!("rules:\n  - name: a{many}\n    event: request\n"),
            format!("rules:\n  - name: \"{many}\"\n"),
            format!("rules:\n  - name: '{many}'\n"),
            format!("rules:\n  - name: 'it''s {many}'\n"),
            format!("rules:\n  - name: \"a \\\" {many}\"\n"),
            format!("# {many}\nrules: []\n"),
            format!("rules: [] # {many}\n"),
            format!("rules: [\"{many}\", '{many}']\n"),
            format!("rules:\n  - name: |\n      {many}\n      {many}\n    event: data\n"),
            format!("rules:\n  - name: >-\n\n      {many}\n    event: data\n"),
        ] {
            assert_eq!(too_deep(&text), None, "{text}");
        }
        // After text that looked like a quote or a block scalar, nesting
        // is still counted.
        let deep = "[".repeat(100);
        assert!(too_deep(&format!("a: it's\nrules: {deep}\n")).is_some());
        assert!(too_deep(&format!("a: |\n  x\nrules: {deep}\n")).is_some());
        assert!(too_deep(&format!("a: \"x\ny\"\nrules: {deep}\n")).is_some());
    }

    #[test]
    fn the_position_is_the_opening_bracket() {
        let text = format!("seed: 1\nrules:\n  - {}", "{".repeat(70));
        assert_eq!(
            too_deep(&text),
            Some(Pos {
                line: 3,
                column: 5 + MAX_FLOW_DEPTH
            })
        );
    }
}
