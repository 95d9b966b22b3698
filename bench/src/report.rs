//! Results: rows of "ours / baseline / ratio / target", one value per A/B round, printed as a
//! table of medians (with the min–max spread) and optionally written as JSON.

use std::fmt::Write as _;

use serde::Serialize;

/// How a row is judged against the targets.
#[derive(Clone, Copy, Debug, Serialize)]
#[serde(tag = "on", rename_all = "snake_case")]
pub enum Target {
    /// ours / baseline must be at least this.
    RatioAtLeast { value: f64 },
    /// ours must be at most this (in the row's unit).
    AtMost { value: f64 },
}

impl Target {
    fn met(&self, row: &Row) -> Option<bool> {
        match self {
            Target::RatioAtLeast { value } => row.ratio.map(|ratio| ratio >= *value),
            Target::AtMost { value } => median(&row.ours).map(|ours| ours <= *value),
        }
    }

    fn describe(&self) -> String {
        match self {
            Target::RatioAtLeast { value } => format!("ratio >= {value}"),
            Target::AtMost { value } => format!("<= {}", number(*value)),
        }
    }
}

/// One measured quantity: our values and the baseline's, one per round.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub scenario: String,
    pub metric: String,
    pub unit: String,
    /// What the baseline column is (the no-op server, `--ephemeral`, ...).
    pub baseline_name: String,
    pub ours: Vec<f64>,
    pub baseline: Vec<f64>,
    /// Median of the per-round ratios (rounds are adjacent in time, so each pair saw the same
    /// machine noise); the ratio of medians when the rounds do not pair up.
    pub ratio: Option<f64>,
    pub target: Option<Target>,
    pub met: Option<bool>,
}

impl Row {
    pub fn new(scenario: &str, metric: &str, unit: &str) -> Row {
        Row {
            scenario: scenario.into(),
            metric: metric.into(),
            unit: unit.into(),
            baseline_name: String::new(),
            ours: Vec::new(),
            baseline: Vec::new(),
            ratio: None,
            target: None,
            met: None,
        }
    }

    pub fn ours(mut self, values: Vec<f64>) -> Row {
        self.ours = values;
        self
    }

    pub fn baseline(mut self, name: &str, values: Vec<f64>) -> Row {
        self.baseline_name = name.into();
        self.baseline = values;
        self
    }

    pub fn target(mut self, target: Target) -> Row {
        self.target = Some(target);
        self
    }

    fn finish(mut self) -> Row {
        let paired = !self.baseline.is_empty() && self.ours.len() == self.baseline.len();
        self.ratio = if paired {
            let ratios: Vec<f64> = self
                .ours
                .iter()
                .zip(&self.baseline)
                .filter(|(_, b)| **b != 0.0)
                .map(|(o, b)| o / b)
                .collect();
            median(&ratios)
        } else {
            match (median(&self.ours), median(&self.baseline)) {
                (Some(o), Some(b)) if b != 0.0 => Some(o / b),
                _ => None,
            }
        };
        self.met = self.target.and_then(|target| target.met(&self));
        self
    }
}

/// Everything one invocation measured.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub command: Vec<String>,
    pub machine: Machine,
    pub rows: Vec<Row>,
    /// Free-form facts worth keeping with the numbers (sizes, batch counts, warnings).
    pub notes: Vec<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub memory_bytes: u64,
    pub kernel: String,
}

impl Machine {
    pub fn here() -> Machine {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_kib = meminfo
            .lines()
            .find(|line| line.starts_with("MemTotal:"))
            .and_then(|line| line.split_whitespace().nth(1)?.parse::<u64>().ok())
            .unwrap_or(0);
        Machine {
            cpus: std::thread::available_parallelism().map_or(0, usize::from),
            memory_bytes: memory_kib * 1024,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
        }
    }
}

impl Report {
    pub fn push(&mut self, row: Row) {
        self.rows.push(row.finish());
    }

    pub fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    /// The table: medians, spreads, ratios and targets.
    pub fn table(&self) -> String {
        let header = [
            "scenario", "metric", "unit", "ours", "baseline", "vs", "ratio", "target", "met",
        ];
        let mut lines: Vec<[String; 9]> = vec![header.map(String::from)];
        for row in &self.rows {
            lines.push([
                row.scenario.clone(),
                row.metric.clone(),
                row.unit.clone(),
                spread(&row.ours),
                spread(&row.baseline),
                row.baseline_name.clone(),
                row.ratio.map_or("-".into(), |r| format!("{r:.2}")),
                row.target.map_or("-".into(), |t| t.describe()),
                match row.met {
                    Some(true) => "yes".into(),
                    Some(false) => "NO".into(),
                    None => "-".into(),
                },
            ]);
        }
        let widths: Vec<usize> = (0..header.len())
            .map(|column| {
                lines
                    .iter()
                    .map(|line| line[column].len())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for line in &lines {
            for (column, cell) in line.iter().enumerate() {
                let _ = write!(out, "{cell:<width$}  ", width = widths[column]);
            }
            out.truncate(out.trim_end().len());
            out.push('\n');
        }
        for note in &self.notes {
            let _ = writeln!(out, "note: {note}");
        }
        out
    }
}

pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    Some(if sorted.len() % 2 == 1 {
        sorted[middle]
    } else {
        (sorted[middle - 1] + sorted[middle]) / 2.0
    })
}

/// `median (min–max)`, or just the value for one round, or `-`.
fn spread(values: &[f64]) -> String {
    let Some(middle) = median(values) else {
        return "-".into();
    };
    if values.len() == 1 {
        return number(middle);
    }
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{} ({}–{})", number(middle), number(min), number(max))
}

fn number(value: f64) -> String {
    if value.abs() >= 100.0 {
        format!("{value:.0}")
    } else if value.abs() >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratio_is_the_median_of_paired_rounds() {
        let mut report = Report::default();
        report.push(
            Row::new("s", "m", "req/s")
                .ours(vec![80.0, 90.0, 70.0])
                .baseline("no-op", vec![100.0, 100.0, 100.0])
                .target(Target::RatioAtLeast { value: 0.85 }),
        );
        let row = &report.rows[0];
        assert_eq!(row.ratio, Some(0.8));
        assert_eq!(row.met, Some(false));
        assert!(report.table().contains("80.0 (70.0–90.0)"));
    }
}
