//! Top-level entities of a C/C++ file, for the `compilable` and `project` modes.
//!
//! A file is cut into the pieces a translation unit is made of: `#include` lines, macros
//! and other directives, using-declarations and -directives, forward declarations,
//! type-level declarations (classes, structs, unions, enums, aliases, typedefs,
//! variables, function prototypes, static_asserts, conditional `#if` blocks, anything
//! unrecognized) and function definitions. Namespaces and `extern "C" { }` blocks are
//! not entities: each entity records them as its *wrappers*, so entities can be
//! reordered and wrapped again. So are the lines of macros that open and close namespaces
//! (`FMT_BEGIN_NAMESPACE` ... `FMT_END_NAMESPACE`, known from the project's `#define`s, see
//! [`pp::NamespaceMacros`]). Include guards are looked through; comments stay with the
//! entity that follows them.
//!
//! Each entity lists the names it defines and the names it uses (identifiers, type and
//! namespace names, and called member names). Dependencies are computed from names
//! alone, without C++ name lookup: a simplification that can see a dependency where
//! there is none (two things of the same name), which only costs ordering freedom.

use std::collections::{HashMap, HashSet};
use std::ops::Range;

use tree_sitter::Node;

use crate::cpp::{for_each_node, parse};
use crate::pp;

/// Namespaces nested deeper than this are kept whole, as one entity (bounds recursion).
const MAX_WRAPPER_DEPTH: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Include,
    /// `#define`, `#undef`, `#pragma`, ...
    Directive,
    /// `using namespace x;` and `using x::y;`.
    Using,
    /// `class X;`, `template <class T> struct Y;`, `enum class E : int;`.
    ForwardDecl,
    /// Types, aliases, variables, static_asserts, `#if` blocks, the rest.
    Decl,
    /// A function declared without its body: `int f(int);`.
    Prototype,
    Function,
}

impl Kind {
    /// Where the compilable order puts it: preamble (0), declarations (1), functions (2).
    pub fn rank(self) -> u8 {
        match self {
            Kind::Include | Kind::Directive | Kind::Using | Kind::ForwardDecl => 0,
            Kind::Decl | Kind::Prototype => 1,
            Kind::Function => 2,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entity {
    pub kind: Kind,
    /// Enclosing `namespace a`, `inline namespace v1`, `extern "C"` headers, outermost
    /// first; a namespace macro is its opening and closing lines, `"OPEN\nCLOSE"` (see
    /// [`wrapper_lines`]).
    pub wrappers: Vec<String>,
    /// Source text, leading comments included, trailing `;` included.
    pub text: String,
    /// Names this entity defines (types, enumerators, functions, variables, macros).
    pub defines: Vec<String>,
    /// Names it uses, in order of first use, its own definitions left out.
    pub uses: Vec<String>,
    /// Where its code (not its leading comments) starts and ends in the file (`text`
    /// ends with the code), and whether tree-sitter found a syntax error in it (used to
    /// glue entities around errors and to keep conditional groups whole).
    pub start: usize,
    pub end: usize,
    pub error: bool,
}

/// The lines that open and close a wrapper: `namespace a {` and `}  // namespace a`, or
/// a namespace macro's two lines.
pub fn wrapper_lines(w: &str) -> (String, String) {
    match w.split_once('\n') {
        Some((open, close)) => (open.to_string(), close.to_string()),
        None => (format!("{w} {{"), format!("}}  // {w}")),
    }
}

/// The entities of `text` in source order (namespace macros known from its own
/// `#define`s); `None` if it cannot be parsed.
pub fn extract(text: &str) -> Option<Vec<Entity>> {
    let scan = pp::scan(text);
    let mut macros = pp::NamespaceMacros::default();
    macros.add(&scan);
    extract_checked(text, scan, &macros).map(|(es, _)| es)
}

/// The entities of `text` (`scan`: its [`pp::scan`]; `macros`: the project's namespace
/// macros), and whether the file had to be kept whole (one entity).
///
/// The preprocessor structure is taken from a text scan ([`crate::pp`]), not from the
/// tree: an include guard (or `#pragma once`) is blanked out before parsing, so it is
/// looked through whatever tree-sitter makes of the code inside; then every conditional
/// group (`#if` ... `#endif`) must lie inside one entity, and entities that share a group
/// are merged. When that cannot be done cleanly (entities of one group in different
/// namespaces, or an entity whose own text does not balance its conditionals and braces,
/// where tree-sitter left an `#endif` or `}` outside every node), the file becomes one
/// entity, its text as written, guard removed: kept whole rather than broken.
pub fn extract_checked(text: &str, scan: pp::Scan, macros: &pp::NamespaceMacros) -> Option<(Vec<Entity>, bool)> {
    let guard = pp::guard_lines(text, &scan);
    let blanked;
    let (src, scan) = if guard.is_empty() {
        (text, scan)
    } else {
        blanked = pp::blank(text, &guard);
        (blanked.as_str(), pp::scan(&blanked))
    };
    // tree-sitter reads `class LOCKABLE Mutex {` as a class named LOCKABLE: it parses a
    // copy with such macros blanked (offsets kept); the texts are then taken back from `src`
    let unmacroed = blank_class_macros(src);
    // and namespace macros written as `namespace{` and `}`, their lines kept as wrappers
    let (ns_blanked, macro_wrappers) = blank_namespace_macros(unmacroed.as_deref().unwrap_or(src), macros);
    let psrc = ns_blanked.as_deref().or(unmacroed.as_deref()).unwrap_or(src);
    let tree = parse(psrc)?;
    let root = tree.root_node();
    let mut c = Collector {
        src: psrc,
        out: Vec::new(),
        wrappers: Vec::new(),
        pending: Vec::new(),
        macro_wrappers: &macro_wrappers,
    };
    c.children(root);
    let es = glue_errors(c.out, psrc);
    let groups = pp::top_groups(&scan, src.len());
    let (mut es, whole) = match keep_groups_whole(es, psrc, &groups) {
        Some(es) if es.iter().all(|e| pp::balanced(&e.text)) => (es, false),
        _ => (vec![whole_file(root, psrc)], true),
    };
    if unmacroed.is_some() || ns_blanked.is_some() {
        for e in &mut es {
            restore_text(e, psrc, src);
        }
    }
    if !guard.is_empty() {
        for e in &mut es {
            drop_guard_lines(e, src, &guard);
        }
    }
    Some((es, whole))
}

/// `src` with annotation macros between a class key and the class name blanked:
/// `class|struct|union MACRO[(args)] Name` followed by `{`, `:` or `final`, where MACRO is
/// all capitals, digits and `_` (LOCKABLE, LEVELDB_EXPORT, GTEST_API_); `None` if none.
fn blank_class_macros(src: &str) -> Option<String> {
    let b = src.as_bytes();
    let ident = |i: usize| {
        let mut j = i;
        while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
            j += 1;
        }
        j
    };
    let ws = |mut i: usize| {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    let mut out: Option<Vec<u8>> = None;
    let mut i = 0;
    while i < b.len() {
        if !(b[i].is_ascii_alphabetic() || b[i] == b'_')
            || (i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_'))
        {
            i += 1;
            continue;
        }
        let e = ident(i);
        if matches!(&src[i..e], "class" | "struct" | "union") {
            let m = ws(e);
            let me = ident(m);
            let macro_like = me - m >= 3
                && b[m..me].iter().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == b'_')
                && b[m].is_ascii_uppercase();
            if macro_like && m > e {
                let mut k = me;
                if k < b.len() && b[k] == b'(' {
                    k = src[k..].find(')').map_or(b.len(), |p| k + p + 1);
                }
                let n = ws(k);
                let ne = ident(n);
                let after = ws(ne);
                let follows = after < b.len()
                    && (b[after] == b'{' || b[after] == b':' && b.get(after + 1) != Some(&b':'))
                    || src[after..].starts_with("final");
                if ne > n && n > k && follows && !b[n].is_ascii_digit() {
                    let o = out.get_or_insert_with(|| b.to_vec());
                    for x in &mut o[m..k] {
                        if *x != b'\n' {
                            *x = b' ';
                        }
                    }
                }
            }
        }
        i = e.max(i + 1);
    }
    out.map(|o| String::from_utf8(o).expect("only ASCII was blanked"))
}

/// The lines of `src` that use a namespace macro of `macros` (the macro name alone, a
/// `//` comment may follow), openers paired with closers like braces, rewritten in a copy
/// for the parse: the opener as `namespace{` (so its name and the spaces after it need 10
/// bytes, which every such macro seen so far has), the closer as `}`, offsets kept. Also
/// the wrapper (`"OPEN\nCLOSE"`) of each rewritten opener, by its offset. `None` and
/// nothing when no line qualifies; unpaired lines are left as they are.
fn blank_namespace_macros(src: &str, macros: &pp::NamespaceMacros) -> (Option<String>, HashMap<usize, String>) {
    const OPEN: &[u8] = b"namespace{";
    let mut wrappers = HashMap::new();
    if macros.is_empty() {
        return (None, wrappers);
    }
    let b = src.as_bytes();
    let mut open: Vec<(usize, &str)> = Vec::new();
    let mut pairs: Vec<(usize, usize, usize, usize)> = Vec::new(); // opener start and length, closer's
    let mut line_start = 0;
    for line in src.split_inclusive('\n') {
        let start = line_start + (line.len() - line.trim_start_matches([' ', '\t']).len());
        line_start += line.len();
        if !b.get(start).is_some_and(|c| c.is_ascii_uppercase() || *c == b'_') {
            continue;
        }
        let name_end =
            start + src[start..].find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(src.len() - start);
        let rest = src[name_end..line_start].trim();
        if !(rest.is_empty() || rest.starts_with("//")) {
            continue;
        }
        let name = &src[start..name_end];
        let room = name.len() + src[name_end..].bytes().take_while(|c| *c == b' ' || *c == b'\t').count();
        if macros.opens(name) && room >= OPEN.len() {
            open.push((start, name));
        } else if macros.closes(name) {
            if let Some((o, open_name)) = open.pop() {
                pairs.push((o, open_name.len(), start, name.len()));
                wrappers.insert(o, format!("{open_name}\n{name}"));
            }
        }
    }
    if pairs.is_empty() {
        return (None, wrappers);
    }
    let mut out = b.to_vec();
    for (o, olen, c, clen) in pairs {
        out[o..o + OPEN.len()].copy_from_slice(OPEN);
        out[c] = b'}';
        out[o + OPEN.len()..o + olen.max(OPEN.len())].fill(b' ');
        out[c + 1..c + clen].fill(b' ');
    }
    (Some(String::from_utf8(out).expect("only ASCII was rewritten")), wrappers)
}

/// Takes `e`'s text back from `src` where it is a slice of the parsed copy `psrc`
/// (same offsets): the whole text when it is one slice, else its code part.
fn restore_text(e: &mut Entity, psrc: &str, src: &str) {
    let n = e.text.len();
    if n <= e.end && psrc.get(e.end - n..e.end) == Some(e.text.as_str()) {
        if let Some(t) = src.get(e.end - n..e.end) {
            e.text = t.to_string();
        }
    } else if e.start <= e.end && e.text.ends_with(&psrc[e.start..e.end]) {
        let code = e.end - e.start;
        if let Some(t) = src.get(e.start..e.end) {
            e.text.truncate(n - code);
            e.text.push_str(t);
        }
    }
}

/// Merges the entities that touch one conditional group (and everything between them)
/// into one entity holding the whole group; `None` if they are not in the same
/// namespaces. `groups` are disjoint and sorted; so are the entities' code ranges.
fn keep_groups_whole(es: Vec<Entity>, src: &str, groups: &[std::ops::Range<usize>]) -> Option<Vec<Entity>> {
    let mut out: Vec<Entity> = Vec::with_capacity(es.len());
    let mut gi = 0;
    let mut es = es.into_iter().peekable();
    while let Some(mut e) = es.next() {
        // merge while a group starts before this entity's code ends and ends after it
        loop {
            while gi < groups.len() && groups[gi].end <= e.start {
                gi += 1; // a group before this entity, touching none (comments only): dropped whole
            }
            let Some(g) = groups.get(gi) else { break };
            if g.start >= e.end {
                break; // the next group starts after this entity
            }
            if g.start >= e.start && g.end <= e.end {
                gi += 1; // wholly inside
                continue;
            }
            // the group sticks out of `e`: take it whole, and the entities it reaches
            let lo = g.start.min(e.start);
            let hi = g.end.max(e.end);
            let prefix = e.text.len() - (e.end - e.start); // leading comments, if any
            let mut text = e.text[..prefix].to_string();
            text.push_str(&src[lo..e.end]);
            e.text = text;
            e.start = lo;
            e.error = true;
            while let Some(next) = es.next_if(|n| n.start < hi) {
                if next.wrappers != e.wrappers {
                    return None;
                }
                e.text.push_str(&src[e.end..next.end.max(e.end)]);
                e.end = next.end.max(e.end);
                if e.kind != next.kind {
                    e.kind = if e.kind.rank() == 2 && next.kind.rank() == 2 { Kind::Function } else { Kind::Decl };
                }
                for d in next.defines {
                    push_unique(&mut e.defines, d);
                }
                for u in next.uses {
                    if !e.defines.contains(&u) {
                        push_unique(&mut e.uses, u);
                    }
                }
            }
            if e.end < hi {
                e.text.push_str(&src[e.end..hi]);
                e.end = hi;
            }
            if e.kind.rank() == 0 {
                e.kind = Kind::Decl; // a conditional block: code, not the preamble
            }
            gi += 1;
        }
        out.push(e);
    }
    Some(out)
}

/// The whole file as one entity, with what it defines and uses.
fn whole_file(root: Node, src: &str) -> Entity {
    let defines = defines_of(root, src);
    let uses = uses_of(root, src, &defines);
    Entity {
        kind: Kind::Decl,
        wrappers: Vec::new(),
        text: src.to_string(),
        defines,
        uses,
        start: 0,
        end: src.len(),
        error: true,
    }
}

/// `t` without the lines that blanking an include guard left (spaces only), unless a
/// backslash continues the line before into one.
/// The lines of the include guard (`guard`: ranges of `src`, blanked there) taken out of an
/// entity's text, where its text is `src`'s bytes up to `e.end`; only those lines: a
/// whitespace-only line of the code itself (in a raw string, say) stays. A guard line
/// right after a line that ends with `\` stays blank (a continuation would swallow the
/// next line). Texts not found in `src` (none expected) fall back to dropping every
/// all-space line.
fn drop_guard_lines(e: &mut Entity, src: &str, guard: &[Range<usize>]) {
    let n = e.text.len();
    if n > e.end || src.get(e.end - n..e.end) != Some(e.text.as_str()) {
        e.text = drop_blanked_lines(&e.text);
        return;
    }
    let start = e.end - n;
    let mut cuts: Vec<Range<usize>> = Vec::new();
    for r in guard.iter().filter(|r| r.start >= start && r.start < e.end) {
        let from = r.start - start;
        let to = e.text[from..].find('\n').map_or(n, |i| from + i + 1).max(r.end.min(e.end) - start);
        let before = e.text[..from].trim_end_matches(['\n', '\r']);
        if from > 0 && !e.text[..from].ends_with('\n') || before.ends_with('\\') {
            continue; // not a whole line, or after a continuation: left blank
        }
        cuts.push(from..to);
    }
    for r in cuts.into_iter().rev() {
        e.text.replace_range(r, "");
    }
}

fn drop_blanked_lines(t: &str) -> String {
    let mut out = String::with_capacity(t.len());
    for l in t.split_inclusive('\n') {
        let body = l.trim_end_matches(['\n', '\r']);
        let blanked = !body.is_empty() && body.bytes().all(|b| b == b' ');
        if !blanked || out.trim_end_matches(['\n', '\r']).ends_with('\\') {
            out.push_str(l);
        }
    }
    out
}

/// Where tree-sitter recovered from a syntax error (often a macro it cannot expand, as
/// in `void f() LOCKS_EXCLUDED(mu) { ... }`), the pieces around the error belong
/// together: an entity with an error is merged with its neighbours (same wrappers,
/// only whitespace between), so reordering never separates them.
fn glue_errors(es: Vec<Entity>, src: &str) -> Vec<Entity> {
    let n = es.len();
    let mut join_next = vec![false; n]; // entity i is merged with i + 1
    for i in 0..n {
        if !es[i].error {
            continue;
        }
        for (a, b) in [(i.wrapping_sub(1), i), (i, i + 1)] {
            if a < n && b < n && es[a].wrappers == es[b].wrappers && adjacent(&es[a], &es[b], src) {
                join_next[a] = true;
            }
        }
    }
    let mut out: Vec<Entity> = Vec::with_capacity(n);
    let mut joining = false;
    for (i, e) in es.into_iter().enumerate() {
        if joining {
            let last = out.last_mut().expect("joining needs a previous entity");
            let gap_start = last.end;
            last.text.push_str(&src[gap_start..e.end.max(gap_start)]);
            last.end = e.end.max(last.end);
            // the merged code is a function if a body shows up anywhere in it
            if e.kind == Kind::Function || (e.error && e.text.trim_start().starts_with('{')) {
                last.kind = Kind::Function;
            } else if last.kind.rank() < e.kind.rank() {
                last.kind = e.kind;
            }
            for d in e.defines {
                push_unique(&mut last.defines, d);
            }
            for u in e.uses {
                if !last.defines.contains(&u) {
                    push_unique(&mut last.uses, u);
                }
            }
            last.error = true;
        } else {
            out.push(e);
        }
        joining = join_next[i];
    }
    out
}

/// Whether only whitespace and comments lie between the end of `a` and the code of `b`.
fn adjacent(a: &Entity, b: &Entity, src: &str) -> bool {
    let code_start = b.end.saturating_sub(b.text.len());
    a.end <= code_start && code_start <= src.len()
}

/// The whole file as one `Decl` entity (for files that cannot be parsed).
pub fn opaque(text: &str) -> Entity {
    Entity {
        kind: Kind::Decl,
        wrappers: Vec::new(),
        text: text.to_string(),
        defines: Vec::new(),
        uses: Vec::new(),
        start: 0,
        end: text.len(),
        error: true,
    }
}

struct Collector<'s> {
    src: &'s str,
    out: Vec<Entity>,
    wrappers: Vec<String>,
    /// Comments not yet attached to an entity.
    pending: Vec<std::ops::Range<usize>>,
    /// Namespace macro wrappers by the offset of their opener (see `blank_namespace_macros`).
    macro_wrappers: &'s HashMap<usize, String>,
}

impl<'s> Collector<'s> {
    fn text(&self, n: Node) -> &'s str {
        &self.src[n.byte_range()]
    }

    fn children(&mut self, parent: Node) {
        for (n, end) in items(parent) {
            self.node(n, end);
        }
    }

    fn node(&mut self, n: Node, end: usize) {
        if !n.is_named() {
            return; // braces, `#endif`, stray `;`
        }
        match n.kind() {
            "comment" => self.pending.push(n.byte_range()),
            "namespace_definition" | "linkage_specification"
                if self.wrappers.len() < MAX_WRAPPER_DEPTH
                    && n.child_by_field_name("body").is_some_and(|b| b.kind() == "declaration_list") =>
            {
                let body = n.child_by_field_name("body").expect("checked");
                let header = match self.macro_wrappers.get(&n.start_byte()) {
                    Some(w) => w.clone(),
                    None => self.src[n.start_byte()..body.start_byte()].trim().to_string(),
                };
                self.wrappers.push(header);
                self.children(body);
                self.wrappers.pop();
            }
            "preproc_call" if self.text(n).split_whitespace().collect::<Vec<_>>() == ["#pragma", "once"] => {
                self.pending.clear();
            }
            _ => {
                let kind = classify(n);
                let text = self.with_comments(n.start_byte(), end);
                let defines = defines_of(n, self.src);
                let mut uses = uses_of(n, self.src, &defines);
                if let Some(d) = function_node(n).and_then(|f| f.child_by_field_name("declarator")) {
                    for sc in qualified_scopes(d, self.src) {
                        push_unique(&mut uses, sc);
                    }
                }
                let error = n.is_error() || n.has_error();
                let start = n.start_byte();
                self.out.push(Entity { kind, wrappers: self.wrappers.clone(), text, defines, uses, start, end, error });
            }
        }
    }

    /// The text from `start` to `end` with the pending comments before it: a plain slice
    /// when only whitespace separates them, else the comments joined by newlines (when
    /// an include guard or a namespace opening stood between).
    fn with_comments(&mut self, start: usize, end: usize) -> String {
        let pending = std::mem::take(&mut self.pending);
        let Some(first) = pending.first() else { return self.src[start..end].to_string() };
        let mut bounds: Vec<usize> = pending.iter().flat_map(|r| [r.start, r.end]).collect();
        bounds.push(start);
        let contiguous = bounds[1..].chunks(2).all(|gap| gap.len() < 2 || self.src[gap[0]..gap[1]].trim().is_empty());
        if contiguous {
            return self.src[first.start..end].to_string();
        }
        let mut text: String = pending.iter().map(|r| format!("{}\n", &self.src[r.clone()])).collect();
        text.push_str(&self.src[start..end]);
        text
    }
}

/// The function definition a top-level node is (or templates).
fn function_node(n: Node) -> Option<Node> {
    match n.kind() {
        "function_definition" => Some(n),
        "template_declaration" => {
            let mut cursor = n.walk();
            let inner = n.named_children(&mut cursor).filter(|c| c.kind() != "template_parameter_list").last();
            inner.and_then(function_node)
        }
        _ => None,
    }
}

/// The children of `parent` with where each one ends: through a `;` that follows it
/// (`struct S { ... };` parses as the specifier plus a separate `;`).
fn items(parent: Node) -> Vec<(Node, usize)> {
    let mut cursor = parent.walk();
    let kids: Vec<Node> = parent.children(&mut cursor).collect();
    let mut out = Vec::with_capacity(kids.len());
    let mut i = 0;
    while i < kids.len() {
        let semicolon = i + 1 < kids.len() && kids[i + 1].kind() == ";" && !kids[i + 1].is_named();
        let last = if semicolon { i + 1 } else { i };
        out.push((kids[i], kids[last].end_byte()));
        i = last + 1;
    }
    out
}

/// The kind of a top-level node.
fn classify(n: Node) -> Kind {
    match n.kind() {
        "preproc_include" => Kind::Include,
        "preproc_def" | "preproc_function_def" | "preproc_call" => Kind::Directive,
        "using_declaration" => Kind::Using,
        "function_definition" => Kind::Function,
        "class_specifier" | "struct_specifier" | "union_specifier" | "enum_specifier" => {
            // `template <class T> class X<T&>;` declares a specialization: it needs X first
            let specialization = n.child_by_field_name("name").is_some_and(|x| x.kind() == "template_type");
            if n.child_by_field_name("body").is_some() || specialization {
                Kind::Decl
            } else {
                Kind::ForwardDecl
            }
        }
        "declaration" => {
            let bare_type = n.child_by_field_name("type").is_some_and(|t| {
                matches!(t.kind(), "class_specifier" | "struct_specifier" | "union_specifier" | "enum_specifier")
                    && t.child_by_field_name("body").is_none()
            });
            let is_function = n.child_by_field_name("declarator").is_some_and(|d| d.kind() == "function_declarator");
            if bare_type && n.child_by_field_name("declarator").is_none() {
                Kind::ForwardDecl
            } else if is_function {
                Kind::Prototype
            } else {
                Kind::Decl
            }
        }
        "template_declaration" => {
            // what is templated: the last named child that is not the parameter list
            let mut cursor = n.walk();
            let inner = n.named_children(&mut cursor).filter(|c| c.kind() != "template_parameter_list").last();
            match inner.map(classify) {
                Some(Kind::Function) => Kind::Function,
                Some(Kind::ForwardDecl) => Kind::ForwardDecl,
                Some(Kind::Prototype) => Kind::Prototype,
                _ => Kind::Decl,
            }
        }
        _ => Kind::Decl,
    }
}

/// The name a declarator declares (`f` in `int *f(int)`, `g` in `S::g`). A loop, not
/// recursion: declarators nest once per `*` or `&`, and `int` then 10,000 `*` overflowed a
/// worker thread's stack (an abort that took the whole run down).
fn declarator_name(n: Node, src: &str) -> Option<String> {
    let mut n = n;
    loop {
        n = match n.kind() {
            "identifier" | "field_identifier" | "type_identifier" | "operator_name" => {
                return Some(src[n.byte_range()].to_string())
            }
            "qualified_identifier" | "template_function" | "template_type" => n.child_by_field_name("name")?,
            "destructor_name" | "operator_cast" => return None,
            _ => n.child_by_field_name("declarator").or_else(|| n.named_child(0))?,
        };
    }
}

fn push_unique(v: &mut Vec<String>, s: String) {
    if !v.contains(&s) {
        v.push(s);
    }
}

/// Names defined by a type specifier with a body (and its enumerators).
fn specifier_defines(n: Node, src: &str, out: &mut Vec<String>) {
    if n.child_by_field_name("body").is_none() {
        return;
    }
    if let Some(name) = n.child_by_field_name("name") {
        // `struct X<int> {}` specializes X: it defines no new name
        if name.kind() == "type_identifier" {
            push_unique(out, src[name.byte_range()].to_string());
        } else if name.kind() == "qualified_identifier" {
            if let Some(s) = declarator_name(name, src) {
                push_unique(out, s);
            }
        }
    }
    if n.kind() == "enum_specifier" {
        let body = n.child_by_field_name("body").expect("checked");
        let mut cursor = body.walk();
        for e in body.named_children(&mut cursor) {
            if let Some(name) = e.child_by_field_name("name") {
                push_unique(out, src[name.byte_range()].to_string());
            }
        }
    }
}

fn defines_of(n: Node, src: &str) -> Vec<String> {
    let mut out = Vec::new();
    match n.kind() {
        "class_specifier" | "struct_specifier" | "union_specifier" | "enum_specifier" => {
            specifier_defines(n, src, &mut out)
        }
        "function_definition" => {
            // `X::X(...)` / `X::~X()` define no new name: they belong to class X
            let scopes = n.child_by_field_name("declarator").map(|d| qualified_scopes(d, src)).unwrap_or_default();
            if let Some(s) = n.child_by_field_name("declarator").and_then(|d| declarator_name(d, src)) {
                if scopes.last() != Some(&s) {
                    out.push(s);
                }
            }
        }
        "declaration" | "type_definition" | "field_declaration" => {
            if let Some(t) = n.child_by_field_name("type") {
                specifier_defines(t, src, &mut out);
            }
            let mut cursor = n.walk();
            for d in n.children_by_field_name("declarator", &mut cursor) {
                if let Some(s) = declarator_name(d, src) {
                    push_unique(&mut out, s);
                }
            }
        }
        "alias_declaration"
        | "concept_definition"
        | "preproc_def"
        | "preproc_function_def"
        | "namespace_alias_definition" => {
            if let Some(name) = n.child_by_field_name("name") {
                out.push(src[name.byte_range()].to_string());
            }
        }
        "template_declaration" | "linkage_specification" => {
            let mut cursor = n.walk();
            for c in n.named_children(&mut cursor) {
                if c.kind() != "template_parameter_list" {
                    for s in defines_of(c, src) {
                        push_unique(&mut out, s);
                    }
                }
            }
        }
        "preproc_if" | "preproc_ifdef" | "ERROR" | "namespace_definition" | "translation_unit" => {
            // opaque blocks: whatever is defined anywhere inside
            for_each_node(n, |c| {
                let own = match c.kind() {
                    "class_specifier" | "struct_specifier" | "union_specifier" | "enum_specifier" => {
                        let mut v = Vec::new();
                        specifier_defines(c, src, &mut v);
                        v
                    }
                    "declaration" | "type_definition" if at_namespace_scope(c, n) => {
                        let mut cursor = c.walk();
                        let ds: Vec<Node> = c.children_by_field_name("declarator", &mut cursor).collect();
                        ds.into_iter().filter_map(|d| declarator_name(d, src)).collect()
                    }
                    "function_definition" | "alias_declaration" | "preproc_def" | "preproc_function_def" => c
                        .child_by_field_name("declarator")
                        .and_then(|d| declarator_name(d, src))
                        .or_else(|| c.child_by_field_name("name").map(|x| src[x.byte_range()].to_string()))
                        .into_iter()
                        .collect(),
                    _ => Vec::new(),
                };
                for s in own {
                    push_unique(&mut out, s);
                }
            });
        }
        _ => {}
    }
    out
}

/// The scopes named in a definition's declarator: `a`, `B` for `int a::B::f()`.
fn qualified_scopes(decl: Node, src: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut n = Some(decl);
    while let Some(x) = n {
        match x.kind() {
            "qualified_identifier" => {
                if let Some(sc) = x.child_by_field_name("scope") {
                    let sc =
                        if sc.kind() == "template_type" { sc.child_by_field_name("name").unwrap_or(sc) } else { sc };
                    out.push(src[sc.byte_range()].to_string());
                }
                n = x.child_by_field_name("name");
            }
            "identifier" | "field_identifier" | "operator_name" | "destructor_name" | "type_identifier" => {
                if x.kind() == "destructor_name" {
                    out.push(src[x.byte_range()].trim_start_matches('~').to_string());
                }
                n = None;
            }
            _ => n = x.child_by_field_name("declarator").or_else(|| x.named_child(0)),
        }
    }
    out
}

/// Whether `c`, inside `top`, is declared at namespace scope (not in a function or class).
fn at_namespace_scope(c: Node, top: Node) -> bool {
    let mut p = c.parent();
    while let Some(x) = p {
        if x == top {
            return true;
        }
        if !matches!(
            x.kind(),
            "preproc_if"
                | "preproc_ifdef"
                | "preproc_else"
                | "preproc_elif"
                | "preproc_elifdef"
                | "declaration_list"
                | "namespace_definition"
                | "linkage_specification"
                | "template_declaration"
                | "ERROR"
        ) {
            return false;
        }
        p = x.parent();
    }
    false
}

/// Identifiers, type and namespace names, and called member names, in order of first use.
fn uses_of(n: Node, src: &str, defines: &[String]) -> Vec<String> {
    let mut seen: HashSet<&str> = defines.iter().map(String::as_str).collect();
    let mut out = Vec::new();
    for_each_node(n, |c| {
        let name = match c.kind() {
            "identifier" | "type_identifier" | "namespace_identifier" => Some(c),
            // obj.f(...) / p->f(...): the member called
            "call_expression" => c
                .child_by_field_name("function")
                .filter(|f| f.kind() == "field_expression")
                .and_then(|f| f.child_by_field_name("field")),
            _ => None,
        };
        if let Some(x) = name {
            let s = &src[x.byte_range()];
            if seen.insert(s) {
                out.push(s.to_string());
            }
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find<'a>(es: &'a [Entity], needle: &str) -> &'a Entity {
        es.iter().find(|e| e.text.contains(needle)).unwrap_or_else(|| panic!("no entity with {needle:?}: {es:#?}"))
    }

    #[test]
    fn cuts_a_header_into_entities() {
        let src = "// license\n#ifndef A_H\n#define A_H\n#include <vector>\n#pragma once\n#define SQ(x) ((x)*(x))\n\
            namespace foo { inline namespace v1 {\nclass Fwd;\n// S holds things\nstruct S : Base { int a; Fwd* f; };\n\
            template <typename T> struct X { T t; };\nusing Alias = X<S>;\nenum class E { A, B };\nint proto(S s);\n\
            static const int N = 4;\nint S2::g() const { return bar(1) + obj.k(2); }\n}}\nextern \"C\" { int cfun(void); }\n\
            using namespace std;\n#endif\n";
        let es = extract(src).unwrap();
        let kinds: Vec<Kind> = es.iter().map(|e| e.kind).collect();
        use Kind::*;
        assert_eq!(
            kinds,
            vec![Include, Directive, ForwardDecl, Decl, Decl, Decl, Decl, Prototype, Decl, Function, Prototype, Using]
        );
        assert!(find(&es, "<vector>").text.starts_with("// license\n"), "leading comment kept");
        let s = find(&es, "struct S");
        assert!(s.text.starts_with("// S holds things") && s.text.ends_with("};"));
        assert_eq!(s.wrappers, vec!["namespace foo".to_string(), "inline namespace v1".to_string()]);
        assert_eq!(s.defines, vec!["S"]);
        assert!(s.uses.contains(&"Base".to_string()) && s.uses.contains(&"Fwd".to_string()));
        assert_eq!(find(&es, "enum class").defines, vec!["E", "A", "B"]);
        assert_eq!(find(&es, "using Alias").defines, vec!["Alias"]);
        assert_eq!(find(&es, "proto").defines, vec!["proto"]);
        assert_eq!(find(&es, "N = 4").defines, vec!["N"]);
        let g = find(&es, "S2::g");
        assert_eq!(g.defines, vec!["g"]);
        assert!(["S2", "bar", "k", "obj"].iter().all(|n| g.uses.contains(&n.to_string())), "{:?}", g.uses);
        assert_eq!(find(&es, "cfun").wrappers, vec!["extern \"C\"".to_string()]);
        assert_eq!(find(&es, "SQ").defines, vec!["SQ"]);
        assert!(!es.iter().any(|e| e.text.contains("A_H")), "the guard is looked through");
    }

    #[test]
    fn a_guarded_headers_blank_lines_of_its_own_stay() {
        // only the guard's lines go: a whitespace-only line inside a raw string was dropped too
        let src = "#ifndef T_H\n#define T_H\nconst char* s = R\"(line1\n    \nline3)\";\n\nint f();\n#endif\n";
        let es = extract(src).unwrap();
        assert!(es.iter().any(|e| e.text.contains("R\"(line1\n    \nline3)\"")), "{:?}", es.iter().map(|e| &e.text).collect::<Vec<_>>());
        assert!(!es.iter().any(|e| e.text.contains("T_H") || e.text.lines().any(|l| l.trim().is_empty() && !l.is_empty() && l.len() > 4)));
    }

    #[test]
    fn specializations_and_conditionals() {
        let src = "template <class T> struct X {};\ntemplate <> struct X<int> { int v; };\n\
            #if defined(WIN)\nstruct W { int a; };\n#else\nstruct W { long a; };\n#endif\n";
        let es = extract(src).unwrap();
        assert_eq!(es.len(), 3);
        assert_eq!(es[0].defines, vec!["X"]);
        assert!(es[1].defines.is_empty() && es[1].uses.contains(&"X".to_string()));
        assert_eq!(es[2].kind, Kind::Decl);
        assert_eq!(es[2].defines, vec!["W"]);
    }

    #[test]
    fn out_of_line_members_use_their_class() {
        let es = extract("X::X(int a) : a_(a) {}\nX::~X() {}\nint ns::X::get() const { return a_; }\n").unwrap();
        assert!(es[0].defines.is_empty() && es[0].uses.contains(&"X".to_string()), "{:?}", es[0]);
        assert!(es[1].defines.is_empty() && es[1].uses.contains(&"X".to_string()), "{:?}", es[1]);
        assert_eq!(es[2].defines, vec!["get"]);
        assert!(es[2].uses.contains(&"ns".to_string()) && es[2].uses.contains(&"X".to_string()));
    }

    #[test]
    fn annotation_macros_between_class_key_and_name() {
        let src = "namespace p {\nclass LOCKABLE Mutex {\n int x;\n};\nstruct LDB_EXPORT Range : Base { int y; };\n\
            class API_(x) Final final { };\nclass CondVar { Mutex* mu_; };\n}\n";
        let es = extract(src).unwrap();
        let m = find(&es, "Mutex {");
        assert_eq!(
            (m.defines.clone(), m.text.as_str()),
            (vec!["Mutex".to_string()], "class LOCKABLE Mutex {\n int x;\n};")
        );
        let r = find(&es, "Range");
        assert_eq!(r.defines, vec!["Range"]);
        assert!(r.text.starts_with("struct LDB_EXPORT Range") && r.text.ends_with("};"), "{}", r.text);
        assert_eq!(find(&es, "Final").defines, vec!["Final"]);
        assert!(find(&es, "CondVar").uses.contains(&"Mutex".to_string()));
        // not macros: a lower-case name, `struct S s;`, `class X::Y {`
        assert!(blank_class_macros("class foo Bar {};\nstruct ABC abc;\nclass ABC::D {};\n").is_none());
    }

    const FMT_MACROS: &str =
        "#define FMT_BEGIN_NAMESPACE \\\n  namespace fmt {           \\\n  inline namespace v9 {\n\
        #define FMT_END_NAMESPACE \\\n  }                       \\\n  }\n\
        #define FMT_BEGIN_DETAIL_NAMESPACE namespace detail {\n#define FMT_END_DETAIL_NAMESPACE }\n";

    #[test]
    fn namespace_macros_are_wrappers() {
        let fmt =
            "\nFMT_BEGIN_NAMESPACE\n  \n// S holds\nstruct S { int a; };\nint f(S s) { return s.a; }\nFMT_END_NAMESPACE\n";
        let es = extract(&format!("{FMT_MACROS}{fmt}")).unwrap();
        let w = vec!["FMT_BEGIN_NAMESPACE\nFMT_END_NAMESPACE".to_string()];
        assert_eq!(find(&es, "struct S").wrappers, w);
        assert_eq!(find(&es, "struct S").text, "// S holds\nstruct S { int a; };");
        assert_eq!((find(&es, "int f").wrappers.clone(), find(&es, "int f").kind), (w, Kind::Function));
        assert!(!es.iter().any(|e| e.text.contains("FMT_BEGIN_NAMESPACE\n") && !e.text.contains("#define")), "{es:#?}");
        // absl's: an inline namespace, named by another macro, inside a plain one
        let absl = "#define ABSL_NAMESPACE_BEGIN \\\n  inline namespace ABSL_OPTION_INLINE_NAMESPACE_NAME {\n\
            #define ABSL_NAMESPACE_END }  // inline\nnamespace absl {\nABSL_NAMESPACE_BEGIN\nnamespace base_internal {\n\
            class T {};\n}  // namespace base_internal\nABSL_NAMESPACE_END  // absl\n}  // namespace absl\n";
        let es = extract(absl).unwrap();
        assert_eq!(
            find(&es, "class T").wrappers,
            ["namespace absl", "ABSL_NAMESPACE_BEGIN\nABSL_NAMESPACE_END", "namespace base_internal"]
        );
        assert_eq!(es.len(), 3, "two #defines and the class: {es:#?}");
    }

    #[test]
    fn nested_namespace_macros_pair_like_braces() {
        let src = format!(
            "{FMT_MACROS}FMT_BEGIN_NAMESPACE\n\n  FMT_BEGIN_DETAIL_NAMESPACE\nint g();\n  FMT_END_DETAIL_NAMESPACE\n\n\
             int h();\nFMT_END_NAMESPACE\n"
        );
        let es = extract(&src).unwrap();
        assert_eq!(
            find(&es, "int g").wrappers,
            ["FMT_BEGIN_NAMESPACE\nFMT_END_NAMESPACE", "FMT_BEGIN_DETAIL_NAMESPACE\nFMT_END_DETAIL_NAMESPACE"]
        );
        assert_eq!(find(&es, "int h").wrappers, ["FMT_BEGIN_NAMESPACE\nFMT_END_NAMESPACE"]);
        assert_eq!(wrapper_lines("FMT_BEGIN_NAMESPACE\nFMT_END_NAMESPACE").1, "FMT_END_NAMESPACE");
        assert_eq!(wrapper_lines("namespace a"), ("namespace a {".to_string(), "}  // namespace a".to_string()));
    }

    #[test]
    fn other_macros_are_left_as_written() {
        // not a namespace (extern "C", a statement), not defined here, or never closed: as without macros
        let cases = [
            "#define C_BEGIN_DECLS extern \"C\" {\n#define C_END_DECLS }\nC_BEGIN_DECLS\nint c(void);\nC_END_DECLS\n",
            "#define REGISTER_ALL_THINGS int registered = 1;\nREGISTER_ALL_THINGS\nint after();\n",
            "UNKNOWN_BEGIN_NAMESPACE\nint u();\nUNKNOWN_END_NAMESPACE\n",
            "#define LIB_BEGIN_NAMESPACE namespace lib {\nLIB_BEGIN_NAMESPACE\nint v();\n",
            "#define NS_BEGIN namespace ns {\n#define NS_END }\nNS_BEGIN\nint w();\nNS_END\n", // no room for `namespace{`
        ];
        for src in cases {
            let plain = extract_checked(src, pp::scan(src), &pp::NamespaceMacros::default()).unwrap();
            assert_eq!(extract(src).unwrap(), plain.0, "{src}");
            assert!(plain.0.iter().all(|e| e.wrappers.is_empty()), "{src}");
        }
        let (copy, wrappers) = blank_namespace_macros(cases[1], &{
            let mut m = pp::NamespaceMacros::default();
            m.add(&pp::scan(cases[1]));
            m
        });
        assert!(copy.is_none() && wrappers.is_empty());
    }

    #[test]
    fn a_non_guard_ifndef_is_one_entity() {
        let es = extract("#ifndef FOO\nint foo();\nvoid g() { int local = 1; }\n#endif\n").unwrap();
        assert_eq!(es.len(), 1);
        assert_eq!(es[0].defines, vec!["foo", "g"], "not the local variable");
        assert!(es[0].text.contains("int foo();"));
    }
}
