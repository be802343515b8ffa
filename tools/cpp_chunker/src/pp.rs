//! Preprocessor structure, seen as text: conditional groups (`#if`/`#ifdef`/`#ifndef` ...
//! `#elif`/`#else` ... `#endif`), include guards, `#pragma once`, and a cheap balance
//! check of conditionals and braces. tree-sitter parses directives too, but a syntax
//! error near one (an unexpanded macro) can leave an `#endif` or a `}` outside every
//! node, so `compilable` mode checks its entities against this scan instead of trusting
//! the tree. `dev/cpp_syntax_check.py` has the same checker in Python (`structure_errors`).
//!
//! The scanner skips comments, string and character literals (raw strings included) and
//! line continuations; a directive is a `#` that starts a line. Braces are counted in the
//! first branch of each conditional only (`#if A namespace a { #else namespace b { #endif`
//! opens one brace, as the compiler sees it), so a document is balanced when its
//! conditionals nest and close and its first-branch braces never go below zero and end at
//! zero.

use std::ops::Range;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirKind {
    /// `#if`, `#ifdef`, `#ifndef`
    If,
    /// `#elif`, `#elifdef`, `#elifndef`
    Elif,
    Else,
    Endif,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Directive {
    pub kind: DirKind,
    /// The directive's logical line (continuations included), without its final newline.
    pub range: Range<usize>,
    /// The directive name (`ifndef`, `define`, `pragma`, ...).
    pub name: String,
    /// The rest of the logical line, comments removed, whitespace collapsed.
    pub args: String,
}

/// The text's directives and brace positions (with the depth of conditionals they sit
/// in and whether they are in a first branch).
#[derive(Debug, Default)]
pub struct Scan {
    pub directives: Vec<Directive>,
    /// `(byte, +1 for '{' or -1 for '}')`, only those in first branches.
    pub braces: Vec<(usize, i8)>,
}

/// Scans `text` once (linear time).
pub fn scan(text: &str) -> Scan {
    let b = text.as_bytes();
    let n = b.len();
    let mut out = Scan::default();
    // per open conditional: whether we are past its first branch
    let mut branches: Vec<bool> = Vec::new();
    let mut i = 0;
    let mut line_start = true; // only whitespace (or comments) since the last newline
    let mut prev_ident_digit = false; // the current token is a number (for 1'000 separators)
    let mut in_token = false;
    while i < n {
        let c = b[i];
        if c == b'\n' {
            line_start = true;
            in_token = false;
            i += 1;
            continue;
        }
        if c == b'\\' && i + 1 < n && (b[i + 1] == b'\n' || (b[i + 1] == b'\r' && i + 2 < n && b[i + 2] == b'\n')) {
            i += if b[i + 1] == b'\n' { 2 } else { 3 };
            continue;
        }
        if c == b'/' && i + 1 < n && b[i + 1] == b'/' {
            i = line_end(b, i);
            continue;
        }
        if c == b'/' && i + 1 < n && b[i + 1] == b'*' {
            i = find(b, i + 2, b"*/").map_or(n, |j| j + 2);
            continue;
        }
        if c == b' ' || c == b'\t' || c == b'\r' || c == 0x0c || c == 0x0b {
            in_token = false;
            i += 1;
            continue;
        }
        if c == b'#' && line_start {
            let end = line_end(b, i);
            let d = directive(text, i, end);
            match d.kind {
                DirKind::If => branches.push(false),
                DirKind::Elif | DirKind::Else => {
                    if let Some(last) = branches.last_mut() {
                        *last = true;
                    }
                }
                DirKind::Endif => {
                    branches.pop();
                }
                DirKind::Other => {}
            }
            out.directives.push(d);
            i = end;
            continue;
        }
        line_start = false;
        if c == b'"' || (c == b'\'' && !(in_token && prev_ident_digit)) {
            // raw string: R"delim( ... )delim" (prefixes u8R, LR, uR, UR end in R)
            if c == b'"' && i > 0 && b[i - 1] == b'R' && in_token {
                let open = find(b, i + 1, b"(").unwrap_or(n);
                let delim = &b[i + 1..open.min(n)];
                let mut close = Vec::with_capacity(delim.len() + 2);
                close.push(b')');
                close.extend_from_slice(delim);
                close.push(b'"');
                i = if open < n && delim.len() <= 16 {
                    find(b, open + 1, &close).map_or(n, |j| j + close.len())
                } else {
                    i + 1
                };
            } else {
                i = literal_end(b, i, c);
            }
            in_token = false;
            continue;
        }
        if c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80 {
            if !in_token {
                prev_ident_digit = c.is_ascii_digit();
            }
            in_token = true;
            i += 1;
            continue;
        }
        in_token = c == b'.' && prev_ident_digit; // 1.5e3 stays a number
        if (c == b'{' || c == b'}') && !branches.iter().any(|&past_first| past_first) {
            out.braces.push((i, if c == b'{' { 1 } else { -1 }));
        }
        i += 1;
    }
    out
}

fn find(b: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    if from > b.len() {
        return None;
    }
    b[from..].windows(needle.len()).position(|w| w == needle).map(|p| p + from)
}

/// The end of a logical line starting at `i` (before its newline), following `\` continuations.
fn line_end(b: &[u8], mut i: usize) -> usize {
    while i < b.len() {
        if b[i] == b'\n' {
            let mut k = i;
            if k > 0 && b[k - 1] == b'\r' {
                k -= 1;
            }
            if k > 0 && b[k - 1] == b'\\' {
                i += 1;
                continue;
            }
            return i;
        }
        i += 1;
    }
    i
}

/// The end of a string or character literal opened by `q` at `i` (it ends at the line end
/// if unterminated).
fn literal_end(b: &[u8], i: usize, q: u8) -> usize {
    let mut j = i + 1;
    while j < b.len() {
        match b[j] {
            b'\\' => j += 2,
            b'\n' => return j,
            x if x == q => return j + 1,
            _ => j += 1,
        }
    }
    b.len()
}

fn directive(text: &str, start: usize, end: usize) -> Directive {
    let line = &text[start + 1..end];
    // comments out, continuations joined
    let mut clean = String::with_capacity(line.len());
    let lb = line.as_bytes();
    let mut k = 0;
    while k < lb.len() {
        if lb[k] == b'/' && k + 1 < lb.len() && lb[k + 1] == b'/' {
            break;
        }
        if lb[k] == b'/' && k + 1 < lb.len() && lb[k + 1] == b'*' {
            k = find(lb, k + 2, b"*/").map_or(lb.len(), |j| j + 2);
            clean.push(' ');
            continue;
        }
        if lb[k] == b'\\' && (k + 1 == lb.len() || lb[k + 1] == b'\n' || lb[k + 1] == b'\r') {
            k += 1;
            continue;
        }
        // char boundary safe: we only skip ASCII above
        let ch = line[k..].chars().next().expect("in bounds");
        clean.push(ch);
        k += ch.len_utf8();
    }
    let clean = clean.trim_start();
    let name_len = clean.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(clean.len());
    let name = clean[..name_len].to_string();
    let args = clean[name_len..].split_whitespace().collect::<Vec<_>>().join(" ");
    let kind = match name.as_str() {
        "if" | "ifdef" | "ifndef" => DirKind::If,
        "elif" | "elifdef" | "elifndef" => DirKind::Elif,
        "else" => DirKind::Else,
        "endif" => DirKind::Endif,
        _ => DirKind::Other,
    };
    Directive { kind, range: start..end, name, args }
}

/// What is unbalanced in `text`, if anything: the first problem found, in words.
pub fn structure_error(text: &str) -> Option<String> {
    let s = scan(text);
    let mut depth = 0usize;
    for d in &s.directives {
        match d.kind {
            DirKind::If => depth += 1,
            DirKind::Elif | DirKind::Else if depth == 0 => return Some(format!("#{} without #if", d.name)),
            DirKind::Endif if depth == 0 => return Some("#endif without #if".into()),
            DirKind::Endif => depth -= 1,
            _ => {}
        }
    }
    if depth > 0 {
        return Some(format!("{depth} unterminated #if"));
    }
    let mut braces = 0i64;
    for &(_, d) in &s.braces {
        braces += d as i64;
        if braces < 0 {
            return Some("'}' without '{'".into());
        }
    }
    (braces > 0).then(|| format!("{braces} unclosed '{{'"))
}

pub fn balanced(text: &str) -> bool {
    structure_error(text).is_none()
}

/// The outermost conditional groups of `s`: from each top-level `#if` to the end of its
/// `#endif` line. An unterminated group runs to `len`.
pub fn top_groups(s: &Scan, len: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for d in &s.directives {
        match d.kind {
            DirKind::If => {
                if depth == 0 {
                    start = d.range.start;
                }
                depth += 1;
            }
            DirKind::Endif if depth > 0 => {
                depth -= 1;
                if depth == 0 {
                    out.push(start..d.range.end);
                }
            }
            _ => {}
        }
    }
    if depth > 0 {
        out.push(start..len);
    }
    out
}

/// The directive lines that make `text` an include-guarded file: `#ifndef X` (or
/// `#if !defined(X)`) and `#define X` as its first two directives (after any `#pragma once`), with only comments and
/// blank lines before them and between them, and the `#endif` that closes the `#ifndef`
/// as the last thing in the file (comments after it are fine); plus every top-level
/// `#pragma once`. The ranges, in order, are the lines to drop.
pub fn guard_lines(text: &str, s: &Scan) -> Vec<Range<usize>> {
    let mut out: Vec<Range<usize>> = Vec::new();
    let ds = &s.directives;
    let only_comments = |r: Range<usize>| code_free(&text[r]);
    // `#pragma once` lines may come first
    let skip = ds.iter().take_while(|d| d.name == "pragma" && d.args == "once").count();
    let lead_ok = (0..skip).all(|k| only_comments(if k == 0 { 0 } else { ds[k - 1].range.end }..ds[k].range.start));
    let guard = (|| {
        let (a, b) = (ds.get(skip)?, ds.get(skip + 1)?);
        let name = match (a.name.as_str(), a.args.as_str()) {
            ("ifndef", x) => x.to_string(),
            ("if", x) => {
                let x = x.strip_prefix('!')?.trim_start().strip_prefix("defined")?.trim();
                x.trim_start_matches('(').trim_end_matches(')').trim().to_string()
            }
            _ => return None,
        };
        if name.is_empty() || name.contains(char::is_whitespace) {
            return None;
        }
        if b.name != "define" || b.args.split_whitespace().next() != Some(name.as_str()) {
            return None;
        }
        let before = if skip == 0 { 0 } else { ds[skip - 1].range.end };
        if !lead_ok || !only_comments(before..a.range.start) || !only_comments(a.range.end..b.range.start) {
            return None;
        }
        // the #endif that closes `a`, with no #else / #elif of its own
        let mut depth = 0usize;
        for (k, d) in ds.iter().enumerate() {
            match d.kind {
                DirKind::If => depth += 1,
                DirKind::Elif | DirKind::Else if depth == 1 => return None,
                DirKind::Endif => {
                    depth = depth.checked_sub(1)?;
                    if depth == 0 {
                        return (k == ds.len() - 1 && only_comments(d.range.end..text.len()))
                            .then(|| vec![a.range.clone(), b.range.clone(), d.range.clone()]);
                    }
                }
                _ => {}
            }
        }
        None
    })();
    out.extend(guard.into_iter().flatten());
    let mut depth = 0usize;
    for d in ds {
        match d.kind {
            DirKind::If => depth += 1,
            DirKind::Endif => depth = depth.saturating_sub(1),
            DirKind::Other if d.name == "pragma" && d.args == "once" && depth <= usize::from(!out.is_empty()) => {
                out.push(d.range.clone())
            }
            _ => {}
        }
    }
    out.sort_by_key(|r| r.start);
    out
}

/// Whether `t` holds only whitespace and comments.
fn code_free(t: &str) -> bool {
    let b = t.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_whitespace() {
            i += 1;
        } else if b[i..].starts_with(b"//") {
            i = line_end(b, i);
        } else if b[i..].starts_with(b"/*") {
            match find(b, i + 2, b"*/") {
                Some(j) => i = j + 2,
                None => return false,
            }
        } else {
            return false;
        }
    }
    true
}

/// `text` with the `ranges` (directive lines) replaced by spaces, so byte offsets stay
/// valid for the parse.
pub fn blank(text: &str, ranges: &[Range<usize>]) -> String {
    let mut out = text.as_bytes().to_vec();
    for r in ranges {
        for b in &mut out[r.clone()] {
            if *b != b'\n' {
                *b = b' ';
            }
        }
    }
    // only whole directive lines (ASCII-delimited) were blanked, and multi-byte chars in
    // them became spaces byte by byte, so this is still UTF-8
    String::from_utf8(out).expect("blanking keeps UTF-8")
}

/// Macros of a project that open and close namespaces, from their `#define`s: fmt's
/// `FMT_BEGIN_NAMESPACE` (`namespace fmt { inline namespace v9 {`) and `FMT_END_NAMESPACE`
/// (`} }`), absl's `ABSL_NAMESPACE_BEGIN` (`inline namespace ABSL_OPTION_INLINE_NAMESPACE_NAME {`).
/// Only all-caps object-like macros count; a name is an opener (closer) when some definition
/// expands to namespace openings (closing braces only) and every other one is empty (absl
/// defines them empty when its inline namespace is off).
#[derive(Debug, Default, Clone)]
pub struct NamespaceMacros {
    /// name -> (some definition opens, some closes, some is anything else)
    seen: std::collections::HashMap<String, (bool, bool, bool)>,
}

impl NamespaceMacros {
    /// Adds the `#define`s of one file (from its scan).
    pub fn add(&mut self, s: &Scan) {
        for d in s.directives.iter().filter(|d| d.name == "define") {
            let name_len = d.args.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(d.args.len());
            let (name, body) = d.args.split_at(name_len);
            let all_caps = name.bytes().any(|c| c.is_ascii_uppercase())
                && name.bytes().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == b'_');
            if !all_caps || body.starts_with('(') {
                continue; // function-like, or not a macro-looking name
            }
            let body = body.trim();
            let opens = !body.is_empty() && opens_namespaces(body);
            let closes = !body.is_empty() && body.bytes().all(|c| c == b'}' || c == b' ');
            let e = self.seen.entry(name.to_string()).or_default();
            *e = (e.0 || opens, e.1 || closes, e.2 || !(body.is_empty() || opens || closes));
        }
    }

    pub fn opens(&self, name: &str) -> bool {
        self.seen.get(name) == Some(&(true, false, false))
    }

    pub fn closes(&self, name: &str) -> bool {
        self.seen.get(name) == Some(&(false, true, false))
    }

    /// Whether no macro opens a namespace (then nothing needs doing).
    pub fn is_empty(&self) -> bool {
        !self.seen.values().any(|&v| v == (true, false, false))
    }
}

/// Whether `body` is one or more `[inline] namespace [name[::name]] {`.
fn opens_namespaces(body: &str) -> bool {
    let spaced = body.replace('{', " { ");
    let mut toks = spaced.split_whitespace().peekable();
    let mut any = false;
    while toks.peek().is_some() {
        if toks.peek() == Some(&"inline") {
            toks.next();
        }
        if toks.next() != Some("namespace") {
            return false;
        }
        if toks.peek().is_some_and(|t| *t != "{") {
            let name = toks.next().expect("peeked");
            if !name.split("::").all(|p| !p.is_empty() && p.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_')) {
                return false;
            }
        }
        if toks.next() != Some("{") {
            return false;
        }
        any = true;
    }
    any
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balance_of_conditionals_and_braces() {
        assert!(balanced("#if A\nint x;\n#elif B\nint y;\n#else\n#endif\nnamespace n {\n}\n"));
        assert_eq!(structure_error("#endif // X_H\n").as_deref(), Some("#endif without #if"));
        assert_eq!(structure_error("#ifndef X\nint a;\n").as_deref(), Some("1 unterminated #if"));
        assert_eq!(structure_error("namespace a {\nint x;\n").as_deref(), Some("1 unclosed '{'"));
        assert_eq!(structure_error("}  // namespace a\n").as_deref(), Some("'}' without '{'"));
        // braces in comments, strings, chars, raw strings and later branches do not count
        assert!(balanced(
            "// {\n/* } */\nconst char* s = \"{\\\"\";\nchar c = '}';\nint n = 1'000;\nauto r = R\"x({)\")x\";\n\
             #if A\nnamespace a {\n#else\nnamespace b {\n#endif\n}\n"
        ));
        // a directive inside a block comment or continued line is not one
        assert!(balanced("/*\n#endif\n*/\n#define M(x) \\\n  x\n"));
        assert!(balanced("#define OPEN {\n"), "braces in directives do not count");
    }

    #[test]
    fn guards_are_recognised() {
        let t = "// c\n#ifndef A_H_\n#define A_H_\n\nint x;\n\n#endif  // A_H_\n";
        let s = scan(t);
        let g = guard_lines(t, &s);
        assert_eq!(g.len(), 3);
        let b = blank(t, &g);
        assert_eq!(b.len(), t.len());
        assert!(!b.contains('#') && b.contains("// c\n") && b.contains("\nint x;\n"), "{b:?}");
        let t = "#if !defined(B_H)\n#define B_H 1\nint y;\n#endif /* B_H */\n";
        assert_eq!(guard_lines(t, &scan(t)).len(), 3);
        // not a guard: code after the #endif, an #else, a different name
        for t in [
            "#ifndef A\n#define A\n#endif\nint z;\n",
            "#ifndef A\n#define A\n#else\nint w;\n#endif\n",
            "#ifndef A\n#define B\n#endif\n",
        ] {
            assert!(guard_lines(t, &scan(t)).is_empty(), "{t}");
        }
        let t = "#pragma once\nint a;\n";
        assert_eq!(guard_lines(t, &scan(t)), vec![0..12]);
        let t = "#ifndef A\n#define A\n#pragma once\nint a;\n#endif\n";
        assert_eq!(guard_lines(t, &scan(t)).len(), 4, "pragma once inside a guard");
    }

    #[test]
    fn top_groups_nest() {
        let t = "#if A\n#ifdef B\n#endif\n#elif C\n#endif\nint x;\n#ifndef D\n";
        let s = scan(t);
        assert_eq!(top_groups(&s, t.len()), vec![0..36, 44..t.len()]);
    }

    #[test]
    fn namespace_macros_from_defines() {
        let t = "#define FMT_BEGIN_NAMESPACE \\\n  namespace fmt {  \\\n  inline namespace v9 {\n\
            #define FMT_END_NAMESPACE \\\n  }  \\\n  }\n#if OFF\n#define NS_BEGIN\n#else\n\
            #define NS_BEGIN inline namespace NS_NAME {  // versioned\n#endif\n#define NS_END }\n\
            #define A_B_NAMESPACE namespace a::b{\n#define EXTERN_C_BEGIN extern \"C\" {\n\
            #define MIXED namespace x {\n#define MIXED int\n#define FN(x) namespace x {\n#define lower namespace l {\n";
        let mut m = NamespaceMacros::default();
        assert!(m.is_empty());
        m.add(&scan(t));
        for name in ["FMT_BEGIN_NAMESPACE", "NS_BEGIN", "A_B_NAMESPACE"] {
            assert!(m.opens(name) && !m.closes(name), "{name}");
        }
        for name in ["FMT_END_NAMESPACE", "NS_END"] {
            assert!(m.closes(name) && !m.opens(name), "{name}");
        }
        // not namespaces: extern "C", a macro also defined as something else, function-like, lower case
        for name in ["EXTERN_C_BEGIN", "MIXED", "FN", "lower", "OTHER"] {
            assert!(!m.opens(name) && !m.closes(name), "{name}");
        }
        assert!(!m.is_empty());
    }
}
