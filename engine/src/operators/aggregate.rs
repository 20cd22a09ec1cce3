//! `GROUP BY`, over event-time windows or not: each group's accumulator
//! state, merged batch after batch. Keys of a windowed aggregation start
//! with the window's end, so the windows the watermark closed are a key
//! range; they are written (append mode) and leave the state.
//!
//! A hop window's aggregation keeps **panes** (see [`Panes`]): the state
//! holds one row per key and pane, keyed by the pane's end, and a window is
//! its panes merged (`PartialReduce` over copies of the pane rows, one per
//! window written) when it is written: in append mode once the watermark
//! closes it, in update mode when a batch changed one of its panes. A pane
//! leaves the state once every window holding it is closed.

use std::collections::HashSet;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{ArrayRef, RecordBatch, TimestampMicrosecondArray, UInt32Array};
use datafusion::arrow::compute::take;
use datafusion::error::Result as DfResult;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::aggregates::AggregateExec;
use datafusion::prelude::SessionContext;
use sluice_crds::OutputMode;

use super::codec::{Codec, TimeAt, micros, time_bytes};
use super::{BatchInput, BatchOutput, Phases, StatefulOperator, merge, store_error};
use crate::state::StateStore;
use crate::watermark::BatchWatermarks;
use crate::window::{Panes, WINDOW_END, WINDOW_START};

/// A streaming `GROUP BY`.
pub struct Aggregate {
    mode: OutputMode,
    /// Whether the watermark closes windows (and they leave the state).
    evicts: bool,
    codec: Codec,
    /// A hop window kept as panes, with the positions of the window's
    /// start and end among the state's columns.
    panes: Option<(Panes, usize, usize)>,
}

impl Aggregate {
    /// The aggregation of `phases` in `mode`; returns it and its codec.
    /// With `panes`, the state keeps the hop window's panes (the plan
    /// checked that the query groups by both window columns and reads them
    /// nowhere else below the aggregation).
    pub fn new(
        phases: &Phases,
        mode: OutputMode,
        evicts: bool,
        panes: Option<Panes>,
    ) -> (Self, Codec) {
        let window_start = phases.group_position(WINDOW_START);
        let window_end = phases.group_position(WINDOW_END);
        let panes = match (panes, window_start, window_end) {
            (Some(panes), Some(start), Some(end)) if mode != OutputMode::Complete => {
                Some((panes, start, end))
            }
            _ => None,
        };
        let codec = codec_of(phases);
        (
            Aggregate {
                mode,
                evicts: evicts && window_end.is_some(),
                codec: codec.clone(),
                panes,
            },
            codec,
        )
    }
}

/// The codec of a `GROUP BY`'s state: keys start with the window's end,
/// and the partition is the hash of the grouping columns other than the
/// window. The repartition topic's partitioner is this codec too, so that a
/// row goes to the partition its key is kept in.
pub fn codec_of(phases: &Phases) -> Codec {
    let window_end = phases.group_position(WINDOW_END);
    let window_cols: Vec<usize> = [phases.group_position(WINDOW_START), window_end]
        .into_iter()
        .flatten()
        .collect();
    Codec::new(
        phases.state_schema(),
        phases.groups(),
        &window_cols,
        window_end.map(|col| (col, TimeAt::Prefix)),
    )
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

        if let Some(panes) = self.panes {
            let (emit, rows_removed) = self
                .panes(panes, store, input.ctx, partial, input.watermarks, touched)
                .await?;
            return Ok(BatchOutput {
                emit,
                rows_updated,
                rows_removed,
                rows_dropped: input.late,
            });
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

impl Aggregate {
    /// The windows a batch writes, from the panes, and how many panes left
    /// the state. `touched` holds the panes the batch changed.
    async fn panes(
        &self,
        (panes, start_col, end_col): (Panes, usize, usize),
        store: &mut StateStore,
        ctx: &SessionContext,
        partial: &AggregateExec,
        watermarks: BatchWatermarks,
        touched: RecordBatch,
    ) -> DfResult<(RecordBatch, u64)> {
        let late = watermarks.late_micros().unwrap_or(i64::MIN);
        let eviction = watermarks.eviction_micros().filter(|_| self.evicts);
        let as_windows = |rows: &RecordBatch, wanted: &dyn Fn(usize, i64) -> bool| {
            let starts = micros(rows, start_col)?;
            let (mut indices, mut window_starts) = (Vec::new(), Vec::new());
            for (i, start) in starts.iter().enumerate() {
                for end in panes.window_ends(*start) {
                    if wanted(i, end) {
                        indices.push(i as u32);
                        window_starts.push(end - panes.size);
                    }
                }
            }
            relabel(rows, indices, window_starts, panes.size, start_col, end_col)
        };
        let emit = match self.mode {
            OutputMode::Append => {
                let Some(w) = eviction else {
                    return Ok((RecordBatch::new_empty(partial.schema()), 0));
                };
                // The windows ending in (late, w] close now: their panes
                // end at or before w. Those no open window needs leave.
                let needed_after = panes.needed_after(w);
                let mut found = store
                    .take_below(&time_bytes(needed_after.saturating_add(1)))
                    .map_err(store_error)?;
                let removed = found.len() as u64;
                if w > needed_after {
                    found.extend(
                        store
                            .scan_between(
                                &time_bytes(needed_after.saturating_add(1)),
                                &time_bytes(w.saturating_add(1)),
                            )
                            .map_err(store_error)?,
                    );
                }
                let rows = self.codec.decode(found.iter().map(|(_, v)| v.as_slice()))?;
                // A partition seeded from a replica that stopped at a lower
                // watermark than the generation's writes its windows from
                // there.
                let lates = super::lates_of_rows(&self.codec, store, &rows, late)?;
                let late_of = |i: usize| lates.as_ref().map_or(late, |lates| lates[i]);
                let windows = as_windows(&rows, &|i, end| end > late_of(i) && end <= w)?;
                return Ok((combine(ctx, partial, windows).await?, removed));
            }
            OutputMode::Update => {
                // Every window holding a pane this batch changed (and not
                // closed before the batch), with all of its panes.
                let groups = self.codec.groups_of(&touched)?;
                let starts = micros(&touched, start_col)?;
                let mut wanted: HashSet<(&[u8], i64)> = HashSet::new();
                let mut needed: HashSet<(&[u8], i64)> = HashSet::new();
                let (mut indices, mut pane_starts) = (Vec::new(), Vec::new());
                for (i, (group, start)) in groups.iter().zip(&starts).enumerate() {
                    for end in panes.window_ends(*start).filter(|end| *end > late) {
                        if !wanted.insert((group, end)) {
                            continue;
                        }
                        for pane in panes.pane_starts(end) {
                            if needed.insert((group, pane)) {
                                indices.push(i as u32);
                                pane_starts.push(pane);
                            }
                        }
                    }
                }
                let candidates = relabel(
                    &touched,
                    indices,
                    pane_starts,
                    panes.pane,
                    start_col,
                    end_col,
                )?;
                let keys = self.codec.keys(&candidates, store)?;
                let stored = store.get_many(&keys).map_err(store_error)?;
                let rows = self
                    .codec
                    .decode(stored.iter().flatten().map(Vec::as_slice))?;
                let row_groups = self.codec.groups_of(&rows)?;
                let windows = as_windows(&rows, &|i, end| {
                    wanted.contains(&(row_groups[i].as_slice(), end))
                })?;
                combine(ctx, partial, windows).await?
            }
            OutputMode::Complete => unreachable!("complete mode keeps windows"),
        };
        let removed = match eviction {
            Some(w) => store
                .take_below(&time_bytes(panes.needed_after(w).saturating_add(1)))
                .map_err(store_error)?
                .len() as u64,
            None => 0,
        };
        Ok((emit, removed))
    }
}

/// The rows `indices` of `rows`, with the window (or pane) starting at
/// `starts` and lasting `length` as their window columns.
fn relabel(
    rows: &RecordBatch,
    indices: Vec<u32>,
    starts: Vec<i64>,
    length: i64,
    start_col: usize,
    end_col: usize,
) -> DfResult<RecordBatch> {
    let indices = UInt32Array::from(indices);
    let schema = rows.schema();
    let ends: Vec<i64> = starts.iter().map(|s| s + length).collect();
    let timestamps = |values: Vec<i64>, col: usize| -> ArrayRef {
        Arc::new(
            TimestampMicrosecondArray::from(values)
                .with_data_type(schema.field(col).data_type().clone()),
        )
    };
    let (mut starts, mut ends) = (Some(starts), Some(ends));
    let columns = (0..rows.num_columns())
        .map(|col| {
            Ok(if col == start_col {
                timestamps(starts.take().unwrap_or_default(), col)
            } else if col == end_col {
                timestamps(ends.take().unwrap_or_default(), col)
            } else {
                take(rows.column(col).as_ref(), &indices, None)?
            })
        })
        .collect::<DfResult<Vec<_>>>()?;
    Ok(RecordBatch::try_new(schema, columns)?)
}

/// Window rows (copies of their panes' rows) merged into one per window.
async fn combine(
    ctx: &SessionContext,
    partial: &AggregateExec,
    windows: RecordBatch,
) -> DfResult<RecordBatch> {
    if windows.num_rows() == 0 {
        return Ok(windows);
    }
    merge(ctx, partial, vec![windows]).await
}
