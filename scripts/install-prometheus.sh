#!/usr/bin/env bash
# install-prometheus.sh — install the Prometheus tooling mesh's telemetry tests parse and
# scrape with, and print where it is.
#
# * Debian's `prometheus` package: the `promtool` and `prometheus` binaries (apt-get, needs
#   root; skipped when both are already on PATH).
# * Python `prometheus_client` (its text parser) in a virtualenv at <repo>/.envoy/prom-venv
#   (git-ignored; skipped when it already imports there).
#
# On success prints three lines on stdout: `promtool=<path>`, `prometheus=<path>`,
# `python=<venv python>`. Idempotent; progress and errors go to stderr.
#
# Env: PROM_VENV (default <repo>/.envoy/prom-venv), PYTHON (default python3).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${PROM_VENV:-$REPO/.envoy/prom-venv}
PYTHON=${PYTHON:-python3}

log() { printf 'install-prometheus: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

mkdir -p "$(dirname "$VENV")"
if command -v flock >/dev/null; then
  exec 9>"$(dirname "$VENV")/.install-prometheus.lock"
  flock 9
fi

if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  command -v apt-get >/dev/null || die "promtool/prometheus missing and apt-get is not available"
  SUDO=()
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || die "promtool/prometheus missing and not root (no sudo) to apt-get install prometheus"
    SUDO=(sudo -n)
  fi
  log "apt-get install prometheus"
  export DEBIAN_FRONTEND=noninteractive
  "${SUDO[@]}" apt-get install -y -q --no-install-recommends prometheus >&2 \
    || { "${SUDO[@]}" apt-get update -q >&2 && "${SUDO[@]}" apt-get install -y -q --no-install-recommends prometheus >&2; } \
    || die "apt-get install prometheus failed"
  # The package starts a system service on some systems; the tests run their own server.
  if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
    "${SUDO[@]}" systemctl stop prometheus >&2 || true
  fi
fi
PROMTOOL=$(command -v promtool) || die "promtool not on PATH after installing prometheus"
PROMETHEUS=$(command -v prometheus) || die "prometheus not on PATH after installing prometheus"

if ! "$VENV/bin/python" -c 'import prometheus_client.parser' 2>/dev/null; then
  command -v "$PYTHON" >/dev/null || die "$PYTHON not found: needed for prometheus_client"
  if [[ ! -x "$VENV/bin/pip" ]]; then
    log "creating virtualenv $VENV"
    "$PYTHON" -m venv "$VENV" >&2 || die "could not create a virtualenv at $VENV (is python3-venv installed?)"
  fi
  log "installing prometheus_client into $VENV"
  "$VENV/bin/pip" install --disable-pip-version-check -q prometheus_client >&2 \
    || die "pip install prometheus_client failed (is PyPI reachable?)"
  "$VENV/bin/python" -c 'import prometheus_client.parser' || die "prometheus_client does not import"
fi

printf 'promtool=%s\nprometheus=%s\npython=%s\n' "$PROMTOOL" "$PROMETHEUS" "$VENV/bin/python"
