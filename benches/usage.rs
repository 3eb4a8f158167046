//! Throughput of the OpenAI usage scanner (src/usage.rs) on one core: a 16 MiB event stream
//! of chat-completion chunks ending in a usage event, and a 16 MiB JSON completion, fed in
//! 64 KiB pieces as a body arrives. `cargo bench --bench usage`.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tollgate::usage::{Field, Format, Scanner};

const SIZE: usize = 16 * 1024 * 1024;
const PIECE: usize = 64 * 1024;

/// Chunk events as OpenAI streams them with `include_usage`, then the usage event.
fn event_stream() -> Vec<u8> {
    let mut body = Vec::with_capacity(SIZE + 1024);
    let mut i = 0;
    while body.len() < SIZE {
        body.extend_from_slice(
            format!(
                "data: {{\"id\":\"chatcmpl-9Fq2XyZ\",\"object\":\"chat.completion.chunk\",\"created\":1733200000,\
                 \"model\":\"gpt-4o-mini\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\" token {i} of a long answer, \\\"quoted\\\"\"}},\
                 \"finish_reason\":null}}],\"usage\":null}}\n\n"
            )
            .as_bytes(),
        );
        i += 1;
    }
    body.extend_from_slice(b"data: {\"id\":\"chatcmpl-9Fq2XyZ\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":12,\"total_tokens\":21}}\n\ndata: [DONE]\n\n");
    body
}

/// One completion whose message is a long string with escapes, usage last.
fn completion() -> Vec<u8> {
    let mut body = Vec::with_capacity(SIZE + 1024);
    body.extend_from_slice(b"{\"id\":\"chatcmpl-1\",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"");
    while body.len() < SIZE {
        body.extend_from_slice(b"A line of the answer with a \\\"quote\\\" and a newline\\n. ");
    }
    body.extend_from_slice(
        b"\"}}],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":12,\"total_tokens\":21}}",
    );
    body
}

fn scan(body: &[u8], format: Format) -> Option<u64> {
    let mut scanner = Scanner::new(Field::Total, format);
    for piece in body.chunks(PIECE) {
        scanner.feed(black_box(piece));
    }
    scanner.finish()
}

fn usage(c: &mut Criterion) {
    let mut group = c.benchmark_group("usage");
    let stream = event_stream();
    assert_eq!(scan(&stream, Format::EventStream), Some(21));
    group.throughput(Throughput::Bytes(stream.len() as u64));
    group.bench_function("event_stream_16MiB", |b| {
        b.iter(|| scan(&stream, Format::EventStream))
    });
    let json = completion();
    assert_eq!(scan(&json, Format::Json), Some(21));
    group.throughput(Throughput::Bytes(json.len() as u64));
    group.bench_function("json_16MiB", |b| b.iter(|| scan(&json, Format::Json)));
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = usage
}
criterion_main!(benches);
