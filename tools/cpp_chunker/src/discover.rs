//! Walking a project root: which entries are C/C++ files, and which are skipped by
//! path alone (vendored directories, symlinks). Symlinks are never followed, so a
//! symlink loop cannot make the walk run forever.

use std::path::{Path, PathBuf};

use walkdir::WalkDir;

use crate::stats::{SkipReason, Stats};

/// Source extensions: these files start a document in `crossfile` mode.
pub const SOURCE_EXTS: &[&str] = &["c", "cc", "cpp", "cxx"];
/// Header-like extensions (included by sources).
pub const HEADER_EXTS: &[&str] = &["h", "hh", "hpp", "hxx", "ipp", "inl", "tpp"];
/// A file under a directory with one of these names is skipped as vendored/generated.
pub const VENDORED_DIRS: &[&str] = &["third_party", "vendor", "external", "build", ".git", "node_modules"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Source,
    Header,
}

/// Classifies a path by extension (case-insensitive); `None` if not C/C++.
pub fn cpp_kind(path: &Path) -> Option<FileKind> {
    let ext = path.extension()?.to_str()?.to_ascii_lowercase();
    if SOURCE_EXTS.contains(&ext.as_str()) {
        Some(FileKind::Source)
    } else if HEADER_EXTS.contains(&ext.as_str()) {
        Some(FileKind::Header)
    } else {
        None
    }
}

/// True if any *directory* component of the root-relative path `rel` (with `/`
/// separators) is a vendored/generated directory name.
pub fn is_vendored(rel: &str) -> bool {
    let mut parts: Vec<&str> = rel.split('/').collect();
    parts.pop(); // the file name itself does not count
    parts.iter().any(|p| VENDORED_DIRS.contains(p))
}

/// A C/C++ file found under a root.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub abs: PathBuf,
    /// Path relative to the project root, `/`-separated (lossy for non-UTF-8 names).
    pub rel: String,
    pub kind: FileKind,
    /// Set when the path alone decides that the file is skipped (counted when the
    /// candidate is loaded, like every other skip).
    pub pre_skip: Option<SkipReason>,
}

#[derive(Debug, Default)]
pub struct Discovery {
    /// Sorted by path (walkdir sorts each directory by file name).
    pub candidates: Vec<Candidate>,
    pub stats: Stats,
}

fn rel_string(root: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(root).unwrap_or(path);
    let parts: Vec<String> = rel.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
    parts.join("/")
}

/// Walks `root` (without following symlinks) and lists its C/C++ files in a deterministic
/// order. Counts `files_seen` (C/C++ files, symlinked ones included), `non_cpp_files`,
/// `symlinks_not_followed` (symlinks without a C/C++ extension, e.g. to directories) and
/// `walk_errors` (unreadable directories and the like).
pub fn discover(root: &Path) -> Discovery {
    let mut out = Discovery::default();
    let walker = WalkDir::new(root).follow_links(false).sort_by_file_name();
    for entry in walker {
        let entry = match entry {
            Ok(e) => e,
            Err(_) => {
                out.stats.walk_errors += 1;
                continue;
            }
        };
        let ft = entry.file_type();
        if ft.is_dir() {
            continue;
        }
        let path = entry.path();
        let kind = cpp_kind(path);
        if ft.is_symlink() {
            match kind {
                Some(kind) => {
                    out.stats.files_seen += 1;
                    out.candidates.push(Candidate {
                        abs: path.to_path_buf(),
                        rel: rel_string(root, path),
                        kind,
                        pre_skip: Some(SkipReason::Symlink),
                    });
                }
                None => out.stats.symlinks_not_followed += 1,
            }
            continue;
        }
        if !ft.is_file() {
            continue; // sockets, fifos, devices
        }
        let Some(kind) = kind else {
            out.stats.non_cpp_files += 1;
            continue;
        };
        out.stats.files_seen += 1;
        let rel = rel_string(root, path);
        let pre_skip = is_vendored(&rel).then_some(SkipReason::VendoredPath);
        out.candidates.push(Candidate { abs: path.to_path_buf(), rel, kind, pre_skip });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds() {
        assert_eq!(cpp_kind(Path::new("a/b.cpp")), Some(FileKind::Source));
        assert_eq!(cpp_kind(Path::new("a/b.CC")), Some(FileKind::Source));
        assert_eq!(cpp_kind(Path::new("a/b.tpp")), Some(FileKind::Header));
        assert_eq!(cpp_kind(Path::new("a/b.py")), None);
        assert_eq!(cpp_kind(Path::new("Makefile")), None);
    }

    #[test]
    fn vendored() {
        assert!(is_vendored("third_party/x/y.h"));
        assert!(is_vendored("src/vendor/y.h"));
        assert!(is_vendored("build/gen.cpp"));
        assert!(!is_vendored("src/build.cpp"));
        assert!(!is_vendored("src/my_vendor/y.h"));
        assert!(!is_vendored("vendor.h"));
    }
}
