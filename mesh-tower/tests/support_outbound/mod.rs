//! Helpers for the outbound tests: real hyper upstreams on 127.0.0.1 and hand-built snapshots.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_core::cluster::Cluster;
use mesh_core::endpoint::{Endpoint, EndpointSet};
use mesh_core::listener::{Listener, ListenerKind, OutboundProtocol};
use mesh_core::route::{Route, RouteAction, RouteConfig, RouteMatch, VirtualHost};
use mesh_core::snapshot::OutboundTrafficPolicy;
use mesh_core::{CertStore, NodeIdentity, Snapshot, SnapshotCell};
use mesh_tower::outbound::Outbound;
use tokio::net::TcpListener;

/// A test upstream: answers `<name> <host> <path>`, counts accepted connections, connections
/// closed and requests.
#[derive(Clone)]
pub struct Upstream {
    pub name: &'static str,
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
    pub closed: Arc<AtomicUsize>,
    pub requests: Arc<AtomicUsize>,
    _task: Arc<AbortOnDrop>,
}

pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Upstream {
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
    pub fn closed(&self) -> usize {
        self.closed.load(Ordering::SeqCst)
    }
}

/// Starts an HTTP/1.1 + h2c upstream. `delay` is applied before answering paths starting
/// with `/slow`.
pub async fn upstream(name: &'static str) -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(AtomicUsize::new(0));
    let closed = Arc::new(AtomicUsize::new(0));
    let (c, r, cl) = (connections.clone(), requests.clone(), closed.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            c.fetch_add(1, Ordering::SeqCst);
            let (r, cl) = (r.clone(), cl.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let r = r.clone();
                    async move { Ok::<_, std::convert::Infallible>(answer(name, req, &r).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
                cl.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    Upstream {
        name,
        addr,
        connections,
        closed,
        requests,
        _task: Arc::new(AbortOnDrop(task)),
    }
}

async fn answer(
    name: &str,
    req: Request<Incoming>,
    requests: &AtomicUsize,
) -> Response<Full<Bytes>> {
    requests.fetch_add(1, Ordering::SeqCst);
    if req.uri().path().starts_with("/slow") {
        tokio::time::sleep(Duration::from_secs(30)).await;
    }
    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let version = format!("{:?}", req.version());
    let uri = req.uri().to_string();
    let hop = req.headers().contains_key("x-hop");
    let body = req
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    Response::builder()
        .header("x-server", name)
        .header("x-version", version)
        .header("x-uri", uri)
        .header("x-saw-hop", if hop { "yes" } else { "no" })
        .header("x-request-body-len", body.len())
        .body(Full::new(Bytes::from(format!("{name} {host}"))))
        .unwrap()
}

/// A virtual host with one catch-all route.
pub fn vhost(
    name: &str,
    domains: &[&str],
    action: RouteAction,
    timeout: Option<Duration>,
) -> VirtualHost {
    VirtualHost {
        name: name.into(),
        domains: domains.iter().map(|d| d.to_string()).collect(),
        routes: vec![Route::new("default", RouteMatch::any(), action).with_timeout(timeout)],
    }
}

/// A snapshot with one HTTP outbound listener on `port` using `vhosts`, and `clusters` with
/// their endpoints.
pub fn snapshot(
    version: u64,
    port: u16,
    vhosts: Vec<VirtualHost>,
    clusters: Vec<(Cluster, Vec<Endpoint>)>,
    policy: OutboundTrafficPolicy,
) -> Snapshot {
    let l = Listener {
        name: format!("0.0.0.0_{port}"),
        address: SocketAddr::from(([0, 0, 0, 0], port)),
        kind: ListenerKind::Outbound(OutboundProtocol::Http {
            route_config: port.to_string(),
        }),
    };
    let rc = RouteConfig::new(port.to_string(), vhosts).unwrap();
    let mut cs = HashMap::new();
    let mut eps = HashMap::new();
    for (c, e) in clusters {
        eps.insert(
            c.name.clone(),
            Arc::new(EndpointSet::new(c.name.clone(), e)),
        );
        cs.insert(c.name.clone(), Arc::new(c));
    }
    Snapshot::new(
        version,
        HashMap::from([(l.name.clone(), Arc::new(l))]),
        HashMap::from([(port.to_string(), Arc::new(rc))]),
        cs,
        eps,
        Arc::default(),
        policy,
        BTreeMap::new(),
    )
}

/// An outbound path over one HTTP listener on port 9080 with `vh` and the EDS cluster
/// `cluster` over `endpoints` (registry only).
pub fn one_cluster_outbound(
    vh: VirtualHost,
    cluster: &str,
    endpoints: Vec<SocketAddr>,
) -> Outbound {
    let cell = SnapshotCell::new();
    cell.publish(
        snapshot(
            1,
            9080,
            vec![vh],
            vec![(
                Cluster::eds(cluster),
                endpoints.into_iter().map(Endpoint::new).collect(),
            )],
            OutboundTrafficPolicy::RegistryOnly,
        ),
        true,
    );
    Outbound::new(cell, CertStore::new(), node())
}

pub fn node() -> NodeIdentity {
    let mut n = NodeIdentity::new(
        "productpage-v1-123-abc",
        "default",
        "10.0.0.1".parse().unwrap(),
        "bookinfo-productpage",
    );
    n.workload_name = "productpage-v1".into();
    n
}

/// Runs a test body with a bound on its duration.
pub async fn bounded<F: std::future::Future<Output = ()>>(f: F) {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .expect("test timed out");
}

/// What the scripted upstream does with one request.
#[derive(Clone, Copy, Debug)]
pub enum Act {
    Status(u16),
    /// Close the connection without answering.
    Reset,
    /// Answer after a long sleep.
    Slow,
    /// 200 with `grpc-status` in the headers.
    Grpc(u32),
}

/// What the upstream saw of one request.
#[derive(Clone, Debug)]
pub struct Seen {
    pub body: Bytes,
    pub attempt_count: Option<String>,
    pub path: String,
    pub uri: String,
    pub headers: http::HeaderMap,
}

#[derive(Clone)]
pub struct Scripted {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    _task: Arc<AbortOnDrop>,
}

impl Scripted {
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// An upstream that plays `script` one action per request, then answers 200.
pub async fn scripted(name: &'static str, script: &[Act]) -> Scripted {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let script = Arc::new(Mutex::new(script.iter().copied().collect::<VecDeque<_>>()));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (sc, se) = (script.clone(), seen.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (sc, se) = (sc.clone(), se.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (sc, se) = (sc.clone(), se.clone());
                    async move {
                        let act = sc.lock().unwrap().pop_front().unwrap_or(Act::Status(200));
                        let path = req.uri().path().to_owned();
                        let uri = req.uri().to_string();
                        let headers = req.headers().clone();
                        let attempt_count = req
                            .headers()
                            .get("x-envoy-attempt-count")
                            .map(|v| v.to_str().unwrap().to_owned());
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        se.lock().unwrap().push(Seen {
                            path,
                            uri,
                            headers,
                            body,
                            attempt_count,
                        });
                        let status = match act {
                            Act::Reset => return Err("scripted reset"),
                            Act::Slow => {
                                tokio::time::sleep(Duration::from_secs(30)).await;
                                200
                            }
                            Act::Status(s) => s,
                            Act::Grpc(_) => 200,
                        };
                        let mut resp = Response::builder().status(status).header("x-server", name);
                        if let Act::Grpc(code) = act {
                            resp = resp
                                .header("content-type", "application/grpc")
                                .header("grpc-status", code);
                        }
                        Ok::<_, &'static str>(
                            resp.body(Full::new(Bytes::from(format!("{name} {status}"))))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Scripted {
        addr,
        seen,
        _task: Arc::new(AbortOnDrop(task)),
    }
}
