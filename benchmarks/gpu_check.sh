#!/usr/bin/env bash
# GPU check of the TVM backend's CUDA artifacts (see benchmarks/gpu_check.py for the cases).
#
# Two halves, so that the GPU machine needs no TVM compiler, no model wheels and no registry:
#
#   bash benchmarks/gpu_check.sh prepare DIR [ARCH]   # here (needs `make`'s .venv and nvcc; no GPU):
#       builds every case for ARCH (default sm_90) into DIR/cases, packs TVM's runtime (the
#       installed apache-tvm without its 260 MB compiler library) into DIR/tvm-runtime.tar.xz and
#       downloads cp312 wheels of apache-tvm-ffi and onnx-graphsurgeon into DIR/whl. ~60 MB.
#   bash benchmarks/gpu_check.sh run DIR               # on the GPU machine (python3 with numpy,
#       onnx, onnxruntime; nvidia-smi; a CUDA 13 libcudart): loads TVM's runtime only
#       (TVM_USE_RUNTIME_LIB=1), runs each artifact on the GPU against its ONNX Runtime reference,
#       times it with its inputs on the GPU, and prints one table (RESULT: PASS|FAIL).
#
# Or, on a GPU machine with the project's full .venv (TVM compiler included):
#   bash benchmarks/gpu_check.sh full [OUT_DIR]        # builds there, runs, adds the GEMV benchmark
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
step() { printf '\n[gpu_check %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
MODE="${1:-full}"

gpu_env() {
  step "GPU"
  nvidia-smi | head -n 12 || true
  CAP="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d ' .')"
  ARCH="sm_${CAP}"
  echo "compute capability: ${ARCH}"
  # TVM's CUDA runtime (libtvm_runtime_cuda.so) links libcudart.so.13: make a toolkit's copy findable
  if command -v nvcc >/dev/null; then
    CUDA_HOME="${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}"
    export LD_LIBRARY_PATH="${CUDA_HOME}/lib64:${CUDA_HOME}/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  fi
}

case "$MODE" in
  prepare)
    DIR="${2:?usage: gpu_check.sh prepare DIR [ARCH]}"
    ARCH="${3:-sm_90}"
    PY=.venv/bin/python
    rm -rf "${DIR}" && mkdir -p "${DIR}/whl"
    step "build the cases for ${ARCH}"
    "$PY" benchmarks/gpu_check.py --arch "${ARCH}" --prepare "${DIR}/cases"
    step "TVM runtime (no compiler library)"
    SITE="$("$PY" -c 'import os, tvm; print(os.path.dirname(os.path.dirname(tvm.__file__)))')"
    tar -C "${SITE}" -cJf "${DIR}/tvm-runtime.tar.xz" --exclude='__pycache__' --exclude='tvm/lib/libtvm_compiler.so' \
      --exclude='tvm/3rdparty' --exclude='tvm/include' --exclude='tvm/src' --exclude='tvm/relax/frontend/tflite' tvm
    step "wheels for the GPU machine's python3 (3.12)"
    TVM_FFI="$("$PY" -c 'from importlib.metadata import version; print(version("apache-tvm-ffi"))')"
    GS="$("$PY" -c 'from importlib.metadata import version; print(version("onnx-graphsurgeon"))')"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      -d "${DIR}/whl" "apache-tvm-ffi==${TVM_FFI}" "onnx-graphsurgeon==${GS}"
    du -sh "${DIR}"
    ;;
  run)
    DIR="${2:?usage: gpu_check.sh run DIR}"
    gpu_env
    step "Python environment (TVM runtime only)"
    PY="${PY:-python3}"
    rm -rf /tmp/qc-site && mkdir -p /tmp/qc-site
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/qc-site "${DIR}"/whl/*.whl
    tar -C /tmp/qc-site -xJf "${DIR}/tvm-runtime.tar.xz"
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/qc-site .
    export PYTHONPATH="/tmp/qc-site${PYTHONPATH:+:$PYTHONPATH}" TVM_USE_RUNTIME_LIB=1
    "$PY" -c 'import tvm, qcompile; print(f"tvm {tvm.__version__} (runtime only), qcompile {qcompile.__version__}; GPU visible to TVM:", tvm.cuda(0).exist)'
    step "load, check and time the CUDA artifacts"
    timeout 280 "$PY" benchmarks/gpu_check.py --prebuilt "${DIR}/cases"
    step "done"
    ;;
  full|*)
    [[ "$MODE" == full ]] && shift || true
    OUT_DIR="${1:-${OUT:-/tmp}/qcompile-gpu-check}"
    gpu_env
    command -v nvcc >/dev/null || { echo "gpu_check: nvcc not on PATH (TVM needs it to build CUDA kernels)" >&2; exit 2; }
    PY="${PY:-.venv/bin/python}"
    "$PY" -c 'import qcompile, tvm' || { echo "gpu_check: full mode needs the project's .venv (or PY=...)" >&2; exit 2; }
    rm -rf "${OUT_DIR}"
    step "build, run and time CUDA artifacts + GEMV kernels (output: ${OUT_DIR})"
    timeout 580 "$PY" benchmarks/gpu_check.py --arch "${ARCH}" --out "${OUT_DIR}" --gemv ${GPU_CHECK_ARGS:-}
    step "done"
    ;;
esac
