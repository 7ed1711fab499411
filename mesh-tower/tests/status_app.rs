//! 15020's application-facing paths over real sockets: `/app-health/...` probes from
//! `ISTIO_KUBE_APP_PROBERS` and the merged `/stats/prometheus` with an application endpoint
//! from `ISTIO_PROMETHEUS_ANNOTATIONS` answering OpenMetrics.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use mesh_core::SnapshotCell;
use mesh_core::readiness::Readiness;
use mesh_tower::status::{StatusContext, StatusPort, serve_status};
use tokio::net::{TcpListener, TcpStream};

async fn app(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let r = match req.uri().path() {
        "/healthz" => Response::new(Full::new(Bytes::from_static(b"alive"))),
        "/metrics" => {
            let mut r = Response::new(Full::new(Bytes::from_static(
                b"# TYPE app_jobs counter\napp_jobs_total 7\n# EOF\n",
            )));
            r.headers_mut().insert(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8"
                    .parse()
                    .unwrap(),
            );
            r
        }
        _ => {
            let mut r = Response::new(Full::new(Bytes::new()));
            *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            r
        }
    };
    Ok(r)
}

async fn get(addr: SocketAddr, path: &str, accept: Option<&str>) -> (u16, Option<String>, String) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = Request::get(path).header("host", "pod");
    if let Some(a) = accept {
        req = req.header("accept", a);
    }
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        send.send_request(req.body(Empty::<Bytes>::new()).unwrap()),
    )
    .await
    .unwrap()
    .unwrap();
    let status = resp.status().as_u16();
    let ct = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, ct, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn app_probes_and_app_metrics_merge() {
    let metrics = mesh_tower::telemetry::prometheus_handle().expect("mesh's recorder");
    let app_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_port = app_listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = app_listener.accept().await else {
                return;
            };
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), hyper::service::service_fn(app)),
            );
        }
    });
    let closed_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let probers = format!(
        r#"{{"/app-health/web/livez":{{"httpGet":{{"path":"/healthz","port":{app_port}}}}},
            "/app-health/web/readyz":{{"httpGet":{{"path":"/down","port":{app_port}}}}},
            "/app-health/web/startupz":{{"tcpSocket":{{"port":{app_port}}}}},
            "/app-health/db/startupz":{{"tcpSocket":{{"port":{closed_port}}}}}}}"#
    );
    let annotations = format!(r#"{{"scrape":"true","port":"{app_port}","path":"/metrics"}}"#);
    let mut ctx =
        StatusContext::new(Readiness::new(SnapshotCell::new(), None)).with_env(|k| match k {
            "ISTIO_KUBE_APP_PROBERS" => Some(probers.clone()),
            "ISTIO_PROMETHEUS_ANNOTATIONS" => Some(annotations.clone()),
            _ => None,
        });
    ctx.metrics = Some(metrics);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(serve_status(
        l,
        StatusPort::Agent,
        Arc::new(ctx),
        std::future::pending(),
    ));

    let (s, _, body) = get(addr, "/app-health/web/livez", None).await;
    assert_eq!((s, body.as_str()), (200, "alive"));
    assert_eq!(get(addr, "/app-health/web/readyz", None).await.0, 503);
    assert_eq!(get(addr, "/app-health/web/startupz", None).await.0, 200);
    assert_eq!(get(addr, "/app-health/db/startupz", None).await.0, 500);
    let (s, _, body) = get(addr, "/app-health/nope/livez", None).await;
    assert_eq!(s, 400);
    assert!(body.contains("app prober config does not exists for /app-health/nope/livez"));

    metrics::counter!("envoy_status_app_probe_marker").increment(1);
    let (s, ct, body) = get(
        addr,
        "/stats/prometheus",
        Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(
        ct.as_deref(),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    assert!(body.ends_with("app_jobs_total 7\n# EOF\n"), "{body}");
    assert_eq!(body.matches("# EOF").count(), 1);
    let agent = body
        .find("istio_agent_scrapes_total")
        .expect("agent family");
    let proxy = body
        .find("envoy_status_app_probe_marker")
        .expect("proxy family");
    let app = body.find("app_jobs_total").unwrap();
    assert!(
        agent < proxy && proxy < app,
        "agent, then proxy, then app:\n{body}"
    );
}
