//! Import cycles between the modules of a crate's `src/`: each file is a
//! module; a `crate::`, `super::` or `self::` path in it is an edge to the
//! deepest module the path names (a parent naming its own child declares
//! it, which is no edge). Cycles are reported between files and between
//! top-level modules (a folder and its files count as one).
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
};

use anyhow::Result;

type Module = Vec<String>;

/// Every cycle found, as lines to print; empty when there is none.
pub fn cycles(src: &Path) -> Result<Vec<String>> {
    let mut files = BTreeMap::new();
    collect(src, src, &mut files)?;
    let mut edges: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for (m, (text, is_dir_mod)) in &files {
        let mut out = BTreeSet::new();
        for path in paths(m, text) {
            let Some(t) = deepest(&files, &path) else {
                continue;
            };
            if t == *m || t.is_empty() || (*is_dir_mod && t.starts_with(m)) {
                continue;
            }
            out.insert(t);
        }
        edges.insert(m.clone(), out);
    }
    let mut report = Vec::new();
    for c in strongly_connected(&edges) {
        let names: Vec<String> = c.iter().map(|m| m.join("::")).collect();
        report.push(format!("file cycle: {}", names.join(", ")));
    }
    let mut top: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for (v, ws) in &edges {
        let Some(first) = v.first() else { continue };
        let entry = top.entry(vec![first.clone()]).or_default();
        for w in ws {
            if let Some(f) = w.first().filter(|f| *f != first) {
                entry.insert(vec![f.clone()]);
            }
        }
    }
    for c in strongly_connected(&top) {
        let names: Vec<String> = c.iter().map(|m| m.join("::")).collect();
        report.push(format!("module cycle: {}", names.join(", ")));
    }
    Ok(report)
}

fn collect(root: &Path, dir: &Path, files: &mut BTreeMap<Module, (String, bool)>) -> Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect(root, &path, files)?;
            continue;
        }
        if path.extension().and_then(|e| e.to_str()) != Some("rs") {
            continue;
        }
        let rel = path.strip_prefix(root)?.with_extension("");
        let mut m: Module = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        let is_dir_mod = matches!(m.last().map(String::as_str), Some("mod" | "lib" | "main"));
        if is_dir_mod {
            m.pop();
        }
        files.insert(m, (fs::read_to_string(&path)?, is_dir_mod));
    }
    Ok(())
}

/// The module paths a file refers to, made absolute.
fn paths(m: &Module, text: &str) -> Vec<Module> {
    let text: String = text
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let base = |kw: &str| -> Module {
        match kw {
            "crate" => Vec::new(),
            "self" => m.clone(),
            _ => m[..m.len().saturating_sub(1)].to_vec(),
        }
    };
    let mut out = Vec::new();
    // `use` trees, expanded.
    let mut rest = text.as_str();
    while let Some(i) = rest.find("use ") {
        let preceded = rest[..i]
            .chars()
            .last()
            .is_none_or(|c| !c.is_alphanumeric() && c != '_');
        let after = &rest[i + 4..];
        let Some(end) = after.find(';') else { break };
        if preceded {
            let tree: String = after[..end]
                .chars()
                .filter(|c| !c.is_whitespace())
                .collect();
            for kw in ["crate", "super", "self"] {
                if let Some(t) = tree.strip_prefix(&format!("{kw}::")) {
                    for p in expand(t) {
                        let mut full = base(kw);
                        full.extend(p);
                        out.push(full);
                    }
                }
            }
        }
        rest = &after[end..];
    }
    // Paths written in place: `crate::a::b`, `super::x`.
    let bytes = text.as_bytes();
    for kw in ["crate", "super", "self"] {
        let pat = format!("{kw}::");
        let mut from = 0;
        while let Some(i) = text[from..].find(&pat) {
            let at = from + i;
            from = at + pat.len();
            if at > 0
                && (bytes[at - 1].is_ascii_alphanumeric()
                    || bytes[at - 1] == b'_'
                    || bytes[at - 1] == b':')
            {
                continue;
            }
            let tail: String = text[from..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            let mut full = base(kw);
            full.extend(
                tail.split("::")
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned),
            );
            out.push(full);
        }
    }
    out
}

/// `a::{b, c::{d, e}}` -> `[a, b]`, `[a, c, d]`, `[a, c, e]`.
fn expand(tree: &str) -> Vec<Module> {
    // Whitespace is gone, so `X as Y` reads `XasY`: a name that is no
    // module, which resolves to the module before it, as `X` would.
    let Some(open) = tree.find('{') else {
        return vec![
            tree.split("::")
                .filter(|s| !s.is_empty() && *s != "self" && *s != "*")
                .map(str::to_owned)
                .collect(),
        ];
    };
    let prefix: Module = tree[..open]
        .split("::")
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
    let mut parts = Vec::new();
    let (mut depth, mut cur) = (0, String::new());
    for ch in inner.chars() {
        match ch {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(ch);
    }
    if !cur.is_empty() {
        parts.push(cur);
    }
    parts
        .iter()
        .flat_map(|p| expand(p))
        .map(|q| prefix.iter().cloned().chain(q).collect())
        .collect()
}

fn deepest(files: &BTreeMap<Module, (String, bool)>, path: &Module) -> Option<Module> {
    (0..=path.len())
        .rev()
        .map(|n| path[..n].to_vec())
        .find(|p| files.contains_key(p))
}

/// Tarjan's strongly connected components with more than one member.
fn strongly_connected(edges: &BTreeMap<Module, BTreeSet<Module>>) -> Vec<Vec<Module>> {
    struct State<'a> {
        edges: &'a BTreeMap<Module, BTreeSet<Module>>,
        index: BTreeMap<Module, usize>,
        low: BTreeMap<Module, usize>,
        on: BTreeSet<Module>,
        stack: Vec<Module>,
        next: usize,
        out: Vec<Vec<Module>>,
    }
    fn visit(s: &mut State<'_>, v: &Module) {
        s.index.insert(v.clone(), s.next);
        s.low.insert(v.clone(), s.next);
        s.next += 1;
        s.stack.push(v.clone());
        s.on.insert(v.clone());
        for w in s.edges.get(v).into_iter().flatten() {
            if !s.index.contains_key(w) {
                visit(s, w);
                let l = s.low[v].min(s.low[w]);
                s.low.insert(v.clone(), l);
            } else if s.on.contains(w) {
                let l = s.low[v].min(s.index[w]);
                s.low.insert(v.clone(), l);
            }
        }
        if s.low[v] == s.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on.remove(&w);
                let done = w == *v;
                comp.push(w);
                if done {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                s.out.push(comp);
            }
        }
    }
    let mut s = State {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        on: BTreeSet::new(),
        stack: Vec::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in edges.keys() {
        if !s.index.contains_key(v) {
            visit(&mut s, v);
        }
    }
    s.out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_cycle_and_ignores_a_parent_declaring_its_children() {
        let dir = std::env::temp_dir().join(format!("xtask-cycles-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("a")).unwrap();
        fs::write(dir.join("lib.rs"), "pub mod a;\npub mod b;\n").unwrap();
        fs::write(dir.join("a/mod.rs"), "mod x;\nuse self::x::X;\n").unwrap();
        fs::write(dir.join("a/x.rs"), "pub struct X;\n").unwrap();
        fs::write(dir.join("b.rs"), "// crate::a::X\n").unwrap();
        assert!(cycles(&dir).unwrap().is_empty());
        fs::write(dir.join("b.rs"), "use crate::a::x::X;\n").unwrap();
        fs::write(dir.join("a/x.rs"), "pub struct X(crate::b::Y);\n").unwrap();
        let found = cycles(&dir).unwrap();
        assert_eq!(
            found,
            ["file cycle: a::x, b", "module cycle: a, b"],
            "{found:?}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
