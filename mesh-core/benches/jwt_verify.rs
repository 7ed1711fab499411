//! Per-request cost of RequestAuthentication: the whole `jwt_authn` filter as istiod renders
//! it (`requires_any {provider, allow_missing}`, payload into metadata, token header removed)
//! on a request carrying one RS256 (2048-bit) or one ES256 token, and on a request without a
//! token (what unauthenticated traffic pays).

#![allow(missing_docs)] // criterion_group! generates undocumented items

use std::sync::Arc;

use criterion::{Criterion, black_box, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Method};
use mesh_core::authz::jwt::{JwksSource, JwtAuthn, JwtProvider, JwtRequest, JwtSigner, RemoteKeys};

const RSA_PEM: &str = include_str!("../testdata/jwt-rsa2048.pk8.pem");
const ISS: &str = "https://issuer.example";

fn filter(jwks: &str) -> JwtAuthn {
    let mut p = JwtProvider::new(
        "origins-0",
        ISS,
        JwksSource::Local(Some(Arc::new(
            mesh_core::authz::jwt::Jwks::parse(jwks).expect("jwks"),
        ))),
    );
    p.payload_in_metadata = Some("payload".into());
    p.space_delimited_claims = vec!["permission".into(), "scope".into()];
    JwtAuthn::istio_single(p)
}

fn bench(c: &mut Criterion) {
    let rsa = JwtSigner::rsa_from_pkcs8_pem(RSA_PEM, "rsa", "RS256").expect("rsa key");
    let ec = JwtSigner::ec_generate("ec", "ES256").expect("ec key");
    let f = filter(&JwtSigner::jwks(&[&rsa, &ec]));
    let claims = serde_json::json!({
        "iss": ISS, "sub": "alice", "aud": "bookinfo", "exp": 4_000_000_000u64,
        "scope": "read write", "groups": ["a", "b"]
    });
    let now = 1_700_000_000;
    let method = Method::GET;
    let mut group = c.benchmark_group("jwt_authn");
    for (name, signer) in [("rs256", &rsa), ("es256", &ec)] {
        let auth =
            HeaderValue::from_str(&format!("Bearer {}", signer.sign(&claims))).expect("header");
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut headers = HeaderMap::new();
                headers.insert(http::header::AUTHORIZATION, auth.clone());
                let mut req = JwtRequest {
                    headers: &mut headers,
                    path: "/api/books?page=1",
                    method: &method,
                    now,
                };
                let v = f.authenticate(&mut req, &|_| RemoteKeys::Unavailable);
                assert!(v.is_ok());
                black_box(v)
            })
        });
    }
    group.bench_function("no_token", |b| {
        b.iter(|| {
            let mut headers = HeaderMap::new();
            let mut req = JwtRequest {
                headers: &mut headers,
                path: "/api/books?page=1",
                method: &method,
                now,
            };
            black_box(f.authenticate(&mut req, &|_| RemoteKeys::Unavailable))
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
