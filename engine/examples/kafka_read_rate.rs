//! The ceiling for reading Kafka here: a plain librdkafka consumer (the
//! `rdkafka` crate, as the engine builds it) reads a topic from its
//! beginning to its end and prints how many records a second it read, and
//! their bytes; nothing is decoded. `bench/kafka.sh` runs it beside Sluice.
//!
//! cargo run --release --example kafka_read_rate -- BROKERS TOPIC

use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (brokers, topic) = match args.as_slice() {
        [_, brokers, topic] => (brokers.clone(), topic.clone()),
        _ => {
            eprintln!("usage: kafka_read_rate BROKERS TOPIC");
            std::process::exit(2);
        }
    };
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "sluice-read-rate")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .expect("a consumer");
    let metadata = consumer
        .fetch_metadata(Some(&topic), Duration::from_secs(10))
        .expect("the topic's metadata");
    let partitions: Vec<i32> = metadata.topics()[0]
        .partitions()
        .iter()
        .map(|p| p.id())
        .collect();
    let mut ends = Vec::new();
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        let (_, high) = consumer
            .fetch_watermarks(&topic, *p, Duration::from_secs(10))
            .expect("the partition's offsets");
        ends.push(high);
        tpl.add_partition_offset(&topic, *p, Offset::Beginning)
            .expect("a partition");
    }
    let total: i64 = ends.iter().sum();
    consumer.assign(&tpl).expect("the assignment");
    let start = Instant::now();
    let (mut records, mut bytes) = (0i64, 0u64);
    let mut done = vec![false; partitions.len()];
    while records < total && done.iter().any(|d| !d) {
        match consumer.poll(Duration::from_secs(5)) {
            Some(Ok(m)) => {
                records += 1;
                bytes += m.payload().map_or(0, |p| p.len() as u64);
                let i = partitions.iter().position(|p| *p == m.partition()).unwrap();
                if m.offset() + 1 >= ends[i] {
                    done[i] = true;
                }
            }
            Some(Err(e)) => panic!("{e}"),
            None => break,
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    println!(
        "read {records} records ({:.1} MB) in {seconds:.2} s: {:.0} records/s",
        bytes as f64 / 1e6,
        records as f64 / seconds
    );
}
