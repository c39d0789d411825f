//! "Did you mean" for misspelt names in rule files.
//!
//! A small edit distance is enough here: the candidate lists are a dozen
//! short names, and a suggestion is only worth showing when it is close.

/// Levenshtein distance between two strings, counted in characters.
pub(crate) fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    // One row of the classic table; `row[j]` is the distance between the
    // prefix of `a` seen so far and `b[..j]`.
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let substitution = diagonal + usize::from(ca != cb);
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(diagonal + 1);
        }
    }
    row[b.len()]
}

/// The candidate `input` most likely stands for, if any is close enough:
/// within two edits (but not a complete rewrite of a short name), or one is
/// a prefix of the other. Comparison ignores ASCII case.
pub(crate) fn suggest<'a>(input: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let input = input.trim().to_ascii_lowercase();
    if input.is_empty() {
        return None;
    }
    let mut best: Option<(usize, &'a str)> = None;
    for &candidate in candidates {
        let lower = candidate.to_ascii_lowercase();
        let distance = levenshtein(&input, &lower);
        let prefix = lower.starts_with(&input) || input.starts_with(&lower);
        let close = distance <= 2 && distance < lower.chars().count();
        if !(close || prefix) {
            continue;
        }
        // Prefix matches rank after close spellings of the same distance.
        let score = if close {
            distance * 2
        } else {
            distance * 2 + 1
        };
        if best.is_none_or(|(s, _)| score < s) {
            best = Some((score, candidate));
        }
    }
    best.map(|(_, c)| c)
}

/// `unknown event "requset" — did you mean "request"? (events: connect, ...)`
///
/// `listed` are the names shown; `aliases` are only offered as suggestions.
pub(crate) fn unknown(
    what: &str,
    input: &str,
    label: &str,
    listed: &[&str],
    aliases: &[&str],
) -> String {
    let mut message = format!("unknown {what} {input:?}");
    let candidates: Vec<&str> = listed.iter().chain(aliases).copied().collect();
    if let Some(s) = suggest(input, &candidates) {
        message.push_str(&format!(" — did you mean {s:?}?"));
    }
    message.push_str(&format!(" ({label}: {})", listed.join(", ")));
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distances() {
        assert_eq!(levenshtein("", ""), 0);
        assert_eq!(levenshtein("abc", ""), 3);
        assert_eq!(levenshtein("", "abc"), 3);
        assert_eq!(levenshtein("kitten", "sitting"), 3);
        assert_eq!(levenshtein("requset", "request"), 2);
        assert_eq!(levenshtein("read", "read"), 0);
        assert_eq!(levenshtein("négative", "negative"), 1);
    }

    #[test]
    fn suggestions() {
        let events = ["connect", "neg1", "request", "reply", "data"];
        assert_eq!(suggest("requset", &events), Some("request"));
        assert_eq!(suggest("REQUEST", &events), Some("request"));
        assert_eq!(suggest("req", &events), Some("request"));
        assert_eq!(suggest("replys", &events), Some("reply"));
        assert_eq!(suggest("neg", &events), Some("neg1"));
        assert_eq!(suggest("xyzzy", &events), None);
        assert_eq!(suggest("", &events), None);
        // Two edits would turn any two-letter name into any other.
        assert_eq!(suggest("xy", &["go", "io"]), None);
        assert_eq!(suggest("EIX", &["EPERM", "EIO"]), Some("EIO"));
    }

    #[test]
    fn messages() {
        let events = ["connect", "request"];
        assert_eq!(
            unknown("event", "requset", "events", &events, &[]),
            "unknown event \"requset\" — did you mean \"request\"? (events: connect, request)"
        );
        assert_eq!(
            unknown("event", "zzz", "events", &events, &[]),
            "unknown event \"zzz\" (events: connect, request)"
        );
        assert_eq!(
            unknown("event", "optoin", "events", &events, &["option"]),
            "unknown event \"optoin\" — did you mean \"option\"? (events: connect, request)"
        );
    }
}
