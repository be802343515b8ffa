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
fn split_into_documents(
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

/// `crossfile` mode for `files[source]`: the project headers it includes (transitively,
/// each once, dependencies first) and then the source itself. `edges[i]` lists the
/// resolved includes of `files[i]`. When over budget, headers are dropped farthest first
/// (largest include distance, then latest in the order); if the source alone is still over
/// budget it is split like in `file` mode.
pub fn crossfile_documents(
    project: &str,
    files: &[SourceFile],
    edges: &[Vec<usize>],
    source: usize,
    budget: usize,
    stats: &mut Stats,
) -> Vec<Document> {
    let ho = order_headers(source, edges);
    stats.include_cycles += ho.cycles;
    let parts: Vec<String> = ho.order.iter().map(|&h| part_text(&files[h].rel, &files[h].text)).collect();
    let src_part = part_text(&files[source].rel, &files[source].text);
    let mut kept = vec![true; parts.len()];
    let mut total: usize = src_part.len() + parts.iter().map(String::len).sum::<usize>();
    // Drop candidates, farthest first; ties: the later one in the order first.
    let mut drop_order: Vec<usize> = (0..parts.len()).collect();
    drop_order.sort_by(|&a, &b| ho.depth[b].cmp(&ho.depth[a]).then(b.cmp(&a)));
    for i in drop_order {
        if total <= budget {
            break;
        }
        kept[i] = false;
        total -= parts[i].len();
        stats.headers_dropped_for_budget += 1;
    }
    let mut text = String::with_capacity(total);
    let mut names = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        if kept[i] {
            text.push_str(part);
            names.push(files[ho.order[i]].rel.clone());
            stats.headers_included += 1;
        }
    }
    text.push_str(&src_part);
    names.push(files[source].rel.clone());
    split_into_documents(text, project, names, "crossfile", budget, stats)
}
