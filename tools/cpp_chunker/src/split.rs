//! Splitting a text that is over the byte budget at syntax boundaries.
//!
//! The text is parsed with tree-sitter-cpp and cut into *units*: contiguous byte ranges
//! that together cover the whole text. Starting from the translation unit, any unit over
//! the budget is replaced by units for its children (top-level declarations first, then
//! their children, and so on); a node that fits the budget is never cut. A leaf that is
//! still too large (a giant comment or string literal, or text that could not be parsed)
//! is cut at line boundaries, and a single line longer than the budget at UTF-8 character
//! boundaries. Units are then packed greedily, in order, into pieces of at most `budget`
//! bytes. Concatenating the pieces gives back the input exactly.
//!
//! Boundaries are moved back to the start of the line when only blanks precede the node
//! on that line (so indentation travels with the node), and a comment is kept with the
//! node that follows it (or with the previous node when it starts on the line where that
//! node ends). Everything is iterative: deeply nested input cannot overflow the stack.

use std::ops::Range;

use tree_sitter::Node;

use crate::cpp;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// Contiguous ranges covering `0..text.len()`, in order.
    pub pieces: Vec<Range<usize>>,
    /// Some unit had to be cut at line (or character) boundaries.
    pub line_fallback: bool,
    /// tree-sitter returned no tree (timeout); the whole text was cut by lines.
    pub parse_failed: bool,
}

/// Splits `text` into pieces of at most `budget` bytes (see the module docs).
pub fn split(text: &str, budget: usize) -> Split {
    let budget = budget.max(1);
    if text.len() <= budget {
        #[allow(clippy::single_range_in_vec_init)] // one piece: the whole text
        let pieces = vec![0..text.len()];
        return Split { pieces, line_fallback: false, parse_failed: false };
    }
    let mut units = Vec::new();
    let mut line_fallback = false;
    let mut parse_failed = false;
    match cpp::parse(text) {
        Some(tree) => atomize(text, tree.root_node(), budget, &mut units, &mut line_fallback),
        None => {
            parse_failed = true;
            line_fallback = true;
            line_units(text, 0..text.len(), budget, &mut units);
        }
    }
    let pieces = pack(text, &units, budget);
    Split { pieces, line_fallback, parse_failed }
}

struct Item<'t> {
    range: Range<usize>,
    nodes: Vec<Node<'t>>,
}

fn atomize<'t>(text: &str, root: Node<'t>, budget: usize, out: &mut Vec<Range<usize>>, fallback: &mut bool) {
    // Items are popped in document order, so units can be appended to `out` directly.
    let mut stack = vec![Item { range: 0..text.len(), nodes: vec![root] }];
    while let Some(item) = stack.pop() {
        let Range { start, end } = item.range;
        if end - start <= budget {
            out.push(start..end);
            continue;
        }
        let groups: Vec<Vec<Node<'t>>> = if item.nodes.len() > 1 {
            item.nodes.iter().map(|n| vec![*n]).collect()
        } else {
            let node = item.nodes[0];
            let ns = node.start_byte().clamp(start, end);
            let ne = node.end_byte().clamp(ns, end);
            if ne - ns <= budget {
                // The node fits; only the blanks around it push the item over budget.
                line_units(text, start..ns, budget, out);
                out.push(ns..ne);
                line_units(text, ne..end, budget, out);
                continue;
            }
            group_children(node)
        };
        if groups.is_empty() {
            *fallback = true;
            line_units(text, start..end, budget, out);
            continue;
        }
        let children = assign_ranges(text, start..end, groups);
        stack.extend(children.into_iter().rev());
    }
}

/// Children of `node` as groups of siblings: a comment is kept with the following
/// sibling, unless it starts on the row where the previous sibling ends (trailing comment);
/// a `;` stays with the sibling before it (at top level `class C { ... }` and its `;` are
/// two siblings, and a piece ended at the `}` with the next one starting at `;`).
fn group_children<'t>(node: Node<'t>) -> Vec<Vec<Node<'t>>> {
    let mut groups: Vec<Vec<Node<'t>>> = Vec::new();
    let mut pending: Vec<Node<'t>> = Vec::new();
    let mut cursor = node.walk();
    for child in node.children(&mut cursor) {
        if child.kind() == ";" && !child.is_named() && pending.is_empty() && !groups.is_empty() {
            groups.last_mut().expect("non-empty").push(child);
        } else if child.kind() == "comment" {
            if pending.is_empty() {
                if let Some(last) = groups.last_mut().and_then(|g| g.last().copied()) {
                    if last.end_position().row == child.start_position().row {
                        groups.last_mut().expect("non-empty").push(child);
                        continue;
                    }
                }
            }
            pending.push(child);
        } else {
            pending.push(child);
            groups.push(std::mem::take(&mut pending));
        }
    }
    if !pending.is_empty() {
        groups.push(pending);
    }
    groups
}

/// Gives each group a range so that the ranges tile `range`: a boundary sits at the
/// group's first byte, moved back to the line start when only blanks precede it.
fn assign_ranges<'t>(text: &str, range: Range<usize>, groups: Vec<Vec<Node<'t>>>) -> Vec<Item<'t>> {
    let Range { start, end } = range;
    let mut bounds = Vec::with_capacity(groups.len() + 1);
    bounds.push(start);
    let mut prev_end = start;
    for (i, g) in groups.iter().enumerate() {
        let gs = g[0].start_byte().clamp(start, end);
        let ge = g[g.len() - 1].end_byte().clamp(start, end);
        if i > 0 {
            let floor = prev_end.max(*bounds.last().expect("non-empty"));
            let b = back_to_line_start(text, gs.max(floor), floor);
            bounds.push(b);
        }
        prev_end = prev_end.max(ge);
    }
    bounds.push(end);
    groups.into_iter().enumerate().map(|(i, nodes)| Item { range: bounds[i]..bounds[i + 1], nodes }).collect()
}

/// `pos` moved back over spaces/tabs to the start of its line, if only blanks precede it
/// there; never before `floor`.
fn back_to_line_start(text: &str, pos: usize, floor: usize) -> usize {
    let b = text.as_bytes();
    let mut p = pos;
    while p > floor && (b[p - 1] == b' ' || b[p - 1] == b'\t') {
        p -= 1;
    }
    if p == floor || b[p - 1] == b'\n' {
        p
    } else {
        pos
    }
}

/// Cuts `range` at line ends; a line longer than `budget` is cut at char boundaries.
fn line_units(text: &str, range: Range<usize>, budget: usize, out: &mut Vec<Range<usize>>) {
    let b = text.as_bytes();
    let mut start = range.start;
    while start < range.end {
        let line_end = match b[start..range.end].iter().position(|&c| c == b'\n') {
            Some(i) => start + i + 1,
            None => range.end,
        };
        let mut s = start;
        while line_end - s > budget {
            let mut cut = s + budget;
            while cut > s && !text.is_char_boundary(cut) {
                cut -= 1;
            }
            if cut == s {
                // Budget smaller than one character: take the whole character.
                cut = s + 1;
                while cut < line_end && !text.is_char_boundary(cut) {
                    cut += 1;
                }
            }
            out.push(s..cut);
            s = cut;
        }
        out.push(s..line_end);
        start = line_end;
    }
}

/// Greedy packing of contiguous units into pieces of at most `budget` bytes.
fn pack(text: &str, units: &[Range<usize>], budget: usize) -> Vec<Range<usize>> {
    let mut pieces: Vec<Range<usize>> = Vec::new();
    let mut cur: Option<Range<usize>> = None;
    for u in units {
        if u.is_empty() {
            continue;
        }
        debug_assert!(cur.as_ref().is_none_or(|c| c.end == u.start), "units must be contiguous");
        cur = match cur {
            Some(c) if (u.end - c.start) <= budget => Some(c.start..u.end),
            Some(c) => {
                pieces.push(c);
                Some(u.clone())
            }
            None => Some(u.clone()),
        };
    }
    if let Some(c) = cur {
        pieces.push(c);
    }
    // Defensive: make the pieces tile the text exactly, on char boundaries.
    let mut fixed = Vec::with_capacity(pieces.len());
    let mut pos = 0;
    for (i, p) in pieces.iter().enumerate() {
        let mut e = if i + 1 == pieces.len() { text.len() } else { p.end.min(text.len()) };
        while e < text.len() && !text.is_char_boundary(e) {
            e += 1;
        }
        if e > pos {
            fixed.push(pos..e);
            pos = e;
        }
    }
    if fixed.is_empty() && !text.is_empty() {
        fixed.push(0..text.len());
    }
    fixed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_tiles(text: &str, s: &Split, budget: usize) {
        let mut pos = 0;
        for p in &s.pieces {
            assert_eq!(p.start, pos);
            assert!(p.len() <= budget, "piece of {} > budget {}", p.len(), budget);
            pos = p.end;
        }
        assert_eq!(pos, text.len());
    }

    #[test]
    fn small_text_is_one_piece() {
        let s = split("int x;\n", 100);
        assert_eq!(s.pieces.len(), 1);
        assert_eq!(s.pieces[0], 0..7);
    }

    #[test]
    fn splits_between_top_level_functions() {
        let f = |i: usize| format!("int f{i}(int x) {{\n    return x + {i};\n}}\n\n");
        let text: String = (0..10).map(f).collect();
        let one = f(0).len();
        let s = split(&text, one * 3);
        check_tiles(&text, &s, one * 3);
        assert!(!s.line_fallback);
        for p in &s.pieces {
            let piece = &text[p.clone()];
            assert!(piece.starts_with("int f"), "{piece:?}");
            assert!(piece.ends_with("}\n\n"), "{piece:?}");
        }
    }

    #[test]
    fn comment_stays_with_following_function() {
        let text = "// doc for a\nint a() { return 1; }\n// doc for b\nint b() { return 2; }\n";
        let s = split(text, 40);
        let pieces: Vec<&str> = s.pieces.iter().map(|p| &text[p.clone()]).collect();
        assert_eq!(pieces, vec!["// doc for a\nint a() { return 1; }\n", "// doc for b\nint b() { return 2; }\n"]);
    }

    #[test]
    fn oversized_leaf_falls_back_to_lines() {
        let text = format!("/*\n{}*/\nint x;\n", "a comment line\n".repeat(50));
        let s = split(&text, 64);
        check_tiles(&text, &s, 64);
        assert!(s.line_fallback);
    }

    #[test]
    fn very_long_line_is_cut_on_char_boundaries() {
        let text = format!("const char* s = \"{}\";\n", "é".repeat(500));
        let s = split(&text, 33);
        check_tiles(&text, &s, 33);
        for p in &s.pieces {
            assert!(text.is_char_boundary(p.start) && text.is_char_boundary(p.end));
        }
    }

    #[test]
    fn tiny_budget_still_terminates() {
        let text = "namespace n { int é() { return 0; } }\n";
        let s = split(text, 1);
        let joined: String = s.pieces.iter().map(|p| &text[p.clone()]).collect();
        assert_eq!(joined, text);
    }
}
