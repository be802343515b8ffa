//! Several token budgets in one run (length buckets): each bucket's output must be what a
//! run with that budget alone writes, shard for shard, in every mode.

mod common;

use std::fs;
use std::path::Path;

use common::*;
use cpp_chunker::config::bucket_dirs;
use cpp_chunker::{run, Mode};

/// 60 tokens (210 bytes) splits nearly everything and drops headers and pulled
/// definitions; 300 (1050 bytes) only some; 16384 nothing.
const BUDGETS: [u64; 3] = [60, 300, 16384];

/// Two projects: one with headers, cross-file calls, a long source and duplicated files
/// (so that dedup has work in every mode); one header-only.
fn make_projects(dir: &Path) -> Vec<std::path::PathBuf> {
    let app = dir.join("app");
    let pad = "// a comment line that makes the header longer than the smallest budget\n".repeat(3);
    write(&app, "include/common.h", format!("#pragma once\n{pad}struct Point {{ int x; int y; }};\n"));
    write(
        &app,
        "include/util.h",
        "#pragma once\n#include \"common.h\"\ninline int norm1(Point p) { return p.x + p.y; }\nint scale(int v);\n",
    );
    write(
        &app,
        "src/scale.cpp",
        "#include \"util.h\"\nint scale(int v) { return 3 * v; }\nint twice(int v) { return 2 * v; }\n",
    );
    let mut big = String::from("#include \"util.h\"\n#include <vector>\n");
    for i in 0..30 {
        big.push_str(&format!(
            "int step{i}(std::vector<int>& v) {{ v.push_back(scale({i}) + twice({i})); return (int)v.size(); }}\n"
        ));
    }
    write(&app, "src/big.cpp", &big);
    let main = "#include \"util.h\"\nint main() {\n  Point p{1, 2};\n  return norm1(p) + scale(p.x) + twice(p.y);\n}\n";
    write(&app, "src/main.cpp", main);
    write(&app, "src/main_copy.cpp", main); // exact duplicate in file mode
    write(&app, "src/main_near.cpp", main.replace("Point p{1, 2}", "Point p{1, 3}")); // near duplicate

    let hdr = dir.join("hdr");
    write(&hdr, "lib/base.h", "#pragma once\nnamespace lib {\ntemplate <class T> T twice(T v) { return v + v; }\n}\n");
    let mut api = String::from("#pragma once\n#include \"base.h\"\nnamespace lib {\n");
    for i in 0..12 {
        api.push_str(&format!("template <class T> T api{i}(T v) {{ return twice(v) * {i}; }}\n"));
    }
    api.push_str("}\n");
    write(&hdr, "lib/api.h", api);
    vec![app, hdr]
}

/// (name, bytes) of every shard in `out`, in order.
fn shards(out: &Path) -> Vec<(String, Vec<u8>)> {
    shard_paths(out)
        .into_iter()
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), fs::read(&p).unwrap()))
        .collect()
}

/// summary.json without the timing fields, which differ between any two runs.
fn summary_without_timing(out: &Path) -> serde_json::Value {
    let mut j = read_summary_json(out);
    let o = j.as_object_mut().unwrap();
    assert!(o.remove("seconds").is_some() && o.remove("mb_per_s").is_some());
    j
}

#[test]
fn each_bucket_equals_a_run_with_its_budget_alone() {
    let dir = tempfile::tempdir().unwrap();
    let roots = make_projects(dir.path());
    let roots: Vec<&Path> = roots.iter().map(|r| r.as_path()).collect();
    for mode in [Mode::File, Mode::Crossfile, Mode::Project, Mode::Compilable] {
        let name = mode.as_str();
        let multi_out = dir.path().join(format!("{name}_multi"));
        let mut cfg = config(&roots, &multi_out, mode);
        cfg.shard_docs = 4;
        cfg.threads = 2;
        cfg.max_tokens = BUDGETS.to_vec();
        let summaries = run(&cfg).expect("run succeeds");
        assert_eq!(summaries.iter().map(|s| s.max_tokens).collect::<Vec<_>>(), BUDGETS);

        let mut per_budget = Vec::new();
        for ((&budget, bucket), s) in BUDGETS.iter().zip(bucket_dirs(&multi_out, &BUDGETS)).zip(&summaries) {
            assert_eq!(bucket, multi_out.join(format!("tokens_{budget}")));
            let single_out = dir.path().join(format!("{name}_{budget}"));
            cfg.out = Some(single_out.clone());
            cfg.max_tokens = vec![budget];
            let single = run_ok(&cfg);
            let got = shards(&bucket);
            assert!(!got.is_empty(), "{name} at {budget}: no shards");
            assert_eq!(got, shards(&single_out), "{name} at {budget}: shards differ from a single-budget run");
            assert_eq!(summary_without_timing(&bucket), summary_without_timing(&single_out), "{name} at {budget}");
            assert_eq!(s.documents_written, single.documents_written);
            per_budget.push((got, single));
        }
        // The budgets must matter here, or the comparison above proves little.
        let (small, large) = (&per_budget[0], &per_budget[2]);
        assert_ne!(small.0, large.0, "{name}: the smallest and largest buckets are identical");
        assert!(small.1.documents_split > 0 && large.1.documents_split == 0, "{name}: {:?}", small.1);
        let dropped: u64 =
            per_budget.iter().map(|(_, s)| s.dedup.exact_duplicates_dropped + s.dedup.near_duplicates_dropped).sum();
        assert!(dropped > 0, "{name}: dedup dropped nothing in any bucket");
        match mode {
            Mode::Crossfile => assert!(small.1.headers_dropped_for_budget > 0),
            Mode::Project => assert!(
                small.1.definitions_dropped_for_budget > large.1.definitions_dropped_for_budget
                    && large.1.definitions_pulled > 0
            ),
            _ => {}
        }
    }
}

#[test]
fn a_budget_listed_twice_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("p"), "a.cpp", "int a;\n");
    let mut cfg = config(&[&dir.path().join("p")], &dir.path().join("out"), Mode::File);
    cfg.max_tokens = vec![100, 200, 100];
    let err = run(&cfg).unwrap_err().to_string();
    assert!(err.contains("100 is listed twice"), "{err}");
    cfg.max_tokens = Vec::new();
    assert!(run(&cfg).is_err());
}
