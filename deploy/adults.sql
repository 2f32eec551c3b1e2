-- A SQL job for the dev cluster (`scripts/dev.sh` starts the broker at 127.0.0.1:9092 and the
-- demo-kafka job that fills people-in): the adults among the people, names in capitals, into
-- the topic adults, exactly-once.
--   keel run deploy/adults.sql       keel explain deploy/adults.sql
SET 'pipeline.name' = 'adults';
SET 'parallelism.default' = '2';
SET 'execution.checkpointing.interval' = '1 s';

CREATE TEMPORARY TABLE people (
  id INT,
  name STRING,
  age INT,
  `partition` INT METADATA VIRTUAL,
  ts TIMESTAMP_LTZ(3) METADATA FROM 'timestamp'
) WITH (
  'connector' = 'kafka',
  'topic' = 'people-in',
  'properties.bootstrap.servers' = '127.0.0.1:9092',
  'properties.group.id' = 'adults',
  'scan.startup.mode' = 'earliest-offset',
  'format' = 'csv'
);

CREATE TEMPORARY TABLE adults (
  id BIGINT,
  name STRING,
  age INT,
  since DATE,
  ts TIMESTAMP_LTZ(3) METADATA FROM 'timestamp'
) WITH (
  'connector' = 'kafka',
  'topic' = 'adults',
  'properties.bootstrap.servers' = '127.0.0.1:9092',
  'format' = 'json',
  'sink.delivery-guarantee' = 'exactly-once',
  'sink.transactional-id-prefix' = 'adults'
);

INSERT INTO adults
SELECT id, UPPER(TRIM(name)), age, CAST(ts AS DATE), ts
FROM people
WHERE age >= 18 AND name IS NOT NULL;
