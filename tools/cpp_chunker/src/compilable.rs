//! The `compilable` and `project` modes.
//!
//! **compilable**: one translation unit (a source file and the project headers it
//! includes, chosen as in `crossfile`) rewritten into the order a compiler reads top to
//! bottom, as one piece of code without file boundaries:
//!
//! 1. preamble: `#include` lines of files outside the unit (each once), macros and other
//!    directives, using-declarations, forward declarations, in source order;
//! 2. type-level declarations (classes, enums, aliases, variables, prototypes, ...) in
//!    topological order of their dependencies: an entity comes after the entities that
//!    define the names it uses (a base class before the derived, a member's type before
//!    the holder);
//! 3. function definitions bottom-up over the call graph: a callee before its callers.
//!
//! All three are one topological sort over "uses a name defined by" edges in which,
//! among the entities whose dependencies are all placed, the one with the lowest
//! (section, source position) goes next. So sections stay in this order unless a
//! dependency forces otherwise (a type whose member calls a `constexpr` function gets
//! that function first). When every remaining entity waits on another, there is a cycle
//! (recursion, two classes that point at each other): the earliest remaining entity in
//! that order is placed anyway, which keeps the cycle's source order (the order the
//! original compiled in), and the break is counted (`type_cycles_broken`,
//! `call_cycles_broken`). Namespaces and `extern "C"` blocks are re-opened around their
//! entities. Names, not C++ lookup, decide dependencies (see [`crate::entities`]). A unit
//! with a directive whose meaning depends on its place (an `#undef`, `#pragma pack`, ...:
//! `position_sensitive`) keeps its source order instead (`source_order_units`).
//!
//! **project**: a `crossfile` document plus, before the source, the definitions its code
//! uses that live in other files of the project (not in the included headers), looked
//! up in a project-wide symbol index by name, in order of first use, within the budget.

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, HashSet};

use crate::docs::{part_text, split_into_documents, Document, FILE_MARKER};
use crate::entities::{wrapper_lines, Entity, Kind};
use crate::includes::{extract_includes, ProjectIndex};
use crate::load::SourceFile;
use crate::stats::Stats;

/// The compilable order of `es` (indices), and the cycle breaks it needed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ordering {
    pub order: Vec<usize>,
    pub type_cycles_broken: u64,
    pub call_cycles_broken: u64,
}

fn namespace_names(wrapper: &str) -> impl Iterator<Item = &str> {
    let name = if wrapper.starts_with("namespace") || wrapper.starts_with("inline") {
        wrapper.split_whitespace().last().filter(|w| *w != "namespace").unwrap_or("")
    } else {
        ""
    };
    name.split("::").filter(|s| !s.is_empty())
}

pub fn order(es: &[&Entity]) -> Ordering {
    let n = es.len();
    let mut definers: HashMap<&str, Vec<usize>> = HashMap::new();
    let mut first_in_namespace: HashMap<&str, usize> = HashMap::new();
    for (i, e) in es.iter().enumerate() {
        if matches!(e.kind, Kind::Decl | Kind::Prototype | Kind::Function) {
            for d in &e.defines {
                definers.entry(d.as_str()).or_default().push(i);
            }
        }
        for w in &e.wrappers {
            for name in namespace_names(w) {
                first_in_namespace.entry(name).or_insert(i);
            }
        }
    }
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut waiting = vec![0usize; n];
    for (i, e) in es.iter().enumerate() {
        // macros and includes are textual and forward declarations need nothing: no dependencies
        if !matches!(e.kind, Kind::Decl | Kind::Prototype | Kind::Function | Kind::Using) {
            continue;
        }
        let mut deps: Vec<usize> = Vec::new();
        for u in &e.uses {
            if let Some(ds) = definers.get(u.as_str()) {
                deps.extend(ds.iter().copied().filter(|&j| j != i));
            }
            if e.kind == Kind::Using {
                deps.extend(first_in_namespace.get(u.as_str()).copied().filter(|&j| j != i));
            }
        }
        deps.sort_unstable();
        deps.dedup();
        waiting[i] = deps.len();
        for j in deps {
            dependents[j].push(i);
        }
    }
    let key = |i: usize| (es[i].kind.rank(), i);
    let mut remaining: BTreeSet<(u8, usize)> = (0..n).map(key).collect();
    let mut ready: BinaryHeap<Reverse<(u8, usize)>> =
        (0..n).filter(|&i| waiting[i] == 0).map(|i| Reverse(key(i))).collect();
    let mut out = Ordering { order: Vec::with_capacity(n), type_cycles_broken: 0, call_cycles_broken: 0 };
    while let Some(&first) = remaining.iter().next() {
        let next = match ready.pop() {
            Some(Reverse(k)) if remaining.contains(&k) => k,
            Some(_) => continue, // placed earlier by a cycle break
            None => {
                if first.0 == 2 {
                    out.call_cycles_broken += 1;
                } else {
                    out.type_cycles_broken += 1;
                }
                first
            }
        };
        remaining.remove(&next);
        out.order.push(next.1);
        for &d in &dependents[next.1] {
            waiting[d] -= 1;
            if waiting[d] == 0 && remaining.contains(&key(d)) {
                ready.push(Reverse(key(d)));
            }
        }
    }
    out
}

/// The entities in `order`, each inside its namespaces / `extern "C"` blocks / namespace
/// macros (opened and closed as needed), a blank line between sections.
pub fn render(es: &[&Entity], order: &[usize]) -> String {
    let mut out = String::new();
    let mut open: Vec<&str> = Vec::new();
    let mut last_rank = None;
    for &i in order {
        let e = es[i];
        let common = open.iter().zip(&e.wrappers).take_while(|(a, b)| **a == b.as_str()).count();
        while open.len() > common {
            close(&mut out, open.pop().expect("non-empty"));
        }
        if last_rank.is_some_and(|r| r != e.kind.rank()) {
            out.push('\n');
        }
        for w in &e.wrappers[common..] {
            out.push_str(&wrapper_lines(w).0);
            out.push('\n');
            open.push(w);
        }
        out.push_str(e.text.trim_end());
        out.push('\n');
        last_rank = Some(e.kind.rank());
    }
    while let Some(w) = open.pop() {
        close(&mut out, w);
    }
    out
}

fn close(out: &mut String, wrapper: &str) {
    out.push_str(&wrapper_lines(wrapper).1);
    out.push('\n');
}

/// The entities of a unit (`unit`: file indices, headers first, source last) for the
/// compilable order: `#include`s of files inside the unit are dropped (their code is
/// there), also inside `#if` blocks, whose text is then edited; other `#include`s are
/// kept once, those of project files rewritten as `#include "<root-relative path>"`
/// (inside `#if` blocks too).
fn unit_entities<'e>(
    files: &[SourceFile],
    ents: &'e [Vec<Entity>],
    index: &ProjectIndex,
    unit: &[usize],
) -> Vec<Cow<'e, Entity>> {
    let members: HashSet<usize> = unit.iter().copied().collect();
    let inside = |f: usize, line: &str| {
        extract_includes(line)
            .first()
            .and_then(|inc| index.resolve(&files[f].rel, inc))
            .is_some_and(|t| members.contains(&t))
    };
    let mut seen_includes: HashSet<&str> = HashSet::new();
    let mut out = Vec::new();
    for &f in unit {
        for e in &ents[f] {
            if e.kind == Kind::Include && (inside(f, &e.text) || !seen_includes.insert(e.text.trim())) {
                continue; // its code is in the unit, or it is kept once
            }
            // a project header kept as an include (alone, or inside an `#if` block, `#    include` too):
            // written relative to its includer's directory it would not be found from the unit, so it
            // is named from the root; includes of unit files inside `#if` blocks are dropped
            if e.text.contains("include") {
                if let Some(text) = rewrite_includes(&e.text, &files[f].rel, files, index, &members) {
                    let mut edited = e.clone();
                    edited.text = text;
                    out.push(Cow::Owned(edited));
                    continue;
                }
            }
            out.push(Cow::Borrowed(e));
        }
    }
    out
}

/// `text` (of file `from`) with its `#include` directives of project files edited: those of
/// `members` (files in the unit) dropped, the others named from the root; `None` if nothing
/// changed. Only the lines that start a real directive: an `#include` line inside a raw
/// string or a comment (an entity's leading comments too) is the code's text, left as written.
fn rewrite_includes(
    text: &str,
    from: &str,
    files: &[SourceFile],
    index: &ProjectIndex,
    members: &HashSet<usize>,
) -> Option<String> {
    let starts = include_starts(text);
    let mut out = String::with_capacity(text.len());
    let mut changed = false;
    let mut at = 0;
    for l in text.split_inclusive('\n') {
        let directive = starts.iter().any(|&s| s >= at && s < at + l.len());
        at += l.len();
        let target =
            if directive { extract_includes(l).first().and_then(|inc| index.resolve(from, inc)) } else { None };
        match target {
            Some(t) if members.contains(&t) => changed = true,
            Some(t) => {
                let line = format!("#include \"{}\"{}", files[t].rel, if l.ends_with('\n') { "\n" } else { "" });
                changed |= line != l;
                out.push_str(&line);
            }
            None => out.push_str(l),
        }
    }
    changed.then_some(out)
}

/// The headers to inline, from those `select_headers` kept: a header left out stays an
/// `#include` line, and what it includes comes with it, so the headers it reaches are
/// left out too (inlining them as well would define their contents twice).
pub fn inlinable_headers(kept: &[usize], edges: &[Vec<usize>], source: usize) -> Vec<usize> {
    let all = crate::includes::order_headers(source, edges).order;
    let kept_set: HashSet<usize> = kept.iter().copied().collect();
    let mut reached: HashSet<usize> = HashSet::new();
    let mut stack: Vec<usize> = all.iter().copied().filter(|h| !kept_set.contains(h)).collect();
    while let Some(h) = stack.pop() {
        if reached.insert(h) {
            stack.extend(edges[h].iter().copied().filter(|&c| c != source));
        }
    }
    kept.iter().copied().filter(|h| !reached.contains(h)).collect()
}

/// A directive whose meaning depends on where it stands among the code: `#undef` (a macro
/// defined, used, then undefined), and the pragmas that bracket code (`pack`,
/// `push_macro` / `pop_macro`, GCC / clang diagnostics, MSVC `warning`). The preamble would
/// hoist it away from what it brackets (`#pragma pack(push, 1)` ... `(pop)` both above the
/// struct, which then loses its packing), so a unit with one keeps its source order.
fn position_sensitive(e: &Entity) -> bool {
    // any entity: a directive alone, or inside an `#if` group (`#ifdef min #undef min #endif`);
    // the scan skips comments (an entity's text starts with its leading comments)
    if !(e.text.contains("undef") || e.text.contains("pragma")) {
        return false;
    }
    crate::pp::scan(&e.text).directives.iter().any(|d| {
        let words: Vec<&str> =
            d.args.split(|c: char| c.is_whitespace() || c == '(').filter(|w| !w.is_empty()).take(2).collect();
        match d.name.as_str() {
            "undef" => true,
            "pragma" => matches!(
                words.as_slice(),
                ["pack" | "push_macro" | "pop_macro" | "warning", ..] | ["GCC" | "clang", "diagnostic"]
            ),
            _ => false,
        }
    })
}

/// Where the `#include` directives of `text` start (byte offsets of their `#`): real ones
/// only, not lines inside comments, strings or raw strings.
fn include_starts(text: &str) -> Vec<usize> {
    crate::pp::scan(text).directives.iter().filter(|d| d.name == "include").map(|d| d.range.start).collect()
}

/// `compilable` documents for the unit `headers` + `source` (split at syntax boundaries
/// if over budget).
#[allow(clippy::too_many_arguments)]
pub fn compilable_documents(
    project: &str,
    files: &[SourceFile],
    ents: &[Vec<Entity>],
    index: &ProjectIndex,
    headers: &[usize],
    source: usize,
    budget: usize,
    stats: &mut Stats,
) -> Vec<Document> {
    let unit: Vec<usize> = headers.iter().copied().chain([source]).collect();
    let names: Vec<String> = unit.iter().map(|&f| files[f].rel.clone()).collect();
    stats.compilable_units += 1;
    let owned = unit_entities(files, ents, index, &unit);
    let es: Vec<&Entity> = owned.iter().map(|c| c.as_ref()).collect();
    if es.iter().any(|e| position_sensitive(e)) {
        // as written (headers first, then the source); over the budget the source alone, its
        // project headers back to `#include` lines, cut by the splitter
        stats.source_order_units += 1;
        let text = render(&es, &(0..es.len()).collect::<Vec<_>>());
        if text.len() <= budget {
            return balanced_only(vec![Document::new(text, project, names, "compilable")], stats);
        }
        let owned = unit_entities(files, ents, index, &[source]);
        let es: Vec<&Entity> = owned.iter().map(|c| c.as_ref()).collect();
        let text = render(&es, &(0..es.len()).collect::<Vec<_>>());
        let docs = split_into_documents(text, project, vec![files[source].rel.clone()], "compilable", budget, stats);
        return balanced_only(docs, stats);
    }
    let ord = order(&es);
    let text = render(&es, &ord.order);
    if text.len() <= budget {
        stats.type_cycles_broken += ord.type_cycles_broken;
        stats.call_cycles_broken += ord.call_cycles_broken;
        return balanced_only(vec![Document::new(text, project, names, "compilable")], stats);
    }
    // Over budget: the source alone, its project headers back to `#include` lines, cut
    // between entities into pieces that each start with the same preamble (includes,
    // macros, usings, forward declarations), so every piece sees what it includes.
    let owned = unit_entities(files, ents, index, &[source]);
    let es: Vec<&Entity> = owned.iter().map(|c| c.as_ref()).collect();
    let ord = order(&es);
    stats.type_cycles_broken += ord.type_cycles_broken;
    stats.call_cycles_broken += ord.call_cycles_broken;
    let preamble: Vec<usize> = ord.order.iter().copied().filter(|&i| es[i].kind.rank() == 0).collect();
    let base = render(&es, &preamble).len();
    let mut pieces: Vec<Vec<usize>> = Vec::new();
    let mut cur = preamble.clone();
    let mut len = base;
    for &i in ord.order.iter().filter(|&&i| es[i].kind.rank() > 0) {
        // its text, its newline, the blank line render puts where the rank changes (counted for
        // every entity: an estimate over, never under; under it, a piece a byte or two over the
        // budget was cut again by the splitter, its later parts without the preamble)
        let cost = es[i].text.len() + 2 + es[i].wrappers.iter().map(|w| 2 * w.len() + 10).sum::<usize>();
        if cur.len() > preamble.len() && len + cost > budget {
            pieces.push(std::mem::replace(&mut cur, preamble.clone()));
            len = base;
        }
        cur.push(i);
        len += cost;
    }
    if cur.len() > preamble.len() || pieces.is_empty() {
        pieces.push(cur);
    }
    stats.documents_split += 1;
    let source_name = vec![files[source].rel.clone()];
    let mut out = Vec::new();
    for piece in pieces {
        let docs = split_into_documents(render(&es, &piece), project, source_name.clone(), "compilable", budget, stats);
        stats.pieces_from_splits += docs.len() as u64;
        out.extend(docs);
    }
    balanced_only(out, stats)
}

/// The documents whose conditionals and braces balance; the others are counted and left
/// out. Entities are balanced and `render` closes what it opens, so only the splitter's
/// cuts through one over-budget entity (or a file that is unbalanced as written) land here.
fn balanced_only(docs: Vec<Document>, stats: &mut Stats) -> Vec<Document> {
    let n = docs.len();
    let out: Vec<Document> = docs.into_iter().filter(|d| crate::pp::balanced(&d.text)).collect();
    stats.unbalanced_documents_dropped += (n - out.len()) as u64;
    out
}

/// Project-wide symbol index: name -> (file, entity) of its definitions (types,
/// variables, functions; not macros, prototypes or forward declarations), in file order.
pub struct SymbolIndex {
    by_name: HashMap<String, Vec<(usize, usize)>>,
}

impl SymbolIndex {
    pub fn new(ents: &[Vec<Entity>]) -> SymbolIndex {
        let mut by_name: HashMap<String, Vec<(usize, usize)>> = HashMap::new();
        for (f, es) in ents.iter().enumerate() {
            for (k, e) in es.iter().enumerate() {
                if matches!(e.kind, Kind::Decl | Kind::Function) {
                    for d in &e.defines {
                        by_name.entry(d.clone()).or_default().push((f, k));
                    }
                }
            }
        }
        SymbolIndex { by_name }
    }

    pub fn get(&self, name: &str) -> &[(usize, usize)] {
        self.by_name.get(name).map(Vec::as_slice).unwrap_or(&[])
    }
}

/// The line that starts the definitions pulled from one file.
fn pulled_marker(rel: &str) -> String {
    format!("{FILE_MARKER}{rel} (definitions used below)\n")
}

/// `project` document(s): the `crossfile` text (`headers` then `source`) with, before
/// the source, the definitions from other project files of names the source uses and
/// the unit does not define. A definition is preferred from a source file (it has the
/// body); one per name; pulled in order of first use while they fit `budget`.
#[allow(clippy::too_many_arguments)]
pub fn project_documents(
    project: &str,
    files: &[SourceFile],
    ents: &[Vec<Entity>],
    symbols: &SymbolIndex,
    headers: &[usize],
    source: usize,
    budget: usize,
    stats: &mut Stats,
) -> Vec<Document> {
    let unit: HashSet<usize> = headers.iter().copied().chain([source]).collect();
    // names the unit defines (a prototype declares, it does not define: its body is wanted)
    let defined: HashSet<&str> = unit
        .iter()
        .flat_map(|&f| {
            ents[f].iter().filter(|e| e.kind != Kind::Prototype).flat_map(|e| e.defines.iter().map(String::as_str))
        })
        .collect();
    let head: String = headers.iter().map(|&h| part_text(&files[h].rel, &files[h].text)).collect();
    let src_part = part_text(&files[source].rel, &files[source].text);
    let mut room = budget.saturating_sub(head.len() + src_part.len());
    let mut pulled: Vec<(usize, usize)> = Vec::new();
    let mut taken: HashSet<(usize, usize)> = HashSet::new();
    let mut asked: HashSet<&str> = HashSet::new();
    for e in &ents[source] {
        for u in &e.uses {
            if defined.contains(u.as_str()) || !asked.insert(u.as_str()) {
                continue;
            }
            let outside = symbols.get(u).iter().filter(|(f, _)| !unit.contains(f));
            let best = outside.min_by_key(|(f, k)| (files[*f].kind != crate::discover::FileKind::Source, *f, *k));
            let Some(&(f, k)) = best else { continue };
            // what render() will write for it, counted as an upper bound so the document stays
            // within the budget (an underestimate made split() cut ~1 in 4 project documents
            // a few hundred bytes over, re-parsing each and leaving tiny tail pieces): the text
            // plus a newline and a blank line, the opening and closing lines of each enclosing
            // namespace (`w {` and `}  // w`; neighbours may share them), and the marker line
            // of a file not pulled from before
            let e = &ents[f][k];
            let wrappers: usize = e.wrappers.iter().map(|w| 2 * w.len() + 10).sum();
            let marker = if pulled.iter().any(|(pf, _)| *pf == f) { 0 } else { pulled_marker(&files[f].rel).len() };
            let cost = e.text.len() + 2 + wrappers + marker;
            if taken.contains(&(f, k)) {
                continue;
            }
            if cost > room {
                stats.definitions_dropped_for_budget += 1;
                continue;
            }
            room -= cost;
            taken.insert((f, k));
            pulled.push((f, k));
        }
    }
    stats.definitions_pulled += pulled.len() as u64;
    // grouped by file, in file order; within a file, in source order
    pulled.sort_unstable();
    let mut text = head;
    let mut names: Vec<String> = headers.iter().map(|&h| files[h].rel.clone()).collect();
    let mut i = 0;
    while i < pulled.len() {
        let f = pulled[i].0;
        let group: Vec<&Entity> = pulled[i..].iter().take_while(|(g, _)| *g == f).map(|&(_, k)| &ents[f][k]).collect();
        i += group.len();
        let order: Vec<usize> = (0..group.len()).collect();
        text.push_str(&pulled_marker(&files[f].rel));
        text.push_str(&render(&group, &order));
        names.push(files[f].rel.clone());
    }
    text.push_str(&src_part);
    names.push(files[source].rel.clone());
    split_into_documents(text, project, names, "project", budget, stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entities::extract;

    fn ordered(src: &str) -> (String, Ordering) {
        let es = extract(src).unwrap();
        let refs: Vec<&Entity> = es.iter().collect();
        let o = order(&refs);
        (render(&refs, &o.order), o)
    }

    fn pos(text: &str, needle: &str) -> usize {
        text.find(needle).unwrap_or_else(|| panic!("{needle:?} not in:\n{text}"))
    }

    #[test]
    fn base_before_derived_member_type_before_holder() {
        let (t, o) = ordered(
            "struct Holder { Member m; };\nstruct Derived : Base { int x; };\nstruct Member { int y; };\nstruct Base { int z; };\n",
        );
        assert!(pos(&t, "struct Base") < pos(&t, "struct Derived"));
        assert!(pos(&t, "struct Member") < pos(&t, "struct Holder"));
        assert_eq!((o.type_cycles_broken, o.call_cycles_broken), (0, 0));
    }

    #[test]
    fn sections_and_callees_first() {
        let (t, _) = ordered(
            "int top() { return mid() + 1; }\nint mid() { return leaf(); }\n#include <vector>\nstruct S { int a; };\n\
             int leaf() { return 1; }\nclass F;\n#define K 3\n",
        );
        let order: Vec<usize> =
            ["#include <vector>", "class F;", "#define K", "struct S", "int leaf", "int mid", "int top"]
                .iter()
                .map(|n| pos(&t, n))
                .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{t}");
    }

    #[test]
    fn cycles_are_broken_in_source_order_and_counted() {
        let (t, o) = ordered(
            "int even(int n) { return n == 0 || odd(n - 1); }\nint odd(int n) { return n != 0 && even(n - 1); }\n",
        );
        assert!(pos(&t, "int even") < pos(&t, "int odd"));
        assert_eq!(o.call_cycles_broken, 1);
        let (_, o) = ordered("struct A { B* b; };\nstruct B { A* a; };\n");
        assert_eq!(o.type_cycles_broken, 1);
    }

    #[test]
    fn a_type_that_needs_a_function_gets_it_first() {
        let (t, _) = ordered("struct S { int a[size()]; };\nconstexpr int size() { return 4; }\n");
        assert!(pos(&t, "constexpr int size") < pos(&t, "struct S"), "{t}");
    }

    #[test]
    fn namespaces_are_reopened() {
        let (t, _) = ordered(
            "namespace a {\nvoid f() { g(); }\n}\nnamespace b {\nstruct T {};\n}\nnamespace a {\nvoid g() {}\n}\n",
        );
        assert_eq!(
            t,
            "namespace b {\nstruct T {};\n}  // namespace b\n\nnamespace a {\nvoid g() {}\nvoid f() { g(); }\n}  // namespace a\n"
        );
    }

    #[test]
    fn a_header_left_out_takes_what_it_includes_along() {
        // source 0 includes 1 and 2; 2 includes 3; 2 was dropped for the budget
        let edges = vec![vec![1, 2], vec![], vec![3], vec![]];
        assert_eq!(inlinable_headers(&[1, 3], &edges, 0), vec![1]);
        assert_eq!(inlinable_headers(&[3, 2, 1], &edges, 0), vec![3, 2, 1]);
    }

    #[test]
    fn errors_keep_their_neighbours() {
        // tree-sitter cannot expand LOCKS_EXCLUDED: the body must stay with its signature
        let src = "void a() { b(); }\nvoid f(int x) LOCKS_EXCLUDED(mu) { a(); }\nvoid b() {}\n";
        let es = extract(src).unwrap();
        assert!(es.iter().any(|e| e.text.contains("void f(int x) LOCKS_EXCLUDED(mu) { a(); }")), "{es:#?}");
        let (t, _) = ordered(src);
        assert!(t.contains("LOCKS_EXCLUDED(mu) { a(); }"), "{t}");
    }

    #[test]
    fn specialization_declarations_follow_the_primary() {
        let (t, _) = ordered("template <class T> class V<T&>;\ntemplate <class T> class V { T t; };\n");
        assert!(pos(&t, "class V {") < pos(&t, "class V<T&>;"), "{t}");
    }

    #[test]
    fn namespace_macros_are_reopened_as_written() {
        let (t, _) = ordered(
            "#define LIB_INLINE_BEGIN inline namespace v2 {\n#define LIB_INLINE_END }\nnamespace lib {\nLIB_INLINE_BEGIN\n\
             int top() { return leaf(); }\nint leaf() { return 1; }\nLIB_INLINE_END  // v2\n}  // namespace lib\n",
        );
        assert_eq!(
            t,
            "#define LIB_INLINE_BEGIN inline namespace v2 {\n#define LIB_INLINE_END }\n\nnamespace lib {\nLIB_INLINE_BEGIN\n\
             int leaf() { return 1; }\nint top() { return leaf(); }\nLIB_INLINE_END\n}  // namespace lib\n"
        );
    }

    #[test]
    fn rewrite_includes_edits_directive_lines_only_with_any_line_endings() {
        // src/a.cpp's "b.h" is src/b.h: named from the root; its unit member "m.h" dropped; the
        // commented-out include and the CRLF comment lines before the directive left as written
        let files: Vec<SourceFile> = ["src/a.cpp", "src/b.h", "src/m.h"]
            .iter()
            .map(|r| {
                let kind = crate::discover::FileKind::Header;
                SourceFile { rel: r.to_string(), kind, text: String::new(), raw_len: 0, lossy: false }
            })
            .collect();
        let index = ProjectIndex::new(&["src/a.cpp", "src/b.h", "src/m.h"]);
        let members: HashSet<usize> = [0, 2].into_iter().collect();
        let text =
            "// one\r\n// two: #include \"b.h\"\r\n/*\r\n#include \"b.h\"\r\n*/\r\n#include \"b.h\"\r\n#include \"m.h\"";
        assert_eq!(
            rewrite_includes(text, "src/a.cpp", &files, &index, &members).unwrap(),
            "// one\r\n// two: #include \"b.h\"\r\n/*\r\n#include \"b.h\"\r\n*/\r\n#include \"src/b.h\"\n"
        );
        assert_eq!(rewrite_includes("int x;\n", "src/a.cpp", &files, &index, &members), None);
    }

    #[test]
    fn position_sensitive_directives_are_found_behind_comments_and_inside_if_groups() {
        let sensitive = |src: &str| extract(src).unwrap().iter().any(position_sensitive);
        assert!(sensitive("// restore the packing\n#pragma pack(pop)\n"));
        assert!(sensitive("/* done */ #undef X\n"));
        assert!(sensitive("#ifdef min\n#undef min\n#endif\n"));
        assert!(sensitive("#ifdef _MSC_VER\n#pragma warning(push)\n#endif\nint x;\n"));
        assert!(sensitive("#pragma GCC diagnostic push\n"));
        assert!(!sensitive("#define X 1\n#pragma once\nvoid f() {\n#pragma omp parallel for\n  for (;;) {}\n}\n"));
        assert!(!sensitive("// #undef X in a comment\nconst char* s = \"#undef X\";\n"));
    }

    #[test]
    fn using_directive_waits_for_its_namespace() {
        let (t, _) = ordered("using namespace lib;\nnamespace lib { struct X {}; }\n");
        assert!(pos(&t, "struct X") < pos(&t, "using namespace lib"), "{t}");
    }
}
