//! Run configuration (what the CLI fills in).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::dedup::{DedupMode, DEFAULT_NEAR_THRESHOLD};
use crate::load::DEFAULT_MAX_FILE_BYTES;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One document per C/C++ file.
    File,
    /// One document per source file, preceded by the project headers it includes.
    Crossfile,
    /// Crossfile plus the definitions the source uses from other project files.
    Project,
    /// A source file and its project headers reordered into a near-compilable unit.
    Compilable,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::File => "file",
            Mode::Crossfile => "crossfile",
            Mode::Project => "project",
            Mode::Compilable => "compilable",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    /// Project roots, processed in this order; each is one `project`.
    pub roots: Vec<PathBuf>,
    pub mode: Mode,
    /// Token budgets per document (tokens estimated as bytes / 3.5), one length bucket
    /// each: with one, the output goes into `out`; with several, into
    /// `out/tokens_<N>/` ([`bucket_dirs`]). Every file is read and parsed once for all.
    pub max_tokens: Vec<u64>,
    /// Output directory (optional only with `parse_only`).
    pub out: Option<PathBuf>,
    pub shard_docs: usize,
    /// Worker threads; 0 = one per core.
    pub threads: usize,
    pub max_file_bytes: u64,
    /// Only read and parse every file; write no documents.
    pub parse_only: bool,
    /// Replace shards and summary already in `out`.
    pub overwrite: bool,
    /// Duplicate removal across the run (`near` also drops exact duplicates).
    pub dedup: DedupMode,
    /// `near` mode: estimated Jaccard at or above which a document is dropped, in (0, 1].
    pub near_threshold: f64,
    /// Testing aid: panic while processing the file with this root-relative path, to
    /// exercise the `internal_error` path. Always `None` in the CLI.
    #[doc(hidden)]
    pub panic_on: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            roots: Vec::new(),
            mode: Mode::File,
            max_tokens: vec![16384],
            out: None,
            shard_docs: 10_000,
            threads: 0,
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
            parse_only: false,
            overwrite: false,
            dedup: DedupMode::Near,
            near_threshold: DEFAULT_NEAR_THRESHOLD,
            panic_on: None,
        }
    }
}

/// The output directory of each budget in `max_tokens`, in the same order: `out` itself
/// for a single budget (the layout of a one-bucket run does not change), else
/// `out/tokens_<N>` per budget `N`.
pub fn bucket_dirs(out: &Path, max_tokens: &[u64]) -> Vec<PathBuf> {
    match max_tokens {
        [_] => vec![out.to_path_buf()],
        _ => max_tokens.iter().map(|n| out.join(format!("tokens_{n}"))).collect(),
    }
}

/// Reads a roots file: one directory per line; blank lines and lines starting with `#`
/// are ignored; relative paths are taken relative to the roots file's directory.
pub fn read_roots_file(path: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let base = path.parent().unwrap_or_else(|| Path::new(""));
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let p = PathBuf::from(l);
            if p.is_absolute() {
                p
            } else {
                base.join(p)
            }
        })
        .collect())
}
