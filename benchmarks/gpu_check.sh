#!/usr/bin/env bash
# One call on a lent GPU machine (the device tool): the trainer on CUDA (2D, paper-size 3D, and
# torchrun/NCCL), the synthetic 3D model of the uncertainty benchmark (issue 7), and SFPC against
# supervised-only on the organ task at a longer schedule than the CPU benchmark fits (issue 2).
# Expects, in the repository root: .whl/ (nibabel and pydicom wheels) and .gpudata/organs (a copy
# of ../shared/data/organs); writes logs and the split checkpoint under $OUT.
set -u
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .whl/*.whl || exit 1
mkdir -p /tmp/ns/sfpc && cp sfpc/*.py /tmp/ns/sfpc/
for d in model training server clients; do ln -sfn "$PWD/$d" "/tmp/ns/sfpc/$d"; done
export PYTHONPATH=/tmp/ns:/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.log"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" \
    | tee -a "$OUT/gpu.log"

# Issue 7: the synthetic 3D SFPC model (1000 iterations, 64^3, 4+4), evaluated on the CPU machine.
SYN=""
if [ -z "${SKIP_SYNTH:-}" ]; then
  timeout 480 python3 benchmarks/uncertainty_benchmark.py --tasks synth3d --train-only \
      --workers 4 --out /tmp/unc > "$OUT/synth3d_train.log" 2>&1 &
  SYN=$!
fi
# Issue 2: supervised vs SFPC, 3 seeds, 1500 iterations at the task's 128^2 / 3 mm.
# ORGAN_METHODS / ORGAN_JOBS pick the rows (the committed table took two calls: the default,
# then ORGAN_METHODS="seg+rec seg+flpm seg+rec+flpm seg+flpm+fpc urpc uamt mcnet" ORGAN_JOBS=11).
timeout "${ORGAN_TIMEOUT:-480}" python3 benchmarks/organ_ssl_benchmark.py --iterations 1500 \
    --methods ${ORGAN_METHODS:-supervised sfpc} --seeds 1337 7 11 --jobs "${ORGAN_JOBS:-6}" --threads 1 --selection even \
    --organ-share 0.75 --empty-slice-prob 0.25 --data .gpudata/organs --out /tmp/organ \
    --no-progress > "$OUT/organ_gpu.log" 2>&1 &
ORG=$!

# Issue 2: the trainer on one GPU: 2D ACDC-like, paper-size 3D (112^3, 4+4), torchrun + NCCL.
# From /tmp: in the repository root, ./sfpc (without its subpackages) would shadow /tmp/ns/sfpc.
(cd /tmp && {
  python3 -m sfpc.cli synth --kind acdc --out /tmp/acdc --n 12 --unlabelled 8 --seed 1
  python3 -m sfpc.cli synth --kind brats --out /tmp/brats --n 8 --unlabelled 8 --seed 1 \
      --shape 128 128 128
  for spec in "2d /tmp/acdc 2 [128,128]" "3d /tmp/brats 3 [112,112,112]"; do
    set -- $spec
    echo "== $1 sfpc on $(python3 -c 'import torch; print(torch.cuda.get_device_name())')"
    timeout 240 python3 -m sfpc.cli train --data "$2" --spatial-dims "$3" --patch-size "$4" \
        --method sfpc --iterations 60 --val-every 60 --labelled-fraction 0.5 --val-count 2 \
        --device cuda --num-workers 4 --progress false --out "/tmp/run_$1"
    tail -n 2 "/tmp/run_$1/history.jsonl"
  done
  echo "== torchrun --nproc_per_node 1 (DDP over NCCL), 3d"
  timeout 180 torchrun --standalone --nproc_per_node 1 -m sfpc.cli train --data /tmp/brats \
      --spatial-dims 3 --patch-size "[112,112,112]" --method sfpc --iterations 20 \
      --val-every 20 --labelled-fraction 0.5 --val-count 2 --device cuda --progress false \
      --out /tmp/run_ddp
  tail -n 1 /tmp/run_ddp/history.jsonl
} >> "$OUT/gpu.log" 2>&1)

wait $ORG; echo "organ exit $?" >> "$OUT/gpu.log"
cp /tmp/organ/results.json "$OUT/organ_gpu_results.json" 2>/dev/null
[ -n "$SYN" ] || { ls -la "$OUT"; exit 0; }
wait $SYN; echo "synth3d exit $?" >> "$OUT/gpu.log"
# The checkpoint without optimizer state, in parts under the 16 MB per-file limit.
python3 - <<'PY' >> "$OUT/gpu.log" 2>&1
import torch
ck = torch.load("/tmp/unc/synth3d/sfpc/best.pt", map_location="cpu", weights_only=False)
for key in ("optimizer", "rng", "teacher"):
    ck.pop(key, None)
torch.save(ck, "/tmp/synth3d_best.pt")
print("stripped checkpoint saved")
PY
split -b 15M -d /tmp/synth3d_best.pt "$OUT/synth3d_best.pt.part" 2>> "$OUT/gpu.log"
nvidia-smi --query-gpu=memory.used --format=csv >> "$OUT/gpu.log"
ls -la "$OUT"
