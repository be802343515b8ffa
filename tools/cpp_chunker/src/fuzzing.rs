//! Invariant checks for the parser-to-document path, shared by the cargo-fuzz target
//! (`fuzz/fuzz_targets/documents.rs`, nightly) and the stable smoke test
//! (`tests/fuzz_smoke.rs`).
//!
//! [`fuzz_check`] takes arbitrary bytes as the content of a file, decodes them like the
//! loader does (lossy UTF-8, leading BOM removed) and runs the document-building path on
//! them: [`split`] for two small budgets, `file` mode, and `crossfile` mode over a
//! small synthetic project made from the same bytes. It panics when a guarantee that
//! `split.rs` and `docs.rs` document is broken:
//!
//! * the pieces of a split tile the text: contiguous, on char boundaries, from 0 to the
//!   end, so putting them back together gives the input exactly;
//! * every piece is at most `budget` bytes, except a piece that is one single character
//!   wider than the budget (a budget below 4 bytes cannot hold every character);
//! * a syntax node that fits the budget is never cut: some piece holds all of it;
//! * `file` mode: a text within budget is one document, as is; a text over budget gives
//!   the non-blank pieces of the split, in order (blank ones are dropped and counted);
//! * `crossfile` mode: each header once, the source last, only headers the source
//!   reaches; the text is the `// FILE:` parts of those files; a text still over budget
//!   after dropping every header is the source alone, split as in `file` mode;
//! * `bytes` and `tokens_est` agree with the text.
//!
//! The content rules of the loader (binary, minified, ...) are run too, but the document
//! path is checked whatever they say: it must hold up on any text.

use std::ops::Range;

use crate::cpp;
use crate::discover::FileKind;
use crate::docs::{crossfile_documents, file_documents, part_text, Document, FILE_MARKER};
use crate::includes::{extract_includes, order_headers, ProjectIndex};
use crate::load::{check_content, decode, SourceFile};
use crate::split::{split, Split};
use crate::stats::Stats;
use crate::tokens::estimate_tokens;

/// Byte that separates the parts of the synthetic crossfile project in a fuzz input
/// (0xFE never occurs in UTF-8, so it cannot collide with text).
pub const PART_SEPARATOR: u8 = 0xFE;

/// Runs the document-building path on `data` and panics if an invariant is broken (see
/// the module docs). The budgets come from the input's first and last bytes: a tiny one
/// (1..=16 bytes) and a small one (48..=303 bytes); `file` and `crossfile` documents are
/// built with the small one.
pub fn fuzz_check(data: &[u8]) {
    let _ = check_content(data);
    let (text, _lossy) = decode(data.to_vec());
    let _ = extract_includes(&text);
    let first = usize::from(data.first().copied().unwrap_or(0));
    let last = usize::from(data.last().copied().unwrap_or(0));
    let tiny = 1 + first % 16;
    let small = 48 + last % 256;
    let nodes = node_ranges(&text);
    for budget in [tiny, small] {
        let s = split(&text, budget);
        check_split(&text, budget, &s, nodes.as_deref());
        if budget == small {
            check_file_documents(&text, budget, &s);
        }
    }
    check_crossfile(data, small);
    check_compilable(&text);
}

/// `compilable` on the text as one file: every entity is placed exactly once, and the
/// rendered unit holds every entity's code (reordering loses nothing).
fn check_compilable(text: &str) {
    let Some(es) = crate::entities::extract(text) else { return };
    // a file balanced as written gives balanced entities: groups and guards are never cut
    if crate::pp::balanced(text) {
        for e in &es {
            assert!(
                crate::pp::balanced(&e.text),
                "unbalanced entity {:?}: {:?}",
                crate::pp::structure_error(&e.text),
                e.text
            );
        }
    }
    let refs: Vec<&crate::entities::Entity> = es.iter().collect();
    let ord = crate::compilable::order(&refs);
    let mut seen = ord.order.clone();
    seen.sort_unstable();
    assert_eq!(seen, (0..es.len()).collect::<Vec<_>>(), "compilable order is not a permutation");
    let out = crate::compilable::render(&refs, &ord.order);
    for e in &es {
        assert!(out.contains(e.text.trim_end()), "entity lost by render: {:?}", e.text);
    }
}

/// Byte ranges of every non-empty node of the parse of `text`; `None` if it timed out.
fn node_ranges(text: &str) -> Option<Vec<Range<usize>>> {
    let tree = cpp::parse(text)?;
    let mut out = Vec::new();
    cpp::for_each_node(tree.root_node(), |n| {
        if n.start_byte() < n.end_byte() {
            out.push(n.byte_range());
        }
    });
    Some(out)
}

/// Pieces tile `text` on char boundaries and respect `budget`; a node that fits is whole
/// in one piece (`nodes`: every node of the parse, when known).
pub fn check_split(text: &str, budget: usize, s: &Split, nodes: Option<&[Range<usize>]>) {
    assert!(!s.pieces.is_empty(), "no pieces for a text of {} bytes", text.len());
    let mut pos = 0;
    for p in &s.pieces {
        assert_eq!(p.start, pos, "pieces are not contiguous: {:?}", s.pieces);
        assert!(p.start < p.end || text.is_empty(), "empty piece {p:?} in {:?}", s.pieces);
        assert!(text.is_char_boundary(p.start) && text.is_char_boundary(p.end), "piece {p:?} cuts a character");
        check_within_budget(&text[p.clone()], budget);
        pos = p.end;
    }
    assert_eq!(pos, text.len(), "pieces do not reach the end of the text");
    if text.len() <= budget {
        assert_eq!(s.pieces.len(), 1, "a text within budget is one piece");
        assert!(!s.line_fallback && !s.parse_failed);
        return;
    }
    if s.parse_failed {
        return;
    }
    let Some(nodes) = nodes else { return };
    for r in nodes.iter().filter(|r| r.len() <= budget) {
        // The first piece that ends after the node starts must hold all of it.
        let i = s.pieces.partition_point(|p| p.end <= r.start);
        let p = &s.pieces[i];
        assert!(
            p.start <= r.start && r.end <= p.end,
            "node {r:?} ({:?}) fits the budget {budget} but is cut; pieces {:?}",
            &text[r.clone()],
            s.pieces
        );
    }
}

/// At most `budget` bytes, or a single character (wider than a budget below 4 bytes).
fn check_within_budget(piece: &str, budget: usize) {
    assert!(
        piece.len() <= budget || piece.chars().count() == 1,
        "piece of {} bytes over the budget of {budget}: {piece:?}",
        piece.len()
    );
}

fn check_document(d: &Document, budget: usize) {
    assert_eq!(d.bytes, d.text.len());
    assert_eq!(d.tokens_est, estimate_tokens(d.bytes));
    check_within_budget(&d.text, budget);
}

/// The documents a text over budget becomes: the non-blank pieces of `s`, in order.
fn check_pieces_as_documents(text: &str, s: &Split, docs: &[Document], stats: &Stats) {
    let kept: Vec<&str> = s.pieces.iter().map(|p| &text[p.clone()]).filter(|t| !t.trim().is_empty()).collect();
    let got: Vec<&str> = docs.iter().map(|d| d.text.as_str()).collect();
    assert_eq!(got, kept, "documents are not the non-blank pieces of the split");
    assert_eq!(stats.documents_split, 1);
    assert_eq!(stats.pieces_from_splits, s.pieces.len() as u64);
    assert_eq!(stats.blank_pieces_dropped, (s.pieces.len() - kept.len()) as u64);
    assert_eq!(stats.line_split_fallbacks, u64::from(s.line_fallback));
    assert_eq!(stats.parse_failures, u64::from(s.parse_failed));
}

/// The documents of a split text, without splitting it again: non-blank, in order, and
/// what lies between them (and around them) is blank.
fn check_documents_cover(text: &str, docs: &[Document], stats: &Stats) {
    let mut pos = 0;
    for d in docs {
        assert!(!d.text.trim().is_empty(), "a blank document");
        let at = text[pos..].find(d.text.as_str()).expect("a document that is not in the text") + pos;
        assert!(text[pos..at].trim().is_empty(), "text lost between documents: {:?}", &text[pos..at]);
        pos = at + d.text.len();
    }
    assert!(text[pos..].trim().is_empty(), "text lost after the last document: {:?}", &text[pos..]);
    assert_eq!(stats.documents_split, 1);
    assert_eq!(stats.pieces_from_splits, docs.len() as u64 + stats.blank_pieces_dropped);
}

/// `file` mode on `text` as the file `src/fuzz.cpp`; `s` is `split(text, budget)`.
fn check_file_documents(text: &str, budget: usize, s: &Split) {
    let f = SourceFile {
        rel: "src/fuzz.cpp".into(),
        kind: FileKind::Source,
        text: text.to_string(),
        raw_len: text.len(),
        lossy: false,
    };
    let mut stats = Stats::default();
    let docs = file_documents("fuzz", &f, budget, &mut stats);
    for d in &docs {
        check_document(d, budget);
        assert_eq!(d.files, ["src/fuzz.cpp"]);
        assert_eq!(d.mode, "file");
        assert_eq!(d.project, "fuzz");
    }
    if text.len() <= budget {
        assert_eq!(docs.len(), 1);
        assert_eq!(docs[0].text, text);
        assert_eq!(stats.documents_split, 0);
    } else {
        check_pieces_as_documents(text, s, &docs, &stats);
    }
}

/// The four parts of the synthetic project: the input split at [`PART_SEPARATOR`] bytes
/// when there are any (parts past the fourth are dropped), else the text cut at the first
/// line ends after a third and two thirds of it; missing parts are empty.
fn parts(data: &[u8]) -> Vec<String> {
    let mut parts: Vec<String> = if data.contains(&PART_SEPARATOR) {
        data.split(|&b| b == PART_SEPARATOR).map(|p| decode(p.to_vec()).0).collect()
    } else {
        let text = decode(data.to_vec()).0;
        let cut = |frac: usize| -> usize {
            let mut i = text.len() * frac / 3;
            while i < text.len() && (!text.is_char_boundary(i) || (i > 0 && text.as_bytes()[i - 1] != b'\n')) {
                i += 1;
            }
            i
        };
        let (a, b) = (cut(1), cut(2));
        vec![text[..a].to_string(), text[a..b].to_string(), text[b..].to_string()]
    };
    parts.resize(4, String::new());
    parts
}

/// `crossfile` mode over a five-file project built from `data` (include chains, a cycle,
/// a source included by another source, and whatever includes the input itself holds).
fn check_crossfile(data: &[u8], budget: usize) {
    let p = parts(data);
    let specs: [(&str, FileKind, String); 5] = [
        ("include/p/a.h", FileKind::Header, format!("#include \"b.hpp\"\n{}", p[1])),
        ("include/p/b.hpp", FileKind::Header, format!("#include <p/a.h>\n{}", p[2])),
        ("src/main.cpp", FileKind::Source, format!("#include <p/a.h>\n#include \"util.h\"\n{}", p[0])),
        ("src/util.h", FileKind::Header, p[3].clone()),
        ("src/z.cc", FileKind::Source, format!("#include \"main.cpp\"\n#include \"../include/p/b.hpp\"\n{}", p[3])),
    ];
    let files: Vec<SourceFile> = specs
        .into_iter()
        .map(|(rel, kind, text)| SourceFile { rel: rel.into(), kind, raw_len: text.len(), text, lossy: false })
        .collect();
    // Include edges as the pipeline resolves them.
    let paths: Vec<&str> = files.iter().map(|f| f.rel.as_str()).collect();
    let index = ProjectIndex::new(&paths);
    let edges: Vec<Vec<usize>> = files
        .iter()
        .map(|f| {
            let mut e: Vec<usize> = Vec::new();
            for inc in extract_includes(&f.text) {
                if let Some(t) = index.resolve(&f.rel, &inc) {
                    if !e.contains(&t) {
                        e.push(t);
                    }
                }
            }
            e
        })
        .collect();
    for (source, f) in files.iter().enumerate().filter(|(_, f)| f.kind == FileKind::Source) {
        let mut stats = Stats::default();
        let docs = crossfile_documents("fuzz", &files, &edges, source, budget, &mut stats);
        assert!(!docs.is_empty(), "no crossfile document for {}", f.rel);
        let order = order_headers(source, &edges).order;
        let names = &docs[0].files;
        for d in &docs {
            check_document(d, budget);
            assert_eq!(&d.files, names, "the pieces of one document list different files");
            assert_eq!(d.mode, "crossfile");
        }
        // Each header once, reached from the source, in the dependency order; source last.
        assert_eq!(names.last(), Some(&f.rel));
        let mut pos = 0;
        for n in &names[..names.len() - 1] {
            let i = paths.iter().position(|p| p == n).expect("a project file");
            let at = order[pos..].iter().position(|&h| h == i).expect("a header the source reaches, in order");
            pos += at + 1;
        }
        assert_eq!(stats.headers_included + stats.headers_dropped_for_budget, order.len() as u64);
        let full: String = names
            .iter()
            .map(|n| part_text(n, &files[paths.iter().position(|p| p == n).expect("a project file")].text))
            .collect();
        if full.len() <= budget {
            assert_eq!(docs.len(), 1);
            assert_eq!(docs[0].text, full);
        } else {
            // Headers are dropped first, so a split document is the source alone.
            assert_eq!(names.len(), 1, "a document over budget still holds headers");
            assert!(docs[0].text.starts_with(FILE_MARKER), "the first piece starts with the marker");
            check_documents_cover(&full, &docs, &stats);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO: &str = "int f() { return 1; }\nint g() { return 2; }\n";

    fn pieces(v: Vec<Range<usize>>) -> Split {
        Split { pieces: v, line_fallback: false, parse_failed: false }
    }

    #[test]
    fn a_real_split_passes() {
        let s = split(TWO, 30);
        check_split(TWO, 30, &s, node_ranges(TWO).as_deref());
        fuzz_check(TWO.as_bytes());
        fuzz_check(b"");
    }

    #[test]
    #[should_panic(expected = "fits the budget 30 but is cut")]
    fn a_cut_node_is_caught() {
        check_split(TWO, 30, &pieces(vec![0..10, 10..22, 22..TWO.len()]), node_ranges(TWO).as_deref());
    }

    #[test]
    #[should_panic(expected = "over the budget")]
    fn a_piece_over_budget_is_caught() {
        check_split(TWO, 20, &pieces(vec![0..22, 22..TWO.len()]), None);
    }

    #[test]
    #[should_panic(expected = "not contiguous")]
    fn a_gap_is_caught() {
        check_split(TWO, 30, &pieces(vec![0..22, 23..TWO.len()]), None);
    }

    #[test]
    fn parts_of_an_input() {
        assert_eq!(parts(b"a\xfeb\xfe\xfec\xfed"), ["a", "b", "", "c"]); // the first four
        let p = parts(b"l1\nl2\nl3\nl4\n");
        assert_eq!(p.concat(), "l1\nl2\nl3\nl4\n");
        assert!(p[..3].iter().all(|x| x.is_empty() || x.ends_with('\n')));
        assert_eq!(p.len(), 4);
    }
}
