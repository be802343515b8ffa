//! Building documents: `file` mode (one file per document) and `crossfile` mode (a source
//! file preceded by the project headers it includes).

use serde::{Deserialize, Serialize};

use crate::includes::order_headers;
use crate::load::SourceFile;
use crate::split::split;
use crate::stats::Stats;
use crate::tokens::estimate_tokens;

/// Every file in a crossfile document starts with this marker, then its root-relative path.
pub const FILE_MARKER: &str = "// FILE: ";

/// One line of a JSONL shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Document {
    pub text: String,
    pub project: String,
    /// Root-relative paths of the files whose text is in `text`, in order.
    pub files: Vec<String>,
    pub mode: String,
    /// `text.len()` in bytes (UTF-8).
    pub bytes: usize,
    /// `ceil(bytes / 3.5)`: an estimate, not a tokenizer count.
    pub tokens_est: u64,
}

impl Document {
    pub fn new(text: String, project: &str, files: Vec<String>, mode: &str) -> Document {
        let bytes = text.len();
        Document {
            text,
            project: project.to_string(),
            files,
            mode: mode.to_string(),
            bytes,
            tokens_est: estimate_tokens(bytes),
        }
    }
}

/// Splits `text` if over `budget` and turns each non-blank piece into a document.
pub fn split_into_documents(
    text: String,
    project: &str,
    files: Vec<String>,
    mode: &str,
    budget: usize,
    stats: &mut Stats,
) -> Vec<Document> {
    if text.len() <= budget {
        return vec![Document::new(text, project, files, mode)];
    }
    let s = split(&text, budget);
    stats.documents_split += 1;
    stats.pieces_from_splits += s.pieces.len() as u64;
    stats.line_split_fallbacks += u64::from(s.line_fallback);
    stats.parse_failures += u64::from(s.parse_failed);
    let mut out = Vec::with_capacity(s.pieces.len());
    for p in s.pieces {
        let piece = &text[p];
        if piece.trim().is_empty() {
            stats.blank_pieces_dropped += 1;
            continue;
        }
        out.push(Document::new(piece.to_string(), project, files.clone(), mode));
    }
    out
}

/// `file` mode: the file's text as is (split if over budget).
pub fn file_documents(project: &str, f: &SourceFile, budget: usize, stats: &mut Stats) -> Vec<Document> {
    split_into_documents(f.text.clone(), project, vec![f.rel.clone()], "file", budget, stats)
}

/// The text of one file inside a crossfile document: marker line, content, final newline.
pub fn part_text(rel: &str, text: &str) -> String {
    let nl = if text.ends_with('\n') { "" } else { "\n" };
    format!("{FILE_MARKER}{rel}\n{text}{nl}")
}

/// The project headers of `files[source]` kept for its document: those it includes
/// (transitively, each once, dependencies first), minus, when the headers and the source
/// together are over `budget`, the farthest ones (largest include distance, then latest
/// in the order) until they fit. `edges[i]` lists the resolved includes of `files[i]`.
pub fn select_headers(
    files: &[SourceFile],
    edges: &[Vec<usize>],
    source: usize,
    budget: usize,
    stats: &mut Stats,
) -> Vec<usize> {
    let ho = order_headers(source, edges);
    stats.include_cycles += ho.cycles;
    let sizes: Vec<usize> = ho.order.iter().map(|&h| part_text(&files[h].rel, &files[h].text).len()).collect();
    let mut kept = vec![true; sizes.len()];
    let mut total: usize = part_text(&files[source].rel, &files[source].text).len() + sizes.iter().sum::<usize>();
    // Drop candidates, farthest first; ties: the later one in the order first.
    let mut drop_order: Vec<usize> = (0..sizes.len()).collect();
    drop_order.sort_by(|&a, &b| ho.depth[b].cmp(&ho.depth[a]).then(b.cmp(&a)));
    for i in drop_order {
        if total <= budget {
            break;
        }
        kept[i] = false;
        total -= sizes[i];
        stats.headers_dropped_for_budget += 1;
    }
    let out: Vec<usize> = ho.order.iter().zip(&kept).filter(|(_, k)| **k).map(|(h, _)| *h).collect();
    stats.headers_included += out.len() as u64;
    out
}

/// `crossfile` mode for `files[source]`: the headers [`select_headers`] keeps, then the
/// source itself; if the source alone is still over budget it is split like in `file`
/// mode.
pub fn crossfile_documents(
    project: &str,
    files: &[SourceFile],
    edges: &[Vec<usize>],
    source: usize,
    budget: usize,
    stats: &mut Stats,
) -> Vec<Document> {
    let headers = select_headers(files, edges, source, budget, stats);
    let mut text = String::new();
    let mut names = Vec::new();
    for &h in &headers {
        text.push_str(&part_text(&files[h].rel, &files[h].text));
        names.push(files[h].rel.clone());
    }
    text.push_str(&part_text(&files[source].rel, &files[source].text));
    names.push(files[source].rel.clone());
    split_into_documents(text, project, names, "crossfile", budget, stats)
}
