#!/usr/bin/env bash
# Bounded fuzzing of mesh-xds: decode + translate of every xDS resource type and config-dump
# JSON loading; and of mesh-core's TCP metadata exchange frame reader. No crash allowed: exits
# non-zero on the first one.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]     (default 60)
#
# With cargo-fuzz (`cargo install cargo-fuzz`), runs each libFuzzer target in fuzz/ for
# SECONDS_PER_TARGET, seeded from the real istiod dumps and the testkit's resources
# (mesh-xds/examples/fuzz_seeds.rs). cargo-fuzz wants nightly: a nightly toolchain is used when
# installed, otherwise the stable one with RUSTC_BOOTSTRAP=1 and no sanitizer (mesh forbids
# unsafe code; libFuzzer's coverage guidance and crash detection are what matter). Without
# cargo-fuzz, runs the stable mutation runner (mesh-xds/tests/xds_fuzz.rs) for the same time.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
targets=(decode_cluster decode_endpoint decode_listener decode_route decode_name_table config_dump_json peer_exchange_frame)

if cargo fuzz --help >/dev/null 2>&1; then
  if cargo +nightly --version >/dev/null 2>&1; then
    fuzz=(cargo +nightly fuzz)
    sanitizer=address
  else
    export RUSTC_BOOTSTRAP=1
    fuzz=(cargo fuzz)
    sanitizer=none
  fi
  echo "fuzz.sh: libFuzzer targets, ${secs}s each (sanitizer: $sanitizer)"
  cargo run -q -p mesh-xds --features testkit --example fuzz_seeds -- fuzz/corpus testdata/istio/*.json
  for t in "${targets[@]}"; do
    echo "== $t"
    log="fuzz/artifacts/$t.log"
    mkdir -p fuzz/artifacts
    if ! (cd fuzz && "${fuzz[@]}" run -s "$sanitizer" "$t" -- -max_total_time="$secs" -rss_limit_mb=4096 -max_len=262144) >"$log" 2>&1; then
      tail -40 "$log" >&2
      echo "fuzz.sh: $t failed (full log: $log)" >&2
      exit 1
    fi
    grep -E '^(INFO: seed corpus|#[0-9]+ +DONE)|^Done [0-9]+ runs' "$log" || true
  done
else
  echo "fuzz.sh: cargo-fuzz missing; stable mutation runner, ${secs}s per test"
  MESH_FUZZ_SECS="$secs" cargo test -p mesh-xds --release --test integration -- xds_fuzz --nocapture --test-threads 1
fi
echo "fuzz.sh: no crash"
