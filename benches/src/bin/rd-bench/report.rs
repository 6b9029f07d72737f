//! The results table: printed, written as JSON (target/bench/report.json) and as Markdown
//! (docs/benchmarks.md).

use std::fmt::Write as _;
use std::path::Path;

use serde_json::{json, Value};

/// A target a row is checked against.
#[derive(Debug, Clone)]
pub struct Target {
    /// Human text, e.g. `>= 0.75 x relay`.
    pub text: String,
    pub met: bool,
}

/// One line of the table. Values are in `unit`; ratios are computed from them.
#[derive(Debug, Clone, Default)]
pub struct Row {
    pub scenario: String,
    pub metric: String,
    pub unit: String,
    pub direct: Option<f64>,
    pub relay: Option<f64>,
    pub tunnel: Option<f64>,
    pub target: Option<Target>,
    pub note: Option<String>,
}

impl Row {
    pub fn new(scenario: &str, metric: &str, unit: &str) -> Self {
        Self {
            scenario: scenario.into(),
            metric: metric.into(),
            unit: unit.into(),
            ..Self::default()
        }
    }

    pub fn paths(mut self, direct: f64, relay: f64, tunnel: f64) -> Self {
        self.direct = Some(direct);
        self.relay = Some(relay);
        self.tunnel = Some(tunnel);
        self
    }

    pub fn tunnel_only(mut self, v: f64) -> Self {
        self.tunnel = Some(v);
        self
    }

    pub fn target(mut self, text: impl Into<String>, met: bool) -> Self {
        self.target = Some(Target {
            text: text.into(),
            met,
        });
        self
    }

    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.note = Some(note.into());
        self
    }

    fn ratio(&self, base: Option<f64>) -> Option<f64> {
        match (self.tunnel, base) {
            (Some(t), Some(b)) if b != 0.0 => Some(t / b),
            _ => None,
        }
    }

    pub fn tunnel_over_direct(&self) -> Option<f64> {
        self.ratio(self.direct)
    }

    pub fn tunnel_over_relay(&self) -> Option<f64> {
        self.ratio(self.relay)
    }

    fn cells(&self) -> Vec<String> {
        let v = |x: Option<f64>| x.map(fmt_value).unwrap_or_else(|| "-".into());
        let r = |x: Option<f64>| x.map(|x| format!("{x:.2}")).unwrap_or_else(|| "-".into());
        vec![
            self.scenario.clone(),
            format!("{} ({})", self.metric, self.unit),
            v(self.direct),
            v(self.relay),
            v(self.tunnel),
            r(self.tunnel_over_direct()),
            r(self.tunnel_over_relay()),
            self.target
                .as_ref()
                .map(|t| t.text.clone())
                .unwrap_or_default(),
            match &self.target {
                Some(t) if t.met => "met".into(),
                Some(_) => "NOT MET".into(),
                None => String::new(),
            },
        ]
    }

    pub fn to_json(&self) -> Value {
        json!({
            "scenario": self.scenario,
            "metric": self.metric,
            "unit": self.unit,
            "direct": self.direct,
            "relay": self.relay,
            "tunnel": self.tunnel,
            "tunnel_over_direct": self.tunnel_over_direct(),
            "tunnel_over_relay": self.tunnel_over_relay(),
            "target": self.target.as_ref().map(|t| t.text.clone()),
            "met": self.target.as_ref().map(|t| t.met),
            "note": self.note,
        })
    }
}

/// Three significant-ish digits without scientific notation.
pub fn fmt_value(x: f64) -> String {
    let a = x.abs();
    if a >= 1000.0 {
        format!("{x:.0}")
    } else if a >= 100.0 {
        format!("{x:.1}")
    } else if a >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

const HEADERS: [&str; 9] = [
    "scenario",
    "metric",
    "direct",
    "relay",
    "tunnel",
    "tunnel/direct",
    "tunnel/relay",
    "target",
    "",
];

/// A fixed-width text table.
pub fn text_table(rows: &[Row]) -> String {
    let cells: Vec<Vec<String>> = rows.iter().map(Row::cells).collect();
    let mut widths: Vec<usize> = HEADERS.iter().map(|h| h.len()).collect();
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, row: &[String]| {
        for (i, (c, w)) in row.iter().zip(&widths).enumerate() {
            // Text columns left-aligned, numbers right-aligned.
            if (2..=6).contains(&i) {
                write!(out, "{c:>w$}  ").ok();
            } else {
                write!(out, "{c:<w$}  ").ok();
            }
        }
        out.truncate(out.trim_end().len());
        out.push('\n');
    };
    line(
        &mut out,
        &HEADERS.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
    );
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    line(&mut out, &rule);
    for row in &cells {
        line(&mut out, row);
    }
    let notes: Vec<String> = rows
        .iter()
        .filter_map(|r| {
            r.note
                .as_ref()
                .map(|n| format!("  {} / {}: {n}", r.scenario, r.metric))
        })
        .collect();
    if !notes.is_empty() {
        out.push_str("\nnotes:\n");
        for n in notes {
            out.push_str(&n);
            out.push('\n');
        }
    }
    out
}

/// A Markdown table.
pub fn markdown_table(rows: &[Row]) -> String {
    let mut out = String::new();
    let headers: Vec<String> = HEADERS
        .iter()
        .map(|h| {
            if h.is_empty() {
                "met?".to_string()
            } else {
                h.to_string()
            }
        })
        .collect();
    writeln!(out, "| {} |", headers.join(" | ")).ok();
    writeln!(
        out,
        "|{}",
        headers
            .iter()
            .enumerate()
            .map(|(i, _)| if (2..=6).contains(&i) {
                "---:|"
            } else {
                "---|"
            })
            .collect::<String>()
    )
    .ok();
    for row in rows {
        let mut cells = row.cells();
        if let Some(last) = cells.last_mut() {
            if last == "NOT MET" {
                *last = "**NOT MET**".into();
            }
        }
        writeln!(
            out,
            "| {} |",
            cells.join(" | ").replace(">=", "≥").replace("<=", "≤")
        )
        .ok();
    }
    out
}

/// Machine facts for the report.
pub fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    json!({
        "nproc": nproc,
        "cpu_model": model,
        "mem_gib": (mem_kib as f64 / (1024.0 * 1024.0) * 10.0).round() / 10.0,
        "kernel": kernel,
    })
}

/// Output of a command, trimmed, or `None`.
pub fn command_output(cmd: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Criterion's latest estimates under `criterion_dir` (`target/criterion`), as Markdown rows.
pub fn criterion_markdown(criterion_dir: &Path) -> Option<String> {
    let mut entries = Vec::new();
    collect_criterion(criterion_dir, &mut entries);
    if entries.is_empty() {
        return None;
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = String::from("| benchmark | time (mean) | throughput |\n|---|---:|---:|\n");
    for (id, ns, thrpt) in entries {
        writeln!(out, "| `{id}` | {} | {thrpt} |", fmt_ns(ns)).ok();
    }
    Some(out)
}

fn collect_criterion(dir: &Path, out: &mut Vec<(String, f64, String)>) {
    let Ok(read) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in read.flatten() {
        let path = entry.path();
        if !path.is_dir() {
            continue;
        }
        let bench = path.join("new").join("benchmark.json");
        let estimates = path.join("new").join("estimates.json");
        if let (Ok(b), Ok(e)) = (
            std::fs::read_to_string(&bench),
            std::fs::read_to_string(&estimates),
        ) {
            let (Ok(b), Ok(e)) = (
                serde_json::from_str::<Value>(&b),
                serde_json::from_str::<Value>(&e),
            ) else {
                continue;
            };
            let id = b["full_id"].as_str().unwrap_or("?").to_string();
            let ns = e["mean"]["point_estimate"].as_f64().unwrap_or(0.0);
            let thrpt = if let Some(bytes) = b["throughput"]["Bytes"].as_f64() {
                format!("{:.2} GiB/s", bytes / ns * 1e9 / (1u64 << 30) as f64)
            } else if let Some(el) = b["throughput"]["Elements"].as_f64() {
                format!("{:.2} M/s", el / ns * 1e9 / 1e6)
            } else {
                String::new()
            };
            out.push((id, ns, thrpt));
        } else {
            collect_criterion(&path, out);
        }
    }
}

fn fmt_ns(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.2} µs", ns / 1e3)
    } else {
        format!("{ns:.1} ns")
    }
}
