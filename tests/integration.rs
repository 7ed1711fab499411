//! The root crate's integration tests, one test binary (one link, one file on disk) for all of
//! them: each module is one area. Tests that need the process to themselves stay separate
//! binaries (Cargo.toml): `otel_trace` and `otel_envoy` install a process-wide tracing
//! subscriber, `telemetry_prometheus` compares every family of the process-wide metrics recorder
//! with a real Envoy's.

mod support;

mod ads_differential;
mod authz_adversarial;
mod authz_certificate_files;
mod authz_envoy;
mod authz_inbound;
mod dns_clusters;
mod envoy_harness;
mod envoy_interop;
mod ext_authz;
mod fault_oracle;
mod grpc_local_replies;
mod hash_retry_oracle;
mod jwt_inbound;
mod mesh_certificates;
mod mesh_drain;
mod mesh_env;
mod mesh_pod_ports;
mod mesh_xds;
#[cfg(feature = "testkit")]
mod meshctl;
mod outlier_oracle;
mod routing_oracle;
mod telemetry_tcp;
