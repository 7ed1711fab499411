//! Istio's HTTP peer metadata exchange (FACTS.md f.1): the `x-envoy-peer-metadata-id` and
//! `x-envoy-peer-metadata` headers sidecars put on requests (client side) and responses
//! (server side), so each side can label its metrics with the other side's workload.
//!
//! `x-envoy-peer-metadata` is the standard base64 (padded on encode; unpadded accepted on
//! decode) of a deterministically serialized `google.protobuf.Struct`. The Struct is small and
//! its wire format fixed, so it is written and read by hand here: protobuf types stay out of
//! mesh-core.
//!
//! What a sidecar sends (Istio 1.2x, `convertWorkloadMetadataToStruct`): `CLUSTER_ID`,
//! `LABELS` (`app`, `service.istio.io/canonical-name`, `service.istio.io/canonical-revision`,
//! `version`), `NAME`, `NAMESPACE`, `OWNER`, `WORKLOAD_NAME`, only the non-empty ones, keys in
//! byte order (deterministic serialization sorts map keys). Newer proxies may add `IDENTITY`,
//! `REGION`, `AVAILABILITY_ZONE`; older ones sent the whole node metadata (nested structs,
//! lists, numbers). The decoder reads any Struct and picks the fields it knows.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};

use crate::identity::NodeIdentity;
use crate::telemetry::{UNKNOWN, WorkloadLabels};

/// Header carrying the sender's `node.id`.
pub const PEER_METADATA_ID_HEADER: &str = "x-envoy-peer-metadata-id";
/// Header carrying the sender's workload metadata (base64 protobuf `Struct`).
pub const PEER_METADATA_HEADER: &str = "x-envoy-peer-metadata";
/// [`PEER_METADATA_ID_HEADER`] as a parsed header name (the request path's form: a `&str`
/// name is parsed again on every header map operation).
pub const PEER_METADATA_ID: http::HeaderName =
    http::HeaderName::from_static(PEER_METADATA_ID_HEADER);
/// [`PEER_METADATA_HEADER`] as a parsed header name.
pub const PEER_METADATA: http::HeaderName = http::HeaderName::from_static(PEER_METADATA_HEADER);

/// Pod label holding the canonical service.
pub const CANONICAL_NAME_LABEL: &str = "service.istio.io/canonical-name";
/// Pod label holding the canonical revision.
pub const CANONICAL_REVISION_LABEL: &str = "service.istio.io/canonical-revision";

/// Largest header value decoded (the sidecar caps nothing; 64 KiB keeps a hostile peer from
/// making us decode megabytes per request).
pub const MAX_HEADER_LEN: usize = 64 * 1024;

/// Nesting depth accepted in a peer's Struct (old proxies nest two or three levels).
const MAX_DEPTH: usize = 32;

const ENCODER: GeneralPurpose = base64::engine::general_purpose::STANDARD;
const DECODER: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Why a peer's metadata header could not be read (the peer is then unknown, as in Envoy).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerMetadataError {
    /// The header is larger than [`MAX_HEADER_LEN`].
    #[error("x-envoy-peer-metadata is {0} bytes, more than the {MAX_HEADER_LEN} accepted")]
    TooLarge(usize),
    /// Not standard base64.
    #[error("x-envoy-peer-metadata is not base64: {0}")]
    Base64(String),
    /// Not a protobuf `google.protobuf.Struct`.
    #[error("x-envoy-peer-metadata is not a protobuf Struct: {0}")]
    Protobuf(&'static str),
}

/// A `google.protobuf.Value`, as far as peer metadata needs it.
#[derive(Debug, Clone, PartialEq)]
pub enum StructValue {
    /// `null_value`.
    Null,
    /// `number_value`.
    Number(f64),
    /// `string_value`.
    String(String),
    /// `bool_value`.
    Bool(bool),
    /// `struct_value`.
    Struct(BTreeMap<String, StructValue>),
    /// `list_value`.
    List(Vec<StructValue>),
}

/// One workload's metadata as exchanged between sidecars.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerMetadata {
    /// `NAME`: the pod name.
    pub name: String,
    /// `NAMESPACE`.
    pub namespace: String,
    /// `WORKLOAD_NAME`.
    pub workload_name: String,
    /// `CLUSTER_ID`.
    pub cluster_id: String,
    /// `IDENTITY` (newer proxies only; empty when absent).
    pub identity: String,
    /// `LABELS`: string-valued labels (canonical name/revision, app, version, ...).
    pub labels: BTreeMap<String, String>,
    /// `OWNER` (`kubernetes://apis/apps/v1/namespaces/<ns>/deployments/<name>`).
    pub owner: String,
    /// `REGION` (newer proxies only).
    pub region: String,
    /// `AVAILABILITY_ZONE` (newer proxies only).
    pub zone: String,
}

impl PeerMetadata {
    /// What a sidecar for `node` sends: the four standard labels (canonical name and revision
    /// with Istio's fallbacks, `app` and `version` when the pod has them), the pod and workload
    /// names, namespace, cluster and the `OWNER` node metadata when known. `IDENTITY` and the
    /// locality are left out, as Istio 1.2x sidecars do.
    pub fn from_node(node: &NodeIdentity) -> Self {
        let mut labels = BTreeMap::new();
        labels.insert(
            CANONICAL_NAME_LABEL.to_owned(),
            node.canonical_service().to_owned(),
        );
        labels.insert(
            CANONICAL_REVISION_LABEL.to_owned(),
            node.canonical_revision().to_owned(),
        );
        for key in ["app", "version"] {
            if let Some(v) = node.labels.get(key) {
                labels.insert(key.to_owned(), v.clone());
            }
        }
        PeerMetadata {
            name: node.pod_name.clone(),
            namespace: node.namespace.clone(),
            workload_name: node.workload_name.clone(),
            cluster_id: node.cluster_id.clone(),
            identity: String::new(),
            labels,
            owner: node.metadata.get("OWNER").cloned().unwrap_or_default(),
            region: String::new(),
            zone: String::new(),
        }
    }

    /// The metadata as `Struct` fields (empty values left out).
    pub fn to_fields(&self) -> BTreeMap<String, StructValue> {
        let mut fields = BTreeMap::new();
        let mut put = |k: &str, v: &str| {
            if !v.is_empty() {
                fields.insert(k.to_owned(), StructValue::String(v.to_owned()));
            }
        };
        put("AVAILABILITY_ZONE", &self.zone);
        put("CLUSTER_ID", &self.cluster_id);
        put("IDENTITY", &self.identity);
        put("NAME", &self.name);
        put("NAMESPACE", &self.namespace);
        put("OWNER", &self.owner);
        put("REGION", &self.region);
        put("WORKLOAD_NAME", &self.workload_name);
        if !self.labels.is_empty() {
            let labels = self
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), StructValue::String(v.clone())))
                .collect();
            fields.insert("LABELS".to_owned(), StructValue::Struct(labels));
        }
        fields
    }

    /// The deterministic protobuf `Struct` bytes (keys sorted, empty values left out).
    pub fn to_struct_bytes(&self) -> Vec<u8> {
        encode_struct(&self.to_fields())
    }

    /// The `x-envoy-peer-metadata` header value.
    pub fn encode_header(&self) -> String {
        ENCODER.encode(self.to_struct_bytes())
    }

    /// Reads an `x-envoy-peer-metadata` header value.
    pub fn decode_header(value: &[u8]) -> Result<Self, PeerMetadataError> {
        if value.len() > MAX_HEADER_LEN {
            return Err(PeerMetadataError::TooLarge(value.len()));
        }
        let bytes = DECODER
            .decode(value.trim_ascii())
            .map_err(|e| PeerMetadataError::Base64(e.to_string()))?;
        Self::from_struct_bytes(&bytes)
    }

    /// Reads the protobuf `Struct` bytes of a peer's metadata.
    pub fn from_struct_bytes(bytes: &[u8]) -> Result<Self, PeerMetadataError> {
        let fields = decode_struct(bytes, 0)?;
        Ok(Self::from_fields(&fields))
    }

    /// Picks the known keys out of a decoded Struct (unknown keys and non-string values are
    /// ignored).
    pub fn from_fields(fields: &BTreeMap<String, StructValue>) -> Self {
        let s = |k: &str| match fields.get(k) {
            Some(StructValue::String(v)) => v.clone(),
            _ => String::new(),
        };
        let labels = match fields.get("LABELS") {
            Some(StructValue::Struct(m)) => m
                .iter()
                .filter_map(|(k, v)| match v {
                    StructValue::String(v) => Some((k.clone(), v.clone())),
                    _ => None,
                })
                .collect(),
            _ => BTreeMap::new(),
        };
        PeerMetadata {
            name: s("NAME"),
            namespace: s("NAMESPACE"),
            workload_name: s("WORKLOAD_NAME"),
            cluster_id: s("CLUSTER_ID"),
            identity: s("IDENTITY"),
            labels,
            owner: s("OWNER"),
            region: s("REGION"),
            zone: s("AVAILABILITY_ZONE"),
        }
    }

    /// The peer's labels for Istio metrics, with Istio's value rules: anything missing is
    /// `unknown`, a missing canonical revision is `latest`. The principal is the `IDENTITY`
    /// when sent, else `unknown`: the metrics take the principal from the peer certificate,
    /// which callers put in afterwards.
    pub fn workload_labels(&self) -> WorkloadLabels {
        let or_unknown = |v: &str| {
            if v.is_empty() {
                UNKNOWN.to_owned()
            } else {
                v.to_owned()
            }
        };
        let label = |k: &str| self.labels.get(k).map(String::as_str).unwrap_or("");
        let revision = label(CANONICAL_REVISION_LABEL);
        WorkloadLabels {
            workload: or_unknown(&self.workload_name),
            namespace: or_unknown(&self.namespace),
            principal: or_unknown(&self.identity),
            app: or_unknown(label("app")),
            version: or_unknown(label("version")),
            canonical_service: or_unknown(label(CANONICAL_NAME_LABEL)),
            canonical_revision: if revision.is_empty() {
                "latest".to_owned()
            } else {
                revision.to_owned()
            },
            cluster: or_unknown(&self.cluster_id),
        }
    }
}

/// The two headers a workload sends, computed once per process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerMetadataHeaders {
    /// `x-envoy-peer-metadata-id`: the `node.id`.
    pub id: String,
    /// `x-envoy-peer-metadata`: base64 of the Struct.
    pub metadata: String,
}

impl PeerMetadataHeaders {
    /// The headers a sidecar for `node` sends.
    pub fn for_node(node: &NodeIdentity) -> Self {
        PeerMetadataHeaders {
            id: node.node_id(),
            metadata: PeerMetadata::from_node(node).encode_header(),
        }
    }
}

// --- protobuf wire format -------------------------------------------------------------------

fn write_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub(crate) fn write_len_delimited(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
    out.push(tag);
    write_varint(out, body.len() as u64);
    out.extend_from_slice(body);
}

/// One `Struct.fields` map entry: field 1 (entry message) { 1: key, 2: Value }.
fn write_entry(out: &mut Vec<u8>, key: &str, value: &StructValue) {
    let mut entry = Vec::with_capacity(key.len() + 32);
    write_len_delimited(&mut entry, 0x0a, key.as_bytes());
    let mut v = Vec::new();
    write_value(&mut v, value);
    write_len_delimited(&mut entry, 0x12, &v);
    write_len_delimited(out, 0x0a, &entry);
}

fn write_value(out: &mut Vec<u8>, value: &StructValue) {
    match value {
        StructValue::Null => {
            out.push(0x08);
            out.push(0);
        }
        StructValue::Number(n) => {
            out.push(0x11);
            out.extend_from_slice(&n.to_le_bytes());
        }
        StructValue::String(s) => write_len_delimited(out, 0x1a, s.as_bytes()),
        StructValue::Bool(b) => {
            out.push(0x20);
            out.push(u8::from(*b));
        }
        StructValue::Struct(m) => {
            let mut body = Vec::new();
            for (k, v) in m {
                write_entry(&mut body, k, v);
            }
            write_len_delimited(out, 0x2a, &body);
        }
        StructValue::List(items) => {
            let mut body = Vec::new();
            for v in items {
                let mut item = Vec::new();
                write_value(&mut item, v);
                write_len_delimited(&mut body, 0x0a, &item);
            }
            write_len_delimited(out, 0x32, &body);
        }
    }
}

/// Encodes a generic Struct deterministically (keys in byte order).
pub fn encode_struct(fields: &BTreeMap<String, StructValue>) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in fields {
        write_entry(&mut out, k, v);
    }
    out
}

pub(crate) struct Reader<'a> {
    pub(crate) buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn done(&self) -> bool {
        self.buf.is_empty()
    }

    fn varint(&mut self) -> Result<u64, PeerMetadataError> {
        let mut v = 0u64;
        for i in 0..10 {
            let (&b, rest) = self
                .buf
                .split_first()
                .ok_or(PeerMetadataError::Protobuf("truncated varint"))?;
            self.buf = rest;
            v |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                return Ok(v);
            }
        }
        Err(PeerMetadataError::Protobuf("varint longer than 10 bytes"))
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], PeerMetadataError> {
        if self.buf.len() < n {
            return Err(PeerMetadataError::Protobuf("truncated field"));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    pub(crate) fn len_delimited(&mut self) -> Result<&'a [u8], PeerMetadataError> {
        let n = usize::try_from(self.varint()?)
            .map_err(|_| PeerMetadataError::Protobuf("length overflows"))?;
        self.bytes(n)
    }

    /// Reads a tag: (field number, wire type).
    pub(crate) fn tag(&mut self) -> Result<(u64, u8), PeerMetadataError> {
        let t = self.varint()?;
        Ok((t >> 3, (t & 7) as u8))
    }

    pub(crate) fn skip(&mut self, wire: u8) -> Result<(), PeerMetadataError> {
        match wire {
            0 => self.varint().map(drop),
            1 => self.bytes(8).map(drop),
            2 => self.len_delimited().map(drop),
            5 => self.bytes(4).map(drop),
            _ => Err(PeerMetadataError::Protobuf("unsupported wire type")),
        }
    }
}

/// Decodes `google.protobuf.Struct` bytes into its fields. Unknown fields are skipped; a
/// repeated key keeps the last value, as protobuf map parsing does.
pub fn decode_struct(
    bytes: &[u8],
    depth: usize,
) -> Result<BTreeMap<String, StructValue>, PeerMetadataError> {
    if depth > MAX_DEPTH {
        return Err(PeerMetadataError::Protobuf("nested too deeply"));
    }
    let mut r = Reader { buf: bytes };
    let mut fields = BTreeMap::new();
    while !r.done() {
        match r.tag()? {
            (1, 2) => {
                let mut entry = Reader {
                    buf: r.len_delimited()?,
                };
                let mut key = String::new();
                let mut value = StructValue::Null;
                while !entry.done() {
                    match entry.tag()? {
                        (1, 2) => {
                            key = std::str::from_utf8(entry.len_delimited()?)
                                .map_err(|_| PeerMetadataError::Protobuf("key is not UTF-8"))?
                                .to_owned();
                        }
                        (2, 2) => value = decode_value(entry.len_delimited()?, depth + 1)?,
                        (_, wire) => entry.skip(wire)?,
                    }
                }
                fields.insert(key, value);
            }
            (_, wire) => r.skip(wire)?,
        }
    }
    Ok(fields)
}

fn decode_value(bytes: &[u8], depth: usize) -> Result<StructValue, PeerMetadataError> {
    if depth > MAX_DEPTH {
        return Err(PeerMetadataError::Protobuf("nested too deeply"));
    }
    let mut r = Reader { buf: bytes };
    let mut value = StructValue::Null;
    while !r.done() {
        value = match r.tag()? {
            (1, 0) => {
                r.varint()?;
                StructValue::Null
            }
            (2, 1) => {
                let b = r.bytes(8)?;
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                StructValue::Number(f64::from_le_bytes(a))
            }
            (3, 2) => StructValue::String(
                std::str::from_utf8(r.len_delimited()?)
                    .map_err(|_| PeerMetadataError::Protobuf("string is not UTF-8"))?
                    .to_owned(),
            ),
            (4, 0) => StructValue::Bool(r.varint()? != 0),
            (5, 2) => StructValue::Struct(decode_struct(r.len_delimited()?, depth + 1)?),
            (6, 2) => {
                let mut list = Reader {
                    buf: r.len_delimited()?,
                };
                let mut items = Vec::new();
                while !list.done() {
                    match list.tag()? {
                        (1, 2) => items.push(decode_value(list.len_delimited()?, depth + 1)?),
                        (_, wire) => list.skip(wire)?,
                    }
                }
                StructValue::List(items)
            }
            (_, wire) => {
                r.skip(wire)?;
                continue;
            }
        };
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real header sent by an Istio 1.24 sidecar (Envoy 1.32.2), copied from a public bug
    /// report together with that proxy's `server_info` node metadata; the same file feeds the
    /// root crate's test of an Envoy sidecar calling mesh (tests/telemetry_prometheus.rs).
    const ISTIO_1_24_FILE: &str = include_str!("../../testdata/istio/peer-metadata-istio1.24.txt");

    /// `id` or `metadata` of [`ISTIO_1_24_FILE`].
    fn istio_1_24(key: &str) -> &'static str {
        ISTIO_1_24_FILE
            .lines()
            .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
            .expect("field in testdata")
    }

    fn istio_1_24_node() -> NodeIdentity {
        let mut node = NodeIdentity::new(
            "demo-a-prodcatapi-57868f9d7c-67fsc",
            "components",
            "10.88.3.242".parse().unwrap(),
            "default",
        );
        node.workload_name = "demo-a-prodcatapi".into();
        for (k, v) in [
            ("oda.tmforum.org/secretsmanagement", "sidecar"),
            (CANONICAL_REVISION_LABEL, "productcatalogapi-0.23"),
            ("version", "productcatalogapi-0.23"),
            ("app", "demo-a-productcatalogmanagement"),
            (CANONICAL_NAME_LABEL, "demo-a-productcatalogmanagement"),
            ("security.istio.io/tlsMode", "istio"),
            ("impl", "demo-a-prodcatapi"),
        ] {
            node.labels.insert(k.into(), v.into());
        }
        node.metadata.insert(
            "OWNER".into(),
            "kubernetes://apis/apps/v1/namespaces/components/deployments/demo-a-prodcatapi".into(),
        );
        node
    }

    #[test]
    fn decodes_a_real_istio_sidecar_header() {
        let m = PeerMetadata::decode_header(istio_1_24("metadata").as_bytes()).unwrap();
        assert_eq!(m.name, "demo-a-prodcatapi-57868f9d7c-67fsc");
        assert_eq!(m.namespace, "components");
        assert_eq!(m.workload_name, "demo-a-prodcatapi");
        assert_eq!(m.cluster_id, "Kubernetes");
        assert_eq!(m.labels.len(), 4);
        let l = m.workload_labels();
        assert_eq!(l.workload, "demo-a-prodcatapi");
        assert_eq!(l.canonical_service, "demo-a-productcatalogmanagement");
        assert_eq!(l.canonical_revision, "productcatalogapi-0.23");
        assert_eq!(l.app, "demo-a-productcatalogmanagement");
        assert_eq!(l.version, "productcatalogapi-0.23");
        assert_eq!(l.cluster, "Kubernetes");
        assert_eq!(l.principal, UNKNOWN);
    }

    #[test]
    fn encodes_byte_for_byte_what_the_istio_sidecar_sent() {
        let headers = PeerMetadataHeaders::for_node(&istio_1_24_node());
        assert_eq!(headers.metadata, istio_1_24("metadata"));
        assert_eq!(headers.id, istio_1_24("id"));
    }

    #[test]
    fn round_trip_with_every_field() {
        let mut m = PeerMetadata::from_node(&istio_1_24_node());
        m.identity = "spiffe://cluster.local/ns/components/sa/default".into();
        m.region = "europe".into();
        m.zone = "europe-west3".into();
        let back = PeerMetadata::decode_header(m.encode_header().as_bytes()).unwrap();
        assert_eq!(back, m);
        // Unpadded input is accepted.
        let unpadded = m.encode_header().trim_end_matches('=').to_owned();
        assert_eq!(PeerMetadata::decode_header(unpadded.as_bytes()).unwrap(), m);
    }

    #[test]
    fn old_proxies_full_node_metadata_decodes_generically() {
        let mut labels = BTreeMap::new();
        labels.insert("app".to_owned(), StructValue::String("details".into()));
        let mut fields = BTreeMap::new();
        fields.insert("LABELS".to_owned(), StructValue::Struct(labels));
        fields.insert("ENVOY_STATUS_PORT".to_owned(), StructValue::Number(15021.0));
        fields.insert(
            "PILOT_SAN".to_owned(),
            StructValue::List(vec![StructValue::String("istiod.istio-system.svc".into())]),
        );
        fields.insert("SDS".to_owned(), StructValue::Bool(true));
        fields.insert("NOTHING".to_owned(), StructValue::Null);
        fields.insert(
            "WORKLOAD_NAME".to_owned(),
            StructValue::String("details-v1".into()),
        );
        let bytes = encode_struct(&fields);
        assert_eq!(decode_struct(&bytes, 0).unwrap(), fields);
        let m = PeerMetadata::from_struct_bytes(&bytes).unwrap();
        assert_eq!(m.workload_name, "details-v1");
        let l = m.workload_labels();
        assert_eq!(l.app, "details");
        assert_eq!(l.canonical_service, UNKNOWN);
        assert_eq!(l.canonical_revision, "latest");
        assert_eq!(l.namespace, UNKNOWN);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(matches!(
            PeerMetadata::decode_header(b"%%%"),
            Err(PeerMetadataError::Base64(_))
        ));
        // Truncated: a field claims 100 bytes.
        assert!(PeerMetadata::from_struct_bytes(&[0x0a, 100, 1]).is_err());
        // Deep nesting.
        let mut v = StructValue::Null;
        for _ in 0..100 {
            let mut m = BTreeMap::new();
            m.insert("a".to_owned(), v);
            v = StructValue::Struct(m);
        }
        let mut top = BTreeMap::new();
        top.insert("a".to_owned(), v);
        assert!(decode_struct(&encode_struct(&top), 0).is_err());
        assert!(matches!(
            PeerMetadata::decode_header(&vec![b'A'; MAX_HEADER_LEN + 1]),
            Err(PeerMetadataError::TooLarge(_))
        ));
        // Every prefix of a real value either decodes or errors.
        let bytes = DECODER.decode(istio_1_24("metadata")).unwrap();
        for n in 0..bytes.len() {
            let _ = PeerMetadata::from_struct_bytes(&bytes[..n]);
        }
    }
}
