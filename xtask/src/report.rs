//! Writing measured figures into the docs: a section of a Markdown file, numbers with
//! thousands separators, and the machine the figures were measured on.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Rewrites the text between `<!-- NAME:begin -->` and `<!-- NAME:end -->`.
pub(crate) fn replace_section(path: &Path, name: &str, body: &str) -> Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let begin = format!("<!-- {name}:begin -->");
    let end = format!("<!-- {name}:end -->");
    let (Some(b), Some(e)) = (text.find(&begin), text.find(&end)) else {
        bail!("{} has no {begin} … {end} section", path.display());
    };
    let new = format!("{}{begin}\n{body}{}", &text[..b], &text[e..]);
    std::fs::write(path, new)?;
    Ok(())
}

/// `x` rounded, its digits grouped by three with spaces: `1 234 567`.
pub(crate) fn thousands(x: f64) -> String {
    let s = format!("{:.0}", x);
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

/// What the figures were measured on: CPU model, cores, date.
pub(crate) fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let date = Command::new("date")
        .arg("+%Y-%m-%d")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    format!("{cpu}, {cores} cores, {date}")
}
