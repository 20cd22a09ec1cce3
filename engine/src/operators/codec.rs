//! State rows of an operator: keys and values in the stable encoding
//! (`crate::state::encoding`), and the partition each key falls in.
//!
//! A key is the group's columns, encoded with floats made canonical, and an
//! 8-byte time that orders keys for eviction:
//!
//! - `Prefix`: the time first (a window's end, a deduplicated row's event
//!   time), so that everything the watermark closed is a range at the start
//!   of each partition;
//! - `Suffix`: the time last (a session's start), so that all of a key's
//!   sessions are one prefix.
//!
//! The partition is the hash of the grouping columns other than the window
//! (or event time), so that a key's windows and sessions share a partition.
//! A value is the whole state row.

use datafusion::arrow::array::{ArrayRef, RecordBatch, TimestampMicrosecondArray};
use datafusion::arrow::compute::concat_batches;
use datafusion::arrow::datatypes::{FieldRef, SchemaRef};
use datafusion::error::{DataFusionError, Result as DfResult};

use crate::state::encoding::{self, StateSchema};
use crate::state::{PartitionedKey, Partitioning, StateStore, spread};

/// Where a key's time goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeAt {
    /// First: closed windows are a key range.
    Prefix,
    /// Last: a group's sessions share a prefix.
    Suffix,
}

/// Encodes the time so that byte order is numeric order.
pub fn time_bytes(micros: i64) -> [u8; 8] {
    ((micros as u64) ^ (1 << 63)).to_be_bytes()
}

fn internal(message: impl Into<String>) -> DataFusionError {
    DataFusionError::Execution(message.into())
}

/// The values of a timestamp (microsecond) column.
pub fn micros(batch: &RecordBatch, col: usize) -> DfResult<Vec<i64>> {
    batch
        .column(col)
        .as_any()
        .downcast_ref::<TimestampMicrosecondArray>()
        .map(|a| a.values().to_vec())
        .ok_or_else(|| {
            internal(format!(
                "{} is not a timestamp",
                batch.schema().field(col).name()
            ))
        })
}

/// The keys, partitions and values of an operator's state rows.
#[derive(Clone)]
pub struct Codec {
    schema: SchemaRef,
    /// The grouping columns (the key).
    groups: Vec<usize>,
    /// The grouping columns that choose the partition.
    partition_cols: Vec<usize>,
    /// The timestamp column ordering keys, and where it goes.
    time: Option<(usize, TimeAt)>,
}

impl Codec {
    /// A codec over state rows of `schema` whose first `groups` columns are
    /// the grouping columns; `window_cols` of them (a window's start and
    /// end, an event time) do not choose the partition; `time` orders keys.
    pub fn new(
        schema: SchemaRef,
        groups: usize,
        window_cols: &[usize],
        time: Option<(usize, TimeAt)>,
    ) -> Self {
        Codec {
            partition_cols: (0..groups).filter(|i| !window_cols.contains(i)).collect(),
            groups: (0..groups).collect(),
            schema,
            time,
        }
    }

    /// The state schema: the grouping columns make the key, every column
    /// the value.
    pub fn state_schema(&self) -> crate::Result<StateSchema> {
        let fields: Vec<FieldRef> = self.schema.fields().iter().cloned().collect();
        let keys: Vec<FieldRef> = self.groups.iter().map(|i| fields[*i].clone()).collect();
        StateSchema::new(&keys, &fields).map_err(|message| crate::Error::Unsupported {
            path: "spec.query".into(),
            message,
        })
    }

    fn encode_cols(&self, batch: &RecordBatch, cols: &[usize]) -> DfResult<Vec<Vec<u8>>> {
        let columns: Vec<ArrayRef> = cols.iter().map(|i| batch.column(*i).clone()).collect();
        if columns.is_empty() {
            return Ok(vec![Vec::new(); batch.num_rows()]);
        }
        encoding::encode(&columns, true).map_err(internal)
    }

    /// Each row's partition-choosing columns, encoded: the session's key
    /// prefix, and what the partition is the hash of.
    pub fn groups_of(&self, batch: &RecordBatch) -> DfResult<Vec<Vec<u8>>> {
        self.encode_cols(batch, &self.partition_cols)
    }

    /// Each row's key and partition (large batches in slices over the
    /// cores).
    pub fn keys(&self, batch: &RecordBatch, store: &StateStore) -> DfResult<Vec<PartitionedKey>> {
        let partitions = store.partitions();
        let partitioning = store.partitioning();
        by_slices(batch, |slice| self.keys_in(slice, partitioning, partitions))
    }

    /// Checks that `partitioning` can place this operator's keys: a Kafka
    /// key must be one of the grouping columns other than the window.
    pub fn check_partitioning(&self, partitioning: &Partitioning) -> crate::Result<()> {
        let Partitioning::KafkaKey { column, field } = partitioning else {
            return Ok(());
        };
        if self.key_column(column).is_some() {
            return Ok(());
        }
        let names: Vec<&str> = self
            .partition_cols
            .iter()
            .map(|i| self.schema.field(*i).name().as_str())
            .collect();
        Err(crate::Error::Unsupported {
            path: field.clone(),
            message: format!(
                "is {column:?}, but the query's state is keyed by [{}] without it: the state can be partitioned as the topic is only when the topic's key is one of the grouping (or distinct) columns; group by {column:?} too, or remove keyedBy",
                names.join(", ")
            ),
        })
    }

    /// The grouping column (other than the window) named `column`.
    fn key_column(&self, column: &str) -> Option<usize> {
        self.partition_cols.iter().copied().find(|i| {
            let name = self.schema.field(*i).name();
            name == column || name.rsplit_once('.').is_some_and(|(_, n)| n == column)
        })
    }

    /// Each row's partition, of `partitions`: `groups` are its
    /// partition-choosing columns, encoded ([`Codec::groups_of`]).
    pub fn partitions_of(
        &self,
        batch: &RecordBatch,
        groups: &[Vec<u8>],
        partitioning: &Partitioning,
        partitions: usize,
    ) -> DfResult<Vec<usize>> {
        let column = match partitioning {
            Partitioning::Hash => {
                return Ok(groups
                    .iter()
                    .map(|group| StateStore::partition_in(group, partitions))
                    .collect());
            }
            Partitioning::KafkaKey { column, field } => self
                .key_column(column)
                .ok_or_else(|| internal(format!("{field}: {column} is not a grouping column")))?,
        };
        let text = datafusion::arrow::compute::cast(
            batch.column(column),
            &datafusion::arrow::datatypes::DataType::Utf8,
        )?;
        let text = text
            .as_any()
            .downcast_ref::<datafusion::arrow::array::StringArray>()
            .ok_or_else(|| internal("a key cast to text is not text"))?;
        (0..batch.num_rows())
            .map(|i| {
                if datafusion::arrow::array::Array::is_null(text, i) {
                    return Err(internal(format!(
                        "the key column {} is null in a state row: a keyed topic's records all have keys",
                        batch.schema().field(column).name()
                    )));
                }
                Ok(crate::kafka::default_partition(
                    text.value(i).as_bytes(),
                    partitions,
                ))
            })
            .collect()
    }

    fn keys_in(
        &self,
        batch: &RecordBatch,
        partitioning: &Partitioning,
        partitions: usize,
    ) -> DfResult<Vec<PartitionedKey>> {
        let groups = self.groups_of(batch)?;
        let parts = self.partitions_of(batch, &groups, partitioning, partitions)?;
        let times = self.time.map(|(col, _)| micros(batch, col)).transpose()?;
        // The whole group (windows included) for a prefix key; the session
        // key is its group and start.
        let whole = match self.time {
            Some((_, TimeAt::Suffix)) => None,
            _ => Some(self.encode_cols(batch, &self.groups)?),
        };
        Ok(groups
            .into_iter()
            .enumerate()
            .map(|(i, group)| {
                let partition = parts[i];
                let key = match (self.time, &whole, &times) {
                    (Some((_, TimeAt::Prefix)), Some(whole), Some(times)) => {
                        let mut key = time_bytes(times[i]).to_vec();
                        key.extend_from_slice(&whole[i]);
                        key
                    }
                    (Some((_, TimeAt::Suffix)), _, Some(times)) => {
                        let mut key = group;
                        key.extend_from_slice(&time_bytes(times[i]));
                        key
                    }
                    (_, Some(whole), _) => whole[i].clone(),
                    _ => unreachable!("a suffix key has times"),
                };
                (partition, key)
            })
            .collect())
    }

    /// Each row, encoded whole: the state values (large batches in slices
    /// over the cores).
    pub fn values(&self, batch: &RecordBatch) -> DfResult<Vec<Vec<u8>>> {
        if batch.num_columns() == 0 {
            return Ok(vec![Vec::new(); batch.num_rows()]);
        }
        by_slices(batch, |slice| {
            encoding::encode(slice.columns(), false).map_err(internal)
        })
    }

    /// State values back into rows (many in slices over the cores).
    pub fn decode<'a>(&self, values: impl IntoIterator<Item = &'a [u8]>) -> DfResult<RecordBatch> {
        let values: Vec<&[u8]> = values.into_iter().collect();
        if values.is_empty() {
            return Ok(RecordBatch::new_empty(self.schema.clone()));
        }
        let fields: Vec<FieldRef> = self.schema.fields().iter().cloned().collect();
        let decode = |values: &[&[u8]]| -> DfResult<RecordBatch> {
            let columns = encoding::decode(&fields, values).map_err(internal)?;
            Ok(RecordBatch::try_new(self.schema.clone(), columns)?)
        };
        if values.len() < SLICE_ROWS {
            return decode(&values);
        }
        let parts = spread(values.chunks(SLICE_ROWS).collect(), decode)
            .into_iter()
            .collect::<DfResult<Vec<_>>>()?;
        Ok(concat_batches(&self.schema, &parts)?)
    }
}

/// Batches at least this long are encoded and decoded in slices, side by
/// side on the cores.
const SLICE_ROWS: usize = 8192;

/// `f` over `batch` in slices of [`SLICE_ROWS`] rows spread over the cores,
/// the results in row order.
fn by_slices<R: Send>(
    batch: &RecordBatch,
    f: impl Fn(&RecordBatch) -> DfResult<Vec<R>> + Sync,
) -> DfResult<Vec<R>> {
    let rows = batch.num_rows();
    if rows < 2 * SLICE_ROWS {
        return f(batch);
    }
    let slices: Vec<RecordBatch> = (0..rows)
        .step_by(SLICE_ROWS)
        .map(|start| batch.slice(start, SLICE_ROWS.min(rows - start)))
        .collect();
    let mut out = Vec::with_capacity(rows);
    for part in spread(slices, |slice| f(&slice)) {
        out.extend(part?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::{Int64Array, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    #[tokio::test]
    async fn batches_in_slices_encode_and_decode_as_one() {
        let rows = 3 * SLICE_ROWS + 17;
        let schema = Arc::new(Schema::new(vec![
            Field::new("user", DataType::Utf8, false),
            Field::new("n", DataType::Int64, false),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from_iter_values(
                    (0..rows).map(|i| format!("u{i}")),
                )),
                Arc::new(Int64Array::from_iter_values(
                    (0..rows as i64).map(|i| i * 3),
                )),
            ],
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open("agg", 8, dir.path(), None, None, 1)
            .await
            .unwrap();
        let codec = Codec::new(schema, 1, &[], None);
        let keys = codec.keys(&batch, &store).unwrap();
        assert_eq!(keys, codec.keys_in(&batch, &Partitioning::Hash, 8).unwrap());
        let values = codec.values(&batch).unwrap();
        assert_eq!(values, encoding::encode(batch.columns(), false).unwrap());
        let decoded = codec.decode(values.iter().map(Vec::as_slice)).unwrap();
        assert_eq!(decoded, batch);
    }

    #[tokio::test]
    async fn a_keyed_state_puts_each_key_in_its_topic_partition_and_keeps_saying_so() {
        // State rows (user, window_end, n) of a windowed count by user.
        let schema = Arc::new(Schema::new(vec![
            Field::new("user", DataType::Utf8, false),
            Field::new("bucket", DataType::Int64, false),
            Field::new("n", DataType::Int64, false),
        ]));
        let users: Vec<String> = (0..200).map(|i| format!("user-{i:04}")).collect();
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from_iter_values(users.iter())),
                Arc::new(Int64Array::from_iter_values((0..200).map(|i| i % 3))),
                Arc::new(Int64Array::from_iter_values(0..200)),
            ],
        )
        .unwrap();
        let keyed = Partitioning::KafkaKey {
            column: "user".into(),
            field: "spec.sources[0].kafka.keyedBy".into(),
        };
        // The second column is a window's: not part of the partition.
        let codec = Codec::new(schema.clone(), 2, &[1], None);
        codec.check_partitioning(&keyed).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let remote =
            crate::storage::Storage::open(dir.path().join("ck").to_str().unwrap(), "f").unwrap();
        let mut store = StateStore::open(
            "agg",
            6,
            &dir.path().join("a"),
            Some(remote.clone()),
            None,
            1,
        )
        .await
        .unwrap();
        store.set_partitioning(keyed.clone()).unwrap();
        let keys = codec.keys(&batch, &store).unwrap();
        for (user, (p, _)) in users.iter().zip(&keys) {
            assert_eq!(
                *p,
                crate::kafka::default_partition(user.as_bytes(), 6),
                "{user}"
            );
        }
        assert!(
            keys.iter()
                .map(|(p, _)| *p)
                .collect::<std::collections::BTreeSet<_>>()
                .len()
                == 6
        );
        // A key that is not a grouping column cannot place the state.
        let by_window = Codec::new(schema, 2, &[0], None);
        let refused = by_window
            .check_partitioning(&keyed)
            .unwrap_err()
            .to_string();
        assert!(
            refused.contains("spec.sources[0].kafka.keyedBy") && refused.contains("[bucket]"),
            "{refused}"
        );
        // The version names its partitioning; a restart that asks for the
        // hash is refused, naming the field.
        let values = codec.values(&batch).unwrap();
        let entries: Vec<(usize, Vec<u8>, Vec<u8>)> = keys
            .into_iter()
            .zip(values)
            .map(|((p, k), v)| (p, k, v))
            .collect();
        store.put_many(&entries, 200).unwrap();
        store.commit(0).await.unwrap();
        let restore = Some(crate::state::PartitionRef {
            version: 0,
            epoch: 1,
        });
        let mut again = StateStore::open(
            "agg",
            6,
            &dir.path().join("b"),
            Some(remote.clone()),
            restore,
            2,
        )
        .await
        .unwrap();
        let refused = again
            .set_partitioning(Partitioning::Hash)
            .unwrap_err()
            .to_string();
        assert!(
            refused.contains("kafkaKey(user)") && refused.contains("keyedBy"),
            "{refused}"
        );
        again.set_partitioning(keyed).unwrap();
    }
}
