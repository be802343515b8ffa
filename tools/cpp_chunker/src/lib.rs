//! cpp_chunker: turns C/C++ project trees into training documents written as JSONL shards.
//!
//! * [`discover`] walks a root (symlinks never followed) and lists C/C++ files;
//! * [`load`] reads a file and applies the skip rules (size, binary, generated, ...);
//! * [`docs`] builds `file` and `crossfile` documents, using [`includes`] for include
//!   resolution and ordering and [`split`] to cut oversized text at syntax boundaries;
//! * [`entities`] cuts a file into top-level entities with the names they define and
//!   use, and [`compilable`] builds `compilable` documents (a unit reordered: preamble,
//!   types in dependency order, functions callees first) and `project` documents
//!   (crossfile plus definitions pulled through a project-wide symbol index);
//! * [`dedup`] drops exact and near duplicates (MinHash/LSH) across the whole run;
//! * [`output`] writes shards (through the dedup filter) and the summary atomically;
//! * [`pipeline::run`] ties it together, in parallel over files with rayon, reading and
//!   parsing once for all the token budgets (length buckets) of a run;
//! * `fuzzing` (hidden) holds the invariant checks that the fuzz target and
//!   `tests/fuzz_smoke.rs` run on arbitrary input.
//!
//! Tokens are estimated as bytes / 3.5 ([`tokens`]); there is no tokenizer here.

pub mod compilable;
pub mod config;
pub mod cpp;
pub mod dedup;
pub mod discover;
pub mod docs;
pub mod entities;
#[doc(hidden)]
pub mod fuzzing;
pub mod includes;
pub mod load;
pub mod output;
pub mod pipeline;
pub mod pp;
pub mod split;
pub mod stats;
pub mod tokens;

pub use config::{Config, Mode};
pub use dedup::DedupMode;
pub use docs::Document;
pub use pipeline::{run, Summary};
pub use stats::SkipReason;
