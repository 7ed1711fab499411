//! mesh-tower's integration tests, one test binary (one link, one file on disk) for all of
//! them: each module is one area. `telemetry_envoy_families` and `telemetry_grpc_messages`
//! compare whole families of the process-wide metrics recorder, so each has its own binary
//! (Cargo.toml).

mod support;
mod support_outbound;

mod access_log;
mod inbound_serve;
mod inbound_tcp_metrics;
mod inbound_telemetry;
mod outbound_cluster_stats;
mod outbound_mtls;
mod outbound_plaintext;
mod outbound_pool;
mod outbound_resilience;
mod outbound_retries;
mod outbound_rewrites;
mod outbound_trace_headers;
mod status_app;
mod status_listeners;
mod telemetry_prometheus_parser;
mod tls_handshake;
mod tls_rotation;
