//! Event-time windows as table functions in `FROM`, in the style of Flink's
//! windowing table-valued functions:
//!
//! ```sql
//! SELECT window_start, window_end, user_id, count(*) AS n
//! FROM hop(transactions, event_time, INTERVAL '1' MINUTE, INTERVAL '5' MINUTES)
//! GROUP BY window_start, window_end, user_id
//! ```
//!
//! `tumble(source, column, size)` and `hop(source, column, slide, size)`
//! give each row of `source` the columns `window_start` and `window_end` of
//! every window its event time falls in (one for tumble, `size / slide` for
//! hop), with Spark's window boundaries (aligned on the Unix epoch; a window
//! holds `start <= t < end`). `session(source, column, gap)` gives each row
//! the session `[t, t + gap)`, which the aggregation merges with the key's
//! overlapping sessions (`crate::stateful`). The SQL is rewritten to read a
//! table the engine fills with those rows each batch.

use std::ops::ControlFlow;
use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, TimestampMicrosecondArray, UInt32Array};
use datafusion::arrow::compute::take;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::sql::sqlparser::ast::{
    Expr as SqlExpr, FunctionArg, FunctionArgExpr, Ident, ObjectName, ObjectNamePart, TableFactor,
    Value, VisitMut, VisitorMut,
};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::parser::Parser;
use sluice_crds::duration::parse_duration;

use crate::{Error, Result};

/// The columns a window table function adds.
pub const WINDOW_START: &str = "window_start";
/// See [`WINDOW_START`].
pub const WINDOW_END: &str = "window_end";

/// One window table function of the query.
#[derive(Clone, Debug, PartialEq)]
pub struct WindowFunction {
    /// The table the rewritten SQL reads instead.
    pub table: String,
    /// The source it windows.
    pub source: String,
    /// The event-time column.
    pub column: String,
    /// How far apart windows start, in microseconds (the size for tumble).
    pub slide_micros: i64,
    /// How long a window is, in microseconds (for a session: the gap).
    pub size_micros: i64,
    /// A session window: each row starts a session `[t, t + gap)`, and
    /// the aggregation merges a key's overlapping sessions.
    pub session: bool,
}

impl WindowFunction {
    /// The windowed table's schema: the source's columns and the window's.
    pub fn schema(&self, source: &Schema) -> Result<SchemaRef> {
        match source.field_with_name(&self.column).map(|f| f.data_type()) {
            Ok(DataType::Timestamp(TimeUnit::Microsecond, _)) => {}
            Ok(other) => {
                return Err(Error::Unsupported {
                    path: "spec.query".into(),
                    message: format!(
                        "the window column {}.{} is {other}: windows need a timestamp column",
                        self.source, self.column
                    ),
                });
            }
            Err(_) => {
                return Err(Error::Unsupported {
                    path: "spec.query".into(),
                    message: format!(
                        "the source {} has no column {:?} to window on",
                        self.source, self.column
                    ),
                });
            }
        }
        let mut fields: Vec<Field> = source.fields().iter().map(|f| f.as_ref().clone()).collect();
        let ts = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
        fields.push(Field::new(WINDOW_START, ts.clone(), false));
        fields.push(Field::new(WINDOW_END, ts, false));
        Ok(Arc::new(Schema::new(fields)))
    }

    /// The windows of each row of `batch`, as rows of [`Self::schema`]. A
    /// (row, window) pair whose window ended at or before `watermark` is late
    /// and left out (Spark drops it the same way); returns how many were.
    pub fn expand(
        &self,
        batch: &RecordBatch,
        schema: &SchemaRef,
        watermark: Option<i64>,
    ) -> Result<(RecordBatch, u64)> {
        let times = batch
            .column_by_name(&self.column)
            .and_then(|c| c.as_any().downcast_ref::<TimestampMicrosecondArray>())
            .ok_or_else(|| Error::Plan(format!("no timestamp column {}", self.column)))?;
        let mut rows = Vec::new();
        let mut starts = Vec::new();
        let mut late = 0u64;
        for (row, t) in times.iter().enumerate() {
            // Spark's window() gives no window to a null event time.
            let Some(t) = t else { continue };
            // A session starts at the row's own time; a tumble or hop window
            // on the epoch-aligned grid.
            let last_start = if self.session {
                t
            } else {
                t - t.rem_euclid(self.slide_micros)
            };
            let mut start = last_start;
            while start + self.size_micros > t {
                if watermark.is_some_and(|w| start + self.size_micros <= w) {
                    late += 1;
                } else {
                    rows.push(row as u32);
                    starts.push(start);
                }
                start -= self.slide_micros;
            }
        }
        Ok((
            with_windows(batch, schema, rows, starts, self.size_micros)?,
            late,
        ))
    }
}

/// A hop window's grid cut into panes, as Flink's slicing windows and
/// Arroyo cut it: `pane` is the greatest common divisor of the size and the
/// slide, so every window is a run of whole panes and every row falls in
/// one pane. The state keeps one row per key and pane instead of one per
/// key and window (a 5-minute window sliding by 1 minute: one instead of
/// five), and a window is the merge of its panes when it is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Panes {
    /// The windows' size, in microseconds.
    pub size: i64,
    /// How far apart windows start.
    pub slide: i64,
    /// A pane's length.
    pub pane: i64,
}

impl Panes {
    /// The end of every window holding the pane that starts at
    /// `pane_start`, latest first.
    pub fn window_ends(&self, pane_start: i64) -> impl Iterator<Item = i64> + use<> {
        let Panes { size, slide, pane } = *self;
        let last_start = pane_start - pane_start.rem_euclid(slide);
        (0..)
            .map(move |k| last_start - k * slide)
            .take_while(move |start| start + size >= pane_start + pane)
            .map(move |start| start + size)
    }

    /// The start of every pane of the window ending at `end`.
    pub fn pane_starts(&self, end: i64) -> impl Iterator<Item = i64> + use<> {
        let Panes { size, pane, .. } = *self;
        (0..size / pane).map(move |k| end - size + k * pane)
    }

    /// With the watermark at `watermark`, every window holding a pane that
    /// ends at or before the returned time is closed: the state no longer
    /// needs those panes.
    pub fn needed_after(&self, watermark: i64) -> i64 {
        let first = watermark.saturating_sub(self.size);
        first - first.rem_euclid(self.slide) + self.slide
    }
}

/// Greatest common divisor.
fn gcd(a: i64, b: i64) -> i64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

impl WindowFunction {
    /// The panes of a hop window (one whose windows overlap); `None` for
    /// tumble and session windows, which copy no row.
    pub fn panes(&self) -> Option<Panes> {
        (!self.session && self.slide_micros < self.size_micros).then(|| Panes {
            size: self.size_micros,
            slide: self.slide_micros,
            pane: gcd(self.size_micros, self.slide_micros),
        })
    }

    /// Each row of `batch` once, with the pane its event time falls in as
    /// `window_start` and `window_end`: no column is copied when no row is
    /// dropped. A row whose every window ended at or before `watermark` is
    /// late and left out; returns how many (row, window) pairs were late,
    /// as [`Self::expand`] counts them (a row late for some of its windows
    /// stays: the others take it).
    pub fn expand_panes(
        &self,
        panes: Panes,
        batch: &RecordBatch,
        schema: &SchemaRef,
        watermark: Option<i64>,
    ) -> Result<(RecordBatch, u64)> {
        let times = batch
            .column_by_name(&self.column)
            .and_then(|c| c.as_any().downcast_ref::<TimestampMicrosecondArray>())
            .ok_or_else(|| Error::Plan(format!("no timestamp column {}", self.column)))?;
        let mut rows = Vec::with_capacity(batch.num_rows());
        let mut starts = Vec::with_capacity(batch.num_rows());
        let mut late = 0u64;
        for (row, t) in times.iter().enumerate() {
            let Some(t) = t else { continue };
            let start = t - t.rem_euclid(panes.pane);
            let (mut windows, mut late_windows) = (0u64, 0u64);
            for end in panes.window_ends(start) {
                windows += 1;
                if watermark.is_some_and(|w| end <= w) {
                    late_windows += 1;
                }
            }
            late += late_windows;
            if late_windows < windows {
                rows.push(row as u32);
                starts.push(start);
            }
        }
        Ok((with_windows(batch, schema, rows, starts, panes.pane)?, late))
    }
}

/// `batch`'s rows at `rows`, each with a `window_start` of `starts` and a
/// `window_end` `width` later appended, in `schema`. The columns are not
/// copied when `rows` is every row in order.
fn with_windows(
    batch: &RecordBatch,
    schema: &SchemaRef,
    rows: Vec<u32>,
    starts: Vec<i64>,
    width: i64,
) -> Result<RecordBatch> {
    let every_row =
        rows.len() == batch.num_rows() && rows.iter().enumerate().all(|(i, r)| *r as usize == i);
    let mut columns: Vec<ArrayRef> = if every_row {
        batch.columns().to_vec()
    } else {
        let indices = UInt32Array::from(rows);
        batch
            .columns()
            .iter()
            .map(|c| take(c.as_ref(), &indices, None))
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| Error::Plan(e.to_string()))?
    };
    let ends: Vec<i64> = starts.iter().map(|s| s + width).collect();
    columns.push(Arc::new(
        TimestampMicrosecondArray::from(starts).with_timezone("UTC"),
    ));
    columns.push(Arc::new(
        TimestampMicrosecondArray::from(ends).with_timezone("UTC"),
    ));
    RecordBatch::try_new(schema.clone(), columns).map_err(|e| Error::Plan(e.to_string()))
}

/// Finds the window table functions in `sql` and rewrites them into reads
/// of the tables the engine fills; returns the SQL to plan and the windows.
pub fn rewrite(sql: &str, sources: &[String]) -> Result<(String, Vec<WindowFunction>)> {
    let mut statements = Parser::parse_sql(&GenericDialect {}, sql)
        .map_err(|e| Error::Plan(format!("is not valid SQL: {e}")))?;
    let mut finder = Finder {
        sources,
        windows: Vec::new(),
        error: None,
    };
    for statement in &mut statements {
        let _ = statement.visit(&mut finder);
    }
    if let Some(message) = finder.error {
        return Err(Error::Unsupported {
            path: "spec.query".into(),
            message,
        });
    }
    if finder.windows.is_empty() {
        return Ok((sql.to_owned(), Vec::new()));
    }
    let text = statements
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(";\n");
    Ok((text, finder.windows))
}

struct Finder<'a> {
    sources: &'a [String],
    windows: Vec<WindowFunction>,
    error: Option<String>,
}

impl VisitorMut for Finder<'_> {
    type Break = ();

    fn pre_visit_table_factor(&mut self, factor: &mut TableFactor) -> ControlFlow<()> {
        let TableFactor::Table {
            name,
            args: Some(args),
            ..
        } = factor
        else {
            return ControlFlow::Continue(());
        };
        let function = name.to_string().to_ascii_lowercase();
        let table = format!("__sluice_window_{}", self.windows.len());
        let parsed = match function.as_str() {
            "tumble" | "hop" | "session" => {
                parse_window(&function, &args.args, self.sources, table.clone())
            }
            _ => return ControlFlow::Continue(()),
        };
        match parsed {
            Ok(window) => {
                *name = ObjectName(vec![ObjectNamePart::Identifier(Ident::new(table))]);
                if let TableFactor::Table { args, .. } = factor {
                    *args = None;
                }
                self.windows.push(window);
                ControlFlow::Continue(())
            }
            Err(message) => {
                self.error = Some(message);
                ControlFlow::Break(())
            }
        }
    }
}

fn parse_window(
    function: &str,
    args: &[FunctionArg],
    sources: &[String],
    table: String,
) -> std::result::Result<WindowFunction, String> {
    let usage = match function {
        "tumble" => "tumble(source, time_column, size)",
        "hop" => "hop(source, time_column, slide, size)",
        _ => "session(source, time_column, gap)",
    };
    let exprs: Vec<&SqlExpr> = args
        .iter()
        .filter_map(|a| match a {
            FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => Some(e),
            _ => None,
        })
        .collect();
    let expected = if function == "hop" { 4 } else { 3 };
    if exprs.len() != expected || args.len() != expected {
        return Err(format!("{function}() takes {expected} arguments: {usage}"));
    }
    let ident = |e: &SqlExpr| match e {
        SqlExpr::Identifier(i) => Some(i.value.to_ascii_lowercase()),
        _ => None,
    };
    let source = ident(exprs[0])
        .filter(|s| sources.contains(s))
        .ok_or_else(|| {
            format!(
                "{function}(): the first argument must name a source ({}): {usage}",
                sources.join(", ")
            )
        })?;
    let column = ident(exprs[1])
        .ok_or_else(|| format!("{function}(): the second argument must name a column: {usage}"))?;
    let durations: Vec<i64> = exprs[2..]
        .iter()
        .map(|e| interval_micros(e).map_err(|why| format!("{function}(): {why}: {usage}")))
        .collect::<std::result::Result<_, _>>()?;
    let (slide, size) = match durations.as_slice() {
        [size] => (*size, *size),
        [slide, size] => (*slide, *size),
        _ => unreachable!("argument count checked"),
    };
    if slide <= 0 || size <= 0 {
        return Err(format!("{function}(): sizes must be positive: {usage}"));
    }
    if slide > size {
        return Err(format!(
            "hop(): the slide ({slide} µs) is longer than the size ({size} µs), so rows between windows would be lost: {usage}"
        ));
    }
    Ok(WindowFunction {
        table,
        source,
        column,
        slide_micros: slide,
        size_micros: size,
        session: function == "session",
    })
}

/// A window length: `INTERVAL '5' MINUTE`, `INTERVAL '5 minutes'` or a
/// string such as `'5m'` or `'5 minutes'` (as Spark's window()).
fn interval_micros(expr: &SqlExpr) -> std::result::Result<i64, String> {
    let (text, unit) = match expr {
        SqlExpr::Interval(interval) => {
            let text = match interval.value.as_ref() {
                SqlExpr::Value(v) => match &v.value {
                    Value::SingleQuotedString(s) | Value::Number(s, _) => s.clone(),
                    other => other.to_string(),
                },
                other => other.to_string(),
            };
            (text, interval.leading_field.as_ref().map(|f| f.to_string()))
        }
        SqlExpr::Value(v) => match &v.value {
            Value::SingleQuotedString(s) => (s.clone(), None),
            _ => return Err(format!("{expr} is not an interval")),
        },
        _ => return Err(format!("{expr} is not an interval")),
    };
    let text = match unit {
        Some(unit) => format!("{} {unit}", text.trim()),
        None => text,
    };
    parse_length(&text).ok_or_else(|| {
        format!("{expr} is not a length of time such as INTERVAL '5' MINUTE or '5 minutes'")
    })
}

fn parse_length(text: &str) -> Option<i64> {
    if let Ok(d) = parse_duration(text.trim()) {
        return i64::try_from(d.as_micros()).ok();
    }
    let mut words = text.split_whitespace();
    let number: i64 = words.next()?.parse().ok()?;
    let unit = words.next()?.to_ascii_lowercase();
    if words.next().is_some() {
        return None;
    }
    let micros = match unit.trim_end_matches('s') {
        "millisecond" => 1_000,
        "second" => 1_000_000,
        "minute" => 60_000_000,
        "hour" => 3_600_000_000,
        "day" => 86_400_000_000,
        _ => return None,
    };
    number.checked_mul(micros)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources() -> Vec<String> {
        vec!["transactions".into()]
    }

    #[test]
    fn hop_and_tumble_are_rewritten_into_window_tables() {
        let (sql, windows) = rewrite(
            "SELECT window_start, count(*) FROM hop(transactions, event_time, INTERVAL '1' MINUTE, INTERVAL '5 minutes') GROUP BY window_start",
            &sources(),
        )
        .unwrap();
        assert_eq!(
            sql,
            "SELECT window_start, count(*) FROM __sluice_window_0 GROUP BY window_start"
        );
        assert_eq!(
            windows,
            [WindowFunction {
                table: "__sluice_window_0".into(),
                source: "transactions".into(),
                column: "event_time".into(),
                slide_micros: 60_000_000,
                size_micros: 300_000_000,
                session: false,
            }]
        );
        let (_, windows) = rewrite(
            "SELECT * FROM tumble(transactions, event_time, '10s') AS t",
            &sources(),
        )
        .unwrap();
        assert_eq!(
            (windows[0].slide_micros, windows[0].size_micros),
            (10_000_000, 10_000_000)
        );
    }

    #[test]
    fn mistakes_in_window_functions_are_named() {
        for (sql, expected) in [
            (
                "SELECT * FROM hop(payments, ts, '1m', '5m')",
                "must name a source",
            ),
            (
                "SELECT * FROM hop(transactions, ts, '5m')",
                "takes 4 arguments",
            ),
            (
                "SELECT * FROM hop(transactions, ts, '10m', '5m')",
                "longer than the size",
            ),
            (
                "SELECT * FROM tumble(transactions, ts, 'soon')",
                "not a length of time",
            ),
            (
                "SELECT * FROM session(transactions, ts)",
                "takes 3 arguments",
            ),
        ] {
            let err = rewrite(sql, &sources()).unwrap_err().to_string();
            assert!(
                err.starts_with("spec.query: ") && err.contains(expected),
                "{sql}: {err}"
            );
        }
    }

    #[test]
    fn each_row_gets_every_window_it_falls_in_and_late_pairs_are_dropped() {
        let source = Arc::new(Schema::new(vec![Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Microsecond, None),
            true,
        )]));
        let w = WindowFunction {
            table: "w".into(),
            source: "s".into(),
            column: "ts".into(),
            slide_micros: 60,
            size_micros: 180,
            session: false,
        };
        let schema = w.schema(&source).unwrap();
        let batch = RecordBatch::try_new(
            source,
            vec![Arc::new(TimestampMicrosecondArray::from(vec![
                Some(130),
                None,
                Some(-10),
            ]))],
        )
        .unwrap();
        let (out, late) = w.expand(&batch, &schema, None).unwrap();
        assert_eq!(late, 0);
        let col = |i: usize| {
            out.column(i)
                .as_any()
                .downcast_ref::<TimestampMicrosecondArray>()
                .unwrap()
                .values()
                .to_vec()
        };
        assert_eq!(col(0), [130, 130, 130, -10, -10, -10]);
        assert_eq!(col(1), [120, 60, 0, -60, -120, -180]);
        assert_eq!(col(2), [300, 240, 180, 120, 60, 0]);
        // With the watermark at 120, windows ending at or before it are late.
        let (out, late) = w.expand(&batch, &schema, Some(120)).unwrap();
        assert_eq!((out.num_rows(), late), (3, 3));
    }

    #[test]
    fn a_hop_window_is_a_run_of_panes_and_each_row_falls_in_one() {
        let w = |slide, size| WindowFunction {
            table: "w".into(),
            source: "s".into(),
            column: "ts".into(),
            slide_micros: slide,
            size_micros: size,
            session: false,
        };
        assert_eq!(w(60, 60).panes(), None);
        let panes = w(40, 100).panes().unwrap();
        assert_eq!(panes.pane, 20);
        // Every window holding a pane holds all of it, and every pane of a
        // window lists that window among its own.
        for start in (-200..200).step_by(20) {
            for end in panes.window_ends(start) {
                assert!(end - 100 <= start && start + 20 <= end, "{start} {end}");
                assert_eq!(end.rem_euclid(40), 100 % 40);
                assert!(panes.pane_starts(end).any(|s| s == start));
            }
            // As many windows as the naive expansion gives a row in it.
            let naive = (start..start + 20)
                .map(|t| {
                    let mut n = 0;
                    let mut s = t - t.rem_euclid(40);
                    while s + 100 > t {
                        n += 1;
                        s -= 40;
                    }
                    n
                })
                .max()
                .unwrap();
            assert!(panes.window_ends(start).count() <= naive);
        }
        // Watermark 250: windows end at 20 + 40k; those ending at or before
        // 250 are closed; the pane [160, 180) is in the window [160, 260).
        assert_eq!(panes.needed_after(250), 160);
        assert!(panes.window_ends(140).all(|end| end <= 250));
        assert!(panes.window_ends(160).any(|end| end > 250));

        let source = Arc::new(Schema::new(vec![Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Microsecond, None),
            true,
        )]));
        let f = w(60, 180);
        let schema = f.schema(&source).unwrap();
        let batch = RecordBatch::try_new(
            source,
            vec![Arc::new(TimestampMicrosecondArray::from(vec![
                Some(130),
                None,
                Some(-10),
            ]))],
        )
        .unwrap();
        let panes = f.panes().unwrap();
        let (out, late) = f.expand_panes(panes, &batch, &schema, None).unwrap();
        assert_eq!((out.num_rows(), late), (2, 0));
        // Watermark 120: -10's windows all ended by then (3 late pairs, as
        // the naive expansion counts them); 130's are open.
        let (out, late) = f.expand_panes(panes, &batch, &schema, Some(120)).unwrap();
        assert_eq!((out.num_rows(), late), (1, 3));
        // Watermark 200: 130's window [0, 180) is closed, [60, 240) and
        // [120, 300) take it.
        let (out, late) = f.expand_panes(panes, &batch, &schema, Some(200)).unwrap();
        assert_eq!((out.num_rows(), late), (1, 4));
        let starts = out
            .column(1)
            .as_any()
            .downcast_ref::<TimestampMicrosecondArray>()
            .unwrap()
            .values()
            .to_vec();
        assert_eq!(starts, [120]);
    }
}
