"""Every benchmark in benchmarks/ still runs, at its smallest size, and reports what it claims to.

docs/benchmarks.md records each figure with the command that produced it; a figure is only worth
its command if the command still runs at the commit a reader has. GPU throughput (issue 5, 9c) is
measured by the first session that has a GPU, in one shot of a few minutes, so its script above all
must not have rotted in between: here it runs with --smoke on the CPU, every method it can.

These tests check that each script runs through and that what it reports is of the right kind
(uint8 batches from our loader, the train stage's path compiled with XLA, TensorFlow absent from
the JAX children, the two feature-cache modes training the same model); they assert no speed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HAS_TORCH = importlib.util.find_spec("torch") is not None
pytestmark = pytest.mark.slow


def run(script: str, *args: str, backend: str | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("KERAS_BACKEND", None)
    if backend:
        env["KERAS_BACKEND"] = backend
    # The venv's bin first, as `.venv/bin/python benchmarks/...` in the docs has it: scale.py runs `dvc`.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    done = subprocess.run([sys.executable, f"benchmarks/{script}", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"benchmarks/{script} exited {done.returncode}:\n{(done.stdout + done.stderr)[-4000:]}"
    return done


def leading_json(stdout: str) -> dict:
    """The JSON object a benchmark prints first (a table may follow it)."""
    start = stdout.index("{")
    return json.JSONDecoder().raw_decode(stdout[start:])[0]


def test_input_pipeline_compares_uint8_batches_with_the_course_generator(tmp_path: Path) -> None:
    workdir = tmp_path / "input"
    result = leading_json(run("input_pipeline.py", "--images", "24", "--size", "32", "--classes", "3",
                              "--batch-sizes", "8", "--passes", "1", "--workdir", str(workdir)).stdout)
    assert result["images"] == 24 and result["keras_backend"] == "tensorflow"
    [row] = result["rows"]
    # The loader hands the model uint8 (4x less to move than float32); the course's generator float32.
    assert row["ours_batch"] == "uint8 (32, 32, 3)" and row["course_batch"] == "float32 (32, 32, 3)", row
    assert row["ours_img_per_s"] > 0 and row["course_img_per_s"] > 0 and row["ratio"] > 0
    assert not workdir.exists(), "without --keep the generated JPEGs and arrays are removed"


def test_feature_cache_runs_both_modes_through_the_real_train_stage(tmp_path: Path) -> None:
    summary = leading_json(run("feature_cache.py", "--train", "32", "--val", "16", "--test", "8", "--epochs", "2",
                               "--batch-size", "16", "--pretrain-epochs", "0", "--workdir", str(tmp_path / "fc")).stdout)
    auto, off = summary["results"]["auto"], summary["results"]["off"]
    assert auto["feature_cache_used"] and not off["feature_cache_used"]
    assert auto["epochs_run"] == off["epochs_run"] == 2
    assert auto["feature_cache_seconds"] > 0 and off["feature_cache_seconds"] == 0
    # The same model either way (test_training.py checks it closely; here: the benchmark's own report).
    # On TensorFlow the features pass folds BatchNormalization, which rounds differently: the
    # validation loss may part in its last digits, and one of the 16 images could in principle go
    # the other way.
    assert summary["same_best_epoch"] and summary["max_abs_val_loss_difference"] < 1e-3, summary
    assert summary["max_abs_val_accuracy_difference_points"] <= 100 / 16, summary
    assert auto["keras_backend"] == "tensorflow" and auto["dtype_policy"] == "float32"


def test_the_gpu_benchmark_runs_the_train_stages_path_and_bare_keras_on_jax(tmp_path: Path) -> None:
    out = tmp_path / "gpu_throughput.json"
    done = run("gpu_throughput.py", "--smoke", "--models", "efficientnetb0", "--out", str(out), backend="jax")
    result = json.loads(out.read_text())
    assert result["smoke"] and result["device"] == "cpu (smoke)"
    runs = {run["method"]: run for run in result["runs"]}
    assert set(runs) == {"ours", "bare_keras", "torch"}, runs
    ours, bare = runs["ours"], runs["bare_keras"]
    for method in (ours, bare):
        assert method["img_per_s"] > 0 and method["dtype_policy"] == "mixed_bfloat16", method
        assert method["environment"]["keras_backend"] == "jax"
        assert method["tensorflow_imported"] is False, "the JAX path must not import TensorFlow (the GPU machine has none)"
    # Our model (augmentation included) compiles with XLA, and trains the weights bare Keras does.
    assert ours["augmentation"] and ours["jit_compile"] is True and ours["jit_compile_setting"] == "auto", ours
    assert ours["trainable_parameters"] == bare["trainable_parameters"] == 4_020_358
    # (a) PyTorch needs torch and torchvision; where they are missing the child says which, and nothing fails.
    assert "img_per_s" in runs["torch"] or "torch" in runs["torch"]["skipped"], runs["torch"]
    assert "efficientnetb0" in done.stdout and "ours/b" in done.stdout


def test_the_gpu_benchmark_records_what_its_deadline_leaves_no_time_for(tmp_path: Path) -> None:
    out = tmp_path / "gpu_throughput.json"
    run("gpu_throughput.py", "--smoke", "--deadline", "1", "--out", str(out), backend="jax")
    runs = json.loads(out.read_text())["runs"]
    assert len(runs) == 6 and all(run["skipped"].startswith("deadline") for run in runs), runs


@pytest.mark.skipif(not HAS_TORCH, reason="PyTorch is optional: `make env-torch` installs the CPU build")
def test_the_torch_device_check_passes_with_the_cpu_standing_in(tmp_path: Path) -> None:
    done = run("torch_device.py", "--cpu", backend="torch")
    assert "torch_device: ok" in done.stdout and "FAIL" not in done.stdout, done.stdout
    assert done.stdout.count("  ok  ") == 7, done.stdout


def test_augmentation_times_keras_layers_and_random_affine_on_both_backends() -> None:
    done = run("augmentation.py", "--backends", "tensorflow", "jax", "--batch-sizes", "4", "--size", "32", "--repeats", "1")
    rows = [line for line in done.stdout.splitlines() if line.startswith(("| tensorflow |", "| jax |"))]
    assert len(rows) == 2, done.stdout


def test_checkpoint_writes_a_frozen_base_once(tmp_path: Path) -> None:
    done = run("checkpoint.py", "--models", "mobilenetv2", "--epochs", "2", "--workdir", str(tmp_path / "ckpt"))
    [row] = [line.split() for line in done.stdout.splitlines() if line.startswith("mobilenetv2")]
    everything_mb, static_mb, static_file_mb = float(row[3]), float(row[5]), float(row[7])
    # Per epoch, the static way writes only what changes (the head and optimizer), the base once.
    assert static_mb < everything_mb and static_file_mb > 0, done.stdout


def test_cpu_convolutions_times_both_layers() -> None:
    done = run("cpu_convolutions.py", "--backends", "tensorflow", "--repeats", "1")
    rows = [line for line in done.stdout.splitlines() if line.startswith(("depthwise 3x3", "conv 1x1, 96 -> 96"))]
    assert len(rows) == 2 and all(row.rstrip().endswith("s") for row in rows), done.stdout


def test_fit_shutdown_compares_both_feeds(tmp_path: Path) -> None:
    out = tmp_path / "fit.json"
    run("fit_shutdown.py", "--train", "32", "--val", "16", "--size", "32", "--batch-size", "16", "--epochs", "2",
        "--out", str(out))
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"keras", "ours"} and all(len(r["fits"]) == 2 for r in results.values())
    # Op determinism on: the two feeds give the model the same batches, so the same validation loss.
    assert [f["val_loss"] for f in results["keras"]["fits"]] == [f["val_loss"] for f in results["ours"]["fits"]]


def test_openimages_labels_selects_three_classes(tmp_path: Path) -> None:
    result = leading_json(run("openimages_labels.py", "--rows", "20000", "--workdir", str(tmp_path)).stdout)
    assert result["rows"] == 20000 and len(result["classes"]) == 3
    assert set(result["images_per_class"]) == set(result["classes"]) and result["images_matched"] > 0


def test_scale_runs_fetch_validate_and_split_with_the_real_dvc(tmp_path: Path) -> None:
    result = leading_json(run("scale.py", "--files", "60", "--classes", "3", "--workdir", str(tmp_path)).stdout)
    assert result["files"] == 60 and result["accepted"] == 60, result
    assert result["noop_repro_seconds"] >= 0 and result["raw_files_sharing_an_inode_with_the_cache"].endswith("/60")


def refused(script: str, *args: str, backend: str | None = None) -> str:
    """A benchmark given a bad argument: exit status 2 or 1, one line naming it, no traceback."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("KERAS_BACKEND", None)
    if backend:
        env["KERAS_BACKEND"] = backend
    done = subprocess.run([sys.executable, f"benchmarks/{script}", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode != 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return done.stderr.strip().splitlines()[-1]


def test_checkpoint_names_an_unknown_model_in_one_line(tmp_path: Path) -> None:
    line = refused("checkpoint.py", "--models", "mobilenetv9", "--workdir", str(tmp_path / "ckpt"))
    assert "mobilenetv9" in line and "mobilenetv2" in line, line
    assert not (tmp_path / "ckpt").exists()


def test_cpu_convolutions_names_an_unknown_backend_in_one_line() -> None:
    line = refused("cpu_convolutions.py", "--backends", "tensorflw", "--repeats", "1")
    assert "tensorflw" in line, line


@pytest.mark.parametrize("script", ["input_pipeline.py", "augmentation.py", "gpu_throughput.py"])
def test_a_batch_size_below_one_is_refused_in_one_line(script: str, tmp_path: Path) -> None:
    """gpu_throughput.py's on the host, before a child would fail on device time."""
    line = refused(script, "--batch-sizes", "8", "0", backend="jax" if script == "gpu_throughput.py" else None)
    assert "--batch-sizes" in line and "0" in line, line


@pytest.mark.parametrize("script", ["gpu_throughput.py", "fit_shutdown.py"])
def test_an_out_file_in_a_missing_folder_is_refused_before_anything_runs(script: str, tmp_path: Path) -> None:
    out = tmp_path / "missing" / "results.json"
    line = refused(script, "--smoke" if script == "gpu_throughput.py" else "--epochs=1", "--out", str(out), backend="jax" if script == "gpu_throughput.py" else None)
    assert str(out.parent) in line, line


def test_input_pipeline_removes_only_what_it_generated_from_its_workdir(tmp_path: Path) -> None:
    workdir = tmp_path / "mine"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("not the benchmark's")
    run("input_pipeline.py", "--images", "8", "--size", "32", "--classes", "2", "--batch-sizes", "4", "--passes", "1",
        "--workdir", str(workdir))
    assert [p.name for p in workdir.iterdir()] == ["notes.txt"]


def test_feature_cache_refuses_a_workdir_holding_files_it_did_not_make(tmp_path: Path) -> None:
    """It starts from an empty workdir by removing the last run's; a folder holding other files
    (a typo'd --workdir) is refused before anything is removed."""
    workdir = tmp_path / "mine"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("not the benchmark's")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "benchmarks/feature_cache.py", "--workdir", str(workdir)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 1 and done.stderr.strip() == (
        f"error: --workdir {workdir} holds files this benchmark did not make; give an empty or new folder")
    assert [p.name for p in workdir.iterdir()] == ["notes.txt"]
