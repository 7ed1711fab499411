//! Translation of real istiod output (Istio 1.18 deathstarbench config dump), hand-mapped from
//! the JSON into protos for a few resources.

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::core::v3::{
    Address, Metadata, SocketAddress, TransportSocket, address, socket_address, transport_socket,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, UpstreamTlsContext, common_tls_context,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    HttpProtocolOptions, http_protocol_options,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
use envoy_types::pb::google::protobuf::{
    Duration, ListValue, Struct, UInt32Value, Value, value::Kind,
};
use mesh_core::cluster::{LbPolicy, SanMatcher, UpstreamProtocol};
use mesh_core::endpoint::EndpointTlsMode;
use mesh_xds::translate::{to_any, translate_cluster, translate_endpoint};
use serde_json::Value as J;

fn dump() -> Option<J> {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../testdata/istio/deathstarbench-geo-istio1.18_config_dump.json"
    );
    std::fs::read_to_string(p)
        .ok()
        .map(|t| serde_json::from_str(&t).unwrap())
}

fn section<'a>(d: &'a J, ty: &str) -> &'a J {
    d["configs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["@type"].as_str().unwrap().ends_with(ty))
        .unwrap()
}

fn jstruct(v: &J) -> Struct {
    Struct {
        fields: v
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), jvalue(v)))
            .collect(),
    }
}

fn jvalue(v: &J) -> Value {
    let kind = match v {
        J::String(s) => Kind::StringValue(s.clone()),
        J::Bool(b) => Kind::BoolValue(*b),
        J::Number(n) => Kind::NumberValue(n.as_f64().unwrap()),
        J::Array(a) => Kind::ListValue(ListValue {
            values: a.iter().map(jvalue).collect(),
        }),
        J::Object(_) => Kind::StructValue(jstruct(v)),
        J::Null => Kind::NullValue(0),
    };
    Value { kind: Some(kind) }
}

fn secs(s: &str) -> Duration {
    Duration {
        seconds: s.trim_end_matches('s').parse().unwrap(),
        nanos: 0,
    }
}

/// Maps the fields mesh reads from a dumped cluster.
fn cluster_from_json(c: &J) -> Cluster {
    let mut out = Cluster {
        name: c["name"].as_str().unwrap().into(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            match c["type"].as_str().unwrap() {
                "EDS" => cluster::DiscoveryType::Eds as i32,
                "ORIGINAL_DST" => cluster::DiscoveryType::OriginalDst as i32,
                _ => cluster::DiscoveryType::Static as i32,
            },
        )),
        eds_cluster_config: c["eds_cluster_config"]["service_name"].as_str().map(|s| {
            cluster::EdsClusterConfig {
                service_name: s.into(),
                ..Default::default()
            }
        }),
        connect_timeout: Some(secs(c["connect_timeout"].as_str().unwrap())),
        lb_policy: cluster::LbPolicy::from_str_name(
            c["lb_policy"].as_str().unwrap_or("ROUND_ROBIN"),
        )
        .unwrap() as i32,
        metadata: c["metadata"]["filter_metadata"]
            .as_object()
            .map(|m| Metadata {
                filter_metadata: m.iter().map(|(k, v)| (k.clone(), jstruct(v))).collect(),
                ..Default::default()
            }),
        ..Default::default()
    };
    if let Some(o) = c["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].as_object() {
        let opts = HttpProtocolOptions {
            upstream_protocol_options: o.get("use_downstream_protocol_config").map(|_| {
                http_protocol_options::UpstreamProtocolOptions::UseDownstreamProtocolConfig(Default::default())
            }),
            ..Default::default()
        };
        out.typed_extension_protocol_options
            .insert("envoy.extensions.upstreams.http.v3.HttpProtocolOptions".into(), to_any(&opts));
    }
    for m in c["transport_socket_matches"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let tc = &m["transport_socket"]["typed_config"];
        let any = if tc["@type"]
            .as_str()
            .unwrap()
            .ends_with("UpstreamTlsContext")
        {
            let ctx = &tc["common_tls_context"];
            let sans = ctx["combined_validation_context"]["default_validation_context"]["match_subject_alt_names"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| StringMatcher {
                    match_pattern: Some(string_matcher::MatchPattern::Exact(s["exact"].as_str().unwrap().into())),
                    ignore_case: false,
                })
                .collect();
            to_any(&UpstreamTlsContext {
                sni: tc["sni"].as_str().unwrap().into(),
                common_tls_context: Some(CommonTlsContext {
                    alpn_protocols: ctx["alpn_protocols"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|a| a.as_str().unwrap().into())
                        .collect(),
                    validation_context_type: Some(
                        common_tls_context::ValidationContextType::CombinedValidationContext(
                            common_tls_context::CombinedCertificateValidationContext {
                                #[allow(deprecated)]
                                default_validation_context: Some(CertificateValidationContext {
                                    match_subject_alt_names: sans,
                                    ..Default::default()
                                }),
                                ..Default::default()
                            },
                        ),
                    ),
                    ..Default::default()
                }),
                ..Default::default()
            })
        } else {
            to_any(
                &envoy_types::pb::envoy::extensions::transport_sockets::raw_buffer::v3::RawBuffer {},
            )
        };
        out.transport_socket_matches
            .push(cluster::TransportSocketMatch {
                name: m["name"].as_str().unwrap().into(),
                r#match: Some(jstruct(&m["match"])),
                transport_socket: Some(TransportSocket {
                    name: m["transport_socket"]["name"].as_str().unwrap().into(),
                    config_type: Some(transport_socket::ConfigType::TypedConfig(any)),
                }),
            });
    }
    out
}

fn cla_from_json(e: &J) -> ClusterLoadAssignment {
    ClusterLoadAssignment {
        cluster_name: e["cluster_name"].as_str().unwrap().into(),
        endpoints: e["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| LocalityLbEndpoints {
                lb_endpoints: g["lb_endpoints"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|lb| {
                        let sa = &lb["endpoint"]["address"]["socket_address"];
                        LbEndpoint {
                            host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(
                                Endpoint {
                                    address: Some(Address {
                                        address: Some(address::Address::SocketAddress(
                                            SocketAddress {
                                                address: sa["address"].as_str().unwrap().into(),
                                                port_specifier: Some(
                                                    socket_address::PortSpecifier::PortValue(
                                                        sa["port_value"].as_u64().unwrap() as u32,
                                                    ),
                                                ),
                                                ..Default::default()
                                            },
                                        )),
                                    }),
                                    ..Default::default()
                                },
                            )),
                            health_status: match lb["health_status"].as_str() {
                                Some("HEALTHY") => 1,
                                Some("UNHEALTHY") => 2,
                                _ => 0,
                            },
                            metadata: lb["metadata"]["filter_metadata"].as_object().map(|m| {
                                Metadata {
                                    filter_metadata: m
                                        .iter()
                                        .map(|(k, v)| (k.clone(), jstruct(v)))
                                        .collect(),
                                    ..Default::default()
                                }
                            }),
                            load_balancing_weight: lb["load_balancing_weight"]
                                .as_u64()
                                .map(|w| UInt32Value { value: w as u32 }),
                        }
                    })
                    .collect(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

#[test]
fn ads_dump_rate_cluster_and_endpoints_translate() {
    let Some(d) = dump() else {
        eprintln!("dump not found; skipping");
        return;
    };
    let name = "outbound|8084||rate.hr2.svc.cluster.local";
    let clusters = section(&d, "ClustersConfigDump")["dynamic_active_clusters"]
        .as_array()
        .unwrap();
    let cj = clusters
        .iter()
        .map(|c| &c["cluster"])
        .find(|c| c["name"] == name)
        .unwrap();
    let c = translate_cluster(&cluster_from_json(cj)).unwrap();
    assert_eq!(c.eds_service_name(), Some(name));
    assert_eq!(c.lb_policy, LbPolicy::LeastRequest);
    assert_eq!(c.connect_timeout, std::time::Duration::from_secs(10));
    assert_eq!(c.protocol, UpstreamProtocol::UseDownstream);
    let tls = c.istio_tls.as_ref().unwrap();
    assert_eq!(tls.sni, "outbound_.8084_._.rate.hr2.svc.cluster.local");
    assert_eq!(tls.alpn, vec!["istio-peer-exchange", "istio"]);
    assert_eq!(
        tls.san_matchers,
        vec![SanMatcher::Exact(
            "spiffe://cluster.local/ns/hr2/sa/default".into()
        )]
    );
    assert!(c.tls.is_none());
    let svc = c.service.as_ref().unwrap();
    assert_eq!(
        (svc.host.as_str(), svc.name.as_str(), svc.namespace.as_str()),
        ("rate.hr2.svc.cluster.local", "rate", "hr2")
    );

    let eps = section(&d, "EndpointsConfigDump")["dynamic_endpoint_configs"]
        .as_array()
        .unwrap();
    let ej = eps
        .iter()
        .map(|e| &e["endpoint_config"])
        .find(|e| e["cluster_name"] == name)
        .unwrap();
    let set = translate_endpoint(&cla_from_json(ej)).unwrap();
    assert_eq!(set.endpoints.len(), 1);
    let ep = &set.endpoints[0];
    assert_eq!(ep.address, "172.16.188.39:8084".parse().unwrap());
    assert_eq!(ep.tls_mode, EndpointTlsMode::Istio);
    assert_eq!(ep.workload.as_ref().unwrap().name, "rate");
    assert_eq!(
        c.tls_for(ep.tls_mode).unwrap().sni,
        "outbound_.8084_._.rate.hr2.svc.cluster.local"
    );

    // Every dumped EDS cluster at least translates.
    let mut n = 0;
    for cj in clusters.iter().map(|c| &c["cluster"]) {
        if cj["type"] == "EDS" {
            translate_cluster(&cluster_from_json(cj)).unwrap_or_else(|e| panic!("{e}"));
            n += 1;
        }
    }
    assert!(n > 100);
}
