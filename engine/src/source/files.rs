//! The file source: a directory of JSON-lines, CSV or Parquet files with a
//! declared schema, on a local disk or an object store (`s3://...`). Files
//! are taken in order, by name (the default) or by modification time then
//! name, at most `maxFilesPerTrigger` and `maxBytesPerTrigger` a batch;
//! files added later are picked up by later batches. The offset is the last
//! file taken (its name, and its modification time when files are taken by
//! it), so each file is read once; the batch's exact file list goes to the
//! offset log too, so a batch replayed after a crash reads the same files,
//! whatever arrived since. With `availableNow` the files present at the
//! start are the query's input: files that arrive later are left for the
//! next run.
//!
//! NB: a file whose place in the order is before one already taken is
//! never read: name new files so that they sort last (a timestamp or a
//! sequence number), or take files by modification time. Hidden files
//! (`.name`) and files starting with `_` (such as `_SUCCESS`) are ignored.

use std::io::BufReader;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::compute::cast;
use datafusion::arrow::csv::ReaderBuilder as CsvReaderBuilder;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::arrow::json::ReaderBuilder as JsonReaderBuilder;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde_json::Value;
use sluice_crds::duration::{parse_bytes, parse_duration};
use sluice_crds::{ColumnType, FileOrder, FileSource as FileSpec, Format, Source as SourceSpec};

use super::{BadRecord, BatchRange, ReadMode, Source};
use crate::storage::Storage;
use crate::{Error, Result};

/// Rows per Arrow batch when decoding text formats.
const BATCH_ROWS: usize = 8192;

/// A directory of data files.
pub struct FileSource {
    name: String,
    storage: Storage,
    order: FileOrder,
    max_bytes: Option<u64>,
    max_file_age: Option<std::time::Duration>,
    format: Format,
    schema: SchemaRef,
    max_files: Option<u64>,
    /// Whether malformed records are set aside (`deadLetter`) or fail the read.
    dead_letter: bool,
    bad_records: Vec<BadRecord>,
    mode: ReadMode,
    /// With `availableNow`: the last file present when the run started
    /// (`Some(None)`: there was none), set by the first plan.
    limit: Option<Option<Key>>,
}

/// A file as listed.
#[derive(Clone, Debug)]
struct Listed {
    name: String,
    size: u64,
    modified_ms: i64,
}

/// A file's place in the order the source takes files in.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    /// With `order: modificationTime`; 0 otherwise.
    modified_ms: i64,
    name: String,
}

/// The Arrow type of a spec column type.
pub fn arrow_type(ty: ColumnType) -> DataType {
    match ty {
        ColumnType::String => DataType::Utf8,
        ColumnType::Int => DataType::Int32,
        ColumnType::Long => DataType::Int64,
        ColumnType::Double => DataType::Float64,
        ColumnType::Boolean => DataType::Boolean,
        ColumnType::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        ColumnType::Date => DataType::Date32,
    }
}

impl FileSource {
    /// Builds a file source from its (validated) spec; `path` is its field
    /// path, for errors.
    pub fn new(source: &SourceSpec, spec: &FileSpec, path: &str, mode: ReadMode) -> Result<Self> {
        let unsupported = |field: &str, message: String| Error::Unsupported {
            path: format!("{path}.{field}"),
            message,
        };
        let format = source.format.unwrap_or(Format::Json);
        if format == Format::Avro {
            return Err(unsupported(
                "format",
                "Avro files are not implemented in this version of the engine yet: use json, csv or parquet".into(),
            ));
        }
        let fields: Vec<Field> = source
            .schema
            .iter()
            .flatten()
            .map(|c| Field::new(&c.name, arrow_type(c.data_type), c.nullable.unwrap_or(true)))
            .collect();
        let max_bytes = spec
            .max_bytes_per_trigger
            .as_deref()
            .map(parse_bytes)
            .transpose()
            .map_err(|m| unsupported("files.maxBytesPerTrigger", m))?;
        let max_file_age = spec
            .max_file_age
            .as_deref()
            .map(parse_duration)
            .transpose()
            .map_err(|m| unsupported("files.maxFileAge", m))?;
        Ok(Self {
            name: source.name.clone(),
            storage: Storage::open(&spec.path, &format!("{path}.files.path"))?,
            order: spec.order.unwrap_or_default(),
            max_bytes,
            max_file_age,
            format,
            schema: Arc::new(Schema::new(fields)),
            max_files: spec.max_files_per_trigger,
            dead_letter: source.dead_letter.is_some(),
            bad_records: Vec::new(),
            mode,
            limit: None,
        })
    }

    /// The data files of the directory, in the source's order.
    async fn list(&self) -> Result<Vec<Listed>> {
        let objects = self
            .storage
            .list_dir()
            .await
            .map_err(|e| Error::Unavailable {
                what: self.storage.location().to_owned(),
                message: format!("cannot list the files of source {}: {e}", self.name),
            })?;
        let mut files: Vec<Listed> = objects
            .into_iter()
            .filter_map(|o| {
                let name = o.location.filename()?.to_owned();
                (!name.starts_with('.') && !name.starts_with('_')).then(|| Listed {
                    name,
                    size: o.size,
                    modified_ms: o.last_modified.timestamp_millis(),
                })
            })
            .collect();
        files.sort_by_key(|f| self.key(f));
        Ok(files)
    }

    fn key(&self, file: &Listed) -> Key {
        Key {
            modified_ms: match self.order {
                FileOrder::Name => 0,
                FileOrder::ModificationTime => file.modified_ms,
            },
            name: file.name.clone(),
        }
    }

    /// The offset after `key` (none: before every file).
    fn offset(&self, key: Option<&Key>) -> Value {
        match self.order {
            FileOrder::Name => serde_json::json!({ "lastFile": key.map(|k| &k.name) }),
            FileOrder::ModificationTime => serde_json::json!({
                "lastModified": key.map(|k| k.modified_ms),
                "lastFile": key.map(|k| &k.name),
            }),
        }
    }

    /// The key an offset stands at.
    fn key_of(&self, value: &Value) -> Result<Option<Key>> {
        let expected = match self.order {
            FileOrder::Name => r#"{"lastFile": <name or null>}"#,
            FileOrder::ModificationTime => {
                r#"{"lastModified": <Unix ms or null>, "lastFile": <name or null>}"#
            }
        };
        let bad = || Error::Offset {
            source_name: self.name.clone(),
            offset: value.to_string(),
            expected: expected.to_owned(),
        };
        let name = match value.get("lastFile") {
            Some(Value::Null) => None,
            Some(Value::String(n)) => Some(n.clone()),
            _ => return Err(bad()),
        };
        let modified_ms = match self.order {
            FileOrder::Name => 0,
            FileOrder::ModificationTime => match value.get("lastModified") {
                Some(Value::Null) | None if name.is_none() => 0,
                Some(v) => v.as_i64().ok_or_else(bad)?,
                None => return Err(bad()),
            },
        };
        Ok(match (name, modified_ms) {
            (None, 0) => None,
            (name, modified_ms) => Some(Key {
                modified_ms,
                name: name.unwrap_or_default(),
            }),
        })
    }
}

/// Decodes a file's bytes; the malformed records set aside when
/// `set_aside`, else the first is the error.
fn decode_file(
    format: Format,
    schema: &SchemaRef,
    bytes: bytes::Bytes,
    file_name: &str,
    set_aside: bool,
) -> std::result::Result<(Vec<RecordBatch>, Vec<BadRecord>), String> {
    match format {
        Format::Parquet => Ok((read_parquet(bytes, schema)?, Vec::new())),
        Format::Avro => Err("Avro is not implemented".into()),
        Format::Json => {
            let decode = |text: &[u8]| -> std::result::Result<Vec<RecordBatch>, String> {
                JsonReaderBuilder::new(schema.clone())
                    .with_batch_size(BATCH_ROWS)
                    .build(BufReader::new(text))
                    .map_err(|e| e.to_string())?
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(|e| e.to_string())
            };
            if let Some(batches) = decode_in_pieces(&bytes, &decode) {
                return Ok((batches, Vec::new()));
            }
            decode_lines(&bytes, None, file_name, set_aside, decode)
        }
        Format::Csv => {
            let decode = |text: &[u8]| -> std::result::Result<Vec<RecordBatch>, String> {
                CsvReaderBuilder::new(schema.clone())
                    .with_header(true)
                    .with_batch_size(BATCH_ROWS)
                    .build(text)
                    .map_err(|e| e.to_string())?
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(|e| e.to_string())
            };
            let header_len = bytes
                .iter()
                .position(|b| *b == b'\n')
                .map_or(bytes.len(), |i| i + 1);
            let (header, body) = bytes.split_at(header_len);
            decode_lines(body, Some(header), file_name, set_aside, decode)
        }
    }
}

/// A JSON-lines file of at least this many bytes a core decodes in pieces,
/// one a core.
const PIECE_BYTES: usize = 1 << 20;

/// Decodes JSON lines cut at line ends into one piece a core (for files of
/// [`PIECE_BYTES`] a core or more), the pieces side by side, their batches
/// in the file's order. `None` when the file is smaller, or when a piece
/// does not decode (a malformed line, or a record over several lines cut
/// in two): the caller decodes the whole then, as before.
fn decode_in_pieces(
    text: &[u8],
    decode: &(impl Fn(&[u8]) -> std::result::Result<Vec<RecordBatch>, String> + Sync),
) -> Option<Vec<RecordBatch>> {
    let cores = crate::state::cores();
    let pieces = cores.min(text.len() / PIECE_BYTES);
    if pieces <= 1 {
        return None;
    }
    let mut cuts = vec![0];
    for k in 1..pieces {
        let from = (k * text.len() / pieces).max(*cuts.last().unwrap_or(&0));
        match text[from..].iter().position(|b| *b == b'\n') {
            Some(at) => cuts.push(from + at + 1),
            None => break,
        }
    }
    cuts.push(text.len());
    cuts.dedup();
    let slices: Vec<&[u8]> = cuts.windows(2).map(|w| &text[w[0]..w[1]]).collect();
    let decoded = crate::state::spread(slices, decode);
    let mut batches = Vec::new();
    for piece in decoded {
        batches.extend(piece.ok()?);
    }
    Some(batches)
}

/// Decodes a line-oriented file. When the whole does not decode, each line is
/// decoded on its own (after `header`, for CSV) to find the malformed ones:
/// they are returned aside when `set_aside`, else the first is the error.
fn decode_lines(
    body: &[u8],
    header: Option<&[u8]>,
    file: &str,
    set_aside: bool,
    decode: impl Fn(&[u8]) -> std::result::Result<Vec<RecordBatch>, String>,
) -> std::result::Result<(Vec<RecordBatch>, Vec<BadRecord>), String> {
    let header = header.unwrap_or_default();
    let mut whole = header.to_vec();
    whole.extend_from_slice(body);
    let whole_error = match decode(&whole) {
        Ok(batches) => return Ok((batches, Vec::new())),
        Err(e) => e,
    };
    let first_line = if header.is_empty() { 1 } else { 2 };
    let mut good = header.to_vec();
    let mut bad = Vec::new();
    for (i, line) in body.split(|b| *b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let mut one = header.to_vec();
        one.extend_from_slice(line);
        one.push(b'\n');
        match decode(&one) {
            Ok(_) => {
                good.extend_from_slice(line);
                good.push(b'\n');
            }
            Err(error) => {
                let record = BadRecord {
                    file: file.to_owned(),
                    line: (i + first_line) as u64,
                    error,
                    record: String::from_utf8_lossy(line).into_owned(),
                    kafka: None,
                };
                if !set_aside {
                    return Err(format!(
                        "line {}: {}: {} (set deadLetter.path on this source to set such records aside and go on)",
                        record.line,
                        record.error,
                        record.record.chars().take(200).collect::<String>()
                    ));
                }
                bad.push(record);
            }
        }
    }
    if bad.is_empty() {
        // No single line is at fault (e.g. a value broken across lines).
        return Err(whole_error);
    }
    Ok((decode(&good)?, bad))
}

/// Reads Parquet and shapes it to the declared schema: columns by name, cast
/// to the declared types.
fn read_parquet(
    bytes: bytes::Bytes,
    schema: &SchemaRef,
) -> std::result::Result<Vec<RecordBatch>, String> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
        .map_err(|e| e.to_string())?
        .with_batch_size(BATCH_ROWS)
        .build()
        .map_err(|e| e.to_string())?;
    let mut batches = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| e.to_string())?;
        let columns = schema
            .fields()
            .iter()
            .map(|field| {
                let column = batch
                    .column_by_name(field.name())
                    .ok_or_else(|| format!("has no column {:?}", field.name()))?;
                cast(column, field.data_type())
                    .map_err(|e| format!("column {:?}: {e}", field.name()))
            })
            .collect::<std::result::Result<Vec<_>, String>>()?;
        batches.push(RecordBatch::try_new(schema.clone(), columns).map_err(|e| e.to_string())?);
    }
    Ok(batches)
}

#[async_trait]
impl Source for FileSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn description(&self) -> String {
        format!("FileSource[{}, {}]", self.storage.location(), self.format)
    }

    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn initial_offset(&self) -> Value {
        self.offset(None)
    }

    /// With `maxFileAge`, a new query starts after the files older than
    /// that, by the newest file's modification time (Spark's rule).
    async fn resolve_start(&mut self, start: &Value) -> Result<Value> {
        let (Some(age), None) = (self.max_file_age, self.key_of(start)?) else {
            return Ok(start.clone());
        };
        let files = self.list().await?;
        let Some(newest) = files.iter().map(|f| f.modified_ms).max() else {
            return Ok(start.clone());
        };
        let threshold = newest - age.as_millis() as i64;
        Ok(self.offset(Some(&Key {
            modified_ms: threshold,
            name: String::new(),
        })))
    }

    async fn plan_batch(&mut self, start: &Value) -> Result<BatchRange> {
        let last = self.key_of(start)?;
        let mut files = self.list().await?;
        if self.mode == ReadMode::AvailableNow {
            let newest = files.last().map(|f| self.key(f));
            let limit = self.limit.get_or_insert(newest).clone();
            files.retain(|f| limit.as_ref().is_some_and(|l| self.key(f) <= *l));
        }
        let new: Vec<&Listed> = files
            .iter()
            .filter(|f| last.as_ref().is_none_or(|l| self.key(f) > *l))
            .collect();
        let mut take = 0;
        let mut bytes = 0;
        for file in &new {
            let over_files = self.max_files.is_some_and(|m| take as u64 >= m);
            let over_bytes = self
                .max_bytes
                .is_some_and(|m| take > 0 && bytes + file.size > m);
            if over_files || over_bytes {
                break;
            }
            take += 1;
            bytes += file.size;
        }
        let taken = &new[..take];
        let end = taken.last().map(|f| self.key(f)).or(last);
        let names: Vec<&str> = taken.iter().map(|f| f.name.as_str()).collect();
        let mut metrics = std::collections::BTreeMap::new();
        metrics.insert("bytes".into(), bytes.to_string());
        Ok(BatchRange {
            start: start.clone(),
            end: self.offset(end.as_ref()),
            detail: serde_json::json!({ "files": names }),
            latest: self.offset(files.last().map(|f| self.key(f)).as_ref()),
            rows: take as u64,
            records_behind_latest: (new.len() - take) as u64,
            metrics,
        })
    }

    async fn read(&mut self, range: &BatchRange) -> Result<Vec<RecordBatch>> {
        let files: Vec<String> = range
            .detail
            .get("files")
            .and_then(|f| serde_json::from_value(f.clone()).ok())
            .ok_or_else(|| Error::Offset {
                source_name: self.name.clone(),
                offset: range.detail.to_string(),
                expected: r#"{"files": [<name>, ...]}"#.to_owned(),
            })?;
        let mut batches = Vec::new();
        for name in &files {
            let file_name = self.storage.name_of(name);
            let Some(bytes) = self.storage.get(name).await? else {
                return Err(Error::Source {
                    source_name: self.name.clone(),
                    message: format!(
                        "{file_name} is gone: the batch's offsets list it, so it cannot be replayed without it; put it back"
                    ),
                });
            };
            let (format, schema, set_aside) = (self.format, self.schema.clone(), self.dead_letter);
            let shown = file_name.clone();
            let decoded = tokio::task::spawn_blocking(move || {
                decode_file(format, &schema, bytes, &shown, set_aside)
            })
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
            let (file_batches, bad) = decoded.map_err(|message| Error::Source {
                source_name: self.name.clone(),
                message: format!("{file_name}: {message}"),
            })?;
            batches.extend(file_batches);
            self.bad_records.extend(bad);
        }
        Ok(batches)
    }

    fn take_bad_records(&mut self) -> Vec<BadRecord> {
        std::mem::take(&mut self.bad_records)
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::path::Path;

    use datafusion::arrow::array::{Array, Float64Array, StringArray};

    use super::*;

    fn source(dir: &Path, format: &str, max_files: Option<u64>) -> FileSource {
        source_with(dir, format, max_files, "")
    }

    fn source_with(dir: &Path, format: &str, max_files: Option<u64>, extra: &str) -> FileSource {
        let yaml = format!(
            "{{name: t, files: {{path: {:?}{}}}, format: {format}, schema: [{{name: id, type: string}}, {{name: amount, type: double}}, {{name: at, type: timestamp}}]{extra}}}",
            dir.display(),
            max_files.map_or(String::new(), |m| format!(", maxFilesPerTrigger: {m}"))
        );
        let spec: SourceSpec = serde_yaml::from_str(&yaml).unwrap();
        FileSource::new(
            &spec,
            spec.files.as_ref().unwrap(),
            "spec.sources[0]",
            ReadMode::Continuous,
        )
        .unwrap()
    }

    /// A large file decodes in one piece a core, to the rows of the whole
    /// in its order; a record over two lines that a cut would split makes
    /// the pieces fail, and the whole decodes as before.
    #[test]
    fn a_large_json_file_decodes_in_pieces_to_the_rows_of_the_whole() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, true),
            Field::new("amount", DataType::Float64, true),
        ]));
        let line = |id: &str| format!("{{\"id\": \"{id}\", \"amount\": 1.5}}\n");
        let expected: Vec<String> = (0..80_000).map(|i| format!("r{i}")).collect();
        let text: String = expected.iter().map(|id| line(id)).collect();
        let decode = |bytes: &str| {
            let (batches, bad) = decode_file(
                Format::Json,
                &schema,
                bytes::Bytes::from(bytes.to_owned()),
                "f.jsonl",
                false,
            )
            .unwrap();
            assert!(bad.is_empty());
            ids(&batches)
        };
        assert_eq!(decode(&text), expected);
        let by_pieces = |bytes: &str| {
            let json = |piece: &[u8]| {
                JsonReaderBuilder::new(schema.clone())
                    .build(BufReader::new(piece))
                    .map_err(|e| e.to_string())?
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(|e| e.to_string())
            };
            decode_in_pieces(bytes.as_bytes(), &json)
        };
        let cores = crate::state::cores();
        assert_eq!(
            by_pieces(&text).map(|b| ids(&b)),
            (cores > 1).then(|| expected.clone())
        );

        // A 3 MB record whose line break is where the cut falls.
        let long_id = "x".repeat(3 << 20);
        let split = format!("{{\"id\": \"{long_id}\",\n \"amount\": 2.5}}\n");
        let text = format!("{split}{text}");
        assert!(by_pieces(&text).is_none());
        let mut all = vec![long_id];
        all.extend(expected);
        assert_eq!(decode(&text), all);
    }

    fn json_file(dir: &Path, name: &str, ids: &[&str]) {
        let text: String = ids
            .iter()
            .map(|id| {
                format!("{{\"id\": \"{id}\", \"amount\": 1.5, \"at\": \"2026-01-01T00:00:00Z\"}}\n")
            })
            .collect();
        std::fs::write(dir.join(name), text).unwrap();
    }

    fn ids(batches: &[RecordBatch]) -> Vec<String> {
        batches
            .iter()
            .flat_map(|b| {
                let a = b.column(0).as_any().downcast_ref::<StringArray>().unwrap();
                (0..a.len())
                    .map(|i| a.value(i).to_owned())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[tokio::test]
    async fn files_are_taken_in_name_order_a_few_at_a_time_and_new_ones_later() {
        let dir = tempfile::tempdir().unwrap();
        json_file(dir.path(), "b.json", &["b1"]);
        json_file(dir.path(), "a.json", &["a1", "a2"]);
        json_file(dir.path(), "c.json", &["c1"]);
        std::fs::write(dir.path().join("_SUCCESS"), "").unwrap();
        std::fs::write(dir.path().join(".d.json.tmp"), "garbage").unwrap();
        let mut s = source(dir.path(), "json", Some(2));

        let first = s.plan_batch(&s.initial_offset()).await.unwrap();
        assert_eq!((first.rows, first.records_behind_latest), (2, 1));
        assert_eq!(ids(&s.read(&first).await.unwrap()), ["a1", "a2", "b1"]);
        let second = s.plan_batch(&first.end).await.unwrap();
        assert_eq!(ids(&s.read(&second).await.unwrap()), ["c1"]);
        let idle = s.plan_batch(&second.end).await.unwrap();
        assert_eq!(idle.rows, 0);

        json_file(dir.path(), "d.json", &["d1"]);
        let third = s.plan_batch(&second.end).await.unwrap();
        assert_eq!(ids(&s.read(&third).await.unwrap()), ["d1"]);
        // A replay of an earlier range reads the same files.
        assert_eq!(ids(&s.read(&first).await.unwrap()), ["a1", "a2", "b1"]);
    }

    #[tokio::test]
    async fn a_replay_reads_exactly_the_planned_files_and_available_now_what_was_there() {
        let dir = tempfile::tempdir().unwrap();
        json_file(dir.path(), "a.json", &["a1"]);
        json_file(dir.path(), "c.json", &["c1"]);
        let mut s = source(dir.path(), "json", None);
        let range = s.plan_batch(&s.initial_offset()).await.unwrap();
        assert_eq!(
            range.detail,
            serde_json::json!({"files": ["a.json", "c.json"]})
        );
        // A file arriving inside the range after it was planned (or
        // written late) is not part of the batch when it is replayed.
        json_file(dir.path(), "b.json", &["b1"]);
        assert_eq!(ids(&s.read(&range).await.unwrap()), ["a1", "c1"]);
        std::fs::remove_file(dir.path().join("c.json")).unwrap();
        let err = s.read(&range).await.unwrap_err().to_string();
        assert!(err.contains("c.json is gone"), "{err}");

        let spec: SourceSpec = serde_yaml::from_str(&format!(
            "{{name: t, files: {{path: {:?}, maxFilesPerTrigger: 1}}, format: json, schema: [{{name: id, type: string}}, {{name: amount, type: double}}, {{name: at, type: timestamp}}]}}",
            dir.path().display()
        ))
        .unwrap();
        let mut once = FileSource::new(
            &spec,
            spec.files.as_ref().unwrap(),
            "spec.sources[0]",
            ReadMode::AvailableNow,
        )
        .unwrap();
        let first = once.plan_batch(&once.initial_offset()).await.unwrap();
        // Files that arrive once an availableNow run started wait for the next run.
        json_file(dir.path(), "d.json", &["d1"]);
        let second = once.plan_batch(&first.end).await.unwrap();
        assert_eq!(
            (first.rows, second.rows, second.records_behind_latest),
            (1, 1, 0)
        );
        let third = once.plan_batch(&second.end).await.unwrap();
        assert_eq!(third.rows, 0);
    }

    #[tokio::test]
    async fn a_malformed_line_is_named_with_its_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.json"),
            "{\"id\": \"x\", \"amount\": 1.0, \"at\": \"2026-01-01T00:00:00Z\"}\n{\"id\": \"y\", \"amount\": \"lots\"}\n",
        )
        .unwrap();
        let mut s = source(dir.path(), "json", None);
        let range = s.plan_batch(&s.initial_offset()).await.unwrap();
        let err = s.read(&range).await.unwrap_err().to_string();
        assert!(
            err.contains(&format!(
                "{}: line 2: ",
                dir.path().join("a.json").display()
            )),
            "{err}"
        );
        assert!(err.contains("lots"), "{err}");
    }

    #[tokio::test]
    async fn with_a_dead_letter_destination_malformed_records_are_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.json"),
            "{\"id\": \"x\", \"amount\": 1.0, \"at\": \"2026-01-01T00:00:00Z\"}\nnot json at all\n{\"id\": \"y\", \"amount\": \"lots\"}\n{\"id\": \"z\", \"amount\": 3.0, \"at\": \"2026-01-01T00:00:01Z\"}\n",
        )
        .unwrap();
        let mut s = source_with(
            dir.path(),
            "json",
            None,
            ", deadLetter: {path: /tmp/unused}",
        );
        let range = s.plan_batch(&s.initial_offset()).await.unwrap();
        let batches = s.read(&range).await.unwrap();
        assert_eq!(ids(&batches), ["x", "z"]);
        let bad = s.take_bad_records();
        assert_eq!(bad.iter().map(|b| b.line).collect::<Vec<_>>(), [2, 3]);
        assert_eq!(bad[1].record, r#"{"id": "y", "amount": "lots"}"#);
        assert!(bad[0].file.ends_with("a.json"));
        assert!(s.take_bad_records().is_empty());

        let csv = tempfile::tempdir().unwrap();
        std::fs::write(
            csv.path().join("a.csv"),
            "id,amount,at\nx,2.5,2026-01-01T00:00:00Z\ny,lots,2026-01-01T00:00:00Z\n",
        )
        .unwrap();
        let mut s = source_with(csv.path(), "csv", None, ", deadLetter: {path: /tmp/unused}");
        let range = s.plan_batch(&s.initial_offset()).await.unwrap();
        assert_eq!(ids(&s.read(&range).await.unwrap()), ["x"]);
        let bad = s.take_bad_records();
        assert_eq!((bad.len(), bad[0].line), (1, 3));
    }

    #[tokio::test]
    async fn csv_and_parquet_files_are_read_with_the_declared_schema() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.csv"),
            "id,amount,at\nx,2.5,2026-01-01T00:00:00Z\n",
        )
        .unwrap();
        let mut s = source(dir.path(), "csv", None);
        let range = s.plan_batch(&s.initial_offset()).await.unwrap();
        let batches = s.read(&range).await.unwrap();
        assert_eq!(ids(&batches), ["x"]);
        let amounts = batches[0]
            .column(1)
            .as_any()
            .downcast_ref::<Float64Array>()
            .unwrap();
        assert_eq!(amounts.value(0), 2.5);

        // Parquet written with other column order and a narrower type.
        let pq = tempfile::tempdir().unwrap();
        let written = Arc::new(Schema::new(vec![
            Field::new("amount", DataType::Float32, false),
            Field::new("id", DataType::Utf8, false),
            Field::new(
                "at",
                DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
                false,
            ),
        ]));
        let batch = RecordBatch::try_new(
            written.clone(),
            vec![
                Arc::new(datafusion::arrow::array::Float32Array::from(vec![4.0])),
                Arc::new(StringArray::from(vec!["p"])),
                Arc::new(
                    datafusion::arrow::array::TimestampMillisecondArray::from(vec![0])
                        .with_timezone("UTC"),
                ),
            ],
        )
        .unwrap();
        let file = File::create(pq.path().join("a.parquet")).unwrap();
        let mut writer =
            datafusion::parquet::arrow::ArrowWriter::try_new(file, written, None).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
        let mut s = source(pq.path(), "parquet", None);
        let range = s.plan_batch(&s.initial_offset()).await.unwrap();
        let batches = s.read(&range).await.unwrap();
        assert_eq!(ids(&batches), ["p"]);
        assert_eq!(batches[0].schema(), s.schema());
    }
}
