//! Deduplication of documents across a whole run: exact (hash of normalized text) and near
//! (MinHash over token shingles, with LSH banding to find candidates).
//!
//! Documents are checked one by one, in output order, which is input order: roots in the
//! order given, then files by path. The first document seen is kept and later copies are
//! dropped, so the result does not depend on `--threads`. Dedup covers every project of a
//! run: a file duplicated inside one project is dropped, and so is a file repeated in a
//! later project. With several token budgets (length buckets) each bucket is deduplicated
//! on its own, as its documents differ. Dedup works on *documents*, not files: one piece of a split file can be
//! dropped while its other pieces are kept. Only hashes and signatures are kept in memory,
//! never texts.
//!
//! # Exact duplicates
//!
//! The text is normalized first: every line loses its trailing whitespace (spaces, tabs,
//! `\r`, so CRLF and LF files compare equal), lines that are then empty are removed
//! (blank-line runs and leading or trailing blank lines included), and each remaining line
//! ends with `\n`. Indentation and everything else is kept. The 128-bit key is two 64-bit
//! hashes of the normalized bytes with different seeds ([`hash_bytes`]). A document whose
//! key equals that of any earlier document (kept or dropped) is an exact duplicate. With
//! 128 bits, a false match among `N` documents has probability about `N^2 / 2^129`.
//!
//! # Near duplicates
//!
//! **Tokens.** Whitespace separates tokens and is otherwise ignored. A token is a maximal
//! run of ASCII letters, digits, `_` and non-ASCII characters (identifiers, numbers,
//! keywords), or any other single character (`{`, `;`, `<`, ...). Each token is hashed
//! with [`hash_bytes`].
//!
//! **Shingles.** The shingle set `S(d)` of a document holds the hashes of all runs of
//! `n = 5` consecutive tokens ([`SHINGLE_TOKENS`]); a document with fewer than 5 tokens has
//! one shingle, made of all its tokens. The resemblance of two documents is the Jaccard
//! similarity of their shingle sets:
//!
//! ```text
//! J(A, B) = |S(A) ∩ S(B)| / |S(A) ∪ S(B)|
//! ```
//!
//! **MinHash** (A. Z. Broder, "On the resemblance and containment of documents",
//! Compression and Complexity of Sequences 1997). With `k = 128` hash functions
//! ([`NUM_PERM`]) `h_i(x) = (a_i·x + b_i) mod p`, `p = 2^61 − 1`, `a_i ∈ [1, p)`,
//! `b_i ∈ [0, p)` fixed (drawn from splitmix64 with a fixed seed), the signature is
//!
//! ```text
//! sig_i(A) = min over x in S(A) of h_i(x),    i = 1..k
//! Pr[sig_i(A) = sig_i(B)] = J(A, B)
//! Ĵ(A, B) = (1/k) · #{ i : sig_i(A) = sig_i(B) },   E[Ĵ] = J,   Var[Ĵ] = J(1 − J)/k
//! ```
//!
//! (exact for min-wise independent permutations, approximate for this linear family applied
//! to 64-bit shingle hashes; a unit test checks `Ĵ` against the exact `J`). The standard deviation is at most `0.5/√128 ≈ 0.044`.
//! Each slot is stored as the low 32 bits of the minimum (512 bytes per signature); two
//! different minima agree on them with probability `2^-32`, which is negligible.
//!
//! **LSH banding** (Leskovec, Rajaraman, Ullman, *Mining of Massive Datasets*, ch. 3). The
//! `k` slots are cut into `b` bands of `r` rows (`b·r = k`). Two documents are a candidate
//! pair when all `r` slots of at least one band agree, which for `J = s` happens with
//! probability
//!
//! ```text
//! P(s) = 1 − (1 − s^r)^b
//! ```
//!
//! an S-curve that rises steeply around `(1/b)^(1/r)`. [`lsh_params`] picks the largest `r`
//! (power of two) whose `P(t) ≥ 0.9` at the threshold `t`. For the default `t = 0.8` this is
//! `b = 16, r = 8` (steepest around `0.71`): `P(0.5) = 0.06`, `P(0.7) = 0.61`,
//! `P(0.8) = 0.95`, `P(0.85) = 0.994`, `P(0.9) = 0.9999`.
//!
//! **Check.** A candidate pair is a near duplicate only if `Ĵ ≥ t` (default `t = 0.8`,
//! `--near-threshold`); then the later document is dropped. Only kept documents enter the
//! LSH index. At most [`MAX_CANDIDATES`] earlier documents are checked per document, so a
//! huge bucket (many files sharing one boilerplate block) cannot make the run quadratic; a
//! document that reaches this cap is kept unless a match was found before it, and the
//! cases are counted (`near_candidate_cap_hits`).
//!
//! **Memory.** About 1 KB per kept document in `near` mode (signature, band index, exact
//! key), 16 bytes plus table overhead per document in `exact` mode.
//!
//! **Hashing.** Everything is hashed here, with fixed seeds, so results are the same on
//! every run and platform: [`mix64`] is the splitmix64 step (Steele, Lea, Flood 2014;
//! finalizer constants of Stafford's "Mix13"), and [`hash_bytes`] folds little-endian
//! 8-byte words into it, the length first.

use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};

/// Hash functions (signature slots) per MinHash signature: `k`.
pub const NUM_PERM: usize = 128;
/// Tokens per shingle: `n`.
pub const SHINGLE_TOKENS: usize = 5;
/// Default `--near-threshold` (estimated Jaccard at or above which a document is dropped).
pub const DEFAULT_NEAR_THRESHOLD: f64 = 0.8;
/// [`lsh_params`] picks bands so that a pair exactly at the threshold becomes a candidate
/// with at least this probability.
pub const LSH_RECALL_AT_THRESHOLD: f64 = 0.9;
/// Earlier documents checked (`Ĵ` computed) at most per document.
pub const MAX_CANDIDATES: usize = 1000;

/// The Mersenne prime `2^61 − 1`, modulus of the MinHash functions.
const P61: u64 = (1 << 61) - 1;
const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;
const SEED_EXACT_1: u64 = 0x243F_6A88_85A3_08D3; // digits of pi
const SEED_EXACT_2: u64 = 0x1319_8A2E_0370_7344;
const SEED_TOKEN: u64 = 0xA409_3822_299F_31D0;
const SEED_SHINGLE: u64 = 0x082E_FA98_EC4E_6C89;
const SEED_PERM: u64 = 0x4528_21E6_38D0_1377;
const SEED_BAND: u64 = 0xBE54_66CF_34E9_0C6C;

/// `--dedup`: what is removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DedupMode {
    /// Keep every document.
    None,
    /// Drop exact duplicates (after normalization) only.
    Exact,
    /// Drop exact duplicates and near duplicates (MinHash/LSH).
    Near,
}

impl DedupMode {
    pub fn as_str(self) -> &'static str {
        match self {
            DedupMode::None => "none",
            DedupMode::Exact => "exact",
            DedupMode::Near => "near",
        }
    }
}

/// One splitmix64 step: add the golden gamma, then the Mix13 finalizer. A bijection on
/// `u64` with good avalanche.
#[inline]
pub fn mix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(GOLDEN_GAMMA);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// 64-bit hash of `bytes`: the state starts as `mix64(seed ^ len·gamma)` and every
/// little-endian 8-byte word `w` (the last one zero-padded) updates it to `mix64(state ^ w)`.
pub fn hash_bytes(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = mix64(seed ^ (bytes.len() as u64).wrapping_mul(GOLDEN_GAMMA));
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        h = mix64(h ^ u64::from_le_bytes(w.try_into().expect("8 bytes")));
    }
    let rest = words.remainder();
    if !rest.is_empty() {
        let mut buf = [0u8; 8];
        buf[..rest.len()].copy_from_slice(rest);
        h = mix64(h ^ u64::from_le_bytes(buf));
    }
    h
}

/// The text that exact dedup compares: trailing whitespace of every line removed, empty
/// lines removed, every line ending with `\n`.
pub fn normalize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.split('\n') {
        let line = line.trim_end();
        if !line.is_empty() {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// 128-bit key of the normalized text.
pub fn exact_key(text: &str) -> u128 {
    let n = normalize(text);
    (u128::from(hash_bytes(SEED_EXACT_1, n.as_bytes())) << 64) | u128::from(hash_bytes(SEED_EXACT_2, n.as_bytes()))
}

fn is_word_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b >= 0x80
}

/// The tokens of `text`, in order (see the module doc).
pub fn tokens(text: &str) -> Vec<&str> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_whitespace() {
            i += 1;
        } else if is_word_byte(b[i]) {
            let start = i;
            while i < b.len() && is_word_byte(b[i]) {
                i += 1;
            }
            out.push(&text[start..i]);
        } else {
            out.push(&text[i..i + 1]);
            i += 1;
        }
    }
    out
}

/// Hashes of the shingles of `text`, in text order (repeats included): each is the hash of
/// [`SHINGLE_TOKENS`] consecutive token hashes. Fewer tokens than that: one shingle of all.
pub fn shingles(text: &str) -> Vec<u64> {
    let toks: Vec<u64> = tokens(text).iter().map(|t| hash_bytes(SEED_TOKEN, t.as_bytes())).collect();
    if toks.is_empty() {
        return Vec::new();
    }
    let n = SHINGLE_TOKENS.min(toks.len());
    toks.windows(n).map(|w| w.iter().fold(SEED_SHINGLE, |h, &t| mix64(h ^ t))).collect()
}

/// A MinHash signature: `NUM_PERM` slots, low 32 bits of each minimum.
pub type Signature = Vec<u32>;

/// `v mod p` for `v < 2^124` (so `a·x + b` with `a, x, b < p = 2^61 − 1` fits), using
/// `2^61 ≡ 1 (mod p)`.
#[inline]
fn mod_p(v: u128) -> u64 {
    let s = (v as u64 & P61) + (v >> 61) as u64; // < 2^61 + 2^63
    let s = (s & P61) + (s >> 61); // <= p + 15
    if s >= P61 {
        s - P61
    } else {
        s
    }
}

/// The `k` hash functions of the signatures.
#[derive(Debug, Clone)]
pub struct MinHasher {
    a: [u64; NUM_PERM],
    b: [u64; NUM_PERM],
}

impl Default for MinHasher {
    fn default() -> Self {
        MinHasher::new()
    }
}

impl MinHasher {
    pub fn new() -> MinHasher {
        let mut state = SEED_PERM;
        let mut next = |lo: u64| loop {
            state = state.wrapping_add(GOLDEN_GAMMA);
            let v = mix64(state) >> 3; // < 2^61
            if v >= lo && v < P61 {
                return v;
            }
        };
        let mut a = [0u64; NUM_PERM];
        let mut b = [0u64; NUM_PERM];
        for i in 0..NUM_PERM {
            a[i] = next(1);
            b[i] = next(0);
        }
        MinHasher { a, b }
    }

    /// Signature of a shingle set (`None` when it is empty). Repeated shingles do not change
    /// the minima.
    pub fn signature(&self, shingles: &[u64]) -> Option<Signature> {
        if shingles.is_empty() {
            return None;
        }
        // Repeats do not change the minima: hash each distinct shingle once.
        let mut distinct = shingles.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        let mut mins = [u64::MAX; NUM_PERM];
        for &s in &distinct {
            let x = mod_p(u128::from(s));
            for ((m, &a), &b) in mins.iter_mut().zip(&self.a).zip(&self.b) {
                *m = (*m).min(mod_p(u128::from(a) * u128::from(x) + u128::from(b)));
            }
        }
        Some(mins.iter().map(|&m| m as u32).collect())
    }
}

/// `Ĵ`: the fraction of equal slots.
pub fn estimated_jaccard(a: &[u32], b: &[u32]) -> f64 {
    debug_assert_eq!(a.len(), b.len());
    let eq = a.iter().zip(b).filter(|(x, y)| x == y).count();
    eq as f64 / a.len().max(1) as f64
}

/// `P(s) = 1 − (1 − s^r)^b`: probability that a pair with Jaccard `s` shares a band.
pub fn s_curve(s: f64, bands: usize, rows: usize) -> f64 {
    1.0 - (1.0 - s.powi(rows as i32)).powi(bands as i32)
}

/// `(bands, rows)` for a threshold: the largest power-of-two `r` dividing `k` with
/// `P(threshold) ≥ LSH_RECALL_AT_THRESHOLD`. `(16, 8)` for 0.8.
pub fn lsh_params(threshold: f64) -> (usize, usize) {
    let mut best = (NUM_PERM, 1);
    let mut r = 1;
    while r <= NUM_PERM {
        if s_curve(threshold, NUM_PERM / r, r) >= LSH_RECALL_AT_THRESHOLD {
            best = (NUM_PERM / r, r);
        }
        r *= 2;
    }
    best
}

/// What dedup needs to know about one document; computed in parallel, without the index.
#[derive(Debug, Clone)]
pub struct Fingerprint {
    pub exact: u128,
    /// `None` in `exact` mode or for a text without tokens.
    pub signature: Option<Signature>,
}

/// What [`Deduper::admit`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    ExactDuplicate,
    NearDuplicate,
}

/// Documents dropped from one project.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectDrops {
    pub exact: u64,
    pub near: u64,
    pub bytes: u64,
}

/// The dedup part of `summary.json` (flattened into it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DedupSummary {
    /// "none", "exact" or "near".
    #[serde(rename = "dedup")]
    pub mode: String,
    pub near_threshold: f64,
    pub minhash_k: usize,
    pub shingle_tokens: usize,
    pub lsh_bands: usize,
    pub lsh_rows: usize,
    pub exact_duplicates_dropped: u64,
    pub near_duplicates_dropped: u64,
    pub exact_duplicate_bytes_dropped: u64,
    pub near_duplicate_bytes_dropped: u64,
    /// Earlier documents whose `Ĵ` was computed (LSH candidates).
    pub near_candidates_checked: u64,
    /// Documents whose candidate list was cut at `MAX_CANDIDATES`.
    pub near_candidate_cap_hits: u64,
    /// Dropped documents per project (only projects with drops). Projects with the same
    /// directory name share an entry.
    pub dedup_dropped_by_project: BTreeMap<String, ProjectDrops>,
}

impl Default for DedupSummary {
    fn default() -> Self {
        Deduper::new(DedupMode::None, DEFAULT_NEAR_THRESHOLD).expect("valid default").summary()
    }
}

const NO_DOC: u32 = u32::MAX;

/// The state of a run's dedup: exact keys seen, and the LSH index of kept documents.
#[derive(Debug, Clone)]
pub struct Deduper {
    mode: DedupMode,
    threshold: f64,
    bands: usize,
    rows: usize,
    hasher: MinHasher,
    exact_seen: HashSet<u128>,
    /// Signatures of kept documents, `NUM_PERM` slots each, by index-document id.
    signatures: Vec<u32>,
    /// Band key -> most recent document id in that bucket.
    heads: HashMap<u64, u32>,
    /// `next[id·bands + band]`: the previous document in the same bucket, or `NO_DOC`.
    next: Vec<u32>,
    /// `stamp[id]`: the last query that checked document `id` (no double checks).
    stamp: Vec<u32>,
    queries: u32,
    /// [`MAX_CANDIDATES`]; lowered by a test.
    max_candidates: usize,
    summary: DedupSummary,
}

impl Deduper {
    pub fn new(mode: DedupMode, threshold: f64) -> Result<Deduper> {
        ensure!(threshold > 0.0 && threshold <= 1.0, "the near threshold must be in (0, 1], got {threshold}");
        let (bands, rows) = lsh_params(threshold);
        let summary = DedupSummary {
            mode: mode.as_str().into(),
            near_threshold: threshold,
            minhash_k: NUM_PERM,
            shingle_tokens: SHINGLE_TOKENS,
            lsh_bands: bands,
            lsh_rows: rows,
            exact_duplicates_dropped: 0,
            near_duplicates_dropped: 0,
            exact_duplicate_bytes_dropped: 0,
            near_duplicate_bytes_dropped: 0,
            near_candidates_checked: 0,
            near_candidate_cap_hits: 0,
            dedup_dropped_by_project: BTreeMap::new(),
        };
        Ok(Deduper {
            mode,
            threshold,
            bands,
            rows,
            hasher: MinHasher::new(),
            exact_seen: HashSet::new(),
            signatures: Vec::new(),
            heads: HashMap::new(),
            next: Vec::new(),
            stamp: Vec::new(),
            queries: 0,
            max_candidates: MAX_CANDIDATES,
            summary,
        })
    }

    pub fn mode(&self) -> DedupMode {
        self.mode
    }

    pub fn summary(&self) -> DedupSummary {
        self.summary.clone()
    }

    /// The per-document work (hashing, shingling, MinHash). Pure: run it in parallel.
    pub fn fingerprint(&self, text: &str) -> Fingerprint {
        let signature = match self.mode {
            DedupMode::Near => self.hasher.signature(&shingles(text)),
            DedupMode::Exact | DedupMode::None => None,
        };
        Fingerprint { exact: exact_key(text), signature }
    }

    fn band_key(&self, sig: &[u32], band: usize) -> u64 {
        let rows = &sig[band * self.rows..(band + 1) * self.rows];
        rows.iter().fold(mix64(SEED_BAND ^ band as u64), |h, &v| mix64(h ^ u64::from(v)))
    }

    /// Whether an indexed document has `Ĵ ≥ threshold` with `sig`.
    fn find_near(&mut self, sig: &[u32]) -> bool {
        self.queries = self.queries.wrapping_add(1);
        if self.queries == 0 {
            // Wrapped around: old stamps could match again.
            self.stamp.fill(0);
            self.queries = 1;
        }
        let query = self.queries;
        let mut checked = 0usize;
        for band in 0..self.bands {
            let Some(&head) = self.heads.get(&self.band_key(sig, band)) else { continue };
            let mut id = head;
            while id != NO_DOC {
                let i = id as usize;
                if self.stamp[i] != query {
                    self.stamp[i] = query;
                    if checked == self.max_candidates {
                        self.summary.near_candidate_cap_hits += 1;
                        return false;
                    }
                    checked += 1;
                    self.summary.near_candidates_checked += 1;
                    let other = &self.signatures[i * NUM_PERM..(i + 1) * NUM_PERM];
                    if estimated_jaccard(sig, other) >= self.threshold {
                        return true;
                    }
                }
                id = self.next[i * self.bands + band];
            }
        }
        false
    }

    fn index(&mut self, sig: &[u32]) {
        let id = u32::try_from(self.stamp.len()).expect("fewer than 2^32 - 1 indexed documents");
        assert!(id != NO_DOC, "fewer than 2^32 - 1 indexed documents");
        self.signatures.extend_from_slice(sig);
        self.stamp.push(0);
        for band in 0..self.bands {
            let key = self.band_key(sig, band);
            let prev = self.heads.insert(key, id).unwrap_or(NO_DOC);
            self.next.push(prev);
        }
    }

    /// Decides about the next document (call in output order) and counts the outcome.
    pub fn admit(&mut self, fp: &Fingerprint, project: &str, bytes: u64) -> Verdict {
        if self.mode == DedupMode::None {
            return Verdict::Keep;
        }
        let verdict = if !self.exact_seen.insert(fp.exact) {
            Verdict::ExactDuplicate
        } else if let (DedupMode::Near, Some(sig)) = (self.mode, &fp.signature) {
            if self.find_near(sig) {
                Verdict::NearDuplicate
            } else {
                self.index(sig);
                Verdict::Keep
            }
        } else {
            Verdict::Keep
        };
        if verdict != Verdict::Keep {
            let s = &mut self.summary;
            let p = s.dedup_dropped_by_project.entry(project.to_string()).or_default();
            p.bytes += bytes;
            if verdict == Verdict::ExactDuplicate {
                s.exact_duplicates_dropped += 1;
                s.exact_duplicate_bytes_dropped += bytes;
                p.exact += 1;
            } else {
                s.near_duplicates_dropped += 1;
                s.near_duplicate_bytes_dropped += bytes;
                p.near += 1;
            }
        }
        verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `lines` lines of code that all differ from each other.
    fn code(lines: usize, tag: &str) -> String {
        (0..lines)
            .map(|i| format!("int {tag}_fn{i}(int {tag}{i}) {{ return {tag}{i} * {} + {}; }}\n", i * 7 % 13, i * i))
            .collect()
    }

    fn true_jaccard(a: &str, b: &str) -> f64 {
        let sa: HashSet<u64> = shingles(a).into_iter().collect();
        let sb: HashSet<u64> = shingles(b).into_iter().collect();
        sa.intersection(&sb).count() as f64 / sa.union(&sb).count() as f64
    }

    fn sig(text: &str) -> Signature {
        MinHasher::new().signature(&shingles(text)).unwrap()
    }

    #[test]
    fn hashes_are_pinned() {
        // Fixed values: a change here changes which documents every earlier run dropped.
        assert_eq!(mix64(0), 0xE220_A839_7B1D_CDAF);
        assert_eq!(hash_bytes(0, b""), mix64(0));
        assert_eq!(hash_bytes(1, b"int main() { return 0; }"), 0x1625_9802_2E2A_8AEE);
        assert_eq!(exact_key("int main() { return 0; }\n"), 0x5F77_B2FD_68D3_F0A9_9DA4_B8EA_A33F_2B53);
        let s = sig("int main() { return 0; }");
        assert_eq!((s[0], s[1], s[127]), (0x74C7_C843, 0xCE93_CC5B, 0x2AAF_80D4));
        assert_ne!(hash_bytes(0, b"a"), hash_bytes(0, b"a\0")); // the length is hashed
        assert_ne!(hash_bytes(0, b"abc"), hash_bytes(1, b"abc"));
    }

    #[test]
    fn normalization_ignores_trailing_space_and_blank_lines_only() {
        let a = "int a;\n\nint b;   \n";
        let b = "\n\nint a;\r\n\n\n\nint b;";
        assert_eq!(normalize(a), "int a;\nint b;\n");
        assert_eq!(exact_key(a), exact_key(b));
        // Indentation and inner spaces count.
        assert_ne!(exact_key("int a;\n"), exact_key("  int a;\n"));
        assert_ne!(exact_key("int a;\n"), exact_key("int  a;\n"));
    }

    #[test]
    fn tokens_split_words_and_punctuation() {
        assert_eq!(
            tokens("std::vector<int> v_1 = {1,2};// é"),
            vec!["std", ":", ":", "vector", "<", "int", ">", "v_1", "=", "{", "1", ",", "2", "}", ";", "/", "/", "é"]
        );
        assert!(tokens(" \n\t").is_empty());
        assert_eq!(shingles("a b c").len(), 1); // fewer than n tokens: one shingle
        assert_eq!(shingles("a b c d e f g").len(), 3);
        // Whitespace does not matter to shingles.
        assert_eq!(shingles("int x=1;"), shingles("int  x = 1 ;\n"));
    }

    #[test]
    fn mod_p_is_exact() {
        for v in [
            0u128,
            1,
            P61 as u128 - 1,
            P61 as u128,
            P61 as u128 + 5,
            u128::from(u64::MAX),
            (P61 as u128) * (P61 as u128) - 1,
        ] {
            assert_eq!(u128::from(mod_p(v)), v % P61 as u128, "v={v}");
        }
        let big = u128::from(P61 - 1) * u128::from(P61 - 1) + u128::from(P61 - 1);
        assert_eq!(u128::from(mod_p(big)), big % P61 as u128);
    }

    #[test]
    fn lsh_params_for_default_threshold() {
        assert_eq!(lsh_params(0.8), (16, 8));
        let p = |s| s_curve(s, 16, 8);
        assert!((p(0.8) - 0.947).abs() < 0.001, "{}", p(0.8));
        assert!(p(0.9) > 0.9998 && p(0.5) < 0.07);
        // Every threshold gets bands with P(t) >= 0.9, and r * b = k.
        for t in [0.3, 0.5, 0.7, 0.9, 0.95, 1.0] {
            let (b, r) = lsh_params(t);
            assert_eq!(b * r, NUM_PERM);
            assert!(s_curve(t, b, r) >= LSH_RECALL_AT_THRESHOLD, "t={t}");
        }
    }

    /// Ĵ against the true Jaccard of the same shingle sets, over pairs from 0.05 to 0.97.
    /// Ĵ is a mean of k = 128 Bernoulli(J) slots, so its standard deviation is
    /// σ = sqrt(J(1−J)/128) ≤ 0.044. Each pair must be within 4σ (+0.01 so J near 0 or 1
    /// is not held to an impossible bound); for independent slots a 4σ miss has probability
    /// ~6e-5 per pair. The root-mean-square error over the pairs must be at most 1.5× the
    /// RMS of σ: P(χ²₂₄ > 2.25·24) ≈ 4e-4 for a correct estimator, while a biased or
    /// correlated estimator would fail it.
    #[test]
    fn estimated_jaccard_tracks_true_jaccard() {
        let base = code(150, "base");
        let lines: Vec<&str> = base.lines().collect();
        let mut sq_err = 0.0;
        let mut sq_sigma = 0.0;
        let mut seen = Vec::new();
        // Replace every m-th line by a new one.
        for m in [1usize, 2, 3, 4, 5, 6, 7, 8, 10, 12, 15, 20, 25, 30, 40, 50, 60, 75, 100, 2, 3, 5, 8, 13] {
            let off = seen.len() % m;
            let other: String = lines
                .iter()
                .enumerate()
                .map(
                    |(i, l)| {
                        if i % m == off {
                            format!("long changed_{i}_{m} = {i} << {m};\n")
                        } else {
                            format!("{l}\n")
                        }
                    },
                )
                .collect();
            let j = true_jaccard(&base, &other);
            let est = estimated_jaccard(&sig(&base), &sig(&other));
            let sigma = (j * (1.0 - j) / NUM_PERM as f64).sqrt();
            assert!((est - j).abs() <= 4.0 * sigma + 0.01, "m={m}: J={j:.3} Ĵ={est:.3} σ={sigma:.3}");
            sq_err += (est - j).powi(2);
            sq_sigma += sigma * sigma;
            seen.push(j);
        }
        assert!(sq_err.sqrt() <= 1.5 * sq_sigma.sqrt(), "rms error {} vs rms σ {}", sq_err.sqrt(), sq_sigma.sqrt());
        // The pairs cover the range.
        let lo = seen.iter().cloned().fold(1.0, f64::min);
        let hi = seen.iter().cloned().fold(0.0, f64::max);
        assert!(lo < 0.1 && hi > 0.95, "J from {lo} to {hi}");
        // Identical sets: identical signatures; disjoint texts: Ĵ close to 0.
        assert_eq!(estimated_jaccard(&sig(&base), &sig(&base)), 1.0);
        let disjoint: String = (0..150).map(|i| format!("#define MACRO_{i} \"text {i}\"\n")).collect();
        assert_eq!(true_jaccard(&base, &disjoint), 0.0);
        assert!(estimated_jaccard(&sig(&base), &sig(&disjoint)) < 0.05);
    }

    #[test]
    fn deduper_drops_exact_and_near_and_keeps_first() {
        let a = code(60, "a");
        let a_ws = a.replace("}\n", "}  \t\n\n"); // same after normalization
        let mut a_near: Vec<String> = a.lines().map(|l| format!("{l}\n")).collect();
        a_near[10] = "int changed_one(int q) { return q - 1; }\n".into();
        a_near[40] = "static int changed_two = 42;\n".into();
        let a_near: String = a_near.concat();
        assert!(true_jaccard(&a, &a_near) > 0.85);
        let b = code(60, "b");

        let mut near = Deduper::new(DedupMode::Near, 0.8).unwrap();
        let check = |d: &mut Deduper, text: &str, project: &str| {
            let fp = d.fingerprint(text);
            d.admit(&fp, project, text.len() as u64)
        };
        assert_eq!(check(&mut near, &a, "p1"), Verdict::Keep);
        assert_eq!(check(&mut near, &a_ws, "p2"), Verdict::ExactDuplicate);
        assert_eq!(check(&mut near, &a_near, "p2"), Verdict::NearDuplicate);
        assert_eq!(check(&mut near, &b, "p2"), Verdict::Keep);
        assert_eq!(check(&mut near, &a, "p3"), Verdict::ExactDuplicate);
        let s = near.summary();
        assert_eq!((s.exact_duplicates_dropped, s.near_duplicates_dropped), (2, 1));
        assert_eq!(s.exact_duplicate_bytes_dropped, (a_ws.len() + a.len()) as u64);
        assert_eq!(s.near_duplicate_bytes_dropped, a_near.len() as u64);
        assert_eq!(
            s.dedup_dropped_by_project["p2"],
            ProjectDrops { exact: 1, near: 1, bytes: (a_ws.len() + a_near.len()) as u64 }
        );
        assert!(!s.dedup_dropped_by_project.contains_key("p1"));
        assert!(s.near_candidates_checked >= 1);

        let mut exact = Deduper::new(DedupMode::Exact, 0.8).unwrap();
        assert_eq!(check(&mut exact, &a, "p1"), Verdict::Keep);
        assert_eq!(check(&mut exact, &a_near, "p2"), Verdict::Keep);
        assert_eq!(check(&mut exact, &a_ws, "p2"), Verdict::ExactDuplicate);

        let mut none = Deduper::new(DedupMode::None, 0.8).unwrap();
        assert_eq!(check(&mut none, &a, "p1"), Verdict::Keep);
        assert_eq!(check(&mut none, &a, "p1"), Verdict::Keep);
        assert_eq!(none.summary().exact_duplicates_dropped, 0);

        // A stricter threshold keeps the near copy.
        let mut strict = Deduper::new(DedupMode::Near, 0.99).unwrap();
        assert_eq!(check(&mut strict, &a, "p1"), Verdict::Keep);
        assert_eq!(check(&mut strict, &a_near, "p1"), Verdict::Keep);
    }

    #[test]
    fn threshold_is_validated() {
        assert!(Deduper::new(DedupMode::Near, 0.0).is_err());
        assert!(Deduper::new(DedupMode::Near, 1.5).is_err());
        assert!(Deduper::new(DedupMode::Near, f64::NAN).is_err());
        assert!(Deduper::new(DedupMode::Near, 1.0).is_ok());
    }

    #[test]
    fn candidate_checks_are_capped() {
        // Documents that share a big block but each add one line of their own: J ≈ 0.95, so
        // with t = 0.99 (b = 4, r = 32) most are kept and land in the same buckets. With the
        // cap lowered to 5, later documents stop after 5 checks and the cap is counted.
        let shared = code(40, "shared");
        let mut d = Deduper::new(DedupMode::Near, 0.99).unwrap();
        assert_eq!((d.bands, d.rows), (4, 32));
        d.max_candidates = 5;
        let docs = 60;
        let mut kept = 0;
        for i in 0..docs {
            let text = format!("{shared}{}", code(1, &format!("own{i}")));
            let fp = d.fingerprint(&text);
            if d.admit(&fp, "p", text.len() as u64) == Verdict::Keep {
                kept += 1;
            }
        }
        let s = d.summary();
        assert!(kept > docs / 2, "kept {kept}");
        assert!(s.near_candidate_cap_hits > 0);
        assert!(s.near_candidates_checked <= 5 * docs as u64);
    }
}
