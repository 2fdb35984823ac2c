//! A check that a crate's modules depend on each other one way only.
//!
//! [`check`] reads a crate's `src/` and finds, for each top-level module, the other top-level
//! modules it names (`crate::x`, `crate::{x, y}`, and names the crate root re-exports from
//! `x`). Every module must appear in the given order and may only name modules before it; a
//! reference upwards — the start of a cycle — is reported with the file that makes it.
//! `#[cfg(test)] mod tests` blocks at the end of a file are not counted: tests may reach
//! anywhere.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

/// One module naming a module above it (or one missing from the order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The file that names `to`.
    pub file: PathBuf,
    /// The top-level module the file belongs to.
    pub from: String,
    /// The module it should not name.
    pub to: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (module `{}`) uses `{}`, which is not below it",
            self.file.display(),
            self.from,
            self.to
        )
    }
}

/// The crate's dependency graph between top-level modules: module → modules it names.
pub fn graph(src: &Path) -> std::io::Result<BTreeMap<String, BTreeSet<String>>> {
    let reexports = reexports(src)?;
    let mut out = BTreeMap::new();
    for (file, module) in files(src)? {
        let text = without_tests(&fs::read_to_string(&file)?);
        let deps: &mut BTreeSet<String> = out.entry(module.clone()).or_default();
        for name in named_paths(&text) {
            let target = reexports.get(&name).cloned().unwrap_or(name);
            if target != module {
                deps.insert(target);
            }
        }
    }
    let modules: BTreeSet<String> = out.keys().cloned().collect();
    for deps in out.values_mut() {
        deps.retain(|d| modules.contains(d));
    }
    Ok(out)
}

/// Checks that each module of the crate in `src` names only modules before it in `order`.
/// Returns every violation (empty: the imports run one way).
pub fn check(src: &Path, order: &[&str]) -> std::io::Result<Vec<Violation>> {
    let rank: HashMap<&str, usize> = order.iter().enumerate().map(|(i, m)| (*m, i)).collect();
    let reexports = reexports(src)?;
    let mut violations = Vec::new();
    for (file, module) in files(src)? {
        let text = without_tests(&fs::read_to_string(&file)?);
        let Some(&mine) = rank.get(module.as_str()) else {
            violations.push(Violation {
                file: file.clone(),
                from: module.clone(),
                to: "(the module is not in the layer order)".to_owned(),
            });
            continue;
        };
        let mut seen = BTreeSet::new();
        for name in named_paths(&text) {
            let target = reexports.get(&name).cloned().unwrap_or(name);
            let Some(&theirs) = rank.get(target.as_str()) else {
                continue;
            };
            if theirs >= mine && target != module && seen.insert(target.clone()) {
                violations.push(Violation {
                    file: file.clone(),
                    from: module.clone(),
                    to: target,
                });
            }
        }
    }
    violations.sort_by(|a, b| a.file.cmp(&b.file).then(a.to.cmp(&b.to)));
    violations.dedup();
    Ok(violations)
}

/// The crate root's re-exports: name → the module it comes from.
fn reexports(src: &Path) -> std::io::Result<HashMap<String, String>> {
    let root = ["lib.rs", "main.rs"]
        .iter()
        .map(|f| src.join(f))
        .find(|p| p.exists());
    Ok(match root {
        Some(root) => root_reexports(&fs::read_to_string(root)?),
        None => HashMap::new(),
    })
}

/// Panics, listing every import against `order`, unless the crate in `src` depends on its
/// modules one way (see [`check`]).
pub fn assert_one_way(src: &Path, order: &[&str]) {
    let violations = check(src, order).expect("the sources can be read");
    assert!(
        violations.is_empty(),
        "imports against the layers:\n{}",
        violations
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Every `.rs` file under `src` except the crate root, with its top-level module.
fn files(src: &Path) -> std::io::Result<Vec<(PathBuf, String)>> {
    let mut out = Vec::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().and_then(|e| e.to_str()) != Some("rs") {
                continue;
            }
            let rel = path.strip_prefix(src).unwrap_or(&path);
            let first = rel
                .components()
                .next()
                .and_then(|c| c.as_os_str().to_str())
                .unwrap_or_default();
            let module = first.trim_end_matches(".rs").to_owned();
            if rel.components().count() == 1 && (module == "lib" || module == "main") {
                continue;
            }
            out.push((path, module));
        }
    }
    out.sort();
    Ok(out)
}

/// The text before a trailing `#[cfg(test)] mod tests`, with line comments removed.
fn without_tests(text: &str) -> String {
    let end = text.find("#[cfg(test)]\nmod tests").unwrap_or(text.len());
    text[..end]
        .lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The first segment of every `crate::` path in `text` (`crate::a::b` → `a`;
/// `crate::{a::b, c}` → `a`, `c`).
fn named_paths(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        let before = rest[..i].chars().next_back();
        rest = &rest[i + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue; // e.g. `p2pchat_crate::`
        }
        if let Some(group) = rest.strip_prefix('{') {
            out.extend(group_heads(group));
        } else {
            out.push(ident(rest).to_owned());
        }
    }
    out.retain(|s| !s.is_empty());
    out
}

/// The first segments of the paths in a `{…}` group (nested groups are skipped).
fn group_heads(group: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut depth = 0usize;
    let mut at_start = true;
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => at_start = true,
            c if at_start && depth == 0 && (c.is_alphanumeric() || c == '_') => {
                out.push(ident(&group[i..]).to_owned());
                at_start = false;
            }
            _ => {}
        }
    }
    out
}

fn ident(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// Names the crate root re-exports (`pub use module::{A, B}` / `pub use module::A`) → module.
fn root_reexports(lib: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for stmt in without_tests(lib).split(';') {
        let stmt = stmt.trim();
        let Some(path) = stmt
            .lines()
            .map(str::trim)
            .filter(|l| !l.starts_with("#["))
            .collect::<Vec<_>>()
            .join(" ")
            .strip_prefix("pub use ")
            .map(str::to_owned)
        else {
            continue;
        };
        let module = ident(&path).to_owned();
        let tail = &path[module.len()..];
        let Some(tail) = tail.strip_prefix("::") else {
            continue;
        };
        let names: Vec<&str> = match tail.find('{') {
            Some(i) => tail[i + 1..]
                .trim_end_matches('}')
                .split(',')
                .map(|s| s.trim())
                .collect(),
            None => vec![tail],
        };
        for name in names {
            let last = name.rsplit("::").next().unwrap_or(name);
            let last = last.rsplit(" as ").next().unwrap_or(last).trim();
            if !last.is_empty() {
                out.insert(last.to_owned(), module.clone());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, file: &str, text: &str) {
        let path = dir.join(file);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    #[test]
    fn a_module_naming_one_above_it_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "lib.rs",
            "pub mod a;\npub mod b;\npub use b::Thing;\n",
        );
        write(dir.path(), "a.rs", "use crate::Thing;\n");
        write(
            dir.path(),
            "b.rs",
            "use crate::{a::x, c};\npub struct Thing;\n",
        );
        write(dir.path(), "b/inner.rs", "// crate::a is only a comment\n");
        let found = check(dir.path(), &["a", "b"]).unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!((found[0].from.as_str(), found[0].to.as_str()), ("a", "b"));
        assert!(check(dir.path(), &["b", "a"]).unwrap().len() == 1);
        let graph = graph(dir.path()).unwrap();
        assert_eq!(graph["a"], BTreeSet::from(["b".to_owned()]));
        assert_eq!(graph["b"], BTreeSet::from(["a".to_owned()]));
    }

    #[test]
    fn tests_at_the_end_of_a_file_and_missing_modules() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "lib.rs", "pub mod a;\npub mod b;\n");
        write(
            dir.path(),
            "a.rs",
            "pub fn f() {}\n#[cfg(test)]\nmod tests {\n    use crate::b::g;\n}\n",
        );
        write(dir.path(), "b.rs", "use crate::a::f;\n");
        assert_eq!(check(dir.path(), &["a", "b"]).unwrap(), Vec::new());
        let missing = check(dir.path(), &["a"]).unwrap();
        assert_eq!(missing.len(), 1);
        assert_eq!(missing[0].from, "b");
    }
}
