//! MeshResolver end to end: the NDS table through a real SnapshotCell, and upstream DNS
//! against a real UDP DNS server on 127.0.0.1 queried by a real hickory resolver.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::{RData, Record, RecordType, rdata};
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use mesh_core::name_table::{NameInfo, NameTable};
use mesh_core::resolve::Resolve;
use mesh_core::snapshot::OutboundTrafficPolicy;
use mesh_core::{Snapshot, SnapshotCell};
use mesh_dns::MeshResolver;
use tokio::net::UdpSocket;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(10);

fn ips(s: &[&str]) -> Vec<IpAddr> {
    s.iter().map(|s| s.parse().unwrap()).collect()
}

fn kube(short: &str, ns: &str, ip: &[&str]) -> NameInfo {
    NameInfo {
        ips: ips(ip),
        registry: "Kubernetes".into(),
        shortname: short.into(),
        namespace: ns.into(),
        alt_hosts: vec![],
    }
}

fn publish(cell: &SnapshotCell, version: u64, entries: Vec<(&str, NameInfo)>) {
    let table = NameTable {
        table: entries
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    };
    cell.publish(
        Snapshot::new(
            version,
            HashMap::new(),
            HashMap::new(),
            HashMap::new(),
            HashMap::new(),
            Arc::new(table),
            OutboundTrafficPolicy::AllowAny,
            BTreeMap::new(),
        ),
        true,
    );
}

/// A minimal authoritative DNS server: answers A/AAAA from `records`, NXDOMAIN otherwise.
struct DnsServer {
    addr: SocketAddr,
    queries: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn dns_server(records: Vec<(&str, &str)>) -> DnsServer {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let records: Vec<(String, IpAddr)> = records
        .into_iter()
        .map(|(n, ip)| {
            (
                n.trim_end_matches('.').to_ascii_lowercase(),
                ip.parse().unwrap(),
            )
        })
        .collect();
    let queries = Arc::new(AtomicUsize::new(0));
    let count = queries.clone();
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
                return;
            };
            let Ok(request) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            count.fetch_add(1, Ordering::SeqCst);
            let mut response = Message::response(request.metadata.id, request.metadata.op_code);
            response.metadata.message_type = MessageType::Response;
            response.metadata.recursion_desired = request.metadata.recursion_desired;
            response.metadata.recursion_available = true;
            response.metadata.authoritative = true;
            let mut known = false;
            for q in &request.queries {
                response.add_query(q.clone());
                let name = q
                    .name()
                    .to_ascii()
                    .trim_end_matches('.')
                    .to_ascii_lowercase();
                for (n, ip) in &records {
                    if *n != name {
                        continue;
                    }
                    known = true;
                    let data = match (ip, q.query_type()) {
                        (IpAddr::V4(v4), RecordType::A) => RData::A(rdata::A(*v4)),
                        (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(rdata::AAAA(*v6)),
                        _ => continue,
                    };
                    response.add_answer(Record::from_rdata(q.name().clone(), 30, data));
                }
            }
            if !known {
                response.metadata.response_code = ResponseCode::NXDomain;
            }
            if let Ok(bytes) = response.to_vec() {
                let _ = socket.send_to(&bytes, peer).await;
            }
        }
    });
    DnsServer {
        addr,
        queries,
        task,
    }
}

fn upstream_for(server: &DnsServer) -> TokioResolver {
    let mut ns = NameServerConfig::udp(server.addr.ip());
    for c in &mut ns.connections {
        c.port = server.addr.port();
    }
    let mut opts = ResolverOpts::default();
    opts.timeout = Duration::from_secs(2);
    opts.attempts = 1;
    opts.cache_size = 0;
    TokioResolver::builder_with_config(
        ResolverConfig::from_name_servers(vec![ns]),
        TokioRuntimeProvider::default(),
    )
    .with_options(opts)
    .build()
    .unwrap()
}

fn sorted(mut v: Vec<IpAddr>) -> Vec<IpAddr> {
    v.sort();
    v
}

#[tokio::test]
async fn ip_literals_are_returned_as_they_are() {
    let r = MeshResolver::new(SnapshotCell::new(), "default", "cluster.local");
    assert_eq!(r.resolve("10.1.2.3").await.unwrap(), ips(&["10.1.2.3"]));
    assert_eq!(r.resolve("fd00::7").await.unwrap(), ips(&["fd00::7"]));
    assert_eq!(r.resolve("[::1]").await.unwrap(), ips(&["::1"]));
}

#[tokio::test]
async fn table_names_resolve_with_the_agents_expansion() {
    let cell = SnapshotCell::new();
    publish(
        &cell,
        1,
        vec![
            (
                "reviews.default.svc.cluster.local",
                kube("reviews", "default", &["10.0.0.1"]),
            ),
            (
                "ratings.other.svc.cluster.local",
                kube("ratings", "other", &["10.0.0.2", "fd00::2"]),
            ),
        ],
    );
    let r = MeshResolver::new(cell, "default", "cluster.local");
    for host in [
        "reviews",
        "reviews.default",
        "reviews.default.svc",
        "Reviews.Default.svc.cluster.local.",
    ] {
        assert_eq!(r.resolve(host).await.unwrap(), ips(&["10.0.0.1"]), "{host}");
    }
    assert_eq!(
        r.resolve("ratings.other").await.unwrap(),
        ips(&["10.0.0.2", "fd00::2"])
    );
    // Another namespace's bare short name is not ours; with no upstream it fails, naming the host.
    let err = r.resolve("ratings").await.unwrap_err();
    assert_eq!(err.host, "ratings");
    assert!(err.to_string().contains("ratings"), "{err}");
    assert!(err.reason.contains("no upstream DNS"), "{err}");
}

#[tokio::test]
async fn a_new_snapshot_recompiles_the_table_once() {
    let cell = SnapshotCell::new();
    publish(
        &cell,
        1,
        vec![(
            "web.default.svc.cluster.local",
            kube("web", "default", &["10.0.0.1"]),
        )],
    );
    let r = MeshResolver::new(cell.clone(), "default", "cluster.local");
    assert_eq!(r.resolve("web").await.unwrap(), ips(&["10.0.0.1"]));
    assert_eq!(r.compiled_version(), Some(1));
    let first = r.table();
    assert!(
        Arc::ptr_eq(&first, &r.table()),
        "same snapshot must reuse the compiled table"
    );

    // Same table content in a newer snapshot: the expansion is kept, the version follows.
    publish(
        &cell,
        2,
        vec![(
            "web.default.svc.cluster.local",
            kube("web", "default", &["10.0.0.1"]),
        )],
    );
    assert!(Arc::ptr_eq(&first, &r.table()));
    assert_eq!(r.compiled_version(), Some(2));

    // Changed table: recompiled.
    publish(
        &cell,
        3,
        vec![(
            "web.default.svc.cluster.local",
            kube("web", "default", &["10.0.0.9"]),
        )],
    );
    assert_eq!(r.resolve("web").await.unwrap(), ips(&["10.0.0.9"]));
    assert_eq!(r.compiled_version(), Some(3));
    assert!(!Arc::ptr_eq(&first, &r.table()));
}

#[tokio::test]
async fn the_refresh_task_compiles_published_tables_ahead_of_lookups() {
    let cell = SnapshotCell::new();
    let r = MeshResolver::new(cell.clone(), "default", "cluster.local");
    let task = r.spawn_refresh();
    publish(
        &cell,
        7,
        vec![(
            "web.default.svc.cluster.local",
            kube("web", "default", &["10.0.0.1"]),
        )],
    );
    timeout(WAIT, async {
        while r.compiled_version() != Some(7) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("refresh task never compiled version 7");
    assert_eq!(r.lookup_table("web"), Some(ips(&["10.0.0.1"])));
    task.abort();
}

#[tokio::test]
async fn names_outside_the_table_go_to_upstream_dns() {
    let server = dns_server(vec![
        ("api.upstream.test", "198.51.100.7"),
        ("api.upstream.test", "2001:db8::7"),
        // The table must win over upstream for names it knows.
        ("reviews.default.svc.cluster.local", "203.0.113.99"),
    ])
    .await;
    let cell = SnapshotCell::new();
    publish(
        &cell,
        1,
        vec![(
            "reviews.default.svc.cluster.local",
            kube("reviews", "default", &["10.0.0.1"]),
        )],
    );
    let r =
        MeshResolver::new(cell, "default", "cluster.local").with_upstream(upstream_for(&server));

    let got = timeout(WAIT, r.resolve("api.upstream.test"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sorted(got), sorted(ips(&["198.51.100.7", "2001:db8::7"])));
    assert!(server.queries.load(Ordering::SeqCst) > 0);

    let before = server.queries.load(Ordering::SeqCst);
    let got = timeout(WAIT, r.resolve("reviews.default.svc.cluster.local"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, ips(&["10.0.0.1"]));
    assert_eq!(
        server.queries.load(Ordering::SeqCst),
        before,
        "table hits must not query upstream"
    );

    let err = timeout(WAIT, r.resolve("missing.upstream.test"))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.host, "missing.upstream.test");
    assert!(err.to_string().contains("missing.upstream.test"), "{err}");
    assert!(err.reason.contains("upstream DNS"), "{err}");
}
