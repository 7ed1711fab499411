//! One description of a route table and the requests that probe it, shared by
//! tests/routing_oracle.rs (Envoy with static config vs mesh-core's matcher) and
//! tests/ads_differential.rs (Envoy vs mesh's whole outbound stack over ADS), plus the
//! chi-square test both use for distributions. The table is rendered to Envoy's JSON and to
//! the proto mesh-xds translates; every route answers with its name in `x-route`.

#![allow(dead_code)]

use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::config::route::v3 as pb;
use envoy_types::pb::envoy::r#type::matcher::v3::{RegexMatcher, StringMatcher, string_matcher};
use envoy_types::pb::google::protobuf::BoolValue;
use serde_json::{Value, json};

// ---------- one description, rendered both ways ----------

/// A route's path matcher: `prefix`, `path`, `safe_regex`, `path_separated_prefix`.
#[derive(Clone, Copy)]
pub enum PathM {
    Prefix(&'static str),
    Exact(&'static str),
    Regex(&'static str),
    Sep(&'static str),
}

/// A header or query value matcher.
#[derive(Clone, Copy)]
pub enum Val {
    Exact(&'static str),
    Prefix(&'static str),
    Suffix(&'static str),
    Contains(&'static str),
    Regex(&'static str),
    Present(bool),
    Range(i64, i64),
}

/// A header matcher with its modifiers.
#[derive(Clone, Copy)]
pub struct Hm {
    pub name: &'static str,
    pub val: Val,
    pub invert: bool,
    pub ignore_case: bool,
    pub missing_empty: bool,
}

/// A plain header matcher on `name`.
pub fn h(name: &'static str, val: Val) -> Hm {
    Hm {
        name,
        val,
        invert: false,
        ignore_case: false,
        missing_empty: false,
    }
}

/// One route: its name (sent back in `x-route`) and match.
#[derive(Clone)]
pub struct R {
    pub name: &'static str,
    pub path: PathM,
    pub case_sensitive: Option<bool>,
    pub headers: Vec<Hm>,
    /// (name, value matcher; `None` = present)
    pub query: Vec<(&'static str, Option<Val>)>,
    pub grpc: bool,
}

/// A route matching `path` only.
pub fn r(name: &'static str, path: PathM) -> R {
    R {
        name,
        path,
        case_sensitive: None,
        headers: vec![],
        query: vec![],
        grpc: false,
    }
}

/// A virtual host.
pub struct Vh {
    pub name: &'static str,
    pub domains: Vec<&'static str>,
    pub routes: Vec<R>,
}

/// A `StringMatcher` as Envoy's JSON.
pub fn string_json(v: Val, ignore_case: bool) -> Value {
    let mut m = match v {
        Val::Exact(s) => json!({"exact": s}),
        Val::Prefix(s) => json!({"prefix": s}),
        Val::Suffix(s) => json!({"suffix": s}),
        Val::Contains(s) => json!({"contains": s}),
        Val::Regex(s) => json!({"safe_regex": {"regex": s}}),
        Val::Present(_) | Val::Range(..) => unreachable!("not a string matcher"),
    };
    if ignore_case {
        m["ignore_case"] = json!(true);
    }
    m
}

/// A `StringMatcher` as the proto.
pub fn string_pb(v: Val, ignore_case: bool) -> StringMatcher {
    use string_matcher::MatchPattern as P;
    let p = match v {
        Val::Exact(s) => P::Exact(s.into()),
        Val::Prefix(s) => P::Prefix(s.into()),
        Val::Suffix(s) => P::Suffix(s.into()),
        Val::Contains(s) => P::Contains(s.into()),
        Val::Regex(s) => P::SafeRegex(RegexMatcher {
            regex: s.into(),
            ..Default::default()
        }),
        Val::Present(_) | Val::Range(..) => unreachable!("not a string matcher"),
    };
    StringMatcher {
        match_pattern: Some(p),
        ignore_case,
    }
}

/// A route as Envoy's JSON: a `direct_response` 200 with `x-route` in the response.
pub fn route_json(r: &R) -> Value {
    let mut m = match r.path {
        PathM::Prefix(p) => json!({"prefix": p}),
        PathM::Exact(p) => json!({"path": p}),
        PathM::Regex(p) => json!({"safe_regex": {"regex": p}}),
        PathM::Sep(p) => json!({"path_separated_prefix": p}),
    };
    if let Some(cs) = r.case_sensitive {
        m["case_sensitive"] = json!(cs);
    }
    if !r.headers.is_empty() {
        let hs: Vec<Value> = r
            .headers
            .iter()
            .map(|hm| {
                let mut o = json!({"name": hm.name});
                match hm.val {
                    Val::Present(p) => o["present_match"] = json!(p),
                    Val::Range(s, e) => o["range_match"] = json!({"start": s, "end": e}),
                    v => o["string_match"] = string_json(v, hm.ignore_case),
                }
                if hm.invert {
                    o["invert_match"] = json!(true);
                }
                if hm.missing_empty {
                    o["treat_missing_header_as_empty"] = json!(true);
                }
                o
            })
            .collect();
        m["headers"] = json!(hs);
    }
    if !r.query.is_empty() {
        let qs: Vec<Value> = r
            .query
            .iter()
            .map(|(n, v)| match v {
                Some(v) => json!({"name": n, "string_match": string_json(*v, false)}),
                None => json!({"name": n, "present_match": true}),
            })
            .collect();
        m["query_parameters"] = json!(qs);
    }
    if r.grpc {
        m["grpc"] = json!({});
    }
    json!({
        "name": r.name,
        "match": m,
        "direct_response": {"status": 200},
        "response_headers_to_add": [{"header": {"key": "x-route", "value": r.name}}],
    })
}

/// The same route as the proto.
pub fn route_pb(r: &R) -> pb::Route {
    use pb::route_match::PathSpecifier as Ps;
    let path = match r.path {
        PathM::Prefix(p) => Ps::Prefix(p.into()),
        PathM::Exact(p) => Ps::Path(p.into()),
        PathM::Regex(p) => Ps::SafeRegex(RegexMatcher {
            regex: p.into(),
            ..Default::default()
        }),
        PathM::Sep(p) => Ps::PathSeparatedPrefix(p.into()),
    };
    let headers = r
        .headers
        .iter()
        .map(|hm| {
            use pb::header_matcher::HeaderMatchSpecifier as S;
            let spec = match hm.val {
                Val::Present(p) => S::PresentMatch(p),
                Val::Range(start, end) => {
                    S::RangeMatch(envoy_types::pb::envoy::r#type::v3::Int64Range { start, end })
                }
                v => S::StringMatch(string_pb(v, hm.ignore_case)),
            };
            pb::HeaderMatcher {
                name: hm.name.into(),
                header_match_specifier: Some(spec),
                invert_match: hm.invert,
                treat_missing_header_as_empty: hm.missing_empty,
            }
        })
        .collect();
    let query_parameters = r
        .query
        .iter()
        .map(|(n, v)| {
            use pb::query_parameter_matcher::QueryParameterMatchSpecifier as S;
            pb::QueryParameterMatcher {
                name: (*n).into(),
                query_parameter_match_specifier: Some(match v {
                    Some(v) => S::StringMatch(string_pb(*v, false)),
                    None => S::PresentMatch(true),
                }),
            }
        })
        .collect();
    pb::Route {
        name: r.name.into(),
        r#match: Some(pb::RouteMatch {
            path_specifier: Some(path),
            case_sensitive: r.case_sensitive.map(|value| BoolValue { value }),
            headers,
            query_parameters,
            grpc: r.grpc.then(pb::route_match::GrpcRouteMatchOptions::default),
            ..Default::default()
        }),
        action: Some(pb::route::Action::DirectResponse(
            pb::DirectResponseAction {
                status: 200,
                ..Default::default()
            },
        )),
        response_headers_to_add: vec![HeaderValueOption {
            header: Some(HeaderValue {
                key: "x-route".into(),
                value: r.name.into(),
                ..Default::default()
            }),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The route configuration `oracle` as Envoy's JSON.
pub fn config_json(vhs: &[Vh]) -> Value {
    json!({
        "name": "oracle",
        "virtual_hosts": vhs.iter().map(|v| json!({
            "name": v.name,
            "domains": v.domains,
            "routes": v.routes.iter().map(route_json).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

/// The same route configuration as the proto.
pub fn config_pb(vhs: &[Vh]) -> pb::RouteConfiguration {
    pb::RouteConfiguration {
        name: "oracle".into(),
        virtual_hosts: vhs
            .iter()
            .map(|v| pb::VirtualHost {
                name: v.name.into(),
                domains: v.domains.iter().map(|d| (*d).into()).collect(),
                routes: v.routes.iter().map(route_pb).collect(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

// ---------- requests ----------

/// One request of the table.
#[derive(Clone, Debug)]
pub struct Req {
    pub host: String,
    pub method: &'static str,
    pub path: String,
    pub headers: Vec<(&'static str, &'static str)>,
}

/// The route table: every path, header, query and gRPC matcher, and domain precedence.
pub fn vhosts() -> Vec<Vh> {
    let hdr = |name, hm: Hm| {
        let mut x = r(name, PathM::Prefix("/h/"));
        x.headers.push(hm);
        x
    };
    let header_routes = vec![
        hdr("h_exact", h("x-a", Val::Exact("one"))),
        hdr(
            "h_exact_ic",
            Hm {
                ignore_case: true,
                ..h("x-b", Val::Exact("MiXed"))
            },
        ),
        hdr("h_prefix", h("x-c", Val::Prefix("pre"))),
        hdr(
            "h_suffix_ic",
            Hm {
                ignore_case: true,
                ..h("x-d", Val::Suffix("Fix"))
            },
        ),
        hdr("h_contains", h("x-e", Val::Contains("mid"))),
        hdr("h_regex", h("x-f", Val::Regex("v[0-9]+"))),
        hdr("h_present", h("x-g", Val::Present(true))),
        hdr("h_range", h("x-n", Val::Range(-5, 10))),
        hdr(
            "h_invert",
            Hm {
                invert: true,
                ..h("x-i", Val::Exact("no"))
            },
        ),
        hdr("h_absent", h("x-absent", Val::Present(false))),
        hdr("h_method", h(":method", Val::Exact("POST"))),
        hdr(
            "h_authority",
            h(":authority", Val::Exact("Api.Example.com")),
        ),
        hdr(
            "h_empty",
            Hm {
                missing_empty: true,
                ..h("x-m", Val::Exact(""))
            },
        ),
        hdr("h_path", h(":path", Val::Contains("debug=1"))),
    ];
    let mut multi = r("h_multi", PathM::Prefix("/multi"));
    multi.headers = vec![h("x-a", Val::Exact("1")), h("x-b", Val::Prefix("2"))];
    let mut q1 = r("q_exact", PathM::Prefix("/q"));
    q1.query.push(("k", Some(Val::Exact("v"))));
    let mut q2 = r("q_present", PathM::Prefix("/q"));
    q2.query.push(("flag", None));
    let mut q3 = r("q_encoded", PathM::Prefix("/q"));
    q3.query.push(("a%20b", Some(Val::Prefix("x%2F"))));
    let mut g = r("grpc", PathM::Prefix("/pkg.Svc/"));
    g.grpc = true;
    let mut ci = r("prefix_ci", PathM::Prefix("/CI/"));
    ci.case_sensitive = Some(false);
    let mut exact_ci = r("exact_ci", PathM::Exact("/Exact"));
    exact_ci.case_sensitive = Some(false);
    let mut regex_ci = r("regex_ci_ignored", PathM::Regex("/RX/[a-z]+"));
    regex_ci.case_sensitive = Some(false);
    let mut paths = vec![
        r("exact", PathM::Exact("/exact")),
        exact_ci,
        r("sep", PathM::Sep("/api/v1")),
        r("regex", PathM::Regex("/items/[0-9]+")),
        regex_ci,
        ci,
        g,
        q1,
        q2,
        q3,
        multi,
    ];
    paths.extend(header_routes);
    paths.push(r("api_prefix", PathM::Prefix("/api")));
    paths.push(r("catch_all", PathM::Prefix("/")));
    vec![
        Vh {
            name: "main",
            domains: vec!["api.example.com", "api.example.com:8080", "10.0.0.1"],
            routes: paths,
        },
        Vh {
            name: "suffix_long",
            domains: vec!["*.foo.example.com"],
            routes: vec![r("suffix_long", PathM::Prefix("/"))],
        },
        Vh {
            name: "suffix_short",
            domains: vec!["*.example.com", "*-bar.example.org"],
            routes: vec![r("suffix_short", PathM::Prefix("/"))],
        },
        Vh {
            name: "prefix",
            domains: vec!["api.*", "svc*"],
            routes: vec![r("prefix_host", PathM::Prefix("/"))],
        },
        Vh {
            name: "only_some",
            domains: vec!["narrow.test"],
            routes: vec![r("narrow", PathM::Exact("/only"))],
        },
        Vh {
            name: "any",
            domains: vec!["*"],
            routes: vec![r("any", PathM::Prefix("/any"))],
        },
    ]
}

/// The request table (over 300): hosts, paths, methods and headers, near-misses included.
pub fn requests() -> Vec<Req> {
    let mut out = Vec::new();
    let hosts = [
        "api.example.com",
        "API.Example.com",
        "api.example.com:8080",
        "api.example.com:9090",
        "10.0.0.1",
        "a.foo.example.com",
        "foo.example.com",
        ".foo.example.com",
        "x.example.com",
        "x-bar.example.org",
        "-bar.example.org",
        // A suffix wildcard beats a prefix wildcard that also matches.
        "svc-bar.example.org",
        "api.foo.example.com",
        "api.other",
        "api.",
        "svc1",
        "svc",
        "narrow.test",
        "narrow.test:80",
        "unknown.host",
    ];
    for host in hosts {
        for path in ["/", "/any/x", "/only", "/exact", "/api/v1"] {
            out.push(Req {
                host: host.into(),
                method: "GET",
                path: path.into(),
                headers: vec![],
            });
        }
    }
    let paths = [
        "/exact",
        "/exact/",
        "/exact?x=1",
        "/EXACT",
        "/Exact",
        "/api/v1",
        "/api/v1/",
        "/api/v1/users",
        "/api/v1x",
        "/api/V1",
        "/api/v1?x=1",
        "/items/42",
        "/items/42/",
        "/items/x",
        "/items/42?q=1",
        "/RX/abc",
        "/rx/abc",
        "/RX/ABC",
        "/CI/x",
        "/ci/x",
        "/Ci/",
        "/CI",
        "/pkg.Svc/Method",
        "/q?k=v",
        "/q?k=w&k=v",
        "/q?k=v&k=w",
        "/q?flag",
        "/q?flag=",
        "/q?x=flag",
        "/q?a%20b=x%2Fy",
        "/q?K=v",
        "/q",
        "/h/",
        "/multi",
        "/apix",
        "/other",
    ];
    for path in paths {
        out.push(Req {
            host: "api.example.com".into(),
            method: "GET",
            path: path.into(),
            headers: vec![],
        });
    }
    for ct in [
        "application/grpc",
        "application/grpc+proto",
        "application/grpc-web",
        "application/grpc;charset=x",
        "text/plain",
    ] {
        out.push(Req {
            host: "api.example.com".into(),
            method: "POST",
            path: "/pkg.Svc/Method".into(),
            headers: vec![("content-type", ct)],
        });
    }
    let header_sets: Vec<Vec<(&'static str, &'static str)>> = vec![
        vec![("x-a", "one")],
        vec![("x-a", "One")],
        vec![("x-a", "one"), ("x-a", "two")],
        vec![("x-a", "two"), ("x-a", "one")],
        vec![("x-a", "one,two")],
        vec![("x-b", "mixed")],
        vec![("x-b", "MIXED")],
        vec![("x-b", "mixe")],
        vec![("x-c", "prefix")],
        vec![("x-c", "pr")],
        vec![("x-c", "Prefix")],
        vec![("x-d", "suffix")],
        vec![("x-d", "SUFFIX")],
        vec![("x-d", "fi")],
        vec![("x-e", "amidst")],
        vec![("x-e", "MID")],
        vec![("x-f", "v12")],
        vec![("x-f", "v12x")],
        vec![("x-f", "xv1")],
        vec![("x-f", "a"), ("x-f", "v3")],
        vec![("x-g", "")],
        vec![("x-g", "1")],
        vec![("x-n", "5")],
        vec![("x-n", "-5")],
        vec![("x-n", "10")],
        vec![("x-n", "9")],
        vec![("x-n", "+3")],
        vec![("x-n", "3x")],
        vec![("x-n", "0x3")],
        vec![("x-n", "")],
        vec![("x-n", "99999999999999999999")],
        vec![("x-n", "20"), ("x-n", "3")],
        vec![("x-i", "no")],
        vec![("x-i", "yes")],
        vec![("x-i", "no"), ("x-i", "yes")],
        vec![("x-i", "yes"), ("x-i", "yes")],
        vec![("x-absent", "here")],
        vec![("x-absent", "")],
        vec![("x-m", "")],
        vec![("x-m", "something")],
        vec![("x-absent", "1"), ("x-m", "x")],
    ];
    for hs in &header_sets {
        for path in ["/h/", "/h/x", "/h/?debug=1", "/h/x?k=v&debug=1"] {
            out.push(Req {
                host: "api.example.com".into(),
                method: "GET",
                path: path.into(),
                headers: hs.clone(),
            });
        }
    }
    for (host, method) in [
        ("api.example.com", "POST"),
        ("Api.Example.com", "GET"),
        ("api.example.com:8080", "PUT"),
    ] {
        for path in ["/h/", "/h/?debug=1"] {
            out.push(Req {
                host: host.into(),
                method,
                path: path.into(),
                headers: vec![("x-absent", "1")],
            });
        }
    }
    for hs in [
        vec![("x-a", "1"), ("x-b", "2x")],
        vec![("x-a", "1")],
        vec![("x-b", "2")],
        vec![("x-a", "1"), ("x-a", "0"), ("x-b", "x"), ("x-b", "23")],
        vec![("x-a", "1,2"), ("x-b", "2")],
    ] {
        out.push(Req {
            host: "api.example.com".into(),
            method: "GET",
            path: "/multi".into(),
            headers: hs,
        });
    }
    out
}

/// Two-sample chi-square statistic over per-endpoint counts (endpoints nobody chose left out)
/// and its degrees of freedom.
pub fn chi_square(a: &[usize], b: &[usize]) -> (f64, usize) {
    let (na, nb) = (
        a.iter().sum::<usize>() as f64,
        b.iter().sum::<usize>() as f64,
    );
    let mut stat = 0.0;
    let mut cells = 0;
    for (x, y) in a.iter().zip(b) {
        let total = (x + y) as f64;
        if total == 0.0 {
            continue;
        }
        cells += 1;
        let ea = total * na / (na + nb);
        let eb = total * nb / (na + nb);
        stat += (*x as f64 - ea).powi(2) / ea + (*y as f64 - eb).powi(2) / eb;
    }
    (stat, cells.max(1) - 1)
}

/// Chi-square critical values at p = 0.001 for 0..=8 degrees of freedom.
pub const CHI2_999: [f64; 9] = [0.0, 10.83, 13.82, 16.27, 18.47, 20.52, 22.46, 24.32, 26.12];

/// Goodness-of-fit chi-square statistic of per-choice `counts` against the configured
/// `weights` (same order; choices of weight 0 must get no count and are left out), and its
/// degrees of freedom.
pub fn chi_square_fit(counts: &[usize], weights: &[u32]) -> (f64, usize) {
    let n = counts.iter().sum::<usize>() as f64;
    let total = weights.iter().map(|w| f64::from(*w)).sum::<f64>();
    let mut stat = 0.0;
    let mut cells = 0;
    for (c, w) in counts.iter().zip(weights) {
        if *w == 0 {
            if *c > 0 {
                return (f64::INFINITY, 0);
            }
            continue;
        }
        cells += 1;
        let e = n * f64::from(*w) / total;
        stat += (*c as f64 - e).powi(2) / e;
    }
    (stat, cells.max(1) - 1)
}

/// The `Any` of one resource from its JSON form, through a config dump section (as a dump
/// would carry it).
pub fn any_via_dump(
    type_url: &str,
    section: &str,
    list: &str,
    entry: &str,
    value: &Value,
) -> envoy_types::pb::google::protobuf::Any {
    let mut typed = value.clone();
    typed["@type"] = json!(type_url);
    let dump = mesh_xds::dump::ConfigDump::from_value(json!({"configs": [{
        "@type": format!("type.googleapis.com/envoy.admin.v3.{section}"),
        list: [{entry: typed}],
    }]}))
    .expect("dump");
    dump.of_type(type_url)
        .next()
        .expect("resource in dump")
        .resource
        .clone()
}
