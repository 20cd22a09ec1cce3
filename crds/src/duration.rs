//! Durations as users write them in a spec: `"500ms"`, `"30s"`, `"10m"`,
//! `"1h30m"`, `"1d"`. Kept as strings in the spec types (so the CRD schema and
//! `kubectl explain` show what users type) and parsed here, with a hint when a
//! value is close to a valid one.

use std::time::Duration;

const UNITS: [(&str, u64); 5] = [
    ("ms", 1),
    ("s", 1_000),
    ("m", 60_000),
    ("h", 3_600_000),
    ("d", 86_400_000),
];

/// Parses a duration such as `"30s"`, `"10m"` or `"1h30m"`.
///
/// On failure the error is a sentence that quotes the value and, where one
/// can be guessed, says what to write instead.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    parse_exact(text).ok_or_else(|| match suggest(text) {
        Some(hint) => format!("{text:?} is not a duration (try {hint:?})"),
        None => format!(
            "{text:?} is not a duration: write a number and a unit, ms, s, m, h or d, e.g. \"30s\" or \"10m\""
        ),
    })
}

fn parse_exact(text: &str) -> Option<Duration> {
    let mut rest = text.trim();
    if rest.is_empty() || rest != text {
        return None;
    }
    let mut total_ms: u64 = 0;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return None;
        }
        let number: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let (_, per_unit) = UNITS.iter().find(|(u, _)| *u == &rest[..unit_len])?;
        total_ms = total_ms.checked_add(number.checked_mul(*per_unit)?)?;
        rest = &rest[unit_len..];
    }
    Some(Duration::from_millis(total_ms))
}

/// Guesses the intended duration from forms such as `"10 minutes"`,
/// `"PT10M"`, `"1.5m"` or a bare number.
fn suggest(text: &str) -> Option<String> {
    let lower = text.trim().to_ascii_lowercase();
    let lower = lower.strip_prefix("pt").unwrap_or(&lower).replace(' ', "");
    let split = lower
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(lower.len());
    let number: f64 = lower[..split].parse().ok()?;
    let unit_ms: u64 = match &lower[split..] {
        "" | "s" | "sec" | "secs" | "second" | "seconds" => 1_000,
        "ms" | "milli" | "millis" | "millisecond" | "milliseconds" => 1,
        "m" | "min" | "mins" | "minute" | "minutes" => 60_000,
        "h" | "hr" | "hrs" | "hour" | "hours" => 3_600_000,
        "d" | "day" | "days" => 86_400_000,
        _ => return None,
    };
    let ms = (number * unit_ms as f64).round();
    if !(0.0..=u64::MAX as f64).contains(&ms) {
        return None;
    }
    Some(format_duration(Duration::from_millis(ms as u64)))
}

/// Writes a duration in the shortest form `parse_duration` reads back.
pub fn format_duration(duration: Duration) -> String {
    let mut ms = duration.as_millis() as u64;
    if ms == 0 {
        return "0s".to_owned();
    }
    let mut out = String::new();
    for (unit, per_unit) in UNITS.iter().rev() {
        if ms >= *per_unit {
            out.push_str(&format!("{}{unit}", ms / per_unit));
            ms %= per_unit;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_single_and_compound_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn rejects_with_a_hint_when_the_intent_is_clear() {
        assert_eq!(
            parse_duration("10 minutes").unwrap_err(),
            r#""10 minutes" is not a duration (try "10m")"#
        );
        assert!(
            parse_duration("PT10M")
                .unwrap_err()
                .contains(r#"(try "10m")"#)
        );
        assert!(
            parse_duration("1.5m")
                .unwrap_err()
                .contains(r#"(try "1m30s")"#)
        );
        assert!(parse_duration("30").unwrap_err().contains(r#"(try "30s")"#));
    }

    #[test]
    fn rejects_without_a_hint_when_there_is_no_number() {
        let err = parse_duration("soon").unwrap_err();
        assert!(err.contains("write a number and a unit"), "{err}");
        assert!(parse_duration("").is_err());
        assert!(parse_duration("m").is_err());
        assert!(parse_duration(" 5s").is_err());
    }

    #[test]
    fn formats_what_it_parses() {
        for text in ["500ms", "30s", "10m", "1h30m", "1d", "0s", "2h5s"] {
            assert_eq!(format_duration(parse_duration(text).unwrap()), text);
        }
    }
}

/// Parses a size in bytes such as `"128MiB"`, `"1GiB"`, `"500MB"` or a
/// plain number of bytes.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let digits = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(digits);
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1_000,
        "KiB" | "Ki" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" | "Mi" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" | "Gi" => 1 << 30,
        _ => 0,
    };
    match number.parse::<u64>() {
        Ok(n) if scale > 0 && n > 0 => n
            .checked_mul(scale)
            .ok_or_else(|| format!("{text:?} is too large")),
        _ => Err(format!(
            "{text:?} is not a size: write a number and a unit, B, KiB, MiB or GiB, e.g. \"128MiB\""
        )),
    }
}

#[cfg(test)]
mod byte_tests {
    use super::parse_bytes;

    #[test]
    fn sizes_are_read_with_their_units() {
        assert_eq!(parse_bytes("128MiB"), Ok(128 << 20));
        assert_eq!(parse_bytes("1GB"), Ok(1_000_000_000));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert!(
            parse_bytes("lots")
                .unwrap_err()
                .contains("\"lots\" is not a size")
        );
        assert!(parse_bytes("0MiB").is_err());
    }
}
