//! The fuzz target's checks (`cpp_chunker::fuzzing::fuzz_check`) on stable Rust: over every
//! seed input (`fuzz/seeds/`: the inputs of the crate's tests, as files) and regression
//! input (`fuzz/regressions/`), then over a few thousand deterministic mutations of them
//! (fixed seed): byte flips, inserted braces, quotes, comment openers, `#if`, NUL, invalid
//! UTF-8, truncations, deep nesting, splices.

use std::fs;
use std::path::Path;

use cpp_chunker::fuzzing::{fuzz_check, PART_SEPARATOR};

const MUTATED_CASES: usize = 3000;
const MAX_LEN: usize = 6000;

fn read_dir_sorted(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let Ok(entries) = fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<(String, Vec<u8>)> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), fs::read(&p).unwrap()))
        .collect();
    files.sort();
    files
}

fn inputs(sub: &str) -> Vec<(String, Vec<u8>)> {
    read_dir_sorted(&Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz").join(sub))
}

/// Runs `fuzz_check` and names the input if it panics.
fn check(name: &str, data: &[u8]) {
    if let Err(e) = std::panic::catch_unwind(|| fuzz_check(data)) {
        let msg = e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()));
        panic!(
            "fuzz_check failed on {name} ({} bytes: {:?}): {}",
            data.len(),
            String::from_utf8_lossy(data),
            msg.unwrap_or_default()
        );
    }
}

#[test]
fn seeds_and_regressions() {
    let seeds = inputs("seeds");
    assert!(seeds.len() >= 20, "fuzz/seeds/ is missing");
    for (name, data) in seeds.iter().chain(inputs("regressions").iter()) {
        check(name, data);
    }
    check("empty", b"");
}

/// splitmix64: small, deterministic, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

#[rustfmt::skip]
const TOKENS: &[&[u8]] = &[
    b"{", b"}", b"(", b")", b"[", b"]", b"<", b">", b"\"", b"'", b"/*", b"*/", b"//", b"\\\n", b"#if", b"#if 0\n",
    b"#else\n", b"#endif\n", b"#define X(a) {a\n", b"#include \"a.h\"\n", b"#include <p/b.hpp>\n", b"\0", b"\xff",
    b"\xc3", b"\xe2\x82", b"\xf0\x9f\x98", b"\xef\xbb\xbf", b"\xe9", b"\n", b"\r\n", b"\t", b";", b"R\"x(", b")x\"",
    b"template <", b"namespace n {", b"class C {", b"extern \"C\" {", b"\xc3\xa9", b"\xf0\x9f\x98\x80", &[PART_SEPARATOR],
];

fn mutate(rng: &mut Rng, data: &mut Vec<u8>, other: &[u8]) {
    let pos = rng.below(data.len() + 1);
    match rng.below(9) {
        0 if !data.is_empty() => {
            let i = rng.below(data.len());
            data[i] ^= 1 << rng.below(8);
        }
        1 | 2 => {
            let t = TOKENS[rng.below(TOKENS.len())];
            data.splice(pos..pos, t.iter().copied());
        }
        3 => data.truncate(pos),
        4 => {
            let end = (pos + rng.below(64)).min(data.len());
            data.drain(pos..end);
        }
        5 => {
            // Deep nesting: many openers (balanced or not).
            let (open, close): (&[u8], &[u8]) =
                [(&b"{"[..], &b"}"[..]), (b"(", b")"), (b"{\n", b"}\n"), (b"[", b"]")][rng.below(4)];
            let depth = 1 + rng.below(800);
            let mut nest = open.repeat(depth);
            if rng.below(2) == 0 {
                nest.extend(close.repeat(depth));
            }
            data.splice(pos..pos, nest);
        }
        6 if !other.is_empty() => {
            // Splice in a slice of another input.
            let a = rng.below(other.len());
            let b = (a + 1 + rng.below(400)).min(other.len());
            data.splice(pos..pos, other[a..b].iter().copied());
        }
        7 if !data.is_empty() => {
            // Duplicate a range.
            let a = rng.below(data.len());
            let b = (a + 1 + rng.below(200)).min(data.len());
            let dup = data[a..b].to_vec();
            data.splice(pos..pos, dup);
        }
        _ => data.insert(pos, rng.next() as u8),
    }
}

#[test]
fn mutated_inputs() {
    let seeds: Vec<Vec<u8>> = inputs("seeds").into_iter().map(|(_, d)| d).filter(|d| d.len() <= MAX_LEN).collect();
    assert!(!seeds.is_empty());
    let mut rng = Rng(0x5eed_c0de);
    for case in 0..MUTATED_CASES {
        let mut data = seeds[rng.below(seeds.len())].clone();
        let other = &seeds[rng.below(seeds.len())];
        for _ in 0..1 + rng.below(4) {
            mutate(&mut rng, &mut data, other);
        }
        data.truncate(MAX_LEN);
        check(&format!("mutation {case}"), &data);
    }
}
