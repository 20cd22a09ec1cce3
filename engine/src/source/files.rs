//! The file source: a directory of JSON-lines, CSV or Parquet files with a
//! declared schema. Files are taken in name order, at most
//! `maxFilesPerTrigger` a batch; files added later are picked up by later
//! batches. The offset is the name of the last file taken, so each file is
//! read once; the batch's exact file list goes to the offset log too, so a
//! batch replayed after a crash reads the same files, whatever arrived since.
//! With `availableNow` the files present at the start are the query's input:
//! files that arrive later are left for the next run.
//!
//! NB: a file whose name sorts before one already taken is never read: name
//! new files so that they sort last (a timestamp or a sequence number), as
//! most writers do. Hidden files (`.name`) and files starting with `_` (such
//! as `_SUCCESS`) are ignored. Local directories only so far.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::compute::cast;
use datafusion::arrow::csv::ReaderBuilder as CsvReaderBuilder;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::arrow::json::ReaderBuilder as JsonReaderBuilder;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde_json::Value;
use sluice_crds::{ColumnType, FileSource as FileSpec, Format, Source as SourceSpec};

use super::{BadRecord, BatchRange, ReadMode, Source};
use crate::{Error, Result};

/// Rows per Arrow batch when decoding text formats.
const BATCH_ROWS: usize = 8192;

/// A directory of data files.
pub struct FileSource {
    name: String,
    dir: PathBuf,
    format: Format,
    schema: SchemaRef,
    max_files: Option<u64>,
    /// Whether malformed records are set aside (`deadLetter`) or fail the read.
    dead_letter: bool,
    bad_records: Vec<BadRecord>,
    mode: ReadMode,
    /// With `availableNow`: the last file present when the run started
    /// (`Some(None)`: there was none), set by the first plan.
    limit: Option<Option<String>>,
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
        if spec.path.starts_with("s3://") {
            return Err(unsupported(
                "files.path",
                "file sources on S3 are not implemented in this version of the engine yet: use a local directory".into(),
            ));
        }
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
        Ok(Self {
            name: source.name.clone(),
            dir: PathBuf::from(spec.path.strip_prefix("file://").unwrap_or(&spec.path)),
            format,
            schema: Arc::new(Schema::new(fields)),
            max_files: spec.max_files_per_trigger,
            dead_letter: source.dead_letter.is_some(),
            bad_records: Vec::new(),
            mode,
            limit: None,
        })
    }

    /// The data files of the directory, in name order.
    fn list(&self) -> Result<Vec<String>> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            // Like Spark, a directory that does not exist yet has no files yet.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(Error::Source {
                    source_name: self.name.clone(),
                    message: format!("cannot list {}: {e}", self.dir.display()),
                });
            }
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::Source {
                source_name: self.name.clone(),
                message: format!("cannot list {}: {e}", self.dir.display()),
            })?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || name.starts_with('_') || !entry.path().is_file() {
                continue;
            }
            names.push(name);
        }
        names.sort();
        Ok(names)
    }

    fn read_file(
        &self,
        name: &str,
    ) -> std::result::Result<(Vec<RecordBatch>, Vec<BadRecord>), String> {
        let path = self.dir.join(name);
        let mut file = File::open(&path).map_err(|e| format!("cannot open it: {e}"))?;
        let file_name = path.display().to_string();
        let schema = self.schema.clone();
        match self.format {
            Format::Parquet => Ok((read_parquet(file, &self.schema)?, Vec::new())),
            Format::Avro => Err("Avro is not implemented".into()),
            Format::Json => {
                let mut text = Vec::new();
                file.read_to_end(&mut text).map_err(|e| e.to_string())?;
                let decode = |bytes: &[u8]| -> std::result::Result<Vec<RecordBatch>, String> {
                    JsonReaderBuilder::new(schema.clone())
                        .with_batch_size(BATCH_ROWS)
                        .build(BufReader::new(bytes))
                        .map_err(|e| e.to_string())?
                        .collect::<std::result::Result<Vec<_>, _>>()
                        .map_err(|e| e.to_string())
                };
                decode_lines(&text, None, &file_name, self.dead_letter, decode)
            }
            Format::Csv => {
                let mut text = Vec::new();
                file.read_to_end(&mut text).map_err(|e| e.to_string())?;
                let decode = |bytes: &[u8]| -> std::result::Result<Vec<RecordBatch>, String> {
                    CsvReaderBuilder::new(schema.clone())
                        .with_header(true)
                        .with_batch_size(BATCH_ROWS)
                        .build(bytes)
                        .map_err(|e| e.to_string())?
                        .collect::<std::result::Result<Vec<_>, _>>()
                        .map_err(|e| e.to_string())
                };
                let header_len = text
                    .iter()
                    .position(|b| *b == b'\n')
                    .map_or(text.len(), |i| i + 1);
                let (header, body) = text.split_at(header_len);
                decode_lines(body, Some(header), &file_name, self.dead_letter, decode)
            }
        }
    }
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
fn read_parquet(file: File, schema: &SchemaRef) -> std::result::Result<Vec<RecordBatch>, String> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
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

/// A file source's offset: the name of the last file taken (null before any).
fn offset_of(value: &Value, source: &str) -> Result<Option<String>> {
    match value.get("lastFile") {
        Some(Value::Null) => Ok(None),
        Some(Value::String(name)) => Ok(Some(name.clone())),
        _ => Err(Error::Offset {
            source_name: source.to_owned(),
            offset: value.to_string(),
            expected: r#"{"lastFile": <name or null>}"#.to_owned(),
        }),
    }
}

fn offset(last: Option<&str>) -> Value {
    serde_json::json!({ "lastFile": last })
}

fn after<'a>(names: &'a [String], last: &Option<String>) -> &'a [String] {
    match last {
        None => names,
        Some(last) => &names[names.partition_point(|n| n.as_str() <= last.as_str())..],
    }
}

#[async_trait]
impl Source for FileSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn description(&self) -> String {
        format!("FileSource[{}, {}]", self.dir.display(), self.format)
    }

    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn initial_offset(&self) -> Value {
        offset(None)
    }

    async fn plan_batch(&mut self, start: &Value) -> Result<BatchRange> {
        let last = offset_of(start, &self.name)?;
        let mut names = self.list()?;
        if self.mode == ReadMode::AvailableNow {
            let limit = self
                .limit
                .get_or_insert_with(|| names.last().cloned())
                .clone();
            names.retain(|n| limit.as_ref().is_some_and(|l| n <= l));
        }
        let new = after(&names, &last);
        let take = self
            .max_files
            .map_or(new.len(), |m| new.len().min(m as usize));
        let files = &new[..take];
        let end = files.last().cloned().or(last);
        Ok(BatchRange {
            start: start.clone(),
            end: offset(end.as_deref()),
            detail: serde_json::json!({ "files": files }),
            latest: offset(names.last().map(String::as_str)),
            rows: take as u64,
            records_behind_latest: (new.len() - take) as u64,
            metrics: Default::default(),
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
            let path = Path::new(&self.dir).join(name);
            if !path.is_file() {
                return Err(Error::Source {
                    source_name: self.name.clone(),
                    message: format!(
                        "{} is gone: the batch's offsets list it, so it cannot be replayed without it; put it back",
                        path.display()
                    ),
                });
            }
            let (file_batches, bad) = self.read_file(name).map_err(|message| Error::Source {
                source_name: self.name.clone(),
                message: format!("{}: {message}", path.display()),
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
