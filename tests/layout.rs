//! The crate's module graph has no import circles.
//!
//! `src/lib.rs` promises a layering (the wire format at the bottom, the
//! process at the top); a circle between two folders, or between two files
//! of one folder, is where that layering has quietly broken (a helper put in
//! the wrong place). This reads the sources, resolves every `crate::`,
//! `super::` and `self::` path to the file that defines it, and checks two
//! graphs: top-level modules, and the files within each folder. A folder's
//! `mod.rs` and its own files may use each other (the facade declares its
//! children, which share the facade's types); test code is not counted.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Module path (e.g. `["io", "net"]`) → file.
fn modules(root: &Path) -> BTreeMap<Vec<String>, PathBuf> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().and_then(|e| e.to_str()) != Some("rs") {
                continue;
            }
            let rel = path.strip_prefix(root).unwrap();
            let mut parts: Vec<String> = rel
                .iter()
                .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
                .collect();
            match parts.last().map(String::as_str) {
                Some("main") if parts.len() == 1 => continue,
                Some("lib") if parts.len() == 1 => parts.clear(),
                Some("mod") => {
                    parts.pop();
                }
                _ => {}
            }
            out.insert(parts, path);
        }
    }
    out
}

/// The code of a file without its `#[cfg(test)]` modules and comments.
fn code(text: &str) -> String {
    let mut out = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let t = line.trim_start();
        if t == "#[cfg(test)]" {
            // Skip the item that follows: up to the line closing it at the
            // same indentation.
            let indent = line.len() - t.len();
            let Some(item) = lines.next() else { break };
            if item.trim_end().ends_with(';') {
                continue;
            }
            let close = format!("{}}}", " ".repeat(indent));
            for l in lines.by_ref() {
                if l.trim_end() == close {
                    break;
                }
            }
            continue;
        }
        if t.starts_with("//") {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Expands `a::{b, c::{d, e}}` into `a::b`, `a::c::d`, `a::c::e`.
fn expand(tree: &str, prefix: &str, out: &mut Vec<String>) {
    let tree = tree.trim();
    if let Some(open) = tree.find('{') {
        let head = format!("{prefix}{}", &tree[..open]);
        let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
        let mut depth = 0;
        let mut start = 0;
        for (i, ch) in inner.char_indices() {
            match ch {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    expand(&inner[start..i], &head, out);
                    start = i + 1;
                }
                _ => {}
            }
        }
        expand(&inner[start..], &head, out);
    } else if !tree.is_empty() {
        out.push(format!("{prefix}{tree}"));
    }
}

/// Every path a file's code names, from `use` items and inline paths.
fn paths(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    // `use` items (at the start of a line), possibly spanning lines.
    let mut item: Option<String> = None;
    for line in code.lines() {
        let t = line.trim_start();
        if item.is_none() {
            let t = t.strip_prefix("pub ").unwrap_or(t);
            let t = match t.strip_prefix("pub(") {
                Some(r) => r.split_once(") ").map_or(t, |(_, r)| r),
                None => t,
            };
            if let Some(r) = t.strip_prefix("use ") {
                item = Some(String::new());
                item.as_mut().unwrap().push_str(r);
            }
        } else if let Some(i) = item.as_mut() {
            i.push_str(t);
        }
        if let Some(i) = item.take_if(|i| i.contains(';')) {
            let i: String = i[..i.find(';').unwrap()].split_whitespace().collect();
            expand(&i, "", &mut out);
        }
    }
    // Inline paths such as `crate::proxy::run(...)`.
    for start in ["crate::", "super::", "self::"] {
        let mut at = 0;
        while let Some(i) = code[at..].find(start) {
            let i = at + i;
            let end = code[i..]
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .map_or(code.len(), |e| i + e);
            out.push(code[i..end].trim_end_matches(':').to_string());
            at = end.max(i + start.len());
        }
    }
    out
}

/// The module a path lands in: the longest known module prefix.
fn resolve(
    path: &str,
    here: &[String],
    is_mod_rs: bool,
    known: &BTreeMap<Vec<String>, PathBuf>,
) -> Option<Vec<String>> {
    let mut parts: Vec<&str> = path.split("::").filter(|p| !p.is_empty()).collect();
    let mut base: Vec<String> = match parts.first() {
        Some(&"crate") => {
            parts.remove(0);
            Vec::new()
        }
        Some(&"self") | Some(&"super") => {
            // A plain file's `self` is itself; a mod.rs's too (its folder).
            let mut b = here.to_vec();
            if parts[0] == "self" {
                parts.remove(0);
            }
            while parts.first() == Some(&"super") {
                parts.remove(0);
                b.pop();
            }
            let _ = is_mod_rs;
            b
        }
        _ => return None,
    };
    let mut found = None;
    if known.contains_key(&base) {
        found = Some(base.clone());
    }
    for p in parts {
        base.push(p.to_string());
        if known.contains_key(&base) {
            found = Some(base.clone());
        } else {
            break;
        }
    }
    found
}

fn graph() -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let known = modules(&root);
    let mut edges = BTreeMap::new();
    for (module, file) in &known {
        let is_mod_rs = file
            .file_name()
            .is_some_and(|n| n == "mod.rs" || n == "lib.rs");
        let text = std::fs::read_to_string(file).unwrap();
        let mut to = BTreeSet::new();
        for p in paths(&code(&text)) {
            if let Some(target) = resolve(&p, module, is_mod_rs, &known)
                && &target != module
            {
                to.insert(target);
            }
        }
        edges.insert(module.clone(), to);
    }
    edges
}

/// A circle in `edges`, if there is one.
fn circle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_string(), 1);
        stack.push(n.to_string());
        for m in edges.get(n).into_iter().flatten() {
            match state.get(m.as_str()) {
                Some(1) => {
                    let from = stack.iter().position(|s| s == m).unwrap();
                    let mut c = stack[from..].to_vec();
                    c.push(m.clone());
                    return Some(c);
                }
                Some(_) => {}
                None => {
                    if let Some(c) = visit(m, edges, state, stack) {
                        return Some(c);
                    }
                }
            }
        }
        stack.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in edges.keys() {
        if !state.contains_key(n)
            && let Some(c) = visit(n, edges, &mut state, &mut Vec::new())
        {
            return Some(c);
        }
    }
    None
}

/// Per folder, the edges between its entries (files and subfolders): an
/// import from `a/x/y.rs` of `b/z.rs` is an edge `a -> b` in the top
/// folder. Imports between a module and its own descendants are not
/// edges.
fn folders() -> BTreeMap<Vec<String>, BTreeMap<String, BTreeSet<String>>> {
    let mut folders: BTreeMap<Vec<String>, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for (from, tos) in graph() {
        for to in tos {
            let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
            if common < from.len() && common < to.len() {
                folders
                    .entry(from[..common].to_vec())
                    .or_default()
                    .entry(from[common].clone())
                    .or_default()
                    .insert(to[common].clone());
            }
        }
    }
    folders
}

#[test]
fn top_level_modules_form_no_circle() {
    let top = folders().remove(&Vec::new()).unwrap_or_default();
    // Loud on purpose: the graph is worth seeing when this fails.
    for (a, bs) in &top {
        eprintln!(
            "{a} -> {}",
            bs.iter().cloned().collect::<Vec<_>>().join(", ")
        );
    }
    assert_eq!(
        circle(&top),
        None,
        "top-level modules import each other in a circle"
    );
    // The layering lib.rs describes, checked where it matters most.
    for low in ["protocol", "intercept", "rules", "observe", "io"] {
        for high in [
            "process", "server", "proxy", "control", "injector", "backend",
        ] {
            assert!(
                !top.get(low).is_some_and(|s| s.contains(high)),
                "{low} must not depend on {high}"
            );
        }
    }
    assert!(
        top.get("protocol").is_none_or(BTreeSet::is_empty),
        "protocol must depend on nothing else in the crate: {:?}",
        top.get("protocol")
    );
}

/// The crate map in `src/lib.rs` lists the modules from the top down: each
/// may import only those listed after it.
#[test]
fn top_level_imports_follow_the_crate_map_downwards() {
    let lib =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs")).unwrap();
    let order: Vec<String> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("//! | [`"))
        .filter_map(|l| l.split('`').next())
        .map(String::from)
        .collect();
    let top = folders().remove(&Vec::new()).unwrap_or_default();
    for (from, tos) in &top {
        let Some(a) = order.iter().position(|m| m == from) else {
            panic!("{from} is missing from the crate map in src/lib.rs");
        };
        for to in tos {
            let b = order.iter().position(|m| m == to);
            assert!(
                b.is_some_and(|b| b > a),
                "{from} imports {to}, which the crate map in src/lib.rs lists above it \
                 (order: {})",
                order.join(", ")
            );
        }
    }
}

#[test]
fn files_within_a_folder_form_no_circle() {
    for (folder, edges) in folders() {
        if folder.is_empty() {
            continue;
        }
        assert_eq!(
            circle(&edges),
            None,
            "files in src/{} import each other in a circle",
            folder.join("/")
        );
    }
}

#[test]
fn the_resolver_sees_the_imports_it_must() {
    // A check of the checker: known edges are found, so a circle could not
    // hide behind a parsing gap.
    let g = graph();
    let has = |from: &str, to: &str| {
        let f: Vec<String> = from.split("::").map(String::from).collect();
        let t: Vec<String> = to.split("::").map(String::from).collect();
        g.get(&f).is_some_and(|s| s.contains(&t))
    };
    assert!(has("server", "proxy"), "use crate::proxy::{{self, ...}}");
    assert!(has("proxy", "intercept"));
    assert!(
        has("protocol::session", "protocol::handshake"),
        "super:: paths"
    );
    assert!(has("process", "server"));
    let mut v = Vec::new();
    expand("a::{b, c::{d, e}}", "", &mut v);
    assert_eq!(v, ["a::b", "a::c::d", "a::c::e"]);
    let stripped = code("fn f() {}\n#[cfg(test)]\nmod tests {\n    use crate::x;\n}\nfn g() {}\n");
    assert!(!stripped.contains("crate::x") && stripped.contains("fn g"));
}
