package dev.layerlog.interop;

import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Instant;
import java.util.ArrayList;
import java.util.HexFormat;
import java.util.List;
import java.util.stream.Stream;
import org.apache.avro.Schema;
import org.apache.avro.SchemaNormalization;
import org.apache.avro.generic.GenericDatumReader;
import org.apache.avro.generic.GenericEnumSymbol;
import org.apache.avro.generic.GenericRecord;
import org.apache.avro.io.DecoderFactory;

/**
 * The Java side of tests/interop/test_java_interop.py. One file per record, in WORK:
 *
 * <pre>
 *   layerlog/LABEL.bin   a value Layerlog wrote   -> layerlog-avro/LABEL.json    read by Avro alone
 *                                                 -> layerlog-topics/LABEL.json  by LayerlogTopics
 *   legacy/LABEL.bin     the same with the header Layerlog wrote before it followed the spec
 *                                                 -> legacy-avro/LABEL.json, legacy-topics/LABEL.json
 *   values/LABEL.json    a record in Avro's JSON encoding, newest schema
 *                                                 -> java-written/LABEL.bin  BinaryMessageEncoder's
 * </pre>
 *
 * LABEL starts with the record's name (NAME.anything). A decoded record is written as JSON with
 * each field's Java value tagged where JSON has no such type: {"bytes": hex} for a ByteBuffer,
 * {"instant": ISO-8601} for a java.time.Instant (timestamp-millis), {"enum": symbol}.
 *
 * <p>Usage: Interop SCHEMAS_DIR WORK_DIR
 */
public final class Interop {
    public static void main(String[] args) throws IOException {
        if (args.length != 2) {
            System.err.println("usage: Interop SCHEMAS_DIR WORK_DIR");
            System.exit(2);
        }
        LayerlogTopics topics = new LayerlogTopics(Path.of(args[0]));
        Path work = Path.of(args[1]);
        int done = 0;
        for (String folder : List.of("layerlog", "legacy")) {
            for (Path file : files(work.resolve(folder), ".bin")) {
                byte[] value = Files.readAllBytes(file);
                // Avro's BinaryMessageDecoder alone, for the type the file name says: a reader
                // that follows the spec and nothing else.
                String result;
                try {
                    Schema reader = byName(topics, name(file));
                    GenericRecord record = topics.decoders.get(reader.getFullName()).decode(value);
                    result = describe(topics, value, record);
                } catch (Exception error) {
                    result = error(error);
                }
                write(work.resolve(folder + "-avro"), label(file) + ".json", result);
                // LayerlogTopics.decode: finds the type by the fingerprint, also reversed.
                try {
                    result = describe(topics, value, topics.decode(value));
                } catch (Exception error) {
                    result = error(error);
                }
                write(work.resolve(folder + "-topics"), label(file) + ".json", result);
                done++;
            }
        }
        for (Path file : files(work.resolve("values"), ".json")) {
            Schema schema = byName(topics, name(file));
            String json = Files.readString(file, StandardCharsets.UTF_8);
            GenericRecord record = new GenericDatumReader<GenericRecord>(schema, schema, topics.model)
                    .read(null, DecoderFactory.get().jsonDecoder(schema, json));
            Path out = work.resolve("java-written");
            Files.createDirectories(out);
            Files.write(out.resolve(label(file) + ".bin"), topics.encode(record));
            done++;
        }
        System.out.println(done + " records");
    }

    private static List<Path> files(Path dir, String suffix) throws IOException {
        if (!Files.isDirectory(dir)) return List.of();
        try (Stream<Path> entries = Files.list(dir)) {
            return entries.filter(p -> p.toString().endsWith(suffix)).sorted().toList();
        }
    }

    private static String label(Path file) {
        String name = file.getFileName().toString();
        return name.substring(0, name.lastIndexOf('.'));
    }

    private static String name(Path file) {
        String label = label(file);
        int dot = label.indexOf('.');
        return dot < 0 ? label : label.substring(0, dot);
    }

    private static Schema byName(LayerlogTopics topics, String name) throws IOException {
        for (Schema schema : topics.newest.values()) {
            if (schema.getName().equals(name)) return schema;
        }
        throw new IOException("no schema named " + name);
    }

    private static void write(Path dir, String name, String text) throws IOException {
        Files.createDirectories(dir);
        Files.writeString(dir.resolve(name), text, StandardCharsets.UTF_8);
    }

    private static String describe(LayerlogTopics topics, byte[] value, GenericRecord record) {
        long fingerprint = ByteBuffer.wrap(value).order(ByteOrder.LITTLE_ENDIAN).getLong(2);
        Schema writer = topics.store.findByFingerprint(fingerprint);
        if (writer == null) writer = topics.store.findByFingerprint(Long.reverseBytes(fingerprint));
        // The writer schema's fingerprint as Java computes it, in header byte order.
        byte[] computed = ByteBuffer.allocate(8).order(ByteOrder.LITTLE_ENDIAN)
                .putLong(SchemaNormalization.parsingFingerprint64(writer)).array();
        StringBuilder out = new StringBuilder("{\"writer\": ").append(string(writer.getFullName()))
                .append(", \"writer_fingerprint\": ").append(string(HexFormat.of().formatHex(computed)))
                .append(", \"reader\": ").append(string(record.getSchema().getFullName()))
                .append(", \"fields\": {");
        List<String> fields = new ArrayList<>();
        for (Schema.Field field : record.getSchema().getFields()) {
            fields.add(string(field.name()) + ": " + json(record.get(field.pos())));
        }
        return out.append(String.join(", ", fields)).append("}}\n").toString();
    }

    private static String error(Exception error) {
        return "{\"error\": " + string(error.getClass().getSimpleName()) + ", \"message\": "
                + string(String.valueOf(error.getMessage())) + "}\n";
    }

    private static String json(Object value) {
        if (value == null) return "null";
        if (value instanceof CharSequence text) return string(text.toString());
        if (value instanceof Integer || value instanceof Long || value instanceof Boolean) {
            return value.toString();
        }
        if (value instanceof ByteBuffer buffer) {
            byte[] bytes = new byte[buffer.remaining()];
            buffer.duplicate().get(bytes);
            return "{\"bytes\": " + string(HexFormat.of().formatHex(bytes)) + "}";
        }
        if (value instanceof Instant instant) return "{\"instant\": " + string(instant.toString()) + "}";
        if (value instanceof GenericEnumSymbol<?> symbol) {
            return "{\"enum\": " + string(symbol.toString()) + "}";
        }
        throw new IllegalArgumentException("no JSON form for a " + value.getClass().getName());
    }

    private static String string(String text) {
        StringBuilder out = new StringBuilder("\"");
        for (int i = 0; i < text.length(); i++) {
            char c = text.charAt(i);
            if (c == '"' || c == '\\') {
                out.append('\\').append(c);
            } else if (c < 0x20) {
                out.append(String.format("\\u%04x", (int) c));
            } else {
                out.append(c); // UTF-16 surrogate pairs stay pairs; the file is UTF-8
            }
        }
        return out.append('"').toString();
    }
}
