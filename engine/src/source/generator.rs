//! The seeded generators: `rate` (Spark's rate source), `transactions`
//! (card transactions for the fraud-detection scenario) and the Nexmark
//! tables (`nexmark.rs`). The row at offset `i` is a pure function of the
//! seed, the start time and `i`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use datafusion::arrow::array::{
    ArrayRef, Float64Builder, Int64Builder, StringBuilder, TimestampMicrosecondBuilder,
};
use datafusion::arrow::datatypes::{Field, Schema, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use serde_json::Value;
use sluice_crds::duration::parse_duration;
use sluice_crds::validate::generator_columns;
use sluice_crds::{GeneratorKind, GeneratorSource as GeneratorSpec, Source as SourceSpec};

use super::files::arrow_type;
use super::nexmark::{Nexmark, event_kept};
use super::{BatchRange, ReadMode, Source};
use crate::{Error, Result};

/// Rows per Arrow batch handed to the query (DataFusion's default batch size).
const CHUNK_ROWS: u64 = 8192;
/// Defaults of the transactions generator.
const DEFAULT_USERS: u64 = 1000;
const DEFAULT_MERCHANTS: u64 = 100;
const DEFAULT_MAX_DISORDER: Duration = Duration::from_secs(2);
const DEVICE_TYPES: [(&str, f64); 4] = [
    ("mobile", 0.55),
    ("web", 0.30),
    ("pos", 0.12),
    ("atm", 0.03),
];

/// A seeded generator source.
pub struct GeneratorSource {
    name: String,
    kind: GeneratorKind,
    seed: u64,
    rows_per_second: u64,
    rows_per_batch: Option<u64>,
    total_rows: Option<u64>,
    start_micros: i64,
    users: u64,
    merchants: u64,
    max_disorder_micros: i64,
    mode: ReadMode,
    /// The wall-clock pacing: when and from which row rows started to be
    /// released (the first batch planned by this run).
    pace: Option<(std::time::Instant, u64)>,
    schema: SchemaRef,
}

impl GeneratorSource {
    /// Builds a generator from its (validated) spec. Without `startTime`, event
    /// time starts at `started`.
    pub fn new(
        source: &SourceSpec,
        spec: &GeneratorSpec,
        mode: ReadMode,
        started: DateTime<Utc>,
    ) -> Result<Self> {
        let start = match &spec.start_time {
            Some(text) => DateTime::parse_from_rfc3339(text)
                .map_err(|err| Error::Unsupported {
                    path: format!("spec.sources[{}].generator.startTime", source.name),
                    message: err.to_string(),
                })?
                .with_timezone(&Utc),
            None => started,
        };
        let max_disorder = spec
            .max_disorder
            .as_deref()
            .map(parse_duration)
            .transpose()
            .map_err(|message| Error::Unsupported {
                path: format!("spec.sources[{}].generator.maxDisorder", source.name),
                message,
            })?
            .unwrap_or(DEFAULT_MAX_DISORDER);
        Ok(Self {
            name: source.name.clone(),
            kind: spec.kind,
            seed: spec.seed.unwrap_or(0),
            rows_per_second: spec.rows_per_second.max(1),
            rows_per_batch: spec.rows_per_batch,
            total_rows: spec.total_rows,
            start_micros: start.timestamp_micros(),
            users: spec.users.unwrap_or(DEFAULT_USERS).max(1),
            merchants: spec.merchants.unwrap_or(DEFAULT_MERCHANTS).max(1),
            max_disorder_micros: max_disorder.as_micros() as i64,
            mode,
            pace: None,
            schema: schema_of(spec.kind),
        })
    }

    /// The event time of row `i`, before disorder.
    fn base_micros(&self, i: u64) -> i64 {
        self.start_micros + (i as i128 * 1_000_000 / self.rows_per_second as i128) as i64
    }

    /// The rows released by the wall clock so far: `rowsPerSecond` since this
    /// run first planned a batch, counted from the row it resumed at.
    fn rows_due(&mut self, start_row: u64) -> u64 {
        let (since, from) = *self
            .pace
            .get_or_insert((std::time::Instant::now(), start_row));
        from + (since.elapsed().as_micros() * self.rows_per_second as u128 / 1_000_000) as u64
    }

    fn generate(&self, start: u64, end: u64) -> RecordBatch {
        match (self.kind, event_kept(self.kind)) {
            (_, Some(event)) => Nexmark {
                seed: self.seed,
                start_micros: self.start_micros,
                events_per_second: self.rows_per_second,
            }
            .rows(event, start, end, self.schema.clone()),
            (GeneratorKind::Rate, _) => self.rate_rows(start, end),
            (_, None) => self.transaction_rows(start, end),
        }
    }

    fn rate_rows(&self, start: u64, end: u64) -> RecordBatch {
        let n = (end - start) as usize;
        let mut timestamp = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
        let mut value = Int64Builder::with_capacity(n);
        for i in start..end {
            timestamp.append_value(self.base_micros(i));
            value.append_value(i as i64);
        }
        let columns: Vec<ArrayRef> = vec![Arc::new(timestamp.finish()), Arc::new(value.finish())];
        RecordBatch::try_new(self.schema.clone(), columns).expect("columns match the schema")
    }

    fn transaction_rows(&self, start: u64, end: u64) -> RecordBatch {
        let n = (end - start) as usize;
        let mut transaction_id = StringBuilder::with_capacity(n, n * 15);
        let mut user_id = StringBuilder::with_capacity(n, n * 10);
        let mut amount = Float64Builder::with_capacity(n);
        let mut merchant_id = StringBuilder::with_capacity(n, n * 13);
        let mut event_time = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
        let mut device_type = StringBuilder::with_capacity(n, n * 6);
        let user_width = digits(self.users - 1).max(5);
        let merchant_width = digits(self.merchants - 1).max(4);
        for i in start..end {
            let mut rng = SplitMix64::new(self.seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            // Squaring a uniform draw skews activity toward low user ids: a few
            // users are much busier than the rest, as in real card traffic.
            let u = rng.next_f64();
            let user = ((u * u) * self.users as f64) as u64;
            let merchant = rng.next_u64() % self.merchants;
            // Log-normal amounts (median about 33), with rare large outliers.
            let normal = rng.next_normal();
            let mut value = (3.5 + 1.0 * normal).exp();
            if rng.next_f64() < 0.002 {
                value *= 40.0;
            }
            let device = pick_device(rng.next_f64());
            let disorder = (rng.next_f64() * self.max_disorder_micros as f64) as i64;

            transaction_id.append_value(format!("tx-{i:012}"));
            user_id.append_value(format!("user-{user:0user_width$}"));
            amount.append_value((value * 100.0).round() / 100.0);
            merchant_id.append_value(format!("merchant-{merchant:0merchant_width$}"));
            event_time.append_value(self.base_micros(i) - disorder);
            device_type.append_value(device);
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(transaction_id.finish()),
            Arc::new(user_id.finish()),
            Arc::new(amount.finish()),
            Arc::new(merchant_id.finish()),
            Arc::new(event_time.finish()),
            Arc::new(device_type.finish()),
        ];
        RecordBatch::try_new(self.schema.clone(), columns).expect("columns match the schema")
    }
}

fn digits(n: u64) -> usize {
    n.checked_ilog10().map_or(1, |d| d as usize + 1)
}

fn pick_device(u: f64) -> &'static str {
    let mut acc = 0.0;
    for (name, weight) in DEVICE_TYPES {
        acc += weight;
        if u < acc {
            return name;
        }
    }
    DEVICE_TYPES[DEVICE_TYPES.len() - 1].0
}

/// The Arrow schema of a generator's rows.
pub fn schema_of(kind: GeneratorKind) -> SchemaRef {
    let fields: Vec<Field> = generator_columns(kind)
        .iter()
        .map(|(name, ty)| Field::new(*name, arrow_type(*ty), false))
        .collect();
    Arc::new(Schema::new(fields))
}

/// A generator's offset: the next row, and the event time of row 0, so that
/// the rows of a range are the same after a restart whatever the clock says.
fn offset_of(value: &Value, source: &str) -> Result<(u64, i64)> {
    let row = value.get("row").and_then(Value::as_u64);
    let start = value.get("startMicros").and_then(Value::as_i64);
    row.zip(start).ok_or_else(|| Error::Offset {
        source_name: source.to_owned(),
        offset: value.to_string(),
        expected: r#"{"row": <next row>, "startMicros": <event time of row 0>}"#.to_owned(),
    })
}

fn offset(row: u64, start_micros: i64) -> Value {
    serde_json::json!({"row": row, "startMicros": start_micros})
}

#[async_trait]
impl Source for GeneratorSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn description(&self) -> String {
        let kind = match self.kind {
            GeneratorKind::Rate => "rate",
            GeneratorKind::Transactions => "transactions",
            GeneratorKind::NexmarkPerson => "nexmarkPerson",
            GeneratorKind::NexmarkAuction => "nexmarkAuction",
            GeneratorKind::NexmarkBid => "nexmarkBid",
        };
        format!(
            "GeneratorSource[{kind}, seed={}, rowsPerSecond={}]",
            self.seed, self.rows_per_second
        )
    }

    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn initial_offset(&self) -> Value {
        offset(0, self.start_micros)
    }

    async fn plan_batch(&mut self, start: &Value) -> Result<BatchRange> {
        let (start_row, start_micros) = offset_of(start, &self.name)?;
        let total = self.total_rows.unwrap_or(u64::MAX);
        let latest = match (self.mode, self.rows_per_batch) {
            (ReadMode::AvailableNow, _) => total,
            // Like Spark's rate-micro-batch source: a fixed number of rows a
            // batch, whatever the clock says.
            (ReadMode::Continuous, Some(per_batch)) => {
                start_row.saturating_add(per_batch).min(total)
            }
            (ReadMode::Continuous, None) => self.rows_due(start_row).min(total),
        }
        .max(start_row);
        let end = match self.rows_per_batch {
            Some(per_batch) => start_row.saturating_add(per_batch).min(latest),
            None => latest,
        };
        Ok(BatchRange {
            start: start.clone(),
            end: offset(end, start_micros),
            detail: Value::Null,
            latest: offset(latest, start_micros),
            rows: end - start_row,
            records_behind_latest: latest - end,
            metrics: Default::default(),
        })
    }

    async fn read(&mut self, range: &BatchRange) -> Result<Vec<RecordBatch>> {
        let ((start, start_micros), (end, _)) = (
            offset_of(&range.start, &self.name)?,
            offset_of(&range.end, &self.name)?,
        );
        self.start_micros = start_micros;
        let mut batches = Vec::new();
        let mut from = start;
        while from < end {
            let to = (from + CHUNK_ROWS).min(end);
            batches.push(self.generate(from, to));
            from = to;
        }
        Ok(batches)
    }
}

/// SplitMix64: a tiny, fast, well-mixed generator, seeded per row so that any
/// row can be produced without producing the ones before it.
pub(super) struct SplitMix64(u64);

impl SplitMix64 {
    pub(super) fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub(super) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub(super) fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `0..n` (`n` > 0).
    pub(super) fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Standard normal, by Box–Muller.
    fn next_normal(&mut self) -> f64 {
        let u1 = 1.0 - self.next_f64();
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(start: Value, end: Value) -> BatchRange {
        BatchRange {
            latest: end.clone(),
            start,
            end,
            detail: Value::Null,
            rows: 0,
            records_behind_latest: 0,
            metrics: Default::default(),
        }
    }

    fn source(yaml: &str, mode: ReadMode) -> GeneratorSource {
        let spec: SourceSpec = serde_yaml::from_str(yaml).unwrap();
        let started = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        GeneratorSource::new(&spec, spec.generator.as_ref().unwrap(), mode, started).unwrap()
    }

    #[tokio::test]
    async fn rows_depend_only_on_seed_and_offset() {
        let yaml = "{name: t, generator: {kind: transactions, rowsPerSecond: 100, seed: 7}}";
        let mut a = source(yaml, ReadMode::AvailableNow);
        let mut b = source(yaml, ReadMode::AvailableNow);
        let start_micros = a.start_micros;
        let at = |row| offset(row, start_micros);
        let whole = a.read(&range(at(0), at(100))).await.unwrap();
        let part = b.read(&range(at(40), at(60))).await.unwrap();
        assert_eq!(whole[0].slice(40, 20), part[0]);
    }

    /// Without `startTime`, event time starts when the query first starts;
    /// the offsets carry it, so a restarted run re-reads the same rows.
    #[tokio::test]
    async fn offsets_carry_the_start_time_across_restarts() {
        let yaml = "{name: t, generator: {kind: transactions, rowsPerSecond: 100}}";
        let spec: SourceSpec = serde_yaml::from_str(yaml).unwrap();
        let generator = spec.generator.as_ref().unwrap();
        let first_start = Utc::now() - chrono::Duration::hours(5);
        let mut first =
            GeneratorSource::new(&spec, generator, ReadMode::AvailableNow, first_start).unwrap();
        let mut restarted =
            GeneratorSource::new(&spec, generator, ReadMode::AvailableNow, Utc::now()).unwrap();
        let rows = range(
            offset(10, first.start_micros),
            offset(20, first.start_micros),
        );
        assert_eq!(
            first.read(&rows).await.unwrap(),
            restarted.read(&rows).await.unwrap()
        );
    }

    #[tokio::test]
    async fn rows_per_batch_fixes_the_batch_size_and_total_rows_ends_it() {
        let yaml =
            "{name: r, generator: {kind: rate, rowsPerSecond: 10, rowsPerBatch: 4, totalRows: 10}}";
        let mut s = source(yaml, ReadMode::Continuous);
        let mut start = s.initial_offset();
        let mut sizes = Vec::new();
        loop {
            let range = s.plan_batch(&start).await.unwrap();
            if range.rows == 0 {
                break;
            }
            sizes.push(range.rows);
            start = range.end;
        }
        assert_eq!(sizes, [4, 4, 2]);
    }

    #[tokio::test]
    async fn available_now_reports_the_rest_as_lag() {
        let yaml =
            "{name: r, generator: {kind: rate, rowsPerSecond: 10, rowsPerBatch: 4, totalRows: 10}}";
        let mut s = source(yaml, ReadMode::AvailableNow);
        let range = s.plan_batch(&s.initial_offset()).await.unwrap();
        assert_eq!((range.rows, range.records_behind_latest), (4, 6));
    }

    #[test]
    fn event_time_is_spaced_by_the_rate_and_disorder_stays_in_bounds() {
        let yaml = "{name: t, generator: {kind: transactions, rowsPerSecond: 1000, maxDisorder: 1s, users: 3}}";
        let s = source(yaml, ReadMode::AvailableNow);
        let batch = s.generate(0, 5000);
        let times = batch
            .column(4)
            .as_any()
            .downcast_ref::<datafusion::arrow::array::TimestampMicrosecondArray>()
            .unwrap();
        for i in 0..5000u64 {
            let base = s.base_micros(i);
            let t = times.value(i as usize);
            assert!(t <= base && t > base - 1_000_000, "row {i}: {t} vs {base}");
        }
        let users = batch
            .column(1)
            .as_any()
            .downcast_ref::<datafusion::arrow::array::StringArray>()
            .unwrap();
        let distinct: std::collections::BTreeSet<&str> = users.iter().flatten().collect();
        assert_eq!(
            distinct.into_iter().collect::<Vec<_>>(),
            ["user-00000", "user-00001", "user-00002"]
        );
    }
}
