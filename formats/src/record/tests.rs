use arrow_array::Array as _;
use std::collections::BTreeMap;

use keel_proto::KeelError;

use super::*;
use crate::schema::ColumnDef;
use crate::value::Value;

fn opts(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn setup(columns: &[ColumnDef], pairs: &[(&str, &str)]) -> (Schema, RecordDecoder, RecordEncoder) {
    let schema = Schema::from_columns("sources[0].columns", columns).expect("schema");
    let format = RecordFormat::from_options("sources[0]", &opts(pairs), &schema).expect("format");
    let dec = RecordDecoder::new(&schema, &format);
    let enc = RecordEncoder::new(&schema, &format);
    (schema, dec, enc)
}

fn msg<'a>(key: Option<&'a [u8]>, value: Option<&'a [u8]>) -> KafkaMessage<'a> {
    KafkaMessage {
        topic: "people",
        partition: 3,
        offset: 1042,
        timestamp: Some(0),
        timestamp_type: TimestampType::CreateTime,
        leader_epoch: Some(0),
        headers: &[],
        key,
        value,
    }
}

fn decode_value(dec: &mut RecordDecoder, value: &str) -> Result<Option<Row>, DecodeError> {
    dec.decode(&msg(None, Some(value.as_bytes())))
}

fn id_name_age() -> Vec<ColumnDef> {
    vec![
        ColumnDef::new("id", DataType::Int),
        ColumnDef::new("name", DataType::String),
        ColumnDef::new("age", DataType::Int),
    ]
}

fn all_types() -> Vec<ColumnDef> {
    vec![
        ColumnDef::new("s", DataType::String),
        ColumnDef::new("b", DataType::Boolean),
        ColumnDef::new("i", DataType::Int),
        ColumnDef::new("l", DataType::BigInt),
        ColumnDef::new("d", DataType::Double),
        ColumnDef::new("t", DataType::Timestamp),
        ColumnDef::new("y", DataType::Bytes),
        ColumnDef::new("m", DataType::Map),
    ]
}

fn sample_rows() -> Vec<Row> {
    vec![
        Row::new(vec![
            Value::from("plain"),
            Value::Bool(true),
            Value::Int(-2_147_483_648),
            Value::Int(i64::MAX),
            Value::Double(0.1),
            Value::Timestamp(1_609_331_594_123),
            Value::Bytes(vec![0, 1, 2, 255]),
            Value::Map(vec![("trace".into(), Some(b"abc".to_vec())), ("empty".into(), None)]),
        ]),
        Row::new(vec![
            Value::from("with, \"quotes\"\nand a line break; and ünïcödé"),
            Value::Bool(false),
            Value::Int(0),
            Value::Int(-1),
            Value::Double(f64::NAN),
            Value::Timestamp(-1),
            Value::Bytes(vec![]),
            Value::Map(vec![]),
        ]),
        Row::new(vec![
            Value::from(""),
            Value::Null,
            Value::Null,
            Value::Null,
            Value::Double(f64::NEG_INFINITY),
            Value::Null,
            Value::Null,
            Value::Null,
        ]),
        Row::nulls(8),
        Row::new(vec![
            Value::from("\\N"),
            Value::Null,
            Value::Int(7),
            Value::Int(7),
            Value::Double(1e300),
            Value::Timestamp(0),
            Value::Null,
            Value::Null,
        ]),
    ]
}

/// Rows equal, treating NaN as equal to NaN.
fn same(a: &Row, b: &Row) -> bool {
    a.len() == b.len()
        && a.values.iter().zip(&b.values).all(|(x, y)| match (x, y) {
            (Value::Double(x), Value::Double(y)) => (x.is_nan() && y.is_nan()) || x == y,
            _ => x == y,
        })
}

fn round_trip(pairs: &[(&str, &str)], columns: &[ColumnDef], rows: &[Row]) {
    let (_, mut dec, enc) = setup(columns, pairs);
    for row in rows {
        let rec = enc.encode(row).unwrap_or_else(|e| panic!("{pairs:?}: encode {row}: {e}"));
        let back = dec
            .decode(&msg(rec.key.as_deref(), rec.value.as_deref()))
            .unwrap_or_else(|e| panic!("{pairs:?}: decode {:?}: {e}", rec.value))
            .unwrap_or_else(|| panic!("{pairs:?}: skipped {:?}", rec.value));
        assert!(same(&back, row), "{pairs:?}\nwrote {:?}\nread  {back:?}\nwant  {row:?}", rec.value);
    }
}

#[test]
fn seed_example_1_csv_id_name_age_reads_and_writes_the_same_line() {
    let (_, mut dec, enc) = setup(&id_name_age(), &[("format", "csv")]);
    let row = decode_value(&mut dec, "1,alice,30").expect("parses").expect("not skipped");
    assert_eq!(row, Row::new(vec![Value::Int(1), Value::from("alice"), Value::Int(30)]));
    let rec = enc.encode(&row).expect("encodes");
    assert_eq!(rec.value.as_deref(), Some(&b"1,alice,30"[..]));
    assert_eq!(rec.key, None);
    assert_eq!(rec.timestamp, None);
    // A trailing line break, as a console producer may leave, is accepted.
    let row2 = decode_value(&mut dec, "2,bob,17\r\n").expect("parses").expect("row");
    assert_eq!(row2.get(1), &Value::from("bob"));
}

#[test]
fn json_round_trips_every_type_and_null() {
    round_trip(&[("format", "json")], &all_types(), &sample_rows());
    round_trip(
        &[("format", "json"), ("json.timestamp-format.standard", "ISO-8601")],
        &all_types(),
        &sample_rows(),
    );
}

#[test]
fn csv_round_trips_every_type_null_and_empty_string() {
    round_trip(&[("format", "csv")], &all_types(), &sample_rows());
    round_trip(&[("format", "csv"), ("csv.field-delimiter", "\\t")], &all_types(), &sample_rows());
    round_trip(&[("format", "csv"), ("csv.quote-character", "'")], &all_types(), &sample_rows());
}

#[test]
fn csv_with_a_null_literal_round_trips_and_quotes_a_string_equal_to_it() {
    round_trip(&[("format", "csv"), ("csv.null-literal", "\\N")], &all_types(), &sample_rows());
    let (_, mut dec, enc) = setup(&id_name_age(), &[("format", "csv"), ("csv.null-literal", "NULL")]);
    let rec = enc.encode(&Row::new(vec![Value::Null, Value::from("NULL"), Value::Int(1)])).expect("encodes");
    assert_eq!(rec.value.as_deref(), Some(&b"NULL,\"NULL\",1"[..]));
    let row = decode_value(&mut dec, "1,,NULL").expect("ok").expect("row");
    assert_eq!(row.values, vec![Value::Int(1), Value::from(""), Value::Null]);
}

#[test]
fn csv_without_a_null_literal_reads_an_empty_field_as_null_and_quoted_empty_as_empty() {
    let (_, mut dec, enc) = setup(&id_name_age(), &[("format", "csv")]);
    let row = decode_value(&mut dec, ",,").expect("ok").expect("row");
    assert_eq!(row, Row::nulls(3));
    let row = decode_value(&mut dec, "1,\"\",2").expect("ok").expect("row");
    assert_eq!(row.get(1), &Value::from(""));
    let rec = enc.encode(&Row::new(vec![Value::Int(1), Value::from(""), Value::Null])).expect("encodes");
    assert_eq!(rec.value.as_deref(), Some(&b"1,\"\","[..]));
}

#[test]
fn csv_reads_quoted_delimiters_doubled_quotes_and_line_breaks() {
    let (_, mut dec, _) = setup(&id_name_age(), &[("format", "csv")]);
    let row = decode_value(&mut dec, "7,\"Smith, \"\"Jo\"\"\nJr\",40").expect("ok").expect("row");
    assert_eq!(row.get(1), &Value::from("Smith, \"Jo\"\nJr"));
}

#[test]
fn csv_with_quoting_disabled_refuses_to_write_a_delimiter() {
    let (_, mut dec, enc) =
        setup(&id_name_age(), &[("format", "csv"), ("csv.disable-quote-character", "true")]);
    let err =
        enc.encode(&Row::new(vec![Value::Int(1), Value::from("a,b"), Value::Int(2)])).expect_err("delimiter");
    assert_eq!(err.column, "name");
    assert_eq!(err.part, Some((Part::Value, FormatKind::Csv)));
    assert!(err.to_string().contains("csv.disable-quote-character"), "{err}");
    // Quotes are plain text then.
    let row = decode_value(&mut dec, "1,\"x\",2").expect("ok").expect("row");
    assert_eq!(row.get(1), &Value::from("\"x\""));
}

#[test]
fn raw_carries_the_whole_value_as_string_or_bytes() {
    let text = [ColumnDef::new("line", DataType::String)];
    round_trip(
        &[("format", "raw")],
        &text,
        &[Row::new(vec![Value::from("a,b {\"c\"}\n")]), Row::new(vec![Value::from("")])],
    );
    let bytes = [ColumnDef::new("blob", DataType::Bytes)];
    round_trip(&[("format", "raw")], &bytes, &[Row::new(vec![Value::Bytes(vec![0xff, 0, 0xfe])])]);

    // A tombstone is a null value, and a null value is written as a tombstone.
    let (_, mut dec, enc) = setup(&text, &[("format", "raw")]);
    let row = dec.decode(&msg(None, None)).expect("ok").expect("row");
    assert_eq!(row, Row::nulls(1));
    assert_eq!(enc.encode(&row).expect("encodes").value, None);

    // Invalid UTF-8 in a STRING column is malformed.
    let err = dec.decode(&msg(None, Some(&[0xff, 0xfe]))).expect_err("not utf-8");
    assert!(err.reason.contains("UTF-8"), "{err}");
}

#[test]
fn malformed_json_fails_with_topic_partition_offset_and_reason() {
    let (_, mut dec, _) = setup(&id_name_age(), &[("format", "json")]);
    let err = decode_value(&mut dec, "{\"id\": 1, \"name\": ").expect_err("truncated");
    let text = err.to_string();
    for needle in ["topic 'people'", "partition 3", "offset 1042", "value (json)", "not valid JSON"] {
        assert!(text.contains(needle), "{needle} not in {text}");
    }
    assert_eq!((err.partition, err.offset, err.part), (3, 1042, Part::Value));
    let keel: KeelError = err.into();
    assert!(keel.to_string().contains("offset 1042"), "{keel}");
    assert_eq!(dec.skipped_malformed(), 0);
}

#[test]
fn malformed_json_is_skipped_and_counted_with_ignore_parse_errors() {
    let (_, mut dec, _) = setup(&id_name_age(), &[("format", "json"), ("json.ignore-parse-errors", "true")]);
    for bad in ["not json", "[1,2]", "{\"id\": \"x\"}", "{\"age\": 3000000000}", ""] {
        assert_eq!(decode_value(&mut dec, bad).expect("skipped, not failed"), None, "{bad}");
    }
    assert_eq!(dec.skipped_malformed(), 5);
    let last = dec.last_skipped().expect("remembered");
    assert_eq!(last.offset, 1042);
    // Good records still come through.
    let row = decode_value(&mut dec, "{\"id\": 1, \"name\": \"a\", \"age\": 2}").expect("ok").expect("row");
    assert_eq!(row.get(2), &Value::Int(2));
    assert_eq!(dec.skipped_malformed(), 5);
}

#[test]
fn malformed_csv_is_skipped_and_counted_or_fails_with_its_position() {
    let bad =
        ["1,alice", "1,alice,30,extra", "x,alice,30", "1,\"alice,30", "1,\"al\"ice,30", "1,a,99999999999"];
    let (_, mut skip, _) = setup(&id_name_age(), &[("format", "csv"), ("csv.ignore-parse-errors", "true")]);
    let (_, mut fail, _) = setup(&id_name_age(), &[("format", "csv")]);
    for b in bad {
        assert_eq!(decode_value(&mut skip, b).expect("skipped"), None, "{b}");
        let err = decode_value(&mut fail, b).expect_err(b);
        let text = err.to_string();
        assert!(text.contains("partition 3 offset 1042") && text.contains("value (csv)"), "{text}");
    }
    assert_eq!(skip.skipped_malformed(), bad.len() as u64);
    let err = decode_value(&mut fail, "1,alice").expect_err("short");
    assert!(err.reason.contains("expected 3 fields (id, name, age), found 2"), "{}", err.reason);
    let err = decode_value(&mut fail, "x,alice,30").expect_err("type");
    assert!(err.reason.contains("field 'id': expected INT, found \"x\""), "{}", err.reason);
}

#[test]
fn json_type_mismatches_name_the_field_and_what_was_found() {
    let (_, mut dec, _) = setup(&all_types(), &[("format", "json")]);
    for (doc, needle) in [
        ("{\"i\": \"abc\"}", "field 'i': expected INT, found \"abc\""),
        ("{\"i\": 2147483648}", "field 'i': 2147483648 is out of range for INT"),
        ("{\"i\": 1.5}", "field 'i': expected INT, found 1.5"),
        ("{\"b\": 1}", "field 'b': expected BOOLEAN, found 1"),
        ("{\"d\": [1]}", "field 'd': expected DOUBLE, found [1]"),
        ("{\"t\": \"yesterday\"}", "field 't': expected TIMESTAMP"),
        ("{\"y\": \"***\"}", "field 'y': expected BYTES as base64"),
        ("{\"m\": {\"k\": 1}}", "field 'm': entry 'k'"),
        ("{\"l\": 18446744073709551615}", "field 'l': expected BIGINT"),
    ] {
        let err = decode_value(&mut dec, doc).expect_err(doc);
        assert!(err.reason.contains(needle), "{doc}: {}", err.reason);
    }
}

#[test]
fn json_reads_lenient_scalars_like_flink() {
    let (_, mut dec, _) = setup(&all_types(), &[("format", "json")]);
    let row = decode_value(
        &mut dec,
        r#"{"s": {"nested": [1]}, "b": "TRUE", "i": "42", "l": 18.0, "d": "2.5", "t": 1000, "y": "AAE", "extra": 1}"#,
    )
    .expect("ok")
    .expect("row");
    assert_eq!(row.get(0), &Value::from(r#"{"nested":[1]}"#));
    assert_eq!(row.get(1), &Value::Bool(true));
    assert_eq!(row.get(2), &Value::Int(42));
    assert_eq!(row.get(3), &Value::Int(18));
    assert_eq!(row.get(4), &Value::Double(2.5));
    assert_eq!(row.get(5), &Value::Timestamp(1000));
    assert_eq!(row.get(6), &Value::Bytes(vec![0, 1]));
    assert_eq!(row.get(7), &Value::Null);
}

#[test]
fn a_missing_json_field_is_null_unless_fail_on_missing_field() {
    let (_, mut dec, _) = setup(&id_name_age(), &[("format", "json")]);
    let row = decode_value(&mut dec, "{\"id\": 1}").expect("ok").expect("row");
    assert_eq!(row.values, vec![Value::Int(1), Value::Null, Value::Null]);
    let (_, mut strict, _) =
        setup(&id_name_age(), &[("format", "json"), ("json.fail-on-missing-field", "true")]);
    let err = decode_value(&mut strict, "{\"id\": 1}").expect_err("missing");
    assert!(err.reason.contains("field 'name' is missing"), "{}", err.reason);
}

#[test]
fn json_encode_keeps_declared_order_and_can_drop_nulls() {
    let (_, _, enc) = setup(&id_name_age(), &[("format", "json")]);
    let row = Row::new(vec![Value::Int(1), Value::from("a\"b"), Value::Null]);
    let rec = enc.encode(&row).expect("encodes");
    assert_eq!(rec.value.as_deref(), Some(&br#"{"id":1,"name":"a\"b","age":null}"#[..]));
    let (_, _, enc) =
        setup(&id_name_age(), &[("format", "json"), ("json.encode.ignore-null-fields", "true")]);
    let rec = enc.encode(&row).expect("encodes");
    assert_eq!(rec.value.as_deref(), Some(&br#"{"id":1,"name":"a\"b"}"#[..]));
}

#[test]
fn json_strings_are_escaped_so_any_text_reads_back() {
    let text: String = (0u8..0x80).map(char::from).chain("é€😀".chars()).collect();
    round_trip(
        &[("format", "json")],
        &[ColumnDef::new("s", DataType::String)],
        &[Row::new(vec![Value::from(text)])],
    );
}

#[test]
fn a_json_tombstone_is_skipped_and_counted_apart() {
    let (_, mut dec, _) = setup(&id_name_age(), &[("format", "json")]);
    assert_eq!(dec.decode(&msg(Some(b"k"), None)).expect("ok"), None);
    assert_eq!(dec.skipped_tombstones(), 1);
    assert_eq!(dec.skipped_malformed(), 0);
}

#[test]
fn metadata_columns_are_read_from_the_record() {
    let cols = vec![
        ColumnDef::new("id", DataType::BigInt),
        ColumnDef::metadata("topic", DataType::String, MetadataKey::Topic),
        ColumnDef::metadata("part", DataType::Int, MetadataKey::Partition),
        ColumnDef::metadata("off", DataType::BigInt, MetadataKey::Offset),
        ColumnDef::metadata("ts", DataType::Timestamp, MetadataKey::Timestamp),
        ColumnDef::metadata("h", DataType::Map, MetadataKey::Headers),
    ];
    let (_, mut dec, _) = setup(&cols, &[("format", "json")]);
    assert!(dec.needs_headers());
    let headers: [(&str, Option<&[u8]>); 2] = [("trace", Some(b"t-1")), ("trace", None)];
    let m = KafkaMessage {
        topic: "orders",
        partition: 7,
        offset: 1 << 40,
        timestamp: Some(1_700_000_000_000),
        timestamp_type: TimestampType::LogAppendTime,
        leader_epoch: Some(4),
        headers: &headers,
        key: None,
        value: Some(b"{\"id\": 5}"),
    };
    let row = dec.decode(&m).expect("ok").expect("row");
    assert_eq!(
        row.values,
        vec![
            Value::Int(5),
            Value::from("orders"),
            Value::Int(7),
            Value::Int(1 << 40),
            Value::Timestamp(1_700_000_000_000),
            Value::Map(vec![("trace".into(), Some(b"t-1".to_vec())), ("trace".into(), None)]),
        ]
    );
    let no_ts = KafkaMessage { timestamp: None, ..m };
    assert_eq!(dec.decode(&no_ts).expect("ok").expect("row").get(4), &Value::Null);
}

#[test]
fn the_encoder_writes_timestamp_and_headers_and_ignores_read_only_metadata() {
    let cols = vec![
        ColumnDef::new("id", DataType::BigInt),
        ColumnDef::metadata("off", DataType::BigInt, MetadataKey::Offset),
        ColumnDef::metadata("ts", DataType::Timestamp, MetadataKey::Timestamp),
        ColumnDef::metadata("h", DataType::Map, MetadataKey::Headers),
    ];
    let (_, _, enc) = setup(&cols, &[("format", "json")]);
    let headers = vec![("a".to_string(), Some(b"1".to_vec()))];
    let rec = enc
        .encode(&Row::new(vec![
            Value::Int(1),
            Value::Int(99),
            Value::Timestamp(123),
            Value::Map(headers.clone()),
        ]))
        .expect("encodes");
    assert_eq!(rec.value.as_deref(), Some(&b"{\"id\":1}"[..]));
    assert_eq!(rec.timestamp, Some(123));
    assert_eq!(rec.headers, headers);
    assert_eq!(rec.payload_len(), 8);

    let err = enc
        .encode(&Row::new(vec![Value::Int(1), Value::Null, Value::from("now"), Value::Null]))
        .expect_err("bad timestamp");
    assert_eq!((err.column.as_str(), err.part), ("ts", None));
    let err = enc.encode(&Row::new(vec![Value::Int(1)])).expect_err("short row");
    assert!(err.reason.contains("1 values"), "{err}");
}

#[test]
fn a_value_of_the_wrong_type_is_an_encode_error_naming_the_column() {
    let (_, _, json) = setup(&id_name_age(), &[("format", "json")]);
    let (_, _, csv) = setup(&id_name_age(), &[("format", "csv")]);
    let row = Row::new(vec![Value::Int(1), Value::Int(2), Value::from("x")]);
    for enc in [json, csv] {
        let err = enc.encode(&row).expect_err("type");
        assert_eq!(err.column, "name");
        assert!(err.reason.contains("INT value in a STRING column"), "{err}");
        let keel: KeelError = err.into();
        assert!(matches!(keel, KeelError::InvalidArgument { .. }));
    }
}

#[test]
fn key_fields_go_to_the_key_and_except_key_leaves_them_out_of_the_value() {
    let cols = id_name_age();
    let pairs = [
        ("key.format", "json"),
        ("key.fields", "id"),
        ("value.format", "csv"),
        ("value.fields-include", "EXCEPT_KEY"),
    ];
    let (_, mut dec, enc) = setup(&cols, &pairs);
    let row = Row::new(vec![Value::Int(9), Value::from("ann"), Value::Int(41)]);
    let rec = enc.encode(&row).expect("encodes");
    assert_eq!(rec.key.as_deref(), Some(&b"{\"id\":9}"[..]));
    assert_eq!(rec.value.as_deref(), Some(&b"ann,41"[..]));
    round_trip(&pairs, &cols, std::slice::from_ref(&row));

    // A message without a key leaves the key columns null.
    let back = dec.decode(&msg(None, Some(b"ann,41"))).expect("ok").expect("row");
    assert_eq!(back.values, vec![Value::Null, Value::from("ann"), Value::Int(41)]);

    // With ALL the key columns are in the value as well.
    let (_, _, all) = setup(&cols, &[("key.format", "raw"), ("key.fields", "name"), ("format", "json")]);
    let rec = all.encode(&row).expect("encodes");
    assert_eq!(rec.key.as_deref(), Some(&b"ann"[..]));
    assert_eq!(rec.value.as_deref(), Some(&b"{\"id\":9,\"name\":\"ann\",\"age\":41}"[..]));
}

#[test]
fn seed_example_3_prefixed_key_and_value_fields_round_trip() {
    let cols = vec![ColumnDef::new("key_id", DataType::Int), ColumnDef::new("val_name", DataType::String)];
    let pairs = [
        ("key.format", "json"),
        ("value.format", "json"),
        ("key.fields", "key_id"),
        ("key.fields-prefix", "key_"),
        ("value.fields-prefix", "val_"),
        ("value.fields-include", "EXCEPT_KEY"),
    ];
    let (_, mut dec, enc) = setup(&cols, &pairs);
    let row = dec.decode(&msg(Some(b"{\"id\": 4}"), Some(b"{\"name\": \"vvp\"}"))).expect("ok").expect("row");
    assert_eq!(row.values, vec![Value::Int(4), Value::from("vvp")]);
    let rec = enc.encode(&row).expect("encodes");
    assert_eq!(rec.key.as_deref(), Some(&b"{\"id\":4}"[..]));
    assert_eq!(rec.value.as_deref(), Some(&b"{\"name\":\"vvp\"}"[..]));
}

#[test]
fn a_malformed_key_is_reported_as_the_key_and_obeys_the_key_formats_option() {
    let cols = id_name_age();
    let (_, mut strict, _) = setup(
        &cols,
        &[
            ("key.format", "json"),
            ("key.fields", "id"),
            ("format", "json"),
            ("json.ignore-parse-errors", "true"),
        ],
    );
    let err = strict
        .decode(&msg(Some(b"{bad"), Some(b"{}")))
        .expect_err("key errors are not ignored by the value's option");
    assert_eq!(err.part, Part::Key);
    assert!(err.to_string().contains("key (json)"), "{err}");

    let (_, mut lenient, _) = setup(
        &cols,
        &[
            ("key.format", "json"),
            ("key.fields", "id"),
            ("key.json.ignore-parse-errors", "true"),
            ("format", "json"),
        ],
    );
    assert_eq!(lenient.decode(&msg(Some(b"{bad"), Some(b"{}"))).expect("skipped"), None);
    assert_eq!(lenient.skipped_malformed(), 1);
}

#[test]
fn decoding_arbitrary_bytes_never_panics() {
    let (_, mut json, _) = setup(&all_types(), &[("format", "json"), ("json.ignore-parse-errors", "true")]);
    let (_, mut csv, _) = setup(&all_types(), &[("format", "csv"), ("csv.ignore-parse-errors", "true")]);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let alphabet = b",\"\n\r{}[]:0123456789abcdefnulltrue-.eE\\ \t\xff\xc3";
    for _ in 0..5000 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let len = (seed % 40) as usize;
        let bytes: Vec<u8> =
            (0..len).map(|i| alphabet[((seed >> (i % 50)) as usize + i * 7) % alphabet.len()]).collect();
        let _ = json.decode(&msg(Some(&bytes), Some(&bytes)));
        let _ = csv.decode(&msg(Some(&bytes), Some(&bytes)));
    }
}

/// An `offset` metadata column declared INT cannot hold an offset past 2^31 - 1: the message
/// is refused naming its topic, partition and offset and the range, and nothing is appended
/// (before batches, the value was kept as a 64-bit number in a 32-bit column).
#[test]
fn an_offset_past_the_int_range_is_refused_naming_the_record() {
    let cols = [
        ColumnDef::new("id", DataType::BigInt),
        ColumnDef::metadata("off", DataType::Int, MetadataKey::Offset),
    ];
    let (_, mut dec, _) = setup(&cols, &[("format", "json")]);
    let mut builder = dec.builder(4);
    let mut m = msg(None, Some(b"{\"id\":1}"));
    assert_eq!(dec.decode_into(&m, &mut builder), Ok(true));
    m.offset = 3_000_000_000;
    let err = dec.decode_into(&m, &mut builder).expect_err("out of range");
    assert_eq!((err.topic.as_str(), err.partition, err.offset), ("people", 3, 3_000_000_000));
    assert!(err.reason.contains("3000000000 is out of range for INT"), "{err}");
    assert_eq!(builder.len(), 1);
}

/// A malformed message in the middle of a batch, skipped with `ignore-parse-errors`, leaves
/// no partial row behind: the batch holds exactly the good messages, in order.
#[test]
fn a_skipped_message_leaves_no_partial_row_in_the_batch() {
    let (_, mut dec, _) = setup(&id_name_age(), &[("format", "csv"), ("csv.ignore-parse-errors", "true")]);
    let mut builder = dec.builder(4);
    for line in ["1,ann,30", "2,bob,notanumber", "3,cy,40"] {
        dec.decode_into(&msg(None, Some(line.as_bytes())), &mut builder).expect("no error");
    }
    let rows = crate::batch::rows_of(&builder.finish());
    assert_eq!(
        rows,
        vec![
            Row::new(vec![Value::Int(1), Value::from("ann"), Value::Int(30)]),
            Row::new(vec![Value::Int(3), Value::from("cy"), Value::Int(40)]),
        ]
    );
    assert_eq!(dec.skipped_malformed(), 1);
}

/// A CSV field `null` in a MAP column is a null MAP, as before batches.
#[test]
fn a_csv_map_field_null_reads_as_null() {
    let cols = [ColumnDef::new("id", DataType::BigInt), ColumnDef::new("h", DataType::Map)];
    let (_, mut dec, _) = setup(&cols, &[("format", "csv")]);
    let row = decode_value(&mut dec, "1,null").expect("decodes").expect("a row");
    assert_eq!(row, Row::new(vec![Value::Int(1), Value::Null]));
}

/// A JSON number past the range of a double is refused, not read as infinity.
#[test]
fn a_json_double_out_of_range_is_refused() {
    let cols = [ColumnDef::new("d", DataType::Double)];
    let (_, mut dec, _) = setup(&cols, &[("format", "json")]);
    let err = decode_value(&mut dec, "{\"d\":1e400}").expect_err("out of range");
    assert!(err.reason.contains("expected DOUBLE"), "{err}");
}

fn dec(unscaled: i128, scale: i8) -> Value {
    Value::Decimal { unscaled, scale }
}

/// An id, a DATE and two DECIMALs (the widest precision, and a small one with a scale).
fn dated_amounts() -> Vec<ColumnDef> {
    vec![
        ColumnDef::new("id", DataType::BigInt),
        ColumnDef::new("day", DataType::Date),
        ColumnDef::new("big", DataType::Decimal { precision: 38, scale: 9 }),
        ColumnDef::new("price", DataType::Decimal { precision: 5, scale: 2 }),
    ]
}

/// DATE and DECIMAL values (extremes of the calendar and of 38 digits, negatives, zeros,
/// nulls) come back unchanged from json and csv, with and without a null literal.
#[test]
fn date_and_decimal_round_trip_in_json_and_csv() {
    let max = 10i128.pow(38) - 1;
    let rows = vec![
        Row::new(vec![Value::Int(1), Value::Date(19_844), dec(max, 9), dec(1250, 2)]),
        Row::new(vec![Value::Int(2), Value::Date(-719_528), dec(-max, 9), dec(-99_999, 2)]),
        Row::new(vec![Value::Int(3), Value::Date(2_932_896), dec(0, 9), dec(5, 2)]),
        Row::new(vec![Value::Int(4), Value::Null, Value::Null, Value::Null]),
    ];
    for pairs in [
        &[("format", "json")][..],
        &[("format", "json"), ("json.encode.ignore-null-fields", "true")],
        &[("format", "csv")],
        &[("format", "csv"), ("csv.null-literal", "\\N")],
        &[("format", "csv"), ("csv.disable-quote-character", "true"), ("csv.null-literal", "NULL")],
    ] {
        round_trip(pairs, &dated_amounts(), &rows);
    }
}

/// Writing: a DATE is `yyyy-MM-dd` (a JSON string), a DECIMAL is plain text with exactly its
/// scale's digits (a JSON number, never a string or an exponent).
#[test]
fn date_and_decimal_are_written_as_flink_writes_them() {
    let row = Row::new(vec![Value::Int(7), Value::Date(19_844), dec(-125, 3), dec(1250, 2)]);
    let (_, _, json) = setup(&dated_amounts(), &[("format", "json")]);
    let rec = json.encode(&row).expect("encodes");
    assert_eq!(
        rec.value.as_deref(),
        Some(&br#"{"id":7,"day":"2024-05-01","big":-0.125000000,"price":12.50}"#[..])
    );
    let (_, _, csv) = setup(&dated_amounts(), &[("format", "csv")]);
    let rec = csv.encode(&row).expect("encodes");
    assert_eq!(rec.value.as_deref(), Some(&b"7,2024-05-01,-0.125000000,12.50"[..]));
}

/// JSON DECIMALs are read from the number's own text, so digits past a double's 17 survive;
/// a string holding a number is read too; extra digits round half up (away from zero).
#[test]
fn json_decimals_are_exact_and_round_half_up() {
    let (_, mut dec_json, _) = setup(&dated_amounts(), &[("format", "json")]);
    let row = decode_value(
        &mut dec_json,
        r#"{"id": 1, "day": "2024-05-01", "big": 12345678901234567890.123456789, "price": "-1.005"}"#,
    )
    .expect("decodes")
    .expect("a row");
    assert_eq!(
        row.values,
        vec![
            Value::Int(1),
            Value::Date(19_844),
            dec(12_345_678_901_234_567_890_123_456_789, 9),
            dec(-101, 2)
        ]
    );
    for (text, want) in [("1.004", 100), ("1.005", 101), ("2.675", 268), ("1e2", 10_000), (" 3 ", 300)] {
        let doc = format!(r#"{{"price": "{text}"}}"#);
        let row = decode_value(&mut dec_json, &doc).expect(text).expect("row");
        assert_eq!(row.get(3), &dec(want, 2), "{text}");
    }
    let row = decode_value(&mut dec_json, r#"{"price": 0.125}"#).expect("number").expect("row");
    assert_eq!(row.get(3), &dec(13, 2));
}

/// CSV DECIMALs round half up to the scale as well; a quoted field is read the same.
#[test]
fn csv_decimals_round_half_up() {
    let (_, mut d, _) = setup(&dated_amounts(), &[("format", "csv")]);
    let row = decode_value(&mut d, "1,1970-01-02,0.0000000005,\"-2.345\"").expect("decodes").expect("row");
    assert_eq!(row.values, vec![Value::Int(1), Value::Date(1), dec(1, 9), dec(-235, 2)]);
}

/// A DATE or DECIMAL that does not parse, or a DECIMAL past its precision (also once rounded),
/// is a malformed record: the error names topic, partition, offset and the field, and with
/// `ignore-parse-errors` the record is skipped and counted.
#[test]
fn malformed_dates_and_decimals_are_errors_naming_the_record() {
    let json_cases = [
        (r#"{"day": "2024-02-30"}"#, "field 'day': expected DATE like \"2024-05-01\", found \"2024-02-30\""),
        (r#"{"day": 19844}"#, "field 'day': expected DATE like \"2024-05-01\", found 19844"),
        (r#"{"day": "2024-05-01 10:00:00"}"#, "field 'day': expected DATE"),
        (r#"{"price": "abc"}"#, "field 'price': expected DECIMAL(5, 2), found \"abc\""),
        (r#"{"price": true}"#, "field 'price': expected DECIMAL(5, 2), found true"),
        (r#"{"price": 1000}"#, "field 'price': \"1000\" is out of range for DECIMAL(5, 2)"),
        (r#"{"price": 999.995}"#, "field 'price': \"999.995\" is out of range for DECIMAL(5, 2)"),
        (r#"{"big": 1e30}"#, "field 'big': \"1e30\" is out of range for DECIMAL(38, 9)"),
    ];
    let csv_cases = [
        ("1,2024-13-01,,", "field 'day': expected DATE like 2024-05-01, found \"2024-13-01\""),
        ("1,,,12.5.1", "field 'price': expected DECIMAL(5, 2), found \"12.5.1\""),
        ("1,,,-1000", "field 'price': \"-1000\" is out of range for DECIMAL(5, 2)"),
        ("1,,,NaN", "field 'price': expected DECIMAL(5, 2), found \"NaN\""),
    ];
    for (format, cases) in [("json", &json_cases[..]), ("csv", &csv_cases[..])] {
        let (_, mut strict, _) = setup(&dated_amounts(), &[("format", format)]);
        let ignore = format!("{format}.ignore-parse-errors");
        let (_, mut lenient, _) = setup(&dated_amounts(), &[("format", format), (ignore.as_str(), "true")]);
        for (text, needle) in cases {
            let err = decode_value(&mut strict, text).expect_err(text);
            let shown = err.to_string();
            assert!(shown.contains("'people' partition 3 offset 1042"), "{shown}");
            assert!(err.reason.contains(needle), "{text}: {}", err.reason);
            assert_eq!(decode_value(&mut lenient, text).expect("skipped"), None, "{text}");
        }
        assert_eq!(lenient.skipped_malformed(), cases.len() as u64);
    }
}

/// A row built from values fits a DECIMAL column by rescaling INT and DECIMAL values to the
/// column's scale (rounding half up); one past the precision is refused naming the column.
#[test]
fn rows_fit_decimal_columns_by_rescaling() {
    let (_, _, enc) = setup(&dated_amounts(), &[("format", "csv")]);
    let row = Row::new(vec![Value::Int(1), Value::Null, Value::Int(-3), dec(12_345, 3)]);
    let rec = enc.encode(&row).expect("encodes");
    assert_eq!(rec.value.as_deref(), Some(&b"1,,-3.000000000,12.35"[..]));
    let err = enc
        .encode(&Row::new(vec![Value::Int(1), Value::Null, Value::Null, Value::Int(1000)]))
        .expect_err("4 digits");
    assert_eq!(err.column, "price");
    assert!(err.reason.contains("1000 is out of range for DECIMAL(5, 2)"), "{err}");
    let err = enc
        .encode(&Row::new(vec![Value::Int(1), Value::from("x"), Value::Null, Value::Null]))
        .expect_err("text");
    assert_eq!(err.column, "day");
    assert!(err.reason.contains("a STRING value in a DATE column"), "{err}");
}

/// `timestamp-type` reads Kafka's timestamp type by Flink's names and `leader-epoch` the
/// epoch (null when unknown, and in a BIGINT column too); a sink ignores both.
#[test]
fn timestamp_type_and_leader_epoch_are_read_from_the_record() {
    let cols = vec![
        ColumnDef::new("id", DataType::BigInt),
        ColumnDef::metadata("tt", DataType::String, MetadataKey::TimestampType),
        ColumnDef::metadata("epoch", DataType::Int, MetadataKey::LeaderEpoch),
    ];
    let (_, mut d, enc) = setup(&cols, &[("format", "json")]);
    let base = msg(None, Some(b"{\"id\": 5}"));
    for (tt, epoch, want_tt, want_epoch) in [
        (TimestampType::CreateTime, Some(3), "CreateTime", Value::Int(3)),
        (TimestampType::LogAppendTime, Some(0), "LogAppendTime", Value::Int(0)),
        (TimestampType::NoTimestampType, None, "NoTimestampType", Value::Null),
    ] {
        let m = KafkaMessage { timestamp_type: tt, leader_epoch: epoch, ..base };
        let row = d.decode(&m).expect("decodes").expect("row");
        assert_eq!(row.values, vec![Value::Int(5), Value::from(want_tt), want_epoch]);
    }
    let rec = enc
        .encode(&Row::new(vec![Value::Int(5), Value::from("CreateTime"), Value::Int(3)]))
        .expect("encodes");
    assert_eq!(rec.value.as_deref(), Some(&b"{\"id\":5}"[..]));
    assert_eq!((rec.timestamp, rec.headers.len()), (None, 0));

    let wide = [
        ColumnDef::new("line", DataType::String),
        ColumnDef::metadata("epoch", DataType::BigInt, MetadataKey::LeaderEpoch),
    ];
    let (_, mut d, _) = setup(&wide, &[("format", "raw")]);
    let m = KafkaMessage { leader_epoch: Some(i32::MAX), ..base };
    let row = d.decode(&m).expect("decodes").expect("row");
    assert_eq!(row.values, vec![Value::from("{\"id\": 5}"), Value::Int(i64::from(i32::MAX))]);
}

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn column(name: &str, type_name: &str) -> Result<ColumnDef, String> {
    Ok(ColumnDef::new(name, type_name.parse::<DataType>()?))
}

fn try_setup(
    columns: &[ColumnDef],
    pairs: &[(&str, &str)],
) -> Result<(RecordDecoder, RecordEncoder), KeelError> {
    let schema = Schema::from_columns("sources[0].columns", columns)?;
    let format = RecordFormat::from_options("sources[0]", &opts(pairs), &schema)?;
    Ok((RecordDecoder::new(&schema, &format), RecordEncoder::new(&schema, &format)))
}

/// The columns of seed 002's Example 5, as its DDL declares them.
fn example_5() -> Result<Vec<ColumnDef>, String> {
    Ok(vec![
        column("id", "VARCHAR")?,
        column("name", "VARCHAR")?,
        column("properties", "ROW<`owner` STRING, engine STRING>")?,
    ])
}

/// Seed 002's Example 5 message decodes into a ROW column whose Arrow form is a struct of the
/// declared fields; the JSON number given for the VARCHAR `id` is read as its text, as for any
/// STRING column; and the row encodes back to the same object.
#[test]
fn seed_example_5_nested_json_reads_into_a_row_column_and_back() -> TestResult {
    let (mut dec, enc) = try_setup(&example_5()?, &[("format", "json")])?;
    let message =
        r#"{"id": 101, "name": "VVP", "properties": {"owner": "Alibaba Cloud", "engine": "Flink"}}"#;
    let mut builder = dec.builder(4);
    assert!(dec.decode_into(&msg(None, Some(message.as_bytes())), &mut builder)?);
    let batch = builder.finish();
    let props = batch.column(2).as_any().downcast_ref::<arrow_array::StructArray>().ok_or("a struct")?;
    let names: Vec<&str> = props.fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(names, ["owner", "engine"]);
    let owner = props.column(0).as_any().downcast_ref::<arrow_array::StringArray>().ok_or("utf8")?;
    assert_eq!(owner.value(0), "Alibaba Cloud");
    let row = row_of(&batch, 0);
    assert_eq!(
        row,
        Row::new(vec![
            Value::from("101"),
            Value::from("VVP"),
            Value::Row(vec![Value::from("Alibaba Cloud"), Value::from("Flink")]),
        ])
    );
    let rec = enc.encode(&row)?;
    assert_eq!(
        rec.value.as_deref(),
        Some(&br#"{"id":"101","name":"VVP","properties":{"owner":"Alibaba Cloud","engine":"Flink"}}"#[..])
    );
    Ok(())
}

/// ROW values survive a JSON round trip: nested rows, a null row, null fields, a null nested
/// row, and every scalar type inside a row.
#[test]
fn json_rows_round_trip_with_nulls_and_nesting() -> TestResult {
    let columns = vec![
        column("id", "INT")?,
        column(
            "p",
            "ROW<a STRING, b ROW<c INT, d DECIMAL(5, 2), m MAP<STRING, BYTES>>, t TIMESTAMP, y BYTES>",
        )?,
        column("q", "ROW(`x y` DATE, z DOUBLE)")?,
    ];
    let inner = |c: Value, d: Value, m: Value| Value::Row(vec![c, d, m]);
    let rows = vec![
        Row::new(vec![
            Value::Int(1),
            Value::Row(vec![
                Value::from("with \"quotes\", and ünïcödé"),
                inner(
                    Value::Int(-7),
                    Value::Decimal { unscaled: 12_345, scale: 2 },
                    Value::Map(vec![("k".into(), Some(b"v".to_vec()))]),
                ),
                Value::Timestamp(1_609_331_594_123),
                Value::Bytes(vec![0, 255]),
            ]),
            Value::Row(vec![Value::Date(19_844), Value::Double(0.5)]),
        ]),
        Row::new(vec![Value::Int(2), Value::Null, Value::Row(vec![Value::Null, Value::Null])]),
        Row::new(vec![
            Value::Null,
            Value::Row(vec![Value::Null, Value::Null, Value::Null, Value::Null]),
            Value::Null,
        ]),
        Row::new(vec![
            Value::Int(3),
            Value::Row(vec![
                Value::from(""),
                inner(Value::Null, Value::Null, Value::Null),
                Value::Null,
                Value::Null,
            ]),
            Value::Null,
        ]),
    ];
    round_trip(&[("format", "json")], &columns, &rows);
    round_trip(&[("format", "json"), ("json.encode.ignore-null-fields", "true")], &columns, &rows);
    let (_, enc) = try_setup(&columns, &[("format", "json"), ("json.encode.ignore-null-fields", "true")])?;
    let rec = enc.encode(&rows[3])?;
    assert_eq!(rec.value.as_deref(), Some(&br#"{"id":3,"p":{"a":"","b":{}}}"#[..]));
    let (_, enc) = try_setup(&columns, &[("format", "json")])?;
    let rec = enc.encode(&rows[1])?;
    assert_eq!(rec.value.as_deref(), Some(&br#"{"id":2,"p":null,"q":{"x y":null,"z":null}}"#[..]));
    Ok(())
}

/// Inside a row, as at the top level: an undeclared field is skipped, a missing one is null,
/// and with `json.fail-on-missing-field` a missing one fails the record naming its path.
#[test]
fn a_missing_field_inside_a_row_is_null_unless_fail_on_missing_field() -> TestResult {
    let columns = vec![column("id", "INT")?, column("p", "ROW<a STRING, b ROW<c INT, d INT>>")?];
    let (mut dec, _) = try_setup(&columns, &[("format", "json")])?;
    let doc = r#"{"p": {"zz": [1, {"a": 2}], "a": "x", "b": {"d": 4}}, "id": 1}"#;
    let row = decode_value(&mut dec, doc)?.ok_or("skipped")?;
    assert_eq!(
        row.values,
        vec![Value::Int(1), Value::Row(vec![Value::from("x"), Value::Row(vec![Value::Null, Value::Int(4)])])]
    );
    let row = decode_value(&mut dec, r#"{"id": 1, "p": {}}"#)?.ok_or("skipped")?;
    assert_eq!(row.get(1), &Value::Row(vec![Value::Null, Value::Null]));
    let (mut strict, _) = try_setup(&columns, &[("format", "json"), ("json.fail-on-missing-field", "true")])?;
    let err = decode_value(&mut strict, doc).expect_err("c is missing");
    assert_eq!(err.reason, "field 'p.b.c' is missing (json.fail-on-missing-field is true)");
    // A null row has no fields to miss.
    let row = decode_value(&mut strict, r#"{"id": 1, "p": null}"#)?.ok_or("skipped")?;
    assert_eq!(row.get(1), &Value::Null);
    Ok(())
}

/// A field of the wrong JSON type inside a row is a malformed record that names the topic,
/// partition, offset and the field's path; a row given as anything but an object names the
/// column; and the failed message leaves no partial row in the batch.
#[test]
fn a_wrong_typed_field_inside_a_row_names_the_record_and_the_field_path() -> TestResult {
    let columns =
        vec![column("id", "INT")?, column("properties", "ROW<owner STRING, n INT, deep ROW<at DATE>>")?];
    let (mut dec, _) = try_setup(&columns, &[("format", "json")])?;
    let err = decode_value(&mut dec, r#"{"id": 1, "properties": {"owner": "x", "n": "abc"}}"#)
        .expect_err("n is no INT");
    assert_eq!(
        err.to_string(),
        "malformed record at topic 'people' partition 3 offset 1042: value (json): field 'properties.n': \
         expected INT, found \"abc\""
    );
    for (doc, reason) in [
        (
            r#"{"properties": {"deep": {"at": 5}}}"#,
            "field 'properties.deep.at': expected DATE like \"2024-05-01\", found 5",
        ),
        (
            r#"{"properties": 5}"#,
            "field 'properties': expected ROW<owner STRING, n INT, deep ROW<at DATE>>, found 5",
        ),
        (
            r#"{"properties": [1]}"#,
            "field 'properties': expected ROW<owner STRING, n INT, deep ROW<at DATE>>, found an array",
        ),
        (r#"{"properties": {"deep": "x"}}"#, "field 'properties.deep': expected ROW<at DATE>, found \"x\""),
    ] {
        assert_eq!(decode_value(&mut dec, doc).expect_err(doc).reason, reason);
    }
    let mut builder = dec.builder(4);
    let good = br#"{"id": 7, "properties": {"owner": "o", "n": 1, "deep": {"at": "2024-05-01"}}}"#;
    let bad = br#"{"id": 8, "properties": {"owner": "o", "n": 2, "deep": {"at": "never"}}}"#;
    assert!(dec.decode_into(&msg(None, Some(bad)), &mut builder).is_err());
    assert!(dec.decode_into(&msg(None, Some(good)), &mut builder)?);
    let batch = builder.finish();
    assert_eq!(batch.num_rows(), 1);
    assert_eq!(
        row_of(&batch, 0).get(1),
        &Value::Row(vec![Value::from("o"), Value::Int(1), Value::Row(vec![Value::Date(19_844)])])
    );
    let (mut skip, _) = try_setup(&columns, &[("format", "json"), ("json.ignore-parse-errors", "true")])?;
    assert_eq!(skip.decode(&msg(None, Some(bad)))?, None);
    assert_eq!(skip.skipped_malformed(), 1);
    Ok(())
}

/// csv and raw payloads refuse a ROW column when the format is checked, naming the column's
/// type field; json takes it, in the value and in the key.
#[test]
fn csv_and_raw_refuse_row_columns_naming_the_column() -> TestResult {
    let columns = vec![column("id", "INT")?, column("name", "STRING")?, column("props", "ROW<a INT>")?];
    for pairs in
        [vec![("format", "csv")], vec![("format", "json"), ("key.format", "csv"), ("key.fields", "props")]]
    {
        let Err(KeelError::InvalidSpec { field, reason }) = try_setup(&columns, &pairs) else {
            return Err(format!("{pairs:?} was accepted").into());
        };
        assert_eq!(field, "sources[0].columns[2].type", "{pairs:?}");
        assert!(
            reason.starts_with("ROW columns need the json format; column 'props' is ROW<a INT>"),
            "{reason}"
        );
    }
    let Err(KeelError::InvalidSpec { field, reason }) =
        try_setup(&[column("props", "ROW<a INT>")?], &[("format", "raw")])
    else {
        return Err("raw took a ROW".into());
    };
    assert_eq!(field, "sources[0].columns[0].type");
    assert!(reason.contains("format is raw"), "{reason}");
    try_setup(&columns, &[("format", "json"), ("key.format", "json"), ("key.fields", "props")])?;
    Ok(())
}

/// A print or file sink's CSV line carries a ROW column as its JSON object, quoted as one field.
#[test]
fn print_lines_write_a_row_as_its_json_object() -> TestResult {
    let columns = vec![column("id", "INT")?, column("p", "ROW<a STRING, b ROW<c INT>>")?];
    let schema = Schema::from_columns("c", &columns)?;
    let enc = RecordEncoder::new(&schema, &RecordFormat::text_lines("sinks[0]", &schema)?);
    let row =
        Row::new(vec![Value::Int(1), Value::Row(vec![Value::from("x"), Value::Row(vec![Value::Null])])]);
    let rec = enc.encode(&row)?;
    assert_eq!(rec.value.as_deref(), Some(&br#"1,"{""a"":""x"",""b"":{""c"":null}}""#[..]));
    let rec = enc.encode(&Row::new(vec![Value::Int(2), Value::Null]))?;
    assert_eq!(rec.value.as_deref(), Some(&b"2,"[..]));
    Ok(())
}

/// Hostile JSON for ROW columns never panics and never leaves a partial row: objects where
/// rows are declared and the reverse, repeated and escaped keys, deep nesting, random bytes.
/// A key given twice takes its last value, inside a row too; escaped keys match their field.
#[test]
fn rows_decode_hostile_json_without_panicking() -> TestResult {
    let columns = vec![column("a", "ROW<b ROW<c INT, d STRING>, e BOOLEAN>")?, column("f", "STRING")?];
    let (mut dec, _) = try_setup(&columns, &[("format", "json"), ("json.ignore-parse-errors", "true")])?;
    let row = decode_value(&mut dec, r#"{"a": {"b": {"c": 1}, "b": {"d": "x"}}, "\u0061": {"e": true}}"#)?;
    assert_eq!(row.ok_or("skipped")?.get(0), &Value::Row(vec![Value::Null, Value::Bool(true)]));
    let row = decode_value(&mut dec, r#"{"a": {"\u0062": {"c": 2, "c": 3}}}"#)?.ok_or("skipped")?;
    assert_eq!(row.get(0), &Value::Row(vec![Value::Row(vec![Value::Int(3), Value::Null]), Value::Null]));
    let deep = format!("{{\"a\": {{\"x\": {}1{}}}}}", "[".repeat(200), "]".repeat(200));
    let mut builder = dec.builder(8);
    for doc in [
        deep.as_str(),
        r#"{"a": {"b": [1, {"c": 1}]}}"#,
        r#"{"a": {"b": {"c": {"c": 1}}}}"#,
        r#"{"a": {"b": {"c": 1, "d": 2}}, "f": {"a": {}}}"#,
        r#"{"a": {"b": {"c": 1}, "e": "maybe"}}"#,
        r#"{"a": {"b": {"c": 1}}"#,
        r#"{"a": "#,
        r#"{"a": {"b": null, "e": null}, "a": 7}"#,
    ] {
        let _ = dec.decode_into(&msg(None, Some(doc.as_bytes())), &mut builder);
    }
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let alphabet = b"{}[]:,\"abcdef0123 nulltrue\\u";
    for _ in 0..5000 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let len = (seed % 48) as usize;
        let mut bytes: Vec<u8> = b"{\"a\":".to_vec();
        bytes.extend((0..len).map(|i| alphabet[((seed >> (i % 50)) as usize + i * 7) % alphabet.len()]));
        let _ = dec.decode_into(&msg(None, Some(&bytes)), &mut builder);
    }
    // Whatever was appended is whole rows: every struct level has the batch's length.
    let batch = builder.finish();
    let a = batch.column(0).as_any().downcast_ref::<arrow_array::StructArray>().ok_or("struct")?;
    let b = a.column(0).as_any().downcast_ref::<arrow_array::StructArray>().ok_or("struct")?;
    assert!(
        a.len() == batch.num_rows() && b.len() == batch.num_rows() && b.column(1).len() == batch.num_rows()
    );
    assert_eq!(dec.skipped_malformed() + batch.num_rows() as u64, 5000 + 8);
    assert!(batch.num_rows() >= 1 && dec.skipped_malformed() >= 5);
    Ok(())
}
