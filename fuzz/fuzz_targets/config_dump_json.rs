//! Arbitrary text as an Envoy config dump: loading and checking must not panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = mesh_xds::fuzzing::load_config_dump(data);
});
