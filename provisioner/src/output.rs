//! Printing instances for people (a table) or programs (`--output json`,
//! `yaml`, or `name`: one id per line, for shell loops).

use crate::instance::Instance;
use clap::ValueEnum;
use jiff::Timestamp;

/// Output format, as kubectl's `--output`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned columns.
    Table,
    /// JSON.
    Json,
    /// YAML.
    Yaml,
    /// The ids only, one per line.
    Name,
}

/// Instances in `format` (`table` for people).
pub fn instances(list: &[Instance], format: Format, now: Timestamp) -> String {
    match format {
        Format::Table => table(list, now),
        Format::Json => json(&list),
        Format::Yaml => yaml(&list),
        Format::Name => list.iter().map(|i| format!("{}\n", i.id)).collect(),
    }
}

/// One instance in `format`: an object, not a list of one.
pub fn instance(i: &Instance, format: Format, now: Timestamp) -> String {
    match format {
        Format::Json => json(i),
        Format::Yaml => yaml(i),
        _ => instances(std::slice::from_ref(i), format, now),
    }
}

/// Renders any serialisable value as YAML.
pub fn yaml<T: serde::Serialize>(value: &T) -> String {
    let mut out = serde_saphyr::to_string(value).expect("instances serialise");
    if !out.ends_with('\n') {
        out.push('\n');
    }
    out
}

/// Renders instances as a table with a header.
pub fn table(instances: &[Instance], now: Timestamp) -> String {
    let rows: Vec<[String; 5]> = instances
        .iter()
        .map(|i| {
            let left = i.expires_at.duration_since(now);
            let left = if left.is_negative() {
                "expired".to_owned()
            } else {
                format!(
                    "{}h{:02}m",
                    left.as_secs() / 3600,
                    left.as_secs() % 3600 / 60
                )
            };
            [
                i.id.to_string(),
                i.workload.clone(),
                i.phase.to_string(),
                format!("{} ({left})", i.expires_at.strftime("%Y-%m-%d %H:%M UTC")),
                i.url.clone(),
            ]
        })
        .collect();
    let header = ["ID", "WORKLOAD", "PHASE", "EXPIRES", "URL"];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; 5]| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}   "));
            }
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut out = line(header);
    for row in &rows {
        out.push_str(&line([&row[0], &row[1], &row[2], &row[3], &row[4]]));
    }
    out
}

/// Renders any serialisable value as pretty JSON with a trailing newline.
pub fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string_pretty(value).expect("instances serialise") + "\n"
}
