//! Retries under `RING_HASH` and `MAGLEV` compared with a real Envoy 1.40. The route retries
//! 503s (`retriable_status_codes`, `num_retries` 2) avoiding hosts already tried
//! (`retry_host_predicate` `previous_hosts`, `host_selection_retry_max_attempts` 3). Envoy
//! re-picks deterministically from the request's hash (the ring's next points, Maglev's
//! `hash ^ (2^64 - attempt)`, the priority level from the hash), so for every key the host a
//! retry lands on is fixed: mesh must land on the same one, and try the same hosts.
//!
//! Skips (with the reason printed) when Envoy is not installed and `CI` is not set.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};

use crate::routing_oracle::{KeepAlive, PortUpstreams, envoy_log_line, oracles};
use crate::support::envoy::envoy_binary;

/// Keys asked per cluster.
const KEYS: usize = 100;

/// A cluster under test: its name (and virtual host), policy and endpoints as
/// `(priority, health, weight)`.
struct Case {
    name: &'static str,
    policy: &'static str,
    eps: Vec<(u32, &'static str, u32)>,
}

fn cases() -> Vec<Case> {
    let flat = vec![
        (0, "HEALTHY", 1),
        (0, "HEALTHY", 2),
        (0, "HEALTHY", 1),
        (0, "HEALTHY", 3),
        (0, "HEALTHY", 1),
    ];
    // Two levels: two of four hosts healthy in priority 0 give it 70 % of the load (1.4 × 50 %),
    // priority 1 the other 30 %, so the hash decides the level.
    let two_levels = vec![
        (0, "HEALTHY", 1),
        (0, "UNHEALTHY", 1),
        (0, "HEALTHY", 2),
        (0, "UNHEALTHY", 1),
        (1, "HEALTHY", 1),
        (1, "HEALTHY", 1),
        (1, "HEALTHY", 2),
    ];
    vec![
        Case {
            name: "ring",
            policy: "RING_HASH",
            eps: flat.clone(),
        },
        Case {
            name: "maglev",
            policy: "MAGLEV",
            eps: flat,
        },
        Case {
            name: "ring-prio",
            policy: "RING_HASH",
            eps: two_levels.clone(),
        },
        Case {
            name: "maglev-prio",
            policy: "MAGLEV",
            eps: two_levels,
        },
    ]
}

fn cluster_json(c: &Case, ports: &[u16]) -> Value {
    let mut prios: Vec<u32> = c.eps.iter().map(|e| e.0).collect();
    prios.dedup();
    let endpoints: Vec<Value> = prios
        .iter()
        .map(|&p| {
            let eps: Vec<Value> = c
                .eps
                .iter()
                .zip(ports)
                .filter(|(e, _)| e.0 == p)
                .map(|(e, port)| json!({
                    "endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}},
                    "health_status": e.1,
                    "load_balancing_weight": e.2,
                }))
                .collect();
            json!({"priority": p, "lb_endpoints": eps})
        })
        .collect();
    json!({"name": c.name, "type": "STATIC", "connect_timeout": "1s", "lb_policy": c.policy,
        "load_assignment": {"cluster_name": c.name, "endpoints": endpoints}})
}

/// Requests each port served (ports that served none left out).
fn served(up: &PortUpstreams) -> BTreeMap<u16, usize> {
    up.ports
        .iter()
        .map(|&p| (p, up.script.served(p)))
        .filter(|&(_, n)| n > 0)
        .collect()
}

/// The hosts a request tried: the ports whose served count grew, with how often.
fn tried(before: &BTreeMap<u16, usize>, after: &BTreeMap<u16, usize>) -> BTreeMap<u16, usize> {
    after
        .iter()
        .map(|(p, n)| (*p, n - before.get(p).copied().unwrap_or(0)))
        .filter(|&(_, n)| n > 0)
        .collect()
}

/// What a request gave: its status, the port that answered last (the body) and the hosts it
/// tried.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    status: u16,
    body: String,
    tried: BTreeMap<u16, usize>,
}

#[test]
fn hash_policy_retries_land_where_envoys_do() {
    if envoy_binary().is_none() {
        return;
    }
    let cases = cases();
    let total: usize = cases.iter().map(|c| c.eps.len()).sum();
    let up = PortUpstreams::start(total);
    let mut clusters = Vec::new();
    let mut vhosts = Vec::new();
    let mut ports_of = Vec::new();
    let mut at = 0;
    let retry = json!({
        "retry_on": "retriable-status-codes",
        "retriable_status_codes": [503],
        "num_retries": 2,
        "retry_back_off": {"base_interval": "0.001s", "max_interval": "0.002s"},
        "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}],
        "host_selection_retry_max_attempts": "3",
    });
    for c in &cases {
        let ports = &up.ports[at..at + c.eps.len()];
        at += c.eps.len();
        ports_of.push(ports.to_vec());
        clusters.push(cluster_json(c, ports));
        vhosts.push(
            json!({"name": c.name, "domains": [c.name], "routes": [{"match": {"prefix": "/"},
            "route": {"cluster": c.name, "retry_policy": retry,
                "hash_policy": [{"header": {"header_name": "x-key"}}]}}]}),
        );
    }
    let route_config = json!({"name": "hashretry", "virtual_hosts": vhosts});
    let o = oracles(
        "hashretry",
        &route_config,
        &clusters,
        |boot| {
            boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
                ["access_log"][0]["typed_config"]["log_format"]["text_format_source"]["inline_string"] = json!(
                "%REQ(:AUTHORITY)% %REQ(x-key)% %UPSTREAM_HOST% %UPSTREAM_REQUEST_ATTEMPT_COUNT% %RESPONSE_CODE%\n"
            );
        },
        None,
    );
    let mut client = KeepAlive::connect(o.port);
    // The upstream requests each Envoy request made, as the hosts counted them.
    let mut attempts: Vec<usize> = Vec::new();
    let mut envoy = |host: &str, key: &str| -> Outcome {
        let before = served(&up);
        let (status, body) = client.get(host, "/", &[("x-key", key)]);
        let tried = tried(&before, &served(&up));
        attempts.push(tried.values().sum());
        Outcome {
            status,
            body,
            tried,
        }
    };
    let mesh = |host: &str, key: &str| -> Outcome {
        let before = served(&up);
        let (status, body) = o.rt.block_on(async {
            let req = http::Request::get(format!("http://{host}/"))
                .header("x-key", key)
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap();
            let r = tokio::time::timeout(Duration::from_secs(20), o.mesh.request(req))
                .await
                .expect("mesh answers");
            let status = r.status().as_u16();
            use http_body_util::BodyExt;
            let b = r.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8_lossy(&b).into_owned())
        });
        Outcome {
            status,
            body,
            tried: tried(&before, &served(&up)),
        }
    };
    let mut disagreements = Vec::new();
    for (c, ports) in cases.iter().zip(&ports_of) {
        // How often the retry went elsewhere, and where keys first land.
        let (mut moved, mut third_tries) = (0, 0);
        let mut first_hosts = std::collections::BTreeSet::new();
        let started = std::time::Instant::now();
        for k in 0..KEYS {
            let key = format!("user-{k}");
            up.script.reset();
            // Where the key lands while every host answers 200.
            let probe = envoy(c.name, &key);
            assert_eq!(probe.status, 200, "{}", c.name);
            let first: u16 = probe.body.parse().unwrap();
            first_hosts.insert(first);
            // That host fails: the retry must avoid it.
            up.script.set_status(first, 503);
            let e = envoy(c.name, &key);
            let m = mesh(c.name, &key);
            // (A retry may land on it again: the ring's next points can be the same host's.)
            assert!(e.tried.contains_key(&first), "{} {key}: {e:?}", c.name);
            if e != m {
                disagreements.push(format!(
                    "{} {key} (first {first}): envoy {e:?} mesh {m:?}",
                    c.name
                ));
                continue;
            }
            if e.body != probe.body {
                moved += 1;
            }
            // The retry's host fails too: the third try avoids both.
            let second: u16 = e.body.parse().unwrap();
            if second == first {
                continue;
            }
            up.script.set_status(second, 503);
            let e = envoy(c.name, &key);
            let m = mesh(c.name, &key);
            if e != m {
                disagreements.push(format!(
                    "{} {key} (first {first}, second {second}): envoy {e:?} mesh {m:?}",
                    c.name
                ));
            } else if e.tried.len() == 3 {
                third_tries += 1;
            }
        }
        eprintln!(
            "{}: retries moved for {moved} of {KEYS} keys, {third_tries} third tries on a third host; first picks on {} of {} hosts ({:?})",
            c.name,
            first_hosts.len(),
            ports.len(),
            started.elapsed()
        );
        assert!(disagreements.is_empty(), "{}", disagreements.join("\n"));
        // The comparison is not trivial: keys spread, and retries move to other hosts.
        assert!(first_hosts.len() >= 2, "{}: {first_hosts:?}", c.name);
        assert!(moved >= KEYS / 2, "{}: {moved} retries moved", c.name);
        assert!(third_tries > 0, "{}", c.name);
    }
    // Envoy's own count of upstream attempts (`%UPSTREAM_REQUEST_ATTEMPT_COUNT%`) is the
    // hosts' count of its requests.
    envoy_log_line(&o.log, attempts.len() - 1);
    let text = std::fs::read_to_string(&o.log).unwrap();
    let logged: Vec<usize> = text
        .lines()
        .map(|l| l.split(' ').nth(3).and_then(|a| a.parse().ok()).unwrap())
        .collect();
    assert_eq!(logged, attempts);
}
