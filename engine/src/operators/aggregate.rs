//! `GROUP BY`, over event-time windows or not: each group's accumulator
//! state, merged batch after batch. Keys of a windowed aggregation start
//! with the window's end, so the windows the watermark closed are a key
//! range; they are written (append mode) and leave the state.

use async_trait::async_trait;
use datafusion::arrow::array::RecordBatch;
use datafusion::error::Result as DfResult;
use datafusion::physical_plan::ExecutionPlan;
use sluice_crds::OutputMode;

use super::codec::{Codec, TimeAt, time_bytes};
use super::{BatchInput, BatchOutput, Phases, StatefulOperator, merge, store_error};
use crate::state::StateStore;
use crate::window::{WINDOW_END, WINDOW_START};

/// A streaming `GROUP BY`.
pub struct Aggregate {
    mode: OutputMode,
    /// Whether the watermark closes windows (and they leave the state).
    evicts: bool,
    codec: Codec,
}

impl Aggregate {
    /// The aggregation of `phases` in `mode`; returns it and its codec.
    pub fn new(phases: &Phases, mode: OutputMode, evicts: bool) -> (Self, Codec) {
        let window_end = phases.group_position(WINDOW_END);
        let window_cols: Vec<usize> = [phases.group_position(WINDOW_START), window_end]
            .into_iter()
            .flatten()
            .collect();
        let codec = Codec::new(
            phases.state_schema(),
            phases.groups(),
            &window_cols,
            window_end.map(|col| (col, TimeAt::Prefix)),
        );
        (
            Aggregate {
                mode,
                evicts: evicts && window_end.is_some(),
                codec: codec.clone(),
            },
            codec,
        )
    }
}

#[async_trait]
impl StatefulOperator for Aggregate {
    async fn process(
        &mut self,
        store: &mut StateStore,
        input: BatchInput<'_>,
    ) -> DfResult<BatchOutput> {
        let partial = &input.phases.partial;
        let mut rows_updated = 0;
        let mut touched = RecordBatch::new_empty(partial.schema());
        if input.new_states.num_rows() > 0 {
            // NB: the first phase ran over several partitions: a group may
            // have several rows.
            let mut unique = self.codec.keys(&input.new_states, store)?;
            unique.sort_unstable();
            unique.dedup();
            let stored = store.get_many(&unique).map_err(store_error)?;
            let found: Vec<&[u8]> = stored.iter().flatten().map(Vec::as_slice).collect();
            let new_keys = (unique.len() - found.len()) as u64;
            let stored = self.codec.decode(found)?;
            touched = merge(input.ctx, partial, vec![stored, input.new_states]).await?;
            let entries: Vec<(usize, Vec<u8>, Vec<u8>)> = self
                .codec
                .keys(&touched, store)?
                .into_iter()
                .zip(self.codec.values(&touched)?)
                .map(|((p, k), v)| (p, k, v))
                .collect();
            rows_updated = entries.len() as u64;
            store.put_many(&entries, new_keys).map_err(store_error)?;
        }

        // What this batch emits, and what leaves the state.
        let mut rows_removed = 0;
        let closed = match (self.evicts, input.watermarks.eviction_micros()) {
            (true, Some(w)) => {
                let taken = store
                    .take_below(&time_bytes(w.saturating_add(1)))
                    .map_err(store_error)?;
                rows_removed = taken.len() as u64;
                self.codec.decode(taken.iter().map(|(_, v)| v.as_slice()))?
            }
            _ => RecordBatch::new_empty(partial.schema()),
        };
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
