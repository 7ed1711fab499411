//! ServiceEntry-style DNS clusters end to end: the testkit control plane renders a
//! `resolution: DNS` / `DNS_ROUND_ROBIN` ServiceEntry as istiod does (STRICT_DNS / LOGICAL_DNS,
//! V4_ONLY, respect_dns_ttl), a real DNS server on 127.0.0.1 answers its name, and requests
//! through `Mesh`'s outbound path reach whatever DNS says now.
//!
//! The upstreams listen on loopback addresses 127.0.0.2 and 127.0.0.3 at the same port (a DNS
//! answer carries only the address): a response names the one that served it.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use mesh::Mesh;
use mesh::parts::dns::testkit::DnsServer;
use mesh::parts::xds::testkit::{DnsResolution, MeshModel, Protocol, ServiceEntrySpec};
use tokio::net::TcpListener;
use tokio::time::timeout;

use crate::support::mesh::{Plane, WAIT, eventually, node, ready};

const HOST: &str = "api.external.test";
const A: &str = "127.0.0.2";
const B: &str = "127.0.0.3";

/// An HTTP/1.1 server on `ip:port` answering every request with `ip`.
async fn upstream(ip: &str, port: u16) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let ip: IpAddr = ip.parse().expect("an IP");
    let listener = TcpListener::bind(SocketAddr::new(ip, port)).await?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| async move {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(ip.to_string()))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    }))
}

/// Upstreams on [`A`] and [`B`] at one port.
async fn upstreams() -> (u16, Vec<tokio::task::JoinHandle<()>>) {
    for _ in 0..20 {
        let probe = TcpListener::bind((A, 0)).await.expect("bind 127.0.0.2");
        let port = probe.local_addr().expect("addr").port();
        drop(probe);
        if let (Ok(a), Ok(b)) = (upstream(A, port).await, upstream(B, port).await) {
            return (port, vec![a, b]);
        }
    }
    panic!("no port free on both 127.0.0.2 and 127.0.0.3");
}

/// A meshed client whose ServiceEntry `entry` resolves through `dns`.
async fn client(entry: ServiceEntrySpec, dns: &DnsServer) -> (Plane, Mesh) {
    let plane = Plane::start(MeshModel::default().service_entry(entry)).await;
    let mesh = plane
        .builder(node("client-0", "client"))
        .dns_servers(vec![dns.addr()])
        .start()
        .await
        .expect("mesh starts");
    ready(&mesh).await;
    (plane, mesh)
}

/// GET `http://api.external.test:<port>/`: (status, body).
async fn call(mesh: &Mesh, port: u16) -> (u16, String) {
    let resp = timeout(
        WAIT,
        mesh.http_client().get(format!("http://{HOST}:{port}/")),
    )
    .await
    .expect("bounded")
    .expect("a response");
    (
        resp.status().as_u16(),
        String::from_utf8_lossy(resp.body()).into_owned(),
    )
}

/// Waits until a request gets `want`.
async fn until(mesh: &Mesh, port: u16, want: (u16, &str), what: &str) {
    eventually(what, || async {
        let got = call(mesh, port).await;
        (got.0 == want.0 && got.1 == want.1).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_dns_service_entry_follows_dns_and_keeps_hosts_when_dns_fails() {
    let (port, _up) = upstreams().await;
    let dns = DnsServer::start(&[(HOST, A)]).await.expect("DNS server");
    // After a failed resolution Envoy asks again at the refresh rate (no TTL then): 1 s here.
    dns.set_ttl(1);
    let entry = ServiceEntrySpec::dns(HOST, "default")
        .dns_refresh_rate(Duration::from_secs(1))
        .port(port, Protocol::Http);
    let (_plane, mesh) = client(entry, &dns).await;

    assert_eq!(call(&mesh, port).await, (200, A.to_owned()));

    dns.set(HOST, &[B]);
    until(
        &mesh,
        port,
        (200, B),
        "requests to follow the new DNS answer",
    )
    .await;
    for _ in 0..10 {
        assert_eq!(call(&mesh, port).await, (200, B.to_owned()));
    }

    // SERVFAIL: the cluster keeps its hosts through failed refreshes.
    dns.set_failing(true);
    let before = dns.queries();
    eventually("two failed refreshes", || async {
        (dns.queries() >= before + 2).then_some(())
    })
    .await;
    for _ in 0..10 {
        assert_eq!(call(&mesh, port).await, (200, B.to_owned()));
    }

    // NXDOMAIN is an answer: the name has no hosts any more.
    dns.set_failing(false);
    dns.set(HOST, &[]);
    until(
        &mesh,
        port,
        (503, "no healthy upstream"),
        "no healthy upstream once the name is gone",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_dns_balances_over_every_address() {
    let (port, _up) = upstreams().await;
    let dns = DnsServer::start(&[(HOST, A), (HOST, B)])
        .await
        .expect("DNS server");
    let entry = ServiceEntrySpec::dns(HOST, "default").port(port, Protocol::Http);
    let (_plane, mesh) = client(entry, &dns).await;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..40 {
        let (status, body) = call(&mesh, port).await;
        assert_eq!(status, 200, "{body}");
        seen.insert(body);
    }
    assert_eq!(seen, [A.to_owned(), B.to_owned()].into());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_dns_uses_the_first_address_of_the_latest_answer() {
    let (port, _up) = upstreams().await;
    let dns = DnsServer::start(&[(HOST, B), (HOST, A)])
        .await
        .expect("DNS server");
    // istiod's 60 s refresh rate: only the 1 s TTL (respect_dns_ttl) makes the change show.
    dns.set_ttl(1);
    let entry = ServiceEntrySpec::dns(HOST, "default")
        .resolution(DnsResolution::DnsRoundRobin)
        .port(port, Protocol::Http);
    let (_plane, mesh) = client(entry, &dns).await;
    for _ in 0..20 {
        assert_eq!(call(&mesh, port).await, (200, B.to_owned()));
    }
    dns.set(HOST, &[A, B]);
    until(&mesh, port, (200, A), "the new first address").await;
    for _ in 0..20 {
        assert_eq!(call(&mesh, port).await, (200, A.to_owned()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_cluster_without_an_answer_has_no_healthy_upstream() {
    let (port, _up) = upstreams().await;
    let dns = DnsServer::start(&[(HOST, A)]).await.expect("DNS server");
    dns.set_failing(true);
    // A failed resolution is retried at the refresh rate.
    let entry = ServiceEntrySpec::dns(HOST, "default")
        .dns_refresh_rate(Duration::from_secs(1))
        .port(port, Protocol::Http);
    let (_plane, mesh) = client(entry, &dns).await;
    let (status, body) = call(&mesh, port).await;
    assert_eq!((status, body.as_str()), (503, "no healthy upstream"));
    // The first good answer brings the host.
    dns.set_failing(false);
    until(&mesh, port, (200, A), "the first answer").await;
}
