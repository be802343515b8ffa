//! The binary: arguments, exit codes, files written.

mod common;

use std::process::Command;

use common::*;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cpp_chunker"))
}

#[test]
fn writes_shards_and_summary() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("proj");
    write(&root, "a.cpp", "#include \"a.h\"\nint a() { return A; }\n");
    write(&root, "a.h", "#define A 1\n");
    let out = dir.path().join("out");
    let o = bin()
        .args(["--roots"])
        .arg(&root)
        .args(["--mode", "crossfile", "--max-tokens", "100", "--shard-docs", "5", "--threads", "2", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(stdout["documents_written"], 1);
    assert_eq!(stdout["threads"], 2);
    let docs = read_docs(&out);
    assert_eq!(docs[0].files, vec!["a.h", "a.cpp"]);
    assert_eq!(read_summary_json(&out)["mode"], "crossfile");
}

#[test]
fn roots_file_and_parse_only() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("p1"), "a.cpp", "int a() { return 1; }\n");
    write(&dir.path().join("p2"), "b.h", "int b( {\n"); // parse error
    let roots = write(dir.path(), "roots.txt", "# projects\np1\n\np2\n");
    let o = bin().arg("--roots-file").arg(&roots).arg("--parse-only").output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(s["mode"], "parse_only");
    assert_eq!(s["projects"], 2);
    assert_eq!(s["files_parsed"], 2);
    assert_eq!(s["files_with_parse_errors"], 1);
    assert_eq!(s["documents_written"], 0);
    assert!(s["mb_per_s"].as_f64().is_some());
}

#[test]
fn bad_arguments_fail_cleanly() {
    // No roots.
    assert!(!bin().args(["--out", "x"]).output().unwrap().status.success());
    // No --out without --parse-only.
    assert!(!bin().args(["--roots", "."]).output().unwrap().status.success());
    // Both --roots and --roots-file.
    assert!(!bin().args(["--roots", ".", "--roots-file", "r.txt", "--out", "x"]).output().unwrap().status.success());
    // Unknown mode, zero budget.
    assert!(!bin().args(["--roots", ".", "--out", "x", "--mode", "bogus"]).output().unwrap().status.success());
    assert!(!bin().args(["--roots", ".", "--out", "x", "--max-tokens", "0"]).output().unwrap().status.success());
    // Output already there: exit code 2 and a message.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("proj");
    write(&root, "a.cpp", "int a;\n");
    let out = dir.path().join("out");
    let run = || bin().arg("--roots").arg(&root).arg("--out").arg(&out).output().unwrap();
    assert!(run().status.success());
    let again = run();
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--overwrite"));
}

#[test]
fn several_budgets_write_one_directory_each() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("proj");
    let body: String = (0..20).map(|i| format!("int f{i}() {{ return {i}; }}\n")).collect();
    write(&root, "a.cpp", &body);
    let out = dir.path().join("out");
    let run = |extra: &[&str]| {
        bin()
            .arg("--roots")
            .arg(&root)
            .args(["--max-tokens", "40,16384", "--out"])
            .arg(&out)
            .args(extra)
            .output()
            .unwrap()
    };
    let o = run(&[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let summaries = stdout.as_array().expect("one summary per budget");
    assert_eq!(summaries.iter().map(|s| s["max_tokens"].as_u64().unwrap()).collect::<Vec<_>>(), [40, 16384]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("cpp_chunker: tokens_40: ") && stderr.contains("cpp_chunker: tokens_16384: "), "{stderr}");
    assert!(shard_paths(&out).is_empty() && !out.join("summary.json").exists());
    for (s, n) in summaries.iter().zip(["40", "16384"]) {
        let bucket = out.join(format!("tokens_{n}"));
        assert_eq!(&read_summary_json(&bucket), s);
        assert_eq!(read_docs(&bucket).len() as u64, s["documents_written"].as_u64().unwrap());
    }
    assert!(summaries[0]["documents_written"].as_u64().unwrap() > 1); // split at 40 tokens
    assert_eq!(summaries[1]["documents_written"], 1);
    // each bucket directory follows the --overwrite rule
    assert_eq!(run(&[]).status.code(), Some(2));
    assert!(run(&["--overwrite"]).status.success());
    // a budget listed twice would give two buckets one directory
    let twice = bin().arg("--roots").arg(&root).args(["--max-tokens", "40,40", "--out"]).arg(&out).output().unwrap();
    assert_eq!(twice.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&twice.stderr).contains("40 is listed twice"));
    // budgets play no part in parse-only runs: one summary
    let p = bin().arg("--roots").arg(&root).args(["--max-tokens", "40,16384", "--parse-only"]).output().unwrap();
    assert!(p.status.success());
    let s: serde_json::Value = serde_json::from_slice(&p.stdout).unwrap();
    assert_eq!(s["mode"], "parse_only");
}
