//! The Prometheus text exposition format, version 0.0.4.
//!
//! ```text
//! # HELP keel_num_records_in_total Records the source has read (Flink numRecordsIn).
//! # TYPE keel_num_records_in_total counter
//! keel_num_records_in_total{job="orders",subtask="0",task="source"} 42
//! ```
//!
//! Families are ordered by name and series by labels, so the output is stable. Label values
//! escape `\`, `"` and line feeds; help texts escape `\` and line feeds.

use std::fmt::Write as _;

use crate::names::Kind;
use crate::registry::Registry;

/// The `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

impl Registry {
    /// The whole registry in the Prometheus text format 0.0.4.
    pub fn render(&self) -> String {
        render(self)
    }
}

/// `registry` in the Prometheus text format 0.0.4 (the registry does not know this module: it
/// only offers [`Registry::visit`]).
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    registry.visit(|base, family, series| {
        let (name, kind) = match family.kind {
            Kind::Counter => (format!("{base}_total"), "counter"),
            Kind::Gauge => (base.to_string(), "gauge"),
        };
        let _ = writeln!(out, "# HELP {name} {}", escape_help(&family.help));
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in series {
            out.push_str(&name);
            if !labels.is_empty() {
                out.push('{');
                for (i, (k, v)) in labels.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    let _ = write!(out, "{k}=\"{}\"", escape_label(v));
                }
                out.push('}');
            }
            out.push(' ');
            push_value(&mut out, value);
            out.push('\n');
        }
    });
    out
}

fn escape_help(text: &str) -> String {
    text.replace('\\', "\\\\").replace('\n', "\\n")
}

fn escape_label(text: &str) -> String {
    text.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Go's float syntax: `NaN`, `+Inf`, `-Inf`, integers without a fraction, exponents for very
/// large or small magnitudes.
fn push_value(out: &mut String, v: f64) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v.is_infinite() {
        out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" });
    } else if v != 0.0 && (v.abs() >= 1e15 || v.abs() < 1e-6) {
        let _ = write!(out, "{v:e}");
    } else {
        let _ = write!(out, "{v}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names;

    #[test]
    fn renders_help_type_and_sorted_series_with_escaped_labels() {
        let r = Registry::new();
        let t0 = r.group(&[("job", "orders"), ("subtask", "0"), ("task", "src")]);
        let t1 = r.group(&[("job", "orders"), ("subtask", "1"), ("task", "src")]);
        t1.counter(names::NUM_RECORDS_IN).add(7);
        t0.counter(names::NUM_RECORDS_IN).add(42);
        let weird = r.group(&[("topic", "a\"b\\c\nd"), ("bad-label", "x")]);
        weird.gauge(names::PENDING_RECORDS).set(1.5);
        let text = r.render();
        let want = "\
# HELP keel_num_records_in_total Records the source has read (Flink numRecordsIn).
# TYPE keel_num_records_in_total counter
keel_num_records_in_total{job=\"orders\",subtask=\"0\",task=\"src\"} 42
keel_num_records_in_total{job=\"orders\",subtask=\"1\",task=\"src\"} 7
# HELP keel_pending_records Records in Kafka not yet read by the source: high watermark minus position, summed over its partitions (Flink pendingRecords).
# TYPE keel_pending_records gauge
keel_pending_records{bad_label=\"x\",topic=\"a\\\"b\\\\c\\nd\"} 1.5
";
        assert_eq!(text, want);
    }

    #[test]
    fn values_use_prometheus_float_syntax() {
        let cases = [
            (f64::NAN, "NaN"),
            (f64::INFINITY, "+Inf"),
            (f64::NEG_INFINITY, "-Inf"),
            (0.0, "0"),
            (3.0, "3"),
            (-2.25, "-2.25"),
            (1e20, "1e20"),
            (1.5e-9, "1.5e-9"),
            (123456789.0, "123456789"),
        ];
        for (v, want) in cases {
            let mut s = String::new();
            push_value(&mut s, v);
            assert_eq!(s, want);
        }
    }

    #[test]
    fn unknown_names_get_a_generic_help_and_empty_registries_render_nothing() {
        let r = Registry::new();
        assert_eq!(r.render(), "");
        let g = r.group(&[]);
        g.gauge("slotsFree").set(2.0);
        assert_eq!(r.render(), "# HELP keel_slots_free Keel metric slotsFree.\n# TYPE keel_slots_free gauge\nkeel_slots_free 2\n");
    }
}
