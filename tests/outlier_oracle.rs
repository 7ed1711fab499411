//! Outlier detection, mesh against a real Envoy 1.40: the same static clusters (round robin
//! over upstreams on 127.0.0.1 whose status the test sets per port, no retries so attempts are
//! 1:1 with requests), the same sequential traffic through each, then the same outcome: which
//! endpoint is ejected, that it serves nothing while ejected, that `max_ejection_percent`
//! refuses a second ejection, that the host comes back after its time, and the
//! `outlier_detection.ejections_*` counters (Envoy's admin `/stats` and `/clusters` against
//! [`mesh_tower::outbound::Outbound::outlier_detection`]). Cases: consecutive 5xx (and the
//! return), consecutive gateway failure, the `max_ejection_percent` cap, a refused connection
//! as a 503 without the split, ejections down to the panic threshold, and with
//! `split_external_local_origin_errors` consecutive local-origin failure, local-origin success
//! rate and local-origin failure percentage; external success rate. Envoy ejects on its main
//! thread a moment after the failing response, so every wait for an ejection is a bounded
//! poll, and no assertion depends on how long anything took.

use crate::routing_oracle::{KeepAlive, PortUpstreams, envoy_and_mesh};
use crate::support::envoy::{EnvoyProcess, closed_port, envoy_binary};

use std::time::Duration;

use mesh_core::outlier::EjectionType;
use serde_json::{Value, json};

/// One proxy under test.
enum Side {
    Envoy(EnvoyProcess, KeepAlive),
    Mesh(tokio::runtime::Runtime, mesh_tower::outbound::Outbound),
}

impl Side {
    fn name(&self) -> &'static str {
        match self {
            Side::Envoy(..) => "envoy",
            Side::Mesh(..) => "mesh",
        }
    }

    /// The status of `GET http://<cluster>/` (each cluster has a virtual host of its name).
    fn get(&mut self, cluster: &str) -> u16 {
        match self {
            Side::Envoy(_, client) => client.get(cluster, "/", &[]).0,
            Side::Mesh(rt, out) => rt.block_on(async {
                out.get(format!("http://{cluster}/"))
                    .await
                    .expect("mesh answers")
                    .status()
                    .as_u16()
            }),
        }
    }

    /// The ports of the cluster's ejected hosts (Envoy: `/clusters` health flags).
    fn ejected(&self, cluster: &str) -> Vec<u16> {
        let mut ports: Vec<u16> = match self {
            Side::Envoy(envoy, _) => {
                let (_, body) = envoy.admin_get("/clusters").expect("admin /clusters");
                let prefix = format!("{cluster}::127.0.0.1:");
                body.lines()
                    .filter(|l| {
                        l.contains("::health_flags::") && l.contains("failed_outlier_check")
                    })
                    .filter_map(|l| {
                        l.strip_prefix(prefix.as_str())?
                            .split("::")
                            .next()?
                            .parse()
                            .ok()
                    })
                    .collect()
            }
            Side::Mesh(_, out) => out
                .outlier_detection(cluster)
                .map(|s| s.ejected.iter().map(|a| a.port()).collect())
                .unwrap_or_default(),
        };
        ports.sort();
        ports
    }

    /// The cluster's `outlier_detection.<stat>` counter or gauge.
    fn stat(&self, cluster: &str, stat: &str) -> u64 {
        match self {
            Side::Envoy(envoy, _) => envoy
                .stat(&format!("cluster.{cluster}.outlier_detection.{stat}"))
                .unwrap_or(0),
            Side::Mesh(_, out) => {
                let Some(s) = out.outlier_detection(cluster) else {
                    return 0;
                };
                let c = &s.counts;
                let by_type = |prefix: &str, of: &[u64]| {
                    let suffix = stat.strip_prefix(prefix)?;
                    let t = EjectionType::ALL
                        .iter()
                        .find(|t| t.stat_suffix() == suffix)?;
                    Some(of[t.index()])
                };
                match stat {
                    "ejections_active" => s.ejected.len() as u64,
                    "ejections_enforced_total" => c.enforced_total(),
                    "ejections_overflow" => c.overflow,
                    "ejections_total" => c.total,
                    _ => by_type("ejections_detected_", &c.detected)
                        .or_else(|| by_type("ejections_enforced_", &c.enforced))
                        .unwrap_or_else(|| panic!("no mesh counter for {stat}")),
                }
            }
        }
    }

    /// Polls (bounded: 10 s) until `done` holds; whether it did.
    fn wait(&self, mut done: impl FnMut(&Side) -> bool) -> bool {
        for _ in 0..200 {
            if done(self) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        done(self)
    }

    /// Polls (bounded: 0.5 s) until `done` holds; whether it did.
    fn wait_briefly(&self, done: impl Fn(&Side) -> bool) -> bool {
        (0..10).any(|_| {
            std::thread::sleep(Duration::from_millis(50));
            done(self)
        })
    }

    /// Sends requests to `cluster` until `port` has served `more` more (bounded).
    fn drive_until_served(&mut self, up: &PortUpstreams, cluster: &str, port: u16, more: usize) {
        let n = up.script.served(port) + more;
        for _ in 0..200 {
            if up.script.served(port) >= n {
                return;
            }
            self.get(cluster);
        }
        panic!(
            "{}: {cluster}: port {port} served {} of {n}",
            self.name(),
            up.script.served(port)
        );
    }

    /// The counters named in `stats`, in order.
    fn stats(&self, cluster: &str, stats: &[&str]) -> Vec<(String, u64)> {
        stats
            .iter()
            .map(|s| (s.to_string(), self.stat(cluster, s)))
            .collect()
    }
}

/// What one side did with a scenario, compared between the sides.
#[derive(Debug, PartialEq)]
struct Outcome {
    /// Indexes (into the cluster's endpoints) of the hosts ejected when the ejection was seen.
    ejected: Vec<usize>,
    /// Whether the ejected host served again later (scenarios that wait for it).
    returned: Option<bool>,
    counters: Vec<(String, u64)>,
}

const COUNTERS: [&str; 8] = [
    "ejections_enforced_total",
    "ejections_total",
    "ejections_overflow",
    "ejections_detected_consecutive_5xx",
    "ejections_enforced_consecutive_5xx",
    "ejections_detected_consecutive_gateway_failure",
    "ejections_enforced_consecutive_gateway_failure",
    "ejections_active",
];

const SWEEP_COUNTERS: [&str; 12] = [
    "ejections_enforced_total",
    "ejections_total",
    "ejections_detected_local_origin_success_rate",
    "ejections_enforced_local_origin_success_rate",
    "ejections_detected_local_origin_failure_percentage",
    "ejections_enforced_local_origin_failure_percentage",
    "ejections_detected_success_rate",
    "ejections_enforced_success_rate",
    "ejections_detected_consecutive_local_origin_failure",
    "ejections_enforced_consecutive_local_origin_failure",
    "ejections_detected_consecutive_5xx",
    "ejections_enforced_consecutive_5xx",
];

fn index_of(ports: &[u16], ejected: &[u16]) -> Vec<usize> {
    let mut v: Vec<usize> = ejected
        .iter()
        .map(|p| ports.iter().position(|x| x == p).expect("a cluster port"))
        .collect();
    v.sort();
    v
}

/// Endpoint 0 answers `status` until it is ejected by a consecutive-error threshold of 3; it
/// then serves nothing while ejected, is healed, and (when `wait_return`) serves again after
/// its ejection time.
fn consecutive_errors(
    side: &mut Side,
    up: &PortUpstreams,
    cluster: &str,
    status: u16,
    wait_return: bool,
) -> Outcome {
    let ports = &up.ports[..4];
    let bad = ports[0];
    up.script.set_status(bad, status);
    side.drive_until_served(up, cluster, bad, 3);
    assert!(
        side.wait(|s| !s.ejected(cluster).is_empty()),
        "{}: {cluster}: nothing ejected after 3 × {status}",
        side.name()
    );
    let ejected = index_of(ports, &side.ejected(cluster));
    up.script.set_status(bad, 200);
    // While it stays ejected it serves nothing.
    let before = up.script.served(bad);
    for _ in 0..6 {
        assert_eq!(side.get(cluster), 200, "{}: {cluster}", side.name());
    }
    if side.ejected(cluster) == [bad] {
        assert_eq!(
            up.script.served(bad),
            before,
            "{}: {cluster}: an ejected host served",
            side.name()
        );
    }
    let counters = side.stats(cluster, &COUNTERS);
    let returned = wait_return.then(|| {
        // Back after base_ejection_time (and the next interval sweep): bounded at 30 s.
        (0..300).any(|_| {
            side.get(cluster);
            std::thread::sleep(Duration::from_millis(100));
            up.script.served(bad) > before
        })
    });
    Outcome {
        ejected,
        returned,
        counters,
    }
}

/// `max_ejection_percent` 25 of 4 hosts: endpoint 0 is ejected; endpoint 1 then reaches the
/// threshold too, the ejection overflows, and it keeps serving.
fn ejection_cap(side: &mut Side, up: &PortUpstreams, cluster: &str) -> Outcome {
    let ports = &up.ports[..4];
    up.script.set_status(ports[0], 503);
    side.drive_until_served(up, cluster, ports[0], 3);
    assert!(
        side.wait(|s| !s.ejected(cluster).is_empty()),
        "{}: {cluster}: nothing ejected",
        side.name()
    );
    up.script.set_status(ports[1], 503);
    side.drive_until_served(up, cluster, ports[1], 3);
    assert!(
        side.wait(|s| s.stat(cluster, "ejections_overflow") >= 1),
        "{}: {cluster}: no overflow: {:?} ejected {:?}",
        side.name(),
        side.stats(cluster, &COUNTERS),
        side.ejected(cluster)
    );
    let ejected = index_of(ports, &side.ejected(cluster));
    up.script.set_status(ports[1], 200);
    let before = up.script.served(ports[1]);
    for _ in 0..6 {
        side.get(cluster);
    }
    assert!(
        up.script.served(ports[1]) > before,
        "{}: {cluster}: the refused host must keep serving",
        side.name()
    );
    Outcome {
        ejected,
        returned: None,
        counters: side.stats(cluster, &COUNTERS),
    }
}

/// Three of four endpoints answer 503 until all three are ejected (`max_ejection_percent`
/// 100): one healthy host of four is under the panic threshold (25 % × 1.4 < 50 %), so the
/// balancer spreads requests over every host again, ejected or not, as Envoy does.
fn ejections_to_panic(side: &mut Side, up: &PortUpstreams, cluster: &str) -> Outcome {
    let ports = &up.ports[..4];
    for p in &ports[..3] {
        up.script.set_status(*p, 503);
    }
    let three = |s: &Side| s.ejected(cluster).len() == 3;
    let mut seen = false;
    for _ in 0..300 {
        side.get(cluster);
        if three(side) || side.wait_briefly(three) {
            seen = true;
            break;
        }
    }
    assert!(
        seen,
        "{}: {cluster}: {:?} ejected",
        side.name(),
        side.ejected(cluster)
    );
    let ejected = index_of(ports, &side.ejected(cluster));
    for p in &ports[..3] {
        up.script.set_status(*p, 200);
    }
    // Until every host has served (bounded: Envoy's workers see the third ejection a moment
    // after its main thread).
    let before: Vec<usize> = ports.iter().map(|p| up.script.served(*p)).collect();
    let counts = |up: &PortUpstreams| -> Vec<usize> {
        ports
            .iter()
            .zip(&before)
            .map(|(p, b)| up.script.served(*p) - b)
            .collect()
    };
    for _ in 0..200 {
        if counts(up).iter().all(|n| *n > 0) {
            break;
        }
        assert_eq!(side.get(cluster), 200, "{}: {cluster}", side.name());
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "{}: {cluster}: served in panic {:?}",
        side.name(),
        counts(up)
    );
    let served = counts(up).iter().all(|n| *n > 0);
    assert!(
        three(side),
        "{}: {cluster}: three stay ejected",
        side.name()
    );
    Outcome {
        ejected,
        returned: Some(served),
        counters: side.stats(cluster, &COUNTERS),
    }
}

/// With `split_external_local_origin_errors` and `consecutive_local_origin_failure` 2,
/// endpoint 0 closes every connection without answering: each attempt got a connection first
/// (a local-origin success) before its reset (a failure), so the run never reaches 2 and
/// nothing is ejected, in Envoy as in mesh.
fn resets_after_connecting(side: &mut Side, up: &PortUpstreams, cluster: &str) -> Outcome {
    let ports = &up.ports[..4];
    up.script.set_status(ports[0], 0);
    let mut resets = 0;
    for _ in 0..24 {
        if side.get(cluster) == 503 {
            resets += 1;
        }
    }
    assert!(resets >= 4, "{}: {cluster}: {resets} resets", side.name());
    // Envoy ejects on its main thread: give it the time to (not) do it.
    side.wait_briefly(|s| !s.ejected(cluster).is_empty());
    Outcome {
        ejected: index_of(ports, &side.ejected(cluster)),
        returned: None,
        counters: side.stats(cluster, &SWEEP_COUNTERS),
    }
}

/// Five endpoints of which the last (`fifth`) fails, by refusing connections or by its
/// answers: traffic until it is ejected (by a threshold or a sweep, as the cluster says).
fn fifth_fails(side: &mut Side, up: &PortUpstreams, cluster: &str, fifth: u16) -> Outcome {
    let mut ports = up.ports[..4].to_vec();
    ports.push(fifth);
    let mut seen = false;
    for _ in 0..600 {
        side.get(cluster);
        if !side.ejected(cluster).is_empty() {
            seen = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(seen, "{}: {cluster}: nothing ejected", side.name());
    // Ejected for 30 s: every request is answered by the others now.
    for _ in 0..8 {
        assert_eq!(side.get(cluster), 200, "{}: {cluster}", side.name());
    }
    Outcome {
        ejected: index_of(&ports, &side.ejected(cluster)),
        returned: None,
        counters: side.stats(cluster, &SWEEP_COUNTERS),
    }
}

fn cluster(name: &str, ports: &[u16], od: Value) -> Value {
    let eps: Vec<Value> = ports
        .iter()
        .map(|p| json!({"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}))
        .collect();
    json!({"name": name, "type": "STATIC", "connect_timeout": "1s", "lb_policy": "ROUND_ROBIN",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": eps}]},
        "outlier_detection": od})
}

#[test]
fn outlier_ejections_match_envoy() {
    if envoy_binary().is_none() {
        return;
    }
    let up = PortUpstreams::start(5);
    let four = &up.ports[..4];
    // The fifth endpoint: a closed port, or the fifth upstream answering 500.
    let (_dead_socket, dead) = closed_port();
    let mut five = four.to_vec();
    five.push(dead);
    let erring = up.ports[4];
    let mut five_erring = four.to_vec();
    five_erring.push(erring);
    let base = json!({"interval": "1s", "base_ejection_time": "30s", "max_ejection_percent": 50,
        "enforcing_success_rate": 0});
    let with = |extra: Value| {
        let mut od = base.clone();
        od.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        od
    };
    let local = json!({"split_external_local_origin_errors": true,
        "consecutive_local_origin_failure": 1000, "consecutive_5xx": 1000,
        "max_ejection_percent": 100, "success_rate_request_volume": 3,
        "failure_percentage_request_volume": 3});
    let clusters = vec![
        cluster(
            "c5xx",
            four,
            with(json!({"consecutive_5xx": 3, "base_ejection_time": "2s"})),
        ),
        cluster(
            "gateway",
            four,
            with(
                json!({"consecutive_5xx": 10, "consecutive_gateway_failure": 3,
                "enforcing_consecutive_gateway_failure": 100}),
            ),
        ),
        cluster(
            "cap",
            four,
            with(json!({"consecutive_5xx": 3, "max_ejection_percent": 25})),
        ),
        cluster("local_sr", &five, with(local.clone())),
        cluster(
            "local_fp",
            &five,
            with({
                let mut v = local.clone();
                v["enforcing_local_origin_success_rate"] = json!(0);
                v["enforcing_failure_percentage_local_origin"] = json!(100);
                v
            }),
        ),
        cluster(
            "panic",
            four,
            with(json!({"consecutive_5xx": 3, "max_ejection_percent": 100})),
        ),
        cluster(
            "resets",
            four,
            with(json!({"split_external_local_origin_errors": true,
                "consecutive_local_origin_failure": 2, "consecutive_5xx": 1000,
                "max_ejection_percent": 100})),
        ),
        // Without the split a refused connection is a 503 to consecutive_5xx.
        cluster(
            "refused_5xx",
            &five,
            with(json!({"consecutive_5xx": 3, "max_ejection_percent": 100})),
        ),
        cluster(
            "local_consecutive",
            &five,
            with(json!({"split_external_local_origin_errors": true,
                "consecutive_local_origin_failure": 3, "consecutive_5xx": 3,
                "max_ejection_percent": 100})),
        ),
        // External success rate: the fifth answers 500 to everything.
        cluster(
            "external_sr",
            &five_erring,
            with(
                json!({"consecutive_5xx": 1000, "enforcing_success_rate": 100,
                "success_rate_request_volume": 3, "max_ejection_percent": 100}),
            ),
        ),
    ];
    let vhosts: Vec<Value> = clusters
        .iter()
        .map(|c| {
            let n = c["name"].as_str().unwrap();
            json!({"name": n, "domains": [n], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": n}}]})
        })
        .collect();
    let route_config = json!({"name": "outlier", "virtual_hosts": vhosts});
    let (envoy, port, _, rt, mesh) = envoy_and_mesh("outlier", &route_config, &clusters);
    let mut sides = [
        Side::Envoy(envoy, KeepAlive::connect(port)),
        Side::Mesh(rt, mesh),
    ];

    let mut results: Vec<(&str, Vec<Outcome>)> = Vec::new();
    for side in &mut sides {
        let mut v = Vec::new();
        up.script.reset();
        v.push(consecutive_errors(side, &up, "c5xx", 503, true));
        up.script.reset();
        v.push(consecutive_errors(side, &up, "gateway", 502, false));
        up.script.reset();
        v.push(ejection_cap(side, &up, "cap"));
        up.script.reset();
        v.push(ejections_to_panic(side, &up, "panic"));
        up.script.reset();
        v.push(resets_after_connecting(side, &up, "resets"));
        up.script.reset();
        v.push(fifth_fails(side, &up, "local_sr", dead));
        v.push(fifth_fails(side, &up, "local_fp", dead));
        v.push(fifth_fails(side, &up, "refused_5xx", dead));
        v.push(fifth_fails(side, &up, "local_consecutive", dead));
        up.script.set_status(erring, 500);
        v.push(fifth_fails(side, &up, "external_sr", erring));
        eprintln!("{}: {v:?}", side.name());
        results.push((side.name(), v));
    }
    let (envoy, mesh) = (&results[0].1, &results[1].1);
    // The outcomes are the expected ones (so agreeing means something)…
    let counter = |o: &Outcome, name: &str| {
        o.counters
            .iter()
            .find(|c| c.0 == name)
            .map(|c| c.1)
            .unwrap()
    };
    assert_eq!(envoy[0].ejected, [0]);
    assert_eq!(envoy[0].returned, Some(true));
    assert_eq!(counter(&envoy[0], "ejections_enforced_consecutive_5xx"), 1);
    assert_eq!(
        counter(&envoy[1], "ejections_enforced_consecutive_gateway_failure"),
        1
    );
    assert_eq!(envoy[2].ejected, [0]);
    assert_eq!(counter(&envoy[2], "ejections_overflow"), 1);
    // Panic: all four serve again though three stay ejected.
    assert_eq!(envoy[3].ejected, [0, 1, 2]);
    assert_eq!(envoy[3].returned, Some(true));
    assert_eq!(counter(&envoy[3], "ejections_enforced_total"), 3);
    assert_eq!(envoy[4].ejected, Vec::<usize>::new());
    for (i, stat) in [
        (5, "ejections_enforced_local_origin_success_rate"),
        (6, "ejections_enforced_local_origin_failure_percentage"),
        (7, "ejections_enforced_consecutive_5xx"),
        (8, "ejections_enforced_consecutive_local_origin_failure"),
        (9, "ejections_enforced_success_rate"),
    ] {
        assert_eq!(envoy[i].ejected, [4], "{stat}");
        assert_eq!(counter(&envoy[i], stat), 1, "{stat}");
    }
    // …and mesh's are the same.
    assert_eq!(envoy, mesh);
}
