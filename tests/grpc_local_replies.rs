//! Local replies to gRPC requests compared with a real Envoy 1.40: Envoy answers a request
//! whose `content-type` is gRPC with a trailers-only response (HTTP 200, `content-type:
//! application/grpc`, `grpc-status` mapped from the HTTP status, `grpc-message` from the
//! reply's body) whatever produced the local reply: no route, no cluster, no healthy upstream,
//! connection failure, overflow, retries exhausted, upstream and stream idle timeouts,
//! `direct_response` (istiod's `block_all` 502 among them), redirects. The same gRPC-shaped
//! requests (POST, `te: trailers`) go to both; status, the gRPC headers, `content-type`,
//! `location`, body and response flags must agree.
//!
//! Skips (with the reason printed) when Envoy is not installed and `CI` is not set.

use serde_json::{Value, json};

use crate::fault_oracle::Oracle;
use crate::routing_oracle::{KeepAlive, PortUpstreams, oracles};
use crate::support::envoy::envoy_binary;

/// A STATIC cluster `name` with one endpoint per port, and `extra` fields.
fn cluster(name: &str, ports: &[u16], extra: Value) -> Value {
    let eps: Vec<Value> = ports
        .iter()
        .map(|p| json!({"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}))
        .collect();
    let mut c = json!({"name": name, "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": eps}]}});
    if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
        c.extend(extra.clone());
    }
    c
}

/// A virtual host `name` (its one domain) whose route on `prefix` does `action`.
fn vhost(name: &str, prefix: &str, action: Value) -> Value {
    let mut route = json!({"match": {"prefix": prefix}});
    if let (Some(r), Some(a)) = (route.as_object_mut(), action.as_object()) {
        r.extend(a.clone());
    }
    json!({"name": name, "domains": [name], "routes": [route]})
}

/// A request: (method, host, path, headers).
type Case<'a> = (&'a str, &'a str, &'a str, Vec<(&'a str, &'a str)>);

/// A port nothing listens on.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[test]
fn grpc_local_replies_match_envoy() {
    if envoy_binary().is_none() {
        return;
    }
    // 0: answers 200; 1: closes the connection without an answer; 2: answers 503.
    let up = PortUpstreams::start(3);
    up.script.set_status(up.ports[1], 0);
    up.script.set_status(up.ports[2], 503);
    let dead = closed_port();
    let clusters = vec![
        cluster("up", &up.ports[..1], json!({})),
        cluster("reset", &up.ports[1..2], json!({})),
        cluster("err", &up.ports[2..3], json!({})),
        cluster("dead", &[dead], json!({})),
        cluster("empty", &[], json!({})),
        cluster(
            "full",
            &up.ports[..1],
            json!({"circuit_breakers": {"thresholds": [{"max_requests": 0}]}}),
        ),
    ];
    let to = |c: &str| json!({"route": {"cluster": c}});
    let direct = |status: u16, body: Option<&str>| {
        let mut d = json!({"status": status});
        if let Some(b) = body {
            d["body"] = json!({"inline_string": b});
        }
        json!({"direct_response": d})
    };
    let vhosts = vec![
        vhost("ok", "/", to("up")),
        vhost("err", "/", to("err")),
        vhost("nr-path", "/only", to("up")),
        vhost("nc", "/", to("missing")),
        vhost("uh", "/", to("empty")),
        vhost("uf", "/", to("dead")),
        vhost("uc", "/", to("reset")),
        vhost("uo", "/", to("full")),
        vhost(
            "urx",
            "/",
            json!({"route": {"cluster": "dead", "retry_policy": {"retry_on": "connect-failure",
                "num_retries": 1, "retry_back_off": {"base_interval": "0.001s"}}}}),
        ),
        vhost(
            "ut",
            "/",
            json!({"route": {"cluster": "up", "timeout": "0.2s"}}),
        ),
        vhost(
            "si",
            "/",
            json!({"route": {"cluster": "up", "timeout": "0s", "idle_timeout": "0.2s"}}),
        ),
        vhost("direct503", "/", direct(503, Some("down for maintenance"))),
        vhost("direct200", "/", direct(200, Some("hello"))),
        vhost("direct418", "/", direct(418, None)),
        vhost("direct-nl", "/", direct(401, Some("line\n"))),
        vhost(
            "direct-escaped",
            "/",
            direct(400, Some("50% off, caf\u{e9}\ttab \u{1F600}")),
        ),
        // istiod's `block_all` route under REGISTRY_ONLY.
        vhost("blackhole", "/", direct(502, None)),
        vhost(
            "redirect",
            "/",
            json!({"redirect": {"host_redirect": "elsewhere.example", "response_code": "FOUND"}}),
        ),
    ];
    // `nc` names a cluster Envoy does not have.
    let route_config = json!({"name": "grpc", "virtual_hosts": vhosts, "validate_clusters": false});
    let pair = oracles("grpc-local", &route_config, &clusters, |_| {}, None);
    let mut o = Oracle {
        envoy: KeepAlive::connect(pair.port),
        logged: 0,
        pair,
        up: up.ports.clone(),
    };

    let grpc = |ct: &'static str| -> Vec<(&'static str, &'static str)> {
        vec![
            ("content-type", ct),
            ("te", "trailers"),
            ("content-length", "0"),
        ]
    };
    let g = grpc("application/grpc");
    let hosts = [
        "ok",
        "err",
        "nr-path",
        "no-such-host",
        "nc",
        "uh",
        "uf",
        "uc",
        "uo",
        "urx",
        "ut",
        "si",
        "direct503",
        "direct200",
        "direct418",
        "direct-nl",
        "direct-escaped",
        "blackhole",
        "redirect",
    ];
    let mut cases: Vec<Case> = hosts
        .iter()
        .map(|h| {
            // `/hold` keeps the upstream from answering (bounded), for the timeouts.
            let path = if matches!(*h, "ut" | "si") {
                "/hold"
            } else {
                "/svc.Echo/Call"
            };
            ("POST", *h, path, g.clone())
        })
        .collect();
    // Which content types make a request gRPC, and a request that is not.
    for ct in [
        "application/grpc+proto",
        "application/grpc-web",
        "application/grpc;charset=utf-8",
        "application/grpcx",
        "Application/gRPC",
        "application/json",
    ] {
        cases.push(("POST", "uh", "/svc.Echo/Call", grpc(ct)));
    }
    cases.push(("POST", "direct503", "/", vec![("content-length", "0")]));
    // HEAD: no `grpc-message`.
    cases.push(("HEAD", "direct503", "/svc.Echo/Call", g.clone()));

    let mut results = Vec::new();
    for (method, host, path, headers) in &cases {
        let (e, line, _) = o.envoy_request(method, host, path, headers);
        // Envoy drops the keep-alive connection after some local replies.
        o.envoy = KeepAlive::connect(o.pair.port);
        let (m, _) = o.mesh_request(method, host, path, headers);
        results.push((format!("{method} {host} {path} {headers:?}"), line, e, m));
    }
    let mut disagreements = Vec::new();
    for (case, line, mut e, m) in results {
        e.flags = o.flags(line);
        // Envoy's telemetry sees the status the client sees (200 for the gRPC form), as mesh's
        // does (its local reply records its own status).
        let logged = crate::routing_oracle::envoy_log_line(&o.pair.log, line);
        assert_eq!(
            logged.split(' ').nth(1),
            Some(e.status.to_string().as_str()),
            "{case}: envoy logged {logged:?}"
        );
        eprintln!("{case}:\n  envoy {e:?}\n  mesh  {m:?}");
        if e != m {
            disagreements.push(format!("{case}: envoy {e:?}, mesh {m:?}"));
        }
    }
    assert!(disagreements.is_empty(), "{}", disagreements.join("\n"));
}
