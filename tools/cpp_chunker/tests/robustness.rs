//! Bad input never panics or aborts the run; every skip is counted by reason.

mod common;

use std::fs;
use std::path::Path;

use common::*;
use cpp_chunker::split::split;
use cpp_chunker::{DedupMode, Mode, SkipReason};

fn skipped(s: &cpp_chunker::Summary, r: SkipReason) -> u64 {
    s.skipped[r.as_str()]
}

#[test]
fn malformed_cpp_becomes_a_document() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("proj");
    let junk = "class { int f( { ;;; } } }} template<<< #if\n#endif #endif\n\"unterminated\n/* open comment";
    write(&root, "bad.cpp", junk);
    let out = dir.path().join("out");
    let s = run_ok(&config(&[&root], &out, Mode::File));
    assert_eq!(s.documents_written, 1);
    assert_eq!(read_docs(&out)[0].text, junk);

    // Also when it has to be split: the pieces still add up to the input.
    let big: String = (0..200).map(|i| format!("int f{i}( {{ x = ;; }} }} class {{\n")).collect();
    write(&root, "bad2.cpp", &big);
    let out2 = dir.path().join("out2");
    let mut cfg = config(&[&root], &out2, Mode::File);
    cfg.max_tokens = vec![100];
    let s = run_ok(&cfg);
    assert!(s.documents_split >= 1);
    let joined: String = read_docs(&out2).iter().filter(|d| d.files == ["bad2.cpp"]).map(|d| d.text.as_str()).collect();
    assert_eq!(joined, big);
}

#[test]
fn invalid_utf8_is_decoded_lossily_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("proj");
    write(&root, "latin1.cpp", b"// caf\xe9 \xff\xfe\nint main() { return 0; }\n");
    let out = dir.path().join("out");
    let s = run_ok(&config(&[&root], &out, Mode::File));
    assert_eq!(s.lossy_utf8_files, 1);
    assert_eq!(s.documents_written, 1);
    let doc = &read_docs(&out)[0];
    assert!(doc.text.contains('\u{fffd}'));
    assert!(doc.text.ends_with("int main() { return 0; }\n"));
}

#[test]
fn huge_file_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("proj");
    let line = "int x = 1; // padding padding padding padding padding\n";
    let big = line.repeat(5 * 1024 * 1024 / line.len() + 1);
    assert!(big.len() > 5 * 1024 * 1024);
    write(&root, "huge.cpp", &big);
    write(&root, "ok.cpp", "int ok;\n");
    let out = dir.path().join("out");
    let s = run_ok(&config(&[&root], &out, Mode::File));
    assert_eq!(skipped(&s, SkipReason::TooLarge), 1);
    assert_eq!(s.documents_written, 1);
}

#[test]
fn binary_file_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("proj");
    let mut bin = b"\x7fELF\x02\x01\x01\0\0\0".to_vec();
    bin.extend((0..10_000u32).map(|i| (i % 251) as u8));
    write(&root, "blob.h", &bin);
    let out = dir.path().join("out");
    let s = run_ok(&config(&[&root], &out, Mode::File));
    assert_eq!(skipped(&s, SkipReason::Binary), 1);
    assert_eq!(s.documents_written, 0);
    assert_eq!(s.shards_written, 0);
}

#[cfg(unix)]
#[test]
fn symlink_loops_terminate() {
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("proj");
    write(&root, "src/a.cpp", "int a;\n");
    symlink(&root, root.join("src/loop")).unwrap(); // directory loop
    symlink("..", root.join("src/up")).unwrap(); // relative loop
    symlink("self.h", root.join("self.h")).unwrap(); // link to itself
    symlink("src/a.cpp", root.join("alias.cpp")).unwrap(); // link to a real file
    let out = dir.path().join("out");
    let s = run_ok(&config(&[&root], &out, Mode::File));
    assert_eq!(s.documents_written, 1);
    assert_eq!(skipped(&s, SkipReason::Symlink), 2);
    assert_eq!(s.symlinks_not_followed, 2);
    assert_eq!(s.files_seen, 3);
}

#[cfg(unix)]
#[test]
fn unreadable_file_is_counted_without_crashing() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("proj");
    let p = write(&root, "secret.cpp", "int secret;\n");
    write(&root, "open.cpp", "int open;\n");
    fs::set_permissions(&p, fs::Permissions::from_mode(0o000)).unwrap();
    // Root (CI runs as root) can still read a mode-000 file: then there is nothing to skip.
    let privileged = fs::read(&p).is_ok();
    let out = dir.path().join("out");
    let s = run_ok(&config(&[&root], &out, Mode::File));
    fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
    if privileged {
        assert_eq!(s.documents_written, 2);
    } else {
        assert_eq!(skipped(&s, SkipReason::PermissionDenied), 1);
        assert_eq!(s.documents_written, 1);
    }
}

fn nested_braces(depth: usize, sep: &str) -> String {
    format!("void deep() {{\n{}int x = 0;\n{}}}\n", format!("{{{sep}").repeat(depth), format!("}}{sep}").repeat(depth))
}

#[test]
fn deeply_nested_code_is_split_without_overflow() {
    let text = nested_braces(5000, "");
    // Well under budget: kept whole, never parsed.
    assert_eq!(split(&text, 1 << 20).pieces.len(), 1);
    // Over budget: parsed and split, down to the nested blocks.
    let s = split(&text, 100);
    let joined: String = s.pieces.iter().map(|p| &text[p.clone()]).collect();
    assert_eq!(joined, text);
    assert!(s.pieces.iter().all(|p| p.len() <= 100));
    // Unbalanced (5000 opening braces, never closed) as well.
    let open = format!("void deep() {{\n{}\n", "{".repeat(5000));
    let s = split(&open, 64);
    let joined: String = s.pieces.iter().map(|p| &open[p.clone()]).collect();
    assert_eq!(joined, open);

    // And through the whole pipeline, in worker threads (smaller stacks than main); one
    // brace per line here, or the files would be skipped as minified.
    let text = nested_braces(5000, "\n");
    let open = format!("void deep() {{\n{}", "{\n".repeat(5000));
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("proj");
    write(&root, "deep.cpp", &text);
    write(&root, "open.cpp", &open);
    let out = dir.path().join("out");
    let mut cfg = config(&[&root], &out, Mode::File);
    cfg.max_tokens = vec![200];
    cfg.threads = 2;
    cfg.dedup = DedupMode::None; // many pieces are identical ("{\n{\n..."); keep them all
    let s = run_ok(&cfg);
    assert_eq!(s.skipped_total, 0);
    assert_eq!(s.documents_split, 2);
    let docs = read_docs(&out);
    let joined: String = docs.iter().filter(|d| d.files == ["deep.cpp"]).map(|d| d.text.as_str()).collect();
    assert_eq!(joined, text);
}

#[test]
fn deeply_nested_declarators_do_not_overflow_a_worker_stack() {
    // `int` then 20,000 `*` (one a line, or the file is skipped as minified): the declarator's
    // name was found by recursion, one frame a `*`, and in project and compilable modes the
    // worker thread's stack overflowed (an abort: the whole run died, no file named)
    let text = format!("int\n{}x;\n", "*\n".repeat(20_000));
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("proj");
    write(&root, "deep.cpp", &text);
    for (i, mode) in [Mode::Project, Mode::Compilable].into_iter().enumerate() {
        let out = dir.path().join(format!("out{i}"));
        let mut cfg = config(&[&root], &out, mode);
        cfg.threads = 2;
        let s = run_ok(&cfg);
        assert_eq!((s.skipped_total, s.documents_written), (0, 1));
    }
}

#[test]
fn generated_and_vendored_files_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("proj");
    write(&root, "src/main.cpp", "int main() { return 0; }\n");
    write(&root, "src/msg.pb.h", "// Generated by the protocol buffer compiler.  DO NOT EDIT!\nint m;\n");
    write(&root, "src/gen.h", "/* This file is automatically GENERATED BY a tool */\nint g;\n");
    write(&root, "src/table.inl", "// do not edit: produced by script\nint t;\n");
    write(&root, "third_party/lib/lib.h", "int lib;\n");
    write(&root, "vendor/v.cpp", "int v;\n");
    write(&root, "src/external/e.hpp", "int e;\n");
    write(&root, "build/out.cc", "int b;\n");
    write(&root, "node_modules/x/addon.cc", "int n;\n");
    write(&root, ".git/hooks/x.c", "int g;\n");
    write(&root, "src/build.cpp", "int not_vendored;\n"); // a *file* named build is fine
    let minified = format!("int a[] = {{{}0}};\n", "1,".repeat(3000));
    write(&root, "src/min.h", &minified);
    write(&root, "src/empty.h", "\n\n");
    write(&root, "src/bom.h", "\u{feff}\n\n"); // a byte order mark and blank lines: empty too (was a "\n\n" document)
    write(&root, "README.md", "# not C++\n");
    let out = dir.path().join("out");
    let s = run_ok(&config(&[&root], &out, Mode::File));
    assert_eq!(skipped(&s, SkipReason::Generated), 3);
    assert_eq!(skipped(&s, SkipReason::VendoredPath), 6);
    assert_eq!(skipped(&s, SkipReason::Minified), 1);
    assert_eq!(skipped(&s, SkipReason::Empty), 2);
    assert_eq!(s.non_cpp_files, 1);
    let docs = read_docs(&out);
    let files: Vec<&str> = docs.iter().map(|d| d.files[0].as_str()).collect();
    assert_eq!(files, vec!["src/build.cpp", "src/main.cpp"]);
}

#[test]
fn a_panic_in_one_file_is_caught_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("proj");
    write(&root, "a.cpp", "int a;\n");
    write(&root, "boom.cpp", "int boom;\n");
    write(&root, "c.cpp", "int c;\n");
    for mode in [Mode::File, Mode::Crossfile] {
        let out = dir.path().join(format!("out_{}", mode.as_str()));
        let mut cfg = config(&[&root], &out, mode);
        cfg.panic_on = Some("boom.cpp".into());
        let s = run_ok(&cfg);
        assert_eq!(skipped(&s, SkipReason::InternalError), 1);
        assert_eq!(s.documents_written, 2);
    }
}

#[test]
fn missing_root_is_counted_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("proj");
    write(&root, "a.cpp", "int a;\n");
    let missing = dir.path().join("nope");
    let out = dir.path().join("out");
    let s = run_ok(&config(&[&missing as &Path, &root], &out, Mode::File));
    assert_eq!(s.roots_missing, 1);
    assert_eq!(s.projects, 1);
    assert_eq!(s.documents_written, 1);
}
