//! Avro values of Kafka records, as Spark's `from_avro` reads them: each
//! value is one datum of the writer's schema (given inline in the spec) in
//! Avro's binary encoding, with no container header and no schema
//! registry's prefix. A datum becomes the JSON object the source's JSON
//! decoding already turns into the declared columns, so both formats share
//! one set of type rules.

use apache_avro::Schema;
use apache_avro::types::Value;
use chrono::{DateTime, NaiveDate};
use serde_json::{Map, Value as Json};

/// Parses the writer's schema; it must be a record.
pub fn parse_schema(text: &str) -> Result<Schema, String> {
    let schema = Schema::parse_str(text).map_err(|e| format!("is not an Avro schema: {e}"))?;
    match schema {
        Schema::Record(_) => Ok(schema),
        _ => Err("is not an Avro record schema: the value of a record must be a record".into()),
    }
}

/// One value, decoded with `schema`, as a JSON object (text).
pub fn to_json(schema: &Schema, mut bytes: &[u8]) -> Result<Vec<u8>, String> {
    let value = apache_avro::from_avro_datum(schema, &mut bytes, None)
        .map_err(|e| format!("is not an Avro datum of the schema: {e}"))?;
    if !bytes.is_empty() {
        return Err(format!(
            "holds {} bytes after its Avro datum: written with another schema, or with a schema registry's prefix",
            bytes.len()
        ));
    }
    let json = json_of(value)?;
    serde_json::to_vec(&json).map_err(|e| e.to_string())
}

fn json_of(value: Value) -> Result<Json, String> {
    let micros_text = |micros: i64| {
        DateTime::from_timestamp_micros(micros)
            .map(|t| Json::String(t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)))
            .ok_or_else(|| format!("timestamp {micros} µs is out of range"))
    };
    Ok(match value {
        Value::Null => Json::Null,
        Value::Boolean(b) => Json::Bool(b),
        Value::Int(i) | Value::TimeMillis(i) => Json::from(i),
        Value::Long(i) | Value::TimeMicros(i) => Json::from(i),
        Value::Float(f) => number(f as f64)?,
        Value::Double(f) => number(f)?,
        Value::String(s) | Value::Enum(_, s) => Json::String(s),
        Value::Uuid(u) => Json::String(u.to_string()),
        Value::Bytes(b) | Value::Fixed(_, b) => {
            Json::String(String::from_utf8_lossy(&b).into_owned())
        }
        Value::Union(_, inner) => json_of(*inner)?,
        Value::Array(items) => {
            Json::Array(items.into_iter().map(json_of).collect::<Result<_, _>>()?)
        }
        Value::Map(entries) => Json::Object(
            entries
                .into_iter()
                .map(|(k, v)| Ok((k, json_of(v)?)))
                .collect::<Result<Map<_, _>, String>>()?,
        ),
        Value::Record(fields) => Json::Object(
            fields
                .into_iter()
                .map(|(k, v)| Ok((k, json_of(v)?)))
                .collect::<Result<Map<_, _>, String>>()?,
        ),
        Value::Date(days) => {
            let date = NaiveDate::from_num_days_from_ce_opt(days + 719_163)
                .ok_or_else(|| format!("date {days} days from 1970-01-01 is out of range"))?;
            Json::String(date.to_string())
        }
        Value::TimestampMillis(ms) | Value::LocalTimestampMillis(ms) => micros_text(ms * 1000)?,
        Value::TimestampMicros(us) | Value::LocalTimestampMicros(us) => micros_text(us)?,
        Value::TimestampNanos(ns) | Value::LocalTimestampNanos(ns) => micros_text(ns / 1000)?,
        Value::Decimal(_) | Value::BigDecimal(_) | Value::Duration(_) => {
            return Err(format!(
                "holds an Avro {} value: decimal and duration are not implemented in this version of the engine yet",
                match value {
                    Value::Duration(_) => "duration",
                    _ => "decimal",
                }
            ));
        }
    })
}

/// A float as JSON; NaN and infinities have no JSON form.
fn number(f: f64) -> Result<Json, String> {
    serde_json::Number::from_f64(f)
        .map(Json::Number)
        .ok_or_else(|| format!("holds the float {f}, which the source cannot take yet"))
}

#[cfg(test)]
mod tests {
    use apache_avro::to_avro_datum;

    use super::*;

    const SCHEMA: &str = r#"{"type": "record", "name": "Transaction", "fields": [
        {"name": "user_id", "type": "string"},
        {"name": "amount", "type": "double"},
        {"name": "note", "type": ["null", "string"], "default": null},
        {"name": "event_time", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "day", "type": {"type": "int", "logicalType": "date"}}
    ]}"#;

    fn datum(note: Option<&str>) -> Vec<u8> {
        let schema = parse_schema(SCHEMA).unwrap();
        let value = Value::Record(vec![
            ("user_id".into(), Value::String("u1".into())),
            ("amount".into(), Value::Double(12.5)),
            (
                "note".into(),
                match note {
                    Some(n) => Value::Union(1, Box::new(Value::String(n.into()))),
                    None => Value::Union(0, Box::new(Value::Null)),
                },
            ),
            (
                "event_time".into(),
                Value::TimestampMillis(1_767_225_600_123),
            ),
            ("day".into(), Value::Date(20_454)),
        ]);
        to_avro_datum(&schema, value).unwrap()
    }

    #[test]
    fn a_datum_becomes_a_json_object_with_times_as_rfc3339() {
        let schema = parse_schema(SCHEMA).unwrap();
        let json: Json =
            serde_json::from_slice(&to_json(&schema, &datum(Some("hi"))).unwrap()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "user_id": "u1", "amount": 12.5, "note": "hi",
                "event_time": "2026-01-01T00:00:00.123000Z", "day": "2026-01-01",
            })
        );
        let json: Json = serde_json::from_slice(&to_json(&schema, &datum(None)).unwrap()).unwrap();
        assert_eq!(json["note"], Json::Null);
    }

    #[test]
    fn bytes_of_another_schema_are_refused_with_the_reason() {
        let schema = parse_schema(SCHEMA).unwrap();
        let mut prefixed = vec![0, 0, 0, 0, 7];
        prefixed.extend(datum(None));
        assert!(to_json(&schema, &prefixed).is_err());
        let mut longer = datum(None);
        longer.extend_from_slice(b"xyz");
        let error = to_json(&schema, &longer).unwrap_err();
        assert!(error.contains("3 bytes after"), "{error}");
        assert!(to_json(&schema, b"{\"user_id\": 1}").is_err());
        assert!(
            parse_schema(r#"{"type": "string"}"#)
                .unwrap_err()
                .contains("record")
        );
        assert!(
            parse_schema("{")
                .unwrap_err()
                .starts_with("is not an Avro schema")
        );
    }
}
