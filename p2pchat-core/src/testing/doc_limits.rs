//! Keeping a limits table in the docs true: [`check`] reads a markdown table (`| constant |
//! value | … |`) and compares each public constant's row with its value in the code,
//! rendered in the table's units by [`secs`], [`kib`], [`count`] and friends.

use std::time::Duration;

/// The rows `(constant, value)` of every table under the heading `section` in `markdown`.
pub fn rows(markdown: &str, section: &str) -> Vec<(String, String)> {
    let mut inside = false;
    let mut out = Vec::new();
    for line in markdown.lines() {
        if let Some(heading) = line.strip_prefix('#') {
            inside = heading.trim_start_matches('#').trim() == section;
            continue;
        }
        if !inside || !line.starts_with('|') {
            continue;
        }
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let (Some(name), Some(value)) = (cells.get(1), cells.get(2)) else {
            continue;
        };
        if name.starts_with("---") || *name == "constant" {
            continue;
        }
        out.push((name.trim_matches('`').to_owned(), (*value).to_owned()));
    }
    out
}

/// Compares the table rows under `section` with `actual` (`constant → value as the table
/// writes it`). Returns one line per row that differs, per constant of `actual` missing
/// from the table, and per row naming a public constant (`module::NAME`, upper case)
/// `actual` does not cover.
pub fn check(markdown: &str, section: &str, actual: &[(&str, String)]) -> Vec<String> {
    let rows = rows(markdown, section);
    let mut problems = Vec::new();
    for (name, value) in actual {
        match rows.iter().find(|(n, _)| n == name) {
            None => problems.push(format!("`{name}` ({value}) is not in the table")),
            Some((_, documented)) if documented != value => problems.push(format!(
                "`{name}`: the table says {documented}, the code {value}"
            )),
            Some(_) => {}
        }
    }
    for (name, _) in &rows {
        let last = name.rsplit("::").next().unwrap_or_default();
        let constant = !last.is_empty()
            && last
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
        let public = name.contains("::") && !name.contains(' ') && !name.contains(',') && constant;
        if public && !actual.iter().any(|(n, _)| n == name) {
            problems.push(format!("`{name}` is in the table but not checked"));
        }
    }
    problems
}

/// Panics, listing every problem, unless the tables under `section` of the markdown file
/// `doc` match `actual` (see [`check`]).
pub fn assert_table(doc: &std::path::Path, section: &str, actual: &[(&str, String)]) {
    let markdown = std::fs::read_to_string(doc)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", doc.display()));
    let problems = check(&markdown, section, actual);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// `n` with thousands separators: `10,000`.
pub fn count(n: impl Into<u128>) -> String {
    let digits = n.into().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `n` bytes in KiB: `256 KiB` (or the bytes, if not a whole number of KiB).
pub fn kib(n: usize) -> String {
    if n.is_multiple_of(1024) {
        format!("{} KiB", count(n as u128 / 1024))
    } else {
        format!("{} B", count(n as u128))
    }
}

/// A duration in milliseconds: `250 ms`.
pub fn millis(d: Duration) -> String {
    format!("{} ms", count(d.as_millis()))
}

/// A duration in seconds: `10 s` (or in milliseconds if not whole seconds).
pub fn secs(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{} s", count(d.as_secs()))
    } else {
        millis(d)
    }
}

/// A duration in minutes: `10 min` (or in seconds if not whole minutes).
pub fn mins(d: Duration) -> String {
    if d.as_secs().is_multiple_of(60) && d.subsec_nanos() == 0 {
        format!("{} min", count(d.as_secs() / 60))
    } else {
        secs(d)
    }
}

/// A duration in hours: `1 h` (or in minutes if not whole hours).
pub fn hours(d: Duration) -> String {
    if d.as_secs().is_multiple_of(3600) && d.subsec_nanos() == 0 {
        format!("{} h", count(d.as_secs() / 3600))
    } else {
        mins(d)
    }
}

/// A duration in days: `7 days` (or in hours if not whole days).
pub fn days(d: Duration) -> String {
    if d.as_secs().is_multiple_of(86_400) && d.subsec_nanos() == 0 {
        format!("{} days", count(d.as_secs() / 86_400))
    } else {
        hours(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "# Limits\n\n| constant | value | what |\n|---|---|---|\n\
        | `a::X` | 10 s | x |\n| `a::Y` | 4 KiB | y |\n| `Z` (internal) | 3 | z |\n\
        | `a::W` | 1 | w |\n\n## Other\n\n| constant | value | what |\n| `a::V` | 1 | v |\n";

    #[test]
    fn a_wrong_missing_or_unchecked_row_is_reported() {
        let ok = check(
            DOC,
            "Limits",
            &[
                ("a::X", secs(Duration::from_secs(10))),
                ("a::Y", kib(4096)),
                ("a::W", count(1u32)),
            ],
        );
        assert_eq!(ok, Vec::<String>::new());
        let wrong = check(
            DOC,
            "Limits",
            &[
                ("a::X", secs(Duration::from_secs(11))),
                ("a::Y", kib(4096)),
                ("a::U", count(2u32)),
            ],
        );
        assert_eq!(wrong.len(), 3, "{wrong:?}");
        assert!(wrong[0].contains("a::X"));
        assert!(wrong[1].contains("a::U"));
        assert!(wrong[2].contains("a::W"));
    }

    #[test]
    fn values_are_written_as_the_tables_write_them() {
        assert_eq!(count(20_000u32), "20,000");
        assert_eq!(count(256u32), "256");
        assert_eq!(kib(256 * 1024), "256 KiB");
        assert_eq!(secs(Duration::from_millis(250)), "250 ms");
        assert_eq!(mins(Duration::from_secs(600)), "10 min");
        assert_eq!(hours(Duration::from_secs(3600)), "1 h");
        assert_eq!(days(Duration::from_secs(180 * 86_400)), "180 days");
        assert_eq!(days(Duration::from_secs(30)), "30 s");
    }
}
