//! Istio's peer metadata exchange, encoded and decoded as mesh does it: the
//! `x-envoy-peer-metadata` header value (base64 of a protobuf `Struct`) an Istio 1.24 sidecar
//! really sent (`testdata/istio/peer-metadata-istio1.24.txt`), and the TCP exchange's frame
//! (`0x3D230467` + length + `Any{Struct}`) carrying the same metadata. No I/O.
//!
//! On the request path mesh encodes its own headers once per process and decodes a peer's
//! once per distinct header value (outbound: cached per host; inbound: cached per value), so
//! these are the costs of a cache miss, not of every request.

#![allow(missing_docs)] // criterion_group! generates undocumented items

use criterion::{Criterion, black_box, criterion_group, criterion_main};
use mesh_core::metadata_exchange::{FrameDecode, decode_frame, encode_frame};
use mesh_core::peer_metadata::PeerMetadata;

const ISTIO_1_24: &str = include_str!("../../testdata/istio/peer-metadata-istio1.24.txt");

fn field(key: &str) -> &'static str {
    ISTIO_1_24
        .lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .expect("field in testdata")
}

fn bench(c: &mut Criterion) {
    let header = field("metadata");
    let id = field("id");
    let metadata = PeerMetadata::decode_header(header.as_bytes()).expect("real header decodes");
    let encoded = metadata.encode_header();
    assert_eq!(
        PeerMetadata::decode_header(encoded.as_bytes()).ok(),
        Some(metadata.clone())
    );
    let frame = encode_frame(id, &metadata);
    assert!(matches!(
        decode_frame(&frame),
        FrameDecode::Done { result: Ok(_), .. }
    ));

    let mut g = c.benchmark_group("peer_metadata");
    g.bench_function("decode_header_istio1.24", |b| {
        b.iter(|| PeerMetadata::decode_header(black_box(header.as_bytes())))
    });
    g.bench_function("encode_header_istio1.24", |b| {
        b.iter(|| black_box(&metadata).encode_header())
    });
    g.bench_function("decode_tcp_frame", |b| {
        b.iter(|| decode_frame(black_box(&frame)))
    });
    g.bench_function("encode_tcp_frame", |b| {
        b.iter(|| encode_frame(black_box(id), black_box(&metadata)))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
