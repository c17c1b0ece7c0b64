"""Exception types: one per failure kind.

The CLI turns every ``QCompileError`` into one line on stderr and a non-zero exit
code (``exit_code``): 2 for bad usage or bad input, 1 when compilation itself failed.
"""

from __future__ import annotations


class QCompileError(Exception):
    """Base class of every error qcompile reports to its users."""

    exit_code = 1


class UsageError(QCompileError):
    """A bad command line or API argument: unknown pass, option out of range, ..."""

    exit_code = 2


class ModelLoadError(QCompileError):
    """The model file is missing, truncated, not ONNX, or otherwise unreadable."""

    exit_code = 2


class UnsupportedModelError(QCompileError):
    """The model is valid ONNX but uses something qcompile cannot handle."""

    exit_code = 2


class CalibrationError(QCompileError):
    """Calibration data is missing, unreadable, or does not match the model's inputs."""

    exit_code = 2


class FrontendError(QCompileError):
    """Exporting a PyTorch module or Hugging Face folder to ONNX failed."""

    exit_code = 2


class VerificationError(QCompileError):
    """A pass left the model structurally invalid or changed an exact model's outputs."""

    exit_code = 1


class BackendError(QCompileError):
    """A backend could not emit or run the artifact."""

    exit_code = 1


class ExecutionError(QCompileError):
    """ONNX Runtime failed running the model on the given inputs."""

    exit_code = 2
