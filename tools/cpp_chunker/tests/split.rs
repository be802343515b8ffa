//! Splitting never cuts a function (or any syntax node) that fits the budget.

mod common;

use common::*;
use cpp_chunker::cpp::function_ranges;
use cpp_chunker::split::split;
use cpp_chunker::tokens::budget_bytes;
use cpp_chunker::Mode;

/// A deterministic C++ file with namespaces, classes, templates, comments and functions
/// of varied sizes.
fn corpus(n: usize) -> String {
    let mut s = String::from("// Copyright header\n#include <vector>\n#include \"local.h\"\n\n");
    for i in 0..n {
        match i % 4 {
            0 => s += &format!(
                "/// Adds things ({i}).\nstatic int add{i}(int a, int b) {{\n    int c = a + b;\n{}    return c * {i};\n}}\n\n",
                "    c += a; // step\n".repeat(i % 7)
            ),
            1 => s += &format!(
                "namespace ns{i} {{\nclass C{i} {{\n public:\n  int get() const {{ return v_; }}\n  void set(int v) {{\n    if (v > 0) {{ v_ = v; }}\n  }}\n private:\n  int v_ = {i};\n}};\n\nint free{i}() {{ return C{i}().get(); }}\n}}  // namespace ns{i}\n\n"
            ),
            2 => s += &format!(
                "template <typename T>\nT maxof{i}(const std::vector<T>& xs) {{\n  T m = xs[0];\n  for (const T& x : xs) {{\n    if (x > m) m = x;\n  }}\n  return m;\n}}\n\n"
            ),
            _ => s += &format!("struct P{i} {{ int x, y; }};\nint dot{i}(P{i} a, P{i} b) {{ return a.x * b.x + a.y * b.y; }}\n\n"),
        }
    }
    s
}

#[test]
fn functions_that_fit_are_never_cut() {
    let text = corpus(120);
    for max_tokens in [60u64, 100, 250, 1000] {
        let budget = budget_bytes(max_tokens);
        let s = split(&text, budget);
        assert!(!s.parse_failed);
        // The pieces tile the text and respect the budget.
        let mut pos = 0;
        for p in &s.pieces {
            assert_eq!(p.start, pos);
            assert!(p.len() <= budget);
            pos = p.end;
        }
        assert_eq!(pos, text.len());
        // Every function that fits lies inside one piece.
        let funcs = function_ranges(&text);
        assert_eq!(funcs.len(), 180); // 30 + 90 (get, set, free) + 30 templates + 30
        for f in funcs.iter().filter(|f| f.len() <= budget) {
            assert!(
                s.pieces.iter().any(|p| p.start <= f.start && f.end <= p.end),
                "function cut at max_tokens={max_tokens}: {:?}",
                &text[f.clone()]
            );
        }
    }
}

#[test]
fn pieces_parse_back_to_whole_functions() {
    let text = corpus(80);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("proj");
    write(&root, "corpus.cpp", &text);
    let out = dir.path().join("out");
    let mut cfg = config(&[&root], &out, Mode::File);
    cfg.max_tokens = vec![120];
    let s = run_ok(&cfg);
    let docs = read_docs(&out);
    assert!(docs.len() > 5);
    assert_eq!(s.documents_split, 1);
    assert_eq!(s.pieces_from_splits, docs.len() as u64);
    let budget = budget_bytes(120);
    // Parse each output piece on its own and collect the functions it holds.
    let mut piece_funcs: Vec<String> = Vec::new();
    for d in &docs {
        assert!(d.tokens_est <= 120 && d.bytes <= budget);
        piece_funcs.extend(function_ranges(&d.text).into_iter().map(|r| d.text[r].to_string()));
    }
    // Every function of the original is found whole in a piece.
    for f in function_ranges(&text) {
        let ftext = &text[f];
        if ftext.len() <= budget {
            assert!(piece_funcs.iter().any(|p| p == ftext), "not whole in any piece: {ftext:?}");
        }
    }
    let joined: String = docs.iter().map(|d| d.text.as_str()).collect();
    assert_eq!(joined, text);
}

#[test]
fn a_function_over_budget_is_split_between_statements() {
    let stmts: String = (0..200).map(|i| format!("  total += compute({i}, {i} * 2);\n")).collect();
    let text = format!("int big() {{\n  int total = 0;\n{stmts}  return total;\n}}\n");
    let budget = 300;
    let s = split(&text, budget);
    assert!(s.pieces.len() > 1);
    assert!(!s.line_fallback);
    for p in &s.pieces {
        let piece = &text[p.clone()];
        assert!(piece.len() <= budget);
        // Cuts fall between statements: every piece ends at a line end.
        assert!(piece.ends_with('\n'), "{piece:?}");
    }
}

#[test]
fn a_class_over_budget_keeps_its_methods_whole() {
    let methods: String = (0..60).map(|i| format!("  int m{i}(int x) {{\n    return x + {i};\n  }}\n")).collect();
    let text = format!("namespace outer {{\nclass Big {{\n public:\n{methods}}};\n}}  // namespace outer\n");
    let budget = 200;
    let s = split(&text, budget);
    for f in function_ranges(&text) {
        assert!(s.pieces.iter().any(|p| p.start <= f.start && f.end <= p.end));
    }
}

#[test]
fn a_type_is_never_cut_from_its_semicolon() {
    // top-level `class C { ... }` and its `;` are two siblings in the tree: at some budgets
    // a piece ended at the `}` and the next began with `;`
    let text: String = (0..30).map(|i| format!("class C{i} {{\n public:\n  int v{i} = {i};\n}};\n\n")).collect();
    for budget in (50..300).step_by(3) {  // (each class and its ; fit: at most 44 bytes)
        let s = split(&text, budget);
        let joined: String = s.pieces.iter().map(|p| &text[p.clone()]).collect();
        assert_eq!(joined, text);
        for p in &s.pieces {
            assert!(!text[p.clone()].trim_start().starts_with(';'), "budget {budget}: {:?}", &text[p.clone()]);
        }
    }
}
