use std::time::{Duration, Instant};
use keel_testkit::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, TopicPartitionList, Offset};

#[test]
fn probe() {
    let b = Broker::start().expect("start");
    let topic = unique_topic("probe");
    create_topic(&b.bootstrap, &topic, 2).expect("create");
    // partition 0: one batch of 10; partition 1: 10 single-record batches
    produce_numbered_to(&b.bootstrap, &topic, 0, 0..10).expect("p0");
    for i in 0..10 { produce_numbered_to(&b.bootstrap, &topic, 1, i..i+1).expect("p1"); }
    for p in 0..2 { println!("wm p{p}: {:?}", watermarks(&b.bootstrap, &topic, p)); }
    let c: BaseConsumer = ClientConfig::new().set("bootstrap.servers", &b.bootstrap).set("group.id","x").set("enable.auto.commit","false").create().unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 0, Offset::End).unwrap();
    tpl.add_partition_offset(&topic, 1, Offset::End).unwrap();
    println!("offsets_for_times(-1 = latest): {:?}", c.offsets_for_times(tpl, Duration::from_secs(5)).map(|t| t.to_topic_map()));
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 0, Offset::Beginning).unwrap();
    println!("offsets_for_times(-2 = earliest): {:?}", c.offsets_for_times(tpl, Duration::from_secs(5)).map(|t| t.to_topic_map()));
    // consume p0 from the end position: does fetching at offset 1 return records 1..?
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 0, Offset::Offset(3)).unwrap();
    tpl.add_partition_offset(&topic, 1, Offset::End).unwrap();
    c.assign(&tpl).unwrap();
    let t = Instant::now();
    let mut got = vec![];
    while t.elapsed() < Duration::from_secs(3) {
        if let Some(m) = c.poll(Duration::from_millis(100)) { 
            use rdkafka::Message;
            match m { Ok(m) => got.push((m.partition(), m.offset())), Err(e) => println!("err {e}") } }
    }
    println!("from p0@3 and p1@End: {:?}", got);
    println!("t={:?}", t.elapsed()); drop(c); println!("dropped consumer t={:?}", t.elapsed());
    // delete + recreate
    let admin: rdkafka::admin::AdminClient<_> = ClientConfig::new().set("bootstrap.servers", &b.bootstrap).create().unwrap();
    let r = futures::executor::block_on(admin.delete_topics(&[&topic], &rdkafka::admin::AdminOptions::new()));
    println!("delete: {:?}", r);
    println!("count after delete: {:?}", partition_count(&b.bootstrap, &topic));
    println!("recreate: {:?}", create_topic(&b.bootstrap, &topic, 4));
    for p in 0..4 { println!("wm p{p}: {:?}", watermarks(&b.bootstrap, &topic, p)); }
    let t = Instant::now();
    let mut b = b;
    b.restart().expect("restart"); println!("restarted t={:?}", t.elapsed());
    drop(admin); println!("t={:?}", t.elapsed());
    println!("restart {:?}; count {:?}", t.elapsed(), partition_count(&b.bootstrap, &topic));
}

