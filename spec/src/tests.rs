use super::*;

/// Parses `yaml`, expects an `InvalidSpec` error and returns `(field, reason)`.
fn invalid(yaml: &str) -> (String, String) {
    match JobSpec::parse(yaml) {
        Err(KeelError::InvalidSpec { field, reason }) => (field, reason),
        Err(other) => panic!("expected InvalidSpec, got {other:?}"),
        Ok(spec) => panic!("expected an error, got {spec:?}"),
    }
}

fn assert_invalid(yaml: &str, field: &str, reason_contains: &str) {
    let (f, r) = invalid(yaml);
    assert_eq!(f, field, "reason: {r}");
    assert!(r.contains(reason_contains), "field {f}: reason {r:?} lacks {reason_contains:?}");
}

const EXAMPLE: &str = "
name: numbers-to-file
parallelism: 2
maxParallelism: 128
sources:
  - name: numbers
    connector: datagen
    rows-per-second: 1000
    number-of-rows: 100000
sinks:
  - name: out
    connector: file
    from: numbers
    path: /tmp/keel-out
";

/// The example of the documentation parses into exactly the expected structure.
#[test]
fn documented_example_parses() {
    let spec = JobSpec::parse(EXAMPLE).expect("valid spec");
    assert_eq!(spec.name, "numbers-to-file");
    assert_eq!(spec.parallelism, 2);
    assert_eq!(spec.max_parallelism, 128);
    assert_eq!(spec.slots_needed(), 2);
    assert_eq!(spec.sources.len(), 1);
    assert_eq!(spec.sources[0].connector, "datagen");
    assert_eq!(spec.sources[0].options.get("rows-per-second").map(String::as_str), Some("1000"));
    assert_eq!(spec.sources[0].from, None);
    assert_eq!(spec.sinks[0].from.as_deref(), Some("numbers"));
    assert_eq!(
        spec.source_config(0).expect("datagen"),
        SourceConfig::Datagen(DatagenOptions {
            rows_per_second: 1000.0,
            number_of_rows: Some(100_000),
            start: 0
        })
    );
    assert_eq!(
        spec.sink_config(0).expect("file"),
        SinkConfig::File(FileOptions { path: "/tmp/keel-out".into() })
    );
}

/// Defaults: parallelism 1, maxParallelism 128, datagen 10000 rows/s unbounded from 0, and a
/// sink without `from` is fed by the only source.
#[test]
fn defaults_are_filled_in() {
    let spec = JobSpec::parse(
        "name: a\nsources:\n  - {name: s, connector: datagen}\nsinks:\n  - {name: k, connector: blackhole}\n",
    )
    .expect("valid");
    assert_eq!(spec.parallelism, 1);
    assert_eq!(spec.max_parallelism, DEFAULT_MAX_PARALLELISM);
    assert_eq!(spec.sinks[0].from.as_deref(), Some("s"));
    assert_eq!(
        spec.source_config(0).expect("datagen"),
        SourceConfig::Datagen(DatagenOptions { rows_per_second: 10_000.0, number_of_rows: None, start: 0 })
    );
    assert_eq!(spec.sink_config(0).expect("blackhole"), SinkConfig::Blackhole);
    assert_eq!(spec.sinks_of("s"), vec![0]);
}

/// Several sources, sinks routed by `from`, print options typed, kafka accepted by option names.
#[test]
fn several_sources_and_every_connector() {
    let spec = JobSpec::parse(
        r#"
name: multi.job_1
parallelism: 3
maxParallelism: 3
sources:
  - name: a
    connector: datagen
    start: -5
    rows-per-second: 0.5
  - name: b
    connector: kafka
    topic: in
    properties:
      bootstrap.servers: localhost:9092
      group.id: g
    scan.startup.mode: earliest-offset
    format: json
    json.ignore-parse-errors: true
    columns:
      - {name: id, type: BIGINT}
      - {name: name, type: STRING}
sinks:
  - name: p
    connector: print
    from: a
    print-identifier: left
    standard-error: true
  - name: q
    connector: kafka
    from: b
    topic: out
    properties.bootstrap.servers: localhost:9092
    sink.delivery-guarantee: exactly-once
    sink.transactional-id-prefix: keel
    value.format: csv
    value.csv.field-delimiter: ";"
  - name: r
    connector: print
    from: a
"#,
    )
    .expect("valid");
    assert_eq!(spec.sinks_of("a"), vec![0, 2]);
    assert_eq!(spec.sinks_of("b"), vec![1]);
    assert_eq!(
        spec.source_config(0).expect("datagen"),
        SourceConfig::Datagen(DatagenOptions { rows_per_second: 0.5, number_of_rows: None, start: -5 })
    );
    match spec.source_config(1).expect("kafka") {
        SourceConfig::Kafka(k) => {
            assert_eq!(k.topic.as_deref(), Some("in"));
            assert_eq!(k.bootstrap_servers, "localhost:9092");
            assert_eq!(k.options.get("properties.group.id").map(String::as_str), Some("g"));
        }
        other => panic!("expected kafka, got {other:?}"),
    }
    assert_eq!(
        spec.sink_config(0).expect("print"),
        SinkConfig::Print(PrintOptions { print_identifier: Some("left".into()), standard_error: true })
    );
    assert!(matches!(spec.sink_config(1), Ok(SinkConfig::Kafka(_))));
}

#[test]
fn kafka_source_with_topic_pattern_is_accepted() {
    let spec = JobSpec::parse(
        "name: k\nsources:\n  - {name: s, connector: kafka, topic-pattern: 'in-.*', properties.bootstrap.servers: 'b:1', properties.group.id: g}\nsinks:\n  - {name: o, connector: blackhole}\n",
    )
    .expect("valid");
    assert!(
        matches!(spec.source_config(0), Ok(SourceConfig::Kafka(k)) if k.topic_pattern.as_deref() == Some("in-.*"))
    );
}

/// A parsed spec survives a round trip through serde (the JobManager stores it).
#[test]
fn spec_round_trips_through_serde() {
    let spec = JobSpec::parse(EXAMPLE).expect("valid");
    let text = serde_yaml::to_string(&spec).expect("serialise");
    let back: JobSpec = serde_yaml::from_str(&text).expect("parse back");
    assert_eq!(back, spec);
}

#[test]
fn yaml_syntax_error_names_spec_with_line_and_column() {
    let (field, reason) = invalid("name: a\nsources: [\n  - x: : :\n");
    assert_eq!(field, "spec");
    assert!(reason.contains("line"), "{reason}");
    assert!(reason.contains("column"), "{reason}");
}

#[test]
fn empty_and_non_mapping_specs_are_rejected() {
    assert_invalid("", "spec", "empty");
    assert_invalid("- a\n- b\n", "spec", "mapping");
}

#[test]
fn unknown_top_level_key_is_named() {
    assert_invalid(
        "name: a\nparalelism: 2\nsources: [{name: s, connector: datagen}]\nsinks: [{name: k, connector: blackhole}]\n",
        "paralelism",
        "accepted top-level keys",
    );
}

#[test]
fn missing_or_empty_or_bad_name() {
    let body = "sources: [{name: s, connector: datagen}]\nsinks: [{name: k, connector: blackhole}]\n";
    assert_invalid(body, "name", "needs a name");
    assert_invalid(&format!("name: ''\n{body}"), "name", "must not be empty");
    assert_invalid(&format!("name: 'a b'\n{body}"), "name", "only letters");
    assert_invalid(&format!("name: [a]\n{body}"), "name", "single value");
}

#[test]
fn parallelism_must_be_a_positive_integer() {
    let body = "sources: [{name: s, connector: datagen}]\nsinks: [{name: k, connector: blackhole}]\n";
    assert_invalid(&format!("name: a\nparallelism: 0\n{body}"), "parallelism", "at least 1");
    assert_invalid(&format!("name: a\nparallelism: -1\n{body}"), "parallelism", "non-negative integer");
    assert_invalid(&format!("name: a\nparallelism: two\n{body}"), "parallelism", "integer");
    assert_invalid(&format!("name: a\nparallelism: 1.5\n{body}"), "parallelism", "integer");
}

#[test]
fn max_parallelism_bounds() {
    let body = "sources: [{name: s, connector: datagen}]\nsinks: [{name: k, connector: blackhole}]\n";
    assert_invalid(
        &format!("name: a\nparallelism: 4\nmaxParallelism: 2\n{body}"),
        "maxParallelism",
        "lower than parallelism 4",
    );
    assert_invalid(&format!("name: a\nparallelism: 200\n{body}"), "maxParallelism", "the default 128");
    assert_invalid(&format!("name: a\nmaxParallelism: 40000\n{body}"), "maxParallelism", "32768");
    let ok =
        JobSpec::parse(&format!("name: a\nparallelism: 200\nmaxParallelism: 32768\n{body}")).expect("valid");
    assert_eq!(ok.max_parallelism, 32768);
}

#[test]
fn sources_and_sinks_are_required() {
    assert_invalid("name: a\nsinks: [{name: k, connector: blackhole}]\n", "sources", "at least one source");
    assert_invalid(
        "name: a\nsources: []\nsinks: [{name: k, connector: blackhole}]\n",
        "sources",
        "at least one source",
    );
    assert_invalid("name: a\nsources: [{name: s, connector: datagen}]\n", "sinks", "at least one sink");
    assert_invalid(
        "name: a\nsources: {name: s}\nsinks: [{name: k, connector: blackhole}]\n",
        "sources",
        "must be a list",
    );
    assert_invalid(
        "name: a\nsources: [x]\nsinks: [{name: k, connector: blackhole}]\n",
        "sources[0]",
        "must be a mapping",
    );
}

#[test]
fn duplicate_source_and_sink_names() {
    assert_invalid(
        "name: a\nsources: [{name: s, connector: datagen}, {name: s, connector: datagen}]\nsinks: [{name: k, connector: blackhole, from: s}]\n",
        "sources[1].name",
        "duplicate source name 's'",
    );
    assert_invalid(
        "name: a\nsources: [{name: s, connector: datagen}]\nsinks: [{name: k, connector: blackhole}, {name: k, connector: print}]\n",
        "sinks[1].name",
        "duplicate sink name 'k'",
    );
}

#[test]
fn connector_entries_need_name_and_connector() {
    assert_invalid(
        "name: a\nsources: [{connector: datagen}]\nsinks: [{name: k, connector: blackhole}]\n",
        "sources[0].name",
        "needs a name",
    );
    assert_invalid(
        "name: a\nsources: [{name: s}]\nsinks: [{name: k, connector: blackhole}]\n",
        "sources[0].connector",
        "known connectors: datagen, kafka",
    );
}

#[test]
fn unknown_connector_lists_the_known_ones() {
    assert_invalid(
        "name: a\nsources: [{name: s, connector: kafak}]\nsinks: [{name: k, connector: blackhole}]\n",
        "sources[0].connector",
        "unknown connector 'kafak'; known connectors: datagen, kafka",
    );
    assert_invalid(
        "name: a\nsources: [{name: s, connector: datagen}]\nsinks: [{name: k, connector: datagen}]\n",
        "sinks[0].connector",
        "'datagen' is a source connector; known sink connectors: print, blackhole, file, kafka",
    );
}

#[test]
fn unknown_option_is_named_with_the_accepted_ones() {
    assert_invalid(
        "name: a\nsources: [{name: s, connector: datagen, rows-per-secnd: 5}]\nsinks: [{name: k, connector: blackhole}]\n",
        "sources[0].rows-per-secnd",
        "accepted options: number-of-rows, rows-per-second, start",
    );
    assert_invalid(
        "name: a\nsources: [{name: s, connector: datagen}]\nsinks: [{name: k, connector: blackhole, path: /x}]\n",
        "sinks[0].path",
        "takes no options",
    );
    assert_invalid(
        "name: a\nsources: [{name: s, connector: datagen}]\nsinks: [{name: k, connector: print, identifier: x}]\n",
        "sinks[0].identifier",
        "print-identifier",
    );
}

#[test]
fn datagen_option_types_are_checked() {
    let sink = "sinks: [{name: k, connector: blackhole}]\n";
    assert_invalid(
        &format!("name: a\nsources: [{{name: s, connector: datagen, rows-per-second: 0}}]\n{sink}"),
        "sources[0].rows-per-second",
        "positive number",
    );
    assert_invalid(
        &format!("name: a\nsources: [{{name: s, connector: datagen, rows-per-second: fast}}]\n{sink}"),
        "sources[0].rows-per-second",
        "positive number",
    );
    assert_invalid(
        &format!("name: a\nsources: [{{name: s, connector: datagen, number-of-rows: -3}}]\n{sink}"),
        "sources[0].number-of-rows",
        "non-negative integer",
    );
    assert_invalid(
        &format!("name: a\nsources: [{{name: s, connector: datagen, start: 1.5}}]\n{sink}"),
        "sources[0].start",
        "integer",
    );
    assert_invalid(
        &format!("name: a\nsources: [{{name: s, connector: datagen, start: 9223372036854775807, number-of-rows: 2}}]\n{sink}"),
        "sources[0].number-of-rows",
        "overflows",
    );
    assert_invalid(
        &format!("name: a\nsources: [{{name: s, connector: datagen, start: }}]\n{sink}"),
        "sources[0].start",
        "has no value",
    );
    assert_invalid(
        &format!("name: a\nsources: [{{name: s, connector: datagen, start: [1, 2]}}]\n{sink}"),
        "sources[0].start",
        "single value",
    );
}

#[test]
fn sink_option_types_are_checked() {
    let src = "sources: [{name: s, connector: datagen}]\n";
    assert_invalid(
        &format!("name: a\n{src}sinks: [{{name: k, connector: print, standard-error: maybe}}]\n"),
        "sinks[0].standard-error",
        "true or false",
    );
    assert_invalid(
        &format!("name: a\n{src}sinks: [{{name: k, connector: file}}]\n"),
        "sinks[0].path",
        "requires `path`",
    );
}

#[test]
fn sink_from_must_name_a_source() {
    assert_invalid(
        "name: a\nsources: [{name: s, connector: datagen}]\nsinks: [{name: k, connector: blackhole, from: t}]\n",
        "sinks[0].from",
        "no source is named 't'",
    );
    assert_invalid(
        "name: a\nsources: [{name: s, connector: datagen}, {name: t, connector: datagen}]\nsinks: [{name: k, connector: blackhole, from: s}, {name: l, connector: blackhole}]\n",
        "sinks[1].from",
        "several sources",
    );
    assert_invalid(
        "name: a\nsources: [{name: s, connector: datagen, from: x}]\nsinks: [{name: k, connector: blackhole}]\n",
        "sources[0].from",
        "only sinks",
    );
}

#[test]
fn kafka_required_options_and_option_names() {
    let sink = "sinks: [{name: k, connector: blackhole}]\n";
    assert_invalid(
        &format!(
            "name: a\nsources: [{{name: s, connector: kafka, properties.bootstrap.servers: 'b:1'}}]\n{sink}"
        ),
        "sources[0].topic",
        "topic-pattern",
    );
    assert_invalid(
        &format!("name: a\nsources: [{{name: s, connector: kafka, topic: t}}]\n{sink}"),
        "sources[0].properties.bootstrap.servers",
        "requires",
    );
    assert_invalid(
        &format!("name: a\nsources: [{{name: s, connector: kafka, topic: t, properties.bootstrap.servers: 'b:1', scan.startup.mod: x}}]\n{sink}"),
        "sources[0].scan.startup.mod",
        "scan.startup.mode",
    );
    // A sink option on a source is unknown.
    assert_invalid(
        &format!("name: a\nsources: [{{name: s, connector: kafka, topic: t, properties.bootstrap.servers: 'b:1', sink.partitioner: fixed}}]\n{sink}"),
        "sources[0].sink.partitioner",
        "as a source",
    );
    let src = "sources: [{name: s, connector: datagen}]\n";
    assert_invalid(
        &format!("name: a\n{src}sinks: [{{name: k, connector: kafka, topic-pattern: x, properties.bootstrap.servers: 'b:1'}}]\n"),
        "sinks[0].topic-pattern",
        "as a sink",
    );
    assert_invalid(
        &format!(
            "name: a\n{src}sinks: [{{name: k, connector: kafka, properties.bootstrap.servers: 'b:1'}}]\n"
        ),
        "sinks[0].topic",
        "requires `topic`",
    );
    assert_invalid(
        &format!("name: a\n{src}sinks: [{{name: k, connector: kafka, topic: t, properties.bootstrap.servers: 'b:1', xml.foo: 1}}]\n"),
        "sinks[0].xml.foo",
        "properties.*",
    );
}

#[test]
fn option_given_twice_through_nesting_is_rejected() {
    assert_invalid(
        "name: a\nsources: [{name: s, connector: kafka, topic: t, properties.bootstrap.servers: 'b:1', properties: {bootstrap.servers: 'c:2'}}]\nsinks: [{name: k, connector: blackhole}]\n",
        "sources[0].properties.bootstrap.servers",
        "given twice",
    );
}

#[test]
fn duplicate_yaml_keys_are_a_syntax_error() {
    let (field, reason) = invalid(
        "name: a\nname: b\nsources: [{name: s, connector: datagen}]\nsinks: [{name: k, connector: blackhole}]\n",
    );
    assert_eq!(field, "spec");
    assert!(reason.contains("duplicate"), "{reason}");
}

/// A job's `config:` mapping keeps the checkpointing keys it sets (flat or nested), and is
/// empty when left out.
#[test]
fn job_config_keeps_checkpointing_keys() {
    let spec = JobSpec::parse(&format!(
        "{EXAMPLE}config:\n  execution.checkpointing.interval: 500 ms\n  state:\n    checkpoints.num-retained: 3\n"
    ))
    .expect("valid spec");
    assert_eq!(spec.config.get("execution.checkpointing.interval").map(String::as_str), Some("500 ms"));
    assert_eq!(spec.config.get("state.checkpoints.num-retained").map(String::as_str), Some("3"));
    assert!(JobSpec::parse(EXAMPLE).expect("valid").config.is_empty());
}

/// Only checkpointing keys are accepted in `config:`, their values must parse, and errors name
/// `config.<key>`.
#[test]
fn job_config_rejects_other_keys_and_bad_values() {
    assert_invalid(
        &format!("{EXAMPLE}config:\n  heartbeat.interval: 1 s\n"),
        "config.heartbeat.interval",
        "accepted keys",
    );
    assert_invalid(
        &format!("{EXAMPLE}config:\n  execution.checkpointing.interval: often\n"),
        "config.execution.checkpointing.interval",
        "not a duration",
    );
    assert_invalid(
        &format!("{EXAMPLE}config:\n  state.checkpoints.num-retained: 0\n"),
        "config.state.checkpoints.num-retained",
        "at least 1",
    );
    assert_invalid(&format!("{EXAMPLE}config: [a]\n"), "config", "mapping");
}
