//! cpp_chunker: turns C/C++ project trees into training documents written as JSONL shards.
//!
//! * [`discover`] walks a root (symlinks never followed) and lists C/C++ files;
//! * [`load`] reads a file and applies the skip rules (size, binary, generated, ...);
//! * [`docs`] builds `file` and `crossfile` documents, using [`includes`] for include
//!   resolution and ordering and [`split`] to cut oversized text at syntax boundaries;
//! * [`output`] writes shards and the summary atomically;
//! * [`pipeline::run`] ties it together, in parallel over files with rayon;
//! * `fuzzing` (hidden) holds the invariant checks that the fuzz target and
//!   `tests/fuzz_smoke.rs` run on arbitrary input.
//!
//! Tokens are estimated as bytes / 3.5 ([`tokens`]); there is no tokenizer here.

pub mod config;
pub mod cpp;
pub mod discover;
pub mod docs;
#[doc(hidden)]
pub mod fuzzing;
pub mod includes;
pub mod load;
pub mod output;
pub mod pipeline;
pub mod split;
pub mod stats;
pub mod tokens;

pub use config::{Config, Mode};
pub use docs::Document;
pub use pipeline::{run, Summary};
pub use stats::SkipReason;
