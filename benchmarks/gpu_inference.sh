#!/usr/bin/env bash
# Issue 13's GPU table in one call on a lent GPU machine (the device tool): the synthetic
# 512^2 x 400 CT of benchmarks/engine_memory.py, plain and uncertainty, end to end through the
# engine with ONNX Runtime on CUDA and on TensorRT FP16 (each when the machine's onnxruntime
# offers it), and MONAI's SliceInferer + eager PyTorch on the same GPU; the machine's CPU last,
# for scale. Run from the repository root:
#
#   OUT=$OUT bash benchmarks/gpu_inference.sh
#
# Wheels the machine lacks (isal, nibabel, monai, pydicom, ...; onnxruntime-gpu if it fits the
# transfer) go in .whl/ at the repository root and are installed to /tmp/site first. Writes
# gpu.log, one log and one JSON per configuration under $OUT; never fails half-way: a
# configuration that cannot run says why in its log.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_inference}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
      .whl/*.whl || echo "wheel install failed" | tee -a "$OUT/gpu.log"
fi
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.log"
python3 - <<'PY' 2>&1 | tee -a "$OUT/gpu.log"
import onnxruntime, torch
print("torch", torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available()
      else "no CUDA")
print("onnxruntime", onnxruntime.__version__, onnxruntime.get_available_providers())
PY
PROVIDERS=$(python3 -c "import onnxruntime as o; print(' '.join(o.get_available_providers()))" \
            2>/dev/null)
COMMON=(--input-mode spacing --spacing 1.5 1.5 --threads 4 ${SFPC_GPU_BENCH_ARGS:-})

run() {
  local name=$1
  shift
  timeout 480 python3 benchmarks/engine_memory.py "${COMMON[@]}" "$@" \
      --json "$OUT/$name.json" > "$OUT/$name.log" 2>&1
  echo "== $name (exit $?)" | tee -a "$OUT/gpu.log"
  tail -4 "$OUT/$name.log" | tee -a "$OUT/gpu.log"
}

case " $PROVIDERS " in
  *" CUDAExecutionProvider "*)
    run ort_cuda --modes plain uncertainty --warmup \
        --providers CUDAExecutionProvider,CPUExecutionProvider ;;
  *) echo "== ort_cuda: not run, this onnxruntime offers: $PROVIDERS" | tee -a "$OUT/gpu.log" ;;
esac
case " $PROVIDERS " in
  *" TensorrtExecutionProvider "*)
    run ort_tensorrt_fp16 --modes plain uncertainty --warmup --trt-fp16 --trt-cache /tmp/sfpc-trt \
        --providers TensorrtExecutionProvider,CUDAExecutionProvider,CPUExecutionProvider ;;
  *) echo "== ort_tensorrt_fp16: not run, this onnxruntime offers: $PROVIDERS" \
       | tee -a "$OUT/gpu.log" ;;
esac
run monai_cuda --modes monai --torch-device cuda
run cpu_reference --modes plain uncertainty monai
