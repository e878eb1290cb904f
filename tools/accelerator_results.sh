#!/usr/bin/env bash
# Run every registered benchmark in full mode on this machine's accelerator and write each
# result as JSON (with its provenance: device, backend, host, versions, date, mode) into a folder.
#
#   tools/accelerator_results.sh OUTDIR [TIME_BUDGET_S]
#
# Benchmarks run one after another, cheapest first, each under a time limit, until the budget is
# spent; a benchmark that fails or times out is reported in OUTDIR/summary.txt and the rest go on.
# Copy the files into results/ and commit them (nothing in results/ is ever typed in by hand).
# Needs the checkout installed with the accelerator's extra: pip install -e ".[dev,cuda]" (GPU)
# or ".[dev,tpu]" (TPU VM). Writes nothing outside OUTDIR.
set -uo pipefail
out=${1:?usage: tools/accelerator_results.sh OUTDIR [TIME_BUDGET_S]}
budget=${2:-840}
py=${PYTHON:-python}
mkdir -p "$out"
# Cheapest first, so a short budget still covers most chapters.
names=(systolic abstractions storage train precision remat hardware data_parallel model_parallel
       monitor checkpoint pipeline hpo serve capstone)
known=$("$py" -m scalelab.bench --list | awk '{print $1}')
start=$(date +%s)
: > "$out/summary.txt"
"$py" -c "import jax; print('devices:', jax.devices())" >> "$out/summary.txt" 2>&1
for name in "${names[@]}"; do
  grep -qx "$name" <<<"$known" || { echo "$name: not registered here" >> "$out/summary.txt"; continue; }
  left=$(( budget - ($(date +%s) - start) ))
  if (( left < 20 )); then echo "$name: skipped (budget spent)" >> "$out/summary.txt"; continue; fi
  t0=$(date +%s)
  SCALELAB_QUICK=0 SCALELAB_PROGRESS=0 timeout -k 5 "$left" "$py" -m scalelab.bench "$name" --json \
    --out "$out/$name.json" > "$out/$name.log" 2>&1
  rc=$?
  echo "$name: rc=$rc in $(( $(date +%s) - t0 )) s" >> "$out/summary.txt"
done
# The same names results/ uses (NAME-DEVICE.json), ready to copy into the checkout.
"$py" - "$out" <<'PY'
import json, pathlib, sys
from scalelab import bench
out = pathlib.Path(sys.argv[1])
for path in sorted(out.glob("*.json")):
    print("->", bench.save(json.loads(path.read_text()), out / "results"))
PY
cat "$out/summary.txt"
