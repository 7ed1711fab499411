//! What the upstream sees of the request id and trace context the application sent through
//! [`Outbound`], as Envoy's outbound HTTP connection manager leaves them: `x-request-id`
//! generated when absent and kept when present (the same on every retry), a valid
//! `traceparent` / B3 context stepped to a child span, an invalid one left alone, no trace
//! started without an exporter.

use crate::support_outbound;

use std::net::SocketAddr;

use bytes::Bytes;
use http::Request;
use http_body_util::Empty;
use mesh_core::cluster::Cluster;
use mesh_core::endpoint::Endpoint;
use mesh_core::retry::RetryPolicy;
use mesh_core::route::{Route, RouteAction, RouteMatch, VirtualHost};
use mesh_core::snapshot::OutboundTrafficPolicy;
use mesh_core::{CertStore, SnapshotCell};
use mesh_tower::outbound::Outbound;
use support_outbound::*;

const C: &str = "outbound|9080||svc.default.svc.cluster.local";
const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn outbound(retry: Option<RetryPolicy>, upstream: SocketAddr) -> Outbound {
    let vh = VirtualHost {
        name: "svc:9080".into(),
        domains: vec!["svc".into(), "svc:9080".into()],
        routes: vec![
            Route::new("default", RouteMatch::any(), RouteAction::Cluster(C.into()))
                .with_retry(retry),
        ],
    };
    let cell = SnapshotCell::new();
    cell.publish(
        snapshot(
            1,
            9080,
            vec![vh],
            vec![(Cluster::eds(C), vec![Endpoint::new(upstream)])],
            OutboundTrafficPolicy::RegistryOnly,
        ),
        true,
    );
    Outbound::new(cell, CertStore::new(), node())
}

async fn send(out: &Outbound, headers: &[(&str, &str)]) -> u16 {
    let mut req = Request::get("http://svc:9080/x");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = out.request(req.body(Empty::<Bytes>::new()).unwrap()).await;
    resp.status().as_u16()
}

fn header<'a>(seen: &'a Seen, name: &str) -> &'a str {
    seen.headers
        .get(name)
        .map(|v| v.to_str().unwrap())
        .unwrap_or("")
}

#[tokio::test]
async fn request_id_is_generated_when_absent_and_kept_when_sent() {
    bounded(async {
        let up = scripted("u", &[]).await;
        let out = outbound(None, up.addr);
        assert_eq!(send(&out, &[]).await, 200);
        assert_eq!(send(&out, &[("x-request-id", "app-chosen-id")]).await, 200);
        let seen = up.seen();
        let generated = header(&seen[0], "x-request-id");
        assert_eq!(generated.len(), 36, "a UUID: {generated:?}");
        assert_eq!(&generated[14..15], "4", "version 4: {generated}");
        assert!(
            !seen[0].headers.contains_key("traceparent"),
            "no trace started"
        );
        assert!(!seen[0].headers.contains_key("x-b3-traceid"));
        assert_eq!(header(&seen[1], "x-request-id"), "app-chosen-id");
    })
    .await;
}

#[tokio::test]
async fn every_retry_carries_the_same_request_id_and_span() {
    bounded(async {
        let up = scripted("u", &[Act::Status(503)]).await;
        let out = outbound(Some(RetryPolicy::istio_default()), up.addr);
        assert_eq!(send(&out, &[("traceparent", TP)]).await, 200);
        let seen = up.seen();
        assert_eq!(seen.len(), 2, "one retry");
        assert_eq!(
            header(&seen[0], "x-request-id"),
            header(&seen[1], "x-request-id")
        );
        assert_eq!(
            header(&seen[0], "traceparent"),
            header(&seen[1], "traceparent")
        );
    })
    .await;
}

#[tokio::test]
async fn trace_contexts_are_stepped_to_a_child_span() {
    bounded(async {
        let up = scripted("u", &[]).await;
        let out = outbound(None, up.addr);
        let headers = [
            ("traceparent", TP),
            ("tracestate", "congo=t61rcWkgMzE"),
            ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
            ("x-b3-spanid", "e457b5a2e4d86bd1"),
            ("x-b3-sampled", "1"),
            ("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"),
        ];
        assert_eq!(send(&out, &headers).await, 200);
        assert_eq!(send(&out, &[("traceparent", "00-not-valid-01")]).await, 200);
        let seen = up.seen();
        let tp = header(&seen[0], "traceparent");
        assert_eq!(tp.len(), 55);
        assert_eq!(&tp[..36], &TP[..36], "same trace id");
        assert_ne!(&tp[36..52], &TP[36..52], "a new parent id: the hop's span");
        assert!(tp.ends_with("-01"));
        assert_eq!(header(&seen[0], "tracestate"), "congo=t61rcWkgMzE");
        let span = &tp[36..52];
        assert_eq!(header(&seen[0], "x-b3-spanid"), span);
        assert_eq!(header(&seen[0], "x-b3-parentspanid"), "e457b5a2e4d86bd1");
        assert_eq!(
            header(&seen[0], "x-b3-traceid"),
            "80f198ee56343ba864fe8b2a57d3eff7"
        );
        assert_eq!(
            header(&seen[0], "b3"),
            format!("80f198ee56343ba864fe8b2a57d3eff7-{span}-1-e457b5a2e4d86bd1")
        );
        assert_eq!(header(&seen[1], "traceparent"), "00-not-valid-01");
    })
    .await;
}
