#!/usr/bin/env bash
# Bounded fuzzing of mesh-xds: decode + translate of every xDS resource type and config-dump
# JSON loading. No crash allowed: exits non-zero on the first one.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]     (default 60)
#
# With a nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`), runs each libFuzzer
# target in fuzz/ for SECONDS_PER_TARGET, seeded from the real istiod dumps. Without them, runs
# the stable mutation runner (mesh-xds/tests/xds_fuzz.rs) for the same time per test.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
targets=(decode_cluster decode_endpoint decode_listener decode_route decode_name_table config_dump_json)

if cargo +nightly --version >/dev/null 2>&1 && cargo +nightly fuzz --help >/dev/null 2>&1; then
  echo "fuzz.sh: libFuzzer targets, ${secs}s each"
  # Seed the dump target with the real dumps (JSON only).
  mkdir -p fuzz/corpus/config_dump_json
  for f in testdata/istio/istioctl-*.json; do
    [ -e "$f" ] && cp "$f" fuzz/corpus/config_dump_json/ || true
  done
  for t in "${targets[@]}"; do
    echo "== $t"
    (cd fuzz && cargo +nightly fuzz run "$t" -- -max_total_time="$secs" -rss_limit_mb=4096 -max_len=262144)
  done
else
  echo "fuzz.sh: nightly or cargo-fuzz missing; stable mutation runner, ${secs}s per test"
  MESH_FUZZ_SECS="$secs" cargo test -p mesh-xds --release --test xds_fuzz -- --nocapture --test-threads 1
fi
echo "fuzz.sh: no crash"
