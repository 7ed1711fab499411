//! Stable, bounded fuzzing of decode + translate for every resource type and of config-dump
//! loading: seeds are real istiod resources (the deathstarbench dump) and the testkit's
//! generated ones, mutated at random; nothing may panic.
//!
//! By default each test runs a fixed number of iterations (seeded, reproducible); set
//! `MESH_FUZZ_SECS=60` to run each for that long instead (scripts/fuzz.sh does when
//! cargo-fuzz or nightly is not available). `MESH_FUZZ_SEED` picks another seed.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use mesh_xds::dump::ConfigDump;
use mesh_xds::fuzzing::{
    TYPES, decode_and_translate, dump_seeds, load_config_dump, mutate, testkit_seeds,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn budget(default_iterations: u64) -> (u64, Option<Duration>) {
    match std::env::var("MESH_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    {
        Some(s) => (u64::MAX, Some(Duration::from_secs(s))),
        None => (default_iterations, None),
    }
}

fn rng() -> StdRng {
    let seed = std::env::var("MESH_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x6d65_7368);
    StdRng::seed_from_u64(seed)
}

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../testdata/istio")
        .join(name)
}

/// Seeds per type: the dump's resources (when present) and the testkit's.
fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let dump = ConfigDump::load(&data("deathstarbench-geo-istio1.18_config_dump.json"))
        .expect("testdata/istio holds the deathstarbench dump");
    let mut out = dump_seeds(&dump);
    out.extend(testkit_seeds());
    out
}

#[test]
fn fuzz_decode_and_translate_every_type() {
    let seeds = seeds();
    assert!(!seeds.is_empty());
    // Every seed translates as is (the dump's and the testkit's resources are valid).
    let mut accepted = 0;
    for (t, b) in &seeds {
        if decode_and_translate(t, b).is_ok() {
            accepted += 1;
        }
    }
    assert_eq!(accepted, seeds.len(), "a seed was rejected");
    let (iterations, time) = budget(20_000);
    let start = Instant::now();
    let mut rng = rng();
    let mut rejected = 0u64;
    let mut n = 0u64;
    while n < iterations && time.is_none_or(|t| start.elapsed() < t) {
        let (t, seed) = &seeds[rng.random_range(0..seeds.len())];
        let mut input = seed.clone();
        for _ in 0..rng.random_range(1..8) {
            mutate(&mut input, &mut rng);
        }
        // Also feed it as another type now and then: a confused server.
        let ty = if rng.random_bool(0.1) {
            TYPES[rng.random_range(0..TYPES.len())]
        } else {
            t
        };
        if decode_and_translate(ty, &input).is_err() {
            rejected += 1;
        }
        n += 1;
    }
    println!("{n} inputs, {rejected} rejected");
    assert!(rejected > 0, "mutations never produced a bad resource");
}

/// Structural mutation of protobuf-JSON: swap a value for another JSON type or drop a key.
fn mutate_json(v: &mut serde_json::Value, rng: &mut StdRng, depth: usize) {
    use serde_json::Value;
    let replacement = |rng: &mut StdRng| match rng.random_range(0..7) {
        0 => Value::Null,
        1 => Value::Bool(true),
        2 => Value::from(-1),
        3 => Value::from("x"),
        4 => Value::Array(vec![Value::from(1)]),
        5 => serde_json::json!({"@type": "type.googleapis.com/no.such.Type", "a": 1}),
        _ => Value::from(1e300),
    };
    match v {
        Value::Object(m) if !m.is_empty() => {
            let keys: Vec<String> = m.keys().cloned().collect();
            let k = &keys[rng.random_range(0..keys.len())];
            if depth > 0 && rng.random_bool(0.8) {
                if let Some(child) = m.get_mut(k) {
                    mutate_json(child, rng, depth - 1);
                }
            } else if rng.random_bool(0.5) {
                m.remove(k);
            } else {
                m.insert(k.clone(), replacement(rng));
            }
        }
        Value::Array(a) if !a.is_empty() => {
            let i = rng.random_range(0..a.len());
            if depth > 0 && rng.random_bool(0.8) {
                mutate_json(&mut a[i], rng, depth - 1);
            } else {
                a[i] = replacement(rng);
            }
        }
        other => *other = replacement(rng),
    }
}

#[test]
fn fuzz_config_dump_loading() {
    let mut seeds = Vec::new();
    for f in [
        "istioctl-proxyconfig_config_dump.json",
        "istioctl-describe_http_config.json",
        "istioctl-secret-istio_config_dump.json",
    ] {
        if let Ok(t) = std::fs::read_to_string(data(f)) {
            seeds.push(serde_json::from_str::<serde_json::Value>(&t).unwrap());
        }
    }
    assert!(!seeds.is_empty(), "testdata/istio holds the real dumps");
    for s in &seeds {
        assert!(load_config_dump(s.to_string().as_bytes()).is_some());
    }
    let (iterations, time) = budget(400);
    let start = Instant::now();
    let mut rng = rng();
    let mut n = 0u64;
    while n < iterations && time.is_none_or(|t| start.elapsed() < t) {
        let mut v = seeds[rng.random_range(0..seeds.len())].clone();
        for _ in 0..rng.random_range(1..4) {
            mutate_json(&mut v, &mut rng, 12);
        }
        let mut text = v.to_string().into_bytes();
        if rng.random_bool(0.2) {
            mutate(&mut text, &mut rng);
        }
        let _ = load_config_dump(&text);
        n += 1;
    }
    println!("{n} dumps");
}
