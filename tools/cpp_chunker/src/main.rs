//! Command-line front end; all the work is in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgGroup, Parser, ValueEnum};

use cpp_chunker::config::read_roots_file;
use cpp_chunker::dedup::DEFAULT_NEAR_THRESHOLD;
use cpp_chunker::load::DEFAULT_MAX_FILE_BYTES;
use cpp_chunker::{run, Config, DedupMode, Mode};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ModeArg {
    /// One document per C/C++ file.
    File,
    /// A source file preceded by the project headers it includes.
    Crossfile,
    /// Crossfile plus the definitions the source uses from other project files.
    Project,
    /// A source file and its project headers reordered into a near-compilable unit.
    Compilable,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DedupArg {
    /// Keep every document.
    None,
    /// Drop exact duplicates (same text after normalizing whitespace at line ends and blank lines).
    Exact,
    /// Drop exact and near duplicates (MinHash/LSH over 5-token shingles).
    Near,
}

fn threshold(s: &str) -> Result<f64, String> {
    let t: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if t > 0.0 && t <= 1.0 {
        Ok(t)
    } else {
        Err(format!("{t} is not in (0, 1]"))
    }
}

/// Turn C/C++ project roots into JSONL training documents.
///
/// Tokens are estimated as bytes / 3.5 (no tokenizer is run).
#[derive(Parser, Debug)]
#[command(name = "cpp_chunker", version)]
#[command(group(ArgGroup::new("input").required(true).args(["roots", "roots_file"])))]
struct Cli {
    /// Project root directories (each one is a `project`).
    #[arg(long, num_args = 1.., value_name = "DIR")]
    roots: Vec<PathBuf>,
    /// File listing project roots, one per line (`#` comments allowed).
    #[arg(long, value_name = "FILE")]
    roots_file: Option<PathBuf>,
    /// Document mode.
    #[arg(long, value_enum, default_value_t = ModeArg::File)]
    mode: ModeArg,
    /// Token budget per document; tokens are estimated as bytes / 3.5. Several budgets
    /// (comma-separated) make one length bucket each, in DIR/tokens_N/, from a single pass
    /// of reading and parsing.
    #[arg(long, value_name = "N[,N...]", value_delimiter = ',', default_value = "16384",
          value_parser = clap::value_parser!(u64).range(1..))]
    max_tokens: Vec<u64>,
    /// Output directory for shard_NNNNN.jsonl and summary.json (in DIR/tokens_N/ per budget
    /// when --max-tokens lists several).
    #[arg(long, value_name = "DIR", required_unless_present = "parse_only")]
    out: Option<PathBuf>,
    /// Documents per shard.
    #[arg(long, default_value_t = 10000, value_parser = clap::value_parser!(u64).range(1..))]
    shard_docs: u64,
    /// Worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Skip files larger than this many bytes.
    #[arg(long, default_value_t = DEFAULT_MAX_FILE_BYTES)]
    max_file_bytes: u64,
    /// Only read and parse every file, report MB/s; write no documents.
    #[arg(long)]
    parse_only: bool,
    /// Replace shards and summary.json already in --out.
    #[arg(long)]
    overwrite: bool,
    /// Duplicate removal across all projects of the run; the first document seen is kept.
    #[arg(long, value_enum, default_value_t = DedupArg::Near)]
    dedup: DedupArg,
    /// `--dedup near`: drop a document whose estimated Jaccard similarity (5-token shingles)
    /// to an earlier kept document is at least this.
    #[arg(long, default_value_t = DEFAULT_NEAR_THRESHOLD, value_parser = threshold)]
    near_threshold: f64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let roots = match &cli.roots_file {
        Some(f) => match read_roots_file(f) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("cpp_chunker: error: {e:#}");
                return ExitCode::from(2);
            }
        },
        None => cli.roots.clone(),
    };
    let cfg = Config {
        roots,
        mode: match cli.mode {
            ModeArg::File => Mode::File,
            ModeArg::Crossfile => Mode::Crossfile,
            ModeArg::Project => Mode::Project,
            ModeArg::Compilable => Mode::Compilable,
        },
        max_tokens: cli.max_tokens.clone(),
        out: cli.out.clone(),
        shard_docs: usize::try_from(cli.shard_docs).unwrap_or(usize::MAX),
        threads: cli.threads,
        max_file_bytes: cli.max_file_bytes,
        parse_only: cli.parse_only,
        overwrite: cli.overwrite,
        dedup: match cli.dedup {
            DedupArg::None => DedupMode::None,
            DedupArg::Exact => DedupMode::Exact,
            DedupArg::Near => DedupMode::Near,
        },
        near_threshold: cli.near_threshold,
        panic_on: None,
    };
    match run(&cfg) {
        Ok(summaries) => {
            // one budget: the summary object, as in summary.json; several: an array of them
            let json = match summaries.as_slice() {
                [s] => serde_json::to_string_pretty(s),
                all => serde_json::to_string_pretty(all),
            };
            match json {
                Ok(j) => println!("{j}"),
                Err(e) => eprintln!("cpp_chunker: error: {e}"),
            }
            for s in &summaries {
                let bucket = if summaries.len() > 1 { format!("tokens_{}: ", s.max_tokens) } else { String::new() };
                eprintln!(
                    "cpp_chunker: {bucket}{} files seen, {} used, {} skipped, {} exact + {} near duplicates dropped (dedup {}), {} documents in {} shards, {:.1} MB read in {:.2} s ({:.2} MB/s, {} threads)",
                    s.files_seen,
                    s.files_used,
                    s.skipped_total,
                    s.dedup.exact_duplicates_dropped,
                    s.dedup.near_duplicates_dropped,
                    s.dedup.mode,
                    s.documents_written,
                    s.shards_written,
                    s.bytes_read as f64 / 1e6,
                    s.seconds,
                    s.mb_per_s,
                    s.threads
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cpp_chunker: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
