//! Dedup through the whole pipeline: exact and near duplicates across projects, the modes,
//! counts in the summary, determinism across thread counts, the CLI flags.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::*;
use cpp_chunker::{DedupMode, Mode};

/// `n` lines of code, all different, named after `tag`.
fn code(n: usize, tag: &str) -> String {
    (0..n)
        .map(|i| format!("int {tag}_fn{i}(int {tag}{i}) {{ return {tag}{i} * {} + {}; }}\n", i * 7 % 13, i * i))
        .collect()
}

/// `text` with lines `at` replaced by new ones.
fn change_lines(text: &str, at: &[usize]) -> String {
    text.lines()
        .enumerate()
        .map(|(i, l)| if at.contains(&i) { format!("long edited_{i} = {i} << 3;\n") } else { format!("{l}\n") })
        .collect()
}

fn run_mode(roots: &[&Path], out: &Path, dedup: DedupMode) -> cpp_chunker::Summary {
    let mut cfg = config(roots, out, Mode::File);
    cfg.dedup = dedup;
    run_ok(&cfg)
}

#[test]
fn identical_files_in_two_projects_are_kept_once() {
    let dir = tempfile::tempdir().unwrap();
    let (p1, p2) = (dir.path().join("alpha"), dir.path().join("beta"));
    let shared = code(30, "shared");
    write(&p1, "src/util.cpp", &shared);
    write(&p1, "src/own.cpp", code(30, "alpha"));
    // Same text with CRLF line ends, trailing spaces and extra blank lines: still exact.
    let messy = shared.replace('\n', "  \r\n\r\n");
    write(&p2, "lib/copy_of_util.cpp", &messy);
    write(&p2, "lib/own.cpp", code(30, "beta"));
    for mode in [DedupMode::Exact, DedupMode::Near] {
        let out = dir.path().join(format!("out_{}", mode.as_str()));
        let s = run_mode(&[&p1, &p2], &out, mode);
        assert_eq!(s.documents_written, 3, "{mode:?}");
        assert_eq!(s.dedup.exact_duplicates_dropped, 1);
        assert_eq!(s.dedup.near_duplicates_dropped, 0);
        assert_eq!(s.dedup.exact_duplicate_bytes_dropped, messy.len() as u64);
        let docs = read_docs(&out);
        // The first one seen (project alpha) is kept.
        let kept: Vec<(&str, &str)> = docs.iter().map(|d| (d.project.as_str(), d.files[0].as_str())).collect();
        assert_eq!(kept, vec![("alpha", "src/own.cpp"), ("alpha", "src/util.cpp"), ("beta", "lib/own.cpp")]);
        let j = read_summary_json(&out);
        assert_eq!(j["dedup"], mode.as_str());
        assert_eq!(j["exact_duplicates_dropped"], 1);
        assert_eq!(j["dedup_dropped_by_project"]["beta"]["exact"], 1);
        assert_eq!(j["dedup_dropped_by_project"]["beta"]["bytes"], messy.len() as u64);
        assert!(j["dedup_dropped_by_project"].get("alpha").is_none());
    }
}

#[test]
fn near_copy_is_dropped_by_near_and_kept_by_exact() {
    let dir = tempfile::tempdir().unwrap();
    let (p1, p2) = (dir.path().join("upstream"), dir.path().join("fork"));
    let original = code(80, "lib");
    let edited = change_lines(&original, &[5, 40, 77]); // 3 of 80 lines changed
    let different = code(80, "other");
    write(&p1, "a.cpp", &original);
    write(&p2, "a.cpp", &edited);
    write(&p2, "b.cpp", &different);

    let out_near = dir.path().join("near");
    let s = run_mode(&[&p1, &p2], &out_near, DedupMode::Near);
    assert_eq!(s.documents_written, 2);
    assert_eq!(s.dedup.near_duplicates_dropped, 1);
    assert_eq!(s.dedup.exact_duplicates_dropped, 0);
    assert_eq!(s.dedup.near_duplicate_bytes_dropped, edited.len() as u64);
    assert_eq!((s.dedup.lsh_bands, s.dedup.lsh_rows, s.dedup.minhash_k), (16, 8, 128));
    assert_eq!(s.dedup.near_threshold, 0.8);
    let texts: Vec<String> = read_docs(&out_near).into_iter().map(|d| d.text).collect();
    assert_eq!(texts, vec![original.clone(), different.clone()]);
    assert_eq!(s.bytes_written, (original.len() + different.len()) as u64);
    let j = read_summary_json(&out_near);
    assert_eq!(j["near_duplicates_dropped"], 1);
    assert_eq!(j["dedup_dropped_by_project"]["fork"]["near"], 1);

    let out_exact = dir.path().join("exact");
    let s = run_mode(&[&p1, &p2], &out_exact, DedupMode::Exact);
    assert_eq!(s.documents_written, 3);
    assert_eq!(s.dedup.near_duplicates_dropped + s.dedup.exact_duplicates_dropped, 0);

    // A threshold above the copy's similarity keeps it.
    let out_strict = dir.path().join("strict");
    let mut cfg = config(&[&p1, &p2], &out_strict, Mode::File);
    cfg.near_threshold = 0.99;
    let s = run_ok(&cfg);
    assert_eq!(s.documents_written, 3);
    assert_eq!(s.dedup.near_threshold, 0.99);
}

#[test]
fn different_files_are_all_kept_and_none_keeps_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("proj");
    for i in 0..20 {
        write(&root, &format!("f{i:02}.cpp"), code(25, &format!("t{i}")));
    }
    write(&root, "g.cpp", "int x;\n");
    write(&root, "h.cpp", "int y;\n");
    let out = dir.path().join("near");
    let s = run_mode(&[&root], &out, DedupMode::Near);
    assert_eq!(s.documents_written, 22);
    assert_eq!(s.dedup.exact_duplicates_dropped + s.dedup.near_duplicates_dropped, 0);
    assert!(s.dedup.dedup_dropped_by_project.is_empty());

    // --dedup none: every copy is kept, and nothing is counted.
    write(&root, "copy.cpp", code(25, "t3"));
    write(&root, "near_copy.cpp", change_lines(&code(25, "t4"), &[3]));
    let out = dir.path().join("none");
    let s = run_mode(&[&root, &root], &out, DedupMode::None);
    assert_eq!(s.documents_written, 48);
    assert_eq!(s.dedup.mode, "none");
    assert_eq!(s.dedup.exact_duplicates_dropped + s.dedup.near_duplicates_dropped, 0);
    assert_eq!(read_summary_json(&out)["dedup"], "none");
    // The same input with near dedup. First root: copy.cpp sorts first and is kept, so
    // f03.cpp is the exact copy; near_copy.cpp is a near copy of f04.cpp. Second root: all
    // 24 documents are exact copies of documents seen (kept or dropped) in the first.
    let out = dir.path().join("near2");
    let s = run_mode(&[&root, &root], &out, DedupMode::Near);
    assert_eq!(s.documents_written, 22);
    assert_eq!(s.dedup.exact_duplicates_dropped, 25);
    assert_eq!(s.dedup.near_duplicates_dropped, 1);
    assert_eq!(s.documents_written + 26, 48);
}

#[test]
fn crossfile_documents_are_deduplicated_too() {
    let dir = tempfile::tempdir().unwrap();
    let (p1, p2) = (dir.path().join("p1"), dir.path().join("p2"));
    for p in [&p1, &p2] {
        write(p, "include/api.h", format!("#pragma once\n{}", code(10, "api")));
        write(p, "src/main.cpp", format!("#include \"api.h\"\n{}", code(20, "main")));
    }
    write(&p2, "src/extra.cpp", code(20, "extra"));
    let out = dir.path().join("out");
    let mut cfg = config(&[&p1, &p2], &out, Mode::Crossfile);
    cfg.dedup = DedupMode::Near;
    let s = run_ok(&cfg);
    assert_eq!(s.documents_written, 2);
    assert_eq!(s.dedup.exact_duplicates_dropped, 1);
    let docs = read_docs(&out);
    assert_eq!((docs[0].project.as_str(), docs[1].files[0].as_str()), ("p1", "src/extra.cpp"));
}

#[test]
fn same_output_for_one_and_two_threads() {
    let dir = tempfile::tempdir().unwrap();
    let mut roots = Vec::new();
    for p in 0..3 {
        let root = dir.path().join(format!("proj{p}"));
        for i in 0..100 {
            // Many exact and near copies across and within projects; some files are split.
            let base = code(10 + i % 7, &format!("m{}", i % 60));
            let text = if (i + p) % 3 == 0 { change_lines(&base, &[i % 7]) } else { base };
            write(&root, &format!("d{}/f{i:03}.cpp", i % 5), text);
        }
        roots.push(root);
    }
    let roots: Vec<&Path> = roots.iter().map(|r| r.as_path()).collect();
    let mut outputs = Vec::new();
    for threads in [1usize, 2, 2] {
        let out = dir.path().join(format!("out_{}", outputs.len()));
        let mut cfg = config(&roots, &out, Mode::File);
        cfg.threads = threads;
        cfg.shard_docs = 100;
        cfg.max_tokens = vec![200]; // splits the longer files
        let s = run_ok(&cfg);
        assert!(s.dedup.exact_duplicates_dropped > 100, "{:?}", s.dedup);
        assert!(s.dedup.near_duplicates_dropped > 10, "{:?}", s.dedup);
        let shards: Vec<Vec<u8>> = shard_paths(&out).iter().map(|p| fs::read(p).unwrap()).collect();
        outputs.push((shards, s.dedup));
    }
    assert_eq!(outputs[0], outputs[1], "threads=1 vs threads=2 differ");
    assert_eq!(outputs[1], outputs[2], "two runs differ");
}

#[test]
fn cli_flags() {
    let dir = tempfile::tempdir().unwrap();
    let (p1, p2) = (dir.path().join("p1"), dir.path().join("p2"));
    let text = code(40, "x");
    write(&p1, "a.cpp", &text);
    write(&p2, "a.cpp", &text);
    write(&p2, "b.cpp", change_lines(&text, &[20]));
    let bin = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_cpp_chunker"));
        c.arg("--roots").arg(&p1).arg(&p2).arg("--overwrite");
        c
    };
    let summary = |args: &[&str], out: &str| -> serde_json::Value {
        let o = bin().args(args).arg("--out").arg(dir.path().join(out)).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    // Default: near, 0.8.
    let s = summary(&[], "default");
    assert_eq!(s["dedup"], "near");
    assert_eq!(s["near_threshold"], 0.8);
    assert_eq!((s["exact_duplicates_dropped"].as_u64(), s["near_duplicates_dropped"].as_u64()), (Some(1), Some(1)));
    assert_eq!(s["documents_written"], 1);
    let s = summary(&["--dedup", "exact"], "exact");
    assert_eq!((s["dedup"].as_str(), s["documents_written"].as_u64()), (Some("exact"), Some(2)));
    let s = summary(&["--dedup", "none"], "none");
    assert_eq!(s["documents_written"], 3);
    let s = summary(&["--near-threshold", "0.999"], "strict");
    assert_eq!(s["documents_written"], 2);
    // Bad values are rejected before anything runs.
    for bad in [
        &["--dedup", "fuzzy"][..],
        &["--near-threshold", "0"],
        &["--near-threshold", "1.5"],
        &["--near-threshold", "x"],
    ] {
        let o = bin().args(bad).arg("--out").arg(dir.path().join("bad")).output().unwrap();
        assert!(!o.status.success(), "{bad:?} accepted");
        assert!(!dir.path().join("bad").exists());
    }
}
