//! crossfile mode: include resolution, dependency order, cycles, budget.

mod common;

use common::*;
use cpp_chunker::Mode;

#[test]
fn headers_come_before_their_includers() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("proj");
    write(&root, "src/main.cpp", "#include \"a.h\"\n#include <vector>\nint main() { return a() + b(); }\n");
    write(&root, "src/a.h", "#pragma once\n#include \"b.h\"\ninline int a() { return b(); }\n");
    write(&root, "src/b.h", "#pragma once\ninline int b() { return 1; }");
    let out = dir.path().join("out");
    let s = run_ok(&config(&[&root], &out, Mode::Crossfile));
    let docs = read_docs(&out);
    assert_eq!(docs.len(), 1);
    let d = &docs[0];
    assert_eq!(d.files, vec!["src/b.h", "src/a.h", "src/main.cpp"]);
    assert_eq!(d.mode, "crossfile");
    assert_eq!(d.project, "proj");
    let expected = "// FILE: src/b.h\n#pragma once\ninline int b() { return 1; }\n\
                    // FILE: src/a.h\n#pragma once\n#include \"b.h\"\ninline int a() { return b(); }\n\
                    // FILE: src/main.cpp\n#include \"a.h\"\n#include <vector>\nint main() { return a() + b(); }\n";
    assert_eq!(d.text, expected);
    assert_eq!(d.bytes, expected.len());
    assert_eq!(s.includes_resolved, 2);
    assert_eq!(s.quoted_includes_unresolved, 0); // <vector> is a system include
    assert_eq!(s.include_cycles, 0);
    assert_eq!(s.headers_included, 2);
}

#[test]
fn include_cycle_terminates_and_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("proj");
    write(&root, "main.cpp", "#include \"a.h\"\nint main() {}\n");
    write(&root, "a.h", "#include \"b.h\"\nstruct A {};\n");
    write(&root, "b.h", "#include \"a.h\"\nstruct B {};\n");
    let out = dir.path().join("out");
    let s = run_ok(&config(&[&root], &out, Mode::Crossfile));
    let docs = read_docs(&out);
    assert_eq!(docs.len(), 1);
    assert_eq!(docs[0].files, vec!["b.h", "a.h", "main.cpp"]);
    assert_eq!(docs[0].text.matches("// FILE: a.h\n").count(), 1);
    assert_eq!(s.include_cycles, 1);
}

#[test]
fn include_directories_and_unresolved_includes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("proj");
    write(&root, "include/proj/api.h", "#include <proj/detail.h>\nint api();\n");
    write(&root, "include/proj/detail.h", "int detail();\n");
    write(&root, "lib/include/lib.h", "int lib();\n");
    write(
        &root,
        "src/impl/impl.cpp",
        "#include <proj/api.h>\n#include \"lib.h\"\n#include \"../util.h\"\n#include \"missing.h\"\nint x;\n",
    );
    write(&root, "src/util.h", "int util();\n");
    write(&root, "src/unused.h", "int unused();\n");
    let out = dir.path().join("out");
    let s = run_ok(&config(&[&root], &out, Mode::Crossfile));
    let docs = read_docs(&out);
    assert_eq!(docs.len(), 1);
    assert_eq!(
        docs[0].files,
        vec!["include/proj/detail.h", "include/proj/api.h", "lib/include/lib.h", "src/util.h", "src/impl/impl.cpp"]
    );
    assert_eq!(s.quoted_includes_unresolved, 1);
    assert_eq!(s.headers_never_included, 1);
}

#[test]
fn farthest_headers_are_dropped_first_when_over_budget() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("proj");
    write(&root, "main.cpp", "#include \"near.h\"\nint main() { return near(); }\n");
    write(&root, "near.h", "#include \"far.h\"\ninline int near() { return far(); }\n");
    let far = format!("inline int far() {{ return 0; }}\n{}", "// padding line for the far header\n".repeat(40));
    write(&root, "far.h", &far);
    let out = dir.path().join("out");
    let mut cfg = config(&[&root], &out, Mode::Crossfile);
    cfg.max_tokens = vec![60]; // 210 bytes: main + near fit, far does not
    let s = run_ok(&cfg);
    let docs = read_docs(&out);
    assert_eq!(docs.len(), 1);
    assert_eq!(docs[0].files, vec!["near.h", "main.cpp"]);
    assert!(docs[0].tokens_est <= 60);
    assert_eq!(s.headers_dropped_for_budget, 1);
    assert_eq!(s.documents_split, 0);
}

#[test]
fn oversized_source_is_split_without_headers() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("proj");
    write(&root, "h.h", "int h();\n");
    let body: String = (0..40).map(|i| format!("int f{i}() {{ return {i}; }}\n")).collect();
    let src = format!("#include \"h.h\"\n{body}");
    write(&root, "big.cpp", &src);
    let out = dir.path().join("out");
    let mut cfg = config(&[&root], &out, Mode::Crossfile);
    cfg.max_tokens = vec![50];
    let s = run_ok(&cfg);
    let docs = read_docs(&out);
    assert!(docs.len() > 1);
    assert_eq!(s.headers_dropped_for_budget, 1);
    let joined: String = docs.iter().map(|d| d.text.as_str()).collect();
    assert_eq!(joined, format!("// FILE: big.cpp\n{src}"));
    assert!(docs.iter().all(|d| d.files == ["big.cpp"] && d.tokens_est <= 50));
}
