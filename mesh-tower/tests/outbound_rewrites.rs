//! Forwarding-time rewrites and header mutations on the outbound path (prefix/regex path
//! rewrite, host_rewrite_literal, request/response headers with append actions and `%…%`
//! formatters), against a real hyper upstream on 127.0.0.1.

use crate::support_outbound;

use std::sync::Arc;

use http::HeaderName;
use mesh_core::cluster::Cluster;
use mesh_core::endpoint::Endpoint;
use mesh_core::headers::{
    AppendAction, HeaderFormat, HeaderMutationLevel, HeaderMutations, HeaderToAdd,
};
use mesh_core::route::{
    Forwarding, HostRewrite, PathMatch, PathRewrite, Route, RouteAction, RouteMatch, VirtualHost,
};
use mesh_core::snapshot::OutboundTrafficPolicy;
use mesh_core::{CertStore, SnapshotCell};
use mesh_tower::outbound::Outbound;
use support_outbound::*;

const C: &str = "outbound|9080||svc.default.svc.cluster.local";

fn add(name: &'static str, v: &str, action: AppendAction) -> HeaderToAdd {
    HeaderToAdd {
        name: HeaderName::from_static(name),
        value: HeaderFormat::parse(v).unwrap(),
        action,
        keep_empty_value: false,
    }
}

fn outbound(routes: Vec<Route>, up: &Scripted) -> Outbound {
    let vh = VirtualHost {
        name: "svc:9080".into(),
        domains: vec!["svc".into(), "svc:9080".into()],
        routes,
    };
    let cell = SnapshotCell::new();
    cell.publish(
        snapshot(
            1,
            9080,
            vec![vh],
            vec![(Cluster::eds(C), vec![Endpoint::new(up.addr)])],
            OutboundTrafficPolicy::RegistryOnly,
        ),
        true,
    );
    Outbound::new(cell, CertStore::new(), node())
}

#[tokio::test]
async fn prefix_and_regex_rewrites_change_the_path_and_keep_the_query() {
    bounded(async {
        let up = scripted("u", &[]).await;
        let mut prefix = Route::new(
            "prefix",
            RouteMatch::path(PathMatch::Prefix("/v1/".into())),
            RouteAction::Cluster(C.into()),
        );
        prefix.forwarding = Some(Arc::new(Forwarding {
            path_rewrite: Some(PathRewrite::Prefix("/api/v2/".into())),
            host_rewrite: Some(HostRewrite::Literal("backend.example".into())),
            ..Forwarding::default()
        }));
        let mut regex = Route::new(
            "regex",
            RouteMatch::path(PathMatch::Prefix("/users/".into())),
            RouteAction::Cluster(C.into()),
        );
        regex.forwarding = Some(Arc::new(Forwarding {
            path_rewrite: Some(PathRewrite::Regex(
                regex::Regex::new("^/users/([0-9]+)/profile$").unwrap(),
                "/profiles/${1}".into(),
            )),
            ..Forwarding::default()
        }));
        let out = outbound(vec![prefix, regex], &up);
        assert_eq!(
            out.get("http://svc:9080/v1/items?x=1")
                .await
                .unwrap()
                .status(),
            200
        );
        assert_eq!(
            out.get("http://svc:9080/users/42/profile?y=2")
                .await
                .unwrap()
                .status(),
            200
        );
        let seen = up.seen();
        assert_eq!(seen[0].uri, "/api/v2/items?x=1");
        assert_eq!(seen[0].headers["host"], "backend.example");
        assert_eq!(seen[1].uri, "/profiles/42?y=2");
        assert_eq!(seen[1].headers["host"], "svc:9080");
    })
    .await;
}

#[tokio::test]
async fn header_mutations_apply_per_level_with_append_actions() {
    bounded(async {
        let up = scripted("u", &[]).await;
        let mut r = Route::new("r", RouteMatch::any(), RouteAction::Cluster(C.into()));
        r.forwarding = Some(Arc::new(Forwarding {
            request_headers: HeaderMutations {
                levels: vec![
                    HeaderMutationLevel {
                        remove: vec![HeaderName::from_static("x-secret")],
                        add: vec![
                            add(
                                "x-user-copy",
                                "%REQ(x-user)%",
                                AppendAction::AppendIfExistsOrAdd,
                            ),
                            add("x-mode", "route", AppendAction::OverwriteIfExistsOrAdd),
                            add("x-keep", "route", AppendAction::AddIfAbsent),
                        ],
                    },
                    HeaderMutationLevel {
                        remove: vec![],
                        add: vec![add(
                            "x-mode",
                            "global",
                            AppendAction::OverwriteIfExistsOrAdd,
                        )],
                    },
                ],
            },
            response_headers: HeaderMutations {
                levels: vec![HeaderMutationLevel {
                    remove: vec![HeaderName::from_static("x-server")],
                    add: vec![add(
                        "x-route",
                        "%UPSTREAM_CLUSTER% for %REQ(x-user)% 100%%",
                        AppendAction::AppendIfExistsOrAdd,
                    )],
                }],
            },
            ..Forwarding::default()
        }));
        let out = outbound(vec![r], &up);
        let req = http::Request::get("http://svc:9080/")
            .header("x-user", "alice")
            .header("x-secret", "s3cret")
            .header("x-keep", "app")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let resp = out.request(req).await;
        assert_eq!(resp.status(), 200);
        assert!(resp.headers().get("x-server").is_none());
        assert_eq!(resp.headers()["x-route"], format!("{C} for alice 100%"));
        let h = &up.seen()[0].headers;
        assert!(h.get("x-secret").is_none());
        assert_eq!(h["x-user-copy"], "alice");
        assert_eq!(h["x-mode"], "global");
        assert_eq!(h.get_all("x-keep").iter().count(), 1);
        assert_eq!(h["x-keep"], "app");
    })
    .await;
}

#[tokio::test]
async fn fault_injection_aborts_and_delays_before_the_upstream() {
    use mesh_core::fault::{Fault, FaultAbort, FaultAbortKind, FaultDelay, FaultDelayKind};
    use mesh_core::flags::ResponseFlag;
    use mesh_core::route::Fraction;
    bounded(async {
        let up = scripted("u", &[]).await;
        let all = Fraction {
            numerator: 100,
            denominator: 100,
        };
        let mut fixed = Route::new(
            "fixed",
            RouteMatch::path(PathMatch::Prefix("/abort".into())),
            RouteAction::Cluster(C.into()),
        );
        fixed.fault = Some(Arc::new(Fault {
            abort: Some(FaultAbort {
                kind: FaultAbortKind::Http(418),
                percentage: all,
                body: None,
            }),
            ..Fault::default()
        }));
        let mut grpc = Route::new(
            "grpc",
            RouteMatch::path(PathMatch::Prefix("/grpc".into())),
            RouteAction::Cluster(C.into()),
        );
        grpc.fault = Some(Arc::new(Fault {
            abort: Some(FaultAbort {
                kind: FaultAbortKind::Grpc(14),
                percentage: all,
                body: None,
            }),
            ..Fault::default()
        }));
        let mut header = Route::new("header", RouteMatch::any(), RouteAction::Cluster(C.into()));
        header.fault = Some(Arc::new(Fault {
            delay: Some(FaultDelay {
                kind: FaultDelayKind::Header,
                percentage: all,
            }),
            abort: Some(FaultAbort {
                kind: FaultAbortKind::Header,
                percentage: all,
                body: None,
            }),
            ..Fault::default()
        }));
        let out = outbound(vec![fixed, grpc, header], &up);
        let r = out.get("http://svc:9080/abort").await.unwrap();
        assert_eq!(r.status(), 418);
        assert_eq!(r.body(), "fault filter abort");
        assert_eq!(
            r.extensions().get::<ResponseFlag>(),
            Some(&ResponseFlag::FaultInjected)
        );
        // A gRPC request gets the gRPC status; any other request a 200 with the text, as
        // Envoy 1.40 answers (tests/fault_oracle.rs in the root crate).
        let r = out
            .request(
                http::Request::get("http://svc:9080/grpc")
                    .header("content-type", "application/grpc")
                    .body(http_body_util::Empty::<bytes::Bytes>::new())
                    .unwrap(),
            )
            .await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["grpc-status"], "14");
        assert_eq!(r.headers()["content-type"], "application/grpc");
        let r = out.get("http://svc:9080/grpc").await.unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.headers().get("grpc-status").is_none());
        assert_eq!(r.body(), "fault filter abort");
        assert!(up.seen().is_empty());
        // Header-controlled: no headers, no fault.
        let r = out.get("http://svc:9080/x").await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.extensions().get::<ResponseFlag>(),
            Some(&ResponseFlag::None)
        );
        let req = |h: &'static str, v: &'static str| {
            http::Request::get("http://svc:9080/x")
                .header(h, v)
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap()
        };
        let r = out.request(req("x-envoy-fault-abort-request", "503")).await;
        assert_eq!(r.status(), 503);
        let r = out.request(req("x-envoy-fault-delay-request", "20")).await;
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.extensions().get::<ResponseFlag>(),
            Some(&ResponseFlag::DelayInjected)
        );
        assert_eq!(up.seen().len(), 2);
    })
    .await;
}
