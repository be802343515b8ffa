//! Fuzz target for the parser-to-document path: the input is a file's content (decoded
//! lossily, like the loader), split and turned into `file` and `crossfile` documents; see
//! `cpp_chunker::fuzzing::fuzz_check` for the invariants checked.
//!
//!     cd tools/cpp_chunker && cargo +nightly fuzz run documents fuzz/corpus/documents fuzz/seeds

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    cpp_chunker::fuzzing::fuzz_check(data);
});
