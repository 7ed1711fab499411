//! Shared helpers for mesh-tower's integration tests.
#![allow(dead_code)]

pub mod certs;
pub mod inbound;
