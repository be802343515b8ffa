//! JSONL shards and the summary, written atomically (to `NAME.tmp`, then renamed).
//! Documents pass through the run's dedup filter ([`crate::dedup`]) on their way in.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rayon::prelude::*;

use crate::dedup::{DedupMode, DedupSummary, Deduper, Fingerprint, Verdict};
use crate::docs::Document;

/// With dedup on, documents wait in a buffer until this many (or `PENDING_BYTES`) are there;
/// their fingerprints are then computed in parallel and the decisions made in order.
const PENDING_DOCS: usize = 512;
const PENDING_BYTES: usize = 32 << 20;

pub fn shard_name(index: usize) -> String {
    format!("shard_{index:05}.jsonl")
}

fn is_output_name(name: &str) -> bool {
    (name.starts_with("shard_") && (name.ends_with(".jsonl") || name.ends_with(".jsonl.tmp")))
        || name == "summary.json"
        || name == "summary.json.tmp"
}

/// Creates `dir`. If it already holds shards or a summary, fails unless `overwrite`,
/// in which case those files (and only those) are removed.
pub fn prepare_out_dir(dir: &Path, overwrite: bool) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut existing = Vec::new();
    for e in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e?;
        if is_output_name(&e.file_name().to_string_lossy()) {
            existing.push(e.path());
        }
    }
    existing.sort();
    if existing.is_empty() {
        return Ok(());
    }
    if !overwrite {
        bail!(
            "{} already holds output ({} and maybe more); pass --overwrite to replace it",
            dir.display(),
            existing[0].display()
        );
    }
    for p in existing {
        fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically: `path.tmp`, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = tmp_path(path);
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

struct OpenShard {
    writer: BufWriter<File>,
    tmp: PathBuf,
    path: PathBuf,
    docs: usize,
}

/// Writes documents into `shard_00000.jsonl`, `shard_00001.jsonl`, ... with at most
/// `shard_docs` documents each. A shard becomes visible under its final name only when
/// complete. With [`ShardWriter::with_dedup`], duplicates are dropped first: the documents
/// written are then the first of each duplicate group, still in the order given.
pub struct ShardWriter {
    dir: PathBuf,
    shard_docs: usize,
    next_index: usize,
    open: Option<OpenShard>,
    dedup: Option<Deduper>,
    pending: Vec<Document>,
    pending_bytes: usize,
    pub shards_written: u64,
    pub docs_written: u64,
    pub bytes_written: u64,
    pub tokens_written: u64,
}

impl ShardWriter {
    pub fn new(dir: &Path, shard_docs: usize) -> ShardWriter {
        ShardWriter {
            dir: dir.to_path_buf(),
            shard_docs: shard_docs.max(1),
            next_index: 0,
            open: None,
            dedup: None,
            pending: Vec::new(),
            pending_bytes: 0,
            shards_written: 0,
            docs_written: 0,
            bytes_written: 0,
            tokens_written: 0,
        }
    }

    /// Filters every document through `dedup` (unless its mode is `none`).
    pub fn with_dedup(mut self, dedup: Deduper) -> ShardWriter {
        self.dedup = Some(dedup);
        self
    }

    /// The dedup counts (mode `none` and zeros without dedup).
    pub fn dedup_summary(&self) -> DedupSummary {
        self.dedup.as_ref().map(Deduper::summary).unwrap_or_default()
    }

    pub fn write(&mut self, doc: &Document) -> Result<()> {
        if self.dedup.as_ref().is_none_or(|d| d.mode() == DedupMode::None) {
            return self.emit(doc);
        }
        self.pending_bytes += doc.bytes;
        self.pending.push(doc.clone());
        if self.pending.len() >= PENDING_DOCS || self.pending_bytes >= PENDING_BYTES {
            self.flush_pending()?;
        }
        Ok(())
    }

    /// Fingerprints the buffered documents in parallel (in the current rayon pool), then
    /// admits them one by one, in order.
    fn flush_pending(&mut self) -> Result<()> {
        let pending = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        let Some(dedup) = self.dedup.as_ref() else { return Ok(()) };
        let fps: Vec<Fingerprint> = pending.par_iter().map(|d| dedup.fingerprint(&d.text)).collect();
        for (d, fp) in pending.iter().zip(&fps) {
            let verdict = self.dedup.as_mut().expect("checked above").admit(fp, &d.project, d.bytes as u64);
            if verdict == Verdict::Keep {
                self.emit(d)?;
            }
        }
        Ok(())
    }

    fn emit(&mut self, doc: &Document) -> Result<()> {
        if self.open.is_none() {
            let path = self.dir.join(shard_name(self.next_index));
            let tmp = tmp_path(&path);
            let f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
            self.next_index += 1;
            self.open = Some(OpenShard { writer: BufWriter::with_capacity(1 << 20, f), tmp, path, docs: 0 });
        }
        let shard = self.open.as_mut().expect("opened above");
        serde_json::to_writer(&mut shard.writer, doc)?;
        shard.writer.write_all(b"\n")?;
        shard.docs += 1;
        self.docs_written += 1;
        self.bytes_written += doc.bytes as u64;
        self.tokens_written += doc.tokens_est;
        if shard.docs >= self.shard_docs {
            self.close_current()?;
        }
        Ok(())
    }

    fn close_current(&mut self) -> Result<()> {
        if let Some(shard) = self.open.take() {
            let f = shard.writer.into_inner().map_err(|e| e.into_error())?;
            f.sync_all()?;
            fs::rename(&shard.tmp, &shard.path).with_context(|| format!("renaming {}", shard.tmp.display()))?;
            self.shards_written += 1;
        }
        Ok(())
    }

    /// Writes what the dedup buffer still holds, then closes the last, partly filled shard.
    pub fn finish(&mut self) -> Result<()> {
        self.flush_pending()?;
        self.close_current()
    }
}
