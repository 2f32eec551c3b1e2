//! The table `keel-versus` prints and writes: one row per figure, a column per system, Keel's
//! advantage over Flink as a factor, and the issue's goal for it (met or not).

use std::fmt::Write as _;

/// Which way a figure is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    Higher,
    Lower,
}

/// What a row must show to meet its goal.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Goal {
    /// Keel at least this many times better than Flink.
    Factor(f64),
    /// Keel's figure at most this (e.g. 0 lost).
    AtMost(f64),
    /// Both Keel's and Flink's figures at most this.
    BothAtMost(f64),
    /// Keel at least `factor` times better than Flink and at most `limit`.
    FactorAndAtMost { factor: f64, limit: f64 },
}

/// How a figure is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// A count or rate, as a whole number with thousands separators.
    Count,
    /// Seconds, two decimals.
    Seconds,
    /// Mebibytes, whole.
    MiB,
    /// CPU seconds, two decimals.
    CpuSeconds,
}

/// One figure.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub figure: String,
    pub unit: Unit,
    pub better: Better,
    pub flink: Option<f64>,
    pub keel: Option<f64>,
    /// Kafka Streams, where measured.
    pub streams: Option<f64>,
    pub goal: Option<Goal>,
    /// What the cell cannot say (how it was measured, what failed).
    pub note: String,
}

impl Row {
    pub fn new(figure: impl Into<String>, unit: Unit, better: Better) -> Row {
        Row {
            figure: figure.into(),
            unit,
            better,
            flink: None,
            keel: None,
            streams: None,
            goal: None,
            note: String::new(),
        }
    }

    pub fn values(mut self, flink: Option<f64>, keel: Option<f64>) -> Row {
        self.flink = flink;
        self.keel = keel;
        self
    }

    pub fn streams(mut self, streams: Option<f64>) -> Row {
        self.streams = streams;
        self
    }

    pub fn goal(mut self, goal: Goal) -> Row {
        self.goal = Some(goal);
        self
    }

    pub fn note(mut self, note: impl Into<String>) -> Row {
        self.note = note.into();
        self
    }

    /// How many times better Keel is than Flink (> 1: Keel is better). `None` when either is
    /// missing or the division means nothing (a zero).
    pub fn factor(&self) -> Option<f64> {
        let (f, k) = (self.flink?, self.keel?);
        let factor = match self.better {
            Better::Higher => k / f,
            Better::Lower => f / k,
        };
        factor.is_finite().then_some(factor).filter(|x| *x > 0.0)
    }

    /// Whether the goal is met; `None` without a goal or without the figures it needs.
    pub fn met(&self) -> Option<bool> {
        match self.goal? {
            Goal::Factor(min) => Some(self.factor()? >= min),
            Goal::AtMost(limit) => Some(self.keel? <= limit),
            Goal::BothAtMost(limit) => Some(self.keel? <= limit && self.flink? <= limit),
            Goal::FactorAndAtMost { factor, limit } => {
                let keel = self.keel?;
                // A Keel figure of 0 s beats any Flink figure.
                let ratio_ok = keel == 0.0 || self.factor()? >= factor;
                Some(ratio_ok && keel <= limit)
            }
        }
    }

    fn goal_text(&self) -> String {
        let x = |f: f64| format!("{}x", trim(f));
        match self.goal {
            None => String::new(),
            Some(Goal::Factor(f)) => format!(">= {}", x(f)),
            Some(Goal::AtMost(l)) => format!("Keel <= {}", self.format(l)),
            Some(Goal::BothAtMost(l)) => format!("both <= {}", self.format(l)),
            Some(Goal::FactorAndAtMost { factor, limit }) => {
                format!(">= {}, Keel <= {}", x(factor), self.format(limit))
            }
        }
    }

    /// A value in this row's unit.
    pub fn format(&self, v: f64) -> String {
        match self.unit {
            Unit::Count => thousands(v.round() as i64),
            Unit::Seconds => format!("{v:.2} s"),
            Unit::CpuSeconds => format!("{v:.2}"),
            Unit::MiB => format!("{} MiB", thousands(v.round() as i64)),
        }
    }

    fn cell(&self, v: Option<f64>) -> String {
        v.map(|v| self.format(v)).unwrap_or_else(|| "-".into())
    }

    fn cells(&self, with_streams: bool) -> Vec<String> {
        let mut cells = vec![
            self.figure.clone(),
            self.cell(self.flink),
            self.cell(self.keel),
            self.factor().map(|f| format!("{}x", trim(f))).unwrap_or_else(|| "-".into()),
            self.goal_text(),
            match self.met() {
                None => String::new(),
                Some(true) => "met".into(),
                Some(false) => "MISSED".into(),
            },
        ];
        if with_streams {
            cells.push(self.cell(self.streams));
        }
        cells.push(self.note.clone());
        cells
    }
}

/// `1234567` -> `1,234,567`.
pub fn thousands(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        out.insert(0, '-');
    }
    out
}

/// A factor with at most two significant decimals (`3.456` -> `3.5`, `12.3` -> `12`).
fn trim(f: f64) -> String {
    if f >= 10.0 {
        format!("{f:.0}")
    } else if f >= 1.0 {
        format!("{f:.1}")
    } else {
        format!("{f:.2}")
    }
}

fn header(with_streams: bool) -> Vec<String> {
    let mut h: Vec<String> =
        ["figure", "Flink", "Keel", "Keel vs Flink", "goal", ""].iter().map(|s| s.to_string()).collect();
    if with_streams {
        h.push("Kafka Streams".into());
    }
    h.push("notes".into());
    h
}

/// The rows as a plain-text table with aligned columns.
pub fn text_table(rows: &[Row]) -> String {
    let with_streams = rows.iter().any(|r| r.streams.is_some());
    let mut lines = vec![header(with_streams)];
    lines.extend(rows.iter().map(|r| r.cells(with_streams)));
    let columns = lines[0].len();
    let widths: Vec<usize> =
        (0..columns).map(|c| lines.iter().map(|l| l[c].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for (i, line) in lines.iter().enumerate() {
        let cells: Vec<String> =
            line.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}", w = *w)).collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
        if i == 0 {
            let _ = writeln!(out, "{}", widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>().join("  "));
        }
    }
    out
}

/// The rows as a Markdown table.
pub fn markdown_table(rows: &[Row]) -> String {
    let with_streams = rows.iter().any(|r| r.streams.is_some());
    let escape = |s: &String| s.replace('|', "\\|");
    let mut out = String::new();
    let h = header(with_streams);
    let _ = writeln!(out, "| {} |", h.iter().map(escape).collect::<Vec<_>>().join(" | "));
    let _ = writeln!(out, "|{}", " --- |".repeat(h.len()));
    for r in rows {
        let _ =
            writeln!(out, "| {} |", r.cells(with_streams).iter().map(escape).collect::<Vec<_>>().join(" | "));
    }
    out
}

/// The middle value (the mean of the two middle ones for an even count); `None` when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len().is_multiple_of(2) { (v[mid - 1] + v[mid]) / 2.0 } else { v[mid] })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factors_point_the_right_way() {
        let rate = Row::new("records/s", Unit::Count, Better::Higher).values(Some(100.0), Some(350.0));
        assert_eq!(rate.factor(), Some(3.5));
        let rss = Row::new("RSS", Unit::MiB, Better::Lower).values(Some(400.0), Some(20.0));
        assert_eq!(rss.factor(), Some(20.0));
        assert_eq!(Row::new("x", Unit::Count, Better::Lower).values(Some(1.0), None).factor(), None);
        assert_eq!(Row::new("x", Unit::Count, Better::Lower).values(Some(1.0), Some(0.0)).factor(), None);
    }

    #[test]
    fn goals_are_judged() {
        let rate = Row::new("r", Unit::Count, Better::Higher).values(Some(100.0), Some(299.0));
        assert_eq!(rate.clone().goal(Goal::Factor(3.0)).met(), Some(false));
        assert_eq!(rate.clone().goal(Goal::Factor(2.9)).met(), Some(true));
        assert_eq!(rate.met(), None);
        let lost = Row::new("lost", Unit::Count, Better::Lower).values(Some(0.0), Some(0.0));
        assert_eq!(lost.clone().goal(Goal::BothAtMost(0.0)).met(), Some(true));
        assert_eq!(lost.values(Some(3.0), Some(0.0)).goal(Goal::BothAtMost(0.0)).met(), Some(false));
        let kill = Row::new("kill", Unit::Seconds, Better::Lower).values(Some(15.0), Some(0.4));
        assert_eq!(kill.clone().goal(Goal::FactorAndAtMost { factor: 20.0, limit: 0.5 }).met(), Some(true));
        let slow = kill.values(Some(15.0), Some(0.8));
        assert_eq!(slow.goal(Goal::FactorAndAtMost { factor: 4.0, limit: 0.5 }).met(), Some(false));
        let zero = Row::new("gap", Unit::Seconds, Better::Lower).values(Some(5.0), Some(0.0));
        assert_eq!(zero.goal(Goal::FactorAndAtMost { factor: 20.0, limit: 1.0 }).met(), Some(true));
    }

    #[test]
    fn tables_show_every_cell() {
        let rows = vec![
            Row::new("records/s per core", Unit::Count, Better::Higher)
                .values(Some(120_000.0), Some(480_000.0))
                .streams(Some(90_000.0))
                .goal(Goal::Factor(3.0)),
            Row::new("TM kill -> output", Unit::Seconds, Better::Lower)
                .values(Some(15.3), None)
                .note("a | b"),
        ];
        let text = text_table(&rows);
        assert!(text.contains("120,000") && text.contains("480,000") && text.contains("4.0x"), "{text}");
        assert!(text.contains("met") && text.contains("90,000") && text.contains("15.30 s"), "{text}");
        let md = markdown_table(&rows);
        assert_eq!(md.lines().count(), 4, "{md}");
        assert!(md.contains("a \\| b") && md.contains("| Kafka Streams |"), "{md}");
    }

    #[test]
    fn numbers_are_written_for_people() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(-1_234_567), "-1,234,567");
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }
}
