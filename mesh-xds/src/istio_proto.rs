//! Istio-only protobuf messages, defined from their field lists (FACTS.md a.1, b.1):
//! `istio.networking.nds.v1.NameTable` and `istio.v1.auth.IstioCertificate{Request,Response}`.

use std::collections::HashMap;

/// Type URL of the NDS resource.
pub const NAME_TABLE_TYPE_URL: &str = "type.googleapis.com/istio.networking.nds.v1.NameTable";

/// gRPC path of the CA's only method.
pub const CREATE_CERTIFICATE_PATH: &str =
    "/istio.v1.auth.IstioCertificateService/CreateCertificate";

/// `istio.networking.nds.v1.NameTable`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct NameTable {
    /// Hostname (FQDN, no trailing dot) → addresses.
    #[prost(map = "string, message", tag = "1")]
    pub table: HashMap<String, NameInfo>,
}

/// `istio.networking.nds.v1.NameTable.NameInfo`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct NameInfo {
    /// IPv4/IPv6 literals.
    #[prost(string, repeated, tag = "1")]
    pub ips: Vec<String>,
    /// `Kubernetes` or `External`.
    #[prost(string, tag = "2")]
    pub registry: String,
    /// Kubernetes Service name.
    #[prost(string, tag = "3")]
    pub shortname: String,
    /// Kubernetes namespace.
    #[prost(string, tag = "4")]
    pub namespace: String,
    /// Extra names (deprecated, still honoured).
    #[prost(string, repeated, tag = "5")]
    pub alt_hosts: Vec<String>,
}

/// `istio.v1.auth.IstioCertificateRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateRequest {
    /// PEM CSR.
    #[prost(string, tag = "1")]
    pub csr: String,
    /// Requested TTL in seconds.
    #[prost(int64, tag = "3")]
    pub validity_duration: i64,
    /// Optional metadata (`CertSigner`, `ImpersonatedIdentity`).
    #[prost(message, optional, tag = "4")]
    pub metadata: Option<prost_types::Struct>,
}

/// `istio.v1.auth.IstioCertificateResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateResponse {
    /// PEM certificates, leaf first, root last.
    #[prost(string, repeated, tag = "1")]
    pub cert_chain: Vec<String>,
}
