//! The OTLP/HTTP protobuf body of a trace export (`ExportTraceServiceRequest` of
//! opentelemetry-proto's `collector/trace/v1`), written by hand: three message kinds and a
//! dozen fields do not need a code generator or a protobuf runtime in the binary. The tests in
//! `tests/telemetry.rs` decode it with the generated types of the `opentelemetry-proto` crate.

use super::{Kind, SpanRecord, Value};

/// Protobuf wire types.
const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn tag(out: &mut Vec<u8>, field: u32, wire: u8) {
    varint(out, u64::from(field << 3 | u32::from(wire)));
}

fn bytes(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    tag(out, field, LEN);
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// A nested message, written apart first for its length.
fn message(out: &mut Vec<u8>, field: u32, write: impl FnOnce(&mut Vec<u8>)) {
    let mut inner = Vec::new();
    write(&mut inner);
    bytes(out, field, &inner);
}

/// `KeyValue { key = 1; AnyValue value = 2 }`, `AnyValue { string_value = 1; int_value = 3 }`.
fn attribute(out: &mut Vec<u8>, field: u32, key: &str, value: &Value) {
    message(out, field, |kv| {
        bytes(kv, 1, key.as_bytes());
        message(kv, 2, |any| match value {
            Value::Str(s) => bytes(any, 1, s.as_bytes()),
            Value::Static(s) => bytes(any, 1, s.as_bytes()),
            Value::Int(i) => {
                tag(any, 3, VARINT);
                varint(any, *i as u64);
            }
        });
    });
}

/// `Span`: trace_id 1, span_id 2, parent_span_id 4, name 5, kind 6, start 7, end 8,
/// attributes 9, status 15 (`message` 2, `code` 3), flags 16.
fn span(out: &mut Vec<u8>, s: &SpanRecord) {
    bytes(out, 1, &s.trace_id);
    bytes(out, 2, &s.span_id);
    if let Some(parent) = &s.parent {
        bytes(out, 4, parent);
    }
    bytes(out, 5, s.name.as_bytes());
    tag(out, 6, VARINT);
    varint(
        out,
        match s.kind {
            Kind::Internal => 1,
            Kind::Server => 2,
            Kind::Client => 3,
        },
    );
    tag(out, 7, FIXED64);
    out.extend_from_slice(&s.start_unix_nanos.to_le_bytes());
    tag(out, 8, FIXED64);
    out.extend_from_slice(&s.end_unix_nanos.to_le_bytes());
    for (key, value) in &s.attributes {
        attribute(out, 9, key, value);
    }
    if let Some(error) = &s.error {
        message(out, 15, |status| {
            bytes(status, 2, error.as_bytes());
            tag(status, 3, VARINT);
            varint(status, 2); // STATUS_CODE_ERROR
        });
    }
    // W3C flags (sampled) | has_is_remote (bit 8) | is_remote (bit 9) of the parent.
    let flags: u32 = 0x1 | 0x100 | if s.remote_parent { 0x200 } else { 0 };
    tag(out, 16, FIXED32);
    out.extend_from_slice(&flags.to_le_bytes());
}

/// One export request: one resource (`service.name`, `service.version`), one scope
/// (`tollgate`), the spans of `batch`.
pub fn export_request(service_name: &str, batch: &[SpanRecord]) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + 256 * batch.len());
    message(&mut out, 1, |resource_spans| {
        message(resource_spans, 1, |resource| {
            attribute(
                resource,
                1,
                "service.name",
                &Value::Str(service_name.into()),
            );
            attribute(
                resource,
                1,
                "service.version",
                &Value::Static(env!("CARGO_PKG_VERSION")),
            );
        });
        message(resource_spans, 2, |scope_spans| {
            message(scope_spans, 1, |scope| {
                bytes(scope, 1, b"tollgate");
                bytes(scope, 2, env!("CARGO_PKG_VERSION").as_bytes());
            });
            for s in batch {
                message(scope_spans, 2, |out| span(out, s));
            }
        });
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_are_little_endian_groups_of_seven() {
        let mut out = Vec::new();
        varint(&mut out, 1);
        varint(&mut out, 300);
        varint(&mut out, u64::MAX);
        assert_eq!(&out[..3], &[0x01, 0xac, 0x02]);
        assert_eq!(out.len(), 3 + 10);
        assert_eq!(out[12], 0x01);
    }

    #[test]
    fn a_negative_int_takes_ten_bytes_as_protobuf_int64_does() {
        let mut out = Vec::new();
        attribute(&mut out, 9, "k", &Value::Int(-1));
        // tag, len, [tag, len, "k", tag, len, [tag, 10 bytes]]
        assert_eq!(out.len(), 2 + 3 + 2 + 11);
    }
}
