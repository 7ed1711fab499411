//! The application processes of `cargo bench --bench sidecar_tax`: the bare app (`upstream`,
//! plain hyper) and the same app behind mesh (`mesh-server`, STRICT mTLS), chosen by
//! `MESH_BENCH_ROLE`. A binary of its own so that its size and resident memory are those of a
//! service built on mesh, without the benchmark's control plane, CA and load generator; the
//! bench builds it (`cargo build --profile bench --example bench_app`) and starts it.

#[path = "../benches/support/mod.rs"]
mod support;

fn main() {
    let Ok(role) = std::env::var("MESH_BENCH_ROLE") else {
        println!("bench_app: started by `cargo bench --bench sidecar_tax` (MESH_BENCH_ROLE unset)");
        return;
    };
    // One tokio worker, as each Envoy of the comparison runs one worker.
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(support::run_app_role(&role));
}
