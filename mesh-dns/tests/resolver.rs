//! MeshResolver end to end: the NDS table through a real SnapshotCell, and upstream DNS
//! against a real UDP DNS server on 127.0.0.1 queried by a real hickory resolver.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use mesh_core::name_table::{NameInfo, NameTable};
use mesh_core::resolve::{LookupFamily, Resolve};
use mesh_core::snapshot::OutboundTrafficPolicy;
use mesh_core::{Snapshot, SnapshotCell};
use mesh_dns::MeshResolver;
use mesh_dns::testkit::DnsServer;
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
    let server = DnsServer::start(&[
        ("api.upstream.test", "198.51.100.7"),
        ("api.upstream.test", "2001:db8::7"),
        // The table must win over upstream for names it knows.
        ("reviews.default.svc.cluster.local", "203.0.113.99"),
    ])
    .await
    .unwrap();
    let cell = SnapshotCell::new();
    publish(
        &cell,
        1,
        vec![(
            "reviews.default.svc.cluster.local",
            kube("reviews", "default", &["10.0.0.1"]),
        )],
    );
    let r = MeshResolver::new(cell, "default", "cluster.local").with_upstream(server.resolver());

    let got = timeout(WAIT, r.resolve("api.upstream.test"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sorted(got), sorted(ips(&["198.51.100.7", "2001:db8::7"])));
    assert!(server.queries() > 0);

    let before = server.queries();
    let got = timeout(WAIT, r.resolve("reviews.default.svc.cluster.local"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, ips(&["10.0.0.1"]));
    assert_eq!(
        server.queries(),
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

fn upstream_resolver(server: &DnsServer) -> MeshResolver {
    let cell = SnapshotCell::new();
    publish(
        &cell,
        1,
        vec![(
            "web.default.svc.cluster.local",
            kube("web", "default", &["10.0.0.1", "fd00::1"]),
        )],
    );
    MeshResolver::new(cell, "default", "cluster.local").with_upstream(server.resolver())
}

#[tokio::test]
async fn dns_cluster_lookups_ask_the_families_envoy_asks() {
    let server = DnsServer::start(&[
        ("dual.upstream.test", "2001:db8::1"),
        ("dual.upstream.test", "198.51.100.1"),
        ("dual.upstream.test", "198.51.100.2"),
        ("v4.upstream.test", "198.51.100.4"),
        ("v6.upstream.test", "2001:db8::6"),
    ])
    .await
    .unwrap();
    server.set_ttl(7);
    let r = upstream_resolver(&server);
    let lookup = |host: &'static str, family| {
        let r = r.clone();
        async move {
            timeout(WAIT, r.lookup(host, family))
                .await
                .expect("lookup bounded")
        }
    };
    use LookupFamily::*;
    let cases: &[(&str, LookupFamily, &[&str])] = &[
        (
            "dual.upstream.test",
            V4Only,
            &["198.51.100.1", "198.51.100.2"],
        ),
        ("dual.upstream.test", V6Only, &["2001:db8::1"]),
        ("dual.upstream.test", Auto, &["2001:db8::1"]),
        ("v4.upstream.test", Auto, &["198.51.100.4"]),
        (
            "dual.upstream.test",
            V4Preferred,
            &["198.51.100.1", "198.51.100.2"],
        ),
        ("v6.upstream.test", V4Preferred, &["2001:db8::6"]),
        (
            "dual.upstream.test",
            All,
            &["198.51.100.1", "198.51.100.2", "2001:db8::1"],
        ),
        ("v4.upstream.test", V6Only, &[]),
    ];
    for (host, family, want) in cases {
        let got = lookup(host, *family).await.unwrap();
        assert_eq!(got.addrs, ips(want), "{host} {family:?}");
        if !want.is_empty() {
            assert_eq!(got.ttl, Some(Duration::from_secs(7)), "{host} {family:?}");
        }
    }
    // The table answers with the family's addresses and no TTL; so do IP literals.
    let got = lookup("web", V4Only).await.unwrap();
    assert_eq!((got.addrs, got.ttl), (ips(&["10.0.0.1"]), None));
    let got = lookup("10.9.9.9", V4Only).await.unwrap();
    assert_eq!((got.addrs, got.ttl), (ips(&["10.9.9.9"]), None));
}

#[tokio::test]
async fn nxdomain_is_an_empty_answer_and_servfail_a_failure() {
    let server = DnsServer::start(&[("api.upstream.test", "198.51.100.7")])
        .await
        .unwrap();
    let r = upstream_resolver(&server);
    let got = timeout(WAIT, r.lookup("gone.upstream.test", LookupFamily::V4Only))
        .await
        .unwrap()
        .expect("NXDOMAIN is an answer");
    assert!(got.addrs.is_empty());

    server.set_failing(true);
    let err = timeout(WAIT, r.lookup("api.upstream.test", LookupFamily::V4Only))
        .await
        .unwrap()
        .expect_err("SERVFAIL is a failure");
    assert_eq!(err.host, "api.upstream.test");

    server.set_failing(false);
    server.set("api.upstream.test", &["198.51.100.8"]);
    let got = timeout(WAIT, r.lookup("api.upstream.test", LookupFamily::V4Only))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.addrs, ips(&["198.51.100.8"]));
}
