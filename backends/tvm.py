"""Apache TVM backend: the IR compiled by Relax into a library run by the Relax VM.

Pipeline (:func:`emit`): the canonical IR (static input shapes, constants folded) is
imported into Relax with the quantized ops lowered to our decode-fused kernels
(:mod:`qcompile.backends.tvm_import`); Relax legalizes and fuses the standard ops;
every PrimFunc is then scheduled (CPU: :mod:`qcompile.backends.tvm_schedule`, GPU:
dlight's rules) — nothing ships unscheduled — and built for the target.

Targets:

* ``cpu``: LLVM for this host's CPU (``-mcpu`` of the machine that compiles).
* ``arm64``: LLVM cross-compiled for ``aarch64-linux-gnu``; linked into a shared
  library with ``aarch64-linux-gnu-gcc`` when that cross compiler is installed,
  else written as an object archive (``model.tar``) to link on the device.
* ``cuda``: one library per compute capability in ``arch`` (``sm_80,sm_90``), built
  with nvcc (no GPU needed); the loader picks the one matching the GPU.

Artifact folder: ``model.so`` (or ``model.<arch>.so`` / ``model.tar``), ``params.npz``
(the packed weights, scales and zero points in the order ``main`` takes them after the
model inputs) and ``manifest.json``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from qcompile.errors import BackendError, CalibrationError, ModelLoadError, UsageError
from qcompile.ir.model import Model

log = logging.getLogger(__name__)

TARGETS = ("cpu", "arm64", "cuda")
DEFAULT_CUDA_ARCH = "sm_80,sm_90"
PARAMS_FILE = "params.npz"
DLPACK_CPU = 1  # kDLCPU
ALIGNMENT = 64  # what TVM's kernels assume of their buffers (others are copied into aligned ones)
ARM64_TRIPLE = "aarch64-linux-gnu"
ARM64_CC = "aarch64-linux-gnu-gcc"


def available() -> bool:
    try:
        import tvm  # noqa: F401
    except ImportError:
        return False
    return True


def parse_arch(arch: str | None) -> list[str]:
    """``"sm_80,sm_90"`` -> ``["sm_80", "sm_90"]`` (checked)."""
    names = [a.strip() for a in (arch or DEFAULT_CUDA_ARCH).split(",") if a.strip()]
    bad = [a for a in names if not (a.startswith("sm_") and a[3:].isdigit())]
    if not names or bad:
        raise UsageError(f"--arch {arch!r}: expected compute capabilities like sm_80,sm_90")
    return names


def _llvm_target(target: str) -> Any:
    import tvm
    from tvm.target import codegen

    if target == "arm64":
        return tvm.target.Target({"kind": "llvm", "mtriple": ARM64_TRIPLE, "mattr": ["+neon"]})
    return tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(),
                              "num-cores": os.cpu_count() or 1})


def _cuda_target(arch: str) -> Any:
    import tvm

    return tvm.target.Target({"kind": "cuda", "arch": arch, "host": {"kind": "llvm"}})


def _lower(module, target, cpu: bool):
    """Legalize, fuse and schedule: what runs before the VM build."""
    import tvm
    from tvm import relax
    from tvm.s_tir import dlight as dl

    from . import tvm_schedule

    rules = tvm_schedule.cpu_rules() if cpu else tvm_schedule.gpu_rules()
    passes = [
        relax.backend.DispatchSampling(),
        relax.backend.DispatchSortScan(),
        relax.transform.DecomposeOpsForInference(),
        relax.transform.FastMathTransform(),  # vectorizable erf/exp/tanh (GELU, softmax)
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        relax.transform.DeadCodeElimination(),
        dl.ApplyDefaultSchedule(*rules),
    ]
    with target:
        return tvm.transform.Sequential(passes)(module)


def _unscheduled(module) -> list[str]:
    import tvm

    return sorted(gv.name_hint for gv, func in module.functions_items()
                  if isinstance(func, tvm.tirx.PrimFunc) and not func.attrs.get("tirx.is_scheduled", False))


def _build(module, target, cpu: bool):
    import tvm
    from tvm import relax

    lowered = _lower(module, target, cpu)
    if cpu:
        left = _unscheduled(lowered)
        if left:
            raise BackendError(f"backend tvm: no CPU schedule for {', '.join(left[:5])} (refusing to ship "
                               "unscheduled kernels)")
    finish = [
        relax.transform.RewriteDataflowReshape(),
        relax.transform.ToNonDataflow(),
        relax.transform.RemovePurityChecking(),
        relax.transform.CallTIRRewrite(),
        relax.transform.StaticPlanBlockMemory(),
        relax.transform.LowerAllocTensor(),
        relax.transform.KillAfterLastUse(),
        relax.transform.LowerRuntimeBuiltin(),
        relax.transform.ComputePrimValue(),
        relax.transform.VMShapeLower(),
        relax.transform.AttachGlobalSymbol(),
    ]
    return tvm.compile(lowered, target=target, relax_pipeline=tvm.transform.Sequential(finish))


def has_feature(feature: str, target) -> bool:
    from tvm.target import codegen

    try:
        return bool(codegen.target_has_features(feature, target))
    except Exception:  # a target LLVM cannot query (cross targets)
        return False


def has_vnni(target) -> bool:
    return has_feature("avx512vnni", target)


def emit(model: Model, folder: Path, *, target: str = "cpu", arch: str | None = None,
         input_shapes: dict[str, tuple[int, ...]] | None = None, accuracy_level: int = 4) -> dict:
    """Compile ``model`` into ``folder``; return the manifest's backend section.

    ``accuracy_level`` 4 (as for ONNX Runtime's ``MatMulNBits``) lets ``QMatMul`` layers
    quantize their activations to int8 and use the AVX-512 VNNI kernel where the target
    CPU has it; 0-3 keep every kernel in float32."""
    if target not in TARGETS:
        raise BackendError(f"backend tvm: unknown target {target!r} (targets: {', '.join(TARGETS)})")
    if not available():
        raise BackendError("backend tvm: Apache TVM is not installed (pip install 'apache-tvm>=0.27,<0.28')")
    from tvm.relax.frontend import detach_params

    from . import tvm_import

    cpu = target in ("cpu", "arm64")
    archs = parse_arch(arch) if target == "cuda" else []
    int8_activations = target == "cpu" and accuracy_level == 4 and has_vnni(_llvm_target("cpu"))
    with contextlib.redirect_stdout(io.StringIO()):  # the importer prints on failures; we report instead
        imported = tvm_import.to_relax(model, cpu=cpu, input_shapes=input_shapes, int8_activations=int8_activations,
                                       gather=target == "cpu" and has_feature("avx512f", _llvm_target("cpu")))
    module, _ = detach_params(imported.module)
    files: list[str] = []
    libraries: dict[str, str] = {}
    try:
        if target == "cuda":
            for name in archs:
                executable = _build(module, _cuda_target(name), cpu=False)
                libraries[name] = f"model.{name}.so"
                executable.export_library(str(folder / libraries[name]))
        else:
            executable = _build(module, _llvm_target(target), cpu=True)
            libraries["cpu"] = _export_cpu(executable, folder, target)
    except BackendError:
        raise
    except Exception as exc:
        log.debug("TVM build failed", exc_info=True)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BackendError(f"backend tvm: building for {target} failed ({first})") from None
    files += list(libraries.values())
    np.savez(folder / PARAMS_FILE, **imported.params)
    files.append(PARAMS_FILE)
    import tvm

    return {
        "backend": "tvm",
        "target": target,
        "libraries": libraries,
        "params_file": PARAMS_FILE,
        "params": list(imported.params),
        "inputs": imported.input_names,
        "input_shapes": imported.input_shapes,
        "outputs": imported.output_names,
        "files": files,
        "kernels": imported.kernels,
        "merged": [],
        "tvm_version": tvm.__version__,
        "accuracy_level": accuracy_level,
        "int8_activations": int8_activations,
        "llvm_target": str(_llvm_target(target)) if cpu else None,
        "cuda_arch": archs,
        "linked": not libraries.get("cpu", "").endswith(".tar"),
    }


def _export_cpu(executable, folder: Path, target: str) -> str:
    if target != "arm64":
        executable.export_library(str(folder / "model.so"))
        return "model.so"
    compiler = shutil.which(ARM64_CC)
    if compiler is None:
        log.warning("%s not found: writing model.tar (objects) to link on the device", ARM64_CC)
        executable.export_library(str(folder / "model.tar"))
        return "model.tar"
    from tvm.support import cc

    executable.export_library(str(folder / "model.so"), fcompile=cc.cross_compiler(compiler))
    return "model.so"


# ----------------------------------------------------------------------------------
# Running an artifact
# ----------------------------------------------------------------------------------


def _load_library(path: Path) -> Any:
    """``tvm.runtime.load_module`` of a private copy of ``path``: the dynamic loader hands back a
    library already loaded from the same path, so an artifact rebuilt in the same folder would
    otherwise run the previous build's code. The copy is removed once loaded (the mapping stays)."""
    import tvm

    with tempfile.TemporaryDirectory(prefix="qcompile-tvm-") as private:
        copy = Path(private) / path.name
        shutil.copyfile(path, copy)
        return tvm.runtime.load_module(str(copy))


def fix_thread_count() -> None:
    """Give TVM's thread pool its size through ``TVM_NUM_THREADS`` unless the user did (or set
    ``OMP_NUM_THREADS``, which TVM reads too). Without either, TVM asks the C library for the
    number of CPUs at every parallel launch, which reads ``/sys/devices/system/cpu/online``:
    three system calls per kernel, half of a SmolLM2 decode step's time (12.7 -> 5.7 ms)."""
    if "TVM_NUM_THREADS" not in os.environ and "OMP_NUM_THREADS" not in os.environ:
        os.environ["TVM_NUM_THREADS"] = str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                            else os.cpu_count() or 1)


class TvmArtifact:
    """A TVM artifact folder loaded into a Relax VM (``run(feeds)`` like the ORT one)."""

    def __init__(self, folder: Path, manifest: dict[str, Any], device: str = "auto") -> None:
        import tvm
        from tvm.runtime.vm import VirtualMachine  # not tvm.relax: that needs the compiler library

        self.folder = folder
        self.manifest = manifest
        backend = manifest["backend"]
        self.backend = backend
        self._device, library = self._pick_library(backend, device)
        fix_thread_count()
        try:
            module = _load_library(folder / library)
            self._vm = VirtualMachine(module, self._device)
            params = np.load(folder / backend["params_file"])
            self._params = [tvm.runtime.tensor(params[name], self._device) for name in backend["params"]]
            self._cpu = self._device.dlpack_device_type() == DLPACK_CPU
            self._param_pointers = {np.from_dlpack(p).ctypes.data for p in self._params} if self._cpu else set()
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BackendError(f"{folder}: the TVM runtime cannot load it ({first})") from None
        self._main = self._vm["main"]
        self._dtypes = {i["name"]: i["dtype"] for i in manifest.get("inputs", [])}

    @staticmethod
    def _pick_library(backend: dict, device: str):
        import tvm

        libraries = backend["libraries"]
        if backend["target"] == "cuda":
            gpu = tvm.cuda(0)
            if device == "cpu" or not gpu.exist:
                raise BackendError("this artifact was compiled for CUDA and no CUDA GPU is present here")
            major, minor = str(gpu.compute_version).split(".")
            wanted = f"sm_{major}{minor}"
            if wanted in libraries:
                return gpu, libraries[wanted]
            older = sorted((a for a in libraries if int(a[3:]) <= int(major + minor)), key=lambda a: int(a[3:]))
            if not older:
                raise BackendError(f"no library for {wanted} in this artifact (has {', '.join(libraries)})")
            return gpu, libraries[older[-1]]
        if backend["target"] == "arm64" and os.uname().machine not in ("aarch64", "arm64"):
            raise BackendError("this artifact was compiled for arm64 (aarch64); run it on an aarch64 machine")
        return tvm.cpu(0), libraries["cpu"]

    @property
    def input_names(self) -> list[str]:
        return list(self.backend["inputs"])

    @property
    def output_names(self) -> list[str]:
        return list(self.backend["outputs"])

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import tvm
        import tvm_ffi

        missing = sorted(set(self.input_names) - set(feeds))
        unknown = sorted(set(feeds) - set(self.input_names))
        if missing or unknown:
            raise CalibrationError(
                f"inputs do not match the artifact (missing: {', '.join(missing) or '-'}; "
                f"unknown: {', '.join(unknown) or '-'}; expected: {', '.join(self.input_names)})")
        cpu = self._cpu
        args, arrays = [], []
        for name in self.input_names:
            value = np.ascontiguousarray(np.asarray(feeds[name]).astype(self._dtypes.get(name, feeds[name].dtype),
                                                                         copy=False))
            arrays.append(value)
            if cpu and value.ctypes.data % ALIGNMENT == 0:  # the kernels read the caller's array in place
                args.append(tvm_ffi.from_dlpack(value))
            else:
                args.append(tvm.runtime.tensor(value, self._device))
        try:
            result = self._main(*args, *self._params)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CalibrationError(f"running {self.folder}: {first}") from None
        values = [result] if len(self.output_names) == 1 else list(result)
        if not cpu:
            return {name: value.numpy() for name, value in zip(self.output_names, values, strict=True)}
        # outputs are handed over without a copy (a decode step returns megabytes of KV cache),
        # except one that is a weight or an input itself
        taken = self._param_pointers | {a.ctypes.data for a in arrays}
        outputs = {}
        for name, value in zip(self.output_names, values, strict=True):
            array = np.from_dlpack(value)
            outputs[name] = array.copy() if array.ctypes.data in taken else array
        return outputs


def load(folder: Path, manifest: dict[str, Any], device: str = "auto") -> TvmArtifact:
    if not available():
        raise ModelLoadError(f"{folder}: a TVM artifact needs Apache TVM (pip install 'apache-tvm>=0.27,<0.28')")
    return TvmArtifact(folder, manifest, device)
