"""The command line, run as a user would: exit codes, one-line errors, nothing left behind."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import mlp_feeds


def qcompile(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "qcompile", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_compile_prints_summary_and_writes_artifact(tmp_path, mlp_path):
    before = hashlib.sha256(mlp_path.read_bytes()).hexdigest()
    done = qcompile(mlp_path, "--passes", "quant(bits=4,min_size=0)", "-o", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert "artifact on disk" in done.stdout and "quant(min_size=0)" in done.stdout
    assert (tmp_path / "out" / "manifest.json").exists()
    assert hashlib.sha256(mlp_path.read_bytes()).hexdigest() == before


def test_default_output_is_next_to_the_input(mlp_path):
    done = qcompile(mlp_path, "--quiet", "--passes", "quant(min_size=0)")
    assert done.returncode == 0 and done.stdout == "" and done.stderr == ""
    assert (mlp_path.parent / "mlp.qcompile" / "model.onnx").exists()


def test_json_output_and_run_command(tmp_path, mlp_path):
    done = qcompile(mlp_path, "--json", "--passes", "quant(bits=8,min_size=0)", "-o", tmp_path / "out",
                    "--calib", "random:4")
    report = json.loads(done.stdout)
    assert report["manifest"]["layers"]["fc1"]["bits"] == 8
    np.savez(tmp_path / "x.npz", **mlp_feeds())
    run = qcompile("run", tmp_path / "out", "--inputs", tmp_path / "x.npz", "--output", tmp_path / "y.npz", "--json")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["y"]["shape"] == [12, 48]
    assert np.load(tmp_path / "y.npz")["y"].shape == (12, 48)


def test_passes_listing():
    done = qcompile("passes", "--json")
    listing = {p["name"]: p for p in json.loads(done.stdout)}
    assert {o["name"] for o in listing["quant"]["options"]} >= {"bits", "group_size", "sym", "method", "skip"}
    assert "group_size" in qcompile("passes").stdout


def _bad_inputs(tmp_path, mlp_path):
    (tmp_path / "random.onnx").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "truncated.onnx").write_bytes(mlp_path.read_bytes()[:3000])
    np.savez(tmp_path / "wrong.npz", pixels=np.zeros((2, 4), np.float32))
    return [
        ([tmp_path / "random.onnx"], "not a valid ONNX model"),
        ([tmp_path / "truncated.onnx"], "not a valid ONNX model"),
        ([tmp_path / "missing.onnx"], "no such file"),
        ([mlp_path, "--passes", "frobnicate"], "unknown pass 'frobnicate'"),
        ([mlp_path, "--passes", "quant(bits=99)"], "bits=99 is out of range"),
        ([mlp_path, "--calib", tmp_path / "wrong.npz"], "arrays do not match the model inputs"),
        ([mlp_path, "--calib", tmp_path / "absent.npz"], "no such calibration file"),
        ([mlp_path, "--input-shape", "ids=2x5"], "dim 1 is fixed to 4"),
        ([mlp_path, "--target", "tpu"], "invalid choice"),
    ]


def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, mlp_path):
    for args, message in _bad_inputs(tmp_path, mlp_path):
        out = tmp_path / "never"
        done = qcompile(*args, "-o", out)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2, (args, done.stderr)
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in done.stderr, (args, done.stderr)
        assert not out.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]


def test_run_errors(tmp_path):
    done = qcompile("run", tmp_path, "--inputs", tmp_path / "x.npz")
    assert done.returncode == 2 and "not a qcompile artifact" in done.stderr
    done = qcompile("run")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("flag", ["--help"])
def test_help(flag):
    done = qcompile(flag)
    assert done.returncode == 0 and "--passes" in done.stdout
