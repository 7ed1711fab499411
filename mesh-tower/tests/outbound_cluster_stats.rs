//! Envoy's `envoy_cluster_*` request stats count upstream attempts (every retry is one more
//! upstream request) while `istio_requests_total` counts the downstream request once, through
//! the outbound path against real hyper upstreams on 127.0.0.1. The expected values are what a
//! real Envoy 1.40 reports for the same traffic (route `retry_on: 5xx`, upstream answering
//! 503 then 200; a dead host with `connect-failure` retried once).

use crate::support_outbound;

use std::net::SocketAddr;

use mesh_core::retry::{RetryOn, RetryPolicy};
use mesh_core::route::{Route, RouteAction, RouteMatch, VirtualHost};
use mesh_tower::outbound::Outbound;
use support_outbound::*;
use tokio::net::TcpListener;

/// An outbound path routing `<host>:9080` to cluster `cluster` over `endpoints`, retrying on
/// `retry_on` once.
fn outbound(host: &str, cluster: &str, retry_on: RetryOn, endpoints: Vec<SocketAddr>) -> Outbound {
    let vh = VirtualHost {
        name: format!("{host}:9080").into(),
        domains: vec![host.into(), format!("{host}:9080")],
        routes: vec![
            Route::new(
                "default",
                RouteMatch::any(),
                RouteAction::Cluster(cluster.into()),
            )
            .with_retry(Some(RetryPolicy {
                retry_on,
                num_retries: 1,
                ..RetryPolicy::default()
            })),
        ],
    };
    one_cluster_outbound(vh, cluster, endpoints)
}

/// The value of the first sample starting with `sample` (name and labels as written).
fn value(text: &str, sample: &str) -> Option<String> {
    text.lines()
        .find(|l| l.starts_with(sample))
        .and_then(|l| l.rsplit(' ').next())
        .map(str::to_owned)
}

/// The sum of `istio_requests_total` samples whose labels contain every needle (the recorder
/// is the process's: other tests' requests are in it too).
fn istio_requests(text: &str, needles: &[&str]) -> u64 {
    text.lines()
        .filter(|l| l.starts_with("istio_requests_total{") && needles.iter().all(|n| l.contains(n)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test]
async fn cluster_stats_count_attempts_and_istio_counts_the_request_once() {
    let handle = mesh_tower::telemetry::prometheus_handle().expect("mesh's recorder");
    bounded(async {
        // 503 then 200 on a `5xx` retry.
        let up = scripted("u", &[Act::Status(503)]).await;
        let c = "outbound|9080||retried.default.svc.cluster.local";
        let out = outbound("retried", c, RetryOn::HTTP_5XX, vec![up.addr]);
        let r = out.get("http://retried:9080/").await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(up.seen().len(), 2, "one retry");

        // A dead host, `connect-failure` retried once: 503 URX,UF.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead_addr = l.local_addr().unwrap();
        drop(l);
        let d = "outbound|9080||dead.default.svc.cluster.local";
        let out = outbound("dead", d, RetryOn::CONNECT_FAILURE, vec![dead_addr]);
        let r = out.get("http://dead:9080/").await.unwrap();
        assert_eq!(r.status(), 503);

        let text = handle.render();
        let at = |cluster: &str| format!("cluster_name=\"{cluster}\"}}");
        let coded = |cluster: &str, code: &str| format!("cluster_name=\"{cluster}\",{code}}}");
        for (sample, want) in [
            (format!("envoy_cluster_upstream_rq_total{{{}", at(c)), "2"),
            (
                format!(
                    "envoy_cluster_upstream_rq{{{}",
                    coded(c, r#"response_code="200""#)
                ),
                "1",
            ),
            (
                format!(
                    "envoy_cluster_retry_upstream_rq{{{}",
                    coded(c, r#"response_code="503""#)
                ),
                "1",
            ),
            (
                format!(
                    "envoy_cluster_upstream_rq{{{}",
                    coded(c, r#"response_code_class="2xx""#)
                ),
                "1",
            ),
            (
                format!(
                    "envoy_cluster_upstream_rq{{{}",
                    coded(c, r#"response_code_class="5xx""#)
                ),
                "0",
            ),
            (
                format!(
                    "envoy_cluster_retry_upstream_rq{{{}",
                    coded(c, r#"response_code_class="5xx""#)
                ),
                "1",
            ),
            (
                format!("envoy_cluster_upstream_rq_completed{{{}", at(c)),
                "1",
            ),
            (
                format!("envoy_cluster_retry_upstream_rq_completed{{{}", at(c)),
                "1",
            ),
            (format!("envoy_cluster_upstream_rq_retry{{{}", at(c)), "1"),
            (
                format!("envoy_cluster_upstream_rq_retry_success{{{}", at(c)),
                "1",
            ),
            (
                format!(
                    "envoy_cluster_upstream_rq_retry_backoff_exponential{{{}",
                    at(c)
                ),
                "1",
            ),
            (
                format!("envoy_cluster_upstream_rq_time_count{{{}", at(c)),
                "1",
            ),
            (format!("envoy_cluster_upstream_rq_active{{{}", at(c)), "0"),
            (format!("envoy_cluster_upstream_rq_total{{{}", at(d)), "0"),
            (
                format!(
                    "envoy_cluster_upstream_rq{{{}",
                    coded(d, r#"response_code="503""#)
                ),
                "1",
            ),
            (
                format!("envoy_cluster_upstream_rq_completed{{{}", at(d)),
                "1",
            ),
            (format!("envoy_cluster_upstream_rq_retry{{{}", at(d)), "1"),
            (
                format!("envoy_cluster_upstream_rq_retry_limit_exceeded{{{}", at(d)),
                "1",
            ),
            (
                format!("envoy_cluster_upstream_rq_time_count{{{}", at(d)),
                "0",
            ),
            (format!("envoy_cluster_upstream_rq_active{{{}", at(d)), "0"),
            // Both connects were refused: Envoy's `upstream_cx_connect_fail` counts each.
            (
                format!("envoy_cluster_upstream_cx_connect_fail{{{}", at(d)),
                "2",
            ),
            (
                format!("envoy_cluster_upstream_cx_connect_timeout{{{}", at(d)),
                "0",
            ),
        ] {
            assert_eq!(
                value(&text, &sample).as_deref(),
                Some(want),
                "{sample}\n{text}"
            );
        }
        // Istio's metric counts each downstream request once.
        assert_eq!(
            istio_requests(&text, &["destination_service=\"retried\""]),
            1,
            "{text}"
        );
        assert_eq!(
            istio_requests(
                &text,
                &["response_code=\"503\"", "destination_service=\"dead\""]
            ),
            1,
            "the dead host's request answered 503: {text}"
        );
    })
    .await;
}
