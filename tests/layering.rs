//! The top-level modules of src/ depend on each other in one direction only: each may use the
//! modules of the layers below it, never one of its own layer or above. The order is the one
//! written at the top of src/lib.rs and in docs/architecture.md; this test reads the `crate::`
//! paths of every module (outside `#[cfg(test)]` modules and `tests.rs` files, which may reach
//! anywhere) and fails naming the file and the edge that breaks it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top to bottom. A module may use only modules in later rows.
const LAYERS: &[&[&str]] = &[
    &["server", "discovery", "cluster", "reload"],
    &["http1"],
    &["gateway"],
    &["system", "queue"],
    &["proxy"],
    &["error"],
    &["body"],
    &["simulate"],
    &["autoscaler"],
    &["function"],
    &["provider"],
    &["upstream"],
    &[
        "h1",
        "forwarding",
        "conn",
        "router",
        "metrics",
        "demo",
        "incoming",
        "state",
    ],
    &["config"],
];

/// Not part of the order: the crate root, the shared unit-test fixtures and the fuzz targets'
/// entry points.
const OUTSIDE: &[&str] = &["lib", "main", "test_support", "fuzzing"];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module names a source text reaches through `crate::name` or `use crate::{a, b::c}`.
fn reached(text: &str) -> BTreeSet<String> {
    // Test modules may reach anywhere.
    let text = match text.find("#[cfg(test)]\nmod ") {
        Some(i) => &text[..i],
        None => text,
    };
    let mut names = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find("};").unwrap_or(group.len());
            // Only the first segment of each top-level item of the group; nested groups
            // (`b::{c, d}`) name items of `b`, not modules of the crate.
            let mut depth = 0;
            let mut start = 0;
            let group = &group[..end];
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        names.insert(ident(group[start..j].trim()));
                        start = j + 1;
                    }
                    _ => {}
                }
            }
            names.insert(ident(group[start..].trim()));
        } else {
            names.insert(ident(rest));
        }
    }
    names.remove("");
    names
}

#[test]
fn every_module_uses_only_the_layers_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let rank: BTreeMap<&str, usize> = LAYERS
        .iter()
        .enumerate()
        .flat_map(|(i, layer)| layer.iter().map(move |m| (*m, i)))
        .collect();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut broken = Vec::new();
    let mut seen = BTreeSet::new();
    for path in files {
        let rel = path.strip_prefix(&src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_str()
            .unwrap();
        let top = top.strip_suffix(".rs").unwrap_or(top).to_owned();
        if OUTSIDE.contains(&top.as_str()) || rel.file_name().unwrap() == "tests.rs" {
            continue;
        }
        let Some(&own) = rank.get(top.as_str()) else {
            broken.push(format!(
                "{}: module `{top}` is not in LAYERS (add it where it belongs)",
                rel.display()
            ));
            continue;
        };
        seen.insert(top.clone());
        let text = std::fs::read_to_string(&path).unwrap();
        for name in reached(&text) {
            if name == top || OUTSIDE.contains(&name.as_str()) {
                continue;
            }
            match rank.get(name.as_str()) {
                Some(&other) if other > own => {}
                Some(_) => broken.push(format!(
                    "{}: `{top}` uses `crate::{name}`, which is not below it",
                    rel.display()
                )),
                None => {}
            }
        }
    }
    for m in rank.keys() {
        if !seen.contains(*m) {
            broken.push(format!("LAYERS names `{m}`, which src/ does not have"));
        }
    }
    assert!(broken.is_empty(), "layering broken:\n{}", broken.join("\n"));
}

#[test]
fn the_reader_finds_paths_and_groups() {
    let text = "use crate::a::X;\nuse crate::{b, c::{D, E}, f::G};\nfn x() { crate::h::y(); }\n#[cfg(test)]\nmod tests { use crate::z; }";
    let got: Vec<String> = reached(text).into_iter().collect();
    assert_eq!(got, ["a", "b", "c", "f", "h"]);
}
