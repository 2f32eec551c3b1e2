package dev.keel.streams;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.node.NullNode;
import com.fasterxml.jackson.databind.node.ObjectNode;
import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.ArrayList;
import java.util.Collections;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.atomic.AtomicBoolean;
import org.apache.kafka.common.serialization.Serde;
import org.apache.kafka.common.serialization.Serdes;
import org.apache.kafka.streams.KafkaStreams;
import org.apache.kafka.streams.StreamsBuilder;
import org.apache.kafka.streams.StreamsConfig;
import org.apache.kafka.streams.TaskMetadata;
import org.apache.kafka.streams.ThreadMetadata;
import org.apache.kafka.streams.Topology;
import org.apache.kafka.streams.errors.StreamsUncaughtExceptionHandler;
import org.apache.kafka.streams.kstream.Consumed;
import org.apache.kafka.streams.kstream.Produced;

/**
 * The Kafka Streams side of the benchmark: one of two jobs from an input topic to an output
 * topic.
 *
 * <ul>
 *   <li>{@code pass-through}: every record (CSV {@code id,name,age}, any bytes) passed on
 *       unchanged, key and value as they came.
 *   <li>{@code filter-projection}: JSON values {@code {"id":..,"name":..,"age":..}}; records with
 *       {@code age >= 18} go out as {@code {"id":..,"name":..}} (SQL semantics: a missing or null
 *       age drops the record, a value that is not a JSON object or an age that is not an integer
 *       fails the application, like Flink's JSON format without ignore-parse-errors).
 * </ul>
 *
 * <p>Arguments are {@code --name value} pairs (see {@link #USAGE}); {@code --config key=value}
 * passes any further Kafka Streams, consumer or producer setting. On stdout it prints one line per
 * state change of the KafkaStreams instance, {@code keel-streams state=NEW previous=OLD
 * at_ms=MILLIS}, and on RUNNING also {@code tasks=0_0,0_1} (its active tasks; task {@code 0_p}
 * reads input partition p); the driver waits for {@code state=RUNNING}. SIGTERM closes the
 * instance (a shutdown hook) and the process exits 0; an instance that fails exits 1.
 */
public final class BenchApp {
  static final String USAGE =
      "usage: BenchApp --bootstrap HOST:PORT --application-id ID --input TOPIC --output TOPIC"
          + " --job pass-through|filter-projection --state-dir DIR"
          + " [--guarantee exactly_once_v2|at_least_once] [--commit-interval-ms N] [--threads N]"
          + " [--config key=value]...";

  private static final ObjectMapper JSON = new ObjectMapper();

  private BenchApp() {}

  public static void main(String[] args) {
    Map<String, String> opts;
    List<String> extra;
    try {
      List<String> configs = new ArrayList<>();
      opts = parseArgs(args, configs);
      extra = configs;
    } catch (IllegalArgumentException e) {
      System.err.println("keel-streams: " + e.getMessage());
      System.err.println(USAGE);
      System.exit(2);
      return;
    }
    int code;
    try {
      code = run(opts, extra);
    } catch (IllegalArgumentException | IOException e) {
      System.err.println("keel-streams: " + e.getMessage());
      code = 2;
    }
    System.out.flush();
    System.exit(code);
  }

  /** {@code --name value} pairs; {@code --config key=value} may repeat (collected in order). */
  static Map<String, String> parseArgs(String[] args, List<String> configs) {
    Map<String, String> opts = new LinkedHashMap<>();
    List<String> known =
        List.of(
            "bootstrap",
            "application-id",
            "input",
            "output",
            "job",
            "state-dir",
            "guarantee",
            "commit-interval-ms",
            "threads",
            "config");
    for (int i = 0; i < args.length; i += 2) {
      String flag = args[i];
      if (!flag.startsWith("--") || !known.contains(flag.substring(2))) {
        throw new IllegalArgumentException("unknown argument " + flag);
      }
      if (i + 1 >= args.length) {
        throw new IllegalArgumentException(flag + " needs a value");
      }
      String name = flag.substring(2);
      String value = args[i + 1];
      if (name.equals("config")) {
        if (value.indexOf('=') <= 0) {
          throw new IllegalArgumentException("--config " + value + ": expected key=value");
        }
        configs.add(value);
      } else if (opts.put(name, value) != null) {
        throw new IllegalArgumentException(flag + " given twice");
      }
    }
    for (String required :
        List.of("bootstrap", "application-id", "input", "output", "job", "state-dir")) {
      if (!opts.containsKey(required)) {
        throw new IllegalArgumentException("--" + required + " is missing");
      }
    }
    return opts;
  }

  private static int positive(Map<String, String> opts, String name, int fallback) {
    String v = opts.get(name);
    if (v == null) {
      return fallback;
    }
    try {
      int n = Integer.parseInt(v);
      if (n < 1) {
        throw new NumberFormatException();
      }
      return n;
    } catch (NumberFormatException e) {
      throw new IllegalArgumentException("--" + name + " " + v + ": expected a positive integer");
    }
  }

  static Properties properties(Map<String, String> opts, List<String> extra) throws IOException {
    String guarantee = opts.getOrDefault("guarantee", StreamsConfig.EXACTLY_ONCE_V2);
    if (!guarantee.equals(StreamsConfig.EXACTLY_ONCE_V2)
        && !guarantee.equals(StreamsConfig.AT_LEAST_ONCE)) {
      throw new IllegalArgumentException(
          "--guarantee " + guarantee + ": expected exactly_once_v2 or at_least_once");
    }
    Path stateDir = Path.of(opts.get("state-dir"));
    Files.createDirectories(stateDir);

    Properties p = new Properties();
    p.put(StreamsConfig.BOOTSTRAP_SERVERS_CONFIG, opts.get("bootstrap"));
    p.put(StreamsConfig.APPLICATION_ID_CONFIG, opts.get("application-id"));
    p.put(StreamsConfig.PROCESSING_GUARANTEE_CONFIG, guarantee);
    p.put(
        StreamsConfig.COMMIT_INTERVAL_MS_CONFIG,
        Integer.toString(positive(opts, "commit-interval-ms", 1000)));
    p.put(StreamsConfig.NUM_STREAM_THREADS_CONFIG, Integer.toString(positive(opts, "threads", 1)));
    p.put(StreamsConfig.STATE_DIR_CONFIG, stateDir.toString());
    for (String kv : extra) {
      int eq = kv.indexOf('=');
      p.put(kv.substring(0, eq), kv.substring(eq + 1));
    }
    return p;
  }

  static Topology topology(String job, String input, String output) {
    Serde<byte[]> bytes = Serdes.ByteArray();
    StreamsBuilder builder = new StreamsBuilder();
    switch (job) {
      case "pass-through":
        builder.stream(input, Consumed.with(bytes, bytes)).to(output, Produced.with(bytes, bytes));
        break;
      case "filter-projection":
        builder.stream(input, Consumed.with(bytes, bytes))
            .flatMapValues(BenchApp::filterProjection)
            .to(output, Produced.with(bytes, bytes));
        break;
      default:
        throw new IllegalArgumentException(
            "--job " + job + ": expected pass-through or filter-projection");
    }
    return builder.build();
  }

  /**
   * {@code {"id":..,"name":..,"age":..}} with {@code age >= 18} -> {@code {"id":..,"name":..}};
   * otherwise nothing.
   */
  static List<byte[]> filterProjection(byte[] value) {
    JsonNode row;
    try {
      row = value == null ? NullNode.getInstance() : JSON.readTree(value);
    } catch (IOException e) {
      throw new IllegalArgumentException("a record value is not JSON: " + e.getMessage(), e);
    }
    if (row == null || !row.isObject()) {
      throw new IllegalArgumentException("a record value is not a JSON object");
    }
    JsonNode age = row.get("age");
    if (age == null || age.isNull()) {
      return Collections.emptyList();
    }
    if (!age.isIntegralNumber()) {
      throw new IllegalArgumentException("a record's age is not an integer: " + age);
    }
    if (age.asLong() < 18) {
      return Collections.emptyList();
    }
    ObjectNode out = JSON.createObjectNode();
    out.set("id", row.hasNonNull("id") ? row.get("id") : NullNode.getInstance());
    out.set("name", row.hasNonNull("name") ? row.get("name") : NullNode.getInstance());
    try {
      return List.of(JSON.writeValueAsBytes(out));
    } catch (IOException e) {
      throw new IllegalStateException("writing JSON: " + e.getMessage(), e);
    }
  }

  /** The active tasks of this instance's threads, sorted ({@code 0_0,0_1}; empty for none). */
  private static String activeTasks(KafkaStreams streams) {
    List<String> tasks = new ArrayList<>();
    try {
      for (ThreadMetadata thread : streams.metadataForLocalThreads()) {
        for (TaskMetadata task : thread.activeTasks()) {
          tasks.add(task.taskId().toString());
        }
      }
    } catch (RuntimeException e) {
      // Metadata is only served while running or rebalancing; the line then says no tasks.
    }
    Collections.sort(tasks);
    return String.join(",", tasks);
  }

  static int run(Map<String, String> opts, List<String> extra) throws IOException {
    Properties props = properties(opts, extra);
    Topology topology = topology(opts.get("job"), opts.get("input"), opts.get("output"));
    KafkaStreams streams = new KafkaStreams(topology, props);

    CountDownLatch done = new CountDownLatch(1);
    AtomicBoolean failed = new AtomicBoolean(false);
    streams.setStateListener(
        (next, previous) -> {
          long now = System.currentTimeMillis();
          StringBuilder line = new StringBuilder("keel-streams state=");
          line.append(next).append(" previous=").append(previous).append(" at_ms=").append(now);
          if (next == KafkaStreams.State.RUNNING) {
            line.append(" tasks=").append(activeTasks(streams));
          }
          System.out.println(line);
          System.out.flush();
          if (next == KafkaStreams.State.ERROR) {
            failed.set(true);
          }
          if (next == KafkaStreams.State.ERROR || next == KafkaStreams.State.NOT_RUNNING) {
            done.countDown();
          }
        });
    // A failing stream thread (bad record, fatal Kafka error) stops this instance; the driver
    // sees the process exit 1. Replacing the thread would hide the failure from the benchmark.
    streams.setUncaughtExceptionHandler(
        e -> {
          System.err.println("keel-streams: stream thread failed: " + e);
          e.printStackTrace();
          failed.set(true);
          return StreamsUncaughtExceptionHandler.StreamThreadExceptionResponse.SHUTDOWN_CLIENT;
        });
    Thread closer =
        new Thread(
            () -> {
              streams.close(Duration.ofSeconds(60));
              System.out.println("keel-streams closed at_ms=" + System.currentTimeMillis());
              System.out.flush();
            },
            "keel-streams-shutdown");
    Runtime.getRuntime().addShutdownHook(closer);

    streams.start();
    try {
      done.await();
    } catch (InterruptedException e) {
      Thread.currentThread().interrupt();
    }
    return failed.get() ? 1 : 0;
  }
}
