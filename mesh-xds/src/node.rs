//! The Envoy `Node` istio-agent sends in the first request of every stream (FACTS.md c.2, c.3).

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::core::v3::{Locality, Node};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use mesh_core::NodeIdentity;

/// The `ISTIO_VERSION` mesh reports when the node metadata does not carry one. istiod gates
/// features on it, so it names a current Istio release.
pub const DEFAULT_ISTIO_VERSION: &str = "1.26.0";

/// A protobuf string value.
pub(crate) fn string_value(s: impl Into<String>) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.into())),
    }
}

/// A protobuf struct value of string fields.
pub(crate) fn string_struct<'a>(
    entries: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> Struct {
    Struct {
        fields: entries
            .into_iter()
            .map(|(k, v)| (k.clone(), string_value(v.clone())))
            .collect(),
    }
}

/// Builds the `Node` exactly as istio-agent sends it: `id` =
/// `sidecar~<ip>~<pod>.<ns>~<ns>.svc.<domain>`, `cluster` = `<canonical service>.<ns>`, and
/// the metadata istiod consumes (string values, `LABELS` a struct), followed by every
/// `node.metadata` entry (which overrides a computed key of the same name).
pub fn envoy_node(node: &NodeIdentity) -> Node {
    let mut fields: BTreeMap<String, Value> = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        fields.insert(k.to_owned(), string_value(v));
    };
    put("ISTIO_VERSION", DEFAULT_ISTIO_VERSION.to_owned());
    put("INSTANCE_IPS", node.instance_ip.to_string());
    put("NAMESPACE", node.namespace.clone());
    put("SERVICE_ACCOUNT", node.service_account.clone());
    put("CLUSTER_ID", node.cluster_id.clone());
    put("NAME", node.pod_name.clone());
    put("POD_NAME", node.pod_name.clone());
    put("WORKLOAD_NAME", node.workload_name.clone());
    put("MESH_ID", node.trust_domain.clone());
    put("INTERCEPTION_MODE", "NONE".to_owned());
    put("DNS_CAPTURE", "true".to_owned());
    put("DNS_AUTO_ALLOCATE", "true".to_owned());
    put(
        "OWNER",
        format!(
            "kubernetes://apis/apps/v1/namespaces/{}/deployments/{}",
            node.namespace, node.workload_name
        ),
    );
    for (k, v) in &node.metadata {
        put(k, v.clone());
    }
    fields.insert(
        "LABELS".to_owned(),
        Value {
            kind: Some(Kind::StructValue(string_struct(&node.labels))),
        },
    );
    Node {
        id: node.node_id(),
        cluster: format!("{}.{}", node.canonical_service(), node.namespace),
        metadata: Some(Struct {
            fields: fields.into_iter().collect(),
        }),
        locality: Some(Locality::default()),
        user_agent_name: "mesh".to_owned(),
        ..Default::default()
    }
}

/// The string value of a metadata key in a `Node`, if present and a string.
pub fn metadata_string<'a>(node: &'a Node, key: &str) -> Option<&'a str> {
    match node.metadata.as_ref()?.fields.get(key)?.kind.as_ref()? {
        Kind::StringValue(s) => Some(s),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> NodeIdentity {
        let mut n = NodeIdentity::new(
            "reviews-v1-7f99c7d8b5-abcde",
            "default",
            "10.1.2.3".parse().unwrap(),
            "bookinfo-reviews",
        );
        n.labels.insert("app".into(), "reviews".into());
        n.labels.insert("version".into(), "v1".into());
        n.metadata.insert("MESH_ID".into(), "mesh1".into());
        n.metadata.insert("CUSTOM".into(), "x".into());
        n
    }

    #[test]
    fn node_id_and_metadata_match_istio_agent() {
        let node = envoy_node(&identity());
        assert_eq!(
            node.id,
            "sidecar~10.1.2.3~reviews-v1-7f99c7d8b5-abcde.default~default.svc.cluster.local"
        );
        assert_eq!(node.cluster, "reviews.default");
        assert_eq!(metadata_string(&node, "INSTANCE_IPS"), Some("10.1.2.3"));
        assert_eq!(metadata_string(&node, "NAMESPACE"), Some("default"));
        assert_eq!(
            metadata_string(&node, "SERVICE_ACCOUNT"),
            Some("bookinfo-reviews")
        );
        assert_eq!(metadata_string(&node, "CLUSTER_ID"), Some("Kubernetes"));
        assert_eq!(metadata_string(&node, "WORKLOAD_NAME"), Some("reviews-v1"));
        assert_eq!(metadata_string(&node, "INTERCEPTION_MODE"), Some("NONE"));
        assert_eq!(metadata_string(&node, "DNS_CAPTURE"), Some("true"));
        assert_eq!(
            metadata_string(&node, "MESH_ID"),
            Some("mesh1"),
            "explicit metadata wins"
        );
        assert_eq!(metadata_string(&node, "CUSTOM"), Some("x"));
        assert_eq!(
            metadata_string(&node, "OWNER"),
            Some("kubernetes://apis/apps/v1/namespaces/default/deployments/reviews-v1")
        );
        let Some(Kind::StructValue(labels)) =
            &node.metadata.as_ref().unwrap().fields["LABELS"].kind
        else {
            panic!("LABELS must be a struct");
        };
        assert_eq!(
            labels.fields["version"].kind,
            Some(Kind::StringValue("v1".into()))
        );
        assert_eq!(node.locality, Some(Locality::default()));
        let default_mesh = envoy_node(&NodeIdentity::new(
            "p",
            "ns",
            "10.0.0.1".parse().unwrap(),
            "sa",
        ));
        assert_eq!(
            metadata_string(&default_mesh, "MESH_ID"),
            Some("cluster.local")
        );
    }

    /// Every key the real bootstrap golden carries with a string value and that mesh sends is
    /// sent as a string too; `LABELS` is a struct in both.
    #[test]
    fn key_types_match_the_bootstrap_golden() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../testdata/istio/bootstrap_running_golden.json"
        );
        let Ok(text) = std::fs::read_to_string(path) else {
            eprintln!("golden not found at {path}; skipping");
            return;
        };
        let golden: serde_json::Value = serde_json::from_str(&text).unwrap();
        let golden_meta = golden["node"]["metadata"].as_object().unwrap();
        let golden_id = golden["node"]["id"].as_str().unwrap();
        assert_eq!(golden_id.split('~').count(), 4);
        let node = envoy_node(&identity());
        assert_eq!(node.id.split('~').count(), 4);
        let ours = &node.metadata.as_ref().unwrap().fields;
        let mut compared = 0;
        for (k, v) in golden_meta {
            let Some(mine) = ours.get(k) else { continue };
            compared += 1;
            match (v, &mine.kind) {
                (serde_json::Value::String(_), Some(Kind::StringValue(_))) => {}
                (serde_json::Value::Object(_), Some(Kind::StructValue(_))) => {}
                other => panic!("{k}: golden and mesh disagree on the type: {other:?}"),
            }
        }
        for k in [
            "INSTANCE_IPS",
            "NAMESPACE",
            "LABELS",
            "NAME",
            "ISTIO_VERSION",
            "INTERCEPTION_MODE",
        ] {
            assert!(golden_meta.contains_key(k), "golden lacks {k}");
            assert!(ours.contains_key(k), "mesh lacks {k}");
        }
        assert!(compared >= 6);
    }
}
