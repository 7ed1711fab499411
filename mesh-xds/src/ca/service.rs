//! Server plumbing for `istio.v1.auth.IstioCertificateService`, so any [`CertificateAuthority`]
//! (the testkit's [`crate::testkit::ca::TestCa`]) can be mounted on a
//! `tonic::transport::Server` with `.add_service(..)`, next to ADS.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::server::NamedService;
use tonic_prost::ProstCodec;

use crate::istio_proto::{
    CREATE_CERTIFICATE_PATH, IstioCertificateRequest, IstioCertificateResponse,
};

/// An implementation of istiod's CA: answers one `CreateCertificate` request.
pub trait CertificateAuthority: Send + Sync + 'static {
    /// Authenticates the caller from the request metadata and signs its CSR.
    fn create_certificate(
        &self,
        request: tonic::Request<IstioCertificateRequest>,
    ) -> Result<IstioCertificateResponse, tonic::Status>;
}

/// The gRPC service `istio.v1.auth.IstioCertificateService`, backed by a
/// [`CertificateAuthority`].
#[derive(Clone)]
pub struct IstioCertificateServiceServer {
    ca: Arc<dyn CertificateAuthority>,
}

impl std::fmt::Debug for IstioCertificateServiceServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IstioCertificateServiceServer")
            .finish_non_exhaustive()
    }
}

impl IstioCertificateServiceServer {
    /// Serves `ca`.
    pub fn new(ca: impl CertificateAuthority) -> Self {
        IstioCertificateServiceServer { ca: Arc::new(ca) }
    }
}

impl NamedService for IstioCertificateServiceServer {
    const NAME: &'static str = "istio.v1.auth.IstioCertificateService";
}

struct CreateCertificate(Arc<dyn CertificateAuthority>);

impl tonic::server::UnaryService<IstioCertificateRequest> for CreateCertificate {
    type Response = IstioCertificateResponse;
    type Future =
        std::future::Ready<Result<tonic::Response<IstioCertificateResponse>, tonic::Status>>;

    fn call(&mut self, request: tonic::Request<IstioCertificateRequest>) -> Self::Future {
        std::future::ready(self.0.create_certificate(request).map(tonic::Response::new))
    }
}

impl tower::Service<http::Request<Body>> for IstioCertificateServiceServer {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        if req.uri().path() == CREATE_CERTIFICATE_PATH {
            let ca = self.ca.clone();
            Box::pin(async move {
                let codec: ProstCodec<IstioCertificateResponse, IstioCertificateRequest> =
                    ProstCodec::default();
                let mut grpc = tonic::server::Grpc::new(codec);
                Ok(grpc.unary(CreateCertificate(ca), req).await)
            })
        } else {
            Box::pin(async move {
                Ok(
                    tonic::Status::unimplemented(format!("unknown method {}", req.uri().path()))
                        .into_http(),
                )
            })
        }
    }
}
