package dev.layerlog.interop;

import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.file.DirectoryStream;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.HashMap;
import java.util.Map;
import java.util.regex.Matcher;
import java.util.regex.Pattern;
import org.apache.avro.Schema;
import org.apache.avro.data.TimeConversions;
import org.apache.avro.generic.GenericData;
import org.apache.avro.generic.GenericRecord;
import org.apache.avro.message.BadHeaderException;
import org.apache.avro.message.BinaryMessageDecoder;
import org.apache.avro.message.BinaryMessageEncoder;
import org.apache.avro.message.MissingSchemaException;
import org.apache.avro.message.SchemaStore;

/**
 * How a Java consumer reads (and a producer writes) the values on Layerlog's topics with Apache
 * Avro alone. README.md ("Reading the topics from another language") shows the lines between the
 * README markers; tests/interop/test_java_interop.py checks that the two stay the same.
 */
public final class LayerlogTopics {
    private static final Pattern FILE = Pattern.compile("(\\w+)\\.v(\\d+)\\.avsc");

    // README begin
    final GenericData model = new GenericData();
    final SchemaStore.Cache store = new SchemaStore.Cache(); // every version of every schema
    final Map<String, Schema> newest = new HashMap<>(); // by full name: dev.layerlog.events.ChunkAppended
    final Map<String, BinaryMessageDecoder<GenericRecord>> decoders = new HashMap<>();

    LayerlogTopics(Path schemas) throws IOException {
        model.addLogicalTypeConversion(new TimeConversions.TimestampMillisConversion()); // Instant
        Map<String, Integer> versions = new HashMap<>();
        try (DirectoryStream<Path> files = Files.newDirectoryStream(schemas, "*.avsc")) {
            for (Path file : files) { // schemas/NAME.vN.avsc
                Matcher name = FILE.matcher(file.getFileName().toString());
                if (!name.matches()) throw new IOException(file + " is not NAME.vN.avsc");
                Schema schema = new Schema.Parser().parse(file.toFile());
                store.addSchema(schema);
                int version = Integer.parseInt(name.group(2));
                if (versions.getOrDefault(schema.getFullName(), 0) < version) {
                    versions.put(schema.getFullName(), version);
                    newest.put(schema.getFullName(), schema);
                }
            }
        }
        for (Schema reader : newest.values()) { // an old record resolves to its type's newest schema
            decoders.put(reader.getFullName(), new BinaryMessageDecoder<>(model, reader, store));
        }
    }

    /** A Kafka record's value: C3 01, the writer schema's 8-byte fingerprint, the Avro body. */
    GenericRecord decode(byte[] value) throws IOException {
        if (value.length < 10 || value[0] != (byte) 0xC3 || value[1] != (byte) 0x01) {
            throw new BadHeaderException("not Avro single-object encoded");
        }
        // CRC-64-AVRO of the writer schema's parsing canonical form, little-endian
        long fingerprint = ByteBuffer.wrap(value).order(ByteOrder.LITTLE_ENDIAN).getLong(2);
        Schema writer = store.findByFingerprint(fingerprint);
        if (writer == null && store.findByFingerprint(Long.reverseBytes(fingerprint)) != null) {
            // Layerlog before issue 11 wrote the fingerprint's bytes reversed: put them right
            byte[] fixed = value.clone();
            ByteBuffer.wrap(fixed).order(ByteOrder.BIG_ENDIAN).putLong(2, fingerprint);
            return decode(fixed);
        }
        if (writer == null) throw new MissingSchemaException("no schema in schemas/ wrote this");
        return decoders.get(writer.getFullName()).decode(value);
    }

    byte[] encode(GenericRecord record) throws IOException {
        ByteArrayOutputStream out = new ByteArrayOutputStream();
        new BinaryMessageEncoder<GenericRecord>(model, record.getSchema()).encode(record, out);
        return out.toByteArray();
    }
    // README end
}
