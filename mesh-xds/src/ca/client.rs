//! The Istio CA client: one unary `CreateCertificate` call per certificate (FACTS.md b.1–b.3).

use std::path::PathBuf;
use std::time::Duration;

use http::uri::PathAndQuery;
use mesh_core::config::ControlPlaneAddress;
use prost_types::{Struct, Value, value::Kind};
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue, MetadataMap};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic_prost::ProstCodec;

use super::CaError;
use crate::istio_proto::{
    CREATE_CERTIFICATE_PATH, IstioCertificateRequest, IstioCertificateResponse,
};

/// How long one `CreateCertificate` call may take before it is abandoned.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// TCP/TLS connect timeout to the CA.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// pilot-agent's counter of requests to the CA (`request_type="csr"`), on 15020.
pub const NUM_OUTGOING_REQUESTS_METRIC: &str = "istio_agent_num_outgoing_requests";
/// pilot-agent's counter of failed requests to the CA (`request_type="csr"`).
pub const NUM_FAILED_OUTGOING_REQUESTS_METRIC: &str = "istio_agent_num_failed_outgoing_requests";
/// pilot-agent's sum of request latencies to the CA in milliseconds (`request_type="csr"`).
pub const OUTGOING_LATENCY_METRIC: &str = "istio_agent_outgoing_latency";

/// A client of istiod's `IstioCertificateService`. Cheap to clone (the channel is shared and
/// reconnects by itself).
#[derive(Clone, Debug)]
pub struct CaClient {
    channel: Channel,
    address: String,
    token_path: Option<PathBuf>,
    cluster_id: String,
    cluster_id_header: Option<AsciiMetadataValue>,
    /// What to check when the TLS handshake fails (root file and server name).
    tls_hint: Option<String>,
    headers: Vec<(AsciiMetadataKey, AsciiMetadataValue)>,
}

impl CaClient {
    /// Prepares a client for the CA at `address`: TLS verified against `address.root_cert`
    /// with server name [`ControlPlaneAddress::tls_server_name`], or plaintext when
    /// `address.tls` is false. The connection itself is made lazily (and remade after
    /// failures) by the first call, so istiod being down is reported by
    /// [`CaClient::create_certificate`], not here.
    ///
    /// `token_path` is sent as `authorization: Bearer <token>` (re-read on every call),
    /// `cluster_id` as `clusterid`, and `headers` (from `CA_HEADER_*`) as extra metadata.
    pub async fn connect(
        address: &ControlPlaneAddress,
        token_path: Option<PathBuf>,
        cluster_id: String,
        headers: Vec<(String, String)>,
    ) -> Result<CaClient, CaError> {
        Self::connect_with_identity(address, token_path, cluster_id, headers, None).await
    }

    /// [`CaClient::connect`] presenting the `PROV_CERT` certificate (`cert-chain.pem` and
    /// `key.pem` in `prov_cert`) as the TLS client certificate, as pilot-agent does on VMs:
    /// istiod authenticates the caller from it before looking at a token (which is still
    /// sent when the token file exists). Needs a TLS address.
    pub async fn connect_with_provisioned_certs(
        address: &ControlPlaneAddress,
        prov_cert: &std::path::Path,
        token_path: Option<PathBuf>,
        cluster_id: String,
        headers: Vec<(String, String)>,
    ) -> Result<CaClient, CaError> {
        let fail = |reason: String| CaError::ProvisionedCert {
            dir: prov_cert.to_owned(),
            reason,
        };
        if !address.tls {
            return Err(fail(format!(
                "the CA address {} is plaintext; a client certificate needs TLS",
                address.address
            )));
        }
        let read = |name: &str| {
            std::fs::read(prov_cert.join(name)).map_err(|e| fail(format!("{name}: {e}")))
        };
        let chain = read(crate::secrets::CERT_CHAIN_FILE)?;
        let key = read(crate::secrets::KEY_FILE)?;
        // Refuse a mismatched or unparsable pair here rather than in every handshake.
        crate::secrets::pem::workload_certificate_from_pem(&chain, &key, &chain)
            .map_err(|e| fail(e.to_string()))?;
        let identity = tonic::transport::Identity::from_pem(chain, key);
        Self::connect_with_identity(address, token_path, cluster_id, headers, Some(identity)).await
    }

    async fn connect_with_identity(
        address: &ControlPlaneAddress,
        token_path: Option<PathBuf>,
        cluster_id: String,
        headers: Vec<(String, String)>,
        identity: Option<tonic::transport::Identity>,
    ) -> Result<CaClient, CaError> {
        let invalid = |reason: String| CaError::InvalidAddress {
            address: address.address.clone(),
            reason,
        };
        let scheme = if address.tls { "https" } else { "http" };
        let mut tls_hint = None;
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{}", address.address))
            .map_err(|e| invalid(e.to_string()))?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT);
        if address.tls {
            let path = address
                .root_cert
                .as_ref()
                .ok_or_else(|| CaError::MissingRootCert {
                    address: address.address.clone(),
                })?;
            let pem = tokio::fs::read(path).await.map_err(|e| CaError::RootCert {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
                return Err(CaError::RootCert {
                    path: path.clone(),
                    reason: "no PEM certificate in the file".into(),
                });
            }
            tls_hint = Some(format!(
                "check that {} holds the root that signed istiod's certificate and that the certificate is valid for {:?}",
                path.display(),
                address.tls_server_name()
            ));
            let mut tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(pem))
                .domain_name(address.tls_server_name());
            if let Some(identity) = identity {
                tls = tls.identity(identity);
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| invalid(format!("TLS configuration: {e}")))?;
        }
        let mut parsed = Vec::with_capacity(headers.len());
        for (name, value) in headers {
            let key = AsciiMetadataKey::from_bytes(name.to_ascii_lowercase().as_bytes()).map_err(
                |e| CaError::InvalidHeader {
                    name: name.clone(),
                    reason: e.to_string(),
                },
            )?;
            let value = AsciiMetadataValue::try_from(value.as_str()).map_err(|e| {
                CaError::InvalidHeader {
                    name: name.clone(),
                    reason: e.to_string(),
                }
            })?;
            parsed.push((key, value));
        }
        let cluster_id_header = if cluster_id.is_empty() {
            None
        } else {
            Some(
                AsciiMetadataValue::try_from(cluster_id.as_str()).map_err(|e| {
                    CaError::InvalidHeader {
                        name: "clusterid".into(),
                        reason: e.to_string(),
                    }
                })?,
            )
        };
        Ok(CaClient {
            cluster_id_header,
            tls_hint,
            channel: endpoint.connect_lazy(),
            address: address.address.clone(),
            token_path,
            cluster_id,
            headers: parsed,
        })
    }

    /// The CA address this client talks to.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Sends `csr_pem` to the CA asking for a certificate valid for `ttl` and returns the PEM
    /// chain as the CA sent it (leaf first, root last; at least two elements).
    ///
    /// Each call counts as pilot-agent counts a CSR: [`NUM_OUTGOING_REQUESTS_METRIC`],
    /// [`OUTGOING_LATENCY_METRIC`] and, when it fails, [`NUM_FAILED_OUTGOING_REQUESTS_METRIC`],
    /// all labelled `request_type="csr"`.
    pub async fn create_certificate(
        &self,
        csr_pem: &str,
        ttl: Duration,
    ) -> Result<Vec<String>, CaError> {
        let labels = [("request_type", "csr")];
        metrics::counter!(NUM_OUTGOING_REQUESTS_METRIC, &labels).increment(1);
        let started = std::time::Instant::now();
        let result = self.send_csr(csr_pem, ttl).await;
        let millis = started.elapsed().as_secs_f64() * 1e3;
        metrics::counter!(OUTGOING_LATENCY_METRIC, &labels).increment(millis.round() as u64);
        if result.is_err() {
            metrics::counter!(NUM_FAILED_OUTGOING_REQUESTS_METRIC, &labels).increment(1);
        }
        result
    }

    async fn send_csr(&self, csr_pem: &str, ttl: Duration) -> Result<Vec<String>, CaError> {
        let message = IstioCertificateRequest {
            csr: csr_pem.to_owned(),
            validity_duration: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
            metadata: Some(Struct {
                fields: [(
                    "CertSigner".to_owned(),
                    Value {
                        kind: Some(Kind::StringValue(String::new())),
                    },
                )]
                .into_iter()
                .collect(),
            }),
        };
        let mut request = tonic::Request::new(message);
        self.fill_metadata(request.metadata_mut()).await?;

        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        grpc.ready().await.map_err(|e| CaError::Unavailable {
            address: self.address.clone(),
            message: e.to_string(),
        })?;
        let codec: ProstCodec<IstioCertificateRequest, IstioCertificateResponse> =
            ProstCodec::default();
        let response = grpc
            .unary(
                request,
                PathAndQuery::from_static(CREATE_CERTIFICATE_PATH),
                codec,
            )
            .await
            .map_err(|status| self.status_error(status))?;
        let chain = response.into_inner().cert_chain;
        if chain.len() < 2 {
            return Err(CaError::ShortChain(chain.len()));
        }
        Ok(chain)
    }

    async fn fill_metadata(&self, md: &mut MetadataMap) -> Result<(), CaError> {
        let token =
            crate::auth::bearer(self.token_path.as_deref()).map_err(|e| CaError::Token {
                path: e.path,
                source: e.source,
            })?;
        if let Some(value) = token {
            md.insert("authorization", value);
        }
        if let Some(v) = &self.cluster_id_header {
            md.insert("clusterid", v.clone());
        }
        for (k, v) in &self.headers {
            md.insert(k.clone(), v.clone());
        }
        Ok(())
    }

    fn status_error(&self, status: tonic::Status) -> CaError {
        let message = status_detail(&status);
        match status.code() {
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
                let token_hint = match &self.token_path {
                    Some(p) if !p.exists() => format!(
                        "the token file {} exists (it does not, so no token was sent; istiod requires a projected service-account token with audience istio-ca)",
                        p.display()
                    ),
                    Some(p) => format!(
                        "the token at {} is a current projected service-account token with audience istio-ca, and that the clusterid {:?} is known to istiod",
                        p.display(),
                        self.cluster_id
                    ),
                    None => "a token file is configured (no token was sent; istiod requires a projected service-account token at ./var/run/secrets/tokens/istio-token)".to_owned(),
                };
                CaError::Unauthenticated {
                    address: self.address.clone(),
                    message,
                    token_hint,
                }
            }
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => CaError::Unavailable {
                address: self.address.clone(),
                message: match &self.tls_hint {
                    Some(hint) if message.contains("certificate") => format!("{message} ({hint})"),
                    _ => message,
                },
            },
            code => CaError::Rpc {
                address: self.address.clone(),
                code,
                message,
            },
        }
    }
}

/// The status message followed by its error sources (transport and TLS failures keep their
/// reason there, e.g. "invalid peer certificate: UnknownIssuer").
fn status_detail(status: &tonic::Status) -> String {
    let mut parts: Vec<String> = Vec::new();
    if !status.message().is_empty() {
        parts.push(status.message().to_owned());
    }
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        let text = e.to_string();
        // Skip tonic's generic wrapper and repeats of what was already said.
        if text != "transport error" && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = e.source();
    }
    if parts.is_empty() {
        format!("{:?}", status.code())
    } else {
        parts.join(": ")
    }
}
