#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};

use cpp_chunker::{run, Config, Document, Mode, Summary};

pub fn write(root: &Path, rel: &str, content: impl AsRef<[u8]>) -> PathBuf {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(&p, content).unwrap();
    p
}

pub fn config(roots: &[&Path], out: &Path, mode: Mode) -> Config {
    Config {
        roots: roots.iter().map(|r| r.to_path_buf()).collect(),
        mode,
        out: Some(out.to_path_buf()),
        ..Config::default()
    }
}

/// Runs a one-budget (or parse-only) job; its summary.
pub fn run_ok(cfg: &Config) -> Summary {
    let mut summaries = run(cfg).expect("run succeeds");
    assert_eq!(summaries.len(), 1, "one summary expected");
    summaries.remove(0)
}

/// Shard file names in `out`, sorted.
pub fn shard_paths(out: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("shard_"))
        .collect();
    v.sort();
    v
}

/// Every document of every shard, in order.
pub fn read_docs(out: &Path) -> Vec<Document> {
    let mut docs = Vec::new();
    for p in shard_paths(out) {
        let text = fs::read_to_string(&p).unwrap();
        for line in text.lines() {
            docs.push(serde_json::from_str(line).expect("valid JSON line"));
        }
    }
    docs
}

pub fn read_summary_json(out: &Path) -> serde_json::Value {
    serde_json::from_str(&fs::read_to_string(out.join("summary.json")).unwrap()).unwrap()
}
