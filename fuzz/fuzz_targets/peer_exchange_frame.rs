//! Arbitrary bytes as what a peer sends first on an `istio-peer-exchange` connection: reading
//! the TCP metadata exchange frame must not panic, and never consumes more than it was given.
#![no_main]

use mesh_core::metadata_exchange::{FrameDecode, decode_frame};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    match decode_frame(data) {
        FrameDecode::Incomplete(need) => assert!(need > data.len()),
        FrameDecode::Done { consumed, .. } => assert!(consumed <= data.len()),
    }
});
