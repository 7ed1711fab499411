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

/// The same `STRICT_DNS` and `LOGICAL_DNS` clusters in a real Envoy 1.40 (c-ares asking the
/// test DNS server through `typed_dns_resolver_config`) and in mesh (mesh-dns asking the same
/// server): both send traffic to the same addresses, and both follow the new record set once
/// the 1 s TTL has run out.
#[test]
fn dns_clusters_match_envoy() {
    use crate::routing_oracle::{KeepAlive, oracles};
    use crate::support::envoy::envoy_binary;
    use serde_json::json;
    use std::collections::BTreeMap;

    if envoy_binary().is_none() {
        return;
    }
    const STRICT: &str = "strict.external.test";
    const LOGICAL: &str = "logical.external.test";
    // The upstreams and the DNS server run on their own runtime.
    let setup = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let (port, _up) = setup.block_on(upstreams());
    let dns = setup
        .block_on(DnsServer::start(&[
            (STRICT, A),
            (STRICT, B),
            (LOGICAL, B),
            (LOGICAL, A),
        ]))
        .expect("DNS server");
    dns.set_ttl(1);
    let cluster = |name: &str, kind: &str, host: &str| {
        json!({"name": name, "type": kind, "connect_timeout": "1s",
            "dns_lookup_family": "V4_ONLY", "dns_refresh_rate": "1s", "respect_dns_ttl": true,
            "typed_dns_resolver_config": {"name": "envoy.network.dns_resolver.cares", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig",
                "resolvers": [{"socket_address": {"address": "127.0.0.1", "port_value": dns.addr().port()}}],
                "dns_resolver_options": {"use_tcp_for_dns_lookups": false, "no_default_search_domain": true}}},
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": {"socket_address": {"address": host, "port_value": port}}}}]}]}})
    };
    let clusters = vec![
        cluster("strict", "STRICT_DNS", STRICT),
        cluster("logical", "LOGICAL_DNS", LOGICAL),
    ];
    let vhosts: Vec<_> = ["strict", "logical"]
        .iter()
        .map(|c| json!({"name": c, "domains": [c], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": c}}]}))
        .collect();
    let route_config = json!({"name": "dns", "virtual_hosts": vhosts});
    let o = oracles("dns", &route_config, &clusters, |_| {}, Some(dns.addr()));
    let (rt, mesh) = (&o.rt, &o.mesh);
    let mut envoy = KeepAlive::connect(o.port);

    // Which address served each of `n` requests to `host`, counted.
    let mut envoy_counts = |host: &str, n: usize| {
        let mut c = BTreeMap::<String, usize>::new();
        for _ in 0..n {
            let (status, _, body) = envoy.send(host, "/", &[]);
            *c.entry(format!("{status} {body}")).or_default() += 1;
        }
        c
    };
    let mesh_counts = |host: &str, n: usize| {
        let mut c = BTreeMap::<String, usize>::new();
        for _ in 0..n {
            let r = rt
                .block_on(async { timeout(WAIT, mesh.get(format!("http://{host}/"))).await })
                .expect("bounded")
                .expect("a response");
            let body = String::from_utf8_lossy(r.body()).into_owned();
            *c.entry(format!("{} {body}", r.status().as_u16()))
                .or_default() += 1;
        }
        c
    };
    let only = |addr: &str, n: usize| BTreeMap::from([(format!("200 {addr}"), n)]);
    // Waits (bounded) until 10 requests in a row to `host` all get `want`.
    let settle = |what: &str,
                  ask: &mut dyn FnMut(&str, usize) -> BTreeMap<String, usize>,
                  host: &str,
                  want: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let got = ask(host, 10);
            if got == only(want, 10) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: {host} still answers {got:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let mut mesh_ask = |h: &str, n: usize| mesh_counts(h, n);
    let mut envoy_ask = |h: &str, n: usize| envoy_counts(h, n);

    // First answers: STRICT_DNS spreads over both addresses, LOGICAL_DNS uses the first.
    settle("first answer", &mut envoy_ask, "logical", B);
    settle("first answer", &mut mesh_ask, "logical", B);
    let e = envoy_ask("strict", 40);
    let m = mesh_ask("strict", 40);
    eprintln!("strict: envoy {e:?} mesh {m:?}");
    assert_eq!(
        e.keys().collect::<Vec<_>>(),
        m.keys().collect::<Vec<_>>(),
        "strict: envoy {e:?} mesh {m:?}"
    );
    assert_eq!(e.len(), 2, "strict uses both addresses: {e:?}");
    assert_eq!(envoy_ask("logical", 20), only(B, 20));
    assert_eq!(mesh_ask("logical", 20), only(B, 20));

    // The record sets change: both follow once the TTL has run out.
    dns.set(STRICT, &[B]);
    dns.set(LOGICAL, &[A, B]);
    settle("new answer", &mut envoy_ask, "strict", B);
    settle("new answer", &mut mesh_ask, "strict", B);
    settle("new answer", &mut envoy_ask, "logical", A);
    settle("new answer", &mut mesh_ask, "logical", A);
    assert_eq!(envoy_ask("strict", 20), only(B, 20));
    assert_eq!(mesh_ask("strict", 20), only(B, 20));
    assert_eq!(envoy_ask("logical", 20), only(A, 20));
    assert_eq!(mesh_ask("logical", 20), only(A, 20));
}
