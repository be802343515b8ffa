//! `#include` extraction, resolution inside a project, and dependency ordering.

use std::collections::{HashMap, HashSet, VecDeque};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IncludeKind {
    /// `#include "x.h"`
    Quoted,
    /// `#include <x.h>`
    Angle,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Include {
    pub path: String,
    pub kind: IncludeKind,
}

/// Finds `#include "..."` and `#include <...>` directives: the lines that [`crate::pp::scan`]
/// sees as directives, so an `#include` inside a comment, a string or a raw string is none
/// (a test's expected output in `R"(...)"` pulled the files it names into the unit), and
/// one after a comment closed on its line (`/* c */ #include "y.h"`) counts. Conditional
/// compilation (`#if 0`) is not evaluated, so every directive counts.
pub fn extract_includes(text: &str) -> Vec<Include> {
    crate::pp::scan(text)
        .directives
        .iter()
        .filter(|d| d.name == "include")
        .filter_map(|d| parse_directive(&text[d.range.clone()]))
        .collect()
}

fn parse_directive(line: &str) -> Option<Include> {
    let s = line.trim_start();
    let s = s.strip_prefix('#')?.trim_start();
    let s = s.strip_prefix("include")?;
    // `#include_next` and friends are not includes of the project.
    if s.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_') {
        return None;
    }
    let s = s.trim_start();
    let (close, kind) = match s.chars().next()? {
        '"' => ('"', IncludeKind::Quoted),
        '<' => ('>', IncludeKind::Angle),
        _ => return None, // macro-computed include
    };
    let body = &s[1..];
    let end = body.find(close)?;
    let path = body[..end].trim();
    if path.is_empty() {
        return None;
    }
    Some(Include { path: path.replace('\\', "/"), kind })
}

/// Joins `dir` and `path` (both `/`-separated, relative to the project root) and
/// normalizes `.` and `..`. `None` if the result would leave the project root.
pub fn normalize_join(dir: &str, path: &str) -> Option<String> {
    if path.starts_with('/') {
        return None; // absolute: not inside the project by construction
    }
    let mut parts: Vec<&str> = Vec::new();
    for p in dir.split('/').chain(path.split('/')) {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            p => parts.push(p),
        }
    }
    Some(parts.join("/"))
}

fn parent_dir(rel: &str) -> &str {
    match rel.rfind('/') {
        Some(i) => &rel[..i],
        None => "",
    }
}

/// The files of one project, by root-relative path, and its include directories.
#[derive(Debug, Clone)]
pub struct ProjectIndex {
    by_path: HashMap<String, usize>,
    /// The root directory's name: `<fmt/core.h>` resolves to `core.h` when the root is
    /// `.../fmt` (an installed header tree such as /usr/include/fmt).
    pub root_name: Option<String>,
    /// Root-relative directories tried for includes, in order ("" is the root).
    pub include_dirs: Vec<String>,
    /// Project files that exist but were skipped (generated, too large, ...): an include
    /// that reaches one first resolves to none, as the compiler would take that file, not
    /// a namesake further down the search.
    pub skipped: HashSet<String>,
}

impl ProjectIndex {
    /// `paths[i]` is the root-relative path of file `i`. Include directories (a
    /// heuristic): the root, `include/`, `src/`, then every other directory named
    /// `include` that holds a file, sorted.
    pub fn new(paths: &[&str]) -> ProjectIndex {
        let by_path: HashMap<String, usize> = paths.iter().enumerate().map(|(i, p)| (p.to_string(), i)).collect();
        let mut include_dirs = vec![String::new(), "include".to_string(), "src".to_string()];
        let mut extra: Vec<String> = Vec::new();
        for p in paths {
            let mut dir = parent_dir(p);
            while !dir.is_empty() {
                if (dir == "include" || dir.ends_with("/include")) && !include_dirs.iter().any(|d| d == dir) {
                    extra.push(dir.to_string());
                }
                dir = parent_dir(dir);
            }
        }
        extra.sort();
        extra.dedup();
        include_dirs.extend(extra);
        ProjectIndex { by_path, include_dirs, root_name: None, skipped: HashSet::new() }
    }

    /// Resolves an include written in file `from_rel`: quoted includes are tried
    /// relative to the including file's directory first, then (like angle includes)
    /// against the include directories. `None` if no project file matches.
    pub fn resolve(&self, from_rel: &str, inc: &Include) -> Option<usize> {
        // Some(hit): the search stops at this path (a project file, or a skipped one: None)
        let at = |p: String| -> Option<Option<usize>> {
            match self.by_path.get(&p) {
                Some(&i) => Some(Some(i)),
                None if self.skipped.contains(&p) => Some(None),
                None => None,
            }
        };
        if inc.kind == IncludeKind::Quoted {
            if let Some(hit) = normalize_join(parent_dir(from_rel), &inc.path).and_then(at) {
                return hit;
            }
        }
        let found = self.include_dirs.iter().filter_map(|d| normalize_join(d, &inc.path)).find_map(at);
        match found {
            Some(hit) => hit,
            None => {
                let rest = inc.path.strip_prefix(self.root_name.as_deref()?)?.strip_prefix('/')?;
                at(normalize_join("", rest)?).flatten()
            }
        }
    }
}

/// Result of ordering the headers of one source file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderOrder {
    /// Files included (transitively) by the source, each once, dependencies first.
    pub order: Vec<usize>,
    /// Include-graph distance from the source, parallel to `order` (direct includes: 1).
    pub depth: Vec<u32>,
    /// Back edges met (an include of a file that is still being expanded); each is ignored.
    pub cycles: u64,
}

/// The entry points of a header-only project: for each group of headers that include one
/// another (a strongly connected component of `edges`, i -> j when i includes j) that no
/// header outside the group includes, its first header. Without cycles these are the
/// headers no other header includes; a cycle at the top (a.h and b.h including each other)
/// gives one entry, where "included by no other" gave none and the project no unit.
/// Kosaraju's two passes, iterative.
pub fn entry_points(edges: &[Vec<usize>]) -> Vec<usize> {
    let n = edges.len();
    // pass 1: finishing order on the graph
    let mut seen = vec![false; n];
    let mut finish = Vec::with_capacity(n);
    for s in 0..n {
        if seen[s] {
            continue;
        }
        seen[s] = true;
        let mut stack = vec![(s, 0usize)];
        while let Some(top) = stack.last_mut() {
            let (v, i) = *top;
            if let Some(&w) = edges[v].get(i) {
                top.1 += 1;
                if w < n && !seen[w] {
                    seen[w] = true;
                    stack.push((w, 0));
                }
            } else {
                stack.pop();
                finish.push(v);
            }
        }
    }
    // pass 2: components on the reversed graph, in reverse finishing order
    let mut rev: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (v, ws) in edges.iter().enumerate() {
        for &w in ws.iter().filter(|&&w| w < n) {
            rev[w].push(v);
        }
    }
    let mut comp = vec![usize::MAX; n];
    let mut count = 0;
    for &s in finish.iter().rev() {
        if comp[s] != usize::MAX {
            continue;
        }
        comp[s] = count;
        let mut stack = vec![s];
        while let Some(v) = stack.pop() {
            for &u in &rev[v] {
                if comp[u] == usize::MAX {
                    comp[u] = count;
                    stack.push(u);
                }
            }
        }
        count += 1;
    }
    let mut entered = vec![false; count];
    let mut first = vec![usize::MAX; count];
    for (v, ws) in edges.iter().enumerate() {
        first[comp[v]] = first[comp[v]].min(v);
        for &w in ws.iter().filter(|&&w| w < n && comp[w] != comp[v]) {
            entered[comp[w]] = true;
        }
    }
    let mut out: Vec<usize> = (0..count).filter(|&c| !entered[c]).map(|c| first[c]).collect();
    out.sort_unstable();
    out
}

/// Depth-first post-order over `edges` (resolved includes per file, in directive order)
/// starting at `source`, with a visiting set to break cycles deterministically. The
/// source itself is not part of the order. Iterative: deep chains cannot overflow.
pub fn order_headers(source: usize, edges: &[Vec<usize>]) -> HeaderOrder {
    #[derive(Clone, Copy, PartialEq)]
    enum State {
        New,
        Visiting,
        Done,
    }
    let mut state: HashMap<usize, State> = HashMap::new();
    let mut order = Vec::new();
    let mut cycles = 0u64;
    let mut stack: Vec<(usize, usize)> = vec![(source, 0)];
    state.insert(source, State::Visiting);
    while let Some(top) = stack.last_mut() {
        let (node, next) = *top;
        let children = edges.get(node).map(Vec::as_slice).unwrap_or(&[]);
        if next < children.len() {
            top.1 += 1;
            let child = children[next];
            match state.get(&child).copied().unwrap_or(State::New) {
                State::Done => {}
                State::Visiting => cycles += 1,
                State::New => {
                    state.insert(child, State::Visiting);
                    stack.push((child, 0));
                }
            }
        } else {
            stack.pop();
            state.insert(node, State::Done);
            if node != source {
                order.push(node);
            }
        }
    }
    // Breadth-first distances from the source.
    let mut dist: HashMap<usize, u32> = HashMap::new();
    dist.insert(source, 0);
    let mut queue = VecDeque::from([source]);
    while let Some(n) = queue.pop_front() {
        let d = dist[&n];
        for &c in edges.get(n).map(Vec::as_slice).unwrap_or(&[]) {
            dist.entry(c).or_insert_with(|| {
                queue.push_back(c);
                d + 1
            });
        }
    }
    let depth = order.iter().map(|n| dist.get(n).copied().unwrap_or(u32::MAX)).collect();
    HeaderOrder { order, depth, cycles }
}

#[cfg(test)]
mod tests {

    #[test]
    fn root_name_prefix_resolves_installed_header_trees() {
        let mut idx = ProjectIndex::new(&["core.h", "details/os.h"]);
        let angle = |p: &str| Include { path: p.to_string(), kind: IncludeKind::Angle };
        assert_eq!(idx.resolve("x.h", &angle("fmt/core.h")), None);
        idx.root_name = Some("fmt".to_string());
        assert_eq!(idx.resolve("x.h", &angle("fmt/core.h")), Some(0));
        assert_eq!(idx.resolve("x.h", &angle("fmt/details/os.h")), Some(1));
        assert_eq!(idx.resolve("x.h", &angle("other/core.h")), None);
    }

    use super::*;

    fn q(p: &str) -> Include {
        Include { path: p.into(), kind: IncludeKind::Quoted }
    }

    #[test]
    fn a_skipped_file_that_the_search_reaches_first_resolves_to_none() {
        // src/a.cpp's "util.h" is src/util.h for the compiler; skipped (generated, say), the
        // include must not fall through to include/util.h, another file
        let mut idx = ProjectIndex::new(&["include/util.h", "src/a.cpp"]);
        assert_eq!(idx.resolve("src/a.cpp", &q("util.h")), Some(0));
        idx.skipped.insert("src/util.h".to_string());
        assert_eq!(idx.resolve("src/a.cpp", &q("util.h")), None);
        assert_eq!(idx.resolve("other/b.cpp", &q("util.h")), Some(0), "not reached from elsewhere");
        idx.skipped.insert("util.h".to_string()); // at the root, the first include directory
        assert_eq!(idx.resolve("other/b.cpp", &q("util.h")), None);
    }

    #[test]
    fn entry_points_are_the_top_components() {
        // 0 -> 1 -> 2, 3 alone: 0 and 3; 0 <-> 1 -> 2: the cycle's first, 0; 4 -> (5 <-> 6): 4 only
        assert_eq!(entry_points(&[vec![1], vec![2], vec![], vec![]]), vec![0, 3]);
        assert_eq!(entry_points(&[vec![1], vec![0, 2], vec![]]), vec![0]);
        assert_eq!(entry_points(&[vec![], vec![], vec![], vec![], vec![5], vec![6], vec![5]]), vec![0, 1, 2, 3, 4]);
        assert_eq!(entry_points(&[vec![1], vec![2], vec![0]]), vec![0]);
        assert_eq!(entry_points(&[]), Vec::<usize>::new());
    }

    #[test]
    fn extracts_directives() {
        let src = "#include \"a.h\"\n  #  include <vector>\n#include_next <x.h>\n#include MACRO\n\
                   // #include \"commented.h\" is still a line comment, so: \n\
                   /* start\n#include \"in_comment.h\"\n*/\n#include \"b\\c.h\" // trailing\n";
        let got = extract_includes(src);
        assert_eq!(got, vec![q("a.h"), Include { path: "vector".into(), kind: IncludeKind::Angle }, q("b/c.h"),]);
    }

    #[test]
    fn comment_openers_inside_literals_and_comments_before_a_directive() {
        let src = "const char* g = \"src/*.cpp\"; char c = '*'; char d = '/';\n#include \"x.h\"\n\
                   int n = 1'000; /* open\n#include \"hidden.h\"\n*/ #include \"y.h\"\n\
                   /* c */ #include \"z.h\"\nconst char* e = \"a\\\"/*\"; /* x */\n#include \"w.h\"\n\
                   /* a comment from the line's start\n#include \"hidden2.h\"\n*/ #include \"v.h\"\n";
        // (y.h: a comment is one space, so after `int n = 1'000;` its line goes on: no directive,
        // as the compiler sees it; v.h: only the comment before it on its logical line)
        assert_eq!(extract_includes(src), vec![q("x.h"), q("z.h"), q("w.h"), q("v.h")]);
    }

    #[test]
    fn normalizes() {
        assert_eq!(normalize_join("src/x", "../include/a.h").as_deref(), Some("src/include/a.h"));
        assert_eq!(normalize_join("", "./a.h").as_deref(), Some("a.h"));
        assert_eq!(normalize_join("", "../a.h"), None);
        assert_eq!(normalize_join("src", "/usr/include/a.h"), None);
    }

    #[test]
    fn resolution_order() {
        let idx = ProjectIndex::new(&["src/util.h", "include/util.h", "lib/include/lib.h", "src/main.cpp"]);
        assert_eq!(idx.include_dirs, vec!["", "include", "src", "lib/include"]);
        // Quoted: the including file's directory wins.
        assert_eq!(idx.resolve("src/main.cpp", &q("util.h")), Some(0));
        // Angle: include dirs only, `include/` before `src/`.
        let angle = |p: &str| Include { path: p.into(), kind: IncludeKind::Angle };
        assert_eq!(idx.resolve("src/main.cpp", &angle("util.h")), Some(1));
        assert_eq!(idx.resolve("src/main.cpp", &angle("lib.h")), Some(2));
        assert_eq!(idx.resolve("src/main.cpp", &angle("vector")), None);
    }

    #[test]
    fn dependency_order_and_cycles() {
        // 0 = main.cpp -> 1 = a.h -> 2 = b.h ; main also includes b.h
        let edges = vec![vec![1, 2], vec![2], vec![]];
        let o = order_headers(0, &edges);
        assert_eq!(o.order, vec![2, 1]);
        assert_eq!(o.depth, vec![1, 1]);
        assert_eq!(o.cycles, 0);
        // a.h <-> b.h
        let edges = vec![vec![1], vec![2], vec![1]];
        let o = order_headers(0, &edges);
        assert_eq!(o.order, vec![2, 1]);
        assert_eq!(o.depth, vec![2, 1]);
        assert_eq!(o.cycles, 1);
    }

    #[test]
    fn long_chain_is_iterative() {
        let n = 200_000;
        let edges: Vec<Vec<usize>> = (0..n).map(|i| if i + 1 < n { vec![i + 1] } else { vec![] }).collect();
        let o = order_headers(0, &edges);
        assert_eq!(o.order.len(), n - 1);
        assert_eq!(o.order[0], n - 1);
    }
}
