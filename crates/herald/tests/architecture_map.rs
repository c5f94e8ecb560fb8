//! docs/architecture.md is a map of the code, and a map is only useful while it is true: every
//! path it names exists, and every source file of the workspace is on it. A module added,
//! moved or deleted without its line in the map fails here.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn map() -> String {
    let path = root().join("docs/architecture.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The `code spans` of the map that name a path in the repository: they contain a `/` and
/// start with a top-level folder of the repository.
fn named_paths(text: &str) -> BTreeSet<String> {
    const TOP: [&str; 4] = ["crates/", "xtask/", "docs/", "tests/"];
    text.split('`')
        .skip(1)
        .step_by(2)
        .filter(|span| TOP.iter().any(|top| span.starts_with(top)))
        .filter(|span| !span.contains(char::is_whitespace))
        .map(|span| span.trim_end_matches('/').to_owned())
        .collect()
}

/// Every `.rs` file under `dir`, repository-relative.
fn sources(dir: &Path, out: &mut BTreeSet<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries {
        let path = entry.expect("readable folder entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let relative = path
                .strip_prefix(root())
                .expect("under the root")
                .to_string_lossy()
                .replace('\\', "/");
            out.insert(relative);
        }
    }
}

#[test]
fn every_path_the_map_names_exists() {
    let named = named_paths(&map());
    assert!(
        named.len() > 40,
        "the map names only {} paths: is it still the code map?",
        named.len()
    );
    let missing: Vec<&String> = named.iter().filter(|p| !root().join(p).exists()).collect();
    assert!(
        missing.is_empty(),
        "docs/architecture.md names paths that do not exist: {missing:?}"
    );
}

#[test]
fn every_source_file_is_on_the_map() {
    let named = named_paths(&map());
    let mut all = BTreeSet::new();
    let crates = std::fs::read_dir(root().join("crates")).expect("crates/ is readable");
    for krate in crates {
        sources(&krate.expect("entry").path().join("src"), &mut all);
    }
    sources(&root().join("xtask/src"), &mut all);
    let unmapped: Vec<&String> = all.iter().filter(|p| !named.contains(*p)).collect();
    assert!(
        unmapped.is_empty(),
        "source files missing from docs/architecture.md's code map: {unmapped:?}"
    );
}

#[test]
fn the_path_reader_finds_paths_and_only_paths() {
    let text = "see `crates/a/src/lib.rs` and `xtask/src/` but not `Producer::send` or `a b/c`";
    let found = named_paths(text);
    assert_eq!(
        found,
        BTreeSet::from(["crates/a/src/lib.rs".to_owned(), "xtask/src".to_owned()])
    );
}
