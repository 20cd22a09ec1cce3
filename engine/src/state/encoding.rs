//! The encoding of state rows, `sluice-row/1`: Sluice's own, specified here,
//! so that a checkpoint written by one release is read by the next whatever
//! Arrow does to its row format (which promises nothing across versions).
//!
//! A row is its columns, one after the other; a column value is a flag byte
//! (0 null, 1 present) and, when present:
//!
//! - fixed-width types (integers, floats, dates, times, timestamps,
//!   durations, intervals, decimals): their bytes, little-endian;
//! - booleans: one byte;
//! - strings and binaries: a LEB128 length, then the bytes;
//! - fixed-size binaries: their bytes;
//! - lists: a LEB128 element count; the elements follow as a column of
//!   their own (see below);
//! - structs: nothing more; the fields follow as columns of their own (a
//!   null struct's fields are written too).
//!
//! Nested values are laid out column by column within the row: a list of
//! structs `[{a, b}, {a, b}]` is written as the list's count, then both `a`
//! values, then both `b` values. Encoding and decoding walk the same tree of
//! columns in the same order, which is what makes this work for any nesting.
//!
//! Keys are encoded the same way with floats made canonical (`-0.0` as
//! `0.0`, one NaN), so that equal groups have equal keys, as Spark
//! normalizes floating-point grouping keys.
//!
//! The state schema (column names and [`type_name`]s) is kept with every
//! state version; a restart compares it with the query's and refuses a
//! change, naming the column ([`compare`]).

use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, ArrowPrimitiveType, AsArray, BinaryBuilder, BinaryViewBuilder,
    BooleanBufferBuilder, BooleanBuilder, FixedSizeBinaryBuilder, GenericListArray,
    LargeBinaryBuilder, LargeStringBuilder, NullArray, OffsetSizeTrait, PrimitiveArray,
    StringBuilder, StringViewBuilder, StructArray, UInt32Array,
};
use datafusion::arrow::buffer::{MutableBuffer, NullBuffer, OffsetBuffer, ScalarBuffer};
use datafusion::arrow::compute::take;
use datafusion::arrow::datatypes::*;
use serde::{Deserialize, Serialize};

#[cfg(target_endian = "big")]
compile_error!(
    "sluice-row/1 stores fixed-width values in little-endian byte order, the native order of every platform Sluice builds for"
);

/// The encoding's name, kept in each state manifest.
pub const ENCODING: &str = "sluice-row/1";

/// One column of a state schema, as kept in a manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColumnSchema {
    /// The column's name.
    pub name: String,
    /// Its type ([`type_name`]).
    #[serde(rename = "type")]
    pub data_type: String,
}

/// The schema of an operator's state: its keys' columns and its values'.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateSchema {
    /// The columns a key is made of (the grouping columns).
    pub keys: Vec<ColumnSchema>,
    /// The columns a value is made of (the groups' values and aggregate
    /// states).
    pub values: Vec<ColumnSchema>,
}

impl StateSchema {
    /// The schema of `keys` and `values` fields.
    pub fn new(keys: &[FieldRef], values: &[FieldRef]) -> Result<Self, String> {
        let columns = |fields: &[FieldRef]| -> Result<Vec<ColumnSchema>, String> {
            fields
                .iter()
                .map(|f| {
                    Ok(ColumnSchema {
                        name: f.name().clone(),
                        data_type: type_name(f.data_type()).map_err(|why| {
                            format!("the state column {:?} {why}", display_name(f.name()))
                        })?,
                    })
                })
                .collect()
        };
        Ok(Self {
            keys: columns(keys)?,
            values: columns(values)?,
        })
    }
}

/// A column name as the user wrote it: without the engine's internal table
/// names (`__sluice_window_0.amount` is `amount`).
pub fn display_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut rest = name;
    while let Some(i) = rest.find("__sluice_window_") {
        out.push_str(&rest[..i]);
        let after = &rest[i + "__sluice_window_".len()..];
        let digits = after
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(after.len());
        rest = after[digits..]
            .strip_prefix('.')
            .unwrap_or(&after[digits..]);
    }
    out.push_str(rest);
    out
}

/// Compares the stored state schema with the one the query keeps now;
/// `None` when the stored state can be read by it, else why not, naming
/// the columns that changed.
pub fn compare(stored: &StateSchema, now: &StateSchema) -> Option<String> {
    let describe = |label: &str, old: &[ColumnSchema], new: &[ColumnSchema]| -> Option<String> {
        let mut problems = Vec::new();
        for column in new {
            match old.iter().find(|c| c.name == column.name) {
                None => problems.push(format!(
                    "{label} {:?} is new (the stored state has no value for it)",
                    display_name(&column.name)
                )),
                Some(o) if !same_family(&o.data_type, &column.data_type) => problems.push(format!(
                    "{label} {:?} was {} and is now {}",
                    display_name(&column.name),
                    o.data_type,
                    column.data_type
                )),
                Some(_) => {}
            }
        }
        for column in old {
            if !new.iter().any(|c| c.name == column.name) {
                problems.push(format!("{label} {:?} is gone", display_name(&column.name)));
            }
        }
        if problems.is_empty() {
            let names =
                |cols: &[ColumnSchema]| cols.iter().map(|c| c.name.clone()).collect::<Vec<_>>();
            if names(old) != names(new) {
                return Some(format!("the {label}s are in another order"));
            }
            return None;
        }
        Some(problems.join("; "))
    };
    let keys = describe("key column", &stored.keys, &now.keys);
    let values = describe("state column", &stored.values, &now.values);
    match (keys, values) {
        (None, None) => None,
        (Some(k), None) => Some(k),
        (None, Some(v)) => Some(v),
        (Some(k), Some(v)) => Some(format!("{k}; {v}")),
    }
}

/// Whether two type names hold the same values (strings stored as `utf8`,
/// `large_utf8` or `utf8_view` are one family, as are binaries).
fn same_family(a: &str, b: &str) -> bool {
    let family = |t: &str| -> String {
        t.replace("large_utf8", "utf8")
            .replace("utf8_view", "utf8")
            .replace("large_binary", "binary")
            .replace("binary_view", "binary")
            .replace("large_list", "list")
    };
    family(a) == family(b)
}

/// A type's name in state schemas, stable across releases: `int64`,
/// `timestamp[us, UTC]`, `list<float64>`, `struct<a: int64, b: utf8>`.
/// Types the encoding does not handle are an error.
pub fn type_name(data_type: &DataType) -> Result<String, String> {
    let unit = |u: &TimeUnit| match u {
        TimeUnit::Second => "s",
        TimeUnit::Millisecond => "ms",
        TimeUnit::Microsecond => "us",
        TimeUnit::Nanosecond => "ns",
    };
    Ok(match data_type {
        DataType::Null => "null".into(),
        DataType::Boolean => "boolean".into(),
        DataType::Int8 => "int8".into(),
        DataType::Int16 => "int16".into(),
        DataType::Int32 => "int32".into(),
        DataType::Int64 => "int64".into(),
        DataType::UInt8 => "uint8".into(),
        DataType::UInt16 => "uint16".into(),
        DataType::UInt32 => "uint32".into(),
        DataType::UInt64 => "uint64".into(),
        DataType::Float16 => "float16".into(),
        DataType::Float32 => "float32".into(),
        DataType::Float64 => "float64".into(),
        DataType::Utf8 => "utf8".into(),
        DataType::LargeUtf8 => "large_utf8".into(),
        DataType::Utf8View => "utf8_view".into(),
        DataType::Binary => "binary".into(),
        DataType::LargeBinary => "large_binary".into(),
        DataType::BinaryView => "binary_view".into(),
        DataType::FixedSizeBinary(n) => format!("fixed_size_binary[{n}]"),
        DataType::Date32 => "date32".into(),
        DataType::Date64 => "date64".into(),
        DataType::Time32(u) => format!("time32[{}]", unit(u)),
        DataType::Time64(u) => format!("time64[{}]", unit(u)),
        DataType::Timestamp(u, tz) => match tz {
            Some(tz) => format!("timestamp[{}, {tz}]", unit(u)),
            None => format!("timestamp[{}]", unit(u)),
        },
        DataType::Duration(u) => format!("duration[{}]", unit(u)),
        DataType::Interval(IntervalUnit::YearMonth) => "interval[year_month]".into(),
        DataType::Interval(IntervalUnit::DayTime) => "interval[day_time]".into(),
        DataType::Interval(IntervalUnit::MonthDayNano) => "interval[month_day_nano]".into(),
        DataType::Decimal128(p, s) => format!("decimal128({p}, {s})"),
        DataType::Decimal256(p, s) => format!("decimal256({p}, {s})"),
        DataType::List(f) => format!("list<{}>", type_name(f.data_type())?),
        DataType::LargeList(f) => format!("large_list<{}>", type_name(f.data_type())?),
        DataType::Struct(fields) => {
            let inner = fields
                .iter()
                .map(|f| Ok(format!("{}: {}", f.name(), type_name(f.data_type())?)))
                .collect::<Result<Vec<_>, String>>()?;
            format!("struct<{}>", inner.join(", "))
        }
        other => {
            return Err(format!(
                "has the type {other}, which the state store cannot keep"
            ));
        }
    })
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// Encodes the rows of `columns` (all of one length): one buffer per row.
/// `canonical` makes floats canonical (for keys).
pub fn encode(columns: &[ArrayRef], canonical: bool) -> Result<Vec<Vec<u8>>, String> {
    let rows = columns.first().map_or(0, |c| c.len());
    let mut out = vec![Vec::new(); rows];
    let slots: Vec<usize> = (0..rows).collect();
    for column in columns {
        encode_column(column.as_ref(), &slots, &mut out, canonical)?;
    }
    Ok(out)
}

fn flag(out: &mut Vec<u8>, valid: bool) -> bool {
    out.push(u8::from(valid));
    valid
}

fn encode_primitive<T: ArrowPrimitiveType>(
    array: &dyn Array,
    slots: &[usize],
    out: &mut [Vec<u8>],
    canon: impl Fn(T::Native) -> T::Native,
) {
    let array = array.as_primitive::<T>();
    for (i, &slot) in slots.iter().enumerate() {
        if flag(&mut out[slot], array.is_valid(i)) {
            let value = canon(array.value(i));
            out[slot].extend_from_slice(value.to_byte_slice());
        }
    }
}

fn encode_bytes<'a>(
    values: impl Iterator<Item = Option<&'a [u8]>>,
    slots: &[usize],
    out: &mut [Vec<u8>],
) {
    for (value, &slot) in values.zip(slots) {
        if flag(&mut out[slot], value.is_some())
            && let Some(bytes) = value
        {
            put_varint(&mut out[slot], bytes.len() as u64);
            out[slot].extend_from_slice(bytes);
        }
    }
}

fn encode_list<O: OffsetSizeTrait>(
    array: &dyn Array,
    slots: &[usize],
    out: &mut [Vec<u8>],
    canonical: bool,
) -> Result<(), String> {
    let list = array.as_list::<O>();
    let mut child_rows: Vec<u32> = Vec::new();
    let mut child_slots = Vec::new();
    for (i, &slot) in slots.iter().enumerate() {
        if flag(&mut out[slot], list.is_valid(i)) {
            let (start, end) = (
                list.value_offsets()[i].as_usize(),
                list.value_offsets()[i + 1].as_usize(),
            );
            put_varint(&mut out[slot], (end - start) as u64);
            for j in start..end {
                child_rows.push(j as u32);
                child_slots.push(slot);
            }
        }
    }
    let values = take(list.values().as_ref(), &UInt32Array::from(child_rows), None)
        .map_err(|e| e.to_string())?;
    encode_column(values.as_ref(), &child_slots, out, canonical)
}

fn encode_column(
    array: &dyn Array,
    slots: &[usize],
    out: &mut [Vec<u8>],
    canonical: bool,
) -> Result<(), String> {
    macro_rules! primitive {
        ($t:ty) => {
            encode_primitive::<$t>(array, slots, out, |v| v)
        };
    }
    match array.data_type() {
        DataType::Null => {}
        DataType::Boolean => {
            let a = array.as_boolean();
            for (i, &slot) in slots.iter().enumerate() {
                if flag(&mut out[slot], a.is_valid(i)) {
                    out[slot].push(u8::from(a.value(i)));
                }
            }
        }
        DataType::Int8 => primitive!(Int8Type),
        DataType::Int16 => primitive!(Int16Type),
        DataType::Int32 => primitive!(Int32Type),
        DataType::Int64 => primitive!(Int64Type),
        DataType::UInt8 => primitive!(UInt8Type),
        DataType::UInt16 => primitive!(UInt16Type),
        DataType::UInt32 => primitive!(UInt32Type),
        DataType::UInt64 => primitive!(UInt64Type),
        DataType::Float16 => primitive!(Float16Type),
        DataType::Float32 => encode_primitive::<Float32Type>(array, slots, out, |v| {
            if !canonical {
                v
            } else if v.is_nan() {
                f32::NAN
            } else if v == 0.0 {
                0.0
            } else {
                v
            }
        }),
        DataType::Float64 => encode_primitive::<Float64Type>(array, slots, out, |v| {
            if !canonical {
                v
            } else if v.is_nan() {
                f64::NAN
            } else if v == 0.0 {
                0.0
            } else {
                v
            }
        }),
        DataType::Date32 => primitive!(Date32Type),
        DataType::Date64 => primitive!(Date64Type),
        DataType::Time32(TimeUnit::Second) => primitive!(Time32SecondType),
        DataType::Time32(_) => primitive!(Time32MillisecondType),
        DataType::Time64(TimeUnit::Microsecond) => primitive!(Time64MicrosecondType),
        DataType::Time64(_) => primitive!(Time64NanosecondType),
        DataType::Timestamp(TimeUnit::Second, _) => primitive!(TimestampSecondType),
        DataType::Timestamp(TimeUnit::Millisecond, _) => primitive!(TimestampMillisecondType),
        DataType::Timestamp(TimeUnit::Microsecond, _) => primitive!(TimestampMicrosecondType),
        DataType::Timestamp(TimeUnit::Nanosecond, _) => primitive!(TimestampNanosecondType),
        DataType::Duration(TimeUnit::Second) => primitive!(DurationSecondType),
        DataType::Duration(TimeUnit::Millisecond) => primitive!(DurationMillisecondType),
        DataType::Duration(TimeUnit::Microsecond) => primitive!(DurationMicrosecondType),
        DataType::Duration(TimeUnit::Nanosecond) => primitive!(DurationNanosecondType),
        DataType::Interval(IntervalUnit::YearMonth) => primitive!(IntervalYearMonthType),
        DataType::Interval(IntervalUnit::DayTime) => primitive!(IntervalDayTimeType),
        DataType::Interval(IntervalUnit::MonthDayNano) => primitive!(IntervalMonthDayNanoType),
        DataType::Decimal128(_, _) => primitive!(Decimal128Type),
        DataType::Decimal256(_, _) => primitive!(Decimal256Type),
        DataType::Utf8 => encode_bytes(
            array
                .as_string::<i32>()
                .iter()
                .map(|v| v.map(str::as_bytes)),
            slots,
            out,
        ),
        DataType::LargeUtf8 => encode_bytes(
            array
                .as_string::<i64>()
                .iter()
                .map(|v| v.map(str::as_bytes)),
            slots,
            out,
        ),
        DataType::Utf8View => encode_bytes(
            array.as_string_view().iter().map(|v| v.map(str::as_bytes)),
            slots,
            out,
        ),
        DataType::Binary => encode_bytes(array.as_binary::<i32>().iter(), slots, out),
        DataType::LargeBinary => encode_bytes(array.as_binary::<i64>().iter(), slots, out),
        DataType::BinaryView => encode_bytes(array.as_binary_view().iter(), slots, out),
        DataType::FixedSizeBinary(_) => {
            let a = array.as_fixed_size_binary();
            for (i, &slot) in slots.iter().enumerate() {
                if flag(&mut out[slot], a.is_valid(i)) {
                    out[slot].extend_from_slice(a.value(i));
                }
            }
        }
        DataType::List(_) => encode_list::<i32>(array, slots, out, canonical)?,
        DataType::LargeList(_) => encode_list::<i64>(array, slots, out, canonical)?,
        DataType::Struct(_) => {
            let a = array.as_struct();
            for (i, &slot) in slots.iter().enumerate() {
                flag(&mut out[slot], a.is_valid(i));
            }
            for child in a.columns() {
                encode_column(child.as_ref(), slots, out, canonical)?;
            }
        }
        other => {
            return Err(format!(
                "the state store cannot keep values of type {other}"
            ));
        }
    }
    Ok(())
}

/// Reads rows back, each from its own position.
struct Reader<'a> {
    rows: &'a [&'a [u8]],
    positions: Vec<usize>,
}

impl<'a> Reader<'a> {
    fn take(&mut self, slot: usize, n: usize) -> Result<&'a [u8], String> {
        let row = self.rows[slot];
        let at = self.positions[slot];
        let bytes = row.get(at..at + n).ok_or_else(|| {
            format!(
                "a state row ends early ({} bytes, reading {n} at {at})",
                row.len()
            )
        })?;
        self.positions[slot] += n;
        Ok(bytes)
    }

    fn flag(&mut self, slot: usize) -> Result<bool, String> {
        match self.take(slot, 1)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(format!(
                "a state row holds {other} where a null flag belongs"
            )),
        }
    }

    fn varint(&mut self, slot: usize) -> Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.take(slot, 1)?[0];
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("a state row holds a length longer than 64 bits".into())
    }
}

/// Decodes rows encoded by [`encode`] into columns of `fields`.
pub fn decode(fields: &[FieldRef], rows: &[&[u8]]) -> Result<Vec<ArrayRef>, String> {
    let mut reader = Reader {
        rows,
        positions: vec![0; rows.len()],
    };
    let slots: Vec<usize> = (0..rows.len()).collect();
    let columns = fields
        .iter()
        .map(|f| decode_column(f.data_type(), &slots, &mut reader))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(slot) = (0..rows.len()).find(|&s| reader.positions[s] != rows[s].len()) {
        return Err(format!(
            "a state row holds {} bytes more than its columns: it was written for other columns",
            rows[slot].len() - reader.positions[slot]
        ));
    }
    Ok(columns)
}

fn decode_primitive<T: ArrowPrimitiveType>(
    data_type: &DataType,
    slots: &[usize],
    reader: &mut Reader<'_>,
) -> Result<ArrayRef, String> {
    let width = std::mem::size_of::<T::Native>();
    let mut values = MutableBuffer::new(slots.len() * width);
    let mut nulls = BooleanBufferBuilder::new(slots.len());
    for &slot in slots {
        if reader.flag(slot)? {
            values.extend_from_slice(reader.take(slot, width)?);
            nulls.append(true);
        } else {
            values.extend_zeros(width);
            nulls.append(false);
        }
    }
    let values = ScalarBuffer::<T::Native>::new(values.into(), 0, slots.len());
    let array = PrimitiveArray::<T>::try_new(values, Some(NullBuffer::new(nulls.finish())))
        .map_err(|e| e.to_string())?
        .with_data_type(data_type.clone());
    Ok(Arc::new(array))
}

fn decode_list<O: OffsetSizeTrait>(
    field: &FieldRef,
    slots: &[usize],
    reader: &mut Reader<'_>,
) -> Result<ArrayRef, String> {
    let mut offsets: Vec<O> = Vec::with_capacity(slots.len() + 1);
    offsets.push(O::usize_as(0));
    let mut nulls = BooleanBufferBuilder::new(slots.len());
    let mut child_slots = Vec::new();
    let mut total = 0usize;
    for &slot in slots {
        if reader.flag(slot)? {
            let n = reader.varint(slot)? as usize;
            child_slots.extend(std::iter::repeat_n(slot, n));
            total += n;
            nulls.append(true);
        } else {
            nulls.append(false);
        }
        offsets.push(O::usize_as(total));
    }
    let values = decode_column(field.data_type(), &child_slots, reader)?;
    let list = GenericListArray::<O>::try_new(
        field.clone(),
        OffsetBuffer::new(ScalarBuffer::from(offsets)),
        values,
        Some(NullBuffer::new(nulls.finish())),
    )
    .map_err(|e| e.to_string())?;
    Ok(Arc::new(list))
}

fn decode_column(
    data_type: &DataType,
    slots: &[usize],
    reader: &mut Reader<'_>,
) -> Result<ArrayRef, String> {
    macro_rules! primitive {
        ($t:ty) => {
            decode_primitive::<$t>(data_type, slots, reader)
        };
    }
    macro_rules! bytes {
        ($builder:expr, $convert:expr) => {{
            let mut builder = $builder;
            for &slot in slots {
                if reader.flag(slot)? {
                    let n = reader.varint(slot)? as usize;
                    let bytes = reader.take(slot, n)?;
                    builder.append_value($convert(bytes)?);
                } else {
                    builder.append_null();
                }
            }
            Ok(Arc::new(builder.finish()) as ArrayRef)
        }};
    }
    let text = |b: &[u8]| -> Result<String, String> {
        String::from_utf8(b.to_vec())
            .map_err(|_| "a state row holds text that is not UTF-8".to_owned())
    };
    let raw = |b: &[u8]| -> Result<Vec<u8>, String> { Ok(b.to_vec()) };
    match data_type {
        DataType::Null => Ok(Arc::new(NullArray::new(slots.len()))),
        DataType::Boolean => {
            let mut builder = BooleanBuilder::with_capacity(slots.len());
            for &slot in slots {
                if reader.flag(slot)? {
                    builder.append_value(reader.take(slot, 1)?[0] != 0);
                } else {
                    builder.append_null();
                }
            }
            Ok(Arc::new(builder.finish()))
        }
        DataType::Int8 => primitive!(Int8Type),
        DataType::Int16 => primitive!(Int16Type),
        DataType::Int32 => primitive!(Int32Type),
        DataType::Int64 => primitive!(Int64Type),
        DataType::UInt8 => primitive!(UInt8Type),
        DataType::UInt16 => primitive!(UInt16Type),
        DataType::UInt32 => primitive!(UInt32Type),
        DataType::UInt64 => primitive!(UInt64Type),
        DataType::Float16 => primitive!(Float16Type),
        DataType::Float32 => primitive!(Float32Type),
        DataType::Float64 => primitive!(Float64Type),
        DataType::Date32 => primitive!(Date32Type),
        DataType::Date64 => primitive!(Date64Type),
        DataType::Time32(TimeUnit::Second) => primitive!(Time32SecondType),
        DataType::Time32(_) => primitive!(Time32MillisecondType),
        DataType::Time64(TimeUnit::Microsecond) => primitive!(Time64MicrosecondType),
        DataType::Time64(_) => primitive!(Time64NanosecondType),
        DataType::Timestamp(TimeUnit::Second, _) => primitive!(TimestampSecondType),
        DataType::Timestamp(TimeUnit::Millisecond, _) => primitive!(TimestampMillisecondType),
        DataType::Timestamp(TimeUnit::Microsecond, _) => primitive!(TimestampMicrosecondType),
        DataType::Timestamp(TimeUnit::Nanosecond, _) => primitive!(TimestampNanosecondType),
        DataType::Duration(TimeUnit::Second) => primitive!(DurationSecondType),
        DataType::Duration(TimeUnit::Millisecond) => primitive!(DurationMillisecondType),
        DataType::Duration(TimeUnit::Microsecond) => primitive!(DurationMicrosecondType),
        DataType::Duration(TimeUnit::Nanosecond) => primitive!(DurationNanosecondType),
        DataType::Interval(IntervalUnit::YearMonth) => primitive!(IntervalYearMonthType),
        DataType::Interval(IntervalUnit::DayTime) => primitive!(IntervalDayTimeType),
        DataType::Interval(IntervalUnit::MonthDayNano) => primitive!(IntervalMonthDayNanoType),
        DataType::Decimal128(_, _) => primitive!(Decimal128Type),
        DataType::Decimal256(_, _) => primitive!(Decimal256Type),
        DataType::Utf8 => bytes!(StringBuilder::new(), text),
        DataType::LargeUtf8 => bytes!(LargeStringBuilder::new(), text),
        DataType::Utf8View => bytes!(StringViewBuilder::new(), text),
        DataType::Binary => bytes!(BinaryBuilder::new(), raw),
        DataType::LargeBinary => bytes!(LargeBinaryBuilder::new(), raw),
        DataType::BinaryView => bytes!(BinaryViewBuilder::new(), raw),
        DataType::FixedSizeBinary(n) => {
            let mut builder = FixedSizeBinaryBuilder::with_capacity(slots.len(), *n);
            for &slot in slots {
                if reader.flag(slot)? {
                    builder
                        .append_value(reader.take(slot, *n as usize)?)
                        .map_err(|e| e.to_string())?;
                } else {
                    builder.append_null();
                }
            }
            Ok(Arc::new(builder.finish()))
        }
        DataType::List(field) => decode_list::<i32>(field, slots, reader),
        DataType::LargeList(field) => decode_list::<i64>(field, slots, reader),
        DataType::Struct(fields) => {
            let mut nulls = BooleanBufferBuilder::new(slots.len());
            for &slot in slots {
                nulls.append(reader.flag(slot)?);
            }
            let children = fields
                .iter()
                .map(|f| decode_column(f.data_type(), slots, reader))
                .collect::<Result<Vec<_>, _>>()?;
            let array = StructArray::try_new(
                fields.clone(),
                children,
                Some(NullBuffer::new(nulls.finish())),
            )
            .map_err(|e| e.to_string())?;
            Ok(Arc::new(array))
        }
        other => Err(format!(
            "the state store cannot keep values of type {other}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{
        Decimal128Array, Float64Array, Int64Array, ListBuilder, RecordBatch, StringArray,
        StructBuilder, TimestampMicrosecondArray, UInt64Array,
    };

    use super::*;

    fn round_trip(batch: &RecordBatch) {
        let rows = encode(batch.columns(), false).unwrap();
        let slices: Vec<&[u8]> = rows.iter().map(Vec::as_slice).collect();
        let fields: Vec<FieldRef> = batch.schema().fields().iter().cloned().collect();
        let columns = decode(&fields, &slices).unwrap();
        let back = RecordBatch::try_new(batch.schema(), columns).unwrap();
        assert_eq!(&back, batch);
    }

    #[test]
    fn every_kind_of_aggregate_state_round_trips() {
        // avg's (count, sum), count(DISTINCT)'s list, a struct of a list.
        let mut list = ListBuilder::new(datafusion::arrow::array::Int64Builder::new());
        list.values().append_value(3);
        list.values().append_null();
        list.append(true);
        list.append(false);
        list.append(true);
        let mut structs = StructBuilder::from_fields(
            vec![
                Field::new("a", DataType::Int64, true),
                Field::new(
                    "b",
                    DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
                    true,
                ),
            ],
            3,
        );
        for i in 0..3 {
            structs
                .field_builder::<datafusion::arrow::array::Int64Builder>(0)
                .unwrap()
                .append_value(i);
            let b = structs
                .field_builder::<ListBuilder<Box<dyn datafusion::arrow::array::ArrayBuilder>>>(1)
                .unwrap();
            b.values()
                .as_any_mut()
                .downcast_mut::<StringBuilder>()
                .unwrap()
                .append_value(format!("x{i}"));
            b.append(i != 1);
            structs.append(i != 2);
        }
        let structs = structs.finish();
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(vec![Some("u1"), None, Some("ü")])),
            Arc::new(
                TimestampMicrosecondArray::from(vec![Some(-1), Some(0), Some(1 << 60)])
                    .with_timezone("UTC"),
            ),
            Arc::new(UInt64Array::from(vec![1, 2, 3])),
            Arc::new(Float64Array::from(vec![Some(1.5), None, Some(-0.0)])),
            Arc::new(list.finish()),
            Arc::new(
                Decimal128Array::from(vec![Some(12345), None, Some(-1)])
                    .with_precision_and_scale(20, 2)
                    .unwrap(),
            ),
            Arc::new(structs),
        ];
        let fields: Vec<Field> = columns
            .iter()
            .enumerate()
            .map(|(i, c)| Field::new(format!("c{i}"), c.data_type().clone(), true))
            .collect();
        let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap();
        round_trip(&batch);
    }

    /// The bytes of a row are part of the checkpoint format: this pins them.
    #[test]
    fn the_encoding_is_fixed() {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(vec![Some("ab"), None])),
            Arc::new(Int64Array::from(vec![Some(-2), Some(300)])),
            Arc::new(Float64Array::from(vec![Some(-0.0), Some(f64::NAN)])),
        ];
        let rows = encode(&columns, true).unwrap();
        assert_eq!(
            rows[0],
            [
                1, 2, b'a', b'b', //
                1, 0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, //
                1, 0, 0, 0, 0, 0, 0, 0, 0,
            ]
        );
        assert_eq!(
            rows[1],
            [
                0, //
                1, 0x2c, 0x01, 0, 0, 0, 0, 0, 0, //
                1, 0, 0, 0, 0, 0, 0, 0xf8, 0x7f,
            ]
        );
    }

    #[test]
    fn rows_of_other_columns_are_refused() {
        let columns: Vec<ArrayRef> = vec![Arc::new(Int64Array::from(vec![1]))];
        let rows = encode(&columns, false).unwrap();
        let fields = vec![
            Arc::new(Field::new("a", DataType::Int64, true)),
            Arc::new(Field::new("b", DataType::Int64, true)),
        ];
        let err = decode(&fields, &[rows[0].as_slice()]).unwrap_err();
        assert!(err.contains("ends early"), "{err}");
    }

    #[test]
    fn a_changed_state_schema_names_the_column() {
        let schema = |values: &[(&str, DataType)]| {
            StateSchema::new(
                &[Arc::new(Field::new("user_id", DataType::Utf8, true))],
                &values
                    .iter()
                    .map(|(n, t)| Arc::new(Field::new(*n, t.clone(), true)))
                    .collect::<Vec<_>>(),
            )
            .unwrap()
        };
        let old = schema(&[("count(__sluice_window_0.amount)[count]", DataType::Int64)]);
        let new = schema(&[
            ("count(__sluice_window_0.amount)[count]", DataType::Int64),
            ("max(__sluice_window_0.amount)[max]", DataType::Float64),
        ]);
        assert_eq!(compare(&old, &old), None);
        let why = compare(&old, &new).unwrap();
        assert_eq!(
            why,
            "state column \"max(amount)[max]\" is new (the stored state has no value for it)"
        );
        let retyped = schema(&[("count(__sluice_window_0.amount)[count]", DataType::Float64)]);
        assert!(
            compare(&old, &retyped)
                .unwrap()
                .contains("was int64 and is now float64")
        );
        let view = StateSchema::new(
            &[Arc::new(Field::new("user_id", DataType::Utf8View, true))],
            &[Arc::new(Field::new(
                "count(__sluice_window_0.amount)[count]",
                DataType::Int64,
                true,
            ))],
        )
        .unwrap();
        assert_eq!(
            compare(&old, &view),
            None,
            "utf8 and utf8_view hold the same values"
        );
    }
}
