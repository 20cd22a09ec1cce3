//! Every watermark rule in one place, as Spark Structured Streaming (3.4+,
//! `spark.sql.streaming.statefulOperator.allowMultiple`) applies them:
//!
//! - A source's watermark is the largest event time it has produced,
//!   truncated to milliseconds, minus its `delay`; it never goes back.
//! - The query's (global) watermark is the smallest over the watermarked
//!   sources; a source that has produced no row yet holds it where it is
//!   (Spark counts it as 0). With `watermark.idleTimeout` (Flink's idleness;
//!   Spark has none), a source that produced nothing for that long is left
//!   out until it produces again. The global watermark never goes back.
//! - It moves between batches: batch N runs with two watermarks, recorded in
//!   `offsets/N` so that a replay runs with exactly them:
//!   - **eviction**: the global watermark when N was planned. Windows (and
//!     deduplication state) ending at or before it are closed: written in
//!     append mode and removed from state. It is the batch's reported
//!     `eventTime.watermark`.
//!   - **late events**: batch N-1's eviction watermark. Input rows whose
//!     window ends at or before it are late: dropped and counted, by the
//!     stateful operators only (complete mode and stateless queries drop
//!     nothing, as in Spark).
//! - A batch with no new data runs when the global watermark has moved past
//!   the last batch's eviction watermark and the query has state the
//!   watermark evicts (decided by the plan).
//!
//! One rule is Sluice's own, for the replicas of a scaled-out query (whose
//! watermark is already the minimum over the replicas, which Spark has no
//! need of): a source's own watermark does not pass a Kafka partition that
//! the batch left records of unread (its per-batch limit cut it short).
//! A rescale hands each new replica partitions whose old owners stood at
//! different event times; reading them in proportion to their backlog,
//! the largest event time read would run ahead of the lagging partitions'
//! unread records, which would then be late, rows a one-replica run keeps.
//! Held at the lagging partition until it is read up to where it was
//! planned, the watermark drops only what one replica drops. A partition
//! read to its latest offset holds nothing (Spark's rule again), so an
//! idle partition never stalls the watermark, as it would under Flink's
//! per-split minimum.

use std::collections::BTreeMap;

use datafusion::arrow::array::{Array, TimestampMicrosecondArray};
use datafusion::arrow::record_batch::RecordBatch;
use serde::{Deserialize, Serialize};

use crate::source::RowPartitions;

/// A source's watermark declaration.
#[derive(Clone, Debug, PartialEq)]
pub struct SourceWatermark {
    /// The event-time column.
    pub column: String,
    /// How late rows may be, in milliseconds.
    pub delay_ms: i64,
    /// After this long without rows (milliseconds), the source no longer
    /// holds the global watermark back.
    pub idle_timeout_ms: Option<i64>,
}

/// The watermarks one batch runs with, Unix milliseconds (`None`: no
/// watermark yet, nothing is late or closed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BatchWatermarks {
    /// Windows ending at or before it are closed and leave the state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eviction_ms: Option<i64>,
    /// Input rows whose window ends at or before it are late.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub late_events_ms: Option<i64>,
}

impl BatchWatermarks {
    /// The eviction watermark in microseconds (event times' unit).
    pub fn eviction_micros(&self) -> Option<i64> {
        self.eviction_ms.map(|ms| ms.saturating_mul(1000))
    }

    /// The late-events watermark in microseconds.
    pub fn late_micros(&self) -> Option<i64> {
        self.late_events_ms.map(|ms| ms.saturating_mul(1000))
    }
}

/// One source's part of [`TrackerState`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceState {
    /// The source's own watermark, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watermark_ms: Option<i64>,
    /// When it last produced rows (wall clock, milliseconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_data_ms: Option<i64>,
}

/// What the tracker knows after a batch; kept in `commits/N`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrackerState {
    /// The global watermark the batch ran with (its eviction watermark).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub global_ms: Option<i64>,
    /// Each watermarked source's state, by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sources: BTreeMap<String, SourceState>,
}

/// Tracks the watermarks of a query's sources.
pub struct Tracker {
    sources: Vec<(String, Option<SourceWatermark>)>,
    state: TrackerState,
    /// When this run started, for sources idle since before it.
    started_ms: i64,
}

impl Tracker {
    /// A tracker over the sources (name and watermark, in spec order), at
    /// the wall-clock time `now_ms`.
    pub fn new(sources: Vec<(String, Option<SourceWatermark>)>, now_ms: i64) -> Self {
        Self {
            sources,
            state: TrackerState::default(),
            started_ms: now_ms,
        }
    }

    /// Puts back the state after the last committed batch.
    pub fn restore(&mut self, state: TrackerState) {
        self.state = state;
    }

    /// The state, to keep with the batch's commit.
    pub fn state(&self) -> &TrackerState {
        &self.state
    }

    /// Whether any source declares a watermark.
    pub fn any(&self) -> bool {
        self.sources.iter().any(|(_, w)| w.is_some())
    }

    /// The watermark declaration of source `i`.
    pub fn declaration(&self, i: usize) -> Option<&SourceWatermark> {
        self.sources.get(i).and_then(|(_, w)| w.as_ref())
    }

    /// After a batch planned at `now_ms`: source `i` produced rows whose
    /// largest event time was `max_event_micros` (`None`: no rows, or all
    /// null); `held_micros`, the smallest largest event time over the
    /// partitions it left records of unread (see the module's
    /// documentation), holds the source's watermark below it.
    pub fn observe(
        &mut self,
        i: usize,
        rows: u64,
        max_event_micros: Option<i64>,
        held_micros: Option<i64>,
        now_ms: i64,
    ) {
        let Some((name, Some(declared))) = self.sources.get(i) else {
            return;
        };
        let entry = self.state.sources.entry(name.clone()).or_default();
        if rows > 0 {
            entry.last_data_ms = Some(now_ms);
        }
        if let Some(max) = max_event_micros {
            // NB: as Spark, the max event time in whole milliseconds
            // (truncated toward zero) before the delay.
            let mut own = (max / 1000).saturating_sub(declared.delay_ms);
            if let Some(held) = held_micros {
                own = own.min((held / 1000).saturating_sub(declared.delay_ms));
            }
            entry.watermark_ms = Some(entry.watermark_ms.map_or(own, |w| w.max(own)));
        }
    }

    /// The global watermark a batch planned at `now_ms` runs with.
    pub fn global_at(&self, now_ms: i64) -> Option<i64> {
        let mut smallest: Option<Option<i64>> = None;
        for (name, declared) in &self.sources {
            let Some(declared) = declared else { continue };
            let state = self.state.sources.get(name);
            if let Some(timeout) = declared.idle_timeout_ms {
                let since = state
                    .and_then(|s| s.last_data_ms)
                    .unwrap_or(self.started_ms);
                if now_ms.saturating_sub(since) >= timeout {
                    continue;
                }
            }
            let own = state.and_then(|s| s.watermark_ms);
            smallest = Some(match smallest {
                None => own,
                Some(current) => match (current, own) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    _ => None,
                },
            });
        }
        match (self.state.global_ms, smallest.flatten()) {
            (Some(old), Some(new)) => Some(old.max(new)),
            (old, new) => old.or(new),
        }
    }

    /// Sets the global watermark: the batch being planned runs with it.
    pub fn set_global(&mut self, global_ms: Option<i64>) {
        self.state.global_ms = global_ms;
    }

    /// The global watermark the last batch ran with.
    pub fn global(&self) -> Option<i64> {
        self.state.global_ms
    }
}

/// Over the partitions `partitions` marks behind, the smallest of the
/// largest event time (`column`) each had in `batches` (its rows, in
/// order, as `partitions.rows` says); `None` when none is behind.
pub fn behind_partitions_max(
    column: &str,
    batches: &[RecordBatch],
    partitions: &RowPartitions,
) -> Option<i64> {
    if !partitions.partitions.iter().any(|p| p.behind) {
        return None;
    }
    let mut largest: Vec<Option<i64>> = vec![None; partitions.partitions.len()];
    let mut row = 0;
    for batch in batches {
        let times = batch
            .column_by_name(column)
            .and_then(|c| c.as_any().downcast_ref::<TimestampMicrosecondArray>());
        if let Some(times) = times {
            let rows = partitions.rows.get(row..).unwrap_or_default();
            for (value, &at) in times.iter().zip(rows) {
                let slot = &mut largest[at as usize];
                *slot = (*slot).max(value);
            }
        }
        row += batch.num_rows();
    }
    partitions
        .partitions
        .iter()
        .zip(largest)
        .filter_map(|(p, max)| max.filter(|_| p.behind))
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn declared(delay_ms: i64, idle: Option<i64>) -> Option<SourceWatermark> {
        Some(SourceWatermark {
            column: "ts".into(),
            delay_ms,
            idle_timeout_ms: idle,
        })
    }

    #[test]
    fn the_watermark_is_the_smallest_source_watermark_in_whole_milliseconds() {
        let mut t = Tracker::new(
            vec![
                ("a".into(), declared(1000, None)),
                ("b".into(), declared(0, None)),
                ("c".into(), None),
            ],
            0,
        );
        assert_eq!(t.global_at(0), None);
        t.observe(0, 1, Some(10_999_999), None, 0);
        // b has produced nothing yet: it holds the watermark (Spark: 0).
        assert_eq!(t.global_at(0), None);
        t.observe(1, 1, Some(5_000_500), None, 0);
        assert_eq!(t.global_at(0), Some(5_000));
        t.set_global(Some(5_000));
        t.observe(1, 1, Some(20_000_000), None, 0);
        // a: 10_999 ms - 1 s.
        assert_eq!(t.global_at(0), Some(9_999));
        // It never goes back, whatever a source says.
        t.set_global(Some(9_999));
        t.observe(0, 1, Some(1_000), None, 0);
        assert_eq!(t.global_at(0), Some(9_999));
    }

    #[test]
    fn a_partition_left_behind_holds_its_source_s_watermark_until_read_up() {
        let mut t = Tracker::new(vec![("a".into(), declared(1_000, None))], 0);
        // The batch read another partition up to 20 s, and one it left
        // records of unread up to 8 s: those records are not late.
        t.observe(0, 1, Some(20_000_000), Some(8_000_000), 0);
        assert_eq!(t.global_at(0), Some(7_000));
        // Read up to where it was planned: Spark's rule, the largest.
        t.observe(0, 1, Some(21_000_000), None, 0);
        assert_eq!(t.global_at(0), Some(20_000));
        // It never goes back.
        t.observe(0, 1, Some(22_000_000), Some(9_000_000), 0);
        assert_eq!(t.global_at(0), Some(20_000));
    }

    #[test]
    fn the_hold_is_the_smallest_largest_event_time_over_partitions_left_behind() {
        use datafusion::arrow::datatypes::{DataType, Field, Schema, TimeUnit};

        use crate::source::PartitionRead;
        let batch = |times: Vec<Option<i64>>| {
            RecordBatch::try_new(
                std::sync::Arc::new(Schema::new(vec![Field::new(
                    "ts",
                    DataType::Timestamp(TimeUnit::Microsecond, None),
                    true,
                )])),
                vec![std::sync::Arc::new(TimestampMicrosecondArray::from(times))],
            )
            .unwrap()
        };
        let read = |behind: [bool; 3]| RowPartitions {
            partitions: behind
                .iter()
                .enumerate()
                .map(|(i, &behind)| PartitionRead {
                    name: format!("t/{i}"),
                    behind,
                })
                .collect(),
            // Rows of partitions 0, 1 and 2 interleaved, over two batches.
            rows: vec![0, 1, 2, 0, 1, 2, 1],
        };
        let batches = [
            batch(vec![Some(50), Some(10), Some(70), Some(60), None]),
            batch(vec![Some(80), Some(30)]),
        ];
        // Partition 0's largest is 60, 1's 30, 2's 80.
        assert_eq!(
            behind_partitions_max("ts", &batches, &read([true, false, true])),
            Some(60)
        );
        assert_eq!(
            behind_partitions_max("ts", &batches, &read([true, true, true])),
            Some(30)
        );
        assert_eq!(
            behind_partitions_max("ts", &batches, &read([false, false, false])),
            None
        );
    }

    #[test]
    fn an_idle_source_stops_holding_the_watermark_back() {
        let mut t = Tracker::new(
            vec![
                ("busy".into(), declared(0, Some(1_000))),
                ("quiet".into(), declared(0, Some(1_000))),
            ],
            0,
        );
        t.observe(0, 1, Some(7_000_000), None, 500);
        assert_eq!(t.global_at(500), None);
        // quiet has had no rows since the run started at 0.
        assert_eq!(t.global_at(1_000), Some(7_000));
        t.set_global(Some(7_000));
        // Both idle: the watermark stays.
        assert_eq!(t.global_at(5_000), Some(7_000));
        let state = t.state().clone();
        let mut again = Tracker::new(
            vec![
                ("busy".into(), declared(0, Some(1_000))),
                ("quiet".into(), declared(0, Some(1_000))),
            ],
            9_000,
        );
        again.restore(state);
        assert_eq!(again.global(), Some(7_000));
    }
}
