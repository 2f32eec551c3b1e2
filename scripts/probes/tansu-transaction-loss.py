"""One round of the probe (see tansu-transaction-loss.sh): a transactional producer sends 100
records, the broker is killed (-9) while they are in flight and started again on its data, then
the producer flushes (every record acknowledged), commits (which succeeds), and a
read_committed reader counts what it sees. Keel is not involved."""
import os
import sys
import time

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

BOOTSTRAP, TOPIC, WORK = sys.argv[1], sys.argv[2], sys.argv[3]
admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
admin.create_topics([NewTopic(TOPIC, 1, 1)])[TOPIC].result(30)
producer = Producer({"bootstrap.servers": BOOTSTRAP, "transactional.id": TOPIC, "linger.ms": 400})
producer.init_transactions()
producer.begin_transaction()
acked, failed = [], []
for i in range(100):
    producer.produce(TOPIC, value=str(i).encode(),
                     on_delivery=lambda e, m: (failed if e else acked).append(m.value()))
producer.poll(0.38)  # the batch is about to leave (linger 400 ms): kill the broker now
open(os.path.join(WORK, "kill"), "w").close()
while not os.path.exists(os.path.join(WORK, "restarted")):
    time.sleep(0.05)
producer.flush(30)
producer.commit_transaction(30)
reader = Consumer({"bootstrap.servers": BOOTSTRAP, "group.id": TOPIC + "-reader",
                   "isolation.level": "read_committed", "enable.auto.commit": False})
reader.assign([TopicPartition(TOPIC, 0, 0)])
seen, end = set(), time.time() + 10
while time.time() < end:
    m = reader.poll(0.5)
    if m is not None and not m.error():
        seen.add(m.value())
print(f"acknowledged {len(acked)}, failed {len(failed)}, commit succeeded, "
      f"read_committed sees {len(seen)} of 100", flush=True)
