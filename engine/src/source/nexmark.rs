//! The Nexmark benchmark's auction stream, as the `nexmarkPerson`,
//! `nexmarkAuction` and `nexmarkBid` generators produce it. Modelled on the
//! generator of Apache Beam's and Flink's Nexmark suites (default
//! configuration): one stream of events numbered from 0, in the standard mix
//! of 1 person, 3 auctions and 46 bids in every 50; ids derived from the
//! event number so that bids name persons and auctions that exist; half the
//! bids on a few hot auctions, a quarter of bidders and sellers hot; prices
//! log-uniform over six decades; `extra` padding rows to Nexmark's average
//! sizes (person 200, auction 500, bid 100 bytes). Event time is in order,
//! `rowsPerSecond` events a second, in whole milliseconds. Unlike Beam's
//! generator, every event draws from its own seeded random stream, so any
//! event can be produced without the ones before it (a batch re-read after a
//! restart is the same).

use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, Int64Builder, StringBuilder, TimestampMicrosecondBuilder,
};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use sluice_crds::GeneratorKind;

use super::generator::SplitMix64;

/// Events of each kind in every `TOTAL_PROPORTION` events.
const PERSON_PROPORTION: u64 = 1;
const AUCTION_PROPORTION: u64 = 3;
const TOTAL_PROPORTION: u64 = 50;
const FIRST_PERSON_ID: u64 = 1000;
const FIRST_AUCTION_ID: u64 = 1000;
const FIRST_CATEGORY_ID: u64 = 10;
const NUM_CATEGORIES: u64 = 5;
/// How far ahead of the newest person or auction a random id may reach.
const PERSON_ID_LEAD: u64 = 10;
const AUCTION_ID_LEAD: u64 = 10;
/// One in `ratio` draws picks a cold id; the rest a hot one.
const HOT_AUCTION_RATIO: u64 = 2;
const HOT_SELLER_RATIO: u64 = 4;
const HOT_BIDDER_RATIO: u64 = 4;
const HOT_CHANNEL_RATIO: u64 = 2;
const NUM_ACTIVE_PEOPLE: u64 = 1000;
const NUM_IN_FLIGHT_AUCTIONS: u64 = 100;
const CHANNELS: u64 = 10_000;
const AVG_PERSON_BYTES: usize = 200;
const AVG_AUCTION_BYTES: usize = 500;
const AVG_BID_BYTES: usize = 100;
const FIRST_NAMES: [&str; 11] = [
    "Peter", "Paul", "Luke", "John", "Saul", "Vicky", "Kate", "Julie", "Sarah", "Deiter", "Walter",
];
const LAST_NAMES: [&str; 9] = [
    "Shultz", "Abrams", "Spencer", "White", "Bartels", "Walton", "Smith", "Jones", "Noris",
];
const US_STATES: [&str; 6] = ["AZ", "CA", "ID", "OR", "WA", "WY"];
const US_CITIES: [&str; 10] = [
    "Phoenix",
    "Los Angeles",
    "San Francisco",
    "Boise",
    "Portland",
    "Bend",
    "Redmond",
    "Seattle",
    "Kent",
    "Cheyenne",
];
const HOT_CHANNELS: [&str; 4] = ["Google", "Facebook", "Baidu", "Apple"];

/// What an event is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    Person,
    Auction,
    Bid,
}

/// The kind of event `n` is.
pub fn event_of(n: u64) -> Event {
    match n % TOTAL_PROPORTION {
        r if r < PERSON_PROPORTION => Event::Person,
        r if r < PERSON_PROPORTION + AUCTION_PROPORTION => Event::Auction,
        _ => Event::Bid,
    }
}

/// The table a Nexmark generator kind keeps, if it is one.
pub fn event_kept(kind: GeneratorKind) -> Option<Event> {
    match kind {
        GeneratorKind::NexmarkPerson => Some(Event::Person),
        GeneratorKind::NexmarkAuction => Some(Event::Auction),
        GeneratorKind::NexmarkBid => Some(Event::Bid),
        GeneratorKind::Rate | GeneratorKind::Transactions => None,
    }
}

/// The (0-based) id of the newest person at event `n`.
// Written for any proportions: with one person in 50, `min` is a no-op.
#[allow(clippy::unnecessary_min_or_max)]
fn last_person(n: u64) -> u64 {
    let (epoch, offset) = (n / TOTAL_PROPORTION, n % TOTAL_PROPORTION);
    epoch * PERSON_PROPORTION + offset.min(PERSON_PROPORTION - 1)
}

/// The (0-based) id of the newest auction at event `n`.
fn last_auction(n: u64) -> u64 {
    let (epoch, offset) = (n / TOTAL_PROPORTION, n % TOTAL_PROPORTION);
    if offset < PERSON_PROPORTION {
        // Before this epoch's first auction: the previous epoch's last one
        // (none yet in the first epoch: auction 0 stands in for it).
        return (epoch * AUCTION_PROPORTION).saturating_sub(1);
    }
    epoch * AUCTION_PROPORTION + (offset - PERSON_PROPORTION).min(AUCTION_PROPORTION - 1)
}

/// Nexmark events over a time line: event `n` happens at
/// `start_micros + n / events_per_second`, in whole milliseconds.
pub struct Nexmark {
    pub seed: u64,
    pub start_micros: i64,
    pub events_per_second: u64,
}

impl Nexmark {
    /// When event `n` happens, in microseconds since the epoch.
    pub fn time_of(&self, n: u64) -> i64 {
        let micros =
            self.start_micros + (n as i128 * 1_000_000 / self.events_per_second as i128) as i64;
        micros.div_euclid(1000) * 1000
    }

    fn rng(&self, n: u64) -> SplitMix64 {
        SplitMix64::new(self.seed ^ n.wrapping_mul(0xD1B5_4A32_D192_ED03) ^ 0x006E_6578_6D61_726B)
    }

    /// The rows of `event`'s table among events `start..end`, in `schema`
    /// (the generator kind's columns).
    pub fn rows(&self, event: Event, start: u64, end: u64, schema: SchemaRef) -> RecordBatch {
        let n = end.saturating_sub(start) as usize;
        let columns = match event {
            Event::Person => self.persons(start, end, n),
            Event::Auction => self.auctions(start, end, n),
            Event::Bid => self.bids(start, end, n),
        };
        RecordBatch::try_new(schema, columns).expect("columns match the schema")
    }

    fn persons(&self, start: u64, end: u64, n: usize) -> Vec<ArrayRef> {
        let n = n / TOTAL_PROPORTION as usize + 1;
        let mut id = Int64Builder::with_capacity(n);
        let mut name = StringBuilder::with_capacity(n, n * 12);
        let mut email = StringBuilder::with_capacity(n, n * 16);
        let mut card = StringBuilder::with_capacity(n, n * 19);
        let mut city = StringBuilder::with_capacity(n, n * 8);
        let mut state = StringBuilder::with_capacity(n, n * 2);
        let mut time = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
        let mut extra = StringBuilder::with_capacity(n, n * AVG_PERSON_BYTES);
        let mut text = String::new();
        for e in (start..end).filter(|&e| event_of(e) == Event::Person) {
            let mut rng = self.rng(e);
            id.append_value((last_person(e) + FIRST_PERSON_ID) as i64);
            let full_name = format!(
                "{} {}",
                FIRST_NAMES[rng.below(FIRST_NAMES.len() as u64) as usize],
                LAST_NAMES[rng.below(LAST_NAMES.len() as u64) as usize]
            );
            text.clear();
            random_string(&mut rng, 7, &mut text);
            text.push('@');
            random_string(&mut rng, 5, &mut text);
            text.push_str(".com");
            let credit_card = format!(
                "{:04} {:04} {:04} {:04}",
                rng.below(10_000),
                rng.below(10_000),
                rng.below(10_000),
                rng.below(10_000)
            );
            let the_city = US_CITIES[rng.below(US_CITIES.len() as u64) as usize];
            let the_state = US_STATES[rng.below(US_STATES.len() as u64) as usize];
            let size = 8
                + full_name.len()
                + text.len()
                + credit_card.len()
                + the_city.len()
                + the_state.len();
            name.append_value(&full_name);
            email.append_value(&text);
            card.append_value(&credit_card);
            city.append_value(the_city);
            state.append_value(the_state);
            time.append_value(self.time_of(e));
            text.clear();
            padding(&mut rng, size, AVG_PERSON_BYTES, &mut text);
            extra.append_value(&text);
        }
        vec![
            Arc::new(id.finish()),
            Arc::new(name.finish()),
            Arc::new(email.finish()),
            Arc::new(card.finish()),
            Arc::new(city.finish()),
            Arc::new(state.finish()),
            Arc::new(time.finish()),
            Arc::new(extra.finish()),
        ]
    }

    fn auctions(&self, start: u64, end: u64, n: usize) -> Vec<ArrayRef> {
        let n = n * AUCTION_PROPORTION as usize / TOTAL_PROPORTION as usize + 1;
        let mut id = Int64Builder::with_capacity(n);
        let mut item = StringBuilder::with_capacity(n, n * 12);
        let mut description = StringBuilder::with_capacity(n, n * 50);
        let mut initial = Int64Builder::with_capacity(n);
        let mut reserve = Int64Builder::with_capacity(n);
        let mut time = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
        let mut expires = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
        let mut seller = Int64Builder::with_capacity(n);
        let mut category = Int64Builder::with_capacity(n);
        let mut extra = StringBuilder::with_capacity(n, n * AVG_AUCTION_BYTES);
        let mut text = String::new();
        // The events an auction's bids spread over: its length is drawn
        // from up to twice the time they take.
        let horizon_events = NUM_IN_FLIGHT_AUCTIONS * TOTAL_PROPORTION / AUCTION_PROPORTION;
        for e in (start..end).filter(|&e| event_of(e) == Event::Auction) {
            let mut rng = self.rng(e);
            id.append_value((last_auction(e) + FIRST_AUCTION_ID) as i64);
            let the_seller = if rng.below(HOT_SELLER_RATIO) > 0 {
                (last_person(e) / HOT_SELLER_RATIO) * HOT_SELLER_RATIO
            } else {
                self.random_person(&mut rng, e)
            };
            text.clear();
            random_string(&mut rng, 20, &mut text);
            let item_len = text.len();
            item.append_value(&text);
            text.clear();
            random_string(&mut rng, 100, &mut text);
            let description_len = text.len();
            description.append_value(&text);
            let initial_bid = price(&mut rng);
            initial.append_value(initial_bid);
            reserve.append_value(initial_bid + price(&mut rng));
            let at = self.time_of(e);
            time.append_value(at);
            let horizon_ms = (self.time_of(e + horizon_events) - at) / 1000;
            let length_ms = 1 + rng.below((horizon_ms * 2).max(1) as u64) as i64;
            expires.append_value(at + length_ms * 1000);
            seller.append_value((the_seller + FIRST_PERSON_ID) as i64);
            category.append_value((FIRST_CATEGORY_ID + rng.below(NUM_CATEGORIES)) as i64);
            text.clear();
            padding(
                &mut rng,
                8 + item_len + description_len + 8 * 5,
                AVG_AUCTION_BYTES,
                &mut text,
            );
            extra.append_value(&text);
        }
        vec![
            Arc::new(id.finish()),
            Arc::new(item.finish()),
            Arc::new(description.finish()),
            Arc::new(initial.finish()),
            Arc::new(reserve.finish()),
            Arc::new(time.finish()),
            Arc::new(expires.finish()),
            Arc::new(seller.finish()),
            Arc::new(category.finish()),
            Arc::new(extra.finish()),
        ]
    }

    fn bids(&self, start: u64, end: u64, n: usize) -> Vec<ArrayRef> {
        let mut auction = Int64Builder::with_capacity(n);
        let mut bidder = Int64Builder::with_capacity(n);
        let mut price_of = Int64Builder::with_capacity(n);
        let mut channel = StringBuilder::with_capacity(n, n * 10);
        let mut url = StringBuilder::with_capacity(n, n * 70);
        let mut time = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
        let mut extra = StringBuilder::with_capacity(n, n * AVG_BID_BYTES);
        let hot_urls: Vec<String> = (0..HOT_CHANNELS.len() as u64)
            .map(|i| base_url(&mut SplitMix64::new(self.seed ^ (i + 1))))
            .collect();
        let mut text = String::new();
        for e in (start..end).filter(|&e| event_of(e) == Event::Bid) {
            let mut rng = self.rng(e);
            let the_auction = if rng.below(HOT_AUCTION_RATIO) > 0 {
                (last_auction(e) / HOT_AUCTION_RATIO) * HOT_AUCTION_RATIO
            } else {
                let newest = last_auction(e);
                let oldest = newest.saturating_sub(NUM_IN_FLIGHT_AUCTIONS);
                oldest + rng.below(newest - oldest + 1 + AUCTION_ID_LEAD)
            };
            let the_bidder = if rng.below(HOT_BIDDER_RATIO) > 0 {
                (last_person(e) / HOT_BIDDER_RATIO) * HOT_BIDDER_RATIO + 1
            } else {
                self.random_person(&mut rng, e)
            };
            auction.append_value((the_auction + FIRST_AUCTION_ID) as i64);
            bidder.append_value((the_bidder + FIRST_PERSON_ID) as i64);
            price_of.append_value(price(&mut rng));
            if rng.below(HOT_CHANNEL_RATIO) > 0 {
                let i = rng.below(HOT_CHANNELS.len() as u64) as usize;
                channel.append_value(HOT_CHANNELS[i]);
                url.append_value(&hot_urls[i]);
            } else {
                let number = rng.below(CHANNELS);
                channel.append_value(format!("channel-{number}"));
                // A channel's URL is its own: drawn from its number.
                let mut channel_rng = SplitMix64::new(self.seed ^ number.wrapping_mul(31) ^ 0x5EED);
                let mut address = base_url(&mut channel_rng);
                if channel_rng.below(10) > 0 {
                    let id = (number as i32).reverse_bits().unsigned_abs();
                    address.push_str(&format!("&channel_id={id}"));
                }
                url.append_value(&address);
            }
            time.append_value(self.time_of(e));
            text.clear();
            padding(&mut rng, 8 * 4, AVG_BID_BYTES, &mut text);
            extra.append_value(&text);
        }
        vec![
            Arc::new(auction.finish()),
            Arc::new(bidder.finish()),
            Arc::new(price_of.finish()),
            Arc::new(channel.finish()),
            Arc::new(url.finish()),
            Arc::new(time.finish()),
            Arc::new(extra.finish()),
        ]
    }

    /// A (0-based) person among the recently active ones at event `e`, or
    /// slightly ahead of the newest.
    fn random_person(&self, rng: &mut SplitMix64, e: u64) -> u64 {
        let people = last_person(e) + 1;
        let active = people.min(NUM_ACTIVE_PEOPLE);
        people - active + rng.below(active + PERSON_ID_LEAD)
    }
}

/// A price in cents, log-uniform between 1 and 1,000,000.
fn price(rng: &mut SplitMix64) -> i64 {
    (10f64.powf(rng.next_f64() * 6.0) * 100.0).round() as i64
}

/// Appends 3 to `max - 1` random lower-case letters.
fn random_string(rng: &mut SplitMix64, max: u64, out: &mut String) {
    let len = 3 + rng.below(max - 3);
    out.extend((0..len).map(|_| (b'a' + rng.below(26) as u8) as char));
}

/// Appends padding that brings a row of `size` bytes to `average` on
/// average (±20% of the difference), as Nexmark's `extra` column does.
fn padding(rng: &mut SplitMix64, size: usize, average: usize, out: &mut String) {
    if size >= average {
        return;
    }
    let wanted = average - size;
    let delta = (wanted as f64 * 0.2).round() as u64;
    let len = wanted as u64 - delta + if delta == 0 { 0 } else { rng.below(2 * delta) };
    out.extend((0..len).map(|_| (b'a' + rng.below(26) as u8) as char));
}

fn base_url(rng: &mut SplitMix64) -> String {
    let mut url = String::from("https://www.nexmark.com/");
    for _ in 0..3 {
        random_string(rng, 5, &mut url);
        url.push('/');
    }
    url.push_str("item.htm?query=1");
    url
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{Array, AsArray};
    use datafusion::arrow::datatypes::{Int64Type, TimestampMicrosecondType};

    use super::*;
    use crate::source::generator::schema_of;

    fn nexmark() -> Nexmark {
        Nexmark {
            seed: 7,
            start_micros: 1_767_225_600_000_000,
            events_per_second: 1000,
        }
    }

    fn ints(batch: &RecordBatch, column: &str) -> Vec<i64> {
        let array = batch.column_by_name(column).unwrap();
        array.as_primitive::<Int64Type>().values().to_vec()
    }

    #[test]
    fn the_stream_mixes_one_person_three_auctions_and_46_bids_in_50() {
        let mut counts = [0u64; 3];
        for n in 0..5000 {
            counts[event_of(n) as usize] += 1;
        }
        assert_eq!(counts, [100, 300, 4600]);
        let m = nexmark();
        let bids = m.rows(Event::Bid, 0, 5000, schema_of(GeneratorKind::NexmarkBid));
        let persons = m.rows(
            Event::Person,
            0,
            5000,
            schema_of(GeneratorKind::NexmarkPerson),
        );
        let auctions = m.rows(
            Event::Auction,
            0,
            5000,
            schema_of(GeneratorKind::NexmarkAuction),
        );
        assert_eq!(
            (persons.num_rows(), auctions.num_rows(), bids.num_rows()),
            (100, 300, 4600)
        );
        // Ids count up from 1000, one for each person and auction.
        assert_eq!(ints(&persons, "id"), (1000..1100).collect::<Vec<_>>());
        assert_eq!(ints(&auctions, "id"), (1000..1300).collect::<Vec<_>>());
    }

    /// A bid names an auction and a bidder that exist by then or are about
    /// to (Nexmark's small lead), sellers are persons, and hot auctions take
    /// about half the bids.
    #[test]
    fn bids_name_auctions_and_persons_of_the_stream() {
        let m = nexmark();
        let (start, end) = (10_000, 60_000);
        let bids = m.rows(Event::Bid, start, end, schema_of(GeneratorKind::NexmarkBid));
        let newest_auction = (last_auction(end) + FIRST_AUCTION_ID) as i64;
        let newest_person = (last_person(end) + FIRST_PERSON_ID) as i64;
        for a in ints(&bids, "auction") {
            assert!(
                (FIRST_AUCTION_ID as i64..=newest_auction + AUCTION_ID_LEAD as i64).contains(&a)
            );
        }
        for p in ints(&bids, "bidder") {
            assert!((FIRST_PERSON_ID as i64..=newest_person + PERSON_ID_LEAD as i64).contains(&p));
        }
        let prices = ints(&bids, "price");
        assert!(prices.iter().all(|p| (100..=100_000_000).contains(p)));
        let even = ints(&bids, "auction")
            .iter()
            .filter(|a| *a % 2 == 0)
            .count();
        let share = even as f64 / bids.num_rows() as f64;
        assert!((0.70..0.80).contains(&share), "{share}");
        let auctions = m.rows(
            Event::Auction,
            start,
            end,
            schema_of(GeneratorKind::NexmarkAuction),
        );
        for s in ints(&auctions, "seller") {
            assert!((FIRST_PERSON_ID as i64..=newest_person + PERSON_ID_LEAD as i64).contains(&s));
        }
        // Bids average Nexmark's 100 bytes (their fixed part counted as 32).
        let extra = bids.column_by_name("extra").unwrap().as_string::<i32>();
        let average = (0..extra.len())
            .map(|i| extra.value(i).len())
            .sum::<usize>() as f64
            / extra.len() as f64;
        assert!((64.0..72.0).contains(&average), "{average}");
    }

    #[test]
    fn events_are_in_order_in_whole_milliseconds_and_any_range_is_the_same() {
        let m = nexmark();
        let schema = schema_of(GeneratorKind::NexmarkBid);
        let whole = m.rows(Event::Bid, 0, 2000, schema.clone());
        let part = m.rows(Event::Bid, 500, 1000, schema.clone());
        let before = m.rows(Event::Bid, 0, 500, schema).num_rows();
        assert_eq!(whole.slice(before, part.num_rows()), part);
        let times = whole
            .column_by_name("datetime")
            .unwrap()
            .as_primitive::<TimestampMicrosecondType>();
        assert!(times.values().windows(2).all(|w| w[0] <= w[1]));
        assert!(times.values().iter().all(|t| t % 1000 == 0));
        assert_eq!(m.time_of(1000) - m.time_of(0), 1_000_000);
    }
}
