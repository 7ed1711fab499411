//! Entry points for fuzzing: arbitrary bytes through the same decode + translate path the ADS
//! client uses, and arbitrary text through the config-dump loader. Used by the cargo-fuzz
//! targets in `fuzz/` (seeded by `examples/fuzz_seeds.rs`) and by the stable, bounded mutation
//! runner in `tests/xds_fuzz.rs`. Neither may panic, whatever the input.

use envoy_types::pb::google::protobuf::Any;
use rand::Rng;

use crate::ads::{CLUSTER, ENDPOINT, LISTENER, NAME_TABLE, ROUTE};

/// The resource types the fuzzers drive.
pub const TYPES: [&str; 5] = [CLUSTER, ENDPOINT, LISTENER, ROUTE, NAME_TABLE];

/// Decodes `bytes` as a resource of `type_url` and translates it as the ADS client would, then
/// scans it for extensions; `Err` is the NACK text.
pub fn decode_and_translate(type_url: &str, bytes: &[u8]) -> Result<(), String> {
    let any = Any {
        type_url: type_url.to_owned(),
        value: bytes.to_vec(),
    };
    let r = if type_url == NAME_TABLE {
        crate::translate::from_any::<crate::istio_proto::NameTable>(&any).and_then(|t| {
            crate::translate::translate_name_table(&t)
                .map(drop)
                .map_err(|e| e.to_string())
        })
    } else {
        crate::check::translate_any(type_url, &any)
    };
    if r.is_ok() {
        let _ = crate::extensions::ignored_top_level(&any);
        let _ = crate::extensions::ignored_extensions(&any);
    }
    r
}

/// Loads `bytes` as a config dump (JSON) and checks every resource; returns the number of
/// resources read, or `None` when the text is not a dump.
pub fn load_config_dump(bytes: &[u8]) -> Option<usize> {
    let text = std::str::from_utf8(bytes).ok()?;
    let dump = crate::dump::ConfigDump::from_json_str(text).ok()?;
    let report = crate::check::check(&dump);
    Some(report.accepted() + report.rejected())
}

/// The fuzz target that drives resources of `type_url` (`fuzz/fuzz_targets/<name>.rs`).
pub fn target_name(type_url: &str) -> Option<&'static str> {
    Some(match type_url {
        CLUSTER => "decode_cluster",
        ENDPOINT => "decode_endpoint",
        LISTENER => "decode_listener",
        ROUTE => "decode_route",
        NAME_TABLE => "decode_name_table",
        _ => return None,
    })
}

/// Seed inputs for the decode fuzzers: every resource of the fuzzed types in `dump` (real
/// istiod output), as the bytes the ADS client would receive.
pub fn dump_seeds(dump: &crate::dump::ConfigDump) -> Vec<(&'static str, Vec<u8>)> {
    dump.resources
        .iter()
        .filter_map(|r| {
            let t = TYPES.iter().find(|t| **t == r.type_url)?;
            Some((*t, r.resource.value.clone()))
        })
        .collect()
}

/// Seed inputs the testkit's istiod-shaped generator renders for a small mesh (an HTTP and a
/// TCP port, one endpoint): covers the name table, which config dumps do not hold.
#[cfg(feature = "testkit")]
pub fn testkit_seeds() -> Vec<(&'static str, Vec<u8>)> {
    use crate::testkit::{EndpointSpec, MeshModel, Protocol, ServiceSpec};
    let model = MeshModel::default().service(
        ServiceSpec::new("a", "default", std::net::Ipv4Addr::new(10, 0, 0, 1).into())
            .port(80, Protocol::Http)
            .port(5432, Protocol::Tcp)
            .endpoint(EndpointSpec::new(std::net::SocketAddr::from((
                [127, 0, 0, 1],
                80,
            )))),
    );
    let mut out = Vec::new();
    for (t, items) in model.generate("default") {
        let Some(t) = TYPES.iter().find(|x| **x == t) else {
            continue;
        };
        out.extend(items.values().map(|a| (*t, a.value.clone())));
    }
    out
}

/// One random edit of `data` (bit flip, byte set, insert, delete, duplicate a span, truncate):
/// the mutation step of the stable runner.
pub fn mutate(data: &mut Vec<u8>, rng: &mut impl Rng) {
    const INTERESTING: [u8; 8] = [0x00, 0x01, 0x7f, 0x80, 0xff, 0x08, 0x12, 0x0a];
    if data.is_empty() {
        data.push(rng.random());
        return;
    }
    let i = rng.random_range(0..data.len());
    match rng.random_range(0..6) {
        0 => data[i] ^= 1 << rng.random_range(0..8),
        1 => data[i] = INTERESTING[rng.random_range(0..INTERESTING.len())],
        2 => data.insert(i, rng.random()),
        3 => {
            data.remove(i);
        }
        4 => {
            let end = (i + rng.random_range(1..16)).min(data.len());
            let span: Vec<u8> = data[i..end].to_vec();
            let at = rng.random_range(0..=data.len());
            data.splice(at..at, span);
        }
        _ => data.truncate(i),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_never_panics() {
        for t in TYPES {
            for b in [
                &b""[..],
                b"\xff\xff\xff",
                b"\x0a\x05hello",
                b"\x12\x80\x80\x80\x80\x10",
            ] {
                let _ = decode_and_translate(t, b);
            }
        }
        assert_eq!(load_config_dump(b"\xff"), None);
        assert_eq!(load_config_dump(br#"{"configs":[]}"#), Some(0));
    }
}
