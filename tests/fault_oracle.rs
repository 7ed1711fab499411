//! Fault injection compared with a real Envoy 1.40: the same `RouteConfiguration`, whose
//! routes carry `typed_per_filter_config` `envoy.filters.http.fault` (Istio's VirtualService
//! `fault`), goes into Envoy (static config with the fault filter before the router) and into
//! mesh (the proto through mesh-xds' translator, mesh's outbound path); the same requests must
//! get the same status, body, gRPC status and response flags (`FI`, `DI`), and a 50% abort
//! must abort about as often in both.
//!
//! Skips (with the reason printed) when Envoy is not installed and `CI` is not set.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::routing_oracle::{KeepAlive, Oracles, PortUpstreams, envoy_log_line, oracles};
use crate::support::envoy::envoy_binary;
use crate::support::routes::{CHI2_999, chi_square};

const FAULT_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault";

/// The fixed delay of the `delay` route.
const DELAY: Duration = Duration::from_millis(300);

/// A virtual host `name` whose one route goes to cluster `up` with `fault` as its
/// per-route fault config.
fn vhost(name: &str, fault: Value) -> Value {
    let mut fault = fault;
    fault["@type"] = json!(FAULT_TYPE);
    json!({"name": name, "domains": [name], "routes": [{"match": {"prefix": "/"},
        "route": {"cluster": "up"},
        "typed_per_filter_config": {"envoy.filters.http.fault": fault}}]})
}

fn pct(n: u32) -> Value {
    json!({"numerator": n, "denominator": "HUNDRED"})
}

/// Puts the fault filter before the router in Envoy's bootstrap.
fn with_fault_filter(boot: &mut Value) {
    let filters =
        boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
            ["http_filters"]
            .as_array_mut()
            .unwrap();
    filters.insert(
        0,
        json!({"name": "envoy.filters.http.fault", "typed_config": {"@type": FAULT_TYPE}}),
    );
}

/// What a response says, as compared: status, the gRPC headers, the body (the upstream's port
/// is "upstream"), the response flags.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Outcome {
    pub(crate) status: u16,
    pub(crate) grpc: Vec<(String, String)>,
    pub(crate) body: String,
    pub(crate) flags: String,
}

/// The headers that tell a gRPC local reply (and the content type and `location` of every
/// local reply).
fn grpc_headers<'a>(
    headers: impl Iterator<Item = (&'a str, &'a str)>,
    upstream: bool,
) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = headers
        .filter(|(k, _)| {
            k.starts_with("grpc-") || (!upstream && matches!(*k, "content-type" | "location"))
        })
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    v.sort();
    v
}

fn body_class(body: String, up: &[u16]) -> String {
    match body.parse::<u16>() {
        Ok(p) if up.contains(&p) => "upstream".into(),
        _ => body,
    }
}

/// Envoy (over one keep-alive connection) and mesh side by side, counting Envoy's access-log
/// lines; upstream answers (the port of one of `up`) read "upstream".
pub(crate) struct Oracle {
    pub(crate) envoy: KeepAlive,
    pub(crate) logged: usize,
    pub(crate) pair: Oracles,
    pub(crate) up: Vec<u16>,
}

impl Oracle {
    /// (Envoy's outcome without its flags, its access-log line number, how long Envoy took).
    /// The flags come from [`flags`](Self::flags) once Envoy has flushed its log.
    fn envoy(&mut self, host: &str, headers: &[(&str, &str)]) -> (Outcome, usize, Duration) {
        self.envoy_request("GET", host, "/", headers)
    }

    /// [`envoy`](Self::envoy) with any method and path.
    pub(crate) fn envoy_request(
        &mut self,
        method: &str,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (Outcome, usize, Duration) {
        let start = Instant::now();
        let (status, h, body) = self.envoy.request(method, host, path, headers);
        let took = start.elapsed();
        let line = self.logged;
        self.logged += 1;
        let upstream = body.parse::<u16>().is_ok_and(|p| self.up.contains(&p));
        let outcome = Outcome {
            status,
            grpc: grpc_headers(h.iter().map(|(k, v)| (k.as_str(), v.as_str())), upstream),
            body: body_class(body, &self.up),
            flags: String::new(),
        };
        (outcome, line, took)
    }

    /// Envoy's response flags for access-log line `line` (bounded wait for the flush).
    pub(crate) fn flags(&self, line: usize) -> String {
        let l = envoy_log_line(&self.pair.log, line);
        l.rsplit(' ').next().unwrap_or("").to_owned()
    }

    /// (mesh's outcome, how long mesh took).
    fn mesh(&self, host: &str, headers: &[(&str, &str)]) -> (Outcome, Duration) {
        self.mesh_request("GET", host, "/", headers)
    }

    /// [`mesh`](Self::mesh) with any method and path.
    pub(crate) fn mesh_request(
        &self,
        method: &str,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (Outcome, Duration) {
        use http_body_util::BodyExt;
        self.pair.rt.block_on(async {
            let mut req = http::Request::builder()
                .method(method)
                .uri(format!("http://{host}{path}"));
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            let req = req
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap();
            let start = Instant::now();
            let r = tokio::time::timeout(Duration::from_secs(20), self.pair.mesh.request(req))
                .await
                .expect("mesh answers (bounded)");
            let took = start.elapsed();
            let flags = r
                .extensions()
                .get::<mesh_core::flags::ResponseFlags>()
                .copied()
                .unwrap_or_default()
                .to_string();
            let flags = if flags.is_empty() { "-".into() } else { flags };
            let status = r.status().as_u16();
            let (parts, body) = r.into_parts();
            let body =
                String::from_utf8_lossy(&body.collect().await.unwrap().to_bytes()).into_owned();
            let upstream = body.parse::<u16>().is_ok_and(|p| self.up.contains(&p));
            let grpc = grpc_headers(
                parts
                    .headers
                    .iter()
                    .filter_map(|(k, v)| Some((k.as_str(), v.to_str().ok()?))),
                upstream,
            );
            let outcome = Outcome {
                status,
                grpc,
                body: body_class(body, &self.up),
                flags,
            };
            (outcome, took)
        })
    }
}

#[test]
fn fault_injection_matches_envoy() {
    if envoy_binary().is_none() {
        return;
    }
    let up = PortUpstreams::start(1);
    let clusters = vec![
        json!({"name": "up", "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": "up", "endpoints": [{"lb_endpoints": [{"endpoint": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": up.ports[0]}}}}]}]}}),
    ];
    let vhosts = vec![
        vhost(
            "abort",
            json!({"abort": {"http_status": 503, "percentage": pct(100)}}),
        ),
        vhost(
            "abort-body",
            json!({"abort": {"http_status": 418, "percentage": pct(100), "response_body": "no tea"}}),
        ),
        vhost(
            "abort0",
            json!({"abort": {"http_status": 500, "percentage": pct(0)}}),
        ),
        vhost(
            "grpc",
            json!({"abort": {"grpc_status": 14, "percentage": pct(100)}}),
        ),
        vhost(
            "header",
            json!({"abort": {"header_abort": {}, "percentage": pct(100)},
                "delay": {"header_delay": {}, "percentage": pct(100)}}),
        ),
        vhost(
            "delay",
            json!({"delay": {"fixed_delay": format!("{}s", DELAY.as_secs_f64()), "percentage": pct(100)}}),
        ),
        vhost(
            "delay-abort",
            json!({"delay": {"fixed_delay": "0.05s", "percentage": pct(100)},
                "abort": {"http_status": 502, "percentage": pct(100)}}),
        ),
        vhost(
            "matched",
            json!({"abort": {"http_status": 503, "percentage": pct(100)},
                "headers": [{"name": "x-fault", "string_match": {"exact": "yes"}}]}),
        ),
        vhost(
            "half",
            json!({"abort": {"http_status": 503, "percentage": pct(50)}}),
        ),
    ];
    let route_config = json!({"name": "fault", "virtual_hosts": vhosts});

    let pair = oracles("fault", &route_config, &clusters, with_fault_filter, None);
    let mut o = Oracle {
        envoy: KeepAlive::connect(pair.port),
        logged: 0,
        pair,
        up: up.ports.clone(),
    };

    const GRPC: (&str, &str) = ("content-type", "application/grpc");
    let cases: Vec<(&str, Vec<(&str, &str)>)> = vec![
        ("abort", vec![]),
        ("abort", vec![GRPC]),
        ("abort-body", vec![]),
        ("abort0", vec![]),
        ("grpc", vec![GRPC]),
        ("grpc", vec![]),
        ("header", vec![]),
        ("header", vec![("x-envoy-fault-abort-request", "429")]),
        ("header", vec![("x-envoy-fault-abort-request", "200")]),
        ("header", vec![("x-envoy-fault-abort-request", "700")]),
        ("header", vec![("x-envoy-fault-abort-request", "abc")]),
        (
            "header",
            vec![GRPC, ("x-envoy-fault-abort-grpc-request", "14")],
        ),
        (
            "header",
            vec![
                ("x-envoy-fault-abort-request", "503"),
                ("x-envoy-fault-abort-request-percentage", "0"),
            ],
        ),
        ("header", vec![("x-envoy-fault-delay-request", "50")]),
        (
            "header",
            vec![
                ("x-envoy-fault-delay-request", "50"),
                ("x-envoy-fault-abort-request", "504"),
            ],
        ),
        (
            "header",
            vec![
                ("x-envoy-fault-delay-request", "50"),
                ("x-envoy-fault-delay-request-percentage", "0"),
            ],
        ),
        ("delay-abort", vec![]),
        ("matched", vec![]),
        ("matched", vec![("x-fault", "yes")]),
        ("matched", vec![("x-fault", "no")]),
    ];
    // Envoy flushes its access log now and then: every request goes out first, the flags are
    // read at the end.
    let mut results = Vec::new();
    for (host, headers) in &cases {
        let (e, line, _) = o.envoy(host, headers);
        let (m, _) = o.mesh(host, headers);
        results.push((format!("{host} {headers:?}"), line, e, m));
    }

    // A fixed delay: both wait (about) the delay before the upstream answers.
    let (e, line, took_e) = o.envoy("delay", &[]);
    let (m, took_m) = o.mesh("delay", &[]);
    eprintln!("delay: envoy took {took_e:?}, mesh {took_m:?}");
    // Envoy arms its timer from the event loop's cached clock, so it can fire a few
    // milliseconds early as the client measures (297 ms for 300 ms seen): 90% for Envoy.
    assert!(took_e >= DELAY * 9 / 10, "envoy answered after {took_e:?}");
    assert!(took_m >= DELAY, "mesh answered after {took_m:?}");
    results.push(("delay".into(), line, e, m));

    // 50%: both abort about half the requests (two-sample chi-square at p = 0.001, and each
    // within 5 standard deviations of N/2).
    const N: usize = 400;
    let mut envoy_counts = [0usize; 2];
    let mut mesh_counts = [0usize; 2];
    let mut envoy_aborted = Vec::new();
    for _ in 0..N {
        // Envoy's flags are read from the log afterwards.
        let (e, _, _) = o.envoy("half", &[]);
        envoy_aborted.push(e.status == 503);
        let (m, _) = o.mesh("half", &[]);
        for (outcome, counts, flags) in [
            (e, &mut envoy_counts, None),
            (m, &mut mesh_counts, Some(())),
        ] {
            let flags = flags.map_or("", |_| outcome.flags.as_str());
            match (outcome.status, outcome.body.as_str(), flags) {
                (503, "fault filter abort", "FI" | "") => counts[0] += 1,
                (200, "upstream", "-" | "") => counts[1] += 1,
                other => panic!("half: unexpected {other:?}"),
            }
        }
    }
    let first = o.logged - N;
    for (i, aborted) in envoy_aborted.iter().enumerate() {
        let line = envoy_log_line(&o.pair.log, first + i);
        let want = if *aborted {
            "half 503 FI"
        } else {
            "half 200 -"
        };
        assert_eq!(line, want, "envoy's log line {}", first + i);
    }
    let (stat, df) = chi_square(&envoy_counts, &mesh_counts);
    eprintln!("half: envoy [aborted, passed] {envoy_counts:?} mesh {mesh_counts:?} chi2 {stat:.2}");
    let sd = (N as f64 * 0.25).sqrt();
    for (who, c) in [("envoy", envoy_counts), ("mesh", mesh_counts)] {
        assert!(
            (c[0] as f64 - N as f64 / 2.0).abs() <= 5.0 * sd,
            "{who} aborted {} of {N}",
            c[0]
        );
    }
    assert!(stat <= CHI2_999[df], "half: chi2 {stat:.2} df {df}");

    let mut disagreements = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for (case, line, mut e, m) in results {
        e.flags = o.flags(line);
        eprintln!("{case}:\n  envoy {e:?}\n  mesh  {m:?}");
        seen.insert(e.flags.clone());
        if e != m {
            disagreements.push(format!("{case}: envoy {e:?}, mesh {m:?}"));
        }
    }
    assert!(disagreements.is_empty(), "{}", disagreements.join("\n"));
    // The cases exercise every outcome: passed, aborted, delayed, both.
    assert_eq!(
        seen,
        ["-", "DI", "FI", "DI,FI"].map(String::from).into(),
        "envoy's flags"
    );
}
