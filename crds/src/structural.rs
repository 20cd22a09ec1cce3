//! Structural validation of a manifest against the CRD's own OpenAPI schema,
//! as the API server checks a request before anything else: every unknown
//! field, value of the wrong type, unsupported enum value, missing required
//! field and number out of range, each with its field path, in one pass.
//! It runs before serde reads the manifest, because serde stops at the first
//! mistake; a user who fixes one should not meet the next on the next run.
//!
//! The schema is the one `StreamingQuery::crd()` generates from the spec
//! types, so it cannot drift from what serde reads. CEL rules
//! (`x-kubernetes-validations`) are not evaluated here: `validate()` checks
//! the same rules with messages that say what to write instead.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};
use kube::CustomResourceExt;
use serde_json::Value;

use crate::spec::StreamingQuery;
use crate::validate::Problems;

/// The CRD's schema of a whole `StreamingQuery` document.
static SCHEMA: LazyLock<JSONSchemaProps> = LazyLock::new(|| {
    let mut schema = StreamingQuery::crd()
        .spec
        .versions
        .into_iter()
        .find(|v| v.storage)
        .and_then(|v| v.schema)
        .and_then(|s| s.open_api_v3_schema)
        .expect("the generated CRD has a schema");
    // NB: the API server supplies the schema of these three for every kind
    // (`parse()` checks apiVersion and kind; metadata is ObjectMeta's).
    let properties = schema.properties.get_or_insert_with(BTreeMap::new);
    for (field, type_) in [
        ("apiVersion", "string"),
        ("kind", "string"),
        ("metadata", "object"),
    ] {
        properties.insert(
            field.to_owned(),
            JSONSchemaProps {
                type_: Some(type_.to_owned()),
                ..JSONSchemaProps::default()
            },
        );
    }
    schema
});

/// Every structural mistake of `document` (a `StreamingQuery` manifest as
/// JSON), each with its path (`spec.sources[0].generator.seed`).
pub fn check(document: &Value) -> Problems {
    let mut problems = Problems::default();
    walk(document, &SCHEMA, "", &mut problems);
    problems
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_owned()
    } else {
        format!("{path}.{field}")
    }
}

fn walk(value: &Value, schema: &JSONSchemaProps, path: &str, problems: &mut Problems) {
    if value.is_null() {
        if schema.nullable != Some(true) {
            problems.push(path, format!("is null: {}", expected(schema)));
        }
        return;
    }
    if schema.x_kubernetes_int_or_string == Some(true) {
        if !(value.is_string() || is_integer(value)) {
            problems.push(
                path,
                format!(
                    "{}: write an integer or a string (e.g. \"20Gi\" or \"500m\")",
                    describe(value)
                ),
            );
        }
        return;
    }
    match schema.type_.as_deref() {
        Some("object") => object(value, schema, path, problems),
        Some("array") => array(value, schema, path, problems),
        Some("string") => match value.as_str() {
            Some(text) => check_enum(value, text, schema, path, problems),
            None => problems.push(path, format!("{}: {}", describe(value), expected(schema))),
        },
        Some("integer") => {
            if is_integer(value) {
                check_range(value, schema, path, problems);
            } else {
                problems.push(path, format!("{}: {}", describe(value), expected(schema)));
            }
        }
        Some("number") => {
            if value.is_number() {
                check_range(value, schema, path, problems);
            } else {
                problems.push(path, format!("{}: {}", describe(value), expected(schema)));
            }
        }
        Some("boolean") if !value.is_boolean() => {
            problems.push(path, format!("{}: {}", describe(value), expected(schema)));
        }
        // No type (or `x-kubernetes-preserve-unknown-fields`): anything goes.
        _ => {}
    }
}

fn object(value: &Value, schema: &JSONSchemaProps, path: &str, problems: &mut Problems) {
    let Some(fields) = value.as_object() else {
        problems.push(path, format!("{}: {}", describe(value), expected(schema)));
        return;
    };
    for required in schema.required.iter().flatten() {
        if !fields.contains_key(required) {
            problems.push(join(path, required), "is required");
        }
    }
    let known = schema.properties.as_ref();
    for (name, field) in fields {
        let field_path = join(path, name);
        if let Some(property) = known.and_then(|p| p.get(name)) {
            walk(field, property, &field_path, problems);
            continue;
        }
        match &schema.additional_properties {
            Some(JSONSchemaPropsOrBool::Schema(items)) => {
                walk(field, items, &field_path, problems);
            }
            Some(JSONSchemaPropsOrBool::Bool(true)) => {}
            _ if schema.x_kubernetes_preserve_unknown_fields == Some(true) => {}
            // An object without declared fields (`metadata`) takes any.
            _ if known.is_none() => {}
            _ => problems.push(field_path, unknown_field(name, known)),
        }
    }
}

fn array(value: &Value, schema: &JSONSchemaProps, path: &str, problems: &mut Problems) {
    let Some(items) = value.as_array() else {
        problems.push(path, format!("{}: {}", describe(value), expected(schema)));
        return;
    };
    if let Some(min) = schema.min_items
        && (items.len() as i64) < min
    {
        problems.push(
            path,
            format!("has {} items: write at least {min}", items.len()),
        );
    }
    if let Some(max) = schema.max_items
        && (items.len() as i64) > max
    {
        problems.push(
            path,
            format!("has {} items: write at most {max}", items.len()),
        );
    }
    if let Some(JSONSchemaPropsOrArray::Schema(item)) = &schema.items {
        for (i, element) in items.iter().enumerate() {
            walk(element, item, &format!("{path}[{i}]"), problems);
        }
    }
}

fn check_enum(
    value: &Value,
    text: &str,
    schema: &JSONSchemaProps,
    path: &str,
    problems: &mut Problems,
) {
    let Some(allowed) = &schema.enum_ else {
        return;
    };
    if allowed.iter().any(|a| a.0 == *value) {
        return;
    }
    let names: Vec<String> = allowed
        .iter()
        .filter_map(|a| a.0.as_str().map(|s| format!("{s:?}")))
        .collect();
    let hint = closest(text, allowed.iter().filter_map(|a| a.0.as_str()))
        .map(|s| format!(" (did you mean {s:?}?)"))
        .unwrap_or_default();
    problems.push(
        path,
        format!(
            "{text:?} is not a supported value{hint}: use {}",
            or_list(&names)
        ),
    );
}

fn check_range(value: &Value, schema: &JSONSchemaProps, path: &str, problems: &mut Problems) {
    let Some(number) = value.as_f64() else {
        return;
    };
    let (format_min, format_max) = match schema.format.as_deref() {
        Some("int32") => (Some(f64::from(i32::MIN)), Some(f64::from(i32::MAX))),
        Some("uint32") => (Some(0.0), Some(f64::from(u32::MAX))),
        Some("uint64") => (Some(0.0), None),
        _ => (None, None),
    };
    let min = schema.minimum.or(format_min);
    let max = match (schema.maximum, format_max) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    if let Some(min) = min
        && number < min
    {
        problems.push(path, format!("{value} is too small: use at least {min}"));
    } else if let Some(max) = max
        && number > max
    {
        problems.push(path, format!("{value} is too large: use at most {max}"));
    }
}

fn is_integer(value: &Value) -> bool {
    value.is_i64() || value.is_u64()
}

/// What a value is, in words: `"fast" is a string`, `is a list`.
fn describe(value: &Value) -> String {
    match value {
        Value::Null => "is null".to_owned(),
        Value::Bool(b) => format!("{b} is a boolean"),
        Value::Number(n) if is_integer(value) => format!("{n} is an integer"),
        Value::Number(n) => format!("{n} is a number"),
        Value::String(s) => format!("{s:?} is a string"),
        Value::Array(_) => "is a list".to_owned(),
        Value::Object(_) => "is an object".to_owned(),
    }
}

/// What the schema wants, as an instruction: `write an integer`.
fn expected(schema: &JSONSchemaProps) -> String {
    if schema.x_kubernetes_int_or_string == Some(true) {
        return "write an integer or a string".to_owned();
    }
    match schema.type_.as_deref() {
        Some("object") => "write an object (field: value)".to_owned(),
        Some("array") => "write a list".to_owned(),
        Some("string") => match &schema.enum_ {
            Some(allowed) => format!(
                "write one of {}",
                or_list(
                    &allowed
                        .iter()
                        .filter_map(|a| a.0.as_str().map(|s| format!("{s:?}")))
                        .collect::<Vec<_>>()
                )
            ),
            None => "write a string".to_owned(),
        },
        Some("integer") => "write an integer".to_owned(),
        Some("number") => "write a number".to_owned(),
        Some("boolean") => "write true or false".to_owned(),
        _ => "write a value".to_owned(),
    }
}

fn unknown_field(name: &str, known: Option<&BTreeMap<String, JSONSchemaProps>>) -> String {
    let names: Vec<&str> = known
        .map(|k| k.keys().map(String::as_str).collect())
        .unwrap_or_default();
    let hint = closest(name, names.iter().copied())
        .map(|s| format!(" (did you mean {s:?}?)"))
        .unwrap_or_default();
    format!(
        "is not a field here{hint}: the fields are {}",
        names.join(", ")
    )
}

fn or_list(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [rest @ .., last] => format!("{} or {last}", rest.join(", ")),
    }
}

/// The candidate closest to `word` (case-insensitive edit distance at most
/// 2, or a third of its length), if one is.
fn closest<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let word = word.to_ascii_lowercase();
    let limit = (word.chars().count() / 3).max(2);
    candidates
        .map(|c| (distance(&word, &c.to_ascii_lowercase()), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Levenshtein distance.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous + usize::from(ca != *cb);
            previous = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_and_suggestions() {
        assert_eq!(distance("sead", "seed"), 1);
        assert_eq!(distance("", "abc"), 3);
        assert_eq!(
            closest("sead", ["kind", "seed", "users"].into_iter()),
            Some("seed")
        );
        assert_eq!(closest("zzzzzz", ["kind", "seed"].into_iter()), None);
        assert_eq!(
            closest("rowspersecond", ["rowsPerSecond"].into_iter()),
            Some("rowsPerSecond")
        );
    }
}
