//! Session windows: a key's events closer than the gap to one another share
//! a session `[first event, last event + gap)`. Keys are the group's columns
//! other than the window, then the session's start, so a batch reads all of
//! a key's sessions with one prefix scan in the key's partition, merges the
//! sessions that overlap or touch (as Spark does: a session starting exactly
//! where another ends joins it), and replaces them. Closed sessions are found
//! by a scan of the state.

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{ArrayRef, RecordBatch, TimestampMicrosecondArray, UInt32Array};
use datafusion::arrow::compute::{concat_batches, take_record_batch};
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::error::{DataFusionError, Result as DfResult};
use sluice_crds::OutputMode;

use super::codec::{Codec, TimeAt, micros};
use super::{BatchInput, BatchOutput, Phases, StatefulOperator, merge, store_error};
use crate::state::StateStore;
use crate::window::{WINDOW_END, WINDOW_START};

/// A session-window aggregation.
pub struct Session {
    mode: OutputMode,
    evicts: bool,
    schema: SchemaRef,
    start_col: usize,
    end_col: usize,
    codec: Codec,
}

impl Session {
    /// The session aggregation of `phases`; returns it and its codec.
    pub fn new(phases: &Phases, mode: OutputMode, evicts: bool) -> DfResult<(Self, Codec)> {
        let (start_col, end_col) = window_columns(phases)?;
        let codec = codec_of(phases)?;
        Ok((
            Session {
                mode,
                evicts,
                schema: phases.state_schema(),
                start_col,
                end_col,
                codec: codec.clone(),
            },
            codec,
        ))
    }

    /// Each row's merged session: rows of one key whose sessions overlap or
    /// touch (directly or through others) get the union's bounds.
    fn merge_bounds(&self, batch: &RecordBatch) -> DfResult<Vec<(i64, i64)>> {
        let groups = self.codec.groups_of(batch)?;
        let starts = micros(batch, self.start_col)?;
        let ends = micros(batch, self.end_col)?;
        let mut order: Vec<usize> = (0..batch.num_rows()).collect();
        order.sort_by(|a, b| (&groups[*a], starts[*a]).cmp(&(&groups[*b], starts[*b])));
        let mut bounds = vec![(0, 0); batch.num_rows()];
        let mut run: Vec<usize> = Vec::new();
        let mut current: Option<(usize, i64, i64)> = None; // (first row, start, end)
        let flush = |run: &mut Vec<usize>, start: i64, end: i64, bounds: &mut Vec<(i64, i64)>| {
            for &r in run.iter() {
                bounds[r] = (start, end);
            }
            run.clear();
        };
        for &row in &order {
            match current {
                // NB: `<=`: sessions that touch merge, as in Spark.
                Some((first, start, end)) if groups[first] == groups[row] && starts[row] <= end => {
                    current = Some((first, start, end.max(ends[row])));
                }
                Some((_, start, end)) => {
                    flush(&mut run, start, end, &mut bounds);
                    current = Some((row, starts[row], ends[row]));
                }
                None => current = Some((row, starts[row], ends[row])),
            }
            run.push(row);
        }
        if let Some((_, start, end)) = current {
            flush(&mut run, start, end, &mut bounds);
        }
        Ok(bounds)
    }

    /// `batch` with its session bounds replaced by `bounds`.
    fn with_bounds(&self, batch: &RecordBatch, bounds: &[(i64, i64)]) -> DfResult<RecordBatch> {
        let tz = match self.schema.field(self.start_col).data_type() {
            DataType::Timestamp(_, tz) => tz.clone(),
            _ => None,
        };
        let mut columns = batch.columns().to_vec();
        let array = |values: Vec<i64>| -> ArrayRef {
            Arc::new(TimestampMicrosecondArray::from(values).with_timezone_opt(tz.clone()))
        };
        columns[self.start_col] = array(bounds.iter().map(|b| b.0).collect());
        columns[self.end_col] = array(bounds.iter().map(|b| b.1).collect());
        Ok(RecordBatch::try_new(self.schema.clone(), columns)?)
    }
}

/// The positions of the session's start and end among the state's columns.
fn window_columns(phases: &Phases) -> DfResult<(usize, usize)> {
    let position = |name: &str| {
        phases.group_position(name).ok_or_else(|| {
            DataFusionError::Execution(format!("session windows need GROUP BY {name}"))
        })
    };
    Ok((position(WINDOW_START)?, position(WINDOW_END)?))
}

/// The codec of a session aggregation's state: keys are the grouping
/// columns other than the window, then the session's start; the partition
/// is the hash of those columns. The repartition topic's partitioner is
/// this codec too.
pub fn codec_of(phases: &Phases) -> DfResult<Codec> {
    let (start_col, end_col) = window_columns(phases)?;
    Ok(Codec::new(
        phases.state_schema(),
        phases.groups(),
        &[start_col, end_col],
        Some((start_col, TimeAt::Suffix)),
    ))
}

#[async_trait]
impl StatefulOperator for Session {
    async fn process(
        &mut self,
        store: &mut StateStore,
        input: BatchInput<'_>,
    ) -> DfResult<BatchOutput> {
        let partial = &input.phases.partial;
        let mut rows_updated = 0;
        let mut touched = RecordBatch::new_empty(self.schema.clone());
        if input.new_states.num_rows() > 0 {
            // Every stored session of the keys this batch touches.
            let groups = self.codec.groups_of(&input.new_states)?;
            let parts = self.codec.partitions_of(
                &input.new_states,
                &groups,
                store.partitioning(),
                store.partitions(),
            )?;
            let mut groups: Vec<(usize, Vec<u8>)> = parts.into_iter().zip(groups).collect();
            groups.sort_unstable();
            groups.dedup();
            let mut old_keys = Vec::new();
            let mut old_values = Vec::new();
            for (p, group) in &groups {
                let p = *p;
                for (k, v) in store.scan_prefix(p, group).map_err(store_error)? {
                    old_keys.push((p, k));
                    old_values.push(v);
                }
            }
            let old = self.codec.decode(old_values.iter().map(Vec::as_slice))?;
            let all = concat_batches(&self.schema, &[old, input.new_states])?;
            let bounds = self.merge_bounds(&all)?;
            let all = self.with_bounds(&all, &bounds)?;
            touched = merge(input.ctx, partial, vec![all]).await?;
            store.delete_many(&old_keys).map_err(store_error)?;
            let entries: Vec<(usize, Vec<u8>, Vec<u8>)> = self
                .codec
                .keys(&touched, store)?
                .into_iter()
                .zip(self.codec.values(&touched)?)
                .map(|((p, k), v)| (p, k, v))
                .collect();
            rows_updated = entries.len() as u64;
            store
                .put_many(&entries, rows_updated)
                .map_err(store_error)?;
        }
        // Closed sessions: those that end at or before the watermark.
        let mut rows_removed = 0;
        let mut closed = RecordBatch::new_empty(self.schema.clone());
        if let (true, Some(w)) = (self.evicts, input.watermarks.eviction_micros()) {
            let mut all = store.scan().map_err(store_error)?;
            let states = self
                .codec
                .decode(all.iter().map(|(_, _, v)| v.as_slice()))?;
            let ends = micros(&states, self.end_col)?;
            let done: Vec<u32> = (0..states.num_rows() as u32)
                .filter(|&i| ends[i as usize] <= w)
                .collect();
            let keys: Vec<(usize, Vec<u8>)> = done
                .iter()
                .map(|&i| {
                    let entry = &mut all[i as usize];
                    (entry.0, std::mem::take(&mut entry.1))
                })
                .collect();
            store.delete_many(&keys).map_err(store_error)?;
            rows_removed = keys.len() as u64;
            closed = take_record_batch(&states, &UInt32Array::from(done))?;
        }
        let emit = match self.mode {
            OutputMode::Append => closed,
            OutputMode::Update => touched,
            OutputMode::Complete => {
                let all = store.scan().map_err(store_error)?;
                self.codec
                    .decode(all.iter().map(|(_, _, v)| v.as_slice()))?
            }
        };
        Ok(BatchOutput {
            emit,
            rows_updated,
            rows_removed,
            rows_dropped: input.late,
        })
    }
}
