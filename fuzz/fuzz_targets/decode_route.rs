//! Arbitrary bytes as a ROUTE resource: decode + translate + extension scan must not panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = mesh_xds::fuzzing::decode_and_translate(mesh_xds::ads::ROUTE, data);
});
