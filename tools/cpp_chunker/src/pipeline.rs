//! The run: walk each root, process its files in parallel (rayon), write documents in a
//! deterministic order (input order, independent of the thread count), write the summary.
//! With several token budgets (length buckets) the files are read, resolved and parsed once;
//! only the documents are made, deduplicated and written once per budget, each into its
//! own directory with its own summary.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::compilable::{compilable_documents, inlinable_headers, project_documents, SymbolIndex};
use crate::config::{bucket_dirs, Config, Mode};
use crate::cpp;
use crate::dedup::{DedupSummary, Deduper};
use crate::discover::{discover, Candidate, FileKind};
use crate::docs::{crossfile_documents, file_documents, select_headers, Document};
use crate::entities::{self, Entity};
use crate::includes::{extract_includes, IncludeKind, ProjectIndex};
use crate::load::{load, SourceFile};
use crate::output::{prepare_out_dir, write_atomic, ShardWriter};
use crate::pp;
use crate::stats::{SkipReason, Stats};
use crate::tokens::{budget_bytes, BYTES_PER_TOKEN};

/// Files handled per parallel batch in `file` and parse-only modes (bounds memory).
const BATCH_FILES: usize = 2048;

/// What `summary.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub tool_version: String,
    /// "file", "crossfile", "project", "compilable" or "parse_only".
    pub mode: String,
    pub roots: Vec<String>,
    pub projects: u64,
    pub roots_missing: u64,
    pub max_tokens: u64,
    pub budget_bytes: u64,
    pub bytes_per_token_est: f64,
    pub max_file_bytes: u64,
    pub threads: usize,
    /// C/C++ files (by extension) found, symlinks included.
    pub files_seen: u64,
    /// C/C++ files that passed every rule and were read.
    pub files_used: u64,
    pub non_cpp_files: u64,
    pub symlinks_not_followed: u64,
    pub walk_errors: u64,
    /// Skipped C/C++ files per reason (every reason listed); `internal_error` counts
    /// caught panics.
    pub skipped: BTreeMap<String, u64>,
    pub skipped_total: u64,
    pub lossy_utf8_files: u64,
    /// Bytes on disk of the files used; `mb_per_s` is based on this.
    pub bytes_read: u64,
    pub documents_written: u64,
    pub shards_written: u64,
    pub bytes_written: u64,
    pub tokens_est_written: u64,
    pub documents_split: u64,
    pub pieces_from_splits: u64,
    pub line_split_fallbacks: u64,
    pub blank_pieces_dropped: u64,
    pub includes_resolved: u64,
    pub quoted_includes_unresolved: u64,
    /// Include back edges ignored, summed over documents (a cycle met by two sources
    /// counts twice).
    pub include_cycles: u64,
    pub headers_included: u64,
    pub headers_dropped_for_budget: u64,
    /// crossfile: headers that no source file includes, even transitively (not emitted).
    pub headers_never_included: u64,
    pub files_parsed: u64,
    pub files_with_parse_errors: u64,
    pub parse_failures: u64,
    /// compilable / project: units built (a source file, or in a project without
    /// sources, a header no other header includes).
    pub compilable_units: u64,
    /// compilable: dependency cycles among declarations / functions broken by source order.
    pub type_cycles_broken: u64,
    pub call_cycles_broken: u64,
    /// compilable: units kept in source order, for a directive whose meaning depends on its
    /// place (`#undef`, `#pragma pack`, push/pop_macro, diagnostic pragmas).
    pub source_order_units: u64,
    /// compilable / project: files whose conditional groups or braces could not be cut
    /// into entities cleanly, kept as one entity each (see `entities::extract_checked`).
    pub files_kept_whole: u64,
    /// compilable: documents left out because their `#if`/`#endif` or braces did not
    /// balance (pieces of one over-budget entity cut by the splitter).
    pub unbalanced_documents_dropped: u64,
    /// project: definitions pulled from other files, and those left out for the budget.
    pub definitions_pulled: u64,
    pub definitions_dropped_for_budget: u64,
    /// Dedup settings and counts (`dedup`, `exact_duplicates_dropped`, ...), at top level.
    #[serde(flatten)]
    pub dedup: DedupSummary,
    /// Wall-clock seconds for the whole run (walk, read, process, write), all buckets together.
    pub seconds: f64,
    /// `bytes_read / 1e6 / seconds`.
    pub mb_per_s: f64,
}

fn guarded<T>(f: impl FnOnce() -> T) -> Option<T> {
    catch_unwind(AssertUnwindSafe(f)).ok()
}

fn project_name(root: &Path) -> String {
    root.canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| root.display().to_string())
}

/// Loads one candidate, counting the outcome into a fresh `Stats`.
fn load_counted(c: &Candidate, cfg: &Config) -> (Stats, Option<SourceFile>) {
    let mut s = Stats::default();
    let result = guarded(|| {
        if cfg.panic_on.as_deref() == Some(c.rel.as_str()) {
            panic!("test-only panic on {}", c.rel);
        }
        load(c, cfg.max_file_bytes)
    });
    match result {
        None => {
            s.skip(SkipReason::InternalError);
            (s, None)
        }
        Some(Err(reason)) => {
            s.skip(reason);
            (s, None)
        }
        Some(Ok(f)) => {
            s.files_used += 1;
            s.bytes_read += f.raw_len as u64;
            s.lossy_utf8_files += u64::from(f.lossy);
            (s, Some(f))
        }
    }
}

/// One length bucket: a token budget, its shard writer (with a dedup state of its own,
/// since each budget makes different documents) and the counters of the steps that depend
/// on the budget (building, splitting, writing). The steps that do not (walk, read,
/// include resolution, parsing) run once for all buckets and count into a shared `Stats`,
/// added to each bucket's when its summary is made.
struct Bucket {
    max_tokens: u64,
    budget: usize,
    out: PathBuf,
    writer: ShardWriter,
    stats: Stats,
}

/// What a run counted outside any bucket.
struct RunTotals {
    stats: Stats,
    projects: u64,
    roots_missing: u64,
    threads: usize,
    seconds: f64,
}

/// Runs the whole job described by `cfg` and returns (and, with `out`, writes) one summary
/// per budget in `cfg.max_tokens`, in that order; with `parse_only`, a single summary
/// (budgets play no part, the first is reported).
pub fn run(cfg: &Config) -> Result<Vec<Summary>> {
    let start = Instant::now();
    let Some(&first_budget) = cfg.max_tokens.first() else { bail!("no token budget given") };
    let mut seen = HashSet::new();
    if let Some(n) = cfg.max_tokens.iter().find(|&&n| !seen.insert(n)) {
        bail!("the token budget {n} is listed twice"); // two buckets would share a directory
    }
    let pool = rayon::ThreadPoolBuilder::new().num_threads(cfg.threads).build().context("starting the thread pool")?;
    let mut buckets = Vec::new();
    match (&cfg.out, cfg.parse_only) {
        (Some(out), true) => prepare_out_dir(out, cfg.overwrite)?,
        (Some(out), false) => {
            for (&max_tokens, dir) in cfg.max_tokens.iter().zip(bucket_dirs(out, &cfg.max_tokens)) {
                prepare_out_dir(&dir, cfg.overwrite)?;
                let dedup = Deduper::new(cfg.dedup, cfg.near_threshold)?;
                buckets.push(Bucket {
                    max_tokens,
                    budget: budget_bytes(max_tokens),
                    writer: ShardWriter::new(&dir, cfg.shard_docs).with_dedup(dedup),
                    out: dir,
                    stats: Stats::default(),
                });
            }
        }
        (None, true) => {}
        (None, false) => bail!("an output directory is required unless parse_only is set"),
    }

    let mut stats = Stats::default();
    let mut projects = 0u64;
    let mut roots_missing = 0u64;
    for root in &cfg.roots {
        if !root.is_dir() {
            eprintln!("cpp_chunker: warning: {} is not a directory; skipped", root.display());
            roots_missing += 1;
            continue;
        }
        projects += 1;
        let name = project_name(root);
        let disc = discover(root);
        stats.merge(&disc.stats);
        pool.install(|| -> Result<()> {
            if cfg.parse_only {
                parse_only_project(&disc.candidates, cfg, &mut stats);
                return Ok(());
            }
            match cfg.mode {
                Mode::File => file_project(&name, &disc.candidates, cfg, &mut stats, &mut buckets),
                Mode::Crossfile => crossfile_project(&name, &disc.candidates, cfg, &mut stats, &mut buckets),
                Mode::Project | Mode::Compilable => {
                    unit_project(&name, &disc.candidates, cfg, &mut stats, &mut buckets)
                }
            }
        })?;
    }
    for b in &mut buckets {
        pool.install(|| b.writer.finish())?; // in the pool: the last dedup batch is hashed in parallel
    }

    let seconds = start.elapsed().as_secs_f64();
    let totals = RunTotals { stats, projects, roots_missing, threads: pool.current_num_threads(), seconds };
    let summaries: Vec<(Option<&Path>, Summary)> = if cfg.parse_only {
        vec![(cfg.out.as_deref(), summary(cfg, &totals, first_budget, None))]
    } else {
        buckets.iter().map(|b| (Some(b.out.as_path()), summary(cfg, &totals, b.max_tokens, Some(b)))).collect()
    };
    for (out, s) in &summaries {
        if let Some(out) = out {
            let mut json = serde_json::to_vec_pretty(s)?;
            json.push(b'\n');
            write_atomic(&out.join("summary.json"), &json).context("writing summary.json")?;
        }
    }
    Ok(summaries.into_iter().map(|(_, s)| s).collect())
}

/// The summary of one bucket (`None`: a parse-only run): the shared counts plus the
/// bucket's own, so it equals that of a run with this budget alone, timing aside.
fn summary(cfg: &Config, totals: &RunTotals, max_tokens: u64, bucket: Option<&Bucket>) -> Summary {
    let mut stats = totals.stats.clone();
    if let Some(b) = bucket {
        stats.merge(&b.stats);
    }
    let w = bucket.map(|b| &b.writer);
    let seconds = totals.seconds;
    Summary {
        tool_version: env!("CARGO_PKG_VERSION").to_string(),
        mode: if cfg.parse_only { "parse_only".into() } else { cfg.mode.as_str().into() },
        roots: cfg.roots.iter().map(|r| r.display().to_string()).collect(),
        projects: totals.projects,
        roots_missing: totals.roots_missing,
        max_tokens,
        budget_bytes: budget_bytes(max_tokens) as u64,
        bytes_per_token_est: BYTES_PER_TOKEN,
        max_file_bytes: cfg.max_file_bytes,
        threads: totals.threads,
        files_seen: stats.files_seen,
        files_used: stats.files_used,
        non_cpp_files: stats.non_cpp_files,
        symlinks_not_followed: stats.symlinks_not_followed,
        walk_errors: stats.walk_errors,
        skipped: stats.skipped_by_name(),
        skipped_total: stats.skipped.values().sum(),
        lossy_utf8_files: stats.lossy_utf8_files,
        bytes_read: stats.bytes_read,
        documents_written: w.map_or(0, |w| w.docs_written),
        shards_written: w.map_or(0, |w| w.shards_written),
        bytes_written: w.map_or(0, |w| w.bytes_written),
        tokens_est_written: w.map_or(0, |w| w.tokens_written),
        documents_split: stats.documents_split,
        pieces_from_splits: stats.pieces_from_splits,
        line_split_fallbacks: stats.line_split_fallbacks,
        blank_pieces_dropped: stats.blank_pieces_dropped,
        includes_resolved: stats.includes_resolved,
        quoted_includes_unresolved: stats.quoted_includes_unresolved,
        include_cycles: stats.include_cycles,
        headers_included: stats.headers_included,
        headers_dropped_for_budget: stats.headers_dropped_for_budget,
        headers_never_included: stats.headers_never_included,
        files_parsed: stats.files_parsed,
        files_with_parse_errors: stats.files_with_parse_errors,
        parse_failures: stats.parse_failures,
        compilable_units: stats.compilable_units,
        type_cycles_broken: stats.type_cycles_broken,
        call_cycles_broken: stats.call_cycles_broken,
        source_order_units: stats.source_order_units,
        files_kept_whole: stats.files_kept_whole,
        unbalanced_documents_dropped: stats.unbalanced_documents_dropped,
        definitions_pulled: stats.definitions_pulled,
        definitions_dropped_for_budget: stats.definitions_dropped_for_budget,
        dedup: w.map(ShardWriter::dedup_summary).unwrap_or_default(),
        seconds,
        mb_per_s: if seconds > 0.0 { stats.bytes_read as f64 / 1e6 / seconds } else { 0.0 },
    }
}

/// `file` mode, in batches of files: each batch is read once, then made into documents
/// for every bucket.
fn file_project(
    name: &str,
    cands: &[Candidate],
    cfg: &Config,
    stats: &mut Stats,
    buckets: &mut [Bucket],
) -> Result<()> {
    for batch in cands.chunks(BATCH_FILES) {
        let files = load_all(batch, cfg, stats);
        let all: Vec<usize> = (0..files.len()).collect();
        write_units(&all, buckets, |i, budget, s| file_documents(name, &files[i], budget, s))?;
    }
    Ok(())
}

/// Loads `cands` in parallel; the files that pass the skip rules, in input order.
fn load_all(cands: &[Candidate], cfg: &Config, stats: &mut Stats) -> Vec<SourceFile> {
    let loaded: Vec<(Stats, Option<SourceFile>)> = cands.par_iter().map(|c| load_counted(c, cfg)).collect();
    let mut files = Vec::new();
    for (s, f) in loaded {
        stats.merge(&s);
        files.extend(f);
    }
    files
}

/// A project's files (sources and headers), loaded, with their resolved includes.
struct Loaded {
    files: Vec<SourceFile>,
    edges: Vec<Vec<usize>>,
    index: ProjectIndex,
}

fn load_and_resolve(name: &str, cands: &[Candidate], cfg: &Config, stats: &mut Stats) -> Loaded {
    let files = load_all(cands, cfg, stats);
    let paths: Vec<&str> = files.iter().map(|f| f.rel.as_str()).collect();
    let mut index = ProjectIndex::new(&paths);
    index.root_name = Some(name.to_string());
    let loaded: HashSet<&str> = paths.iter().copied().collect();
    // (not symlinks: one usually points at a file of the project, which the search then finds)
    index.skipped = cands
        .iter()
        .filter(|c| c.pre_skip != Some(SkipReason::Symlink) && !loaded.contains(c.rel.as_str()))
        .map(|c| c.rel.clone())
        .collect();
    let resolved: Vec<(Stats, Vec<usize>)> = files
        .par_iter()
        .map(|f| {
            guarded(|| {
                let mut s = Stats::default();
                let mut edges: Vec<usize> = Vec::new();
                for inc in extract_includes(&f.text) {
                    match index.resolve(&f.rel, &inc) {
                        Some(t) => {
                            s.includes_resolved += 1;
                            if !edges.contains(&t) {
                                edges.push(t);
                            }
                        }
                        None if inc.kind == IncludeKind::Quoted => s.quoted_includes_unresolved += 1,
                        None => {}
                    }
                }
                (s, edges)
            })
            .unwrap_or_else(internal_error)
        })
        .collect();
    let mut edges = Vec::with_capacity(resolved.len());
    for (s, e) in resolved {
        stats.merge(&s);
        edges.push(e);
    }
    Loaded { files, edges, index }
}

fn internal_error<T: Default>() -> (Stats, T) {
    let mut s = Stats::default();
    s.skip(SkipReason::InternalError);
    (s, T::default())
}

/// Counts the headers that none of `units` reaches through includes.
fn count_unreached_headers(l: &Loaded, units: &[usize], stats: &mut Stats) {
    let mut reached = vec![false; l.files.len()];
    let mut queue: VecDeque<usize> = units.iter().copied().collect();
    for &s in units {
        reached[s] = true;
    }
    while let Some(n) = queue.pop_front() {
        for &c in &l.edges[n] {
            if !reached[c] {
                reached[c] = true;
                queue.push_back(c);
            }
        }
    }
    stats.headers_never_included +=
        l.files.iter().enumerate().filter(|(i, f)| f.kind == FileKind::Header && !reached[*i]).count() as u64;
}

/// For each bucket in turn: runs `make(unit, budget_bytes, stats)` for every unit in
/// parallel and writes the documents in unit order.
fn write_units(
    units: &[usize],
    buckets: &mut [Bucket],
    make: impl Fn(usize, usize, &mut Stats) -> Vec<Document> + Sync,
) -> Result<()> {
    for b in buckets {
        let budget = b.budget;
        let results: Vec<(Stats, Vec<Document>)> = units
            .par_iter()
            .map(|&u| {
                guarded(|| {
                    let mut s = Stats::default();
                    let docs = make(u, budget, &mut s);
                    (s, docs)
                })
                .unwrap_or_else(internal_error)
            })
            .collect();
        for (s, docs) in results {
            b.stats.merge(&s);
            for d in &docs {
                b.writer.write(d)?;
            }
        }
    }
    Ok(())
}

fn crossfile_project(
    name: &str,
    cands: &[Candidate],
    cfg: &Config,
    stats: &mut Stats,
    buckets: &mut [Bucket],
) -> Result<()> {
    let l = load_and_resolve(name, cands, cfg, stats);
    let sources: Vec<usize> = (0..l.files.len()).filter(|&i| l.files[i].kind == FileKind::Source).collect();
    write_units(&sources, buckets, |i, budget, s| crossfile_documents(name, &l.files, &l.edges, i, budget, s))?;
    count_unreached_headers(&l, &sources, stats);
    Ok(())
}

/// `project` and `compilable` modes: every file is parsed once into entities; then one
/// unit per source file (in a project without sources, per header that no other header
/// includes, or per group of headers that include each other that none outside includes:
/// the entry points of a header-only library, `includes::entry_points`), made into
/// documents per bucket.
fn unit_project(
    name: &str,
    cands: &[Candidate],
    cfg: &Config,
    stats: &mut Stats,
    buckets: &mut [Bucket],
) -> Result<()> {
    let l = load_and_resolve(name, cands, cfg, stats);
    // the preprocessor scans first: the namespace macros of the whole project are needed
    // before any file is cut into entities
    let scans: Vec<pp::Scan> = l.files.par_iter().map(|f| guarded(|| pp::scan(&f.text)).unwrap_or_default()).collect();
    let mut macros = pp::NamespaceMacros::default();
    for s in &scans {
        macros.add(s);
    }
    let parsed: Vec<(Stats, Vec<Entity>)> = l
        .files
        .par_iter()
        .zip(scans)
        .map(|(f, scan)| {
            let mut s = Stats::default();
            let es = guarded(|| entities::extract_checked(&f.text, scan, &macros)).unwrap_or_else(|| {
                s.skip(SkipReason::InternalError);
                None
            });
            match es {
                Some((es, whole)) => {
                    s.files_parsed += 1;
                    s.files_kept_whole += u64::from(whole);
                    (s, es)
                }
                None => {
                    s.parse_failures += 1;
                    (s, vec![entities::opaque(&f.text)])
                }
            }
        })
        .collect();
    let mut ents = Vec::with_capacity(parsed.len());
    for (s, es) in parsed {
        stats.merge(&s);
        ents.push(es);
    }
    let mut units: Vec<usize> = (0..l.files.len()).filter(|&i| l.files[i].kind == FileKind::Source).collect();
    if units.is_empty() {
        units = crate::includes::entry_points(&l.edges);
    }
    match cfg.mode {
        Mode::Compilable => write_units(&units, buckets, |u, budget, s| {
            let kept = select_headers(&l.files, &l.edges, u, budget, s);
            let headers = inlinable_headers(&kept, &l.edges, u);
            compilable_documents(name, &l.files, &ents, &l.index, &headers, u, budget, s)
        })?,
        _ => {
            let symbols = SymbolIndex::new(&ents);
            write_units(&units, buckets, |u, budget, s| {
                let headers = select_headers(&l.files, &l.edges, u, budget, s);
                s.compilable_units += 1;
                project_documents(name, &l.files, &ents, &symbols, &headers, u, budget, s)
            })?
        }
    }
    count_unreached_headers(&l, &units, stats);
    Ok(())
}

fn parse_only_project(cands: &[Candidate], cfg: &Config, stats: &mut Stats) {
    for batch in cands.chunks(BATCH_FILES) {
        let results: Vec<Stats> = batch
            .par_iter()
            .map(|c| {
                let (mut s, f) = load_counted(c, cfg);
                let Some(f) = f else { return s };
                match guarded(|| cpp::parse(&f.text).map(|t| t.root_node().has_error())) {
                    Some(Some(has_error)) => {
                        s.files_parsed += 1;
                        s.files_with_parse_errors += u64::from(has_error);
                    }
                    Some(None) => s.parse_failures += 1,
                    None => s.skip(SkipReason::InternalError),
                }
                s
            })
            .collect();
        for s in results {
            stats.merge(&s);
        }
    }
}
