//! Shared helpers for the root crate's integration tests.

pub mod envoy;
pub mod mesh;
pub mod prometheus;
pub mod routes;
