//! Streaming deduplication (`SELECT DISTINCT`, Spark's `dropDuplicates`): a
//! row is written the first time it is seen and remembered. When one of the
//! distinct columns is a source's watermark column (by lineage, whatever it
//! is called in the query), keys start with it: rows at or before the
//! late-events watermark are dropped and counted, and remembered rows at or
//! before the eviction watermark are forgotten, so state stays bounded.

use std::collections::HashSet;

use async_trait::async_trait;
use datafusion::arrow::array::UInt32Array;
use datafusion::arrow::compute::take_record_batch;
use datafusion::error::Result as DfResult;

use super::codec::{Codec, TimeAt, micros, time_bytes};
use super::{BatchInput, BatchOutput, Phases, StatefulOperator, store_error};
use crate::state::StateStore;

/// A streaming deduplication.
pub struct Deduplicate {
    event_time: Option<usize>,
    codec: Codec,
}

impl Deduplicate {
    /// The deduplication of `phases` (a `GROUP BY` of every column), whose
    /// column `event_time` carries a watermark; returns it and its codec.
    pub fn new(phases: &Phases, event_time: Option<usize>) -> (Self, Codec) {
        let codec = codec_of(phases, event_time);
        (
            Deduplicate {
                event_time,
                codec: codec.clone(),
            },
            codec,
        )
    }
}

/// The codec of a deduplication's state: keys start with the event time
/// (when one of the columns is), and the partition is the hash of the
/// other columns. The repartition topic's partitioner is this codec too.
pub fn codec_of(phases: &Phases, event_time: Option<usize>) -> Codec {
    Codec::new(
        phases.state_schema(),
        phases.groups(),
        &event_time.into_iter().collect::<Vec<_>>(),
        event_time.map(|col| (col, TimeAt::Prefix)),
    )
}

#[async_trait]
impl StatefulOperator for Deduplicate {
    async fn process(
        &mut self,
        store: &mut StateStore,
        input: BatchInput<'_>,
    ) -> DfResult<BatchOutput> {
        let seen = input.new_states;
        let mut dropped = input.late;
        let mut fresh_rows = Vec::new();
        let mut entries = Vec::new();
        if seen.num_rows() > 0 {
            let keys = self.codec.keys(&seen, store)?;
            let times = self.event_time.map(|i| micros(&seen, i)).transpose()?;
            let stored = store.get_many(&keys).map_err(store_error)?;
            let late = input.watermarks.late_micros();
            let mut first = HashSet::new();
            for (row, (key, stored)) in keys.into_iter().zip(stored).enumerate() {
                if let (Some(times), Some(w)) = (&times, late)
                    && times[row] <= w
                {
                    dropped += 1;
                    continue;
                }
                if stored.is_none() && first.insert(key.clone()) {
                    fresh_rows.push(row as u32);
                    entries.push((key.0, key.1, Vec::new()));
                }
            }
        }
        let fresh = take_record_batch(&seen, &UInt32Array::from(fresh_rows))?;
        let new_keys = entries.len() as u64;
        store.put_many(&entries, new_keys).map_err(store_error)?;
        let rows_removed = match (self.event_time, input.watermarks.eviction_micros()) {
            (Some(_), Some(w)) => store
                .take_below(&time_bytes(w.saturating_add(1)))
                .map_err(store_error)?
                .len() as u64,
            _ => 0,
        };
        Ok(BatchOutput {
            emit: fresh,
            rows_updated: new_keys,
            rows_removed,
            rows_dropped: dropped,
        })
    }
}
