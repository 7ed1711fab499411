//! mesh in one process, no cluster: the testkit control plane (real ADS + Istio CA over gRPC on
//! 127.0.0.1), a `backend` service in two versions and a `frontend`, each a meshed workload
//! with its own SPIFFE identity from the CA.
//!
//! The frontend makes 100 calls to `backend.default.svc.cluster.local:9080` through a 90/10
//! weighted route (v1/v2) over Istio mTLS, then prints the split, the identities each side saw,
//! and the `istio_requests_total` lines from its 15020 port.
//!
//! Run: `cargo run --example quickstart`

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use mesh::parts::tower::outbound::UpstreamPrincipal;
use mesh::parts::tower::status::StatusPort;
use mesh::parts::xds::testkit::ca::TestCa;
use mesh::parts::xds::testkit::{ControlPlane, EndpointSpec, MeshModel, Protocol, ServiceSpec};
use mesh::{Mesh, NodeIdentity, PeerIdentity};
use tokio::net::TcpListener;

type Error = Box<dyn std::error::Error + Send + Sync>;

const NS: &str = "default";
const BACKEND_PORT: u16 = 9080;

#[tokio::main]
async fn main() -> Result<(), Error> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();

    // The control plane and its CA, as istiod would be.
    let ca = TestCa::new("cluster.local");
    let cp = ControlPlane::builder().ca(ca.clone()).start().await?;
    println!("control plane (ADS + CA) on {}", cp.addr());
    let tokens = tempdir()?;

    // backend v1 and v2: meshed workloads serving an app that reports what it saw.
    let mut backends = Vec::new();
    for version in ["v1", "v2"] {
        let pod = format!("backend-{version}-5d9c7b8f6d-x{version}a1");
        let mut node = NodeIdentity::new(&pod, NS, "127.0.0.1".parse()?, "backend");
        node.labels.insert("app".into(), "backend".into());
        node.labels.insert("version".into(), version.into());
        node.workload_name = format!("backend-{version}");
        let mesh = start_mesh(&cp, &ca, &tokens, node).await?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let app = tower::service_fn(move |req: Request<mesh::Body>| async move {
            let peer = req
                .extensions()
                .get::<PeerIdentity>()
                .and_then(|p| p.spiffe_id.as_ref().map(|s| s.to_string()))
                .unwrap_or_else(|| "none (plaintext)".into());
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!(
                "{version} {peer}"
            )))))
        });
        let m = mesh.clone();
        tokio::spawn(async move { m.serve_on(listener, app).await });
        backends.push((version, addr, mesh));
    }

    // What istiod would know: the backend service with two subsets, 90/10 across them.
    cp.set_model(
        MeshModel::default().service(
            ServiceSpec::new("backend", NS, "10.96.0.10".parse()?)
                .port(BACKEND_PORT, Protocol::Http)
                .endpoint(
                    EndpointSpec::new(backends[0].1)
                        .service_account("backend")
                        .label("version", "v1"),
                )
                .endpoint(
                    EndpointSpec::new(backends[1].1)
                        .service_account("backend")
                        .label("version", "v2"),
                )
                .subset("v1", "version", "v1")
                .subset("v2", "version", "v2")
                .weighted(BACKEND_PORT, &[("v1", 90), ("v2", 10)]),
        ),
    );

    // The frontend: a meshed workload with an outbound client.
    let mut node = NodeIdentity::new(
        "frontend-7c9d8f6b5-abcde",
        NS,
        "127.0.0.1".parse()?,
        "frontend",
    );
    node.labels.insert("app".into(), "frontend".into());
    node.labels.insert("version".into(), "v1".into());
    let frontend = start_mesh(&cp, &ca, &tokens, node).await?;
    for (_, _, m) in &backends {
        tokio::time::timeout(Duration::from_secs(30), m.ready()).await?;
    }
    tokio::time::timeout(Duration::from_secs(30), frontend.ready()).await?;
    println!(
        "frontend identity: {}",
        frontend
            .certificates()
            .current()
            .map(|c| c.identity.to_string())
            .unwrap_or_default()
    );

    let client = frontend.http_client();
    let mut split: BTreeMap<String, u32> = BTreeMap::new();
    let mut seen_by_backend = BTreeMap::new();
    let mut seen_by_frontend = BTreeMap::new();
    for _ in 0..100 {
        let resp = client
            .get(format!(
                "http://backend.{NS}.svc.cluster.local:{BACKEND_PORT}/"
            ))
            .await?;
        if let Some(UpstreamPrincipal(id)) = resp.extensions().get::<UpstreamPrincipal>() {
            *seen_by_frontend.entry(id.to_string()).or_insert(0u32) += 1;
        }
        let body = String::from_utf8_lossy(resp.body()).to_string();
        let (version, peer) = body.split_once(' ').unwrap_or((&body, ""));
        *split.entry(version.to_owned()).or_insert(0) += 1;
        *seen_by_backend.entry(peer.to_owned()).or_insert(0u32) += 1;
    }
    println!("\n100 calls to backend through the 90/10 route:");
    for (v, n) in &split {
        println!("  {v}: {n}");
    }
    println!("identity the backends saw (the caller, from its mTLS certificate):");
    for (id, n) in &seen_by_backend {
        println!("  {id}: {n} calls");
    }
    println!("identity the frontend verified (the backend's certificate):");
    for (id, n) in &seen_by_frontend {
        println!("  {id}: {n} calls");
    }

    let status = frontend
        .status_addr(StatusPort::Agent)
        .ok_or("15020 is off")?;
    let stats = http_get(status, "/stats/prometheus").await?;
    println!("\nistio_requests_total from the frontend's 15020 (/stats/prometheus on {status}):");
    for line in stats
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{") && l.contains("reporter=\"source\""))
    {
        println!("  {line}");
    }
    let ok = split.get("v1").copied().unwrap_or(0) > split.get("v2").copied().unwrap_or(0)
        && split.values().sum::<u32>() == 100;
    if !ok {
        return Err("the split does not follow the 90/10 route".into());
    }
    Ok(())
}

/// Starts a meshed workload against the control plane: certificate from the CA with a token
/// for its service account, delta xDS, status ports on free loopback ports.
async fn start_mesh(
    cp: &ControlPlane,
    ca: &TestCa,
    dir: &std::path::Path,
    node: NodeIdentity,
) -> Result<Mesh, Error> {
    let token = dir.join(format!("{}.token", node.pod_name));
    std::fs::write(&token, ca.token_for(&node.namespace, &node.service_account))?;
    let addr = cp.addr().to_string();
    Ok(Mesh::builder(node)
        .discovery_address(addr.clone(), false, None)
        .ca_address(addr, false, None)
        .token_path(token)
        .bind_address("127.0.0.1".parse()?)
        .status_ports(Some(0), Some(0), Some(0))
        .start()
        .await?)
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> Result<String, Error> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let resp = send
        .send_request(
            Request::get(path)
                .header("host", "localhost")
                .body(Empty::<Bytes>::new())?,
        )
        .await?;
    Ok(String::from_utf8(
        resp.into_body().collect().await?.to_bytes().to_vec(),
    )?)
}

fn tempdir() -> std::io::Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("mesh-quickstart-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
