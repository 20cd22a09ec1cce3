//! The console sink: each batch as a table, laid out as Spark's console sink
//! lays it out, so that its output reads the same.

use std::io::Write;
use std::sync::Mutex;

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use sluice_crds::ConsoleSink as ConsoleSpec;

use super::Sink;
use crate::{Error, Result};

/// Spark's defaults: 20 rows, values cut at 20 characters.
const DEFAULT_NUM_ROWS: usize = 20;
const TRUNCATE_AT: usize = 20;

/// Prints each batch to a writer (standard output in `sluice run`).
pub struct ConsoleSink<W> {
    num_rows: usize,
    truncate: bool,
    out: Mutex<W>,
    /// The prepared batch's text, printed at its commit.
    pending: Option<String>,
}

impl<W: Write + Send> ConsoleSink<W> {
    /// A console sink writing to `out`.
    pub fn new(spec: &ConsoleSpec, out: W) -> Self {
        Self {
            num_rows: spec.num_rows.map_or(DEFAULT_NUM_ROWS, |n| n as usize),
            truncate: spec.truncate.unwrap_or(true),
            out: Mutex::new(out),
            pending: None,
        }
    }

    /// Renders one batch as Spark's console sink does.
    pub fn render(
        &self,
        batch_id: u64,
        schema: &SchemaRef,
        batches: &[RecordBatch],
    ) -> Result<String> {
        let total: usize = batches.iter().map(|b| b.num_rows()).sum();
        let options = FormatOptions::default().with_null("NULL");
        let mut rows: Vec<Vec<String>> = Vec::new();
        'batches: for batch in batches {
            let formatters = batch
                .columns()
                .iter()
                .map(|c| ArrayFormatter::try_new(c.as_ref(), &options))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| Error::Sink {
                    sink: "console".into(),
                    message: e.to_string(),
                })?;
            for row in 0..batch.num_rows() {
                if rows.len() == self.num_rows {
                    break 'batches;
                }
                rows.push(
                    formatters
                        .iter()
                        .map(|f| self.cut(f.value(row).to_string()))
                        .collect(),
                );
            }
        }
        let header: Vec<String> = schema
            .fields()
            .iter()
            .map(|f| self.cut(f.name().clone()))
            .collect();
        let widths: Vec<usize> = (0..header.len())
            .map(|c| {
                rows.iter()
                    .map(|r| r[c].chars().count())
                    .chain([header[c].chars().count(), 3])
                    .max()
                    .unwrap_or(3)
            })
            .collect();
        let line: String = widths
            .iter()
            .map(|w| format!("+{}", "-".repeat(*w)))
            .collect::<String>()
            + "+\n";
        let row_line = |cells: &[String]| -> String {
            cells
                .iter()
                .zip(&widths)
                .map(|(cell, w)| {
                    if self.truncate {
                        format!("|{cell:>w$}")
                    } else {
                        format!("|{cell:<w$}")
                    }
                })
                .collect::<String>()
                + "|\n"
        };
        let mut text = format!(
            "-------------------------------------------\nBatch: {batch_id}\n-------------------------------------------\n"
        );
        text.push_str(&line);
        text.push_str(&row_line(&header));
        text.push_str(&line);
        for row in &rows {
            text.push_str(&row_line(row));
        }
        text.push_str(&line);
        if total > rows.len() {
            text.push_str(&format!("only showing top {} rows\n", rows.len()));
        }
        text.push('\n');
        Ok(text)
    }

    fn cut(&self, value: String) -> String {
        if self.truncate && value.chars().count() > TRUNCATE_AT {
            let kept: String = value.chars().take(TRUNCATE_AT - 3).collect();
            kept + "..."
        } else {
            value
        }
    }

    /// The writer, to read back what was printed (tests).
    pub fn into_inner(self) -> W {
        self.out.into_inner().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl<W: Write + Send> Sink for ConsoleSink<W> {
    fn description(&self) -> String {
        "ConsoleSink".to_owned()
    }

    /// The console remembers nothing: a batch replayed after a crash is
    /// printed again (at least once, as Spark's console sink).
    async fn is_committed(&mut self, _batch_id: u64) -> Result<bool> {
        Ok(false)
    }

    async fn prepare(
        &mut self,
        batch_id: u64,
        schema: &SchemaRef,
        batches: &[RecordBatch],
    ) -> Result<()> {
        self.pending = Some(self.render(batch_id, schema, batches)?);
        Ok(())
    }

    async fn commit(&mut self, _batch_id: u64) -> Result<()> {
        let Some(text) = self.pending.take() else {
            return Ok(());
        };
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        out.write_all(text.as_bytes())
            .and_then(|()| out.flush())
            .map_err(|e| Error::Sink {
                sink: "console".into(),
                message: e.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::{Int64Array, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    #[test]
    fn renders_like_sparks_console_sink() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("value", DataType::Int64, false),
            Field::new("note", DataType::Utf8, true),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from(vec![1, 22, 333])),
                Arc::new(StringArray::from(vec![
                    Some("short"),
                    None,
                    Some("a rather long note indeed"),
                ])),
            ],
        )
        .unwrap();
        let sink = ConsoleSink::new(
            &ConsoleSpec {
                num_rows: Some(2),
                truncate: None,
            },
            Vec::new(),
        );
        let text = sink.render(7, &schema, &[batch]).unwrap();
        assert_eq!(
            text,
            "-------------------------------------------\nBatch: 7\n-------------------------------------------\n\
             +-----+-----+\n|value| note|\n+-----+-----+\n|    1|short|\n|   22| NULL|\n+-----+-----+\n\
             only showing top 2 rows\n\n"
        );
    }
}
