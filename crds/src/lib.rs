//! The `StreamingQuery` API shared by the Sluice engine and operator: the spec
//! and status types (which generate the CRD), the `/progress` wire format,
//! durations, loading a spec from YAML, and the one `validate()`.

pub mod duration;
pub mod progress;
pub mod spec;
pub mod status;
pub mod structural;
pub mod validate;

use std::path::{Path, PathBuf};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};
use kube::CustomResourceExt;

pub use spec::*;
pub use status::*;
pub use validate::{Problem, Problems, validate, validate_spec};

/// The errors of loading a `StreamingQuery`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The text is not YAML, or not a StreamingQuery's shape.
    #[error("{origin}: {message}")]
    Parse {
        /// The file, or where the text came from.
        origin: String,
        /// What is wrong, with the field path or line.
        message: String,
    },
    /// The spec has problems: structural ones (unknown fields, wrong types)
    /// or, once it parsed, the ones `validate()` finds.
    #[error("{origin} is not a valid StreamingQuery:\n{problems}")]
    Invalid {
        /// The file, or where the text came from.
        origin: String,
        /// Every problem found.
        problems: Problems,
    },
}

/// The `Result` of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The API version and kind a manifest must declare.
pub const API_VERSION: &str = "sluice.dev/v1alpha1";
/// The kind a manifest must declare.
pub const KIND: &str = "StreamingQuery";

/// Parses a `StreamingQuery` manifest, checking its structure against the
/// CRD's schema (every unknown field, wrong type or unsupported value is an
/// [`Error::Invalid`] problem) but not its values (`validate()`).
/// `origin` names the text's source in errors (a file path).
pub fn parse(text: &str, origin: &str) -> Result<StreamingQuery> {
    let value: serde_yaml::Value = serde_yaml::from_str(text).map_err(|err| Error::Parse {
        origin: origin.to_owned(),
        message: format!("is not valid YAML: {err}"),
    })?;
    let header = |field: &str| value.get(field).and_then(|v| v.as_str()).map(str::to_owned);
    match (header("apiVersion"), header("kind")) {
        (Some(api), Some(kind)) if api == API_VERSION && kind == KIND => {}
        (api, kind) => {
            return Err(Error::Parse {
                origin: origin.to_owned(),
                message: format!(
                    "is a {} of {}: expected apiVersion: {API_VERSION} and kind: {KIND}",
                    kind.as_deref().unwrap_or("manifest without kind"),
                    api.as_deref().unwrap_or("no apiVersion"),
                ),
            });
        }
    }
    // Every structural mistake at once, as the API server reports them;
    // serde would stop at the first. (A document JSON cannot hold, such as
    // a map with a non-string key, is left to serde's message.)
    if let Ok(document) = serde_json::to_value(&value) {
        let problems = structural::check(&document);
        if !problems.is_empty() {
            return Err(Error::Invalid {
                origin: origin.to_owned(),
                problems,
            });
        }
    }
    serde_path_to_error::deserialize(value).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner().to_string();
        Error::Parse {
            origin: origin.to_owned(),
            message: if path == "." {
                inner
            } else {
                format!("{path}: {inner}")
            },
        }
    })
}

/// Parses and validates a `StreamingQuery` manifest.
pub fn load(text: &str, origin: &str) -> Result<StreamingQuery> {
    let query = parse(text, origin)?;
    validate(&query).map_err(|problems| Error::Invalid {
        origin: origin.to_owned(),
        problems,
    })?;
    Ok(query)
}

/// Reads, parses and validates a `StreamingQuery` manifest file.
pub fn load_file(path: &Path) -> Result<StreamingQuery> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })?;
    load(&text, &path.display().to_string())
}

/// The formats the API server knows (apiextensions' `supportedFormats`);
/// it warns "unrecognized format" about any other on every apply.
const KNOWN_FORMATS: &[&str] = &[
    "bsonobjectid",
    "uri",
    "email",
    "hostname",
    "ipv4",
    "ipv6",
    "cidr",
    "mac",
    "uuid",
    "uuid3",
    "uuid4",
    "uuid5",
    "isbn",
    "isbn10",
    "isbn13",
    "creditcard",
    "ssn",
    "hexcolor",
    "rgbcolor",
    "byte",
    "password",
    "date",
    "duration",
    "datetime",
    "date-time",
    "int32",
    "int64",
    "float",
    "double",
];

/// The CustomResourceDefinition of `StreamingQuery` as it is installed: the
/// one the types derive, without the formats schemars writes that the API
/// server does not know (`uint32`, `uint64`: their ranges are `minimum` and
/// `maximum` already).
pub fn crd() -> CustomResourceDefinition {
    fn strip(schema: &mut JSONSchemaProps) {
        if schema
            .format
            .as_deref()
            .is_some_and(|f| !KNOWN_FORMATS.contains(&f))
        {
            schema.format = None;
        }
        for property in schema.properties.iter_mut().flat_map(|p| p.values_mut()) {
            strip(property);
        }
        if let Some(JSONSchemaPropsOrArray::Schema(items)) = schema.items.as_mut() {
            strip(items);
        }
        if let Some(JSONSchemaPropsOrBool::Schema(values)) = schema.additional_properties.as_mut() {
            strip(values);
        }
    }
    let mut crd = StreamingQuery::crd();
    for version in &mut crd.spec.versions {
        if let Some(schema) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        {
            strip(schema);
        }
    }
    crd
}

/// The CustomResourceDefinition of `StreamingQuery`, as YAML.
pub fn crd_yaml() -> String {
    let crd = crd();
    let yaml = serde_yaml::to_string(&crd).expect("a CRD always serializes");
    format!("# Generated by `sluice crd` from the sluice-crds types. Do not edit.\n{yaml}")
}

/// The CRD as the Helm chart's template (`charts/sluice/templates/crd.yaml`):
/// installed when `crds.enabled`, and kept on `helm uninstall` so that
/// uninstalling the chart does not delete every query with it.
pub fn crd_chart_template() -> String {
    let mut crd = crd();
    crd.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert("helm.sh/resource-policy".to_owned(), "keep".to_owned());
    let yaml = serde_yaml::to_string(&crd).expect("a CRD always serializes");
    format!(
        "{{{{- if .Values.crds.enabled }}}}\n# Generated by `cargo test -p sluice-crds` (SLUICE_BLESS=1) from the sluice-crds types. Do not edit.\n{yaml}{{{{- end }}}}\n"
    )
}

#[cfg(test)]
mod tests;
