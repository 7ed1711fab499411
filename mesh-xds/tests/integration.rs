//! mesh-xds' integration tests, one test binary (one link, one file on disk) for all of them:
//! each module is one area. `xds_metrics` stays a separate binary because it installs the
//! process-wide `metrics` recorder.

mod ca_support;
mod secrets_support;

mod ads_client;
mod ads_flood;
mod ads_gaps;
mod ads_nonces;
mod ads_robustness;
mod ads_tls;
mod ads_translate_dump;
mod ads_warming;
mod ca_client;
mod ca_secret_manager;
mod rbac_configdump;
mod secrets_files;
mod secrets_sds;
mod xds_config_dumps;
mod xds_fuzz;
