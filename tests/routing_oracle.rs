//! Differential routing test: the same `RouteConfiguration` goes into a real Envoy 1.40 (as
//! static config, rendered to JSON) and into mesh (as the proto, through mesh-xds'
//! translator into mesh-core's matcher); a table of requests (authority, method, path,
//! query, headers, repeated headers, near-misses) goes to both, and the chosen route (or
//! Envoy's `NR` 404) must be identical.
//!
//! Each route answers with a `direct_response` carrying its name in `x-route`, so Envoy
//! tells which route it chose without upstreams.
//!
//! Skips (with the reason printed) when Envoy is not installed and `CI` is not set.

use crate::support::envoy;
use crate::support::routes::{
    CHI2_999, Hm, PathM, Req, Val, Vh, any_via_dump, chi_square, config_json, config_pb, h, r,
    requests, vhosts,
};

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use envoy::{EnvoyProcess, closed_port, envoy_binary, free_port};
use envoy_types::pb::envoy::config::route::v3 as pb;
use envoy_types::pb::envoy::r#type::matcher::v3::RegexMatcher;
use http::HeaderMap;
use mesh_core::route::RequestView;
use serde_json::{Value, json};

fn bootstrap(port: u16, route_config: Value) -> String {
    json!({
        "static_resources": {"listeners": [{
            "name": "oracle",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": "oracle",
                    "route_config": route_config,
                    "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
                },
            }]}],
        }]},
    })
    .to_string()
}

/// Envoy's answer: the `x-route` of a 200, or `None` for 404 (`NR`); any other status fails.
fn ask_envoy(port: u16, req: &Req) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to envoy");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut text = format!(
        "{} {} HTTP/1.1\r\nHost: {}\r\n",
        req.method, req.path, req.host
    );
    for (k, v) in &req.headers {
        text.push_str(&format!("{k}: {v}\r\n"));
    }
    if req.method == "POST" {
        text.push_str("content-length: 0\r\n");
    }
    text.push_str("connection: close\r\n\r\n");
    s.write_all(text.as_bytes()).unwrap();
    // Read exactly one response (Envoy delays the close of a `connection: close` stream).
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).expect("read envoy response");
        out.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&out);
        if n == 0 {
            break;
        }
        if let Some(end) = text.find("\r\n\r\n") {
            let len: usize = text[..end]
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            if out.len() >= end + 4 + len {
                break;
            }
        }
    }
    let out = String::from_utf8_lossy(&out);
    let head = out.split("\r\n\r\n").next().unwrap_or("");
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad response to {req:?}: {out}"));
    match status {
        404 => None,
        200 => Some(
            head.lines()
                .find_map(|l| l.strip_prefix("x-route: "))
                .unwrap_or_else(|| panic!("200 without x-route for {req:?}: {out}"))
                .to_owned(),
        ),
        s => panic!("unexpected status {s} for {req:?}: {out}"),
    }
}

fn ask_mesh(rc: &mesh_core::route::RouteConfig, req: &Req) -> Option<String> {
    let mut headers = HeaderMap::new();
    for (k, v) in &req.headers {
        headers.append(*k, v.parse().unwrap());
    }
    let view = RequestView::new(&req.host, &req.path, &headers).with_method(req.method);
    rc.route_request(&view).map(|m| m.route.name.to_string())
}

#[test]
fn route_choice_matches_envoy() {
    if envoy_binary().is_none() {
        return;
    }
    let vhs = vhosts();
    let rc =
        mesh_xds::translate::translate_route(&config_pb(&vhs)).expect("mesh accepts the config");
    let port = free_port();
    let _envoy = EnvoyProcess::start(&bootstrap(port, config_json(&vhs)));
    let reqs = requests();
    assert!(reqs.len() >= 300, "only {} requests", reqs.len());
    let mut disagreements = Vec::new();
    let mut chosen = std::collections::BTreeSet::new();
    for req in &reqs {
        let want = ask_envoy(port, req);
        chosen.insert(want.clone().unwrap_or_else(|| "<404>".into()));
        let got = ask_mesh(&rc, req);
        if want != got {
            disagreements.push(format!("{req:?}: envoy {want:?}, mesh {got:?}"));
        }
    }
    assert!(
        disagreements.is_empty(),
        "{} of {} requests routed differently:\n{}",
        disagreements.len(),
        reqs.len(),
        disagreements.join("\n")
    );
    // Every route (and the 404) is chosen by some request: the table exercises each matcher.
    let all: Vec<&str> = vhs
        .iter()
        .flat_map(|v| v.routes.iter().map(|r| r.name))
        .chain(["<404>"])
        .collect();
    let missed: Vec<&&str> = all.iter().filter(|n| !chosen.contains(**n)).collect();
    assert!(missed.is_empty(), "routes no request reached: {missed:?}");
}

/// Configs Envoy refuses, mesh must refuse too (a NACK instead of a silently different
/// route).
#[test]
fn refused_configs_match_envoy() {
    let Some(bin) = envoy_binary() else {
        return;
    };
    let mut rx_ic = r("rx_ic", PathM::Prefix("/"));
    rx_ic.headers.push(Hm {
        ignore_case: true,
        ..h("x-a", Val::Regex("a+"))
    });
    let cases = vec![
        ("ignore_case on safe_regex", rx_ic),
        (
            "path_separated_prefix ending in /",
            r("sep_slash", PathM::Sep("/api/")),
        ),
    ];
    for (what, route) in cases {
        let vhs = vec![Vh {
            name: "v",
            domains: vec!["*"],
            routes: vec![route],
        }];
        let mesh = mesh_xds::translate::translate_route(&config_pb(&vhs));
        assert!(mesh.is_err(), "{what}: mesh accepted it");
        let dir = std::env::temp_dir().join(format!("mesh-oracle-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("refused.json");
        std::fs::write(&file, bootstrap(free_port(), config_json(&vhs))).unwrap();
        let out = std::process::Command::new(&bin)
            .args(["--mode", "validate", "-c"])
            .arg(&file)
            .output()
            .expect("run envoy --mode validate");
        assert!(
            !out.status.success(),
            "{what}: envoy accepted it:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

/// A `redirect` action, described once.
#[derive(Clone, Copy)]
struct Rd {
    name: &'static str,
    prefix: &'static str,
    code: i32,
    scheme: Option<&'static str>,
    host: &'static str,
    port: u32,
    path: Option<&'static str>,
    prefix_rewrite: Option<&'static str>,
    regex: Option<(&'static str, &'static str)>,
    strip_query: bool,
}

const RD: Rd = Rd {
    name: "",
    prefix: "/",
    code: 0,
    scheme: None,
    host: "",
    port: 0,
    path: None,
    prefix_rewrite: None,
    regex: None,
    strip_query: false,
};

fn redirect_json(d: &Rd) -> Value {
    let codes = [
        "MOVED_PERMANENTLY",
        "FOUND",
        "SEE_OTHER",
        "TEMPORARY_REDIRECT",
        "PERMANENT_REDIRECT",
    ];
    let mut a = json!({"response_code": codes[d.code as usize], "strip_query": d.strip_query});
    if let Some(s) = d.scheme {
        a["scheme_redirect"] = json!(s);
    }
    if !d.host.is_empty() {
        a["host_redirect"] = json!(d.host);
    }
    if d.port != 0 {
        a["port_redirect"] = json!(d.port);
    }
    if let Some(p) = d.path {
        a["path_redirect"] = json!(p);
    }
    if let Some(p) = d.prefix_rewrite {
        a["prefix_rewrite"] = json!(p);
    }
    if let Some((re, sub)) = d.regex {
        a["regex_rewrite"] = json!({"pattern": {"regex": re}, "substitution": sub});
    }
    json!({"name": d.name, "match": {"prefix": d.prefix}, "redirect": a})
}

fn redirect_pb(d: &Rd) -> pb::Route {
    use pb::redirect_action::{PathRewriteSpecifier as P, SchemeRewriteSpecifier as S};
    let path = if let Some(p) = d.path {
        Some(P::PathRedirect(p.into()))
    } else if let Some(p) = d.prefix_rewrite {
        Some(P::PrefixRewrite(p.into()))
    } else {
        d.regex.map(|(re, sub)| {
            P::RegexRewrite(
                envoy_types::pb::envoy::r#type::matcher::v3::RegexMatchAndSubstitute {
                    pattern: Some(RegexMatcher {
                        regex: re.into(),
                        ..Default::default()
                    }),
                    substitution: sub.into(),
                },
            )
        })
    };
    pb::Route {
        name: d.name.into(),
        r#match: Some(pb::RouteMatch {
            path_specifier: Some(pb::route_match::PathSpecifier::Prefix(d.prefix.into())),
            ..Default::default()
        }),
        action: Some(pb::route::Action::Redirect(pb::RedirectAction {
            host_redirect: d.host.into(),
            port_redirect: d.port,
            response_code: d.code,
            strip_query: d.strip_query,
            scheme_rewrite_specifier: d.scheme.map(|s| S::SchemeRedirect(s.into())),
            path_rewrite_specifier: path,
        })),
        ..Default::default()
    }
}

/// Envoy's status and `location` for a request.
fn envoy_redirect(port: u16, host: &str, path: &str) -> (u16, Option<String>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to envoy");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let text = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nconnection: close\r\n\r\n");
    s.write_all(text.as_bytes()).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&out).contains("\r\n\r\n") {
        let n = s.read(&mut buf).expect("read envoy response");
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    let out = String::from_utf8_lossy(&out);
    let head = out.split("\r\n\r\n").next().unwrap_or("");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let location = head
        .lines()
        .find_map(|l| l.strip_prefix("location: "))
        .map(str::to_owned);
    (status, location)
}

#[test]
fn redirects_match_envoy() {
    if envoy_binary().is_none() {
        return;
    }
    let rds = [
        Rd {
            name: "host",
            prefix: "/host",
            host: "elsewhere.example",
            ..RD
        },
        Rd {
            name: "https",
            prefix: "/https",
            scheme: Some("https"),
            code: 4,
            ..RD
        },
        Rd {
            name: "port",
            prefix: "/port",
            port: 8443,
            code: 1,
            ..RD
        },
        Rd {
            name: "hostport",
            prefix: "/hp",
            host: "h.example:81",
            port: 9000,
            code: 2,
            ..RD
        },
        Rd {
            name: "path",
            prefix: "/path",
            path: Some("/new/place"),
            code: 3,
            ..RD
        },
        Rd {
            name: "pathq",
            prefix: "/pq",
            path: Some("/new?fixed=1"),
            ..RD
        },
        Rd {
            name: "prefix",
            prefix: "/old/",
            prefix_rewrite: Some("/new/"),
            ..RD
        },
        Rd {
            name: "regex",
            prefix: "/rx",
            regex: Some(("/rx/([0-9]+)", "/items/\\1")),
            ..RD
        },
        Rd {
            name: "strip",
            prefix: "/strip",
            strip_query: true,
            host: "s.example",
            ..RD
        },
    ];
    let route_config = json!({"name": "redirects", "virtual_hosts": [{
        "name": "v", "domains": ["*"], "routes": rds.iter().map(redirect_json).collect::<Vec<_>>()}]});
    let proto = pb::RouteConfiguration {
        name: "redirects".into(),
        virtual_hosts: vec![pb::VirtualHost {
            name: "v".into(),
            domains: vec!["*".into()],
            routes: rds.iter().map(redirect_pb).collect(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let rc = mesh_xds::translate::translate_route(&proto).expect("mesh accepts the redirects");
    let port = free_port();
    let _envoy = EnvoyProcess::start(&bootstrap(port, route_config));
    let mut disagreements = Vec::new();
    let mut n = 0;
    for host in ["app.example", "app.example:80", "app.example:8080"] {
        for path in [
            "/host/a?x=1",
            "/https/a",
            "/https?q",
            "/port/p?x",
            "/hp/z",
            "/path/a?keep=1",
            "/pq/a?dropped=1",
            "/old/x/y?z=1",
            "/old/",
            "/rx/42?x=1",
            "/rx/abc",
            "/strip/a?x=1&y=2",
        ] {
            n += 1;
            let want = envoy_redirect(port, host, path);
            let headers = HeaderMap::new();
            let view = RequestView::new(host, path, &headers);
            let got = rc.route_request(&view).map(|m| match &m.route.action {
                mesh_core::route::RouteAction::Redirect(r) => (
                    r.status,
                    Some(mesh_core::snapshot::redirect_location(
                        r,
                        &m.route.matcher,
                        &view,
                    )),
                ),
                other => panic!("not a redirect: {other:?}"),
            });
            let got = got.unwrap_or((404, None));
            if want != got {
                disagreements.push(format!("{host} {path}: envoy {want:?}, mesh {got:?}"));
            }
        }
    }
    assert!(
        disagreements.is_empty(),
        "{} of {n} redirects differ:\n{}",
        disagreements.len(),
        disagreements.join("\n")
    );
}

// ---------- forwarding: retries and rewrites, through a real upstream ----------

/// What the scripted upstream saw of one request.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Seen {
    uri: String,
    host: String,
    headers: Vec<(String, String)>,
}

/// A plain HTTP/1.1 upstream on 127.0.0.1: paths under `/once` answer 503 to the first
/// request (per path), paths under `/always` always 503, everything else 200. Records what it
/// saw (only the headers named `x-*`).
struct ScriptedUpstream {
    port: u16,
    seen: std::sync::Arc<std::sync::Mutex<Vec<Seen>>>,
}

impl ScriptedUpstream {
    fn start() -> ScriptedUpstream {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Seen>::new()));
        let s = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let s = s.clone();
                std::thread::spawn(move || serve_scripted(stream, &s));
            }
        });
        ScriptedUpstream { port, seen }
    }

    /// What was seen since the last call, sorted; waits (bounded) for `at_least` requests
    /// (mirrors arrive on their own time).
    fn take(&self, at_least: usize) -> Vec<Seen> {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while self.seen.lock().unwrap().len() < at_least && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut v = std::mem::take(&mut *self.seen.lock().unwrap());
        v.sort();
        v
    }
}

fn serve_scripted(mut stream: TcpStream, seen: &std::sync::Mutex<Vec<Seen>>) {
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        // One request head at a time (no bodies in these requests).
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        let mut lines = head.lines();
        let uri = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .unwrap_or("")
            .to_owned();
        let mut host = String::new();
        let mut headers = Vec::new();
        for l in lines {
            if let Some((k, v)) = l.split_once(':') {
                let k = k.trim().to_ascii_lowercase();
                if k == "host" {
                    host = v.trim().to_owned();
                } else if k.starts_with("x-")
                    && !k.starts_with("x-envoy")
                    && k != "x-request-id"
                    && k != "x-forwarded-proto"
                {
                    headers.push((k, v.trim().to_owned()));
                }
            }
        }
        headers.sort();
        let status = {
            let mut seen = seen.lock().unwrap();
            let earlier = seen.iter().filter(|s| s.uri == uri).count();
            seen.push(Seen {
                uri: uri.clone(),
                host,
                headers,
            });
            if uri.starts_with("/always") || (uri.starts_with("/once") && earlier == 0) {
                503
            } else {
                200
            }
        };
        let body = format!("{status}");
        let resp = format!(
            "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nx-upstream: yes\r\n\r\n{body}",
            body.len()
        );
        if stream.write_all(resp.as_bytes()).is_err() {
            return;
        }
    }
}

/// Status and the `x-*` response headers (sorted) of a response.
fn envoy_forward(
    port: u16,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, Vec<(String, String)>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to envoy");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut text = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n");
    for (k, v) in headers {
        text.push_str(&format!("{k}: {v}\r\n"));
    }
    text.push_str("connection: close\r\n\r\n");
    s.write_all(text.as_bytes()).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&out).contains("\r\n\r\n") {
        let n = s.read(&mut buf).expect("read envoy response");
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    let out = String::from_utf8_lossy(&out);
    let head = out.split("\r\n\r\n").next().unwrap_or("");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut xs: Vec<(String, String)> = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .filter(|(k, _)| k.starts_with("x-") && !k.starts_with("x-envoy"))
        .collect();
    xs.sort();
    (status, xs)
}

/// The `x-*` headers of a mesh response but Envoy's own `x-envoy-*`, sorted.
fn x_headers(headers: &http::HeaderMap) -> Vec<(String, String)> {
    let mut xs: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_owned()))
        .filter(|(k, _)| k.starts_with("x-") && !k.starts_with("x-envoy"))
        .collect();
    xs.sort();
    xs
}

#[test]
fn retries_and_rewrites_match_envoy() {
    if envoy_binary().is_none() {
        return;
    }
    let up = ScriptedUpstream::start();
    // istiod's default retry policy, a rewrite route and header mutations at three levels.
    let retry = json!({
        "retry_on": "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
        "num_retries": 2,
        "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}],
        "host_selection_retry_max_attempts": "5",
        "retriable_status_codes": [503],
    });
    let route_config = json!({
        "name": "fwd",
        "request_headers_to_add": [{"header": {"key": "x-level", "value": "rc"}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
        "response_headers_to_add": [{"header": {"key": "x-resp-rc", "value": "%UPSTREAM_CLUSTER%"}}],
        "virtual_hosts": [{
            "name": "svc", "domains": ["*"],
            "request_headers_to_remove": ["x-secret"],
            "request_headers_to_add": [{"header": {"key": "x-vh", "value": "v 100%%"}}],
            "routes": [
                {"name": "once", "match": {"prefix": "/once"}, "route": {"cluster": "up", "retry_policy": retry}},
                {"name": "always", "match": {"prefix": "/always"}, "route": {"cluster": "up", "retry_policy": retry}},
                {"name": "rewrite", "match": {"prefix": "/v1/"},
                 "request_headers_to_add": [
                    {"header": {"key": "x-level", "value": "route"}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"},
                    {"header": {"key": "x-copy", "value": "%REQ(x-user)%"}},
                    {"header": {"key": "x-user", "value": "added"}, "append_action": "ADD_IF_ABSENT"},
                 ],
                 "response_headers_to_remove": ["x-upstream"],
                 "route": {"cluster": "up", "prefix_rewrite": "/api/v2/", "host_rewrite_literal": "backend.example"}},
                {"name": "mirror", "match": {"prefix": "/mirror"},
                 "route": {"cluster": "up", "request_mirror_policies": [{"cluster": "up"}]}},
                {"name": "regex", "match": {"prefix": "/users/"},
                 "route": {"cluster": "up", "regex_rewrite": {"pattern": {"regex": "^/users/([0-9]+)$"}, "substitution": "/u/\\1"}}},
            ],
        }],
    });
    let proto: pb::RouteConfiguration = {
        // The same configuration for mesh, through protobuf JSON (as a config dump).
        let mut typed = route_config.clone();
        typed["@type"] = json!("type.googleapis.com/envoy.config.route.v3.RouteConfiguration");
        let dump = mesh_xds::dump::ConfigDump::from_value(json!({"configs": [{
            "@type": "type.googleapis.com/envoy.admin.v3.RoutesConfigDump",
            "dynamic_route_configs": [{"version_info": "1", "route_config": typed}],
        }]}))
        .expect("dump");
        let any = dump
            .of_type("type.googleapis.com/envoy.config.route.v3.RouteConfiguration")
            .next()
            .expect("route config in dump")
            .resource
            .clone();
        mesh_xds::translate::from_any(&any).expect("proto from JSON")
    };
    let rc = mesh_xds::translate::translate_route(&proto).expect("mesh accepts the config");

    let port = free_port();
    let mut boot: Value = serde_json::from_str(&bootstrap(port, route_config)).unwrap();
    boot["static_resources"]["clusters"] = json!([{
        "name": "up", "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": "up", "endpoints": [{"lb_endpoints": [{"endpoint": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": up.port}}}}]}]},
    }]);
    let _envoy = EnvoyProcess::start(&boot.to_string());

    // (host, path, headers, requests the upstream sees)
    type Case = (
        &'static str,
        &'static str,
        Vec<(&'static str, &'static str)>,
        usize,
    );
    let cases: Vec<Case> = vec![
        ("svc", "/once/a", vec![], 2),
        ("svc", "/always/b", vec![], 3),
        (
            "svc",
            "/v1/items?x=1",
            vec![("x-user", "alice"), ("x-secret", "s"), ("x-level", "app")],
            1,
        ),
        ("svc", "/v1/", vec![], 1),
        ("svc", "/users/42?q", vec![("x-secret", "s")], 1),
        ("svc", "/users/abc", vec![], 1),
        ("svc", "/mirror/a", vec![("x-user", "m")], 2),
        ("svc:8080", "/mirror/b", vec![], 2),
    ];
    let mut envoy_runs = Vec::new();
    for (host, path, headers, n) in &cases {
        let resp = envoy_forward(port, host, path, headers);
        envoy_runs.push((resp, up.take(*n)));
    }

    // mesh: the same route configuration in a snapshot whose cluster `up` has the upstream.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mesh_runs = rt.block_on(async {
        use std::collections::{BTreeMap, HashMap};
        use std::sync::Arc;
        let listener = |port: u16| mesh_core::listener::Listener {
            name: format!("0.0.0.0_{port}"),
            address: ([0, 0, 0, 0], port).into(),
            kind: mesh_core::listener::ListenerKind::Outbound(
                mesh_core::listener::OutboundProtocol::Http {
                    route_config: "fwd".into(),
                },
            ),
        };
        let listeners: HashMap<String, Arc<mesh_core::listener::Listener>> = [80, 8080]
            .into_iter()
            .map(|p| (format!("0.0.0.0_{p}"), Arc::new(listener(p))))
            .collect();
        let ep = mesh_core::endpoint::Endpoint::new(([127, 0, 0, 1], up.port).into());
        let snap = mesh_core::Snapshot::new(
            1,
            listeners,
            HashMap::from([("fwd".to_owned(), Arc::new(rc))]),
            HashMap::from([(
                "up".to_owned(),
                Arc::new(mesh_core::cluster::Cluster::eds("up")),
            )]),
            HashMap::from([(
                "up".to_owned(),
                Arc::new(mesh_core::endpoint::EndpointSet::new("up", vec![ep])),
            )]),
            Arc::default(),
            mesh_core::snapshot::OutboundTrafficPolicy::RegistryOnly,
            BTreeMap::new(),
        );
        let cell = mesh_core::SnapshotCell::new();
        cell.publish(snap, true);
        let node = mesh_core::NodeIdentity::new("t", "default", "127.0.0.1".parse().unwrap(), "sa");
        let out = mesh_tower::outbound::Outbound::new(cell, mesh_core::CertStore::new(), node);
        let mut runs = Vec::new();
        for (host, path, headers, n) in &cases {
            let mut b = http::Request::get(format!("http://{host}{path}"));
            for (k, v) in headers {
                b = b.header(*k, *v);
            }
            let resp = out
                .request(
                    b.body(http_body_util::Empty::<bytes::Bytes>::new())
                        .unwrap(),
                )
                .await;
            let status = resp.status().as_u16();
            let xs = x_headers(resp.headers());
            drop(resp);
            let seen = tokio::task::block_in_place(|| up.take(*n));
            runs.push(((status, xs), seen));
        }
        runs
    });
    let mut disagreements = Vec::new();
    for (i, (_, path, _, _)) in cases.iter().enumerate() {
        if envoy_runs[i] != mesh_runs[i] {
            disagreements.push(format!(
                "{path}:\n  envoy {:?}\n  mesh  {:?}",
                envoy_runs[i], mesh_runs[i]
            ));
        }
    }
    assert!(disagreements.is_empty(), "{}", disagreements.join("\n"));
    // The scripted failures really happened: a retry after one 503, three attempts for always-503.
    assert_eq!(envoy_runs[0].1.len(), 2);
    assert_eq!(envoy_runs[1].1.len(), 3);
}

// ---------- load balancing and local replies: which endpoints serve, Envoy vs mesh ----------

/// Upstreams that answer every request with their own port as the body (keep-alive), `200`
/// unless [`PortScript::set_status`] says otherwise; requests to paths under `/hold` wait until
/// [`Gate::open`] (bounded: 10 s).
pub(crate) struct PortUpstreams {
    pub(crate) ports: Vec<u16>,
    gate: std::sync::Arc<Gate>,
    /// Each port's status and requests served.
    pub(crate) script: std::sync::Arc<PortScript>,
    /// Connections accepted on all ports.
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// The status each port answers (200 unless set) and the requests each has served.
#[derive(Default)]
pub(crate) struct PortScript {
    status: std::sync::Mutex<std::collections::HashMap<u16, u16>>,
    served: std::sync::Mutex<std::collections::HashMap<u16, usize>>,
}

impl PortScript {
    /// `port` answers `status` from now on (0: closes the connection instead).
    pub(crate) fn set_status(&self, port: u16, status: u16) {
        self.status.lock().unwrap().insert(port, status);
    }

    /// Requests `port` has served.
    pub(crate) fn served(&self, port: u16) -> usize {
        self.served.lock().unwrap().get(&port).copied().unwrap_or(0)
    }

    /// Every port back to 200 and no request served.
    pub(crate) fn reset(&self) {
        self.status.lock().unwrap().clear();
        self.served.lock().unwrap().clear();
    }

    /// Counts a request to `port`; the status it answers.
    fn serve(&self, port: u16) -> u16 {
        *self.served.lock().unwrap().entry(port).or_default() += 1;
        self.status
            .lock()
            .unwrap()
            .get(&port)
            .copied()
            .unwrap_or(200)
    }
}

/// Holds `/hold` requests; counts the requests that are waiting.
#[derive(Default)]
struct Gate {
    state: std::sync::Mutex<(bool, usize)>,
    cv: std::sync::Condvar,
}

impl Gate {
    fn open(&self) {
        self.state.lock().unwrap().0 = true;
        self.cv.notify_all();
    }
    fn close(&self) {
        self.state.lock().unwrap().0 = false;
    }
    /// Waits (bounded) until `n` requests are held.
    fn wait_held(&self, n: usize) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut s = self.state.lock().unwrap();
        while s.1 < n && std::time::Instant::now() < deadline {
            s = self
                .cv
                .wait_timeout(s, Duration::from_millis(20))
                .unwrap()
                .0;
        }
        assert!(
            s.1 >= n,
            "only {} of {n} requests reached the upstream",
            s.1
        );
    }
    fn hold(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut s = self.state.lock().unwrap();
        s.1 += 1;
        self.cv.notify_all();
        while !s.0 && std::time::Instant::now() < deadline {
            s = self
                .cv
                .wait_timeout(s, Duration::from_millis(20))
                .unwrap()
                .0;
        }
        s.1 -= 1;
    }
}

impl PortUpstreams {
    pub(crate) fn start(n: usize) -> PortUpstreams {
        let gate = std::sync::Arc::new(Gate::default());
        let script = std::sync::Arc::new(PortScript::default());
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let ports = (0..n)
            .map(|_| {
                let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                let port = listener.local_addr().unwrap().port();
                let (gate, script, accepted) = (gate.clone(), script.clone(), accepted.clone());
                std::thread::spawn(move || {
                    for stream in listener.incoming() {
                        let Ok(stream) = stream else { return };
                        accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let (gate, script) = (gate.clone(), script.clone());
                        std::thread::spawn(move || serve_port(stream, port, &gate, &script));
                    }
                });
                port
            })
            .collect();
        PortUpstreams {
            ports,
            gate,
            script,
            accepted,
        }
    }
}

fn serve_port(mut stream: TcpStream, port: u16, gate: &Gate, script: &PortScript) {
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        if head
            .split(' ')
            .nth(1)
            .is_some_and(|p| p.starts_with("/hold"))
        {
            gate.hold();
        }
        let status = script.serve(port);
        if status == 0 {
            // Closes the connection without an answer.
            return;
        }
        let body = port.to_string();
        let resp = format!(
            "HTTP/1.1 {status} {}\r\ncontent-length: {}\r\n\r\n{body}",
            http::StatusCode::from_u16(status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("Status"),
            body.len()
        );
        if stream.write_all(resp.as_bytes()).is_err() {
            return;
        }
    }
}

/// A keep-alive HTTP/1.1 client connection to Envoy.
pub(crate) struct KeepAlive {
    s: TcpStream,
    buf: Vec<u8>,
}

impl KeepAlive {
    pub(crate) fn connect(port: u16) -> KeepAlive {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect to envoy");
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        KeepAlive { s, buf: Vec::new() }
    }

    /// GET `path` from `host`: (status, body).
    pub(crate) fn get(&mut self, host: &str, path: &str, extra: &[(&str, &str)]) -> (u16, String) {
        let (status, _, body) = self.send(host, path, extra);
        (status, body)
    }

    /// GET `path` from `host` with `extra` headers: (status, response headers with lowercase
    /// names, body).
    pub(crate) fn send(
        &mut self,
        host: &str,
        path: &str,
        extra: &[(&str, &str)],
    ) -> (u16, Vec<(String, String)>, String) {
        self.request("GET", host, path, extra)
    }

    /// [`send`](Self::send) with `method` (no request body: say `content-length: 0` in
    /// `extra` for a POST).
    pub(crate) fn request(
        &mut self,
        method: &str,
        host: &str,
        path: &str,
        extra: &[(&str, &str)],
    ) -> (u16, Vec<(String, String)>, String) {
        let mut text = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n");
        for (k, v) in extra {
            text.push_str(&format!("{k}: {v}\r\n"));
        }
        text.push_str("\r\n");
        self.s.write_all(text.as_bytes()).unwrap();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                let headers: Vec<(String, String)> = head
                    .lines()
                    .skip(1)
                    .filter_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        Some((k.trim().to_ascii_lowercase(), v.trim().to_owned()))
                    })
                    .collect();
                let len: usize = headers
                    .iter()
                    .find(|(k, _)| k == "content-length")
                    .and_then(|(_, v)| v.parse().ok())
                    .unwrap_or(0);
                if self.buf.len() >= end + 4 + len {
                    let body =
                        String::from_utf8_lossy(&self.buf[end + 4..end + 4 + len]).into_owned();
                    self.buf.drain(..end + 4 + len);
                    let status = head
                        .split(' ')
                        .nth(1)
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0);
                    return (status, headers, body);
                }
            }
            let n = self.s.read(&mut chunk).expect("read envoy response");
            assert!(n > 0, "envoy closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// One endpoint of an LB case: (priority, zone, zone weight, health, endpoint weight).
type Ep = (u32, &'static str, Option<u32>, &'static str, u32);

struct LbCase {
    name: &'static str,
    policy: &'static str,
    locality_weighted: bool,
    panic_threshold: Option<f64>,
    eps: Vec<Ep>,
}

/// A `LocalityLbEndpoints` group: (priority, zone, zone weight).
type GroupKey<'a> = (u32, &'a str, Option<u32>);

fn lb_cluster_json(c: &LbCase, ports: &[u16]) -> Value {
    let mut groups: Vec<(GroupKey<'_>, Vec<Value>)> = Vec::new();
    for (ep, port) in c.eps.iter().zip(ports) {
        let key = (ep.0, ep.1, ep.2);
        let e = json!({
            "endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}},
            "health_status": ep.3,
            "load_balancing_weight": ep.4,
        });
        match groups.iter_mut().find(|g| g.0 == key) {
            Some(g) => g.1.push(e),
            None => groups.push((key, vec![e])),
        }
    }
    let endpoints: Vec<Value> = groups
        .into_iter()
        .map(|((prio, zone, lw), eps)| {
            let mut g = json!({"priority": prio, "locality": {"region": "r", "zone": zone}, "lb_endpoints": eps});
            if let Some(w) = lw {
                g["load_balancing_weight"] = json!(w);
            }
            g
        })
        .collect();
    let mut cl = json!({
        "name": c.name, "type": "STATIC", "connect_timeout": "1s", "lb_policy": c.policy,
        "load_assignment": {"cluster_name": c.name, "endpoints": endpoints},
    });
    if c.locality_weighted {
        cl["common_lb_config"]["locality_weighted_lb_config"] = json!({});
    }
    if let Some(p) = c.panic_threshold {
        cl["common_lb_config"]["healthy_panic_threshold"] = json!({"value": p});
    }
    cl
}

/// A static cluster (JSON) as mesh translates it, with its inline `load_assignment` as an
/// endpoint set (none for a DNS cluster).
fn mesh_static_cluster(
    c: &Value,
) -> (
    mesh_core::cluster::Cluster,
    Option<mesh_core::endpoint::EndpointSet>,
) {
    let c_pb: envoy_types::pb::envoy::config::cluster::v3::Cluster =
        mesh_xds::translate::from_any(&any_via_dump(
            "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            "ClustersConfigDump",
            "static_clusters",
            "cluster",
            c,
        ))
        .expect("cluster proto");
    let cluster = mesh_xds::translate::translate_cluster(&c_pb).expect("mesh accepts the cluster");
    // A DNS cluster's load_assignment names hosts to resolve, not endpoints.
    let dns = matches!(
        cluster.discovery,
        mesh_core::cluster::ClusterDiscovery::Dns(_)
    );
    let set = c_pb
        .load_assignment
        .as_ref()
        .filter(|_| !dns)
        .map(|cla| mesh_xds::translate::translate_endpoint(cla).expect("mesh accepts the CLA"));
    (cluster, set)
}

/// Starts mesh's outbound path over `route_config` and the given clusters (JSON, static
/// clusters whose `load_assignment` becomes the endpoint set) on a multi-thread runtime.
pub(crate) fn mesh_outbound(
    rt: &tokio::runtime::Runtime,
    route_config: &Value,
    clusters: &[Value],
) -> mesh_tower::outbound::Outbound {
    mesh_outbound_with_dns(rt, route_config, clusters, None)
}

/// [`mesh_outbound`], where `STRICT_DNS` / `LOGICAL_DNS` clusters stay DNS clusters resolved
/// through mesh-dns asking the DNS server `dns` (the names in their `load_assignment`).
pub(crate) fn mesh_outbound_with_dns(
    rt: &tokio::runtime::Runtime,
    route_config: &Value,
    clusters: &[Value],
    dns: Option<std::net::SocketAddr>,
) -> mesh_tower::outbound::Outbound {
    use std::collections::{BTreeMap, HashMap};
    use std::sync::Arc;
    let rc_pb: pb::RouteConfiguration = mesh_xds::translate::from_any(&any_via_dump(
        "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
        "RoutesConfigDump",
        "dynamic_route_configs",
        "route_config",
        route_config,
    ))
    .expect("route proto");
    let rc = mesh_xds::translate::translate_route(&rc_pb).expect("mesh accepts the routes");
    let mut cmap = HashMap::new();
    let mut emap = HashMap::new();
    for c in clusters {
        let (mut cluster, set) = mesh_static_cluster(c);
        if dns.is_some()
            && matches!(
                cluster.discovery,
                mesh_core::cluster::ClusterDiscovery::Dns(_)
            )
        {
            cmap.insert(cluster.name.clone(), Arc::new(cluster));
            continue;
        }
        // Inline endpoints: served to mesh as the cluster's EDS resource.
        cluster.discovery = mesh_core::cluster::ClusterDiscovery::Eds {
            service_name: cluster.name.clone(),
        };
        if let Some(set) = set {
            emap.insert(cluster.name.clone(), Arc::new(set));
        }
        cmap.insert(cluster.name.clone(), Arc::new(cluster));
    }
    let listener = mesh_core::listener::Listener {
        name: "0.0.0.0_80".into(),
        address: ([0, 0, 0, 0], 80).into(),
        kind: mesh_core::listener::ListenerKind::Outbound(
            mesh_core::listener::OutboundProtocol::Http {
                route_config: rc.name.clone(),
            },
        ),
    };
    let snap = mesh_core::Snapshot::new(
        1,
        HashMap::from([("0.0.0.0_80".to_owned(), Arc::new(listener))]),
        HashMap::from([(rc.name.clone(), Arc::new(rc))]),
        cmap,
        emap,
        Arc::default(),
        mesh_core::snapshot::OutboundTrafficPolicy::RegistryOnly,
        BTreeMap::new(),
    );
    let cell = mesh_core::SnapshotCell::new();
    cell.publish(snap, true);
    let node = mesh_core::NodeIdentity::new("t", "default", "127.0.0.1".parse().unwrap(), "sa");
    let _guard = rt.enter();
    let outbound =
        mesh_tower::outbound::Outbound::new(cell.clone(), mesh_core::CertStore::new(), node);
    let Some(dns) = dns else { return outbound };
    let resolver = mesh::parts::dns::MeshResolver::new(cell, "default", "cluster.local")
        .with_upstream_servers(&[dns])
        .expect("a resolver for the test DNS server");
    let outbound = outbound.with_resolver(Arc::new(resolver));
    outbound.spawn_dns_refresh();
    outbound
}

/// An Envoy bootstrap: one listener with `route_config`, an access log of
/// `<authority> <code> <flags>` lines in `log`, and `clusters`.
pub(crate) fn lb_bootstrap(
    port: u16,
    route_config: &Value,
    clusters: &[Value],
    log: &std::path::Path,
) -> String {
    let mut boot: Value = serde_json::from_str(&bootstrap(port, route_config.clone())).unwrap();
    boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["access_log"] = json!([{
        "name": "envoy.access_loggers.file",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": log.to_str().unwrap(),
            "log_format": {"text_format_source": {"inline_string": "%REQ(:AUTHORITY)% %RESPONSE_CODE% %RESPONSE_FLAGS%\n"}},
        },
    }]);
    boot["static_resources"]["clusters"] = json!(clusters);
    boot.to_string()
}

/// An empty access-log path for Envoy, unique to the test (`tag`) and process.
fn fresh_access_log(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("mesh-{tag}-oracle-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("access.log");
    let _ = std::fs::remove_file(&log);
    log
}

/// A real Envoy and mesh's outbound path over the same routes and clusters (see
/// [`oracles`]).
pub(crate) struct Oracles {
    /// Envoy's listener port.
    pub(crate) port: u16,
    /// Envoy's access log ([`lb_bootstrap`]'s format).
    pub(crate) log: std::path::PathBuf,
    /// The runtime mesh runs on.
    pub(crate) rt: tokio::runtime::Runtime,
    /// mesh.
    pub(crate) mesh: mesh_tower::outbound::Outbound,
    /// Envoy (stopped when dropped).
    pub(crate) envoy: EnvoyProcess,
}

/// Starts Envoy on [`lb_bootstrap`] (changed by `edit`) with a fresh access log under a
/// directory named after `name`, and mesh over the same config ([`mesh_outbound_with_dns`]).
pub(crate) fn oracles(
    name: &str,
    route_config: &Value,
    clusters: &[Value],
    edit: impl FnOnce(&mut Value),
    dns: Option<std::net::SocketAddr>,
) -> Oracles {
    let port = free_port();
    let log = fresh_access_log(name);
    let mut boot: Value =
        serde_json::from_str(&lb_bootstrap(port, route_config, clusters, &log)).unwrap();
    edit(&mut boot);
    let envoy = EnvoyProcess::start(&boot.to_string());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mesh = mesh_outbound_with_dns(&rt, route_config, clusters, dns);
    Oracles {
        port,
        log,
        rt,
        mesh,
        envoy,
    }
}

/// [`oracles`] over [`lb_bootstrap`] as it is, without DNS: (Envoy, its listener port, its
/// access log, the runtime mesh runs on, mesh).
pub(crate) fn envoy_and_mesh(
    what: &str,
    route_config: &Value,
    clusters: &[Value],
) -> (
    EnvoyProcess,
    u16,
    std::path::PathBuf,
    tokio::runtime::Runtime,
    mesh_tower::outbound::Outbound,
) {
    let o = oracles(what, route_config, clusters, |_| {}, None);
    (o.envoy, o.port, o.log, o.rt, o.mesh)
}

/// Envoy's access-log line for the `n`th logged request (bounded wait for the flush).
pub(crate) fn envoy_log_line(log: &std::path::Path, n: usize) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(l) = text.lines().nth(n) {
            return l.to_owned();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no access-log line {n}: {text:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn lb_cases() -> Vec<LbCase> {
    vec![
        // 2 of 4 healthy in P0: 2 * 1.4 / 4 = 70% stays, 30% spills to P1.
        LbCase {
            name: "spill",
            policy: "ROUND_ROBIN",
            locality_weighted: false,
            panic_threshold: None,
            eps: vec![
                (0, "a", None, "HEALTHY", 1),
                (0, "a", None, "UNHEALTHY", 1),
                (0, "a", None, "HEALTHY", 1),
                (0, "a", None, "DRAINING", 1),
                (1, "a", None, "HEALTHY", 1),
                (1, "a", None, "UNKNOWN", 1),
            ],
        },
        // 1 of 4 healthy, no other level: panic, every host serves.
        LbCase {
            name: "panic",
            policy: "RANDOM",
            locality_weighted: false,
            panic_threshold: None,
            eps: vec![
                (0, "a", None, "HEALTHY", 1),
                (0, "a", None, "UNHEALTHY", 1),
                (0, "a", None, "TIMEOUT", 1),
                (0, "a", None, "UNHEALTHY", 1),
            ],
        },
        // Draining hosts do not count: 1 of 3 → 46% → panic; does the draining one serve?
        LbCase {
            name: "panic-drain",
            policy: "ROUND_ROBIN",
            locality_weighted: false,
            panic_threshold: None,
            eps: vec![
                (0, "a", None, "HEALTHY", 1),
                (0, "a", None, "UNHEALTHY", 1),
                (0, "a", None, "DRAINING", 1),
                (0, "a", None, "UNHEALTHY", 1),
            ],
        },
        // The same with the panic threshold at 20%: only the healthy host.
        LbCase {
            name: "nopanic",
            policy: "RANDOM",
            locality_weighted: false,
            panic_threshold: Some(20.0),
            eps: vec![
                (0, "a", None, "HEALTHY", 1),
                (0, "a", None, "UNHEALTHY", 1),
                (0, "a", None, "TIMEOUT", 1),
                (0, "a", None, "UNHEALTHY", 1),
            ],
        },
        // P0 all unhealthy, P1 half healthy (70% normalized): everything to P1's healthy host.
        LbCase {
            name: "failover",
            policy: "LEAST_REQUEST",
            locality_weighted: false,
            panic_threshold: None,
            eps: vec![
                (0, "a", None, "UNHEALTHY", 1),
                (0, "a", None, "UNHEALTHY", 1),
                (1, "a", None, "HEALTHY", 1),
                (1, "a", None, "UNHEALTHY", 1),
            ],
        },
        // Locality weights 3 : 1 : 2 (zone c half healthy: 2 * 0.7 = 1.4); zone d unweighted.
        LbCase {
            name: "locality",
            policy: "ROUND_ROBIN",
            locality_weighted: true,
            panic_threshold: None,
            eps: vec![
                (0, "a", Some(3), "HEALTHY", 1),
                (0, "b", Some(1), "HEALTHY", 1),
                (0, "b", Some(1), "HEALTHY", 1),
                (0, "c", Some(2), "HEALTHY", 1),
                (0, "c", Some(2), "UNHEALTHY", 1),
                (0, "d", None, "HEALTHY", 1),
            ],
        },
        // Endpoint weights 1 : 3 under weighted round robin and least request.
        LbCase {
            name: "weighted",
            policy: "ROUND_ROBIN",
            locality_weighted: false,
            panic_threshold: None,
            eps: vec![(0, "a", None, "HEALTHY", 1), (0, "a", None, "HEALTHY", 3)],
        },
        LbCase {
            name: "weighted-lr",
            policy: "LEAST_REQUEST",
            locality_weighted: false,
            panic_threshold: None,
            eps: vec![(0, "a", None, "HEALTHY", 1), (0, "a", None, "HEALTHY", 3)],
        },
    ]
}

#[test]
fn load_balancing_and_failure_flags_match_envoy() {
    if envoy_binary().is_none() {
        return;
    }
    const N: usize = 400;
    let cases = lb_cases();
    let total_eps: usize = cases.iter().map(|c| c.eps.len()).sum();
    let up = PortUpstreams::start(total_eps + 3);
    let mut clusters = Vec::new();
    // weighted_clusters 70 : 20 : 10 over three one-endpoint clusters.
    let split_ports = up.ports[total_eps..].to_vec();
    for (i, p) in split_ports.iter().enumerate() {
        let name = format!("w{i}");
        clusters.push(
            json!({"name": name, "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}]}]}}),
        );
    }
    let mut case_ports = Vec::new();
    let mut next = 0;
    for c in &cases {
        let ports = &up.ports[next..next + c.eps.len()];
        next += c.eps.len();
        clusters.push(lb_cluster_json(c, ports));
        case_ports.push(ports.to_vec());
    }
    // Failures: a closed port, with and without istiod's connect-failure retries; a cluster
    // without endpoints.
    // Refuses connections for the whole test (a released free port could be taken by
    // another test's server meanwhile, which then holds the requests).
    let (_dead_socket, dead_port) = closed_port();
    let dead = |name: &str| {
        json!({"name": name, "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": dead_port}}}}]}]}})
    };
    clusters.push(dead("dead"));
    // The same with a retry breaker that admits no retry.
    let mut dead0 = dead("dead0");
    dead0["circuit_breakers"] = json!({"thresholds": [{"max_retries": 0}]});
    clusters.push(dead0);
    // Retry budgets replace max_retries: none admitted (0% and no floor), Envoy's defaults
    // (20%, at least 3), and the whole of the active requests with no floor.
    let budgets = [
        (
            "deadb0",
            json!({"budget_percent": {"value": 0.0}, "min_retry_concurrency": 0}),
        ),
        ("deadb", json!({})),
        (
            "deadb100",
            json!({"budget_percent": {"value": 100.0}, "min_retry_concurrency": 0}),
        ),
    ];
    for (name, budget) in &budgets {
        let mut c = dead(name);
        c["circuit_breakers"] = json!({"thresholds": [{"retry_budget": budget}]});
        clusters.push(c);
    }
    clusters.push(
        json!({"name": "empty", "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": "empty", "endpoints": []}}),
    );
    let retry = json!({"retry_on": "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
        "num_retries": 2, "retriable_status_codes": [503]});
    let mut vhosts: Vec<Value> = cases
        .iter()
        .map(|c| json!({"name": c.name, "domains": [c.name], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": c.name}}]}))
        .collect();
    vhosts.push(json!({"name": "dead", "domains": ["dead"], "routes": [
        {"match": {"prefix": "/retry"}, "route": {"cluster": "dead", "retry_policy": retry}},
        {"match": {"prefix": "/"}, "route": {"cluster": "dead"}}]}));
    // A held upstream answers nothing: each try ends at the per-try idle timeout.
    vhosts.push(
        json!({"name": "idle", "domains": ["idle"], "routes": [{"match": {"prefix": "/"},
        "route": {"cluster": "w0", "retry_policy": {"retry_on": "5xx", "num_retries": 1,
            "per_try_idle_timeout": "0.2s"}}}]}),
    );
    vhosts.push(json!({"name": "split", "domains": ["split"], "routes": [{"match": {"prefix": "/"},
        "route": {"weighted_clusters": {"clusters": [
            {"name": "w0", "weight": 70}, {"name": "w1", "weight": 20}, {"name": "w2", "weight": 10}]}}}]}));
    for name in ["dead0", "deadb0", "deadb", "deadb100"] {
        vhosts.push(json!({"name": name, "domains": [name], "routes": [
            {"match": {"prefix": "/"}, "route": {"cluster": name, "retry_policy": retry}}]}));
    }
    vhosts.push(json!({"name": "empty", "domains": ["empty"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "empty"}}]}));
    vhosts.push(json!({"name": "nr", "domains": ["nr"], "routes": [{"match": {"prefix": "/only"}, "route": {"cluster": "empty"}}]}));
    let route_config = json!({"name": "lb", "virtual_hosts": vhosts});

    let (_envoy, port, log, rt, mesh) = envoy_and_mesh("lb", &route_config, &clusters);

    let mut client = KeepAlive::connect(port);
    let mut disagreements = Vec::new();
    let split = LbCase {
        name: "split",
        policy: "ROUND_ROBIN",
        locality_weighted: false,
        panic_threshold: None,
        eps: vec![],
    };
    let mut checks: Vec<(&LbCase, &[u16])> = cases
        .iter()
        .zip(&case_ports)
        .map(|(c, p)| (c, &p[..]))
        .collect();
    checks.push((&split, &split_ports));
    for (c, ports) in checks {
        let count = |bodies: Vec<String>| -> Vec<usize> {
            let mut v = vec![0; ports.len()];
            for b in bodies {
                let p: u16 = b
                    .parse()
                    .unwrap_or_else(|_| panic!("{}: body {b:?}", c.name));
                v[ports.iter().position(|x| *x == p).unwrap()] += 1;
            }
            v
        };
        let envoy = count(
            (0..N)
                .map(|_| {
                    let (status, body) = client.get(c.name, "/", &[]);
                    assert_eq!(status, 200, "{}: envoy {body}", c.name);
                    body
                })
                .collect(),
        );
        let mesh_counts = count(rt.block_on(async {
            let mut v = Vec::new();
            for _ in 0..N {
                let r = mesh.get(format!("http://{}/", c.name)).await.unwrap();
                assert_eq!(r.status(), 200, "{}: mesh {:?}", c.name, r.body());
                v.push(String::from_utf8_lossy(r.body()).into_owned());
            }
            v
        }));
        let served = |v: &[usize]| v.iter().map(|n| *n > 0).collect::<Vec<_>>();
        let (stat, df) = chi_square(&envoy, &mesh_counts);
        eprintln!(
            "{}: envoy {envoy:?} mesh {mesh_counts:?} chi2 {stat:.2} df {df}",
            c.name
        );
        if served(&envoy) != served(&mesh_counts) || stat > CHI2_999[df.min(8)] {
            disagreements.push(format!(
                "{}: envoy {envoy:?} mesh {mesh_counts:?} (chi2 {stat:.1}, df {df})",
                c.name
            ));
        }
    }
    // Local replies: status and response flags as Envoy logs them.
    let failures = [
        ("dead", "/retry"),
        ("dead", "/"),
        ("dead0", "/"),
        ("deadb0", "/"),
        ("deadb", "/"),
        ("deadb100", "/"),
        ("idle", "/hold"),
        ("empty", "/"),
        ("nr", "/x"),
    ];
    for (i, (host, path)) in failures.iter().enumerate() {
        let (status, _) = client.get(host, path, &[]);
        let line = envoy_log_line(&log, (cases.len() + 1) * N + i);
        let envoy_flags = line.rsplit(' ').next().unwrap_or("").to_owned();
        let (m_status, m_flags) = rt.block_on(async {
            let r = mesh.get(format!("http://{host}{path}")).await.unwrap();
            let f = r
                .extensions()
                .get::<mesh_core::flags::ResponseFlags>()
                .copied()
                .unwrap_or_default();
            (r.status().as_u16(), f.to_string())
        });
        eprintln!("{host}{path}: envoy {status} {envoy_flags} mesh {m_status} {m_flags}");
        if (status, envoy_flags.as_str()) != (m_status, m_flags.as_str()) {
            disagreements.push(format!(
                "{host}{path}: envoy {status} {envoy_flags}, mesh {m_status} {m_flags}"
            ));
        }
    }
    assert!(disagreements.is_empty(), "{}", disagreements.join("\n"));
}

#[test]
fn connection_breakers_match_envoy() {
    if envoy_binary().is_none() {
        return;
    }
    let up = PortUpstreams::start(2);
    let cluster = |name: &str, port: u16, thresholds: Value| {
        json!({"name": name, "type": "STATIC", "connect_timeout": "1s",
            "circuit_breakers": {"thresholds": [thresholds]},
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}})
    };
    let clusters = vec![
        // No request may wait for a connection: with none open, every request overflows.
        cluster("nopend", up.ports[0], json!({"max_pending_requests": 0})),
        // One connection and one request waiting for it.
        cluster(
            "onecx",
            up.ports[1],
            json!({"max_connections": 1, "max_pending_requests": 1}),
        ),
    ];
    let vhosts: Vec<Value> = ["nopend", "onecx"]
        .iter()
        .map(|c| json!({"name": c, "domains": [c], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": c}}]}))
        .collect();
    let route_config = json!({"name": "cb", "virtual_hosts": vhosts});
    let (_envoy, port, log, rt, mesh) = envoy_and_mesh("cb", &route_config, &clusters);

    // Each side: nopend; then request A holds onecx's only connection, B and C race for the
    // one pending place: the loser must answer at once (503 UO) while A is still held; then
    // A and the winner answer. Results: the immediate answer and all (status, flags) sorted.
    let (status, _) = KeepAlive::connect(port).get("nopend", "/", &[]);
    assert_eq!(status, 503, "envoy overflows without pending room");
    up.gate.close();
    let held = std::thread::spawn(move || KeepAlive::connect(port).get("onecx", "/hold", &[]).0);
    up.gate.wait_held(1);
    let (tx, rx) = std::sync::mpsc::channel();
    let racers: Vec<_> = (0..2)
        .map(|_| {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let r = KeepAlive::connect(port).get("onecx", "/", &[]).0;
                tx.send(r).unwrap();
            })
        })
        .collect();
    let envoy_first = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("envoy: one racer answers while the connection is held");
    up.gate.open();
    assert_eq!(held.join().unwrap(), 200);
    for r in racers {
        r.join().unwrap();
    }
    let mut envoy: Vec<(u16, String)> = (0..4)
        .map(|n| {
            let line = envoy_log_line(&log, n);
            let mut it = line.rsplit(' ');
            let flags = it.next().unwrap_or("").to_owned();
            (it.next().and_then(|c| c.parse().ok()).unwrap_or(0), flags)
        })
        .collect();
    envoy.sort();

    let (mesh_first, mut mesh_runs) = rt.block_on(async {
        let flags = |r: &http::Response<bytes::Bytes>| {
            r.extensions()
                .get::<mesh_core::flags::ResponseFlags>()
                .copied()
                .unwrap_or_default()
                .to_string()
        };
        let mut v = Vec::new();
        let r = mesh.get("http://nopend/").await.unwrap();
        v.push((r.status().as_u16(), flags(&r)));
        up.gate.close();
        let m = mesh.clone();
        let held = tokio::spawn(async move { m.get("http://onecx/hold").await });
        let gate = up.gate.clone();
        tokio::task::spawn_blocking(move || gate.wait_held(1))
            .await
            .unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..2 {
            let (m, tx) = (mesh.clone(), tx.clone());
            tokio::spawn(async move {
                let r = m.get("http://onecx/").await.unwrap();
                tx.send((r.status().as_u16(), flags(&r))).unwrap();
            });
        }
        let first = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("mesh: one racer answers while the connection is held")
            .unwrap();
        v.push(first.clone());
        up.gate.open();
        let r = tokio::time::timeout(Duration::from_secs(10), held)
            .await
            .expect("held request answers")
            .unwrap()
            .unwrap();
        v.push((r.status().as_u16(), flags(&r)));
        let second = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("the pending racer answers")
            .unwrap();
        v.push(second);
        (first.0, v)
    });
    mesh_runs.sort();
    eprintln!("envoy {envoy:?}\nmesh  {mesh_runs:?}");
    assert_eq!((envoy_first, mesh_first), (503, 503));
    assert_eq!(envoy, mesh_runs);
    assert_eq!(
        envoy.iter().filter(|r| r.1 == "UO").count(),
        2,
        "two overflows: {envoy:?}"
    );
}

#[test]
fn hash_policies_place_keys_like_envoy() {
    if envoy_binary().is_none() {
        return;
    }
    let up = PortUpstreams::start(8);
    let mut clusters = Vec::new();
    let mut vhosts = Vec::new();
    for (i, policy) in ["RING_HASH", "MAGLEV"].iter().enumerate() {
        let name = policy.to_ascii_lowercase();
        let eps: Vec<Value> = up.ports[i * 4..i * 4 + 4]
            .iter()
            .enumerate()
            .map(|(k, p)| json!({"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}},
                "load_balancing_weight": 1 + k % 2}))
            .collect();
        clusters.push(
            json!({"name": name, "type": "STATIC", "connect_timeout": "1s", "lb_policy": policy,
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": eps}]}}),
        );
        vhosts.push(
            json!({"name": name, "domains": [name], "routes": [{"match": {"prefix": "/"},
            "route": {"cluster": name, "hash_policy": [{"header": {"header_name": "x-key"}}]}}]}),
        );
    }
    let route_config = json!({"name": "hash", "virtual_hosts": vhosts});
    let (_envoy, port, _, rt, mesh) = envoy_and_mesh("hash", &route_config, &clusters);
    let mut client = KeepAlive::connect(port);
    let mut disagreements = Vec::new();
    for host in ["ring_hash", "maglev"] {
        let mut agree = 0;
        let mut used = std::collections::BTreeSet::new();
        for k in 0..200 {
            let key = format!("user-{k}");
            let (status, envoy) = client.get(host, "/", &[("x-key", &key)]);
            assert_eq!(status, 200);
            let m = rt.block_on(async {
                let req = http::Request::get(format!("http://{host}/"))
                    .header("x-key", &key)
                    .body(http_body_util::Empty::<bytes::Bytes>::new())
                    .unwrap();
                let r = mesh.request(req).await;
                use http_body_util::BodyExt;
                let b = r.into_body().collect().await.unwrap().to_bytes();
                String::from_utf8_lossy(&b).into_owned()
            });
            used.insert(envoy.clone());
            if m == envoy {
                agree += 1;
            } else if disagreements.len() < 10 {
                disagreements.push(format!("{host} {key}: envoy {envoy} mesh {m}"));
            }
        }
        eprintln!("{host}: {agree} of 200 keys on the same endpoint");
        // The keys spread: the comparison is not trivially one endpoint.
        assert_eq!(used.len(), 4, "{host}: {used:?}");
        // Both place every key as Envoy does (Maglev with Envoy's floating-point weight
        // pacing: maglev_tables_match_envoy_for_many_host_sets).
        assert_eq!(
            agree,
            200,
            "{host}: {agree} of 200 keys agree\n{}",
            disagreements.join("\n")
        );
    }
}

/// Maglev tables for many host sets (sizes, weights and ports from a fixed seed, none of them
/// listening: Envoy logs the host it picked, `UPSTREAM_HOST`, even when the connect fails)
/// place every key on the host Envoy picks. The first set is one where exact integer pacing of
/// the weighted fill put `user-*` keys elsewhere than Envoy's floating-point pacing does.
#[test]
fn maglev_tables_match_envoy_for_many_host_sets() {
    if envoy_binary().is_none() {
        return;
    }
    use mesh_core::lb::{Balancer, HostState, PickContext, xx_hash64};
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;
    const KEYS: usize = 200;
    let mut sets: Vec<Vec<(u16, u32)>> = vec![vec![(22832, 1), (37912, 2), (38276, 1), (32818, 2)]];
    let mut state = 0x6d61_676c_6576u64;
    let mut next = |n: u64| {
        state = xx_hash64(&state.to_le_bytes(), 7);
        state % n
    };
    for _ in 0..11 {
        let hosts = 2 + next(5) as usize;
        sets.push(
            (0..hosts)
                // Below Linux's ephemeral range (32768–60999), where other tests' servers bind.
                .map(|_| (20_000 + next(12_000) as u16, 1 + next(4) as u32))
                .collect(),
        );
    }
    let clusters: Vec<Value> = sets
        .iter()
        .enumerate()
        .map(|(n, hosts)| {
            let name = format!("maglev{n}");
            let eps: Vec<Value> = hosts
                .iter()
                .map(|(p, w)| json!({"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}},
                    "load_balancing_weight": w}))
                .collect();
            json!({"name": name, "type": "STATIC", "connect_timeout": "1s", "lb_policy": "MAGLEV",
                "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": eps}]}})
        })
        .collect();
    let vhosts: Vec<Value> = (0..sets.len())
        .map(|n| {
            let name = format!("maglev{n}");
            json!({"name": name, "domains": [name], "routes": [{"match": {"prefix": "/"},
                "route": {"cluster": name, "hash_policy": [{"header": {"header_name": "x-key"}}]}}]})
        })
        .collect();
    let route_config = json!({"name": "maglev", "virtual_hosts": vhosts});
    let port = free_port();
    let log = fresh_access_log("maglev");
    let mut boot: Value =
        serde_json::from_str(&lb_bootstrap(port, &route_config, &clusters, &log)).unwrap();
    boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["access_log"]
        [0]["typed_config"]["log_format"]["text_format_source"]["inline_string"] =
        json!("%REQ(:AUTHORITY)% %REQ(x-key)% %UPSTREAM_HOST%\n");
    let _envoy = EnvoyProcess::start(&boot.to_string());
    let mut client = KeepAlive::connect(port);
    for n in 0..sets.len() {
        for k in 0..KEYS {
            // Nothing should listen there (Envoy answers 503 UF after picking the host), but
            // another test on the machine may: the pick is logged whatever the answer is.
            client.get(
                &format!("maglev{n}"),
                "/",
                &[("x-key", &format!("user-{k}"))],
            );
        }
    }
    let total = sets.len() * KEYS;
    envoy_log_line(&log, total - 1);
    let text = std::fs::read_to_string(&log).unwrap();
    let mut envoy = std::collections::HashMap::new();
    for line in text.lines() {
        let mut f = line.split(' ');
        let (Some(host), Some(key), Some(up)) = (f.next(), f.next(), f.next()) else {
            panic!("access-log line {line:?}");
        };
        envoy.insert((host.to_owned(), key.to_owned()), up.to_owned());
    }
    assert_eq!(envoy.len(), total);
    let mut disagreements = Vec::new();
    for (n, c) in clusters.iter().enumerate() {
        let (cluster, set) = mesh_static_cluster(c);
        let set = set.expect("inline endpoints");
        let ejected = Arc::new(AtomicUsize::new(0));
        let lb = Balancer::new(
            &set,
            cluster.lb_policy,
            &cluster.lb_config,
            ejected.clone(),
            |ep| Arc::new(HostState::new(ep.address, ejected.clone())),
        );
        let mut used = std::collections::BTreeSet::new();
        for k in 0..KEYS {
            let key = format!("user-{k}");
            let ctx = PickContext {
                hash: Some(xx_hash64(key.as_bytes(), 0)),
                ..PickContext::default()
            };
            let i = lb.pick(&ctx, &mut rand::rng()).expect("a host");
            let mesh = set.endpoints[i].address.to_string();
            let envoy = &envoy[&(format!("maglev{n}"), key.clone())];
            used.insert(envoy.clone());
            if &mesh != envoy {
                disagreements.push(format!(
                    "set {n} {:?} {key}: envoy {envoy} mesh {mesh}",
                    sets[n]
                ));
            }
        }
        assert_eq!(used.len(), sets[n].len(), "set {n}: every host takes keys");
    }
    assert!(disagreements.is_empty(), "{}", disagreements.join("\n"));
}

/// `hash_policy.cookie` with a `ttl` (Istio's `consistentHash.httpCookie`): a request without
/// the cookie gets a generated value, hashed, and set on the response. The `Set-Cookie` form is
/// Envoy's, a request carrying the value (quoted or not) lands where the generating request
/// did, and mesh places Envoy's values on the same endpoints as Envoy.
#[test]
fn generated_hash_cookies_match_envoy() {
    if envoy_binary().is_none() {
        return;
    }
    let up = PortUpstreams::start(4);
    let eps: Vec<Value> = up
        .ports
        .iter()
        .map(|p| json!({"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}))
        .collect();
    let clusters = vec![
        json!({"name": "sticky", "type": "STATIC", "connect_timeout": "1s",
        "lb_policy": "RING_HASH", "load_assignment": {"cluster_name": "sticky", "endpoints": [{"lb_endpoints": eps}]}}),
    ];
    let cookies = [
        (
            "full",
            json!({"name": "session", "ttl": "3600s", "path": "/app",
                "attributes": [{"name": "SameSite", "value": "Lax"}, {"name": "Secure"}]}),
        ),
        ("bare", json!({"name": "sid", "ttl": "0s"})),
    ];
    let vhosts: Vec<Value> = cookies
        .iter()
        .map(|(host, c)| {
            json!({"name": host, "domains": [host], "routes": [{"match": {"prefix": "/"},
            "route": {"cluster": "sticky", "hash_policy": [{"cookie": c}]}}]})
        })
        .collect();
    let route_config = json!({"name": "cookies", "virtual_hosts": vhosts});
    let Oracles { port, rt, mesh, .. } = &oracles("cookie", &route_config, &clusters, |_| {}, None);
    let port = *port;
    let mesh_get = |host: &str, cookie: Option<&str>| -> (String, Vec<String>) {
        rt.block_on(async {
            let mut req = http::Request::get(format!("http://{host}/"));
            if let Some(c) = cookie {
                req = req.header("cookie", c);
            }
            let r = mesh
                .request(
                    req.body(http_body_util::Empty::<bytes::Bytes>::new())
                        .unwrap(),
                )
                .await;
            assert_eq!(r.status(), 200);
            let set: Vec<String> = r
                .headers()
                .get_all("set-cookie")
                .iter()
                .map(|v| v.to_str().unwrap().to_owned())
                .collect();
            use http_body_util::BodyExt;
            let b = r.into_body().collect().await.unwrap().to_bytes();
            (String::from_utf8_lossy(&b).into_owned(), set)
        })
    };
    // `name="<16 hex digits>"…`: the value and the form with the value blanked.
    let split = |set: &str, name: &str| -> (String, String) {
        let rest = set
            .strip_prefix(&format!("{name}=\""))
            .unwrap_or_else(|| panic!("set-cookie {set:?}"));
        let (value, tail) = rest.split_once('"').expect("closing quote");
        assert!(
            value.len() == 16
                && value
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
            "value {value:?}"
        );
        (value.to_owned(), format!("{name}=\"<v>\"{tail}"))
    };
    let mut client = KeepAlive::connect(port);
    let local = client.s.local_addr().unwrap().to_string();
    for ((host, c), want_form) in cookies.iter().zip([
        "session=\"<v>\"; Max-Age=3600; Path=/app; SameSite=Lax; Secure; HttpOnly",
        "sid=\"<v>\"; HttpOnly",
    ]) {
        let name = c["name"].as_str().unwrap();
        let (status, headers, envoy_port) = client.send(host, "/", &[]);
        assert_eq!(status, 200);
        let sets: Vec<&String> = headers
            .iter()
            .filter(|(k, _)| k == "set-cookie")
            .map(|(_, v)| v)
            .collect();
        assert_eq!(sets.len(), 1, "{host}: envoy {headers:?}");
        let (value, form) = split(sets[0], name);
        eprintln!("{host}: envoy set-cookie {} on {envoy_port}", sets[0]);
        assert_eq!(form, want_form, "{host}: Envoy's form");
        // Envoy's value: xxHash64 of the downstream remote and local addresses, in hex.
        let conn = format!("{local}127.0.0.1:{port}");
        assert_eq!(
            value,
            format!("{:016x}", mesh_core::lb::xx_hash64(conn.as_bytes(), 0)),
            "{host}: envoy's value from {conn}"
        );
        // Envoy: the cookie, quoted or not, lands where the generating request did, and
        // no new cookie is set.
        for cookie in [
            format!("{name}=\"{value}\""),
            format!("other=1; {name}={value}"),
        ] {
            let (status, headers, p) = client.send(host, "/", &[("cookie", &cookie)]);
            assert_eq!(
                (status, &p),
                (200, &envoy_port),
                "{host}: envoy with {cookie}"
            );
            assert!(!headers.iter().any(|(k, _)| k == "set-cookie"));
            // mesh places Envoy's value on the same endpoint.
            let (m, set) = mesh_get(host, Some(&cookie));
            assert_eq!(m, envoy_port, "{host}: mesh with {cookie}");
            assert!(set.is_empty(), "{host}: mesh set {set:?}");
        }
        // mesh generates: the same form, and its own value is sticky.
        let mut used = std::collections::BTreeSet::new();
        for _ in 0..20 {
            let (m, set) = mesh_get(host, None);
            assert_eq!(set.len(), 1, "{host}: mesh {set:?}");
            let (value, form) = split(&set[0], name);
            assert_eq!(form, want_form, "{host}: mesh's form");
            for cookie in [format!("{name}=\"{value}\""), format!("{name}={value}")] {
                assert_eq!(
                    mesh_get(host, Some(&cookie)).0,
                    m,
                    "{host}: mesh with {cookie}"
                );
                let (status, _, p) = client.send(host, "/", &[("cookie", &cookie)]);
                assert_eq!(
                    (status, &p),
                    (200, &m),
                    "{host}: envoy with mesh's {cookie}"
                );
            }
            used.insert(m);
        }
        // Each request without the cookie draws its own value: they spread.
        assert!(
            used.len() > 1,
            "{host}: mesh's generated cookies all on {used:?}"
        );
    }
}

/// `max_requests_per_connection` from istiod's `HttpProtocolOptions`: the same requests open
/// as many upstream connections through Envoy as through mesh.
#[test]
fn max_requests_per_connection_matches_envoy() {
    if envoy_binary().is_none() {
        return;
    }
    use std::sync::atomic::Ordering;
    let up = PortUpstreams::start(1);
    let cluster = json!({"name": "mrpc", "type": "STATIC", "connect_timeout": "1s",
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "common_http_protocol_options": {"max_requests_per_connection": 2, "idle_timeout": "300s"},
            "explicit_http_config": {"http_protocol_options": {}}}},
        "load_assignment": {"cluster_name": "mrpc", "endpoints": [{"lb_endpoints": [{"endpoint": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": up.ports[0]}}}}]}]}});
    let route_config = json!({"name": "mrpc", "virtual_hosts": [{"name": "mrpc", "domains": ["mrpc"],
        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "mrpc"}}]}]});
    let clusters = vec![cluster];
    let (_envoy, port, _, rt, mesh) = envoy_and_mesh("mrpc", &route_config, &clusters);
    const N: usize = 7;
    let mut client = KeepAlive::connect(port);
    for _ in 0..N {
        assert_eq!(client.get("mrpc", "/", &[]).0, 200);
    }
    let envoy = up.accepted.swap(0, Ordering::SeqCst);

    rt.block_on(async {
        for _ in 0..N {
            assert_eq!(mesh.get("http://mrpc/").await.unwrap().status(), 200);
        }
    });
    let mesh_cx = up.accepted.load(Ordering::SeqCst);
    eprintln!("upstream connections for {N} requests: envoy {envoy}, mesh {mesh_cx}");
    assert_eq!(
        envoy,
        N.div_ceil(2),
        "Envoy opens one connection per two requests"
    );
    assert_eq!(mesh_cx, envoy);
}

// ---------- the route's stream idle timeout ----------

/// A raw HTTP/1.1 upstream for stream idle timeouts, one request per connection: `/partial`
/// sends its headers and 3 of its 10 body bytes, `/trickle` its 10 body bytes one per 100 ms,
/// anything else never answers; each then waits (bounded) for the peer to close.
fn idle_upstream() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            std::thread::spawn(move || {
                s.set_read_timeout(Some(Duration::from_secs(10))).ok();
                let mut head = Vec::new();
                let mut chunk = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&chunk[..n]),
                    }
                }
                let path = String::from_utf8_lossy(&head)
                    .split(' ')
                    .nth(1)
                    .unwrap_or("")
                    .to_owned();
                let ok = "HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n";
                if path.starts_with("/partial") {
                    let _ = s.write_all(format!("{ok}abc").as_bytes());
                } else if path.starts_with("/trickle") {
                    let _ = s.write_all(ok.as_bytes());
                    for _ in 0..10 {
                        std::thread::sleep(Duration::from_millis(100));
                        let _ = s.write_all(b"x");
                    }
                }
                // Wait for the peer to close (or the read timeout).
                while matches!(s.read(&mut chunk), Ok(n) if n > 0) {}
            });
        }
    });
    port
}

/// Sends `request` to Envoy on a fresh connection and reads until Envoy closes it: the status
/// and the body bytes that arrived.
fn envoy_raw(port: u16, request: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to envoy");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let out = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, body.to_owned())
}

/// A request body that sends 5 of its 10 bytes and then never more.
struct HalfBody(bool);

impl http_body::Body for HalfBody {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        if self.0 {
            return std::task::Poll::Pending;
        }
        self.0 = true;
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(bytes::Bytes::from_static(
            b"abcde",
        )))))
    }
}

/// Route `idle_timeout`: an upstream that never answers gets 504 `stream timeout` `SI`; one
/// that stalls in its body has the stream reset (Envoy logs `200 SI`); one that keeps sending
/// is never cut; a request body that stalls gets 408 `SI`. Envoy 1.40 and mesh alike.
#[test]
fn stream_idle_timeout_matches_envoy() {
    if envoy_binary().is_none() {
        return;
    }
    let up = idle_upstream();
    let clusters = vec![
        json!({"name": "up", "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": "up", "endpoints": [{"lb_endpoints": [{"endpoint": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": up}}}}]}]}}),
    ];
    let route_config = json!({"name": "idle", "virtual_hosts": [{"name": "idle", "domains": ["*"],
        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "up", "idle_timeout": "1s"}}]}]});
    let port = free_port();
    let log = fresh_access_log("idle");
    let mut boot: Value =
        serde_json::from_str(&lb_bootstrap(port, &route_config, &clusters, &log)).unwrap();
    let hcm = &mut boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
    // As istiod configures the connection manager: only the route's timer runs.
    hcm["stream_idle_timeout"] = json!("0s");
    hcm["access_log"][0]["typed_config"]["log_format"]["text_format_source"]["inline_string"] =
        json!("%RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS%\n");
    let _envoy = EnvoyProcess::start(&boot.to_string());

    let get =
        |path: &str| format!("GET {path} HTTP/1.1\r\nHost: idle\r\nconnection: close\r\n\r\n");
    let half_post = "POST /hold-body HTTP/1.1\r\nHost: idle\r\ncontent-length: 10\r\n\r\nabcde";
    let answers: Vec<(u16, String)> = [
        get("/hold"),
        get("/partial"),
        get("/trickle"),
        half_post.to_owned(),
    ]
    .iter()
    .map(|req| envoy_raw(port, req))
    .collect();
    // Envoy flushes its access log on its own time: read the lines once all are answered.
    let envoy: Vec<(u16, String, String)> = answers
        .into_iter()
        .enumerate()
        .map(|(i, (status, body))| (status, body, envoy_log_line(&log, i)))
        .collect();
    eprintln!("envoy: {envoy:?}");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mesh = mesh_outbound(&rt, &route_config, &clusters);
    let mesh_runs: Vec<(u16, String, String)> = rt.block_on(async {
        use http_body_util::BodyExt;
        let flags = |r: &http::Response<mesh_tower::outbound::OutboundBody>| {
            r.extensions()
                .get::<mesh_core::flags::ResponseFlags>()
                .copied()
                .unwrap_or_default()
                .to_string()
        };
        let mut runs = Vec::new();
        for path in ["/hold", "/partial", "/trickle"] {
            let req = http::Request::get(format!("http://idle{path}"))
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap();
            let resp = tokio::time::timeout(Duration::from_secs(10), mesh.request(req))
                .await
                .expect("mesh answers");
            let (status, mut f) = (resp.status().as_u16(), flags(&resp));
            let mut body = resp.into_body();
            let mut text = String::new();
            // The body frame by frame: what arrived before an idle reset counts.
            while let Some(frame) = tokio::time::timeout(Duration::from_secs(10), body.frame())
                .await
                .expect("the body ends")
            {
                match frame {
                    Ok(fr) => {
                        if let Some(d) = fr.data_ref() {
                            text.push_str(&String::from_utf8_lossy(d));
                        }
                    }
                    Err(e) => {
                        assert!(
                            e.is::<mesh_tower::outbound::StreamIdleTimeout>(),
                            "{path}: {e}"
                        );
                        f = "SI".into();
                        break;
                    }
                }
            }
            runs.push((status, text, f));
        }
        let req = http::Request::post("http://idle/hold-body")
            .header("content-length", "10")
            .body(HalfBody(false))
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(10), mesh.request(req))
            .await
            .expect("mesh answers");
        let (status, f) = (resp.status().as_u16(), flags(&resp));
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        runs.push((status, String::from_utf8_lossy(&body).into_owned(), f));
        runs
    });
    eprintln!("mesh:  {mesh_runs:?}");
    // Envoy's log line is `code flags details`; mesh's flags come from the response (or, after
    // the headers, from the body's idle error).
    let envoy_cmp: Vec<(u16, String, String)> = envoy
        .iter()
        .map(|(s, b, line)| {
            let flags = line.split(' ').nth(1).unwrap_or("").to_owned();
            (*s, b.clone(), flags)
        })
        .collect();
    assert_eq!(envoy_cmp, mesh_runs);
    assert_eq!(
        envoy.iter().map(|e| e.2.as_str()).collect::<Vec<_>>(),
        [
            "504 SI stream_idle_timeout",
            "200 SI stream_idle_timeout",
            "200 - via_upstream",
            "408 SI stream_idle_timeout",
        ]
    );
}

// ---------- auto_host_rewrite ----------

/// `auto_host_rewrite` puts the chosen endpoint's `hostname` in `Host`, and leaves `Host` alone
/// for an endpoint without one (static endpoints here, which mesh serves as EDS): what the
/// upstream sees through Envoy 1.40 and through mesh.
#[test]
fn auto_host_rewrite_matches_envoy() {
    if envoy_binary().is_none() {
        return;
    }
    let up = ScriptedUpstream::start();
    let cluster = |name: &str, hostname: Option<&str>| {
        let mut ep =
            json!({"address": {"socket_address": {"address": "127.0.0.1", "port_value": up.port}}});
        if let Some(h) = hostname {
            ep["hostname"] = json!(h);
        }
        json!({"name": name, "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": ep}]}]}})
    };
    let clusters = vec![
        cluster("named", Some("named.example")),
        cluster("plain", None),
    ];
    let route = |prefix: &str, cluster: &str| json!({"match": {"prefix": prefix}, "route": {"cluster": cluster, "auto_host_rewrite": true}});
    let route_config = json!({"name": "auto", "virtual_hosts": [{"name": "auto", "domains": ["*"],
        "routes": [route("/named", "named"), route("/plain", "plain"),
            {"match": {"prefix": "/off"}, "route": {"cluster": "named", "auto_host_rewrite": false}}]}]});
    let (_envoy, port, _, rt, mesh) = envoy_and_mesh("auto", &route_config, &clusters);
    let paths = ["/named", "/plain", "/off"];
    let envoy: Vec<Vec<Seen>> = paths
        .iter()
        .map(|p| {
            let (status, _) = envoy_forward(port, "orig.example", p, &[]);
            assert_eq!(status, 200, "envoy {p}");
            up.take(1)
        })
        .collect();
    let mesh_runs: Vec<Vec<Seen>> = paths
        .iter()
        .map(|p| {
            let r = rt
                .block_on(mesh.get(format!("http://orig.example{p}")))
                .unwrap();
            assert_eq!(r.status(), 200, "mesh {p}");
            up.take(1)
        })
        .collect();
    let hosts = |runs: &[Vec<Seen>]| {
        runs.iter()
            .map(|v| v.iter().map(|s| s.host.clone()).collect::<Vec<_>>())
            .collect::<Vec<_>>()
    };
    eprintln!("envoy {:?}\nmesh  {:?}", hosts(&envoy), hosts(&mesh_runs));
    assert_eq!(
        hosts(&envoy),
        [["named.example"], ["orig.example"], ["orig.example"]]
    );
    assert_eq!(envoy, mesh_runs);
}

// ---------- %…% header formatters ----------

/// `request_headers_to_add` / `response_headers_to_add` with the formatters users put in
/// VirtualService headers, where the value is deterministic: what the upstream and the client
/// see through Envoy 1.40 and through mesh. Every command mesh accepts is accepted by Envoy, and
/// the ones Envoy refuses are refused by mesh too.
#[test]
fn header_formatters_match_envoy() {
    let Some(bin) = envoy_binary() else {
        return;
    };
    let validate = |headers: Vec<Value>| -> bool {
        let route_config = json!({"name": "v", "virtual_hosts": [{"name": "v", "domains": ["*"],
            "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 200},
                "request_headers_to_add": headers}]}]});
        let dir = std::env::temp_dir().join(format!("mesh-fmt-oracle-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("formatters.json");
        std::fs::write(&file, bootstrap(free_port(), route_config)).unwrap();
        let out = std::process::Command::new(&bin)
            .args(["--mode", "validate", "-c"])
            .arg(&file)
            .output()
            .expect("run envoy --mode validate");
        if !out.status.success() {
            let text = String::from_utf8_lossy(&out.stderr).into_owned()
                + &String::from_utf8_lossy(&out.stdout);
            eprintln!(
                "envoy refused: {}",
                text.lines()
                    .filter(|l| l.contains("critical"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        out.status.success()
    };
    let add = |k: &str, v: &str| json!({"header": {"key": k, "value": v}});
    // Every command mesh knows, with an argument Envoy takes where one is needed.
    let all: Vec<Value> = mesh_core::headers::known_commands()
        .enumerate()
        .map(|(i, (c, with_arg))| {
            let v = match (c, with_arg) {
                (_, false) => format!("%{c}%"),
                ("METADATA", _) => "%METADATA(ROUTE:ns:key)%".into(),
                ("COMMON_DURATION", _) => "%COMMON_DURATION(FS_START:LS_END:ms)%".into(),
                ("CEL", _) => "%CEL(request.path)%".into(),
                (c, _) if c.ends_with("METADATA") => format!("%{c}(ns:key)%"),
                (c, _) => format!("%{c}(x-a)%"),
            };
            assert!(
                mesh_core::headers::HeaderFormat::parse(&v).is_ok(),
                "mesh refuses {v}"
            );
            add(&format!("x-c-{i}"), &v)
        })
        .collect();
    assert!(validate(all), "envoy refuses a command mesh accepts");
    for refused in ["%REQUEST_ID%", "%UPSTREAM_HOST:3%", "%REQ(x-a):x%", "%REQ%"] {
        assert!(
            !validate(vec![add("x-a", refused)]),
            "envoy accepts {refused}"
        );
        assert!(
            mesh_core::headers::HeaderFormat::parse(refused).is_err(),
            "mesh accepts {refused}"
        );
    }

    let up = ScriptedUpstream::start();
    let clusters = vec![
        json!({"name": "up", "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": "up", "endpoints": [{"lb_endpoints": [{"endpoint": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": up.port}}}}]}]}}),
    ];
    let request_headers = vec![
        add("x-f-host", "%HOSTNAME%"),
        add("x-f-cut", "%REQ(x-user):3%"),
        add("x-f-alt", "%REQ(x-missing?x-user)%"),
        add("x-f-stream", "%STREAM_ID%"),
        add("x-f-upstream", "%UPSTREAM_HOST%"),
        add("x-f-up-port", "[%UPSTREAM_REMOTE_PORT%]"),
        add("x-f-code", "%RESPONSE_CODE%"),
        add("x-f-resp", "[%RESP(x-upstream)%]"),
        add("x-f-route", "%ROUTE_NAME%"),
        add("x-f-cluster", "%UPSTREAM_CLUSTER% %PROTOCOL%"),
        add("x-f-year", "%START_TIME(%Y)%"),
        add("x-f-tls", "%UPSTREAM_TLS_VERSION%"),
        add("x-f-env", "%ENVIRONMENT(MESH_ORACLE_UNSET_VARIABLE)%"),
    ];
    let response_headers = vec![
        add("x-r-upstream", "%UPSTREAM_REMOTE_ADDRESS%"),
        add("x-r-up-ip", "%UPSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"),
        add("x-r-resp", "%RESP(x-upstream)%/%RESP(x-none?x-upstream):1%"),
        add("x-r-code", "%RESPONSE_CODE%"),
        add("x-r-user", "%REQ(x-user)%"),
        add("x-r-stream", "%STREAM_ID%"),
    ];
    let route_config = json!({"name": "fmt", "virtual_hosts": [{"name": "fmt", "domains": ["*"],
        "routes": [{"name": "formatted", "match": {"prefix": "/"}, "route": {"cluster": "up"},
            "request_headers_to_add": request_headers,
            "response_headers_to_add": response_headers}]}]});
    let (_envoy, port, _, rt, mesh) = envoy_and_mesh("fmt", &route_config, &clusters);
    let headers = [("x-user", "alice"), ("x-request-id", "rid-1")];
    let envoy = (envoy_forward(port, "fmt", "/a", &headers), up.take(1));

    let mesh_run = rt.block_on(async {
        let mut b = http::Request::get("http://fmt/a");
        for (k, v) in headers {
            b = b.header(k, v);
        }
        let resp = mesh
            .request(
                b.body(http_body_util::Empty::<bytes::Bytes>::new())
                    .unwrap(),
            )
            .await;
        (resp.status().as_u16(), x_headers(resp.headers()))
    });
    let mesh_run = (mesh_run, up.take(1));
    eprintln!("envoy {envoy:?}\nmesh  {mesh_run:?}");
    assert_eq!(envoy, mesh_run);
    // The values were really there (not all empty on both sides).
    let seen = &envoy.1[0].headers;
    let get = |k: &str| seen.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    assert_eq!(get("x-f-cut"), Some("ali"));
    assert_eq!(get("x-f-code"), Some("0"));
    assert_eq!(get("x-f-upstream"), None);
    let answer = &envoy.0.1;
    let up_addr = format!("127.0.0.1:{}", up.port);
    assert!(
        answer.contains(&("x-r-upstream".to_owned(), up_addr)),
        "{answer:?}"
    );
}

/// `runtime_fraction` (Istio does not emit it, but hand-written routes and EnvoyFilters do):
/// two back-to-back 50 % routes and a 30 % one ahead of a catch-all, without any runtime
/// layer (the `default_value` applies). The shares each route gets through Envoy and through
/// mesh must agree (chi-square at p = 0.001) — which also tells whether Envoy draws one
/// random value per request for all routes or one per route.
#[test]
fn runtime_fractions_match_envoy() {
    if envoy_binary().is_none() {
        return;
    }
    let frac = |name: &str, n: u32| {
        json!({"name": name, "match": {"prefix": "/", "runtime_fraction": {
            "default_value": {"numerator": n, "denominator": "HUNDRED"},
            "runtime_key": format!("routing.{name}")}},
            "direct_response": {"status": 200},
            "response_headers_to_add": [{"header": {"key": "x-route", "value": name}}]})
    };
    let rest = |name: &str| {
        json!({"name": name, "match": {"prefix": "/"}, "direct_response": {"status": 200},
            "response_headers_to_add": [{"header": {"key": "x-route", "value": name}}]})
    };
    let config = json!({"name": "rf", "virtual_hosts": [
        {"name": "two", "domains": ["two"], "routes": [frac("a50", 50), frac("b50", 50), rest("two_rest")]},
        {"name": "one", "domains": ["one"], "routes": [frac("c30", 30), rest("one_rest")]},
    ]});
    let rc_pb: pb::RouteConfiguration = mesh_xds::translate::from_any(&any_via_dump(
        "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
        "RoutesConfigDump",
        "dynamic_route_configs",
        "route_config",
        &config,
    ))
    .expect("route proto");
    let rc = mesh_xds::translate::translate_route(&rc_pb).expect("mesh accepts the routes");
    let port = free_port();
    let _envoy = EnvoyProcess::start(&bootstrap(port, config));
    const N: usize = 600;
    let mut disagreements = Vec::new();
    for (host, routes) in [
        ("two", &["a50", "b50", "two_rest"][..]),
        ("one", &["c30", "one_rest"][..]),
    ] {
        let req = Req {
            host: host.into(),
            method: "GET",
            path: "/x".into(),
            headers: vec![],
        };
        let count = |ask: &dyn Fn() -> Option<String>| {
            let mut v = vec![0usize; routes.len()];
            for _ in 0..N {
                let name = ask().expect("a route");
                v[routes.iter().position(|r| *r == name).expect("known route")] += 1;
            }
            v
        };
        let envoy = count(&|| ask_envoy(port, &req));
        let mesh = count(&|| ask_mesh(&rc, &req));
        let (stat, df) = chi_square(&envoy, &mesh);
        eprintln!("{host}: envoy {envoy:?} mesh {mesh:?} chi2 {stat:.1} df {df}");
        if stat > CHI2_999[df.min(8)] {
            disagreements.push(format!(
                "{host}: envoy {envoy:?} mesh {mesh:?} chi2 {stat:.1}"
            ));
        }
    }
    assert!(disagreements.is_empty(), "{}", disagreements.join("\n"));
}

/// Envoy's route table and its `weighted_clusters` pick read the same random value of a
/// request: behind a 50 % `runtime_fraction`, a 50/50 split sends everything to its first
/// cluster. mesh must split alike (through the outbound path, to real upstreams).
#[test]
fn runtime_fraction_and_weighted_split_share_one_draw_as_in_envoy() {
    if envoy_binary().is_none() {
        return;
    }
    let up = PortUpstreams::start(3);
    let cluster = |i: usize| {
        let name = format!("p{i}");
        json!({"name": name, "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": up.ports[i]}}}}]}]}})
    };
    let clusters: Vec<Value> = (0..3).map(cluster).collect();
    let route_config = json!({"name": "corr", "virtual_hosts": [{"name": "corr", "domains": ["corr"], "routes": [
        {"match": {"prefix": "/", "runtime_fraction": {"default_value": {"numerator": 50, "denominator": "HUNDRED"},
            "runtime_key": "routing.corr"}},
         "route": {"weighted_clusters": {"clusters": [{"name": "p0", "weight": 50}, {"name": "p1", "weight": 50}]}}},
        {"match": {"prefix": "/"}, "route": {"cluster": "p2"}},
    ]}]});
    let (_envoy, port, _, rt, mesh) = envoy_and_mesh("corr", &route_config, &clusters);
    const N: usize = 400;
    let slot = |body: &str| {
        let p: u16 = body.parse().unwrap_or_else(|_| panic!("body {body:?}"));
        up.ports.iter().position(|x| *x == p).expect("one of ours")
    };
    let mut client = KeepAlive::connect(port);
    let mut envoy = vec![0usize; 3];
    for _ in 0..N {
        let (status, body) = client.get("corr", "/", &[]);
        assert_eq!(status, 200, "envoy {body}");
        envoy[slot(&body)] += 1;
    }
    let mesh_counts = rt.block_on(async {
        let mut v = vec![0usize; 3];
        for _ in 0..N {
            let r = mesh.get("http://corr/".to_owned()).await.unwrap();
            assert_eq!(r.status(), 200, "mesh {:?}", r.body());
            v[slot(&String::from_utf8_lossy(r.body()))] += 1;
        }
        v
    });
    eprintln!("envoy {envoy:?} mesh {mesh_counts:?}");
    // Envoy: the second cluster of the split is never chosen; mesh the same.
    assert_eq!(envoy[1], 0, "envoy {envoy:?}");
    assert_eq!(mesh_counts[1], 0, "mesh {mesh_counts:?}");
    let (stat, df) = chi_square(&envoy, &mesh_counts);
    assert!(
        stat <= CHI2_999[df.min(8)],
        "envoy {envoy:?} mesh {mesh_counts:?} chi2 {stat:.1}"
    );
}
