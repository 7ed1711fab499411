#!/usr/bin/env bash
# Plots latency percentiles vs connections (direct / mesh / mesh-h2 / Envoy pair) from the CSV
# that `cargo bench --bench sidecar_tax` writes. Usage: scripts/plot-sidecar-tax.sh [CSV] [PNG]
# Installs matplotlib (PyPI) into .envoy/plot-venv when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
csv=${1:-target/bench-results/sidecar_tax.csv}
png=${2:-docs/bench/sidecar_tax_latency.png}
venv=.envoy/plot-venv
if [[ ! -x $venv/bin/python ]] || ! $venv/bin/python -c 'import matplotlib' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet 'matplotlib>=3.8'
fi
mkdir -p "$(dirname "$png")"
"$venv/bin/python" - "$csv" "$png" <<'PY'
import csv, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

src, out = sys.argv[1], sys.argv[2]
rows = [r for r in csv.DictReader(open(src)) if r["scenario"].startswith("c")]
conns = sorted({int(r["scenario"][1:]) for r in rows})
modes = [m for m in ["direct", "mesh", "mesh-h2", "envoy"] if any(r["mode"] == m for r in rows)]
colors = {"direct": "#444444", "mesh": "#1f77b4", "mesh-h2": "#2ca02c", "envoy": "#d62728"}
fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), sharey=True)
for ax, pct in zip(axes, ["p50_us", "p90_us", "p99_us"]):
    for m in modes:
        pts = sorted((int(r["scenario"][1:]), float(r[pct])) for r in rows if r["mode"] == m)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m, color=colors.get(m))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(conns)
    ax.set_xticklabels([str(c) for c in conns])
    ax.set_xlabel("connections (closed loop)")
    ax.set_title(pct.replace("_us", "") + " latency")
    ax.grid(True, which="both", alpha=0.3)
axes[0].set_ylabel("µs (log scale)")
axes[0].legend()
fig.suptitle("sidecar tax: direct vs mesh (mTLS, h1 / h2) vs Envoy 1.40 sidecar pair")
fig.tight_layout()
fig.savefig(out, dpi=110)
print(f"wrote {out}")
PY
