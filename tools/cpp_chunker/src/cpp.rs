//! tree-sitter-cpp parsing helpers.

use std::ops::{ControlFlow, Range};
use std::time::{Duration, Instant};

use tree_sitter::{Node, ParseOptions, ParseState, Parser, Tree};

/// A parse taking longer than this is abandoned (callers then fall back to line splits).
pub const PARSE_TIMEOUT: Duration = Duration::from_secs(30);

/// Parses `text` as C++. `None` if the grammar cannot be loaded or the parse timed out.
/// tree-sitter never fails on malformed input: it produces ERROR/MISSING nodes instead.
pub fn parse(text: &str) -> Option<Tree> {
    parse_with_timeout(text, PARSE_TIMEOUT)
}

pub fn parse_with_timeout(text: &str, timeout: Duration) -> Option<Tree> {
    let mut parser = Parser::new();
    parser.set_language(&tree_sitter_cpp::LANGUAGE.into()).ok()?;
    let bytes = text.as_bytes();
    let deadline = Instant::now() + timeout;
    let mut progress = |_: &ParseState| {
        if Instant::now() > deadline {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    };
    let mut input = |i: usize, _| if i < bytes.len() { &bytes[i..] } else { &[][..] };
    parser.parse_with_options(&mut input, None, Some(ParseOptions::new().progress_callback(&mut progress)))
}

/// Visits every node in pre-order without recursion (safe on deeply nested input).
pub fn for_each_node<'t>(root: Node<'t>, mut f: impl FnMut(Node<'t>)) {
    let mut cursor = root.walk();
    loop {
        f(cursor.node());
        if cursor.goto_first_child() {
            continue;
        }
        loop {
            if cursor.goto_next_sibling() {
                break;
            }
            if !cursor.goto_parent() {
                return;
            }
        }
    }
}

/// Byte ranges of every `function_definition` node (nested ones included), in pre-order.
pub fn function_ranges(text: &str) -> Vec<Range<usize>> {
    let Some(tree) = parse(text) else { return Vec::new() };
    let mut out = Vec::new();
    for_each_node(tree.root_node(), |n| {
        if n.kind() == "function_definition" {
            out.push(n.byte_range());
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grammar_loads_and_parses() {
        let tree = parse("namespace a { int f(int x) { return x; } }\n").unwrap();
        assert_eq!(tree.root_node().kind(), "translation_unit");
        assert!(!tree.root_node().has_error());
    }

    #[test]
    fn malformed_code_still_parses() {
        let tree = parse("class { int f( { ;;; } } }} template<<< #if\n").unwrap();
        assert!(tree.root_node().has_error());
    }

    #[test]
    fn finds_functions() {
        let src = "int f() { return 1; }\nstruct S { void g() {} };\n";
        let r = function_ranges(src);
        assert_eq!(r.len(), 2);
        assert_eq!(&src[r[0].clone()], "int f() { return 1; }");
        assert_eq!(&src[r[1].clone()], "void g() {}");
    }
}
