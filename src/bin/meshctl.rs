//! `meshctl`: tools around mesh's xDS handling.
//!
//! ```text
//! meshctl check-config FILE [--json]
//! meshctl control-plane --config-dump FILE [--listen ADDR] [--trust-domain TD]
//!                       [--root-cert-out FILE] [--token-out FILE]
//!                       [--bind-loopback] [--strip-istio-proxy-extensions]
//! meshctl route --config-dump FILE --route-config NAME --requests REQUESTS.jsonl
//! meshctl route --config-dump FILE --route-config NAME --authority A --path P
//!               [--method M] [--header 'k: v']...
//! ```
//!
//! `check-config` translates every resource of an Envoy config dump (JSON, or YAML for
//! `.yaml`/`.yml`) as mesh's ADS client would and prints, per type, what was accepted, what was
//! rejected (with reasons) and which extensions were accepted without mesh acting on them; it
//! exits 1 if anything was rejected, 2 on a usage or load error.
//!
//! `control-plane` serves the dump's dynamic resources over ADS (delta and SotW) together with
//! an Istio CA on one plaintext gRPC port, so a real sidecar's configuration can be replayed to
//! mesh or to Envoy. The same port serves istio-agent's SDS secrets `default` (a certificate
//! for the dump's workload) and `ROOTCA` over ADS and over `SecretDiscoveryService`, so an
//! Envoy whose bootstrap points `sds-grpc` there warms the dump's mTLS clusters. For a real
//! Envoy on a developer machine, `--bind-loopback` serves every listener that binds on
//! 127.0.0.1 port 0 (an ephemeral port; `bind_to_port: false` listeners bind nothing and stay
//! as they are), and `--strip-istio-proxy-extensions` drops the filters only istio-proxy's
//! Envoy build implements (`istio.stats`, `istio.metadata_exchange`, `istio.alpn`,
//! `istio_authn`, null-VM Wasm), which an upstream Envoy refuses. It prints
//! `listening on ADDR`, then a line per ACK (`ack TYPE_URL nonce=N`) and NACK
//! (`nack TYPE_URL nonce=N: MESSAGE`) its clients send, and runs until interrupted.
//!
//! `route` explains where requests go: the dump is translated into the snapshot mesh's ADS
//! client would publish, and each request (`{"authority","path","method","headers":[[k,v]]}`
//! per line of the `--requests` file, or the one given by `--authority`/`--path`) is decided by
//! the request path's own decision function ([`Snapshot::route_in_config`]). One JSON line is
//! printed per request: `route_config`, `virtual_host`, `route`, `action` (`cluster` |
//! `weighted_clusters` | `redirect` | `direct_response` | `no_route`), `cluster` or
//! `weighted_clusters` (`[{"name","weight"}]`), `status` (for local answers), `location`,
//! `body`, `upstream_path` and `upstream_authority` (after rewrites; under `auto_host_rewrite`
//! the endpoints' common hostname, or `null` and `upstream_authority_note`), `timeout_ms`,
//! `idle_timeout_ms` (the route's stream idle timeout), `retry`.
//! It exits 2 on a usage or load error (an unknown route configuration included).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use http::{HeaderMap, HeaderName, HeaderValue};
use mesh_core::SpiffeId;
use mesh_core::retry::RetryOn;
use mesh_core::route::{HostRewrite, RequestView, RouteAction};
use mesh_core::snapshot::{RouteDecision, Snapshot};
use mesh_xds::check::check_file;
use mesh_xds::dump::ConfigDump;
use mesh_xds::testkit::ControlPlane;
use mesh_xds::testkit::ca::TestCa;

const USAGE: &str = "usage:
  meshctl check-config FILE [--json]
  meshctl control-plane --config-dump FILE [--listen ADDR] [--trust-domain TD] [--root-cert-out FILE] [--token-out FILE] [--bind-loopback] [--strip-istio-proxy-extensions]
  meshctl route --config-dump FILE --route-config NAME --requests REQUESTS.jsonl
  meshctl route --config-dump FILE --route-config NAME --authority A --path P [--method M] [--header 'k: v']...";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("check-config") => check_config(&args[1..]),
        Some("control-plane") => control_plane(&args[1..]),
        Some("route") => route(&args[1..]),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        _ => Err(format!("unknown or missing command\n{USAGE}")),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("meshctl: {e}");
            ExitCode::from(2)
        }
    }
}

/// `--name VALUE` options and positional arguments.
struct Args {
    positional: Vec<String>,
    options: Vec<(String, Option<String>)>,
}

fn parse(args: &[String], flags: &[&str], valued: &[&str]) -> Result<Args, String> {
    let mut out = Args {
        positional: Vec::new(),
        options: Vec::new(),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if flags.contains(&a.as_str()) {
            out.options.push((a.clone(), None));
        } else if valued.contains(&a.as_str()) {
            let v = it.next().ok_or_else(|| format!("{a} needs a value"))?;
            out.options.push((a.clone(), Some(v.clone())));
        } else if a.starts_with("--") {
            return Err(format!("unknown option {a}\n{USAGE}"));
        } else {
            out.positional.push(a.clone());
        }
    }
    Ok(out)
}

impl Args {
    fn value(&self, name: &str) -> Option<&str> {
        self.options
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
    }

    fn values(&self, name: &str) -> impl Iterator<Item = &str> {
        self.options
            .iter()
            .filter(move |(k, _)| k == name)
            .filter_map(|(_, v)| v.as_deref())
    }

    fn flag(&self, name: &str) -> bool {
        self.options.iter().any(|(k, _)| k == name)
    }
}

fn check_config(args: &[String]) -> Result<ExitCode, String> {
    let a = parse(args, &["--json"], &[])?;
    let [file] = a.positional.as_slice() else {
        return Err(format!("check-config takes one FILE\n{USAGE}"));
    };
    let report = check_file(&PathBuf::from(file)).map_err(|e| format!("{file}: {e}"))?;
    if a.flag("--json") {
        println!("{}", report.to_json());
    } else {
        print!("{report}");
    }
    Ok(if report.rejected() > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn control_plane(args: &[String]) -> Result<ExitCode, String> {
    let a = parse(
        args,
        &["--bind-loopback", "--strip-istio-proxy-extensions"],
        &[
            "--config-dump",
            "--listen",
            "--trust-domain",
            "--root-cert-out",
            "--token-out",
        ],
    )?;
    if !a.positional.is_empty() {
        return Err(format!(
            "unexpected argument {:?}\n{USAGE}",
            a.positional[0]
        ));
    }
    let file = a
        .value("--config-dump")
        .ok_or_else(|| format!("control-plane needs --config-dump FILE\n{USAGE}"))?;
    let listen: SocketAddr = a
        .value("--listen")
        .unwrap_or("127.0.0.1:15010")
        .parse()
        .map_err(|e| format!("--listen: {e}"))?;
    let dump = ConfigDump::load(&PathBuf::from(file)).map_err(|e| format!("{file}: {e}"))?;
    for r in &dump.rejected {
        eprintln!(
            "meshctl: not serving {:?} ({}): {}",
            r.name, r.location, r.reason
        );
    }
    let set = dump.xds_resources();
    let trust_domain = a.value("--trust-domain").unwrap_or("cluster.local");
    let ca = TestCa::new(trust_domain);
    // The dump's own workload: namespace from its node id, service account `default`.
    let ns = dump
        .node_id
        .as_deref()
        .and_then(|id| id.split('~').nth(2))
        .and_then(|p| p.split('.').nth(1))
        .unwrap_or("default");
    if let Some(p) = a.value("--root-cert-out") {
        std::fs::write(p, ca.root_pem()).map_err(|e| format!("writing {p}: {e}"))?;
    }
    if let Some(p) = a.value("--token-out") {
        // A token the CA accepts, for the dump's own workload.
        std::fs::write(p, ca.token_for(ns, "default")).map_err(|e| format!("writing {p}: {e}"))?;
    }
    let identity = SpiffeId::new(trust_domain, ns, "default");
    let rt = tokio::runtime::Runtime::new().map_err(|e| format!("tokio runtime: {e}"))?;
    rt.block_on(async move {
        let cp = ControlPlane::builder()
            .ca(ca)
            .resources(set.clone())
            .sds_secrets(identity)
            .bind_loopback(a.flag("--bind-loopback"))
            .strip_istio_proxy_extensions(a.flag("--strip-istio-proxy-extensions"))
            .listen(listen)
            .start()
            .await
            .map_err(|e| e.to_string())?;
        let counts: Vec<String> = set
            .iter()
            .map(|(t, m)| format!("{}={}", t.rsplit('.').next().unwrap_or(t), m.len()))
            .collect();
        // Whoever started us may stop reading after the first line: a closed stdout must not
        // take the control plane down.
        let mut out = std::io::stdout();
        let _ = writeln!(out, "listening on {}", cp.addr());
        let _ = writeln!(
            out,
            "serving {} (ADS delta + SotW, SDS default + ROOTCA, Istio CA)",
            counts.join(" ")
        );
        let _ = out.flush();
        // One line per ACK and NACK a client sends, from a thread of its own: a full stdout
        // pipe must not stall the server.
        let mut events = cp.events();
        std::thread::spawn(move || {
            use mesh_xds::testkit::XdsEvent;
            use tokio::sync::broadcast::error::RecvError;
            loop {
                let line = match events.blocking_recv() {
                    Ok(XdsEvent::Ack {
                        type_url, nonce, ..
                    }) => {
                        format!("ack {type_url} nonce={nonce}")
                    }
                    Ok(XdsEvent::Nack {
                        type_url,
                        nonce,
                        message,
                    }) => format!(
                        "nack {type_url} nonce={nonce}: {}",
                        message.replace('\n', " ")
                    ),
                    Ok(_) | Err(RecvError::Lagged(_)) => continue,
                    Err(RecvError::Closed) => return,
                };
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{line}");
                let _ = out.flush();
            }
        });
        tokio::signal::ctrl_c()
            .await
            .map_err(|e| format!("waiting for ctrl-c: {e}"))?;
        Ok::<_, String>(ExitCode::SUCCESS)
    })
}

/// One request to explain.
struct RouteRequest {
    authority: String,
    path: String,
    method: String,
    headers: Vec<(String, String)>,
}

impl RouteRequest {
    fn from_json(line: &str) -> Result<Self, String> {
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
        let text = |k: &str| v.get(k).and_then(serde_json::Value::as_str);
        let authority = text("authority").ok_or("no \"authority\"")?.to_owned();
        let path = text("path").unwrap_or("/").to_owned();
        let method = text("method").unwrap_or("GET").to_owned();
        let mut headers = Vec::new();
        if let Some(list) = v.get("headers") {
            let list = list.as_array().ok_or("\"headers\" is not an array")?;
            for h in list {
                match h.as_array().map(Vec::as_slice) {
                    Some([k, v]) => match (k.as_str(), v.as_str()) {
                        (Some(k), Some(v)) => headers.push((k.to_owned(), v.to_owned())),
                        _ => return Err("a header is not [name, value] strings".into()),
                    },
                    _ => return Err("a header is not [name, value]".into()),
                }
            }
        }
        Ok(RouteRequest {
            authority,
            path,
            method,
            headers,
        })
    }

    fn header_map(&self) -> Result<HeaderMap, String> {
        let mut map = HeaderMap::new();
        for (k, v) in &self.headers {
            let name = HeaderName::from_bytes(k.trim().to_ascii_lowercase().as_bytes())
                .map_err(|_| format!("invalid header name {k:?}"))?;
            let value = HeaderValue::from_str(v.trim())
                .map_err(|_| format!("invalid value for header {k:?}"))?;
            map.append(name, value);
        }
        Ok(map)
    }
}

fn route(args: &[String]) -> Result<ExitCode, String> {
    let a = parse(
        args,
        &[],
        &[
            "--config-dump",
            "--route-config",
            "--requests",
            "--authority",
            "--path",
            "--method",
            "--header",
        ],
    )?;
    if let Some(p) = a.positional.first() {
        return Err(format!("unexpected argument {p:?}\n{USAGE}"));
    }
    let file = a
        .value("--config-dump")
        .ok_or_else(|| format!("route needs --config-dump FILE\n{USAGE}"))?;
    let rc = a
        .value("--route-config")
        .ok_or_else(|| format!("route needs --route-config NAME\n{USAGE}"))?;
    let requests: Vec<RouteRequest> = match (a.value("--requests"), a.value("--authority")) {
        (Some(_), Some(_)) => {
            return Err(format!(
                "give either --requests or --authority, not both\n{USAGE}"
            ));
        }
        (Some(path), None) => {
            let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
            text.lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
                .map(|(i, l)| {
                    RouteRequest::from_json(l).map_err(|e| format!("{path}:{}: {e}", i + 1))
                })
                .collect::<Result<_, _>>()?
        }
        (None, Some(authority)) => {
            let mut headers = Vec::new();
            for h in a.values("--header") {
                let (k, v) = h
                    .split_once(':')
                    .ok_or_else(|| format!("--header {h:?}: expected 'name: value'"))?;
                headers.push((k.trim().to_owned(), v.trim().to_owned()));
            }
            vec![RouteRequest {
                authority: authority.to_owned(),
                path: a.value("--path").unwrap_or("/").to_owned(),
                method: a.value("--method").unwrap_or("GET").to_owned(),
                headers,
            }]
        }
        (None, None) => {
            return Err(format!(
                "route needs --requests FILE or --authority A --path P\n{USAGE}"
            ));
        }
    };
    let dump = ConfigDump::load(&PathBuf::from(file)).map_err(|e| format!("{file}: {e}"))?;
    let (snapshot, errors) = dump.snapshot();
    for e in &errors {
        eprintln!("meshctl: not translated: {e}");
    }
    if !snapshot.route_configs.contains_key(rc) {
        let mut names: Vec<&String> = snapshot.route_configs.keys().collect();
        names.sort();
        return Err(format!(
            "{file} has no route configuration {rc:?} (it has {names:?})"
        ));
    }
    let mut out = std::io::stdout().lock();
    for r in &requests {
        let line = explain(&snapshot, rc, r)?;
        writeln!(out, "{line}").map_err(|e| format!("writing: {e}"))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `upstream_authority` under `auto_host_rewrite`, which depends on the endpoint the request
/// lands on: that hostname when every endpoint has the same one, the request's authority when
/// none has one; otherwise `null` with `upstream_authority_note` saying what it depends on.
fn auto_host_authority(
    out: &mut serde_json::Value,
    authority: &str,
    endpoints: Option<&mesh_core::endpoint::EndpointSet>,
) {
    let eps = endpoints.map_or(&[][..], |s| &s.endpoints[..]);
    let mut names: Vec<&str> = eps.iter().filter_map(|e| e.hostname.as_deref()).collect();
    let without = eps.len() - names.len();
    names.sort_unstable();
    names.dedup();
    match (names.as_slice(), without) {
        ([one], 0) => out["upstream_authority"] = serde_json::json!(one),
        ([], _) if !eps.is_empty() => out["upstream_authority"] = serde_json::json!(authority),
        _ => {
            out["upstream_authority"] = serde_json::Value::Null;
            let mut note = String::from(
                "auto_host_rewrite: the chosen endpoint's hostname (the request's authority for an endpoint without one)",
            );
            if eps.is_empty() {
                note.push_str("; no endpoints known");
            } else {
                note.push_str(&format!(
                    "; hostnames {names:?}, {without} endpoint(s) without one"
                ));
            }
            out["upstream_authority_note"] = serde_json::json!(note);
        }
    }
}

/// The retry conditions a policy retries on, by Envoy name.
fn retry_on_names(on: RetryOn) -> Vec<&'static str> {
    [
        "5xx",
        "gateway-error",
        "reset",
        "reset-before-request",
        "connect-failure",
        "retriable-4xx",
        "refused-stream",
        "retriable-status-codes",
        "retriable-headers",
        "envoy-ratelimited",
        "http3-post-connect-failure",
        "cancelled",
        "deadline-exceeded",
        "internal",
        "resource-exhausted",
        "unavailable",
    ]
    .into_iter()
    .filter(|n| RetryOn::condition(n).is_some_and(|c| on.any(c)))
    .collect()
}

/// One request's decision as a JSON line.
fn explain(snapshot: &Snapshot, rc: &str, r: &RouteRequest) -> Result<serde_json::Value, String> {
    use serde_json::{Value, json};
    let headers = r.header_map()?;
    let req = RequestView::new(&r.authority, &r.path, &headers).with_method(&r.method);
    let e = snapshot
        .route_in_config(rc, &req)
        .ok_or_else(|| format!("no route configuration {rc:?}"))?;
    let mut out = json!({
        "route_config": e.route_config.name,
        "virtual_host": e.matched.map(|m| m.virtual_host.name.to_string()),
        "route": e.matched.map(|m| m.route.name.to_string()),
        "action": "no_route",
        "cluster": Value::Null,
        "weighted_clusters": Value::Null,
        "status": Value::Null,
        "location": Value::Null,
        "body": Value::Null,
        "upstream_path": Value::Null,
        "upstream_authority": Value::Null,
        "timeout_ms": Value::Null,
        "idle_timeout_ms": Value::Null,
        "retry": Value::Null,
    });
    if let Some(m) = e.matched {
        out["action"] = json!(match &m.route.action {
            RouteAction::Cluster(_) | RouteAction::ClusterHeader(_) => "cluster",
            RouteAction::Weighted(_) => "weighted_clusters",
            RouteAction::Redirect(_) => "redirect",
            RouteAction::DirectResponse { .. } => "direct_response",
        });
        if let RouteAction::Cluster(c) = &m.route.action {
            // Also when the cluster is unknown and the answer is a local 503 `NC`.
            out["cluster"] = json!(c);
        }
        if let RouteAction::Weighted(w) = &m.route.action {
            out["weighted_clusters"] = w
                .clusters
                .iter()
                .map(|c| json!({"name": c.name, "weight": c.weight}))
                .collect();
        }
    }
    match &e.decision {
        RouteDecision::Forward {
            cluster,
            endpoints,
            timeout,
            idle_timeout,
            retry,
            forwarding,
            rewritten_path,
            ..
        } => {
            if out["action"] != "weighted_clusters" {
                out["cluster"] = json!(cluster.name);
            }
            out["upstream_path"] = json!(rewritten_path.as_deref().unwrap_or(&r.path));
            match forwarding.as_deref().and_then(|f| f.host_rewrite.as_ref()) {
                Some(HostRewrite::Literal(h)) => out["upstream_authority"] = json!(h),
                Some(HostRewrite::Auto) => {
                    auto_host_authority(&mut out, &r.authority, endpoints.as_deref());
                }
                None => out["upstream_authority"] = json!(r.authority),
            }
            out["timeout_ms"] = json!(timeout.map(|t| t.as_millis() as u64));
            out["idle_timeout_ms"] = json!(idle_timeout.map(|t| t.as_millis() as u64));
            // As the request path: a policy whose retriable_request_headers the request
            // does not match does not retry it.
            if let Some(p) = retry.as_deref().filter(|p| p.enabled_for(&req)) {
                out["retry"] = json!({
                    "retry_on": retry_on_names(p.retry_on),
                    "num_retries": p.num_retries,
                    "per_try_timeout_ms": p.per_try_timeout.map(|t| t.as_millis() as u64),
                    "retriable_status_codes": p.retriable_status_codes,
                });
            }
        }
        RouteDecision::Respond {
            status,
            body,
            flag,
            location,
        } => {
            out["status"] = json!(status);
            out["location"] = json!(location);
            out["body"] = json!(body);
            if !flag.is_empty() {
                out["response_flag"] = json!(flag.as_str());
            }
        }
    }
    Ok(out)
}
