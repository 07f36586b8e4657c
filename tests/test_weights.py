"""Pretrained weights as pipeline inputs: the published-file table against what Keras itself asks
for, and the weights stage end to end against a local HTTP server standing in for the host."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from stages import downloads  # noqa: E402
from stages.backbones import APPLICATIONS, EFFICIENTNET_PACKAGE, REGISTRY  # noqa: E402
from stages.errors import UserError  # noqa: E402
from stages.backbones import MOBILENETV2_ALPHAS  # noqa: E402
from stages.weights import main, published_weights, weights_path  # noqa: E402
from tests.local_http import FolderServer  # noqa: E402
from tests.toy import toy_params  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PRETRAINED = sorted(name for name, spec in REGISTRY.items() if spec.pretrained)
EXPERIMENT = "toy-mobilenet"
ALPHA = 0.35
SIZE = 32
# What Keras asks for at input 32 (no file of its own: the 224 file, as Keras does).
FILENAME = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"


# --------------------------------------------------------------------------------------------
# The table matches what Keras (and the efficientnet package) would request.


class Requested(Exception):
    """Raised by the stand-in get_file: the factory asked for its weights file, stop there."""


@pytest.fixture
def requests_seen(monkeypatch) -> list[dict[str, Any]]:
    """Replace every get_file the factories call with one that records the request and stops."""
    import keras
    import keras.src.utils.file_utils as file_utils

    seen: list[dict[str, Any]] = []

    def get_file(fname=None, origin=None, *args: Any, **kwargs: Any) -> str:
        seen.append({"fname": fname, "origin": origin, "file_hash": kwargs.get("file_hash")})
        raise Requested

    monkeypatch.setattr(file_utils, "get_file", get_file)  # keras.applications
    monkeypatch.setattr(keras.utils, "get_file", get_file)
    if keras.backend.backend() == "tensorflow":
        import tensorflow.keras as tfkeras  # what efficientnet.tfkeras hands the package as `utils`

        monkeypatch.setattr(tfkeras.utils, "get_file", get_file)
    return seen


def keras_request(model: str, input_size: int, options: dict[str, Any], seen: list[dict[str, Any]]) -> dict:
    """The weights file the model's own factory asks for with weights="imagenet", include_top=False."""
    import keras

    if model in EFFICIENTNET_PACKAGE:
        if keras.backend.backend() != "tensorflow":
            pytest.skip("the efficientnet package runs on the TensorFlow backend only")
        import efficientnet.tfkeras as efn

        factory = getattr(efn, EFFICIENTNET_PACKAGE[model][0])
    else:
        factory = getattr(keras.applications, APPLICATIONS[model][0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MobileNetV2's "loading the 224 weights" warning
        with pytest.raises(Requested):
            factory(include_top=False, weights="imagenet", input_shape=(input_size, input_size, 3), **options)
    keras.backend.clear_session()
    assert len(seen) == 1
    return seen[0]


def expected(model: str, input_size: int, options: dict[str, Any]) -> dict[str, Any]:
    ours = published_weights(model, input_size, options)
    if ours.hash is not None:
        # Keras's get_file takes a 64-character hash for sha256 and a 32-character one for md5.
        assert ours.hash_algorithm == ("sha256" if len(ours.hash) == 64 else "md5")
    else:
        assert ours.hash_algorithm is None
    return {"fname": ours.filename, "origin": ours.url, "file_hash": ours.hash}


def test_every_pretrained_backbone_has_a_published_file() -> None:
    listed = set(APPLICATIONS) | set(EFFICIENTNET_PACKAGE)
    assert set(PRETRAINED) <= listed
    for name in PRETRAINED:
        assert published_weights(name, REGISTRY[name].native_input_size, {}).url.startswith("https://")


@pytest.mark.parametrize("model", PRETRAINED)
def test_table_matches_what_keras_requests(model: str, requests_seen: list) -> None:
    size = REGISTRY[model].native_input_size
    assert keras_request(model, size, {}, requests_seen) == expected(model, size, {})


@pytest.mark.parametrize(
    ("alpha", "size"),
    [(0.35, 96), (0.5, 128), (0.75, 160), (1.3, 224), (1.4, 192), (1.0, 32), (0.35, 100)],
)
def test_mobilenetv2_file_follows_alpha_and_size_as_keras_does(alpha: float, size: int, requests_seen: list) -> None:
    options = {"alpha": alpha}
    assert keras_request("mobilenetv2", size, options, requests_seen) == expected("mobilenetv2", size, options)


def test_published_weights_refuses_what_has_no_file() -> None:
    with pytest.raises(UserError, match="unknown backbone model 'resnet9'"):
        published_weights("resnet9", 224, {})
    with pytest.raises(UserError, match="backbone cnn: has no pretrained weights; set weights: null"):
        published_weights("cnn", 32, {})
    with pytest.raises(UserError) as error:
        published_weights("mobilenetv2", 224, {"alpha": 0.6})
    assert str(error.value) == (
        "backbone mobilenetv2: options.alpha 0.6 has no ImageNet weights; use one of "
        + ", ".join(str(a) for a in MOBILENETV2_ALPHAS) + ", or weights: null to train from scratch"
    )
    with pytest.raises(UserError, match="input_size 64 is below 75"):
        published_weights("inceptionv3", 64, {})


# --------------------------------------------------------------------------------------------
# The stage, against a local weights host.




def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A fresh download cache, no real waiting between download retries, and a working directory
    that is no DVC project (the stage looks for the file in the working directory's DVC cache)."""
    monkeypatch.setenv("CLASSMATRIX_DOWNLOADS", str(tmp_path / "downloads"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(downloads, "BACKOFF_S", 0.01)
    return tmp_path


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> tuple[Path, list[np.ndarray]]:
    """A small MobileNetV2's weights, randomised, saved in the legacy HDF5 format of the published
    files under a published file name; and the arrays saved."""
    import h5py
    import keras
    from keras.src.legacy.saving.legacy_h5_format import save_weights_to_hdf5_group

    model = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3), alpha=ALPHA)
    rng = np.random.default_rng(7)
    arrays = [rng.normal(size=w.shape).astype(w.dtype) for w in model.get_weights()]
    model.set_weights(arrays)
    folder = tmp_path_factory.mktemp("host")
    with h5py.File(folder / FILENAME, "w") as handle:
        save_weights_to_hdf5_group(handle, model)
    keras.backend.clear_session()
    return folder, arrays


def write_params(path: Path, **backbone: Any) -> Path:
    params = toy_params(["a", "b"])
    params["backbones"]["mobilenet"] = {
        "model": "mobilenetv2",
        "input_size": SIZE,
        "weights": "imagenet",
        "options": {"alpha": ALPHA},
        **backbone,
    }
    params["experiments"][EXPERIMENT] = {"suite": "tests", "dataset": "toy", "backbone": "mobilenet"}
    params["suites"]["tests"] = {}
    path.write_text(yaml.safe_dump(params), encoding="utf-8")
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(params: Path, out: Path) -> None:
    main(["--experiment", EXPERIMENT, "--out", str(out), "--params", str(params)])


def test_mirror_download_pins_the_file_and_training_loads_it(workdir, generated, capsys) -> None:
    import keras

    host, arrays = generated
    served = host / FILENAME
    server = FolderServer(host)
    out = workdir / "weights" / EXPERIMENT
    params = write_params(workdir / "params.yaml", weights_url=server.url(FILENAME), weights_sha256=sha256(served))
    try:
        run(params, out)
    finally:
        server.stop()
    assert "downloaded" in capsys.readouterr().out

    record = json.loads((out / "weights.json").read_text(encoding="utf-8"))
    assert sorted(p.name for p in out.iterdir()) == sorted([FILENAME, "weights.json"])
    assert (out / FILENAME).read_bytes() == served.read_bytes()
    assert record["model"] == "mobilenetv2" and record["weights"] == "imagenet"
    assert record["filename"] == FILENAME and record["url"] == server.url(FILENAME)
    assert record["input_size"] == SIZE and record["bytes"] == served.stat().st_size
    assert record["sha256"] == sha256(served)
    assert record["md5"] == hashlib.md5(served.read_bytes()).hexdigest()
    assert record["published_url"].endswith("/mobilenet_v2/" + FILENAME)
    assert record["published_hash"] is None and record["published_hash_algorithm"] is None
    assert record["matches_published"] is None
    cached = workdir / "downloads" / "weights" / FILENAME
    assert cached.read_bytes() == served.read_bytes()

    # Training's path: the factory loads the file by path, every weight as generated.
    path = weights_path(out)
    assert path == str((out / FILENAME).resolve())
    model = keras.applications.MobileNetV2(include_top=False, weights=path, input_shape=(SIZE, SIZE, 3), alpha=ALPHA)
    loaded = model.get_weights()
    assert len(loaded) == len(arrays)
    for got, want in zip(loaded, arrays):
        np.testing.assert_array_equal(got, want)
    keras.backend.clear_session()

    # The server is gone: the cached, verified file needs no network, and the output is the same.
    run(params, out)
    assert "from the download cache" in capsys.readouterr().out
    assert json.loads((out / "weights.json").read_text(encoding="utf-8")) == record
    assert (out / FILENAME).read_bytes() == served.read_bytes()


def run_from_cache(workdir: Path, host: Path) -> Path:
    """The published file put in the download cache by hand, then the stage run with no
    weights_url (the published file, which Keras publishes no hash for); returns its output folder."""
    cache = workdir / "downloads" / "weights"
    cache.mkdir(parents=True)
    (cache / FILENAME).write_bytes((host / FILENAME).read_bytes())
    out = workdir / "out"
    run(write_params(workdir / "params.yaml"), out)
    return out


def test_published_file_put_in_the_cache_by_hand_needs_no_network(workdir, generated) -> None:
    host, _ = generated
    out = run_from_cache(workdir, host)
    record = json.loads((out / "weights.json").read_text(encoding="utf-8"))
    assert record["url"] == record["published_url"] == published_weights("mobilenetv2", SIZE, {"alpha": ALPHA}).url
    assert record["sha256"] == sha256(host / FILENAME)
    assert weights_path(out) == str((out / FILENAME).resolve())
    # weights_sha256 alone pins the published file (here one with no published hash).
    run(write_params(workdir / "params.yaml", weights_sha256=sha256(host / FILENAME).upper()), out)
    assert json.loads((out / "weights.json").read_text(encoding="utf-8")) == record


def test_a_file_no_hash_vouches_for_must_be_a_keras_weights_file(workdir, generated, monkeypatch, tmp_path) -> None:
    """MobileNetV2's files have no published hash: a junk file in the cache is replaced by a
    download, and a download that is not an HDF5 weights file (an error page) is removed, in one line."""
    from stages import weights

    host, _ = generated
    cache = workdir / "downloads" / "weights"
    cache.mkdir(parents=True)
    (cache / FILENAME).write_bytes(b"<html>not found</html>")
    published = tmp_path / "published" / "mobilenet_v2"
    published.mkdir(parents=True)
    (published / FILENAME).write_bytes((host / FILENAME).read_bytes())
    server = FolderServer(published.parent)
    monkeypatch.setattr(weights, "KERAS", server.url(""))  # the published host, served here
    out = workdir / "out"
    try:
        run(write_params(workdir / "params.yaml"), out)
    finally:
        server.stop()
    assert json.loads((out / "weights.json").read_text(encoding="utf-8"))["sha256"] == sha256(host / FILENAME)

    junk = tmp_path / "junk" / "mobilenet_v2"
    junk.mkdir(parents=True)
    (junk / FILENAME).write_bytes(b"<html>an error page</html>")
    (cache / FILENAME).unlink()
    assert "is not a Keras weights file (not readable as HDF5" in refused_download(workdir, junk.parent, monkeypatch)


def refused_download(workdir: Path, host: Path, monkeypatch) -> str:
    """The stage's one-line refusal of the file `host` serves as the published one; the file was
    removed from the download cache, and no output written."""
    from stages import weights

    cache = workdir / "downloads" / "weights"
    server = FolderServer(host)
    monkeypatch.setattr(weights, "KERAS", server.url(""))
    try:
        with pytest.raises(UserError) as error:
            run(write_params(workdir / "params.yaml"), workdir / "out2")
    finally:
        server.stop()
    message = str(error.value)
    assert "\n" not in message
    assert message.endswith(f"it was removed; run again, or put the published file at {cache / FILENAME}")
    assert not (cache / FILENAME).exists() and not (workdir / "out2").exists()
    return message


@pytest.mark.parametrize("other", ["with its top", "of another width"])
def test_a_file_no_hash_vouches_for_must_fit_the_base(workdir, generated, monkeypatch, tmp_path, other) -> None:
    """MobileNetV2's with-top file, or another width's, is a Keras weights file too, but not the
    base's: found in the download cache it is removed (and the published file fetched in its place,
    or one line says where to put it); downloaded, it is removed in one line. Before, the stage took
    it and training failed, advising a rerun of this stage, which took the same file again."""
    import h5py
    import keras
    from keras.src.legacy.saving.legacy_h5_format import save_weights_to_hdf5_group

    from stages import weights

    host, _ = generated
    options = {"alpha": ALPHA, "include_top": True} if other == "with its top" else {"alpha": 0.5}
    model = keras.applications.MobileNetV2(weights=None, input_shape=(SIZE, SIZE, 3), **options)
    wrong = tmp_path / "wrong" / "mobilenet_v2"
    wrong.mkdir(parents=True)
    with h5py.File(wrong / FILENAME, "w") as handle:
        save_weights_to_hdf5_group(handle, model)
    keras.backend.clear_session()
    cache = workdir / "downloads" / "weights"
    cache.mkdir(parents=True)
    (cache / FILENAME).write_bytes((wrong / FILENAME).read_bytes())

    # In the cache, offline: removed, and one line names the path to put the published file at.
    monkeypatch.setattr(weights, "KERAS", f"http://127.0.0.1:{closed_port()}/")
    with pytest.raises(UserError) as error:
        run(write_params(workdir / "params.yaml"), workdir / "out")
    message = str(error.value)
    assert "\n" not in message
    assert f"the file that was there does not fit mobilenetv2's base at {SIZE}x{SIZE}" in message
    assert f"put that file at {cache / FILENAME} and run again. Or train mobilenetv2 from scratch" in message
    assert not (cache / FILENAME).exists() and not (workdir / "out").exists()

    # In the cache, online: replaced by the published file.
    (cache / FILENAME).write_bytes((wrong / FILENAME).read_bytes())
    published = tmp_path / "published" / "mobilenet_v2"
    published.mkdir(parents=True)
    (published / FILENAME).write_bytes((host / FILENAME).read_bytes())
    server = FolderServer(published.parent)
    monkeypatch.setattr(weights, "KERAS", server.url(""))
    try:
        run(write_params(workdir / "params.yaml"), workdir / "out")
    finally:
        server.stop()
    assert json.loads((workdir / "out" / "weights.json").read_text(encoding="utf-8"))["sha256"] == sha256(host / FILENAME)

    # Downloaded: removed, in one line.
    (cache / FILENAME).unlink()
    assert "does not fit mobilenetv2's base" in refused_download(workdir, wrong.parent, monkeypatch)


def test_a_failure_of_the_machine_is_not_taken_for_a_wrong_file(workdir, generated, monkeypatch) -> None:
    """Checking a file against the base writes a link in a temporary folder: a full disk there is
    the machine's fault, not the file's, and the file put in the cache by hand is kept. The check
    leaves the process's Keras settings (dtype policy, seed) as they were."""
    import errno
    import tempfile

    import keras
    from keras.src.backend.common import global_state

    from stages import weights

    host, _ = generated
    cache = workdir / "downloads" / "weights"
    cache.mkdir(parents=True)
    (cache / FILENAME).write_bytes((host / FILENAME).read_bytes())
    monkeypatch.setattr(weights, "KERAS", f"http://127.0.0.1:{closed_port()}/")

    def full(*args: Any, **kwargs: Any) -> str:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(tempfile, "mkdtemp", full)
        with pytest.raises(OSError, match="No space left on device"):
            run(write_params(workdir / "params.yaml"), workdir / "out")
    assert (cache / FILENAME).read_bytes() == (host / FILENAME).read_bytes()

    keras.config.set_dtype_policy("mixed_bfloat16")
    keras.utils.set_random_seed(1234)
    try:
        run(write_params(workdir / "params.yaml"), workdir / "out")
        assert keras.config.dtype_policy().name == "mixed_bfloat16"
        assert global_state.get_global_attribute("global_random_seed") == 1234
    finally:
        keras.config.set_dtype_policy("float32")
    assert json.loads((workdir / "out" / "weights.json").read_text(encoding="utf-8"))["sha256"] == sha256(host / FILENAME)


def test_wrong_sha256_removes_the_file_and_fails_in_one_line(workdir, generated) -> None:
    host, _ = generated
    server = FolderServer(host)
    out = workdir / "out"
    params = write_params(workdir / "params.yaml", weights_url=server.url(FILENAME), weights_sha256="0" * 64)
    try:
        with pytest.raises(UserError) as error:
            run(params, out)
    finally:
        server.stop()
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"weights@{EXPERIMENT}: sha256 (expected {'0' * 64}, got {sha256(host / FILENAME)})")
    assert "weights_sha256" in message
    cache = workdir / "downloads" / "weights"
    assert list(cache.iterdir()) == []
    assert not out.exists() and not out.with_name("out.partial").exists()


def test_weights_url_needs_a_sha256(workdir) -> None:
    params = write_params(workdir / "params.yaml", weights_url="http://127.0.0.1:9/x.h5")
    with pytest.raises(UserError, match=r"backbones\.mobilenet\.weights_sha256: required with weights_url"):
        run(params, workdir / "out")
    params = write_params(workdir / "params.yaml", weights_url="http://127.0.0.1:9/x.h5", weights_sha256="abc")
    with pytest.raises(UserError, match=r"weights_sha256: 'abc' is not a sha256"):
        run(params, workdir / "out")
    params = write_params(workdir / "params.yaml", weights_url="ftp://mirror/x.h5", weights_sha256="a" * 64)
    with pytest.raises(UserError, match=r"weights_url: 'ftp://mirror/x.h5' is not an http\(s\) URL"):
        run(params, workdir / "out")
    assert not (workdir / "out").exists() and not (workdir / "downloads").exists()


def test_unreachable_host_says_where_to_put_the_file(tmp_path) -> None:
    """The stage as DVC runs it: one `error:` line naming the cache path, no traceback, and the
    other way out, training from scratch, which the line says is another model."""
    url = f"http://127.0.0.1:{closed_port()}/{FILENAME}"
    params = write_params(tmp_path / "params.yaml", weights_url=url, weights_sha256="a" * 64)
    env = {**os.environ, "CLASSMATRIX_DOWNLOADS": str(tmp_path / "downloads"), "TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "stages.weights", "--experiment", EXPERIMENT, "--out", str(tmp_path / "out"),
         "--params", str(params)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    target = tmp_path / "downloads" / "weights" / FILENAME
    assert lines[0] == (
        f"error: weights@{EXPERIMENT}: cannot download {url} (failed after {downloads.RETRIES + 1} tries "
        f"(connection refused)); put that file at {target} and run again. Or train mobilenetv2 from scratch "
        f"instead, with experiments.{EXPERIMENT}.backbone_overrides: {{weights: null}}: another model, with no "
        "ImageNet start"
    )
    assert not (tmp_path / "out").exists()

    # The override it names is one params take, and the stage then needs no file.
    raw = yaml.safe_load(params.read_text(encoding="utf-8"))
    raw["experiments"][EXPERIMENT]["backbone_overrides"] = {"weights": None}
    params.write_text(yaml.safe_dump(raw), encoding="utf-8")
    run(params, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "weights.json").read_text())["weights"] is None


def test_no_weights_writes_only_the_record(workdir) -> None:
    params = write_params(workdir / "params.yaml", weights=None)
    out = workdir / "out"
    run(params, out)
    assert [p.name for p in out.iterdir()] == ["weights.json"]
    assert json.loads((out / "weights.json").read_text(encoding="utf-8")) == {
        "experiment": EXPERIMENT, "model": "mobilenetv2", "weights": None,
    }
    assert weights_path(out) is None
    assert not (workdir / "downloads").exists()


def test_weights_path_without_the_stage_says_what_to_run(tmp_path) -> None:
    with pytest.raises(UserError, match=r"weights\.json: not found; run weights@toy-cnn first"):
        weights_path(tmp_path / "toy-cnn")


def test_a_weights_file_changed_after_the_stage_fails_in_one_line(workdir, generated) -> None:
    """Train loads the file weights.json describes, and records its sha256: a file cut short, or
    altered at the same size, is refused, naming the file and the stage to run again."""
    out = run_from_cache(workdir, generated[0])
    file = out / FILENAME
    original = file.read_bytes()
    file.write_bytes(original[:-1])
    with pytest.raises(UserError, match=rf"{FILENAME}: {len(original) - 1:,} bytes where weights\.json says "
                                        rf"{len(original):,}; run weights@\S+ again"):
        weights_path(out)
    file.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(UserError, match=rf"{FILENAME}: its sha256 is not the [0-9a-f]{{12}}\.\.\. weights\.json "
                                        r"records \(the file changed after weights@\S+ wrote it\); run weights@\S+ again"):
        weights_path(out)
    file.write_bytes(original)
    assert weights_path(out) == str(file.resolve())


# --------------------------------------------------------------------------------------------
# A rerun offline takes the file from DVC's cache.


def dvc_project(root: Path, params: Path) -> dict[str, str]:
    """A DVC project at `root` with the repository's pipeline and stages/, and `params`; returns
    the environment its commands run in."""
    import shutil

    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(ROOT / "stages", root / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(params, root / "params.yaml")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "CLASSMATRIX_DOWNLOADS": str(root / "data" / "downloads"),
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "DVC_NO_ANALYTICS": "1",
    }
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=root, env=env, check=True)
    return env


def test_a_rerun_offline_takes_the_file_from_dvcs_cache(tmp_path, generated, monkeypatch) -> None:
    """After `dvc repro weights@...` downloaded the file, a change to the experiment's entry reruns
    the stage; with the host gone and the download folder emptied, the stage takes the file DVC
    cached (what `dvc pull` would bring) instead of stopping. A cache copy that is not the file the
    lock names is not taken."""
    import shutil

    from stages import weights

    host, _ = generated
    served = host / FILENAME
    server = FolderServer(host)
    project = tmp_path / "project"
    project.mkdir()
    params_file = write_params(tmp_path / "params.yaml", weights_url=server.url(FILENAME), weights_sha256=sha256(served))
    env = dvc_project(project, params_file)
    stage = f"weights@{EXPERIMENT}"
    try:
        first = subprocess.run(["dvc", "repro", stage], cwd=project, env=env, capture_output=True, text=True)
    finally:
        server.stop()
    assert first.returncode == 0, first.stderr
    assert f"{FILENAME} (" in first.stdout and ") downloaded, in" in first.stdout
    out = project / "data" / "weights" / EXPERIMENT
    record = json.loads((out / "weights.json").read_text(encoding="utf-8"))

    shutil.rmtree(project / "data" / "downloads")
    params = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))
    params["experiments"][EXPERIMENT]["train"] = {"epochs": 3}
    (project / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    again = subprocess.run(["dvc", "repro", stage], cwd=project, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert f"Running stage '{stage}'" in again.stdout and ") from DVC's cache, in" in again.stdout
    assert json.loads((out / "weights.json").read_text(encoding="utf-8")) == record
    assert (out / FILENAME).read_bytes() == served.read_bytes()
    status = subprocess.run(["dvc", "status", stage], cwd=project, env=env, capture_output=True, text=True)
    assert "up to date" in status.stdout, status.stdout

    # In-process, in the project: the published file, which no hash vouches for, is taken because
    # dvc.lock names it (without building the base to try it); a corrupt cache copy is not, and the
    # stage asks for the file as before.
    def not_built(*args: Any) -> None:
        raise AssertionError("a file dvc.lock names was tried against the base")

    monkeypatch.setattr(weights, "_not_this_base", not_built)
    monkeypatch.chdir(project)
    monkeypatch.setenv("CLASSMATRIX_DOWNLOADS", str(tmp_path / "elsewhere"))
    monkeypatch.setattr(downloads, "BACKOFF_S", 0.01)
    monkeypatch.setattr(weights, "KERAS", f"http://127.0.0.1:{closed_port()}/")
    published = write_params(tmp_path / "published.yaml")
    assert main(["--experiment", EXPERIMENT, "--out", str(tmp_path / "published"), "--params", str(published)]) is None
    assert (tmp_path / "published" / FILENAME).read_bytes() == served.read_bytes()
    cached = project / ".dvc" / "cache" / "files" / "md5"
    copy = cached / record["md5"][:2] / record["md5"][2:]
    assert copy.is_file()
    os.chmod(copy, 0o644)
    copy.write_bytes(served.read_bytes()[:-1])
    shutil.rmtree(tmp_path / "elsewhere")
    with pytest.raises(UserError, match=rf"cannot download .*; put that file at .*{FILENAME} and run again\. Or train "):
        main(["--experiment", EXPERIMENT, "--out", str(tmp_path / "published2"), "--params", str(published)])

    # Without dvc.lock, a file whose published md5 is known is found by that md5 (the address of
    # files in DVC's cache), as after checking out an older commit.
    copy.write_bytes(served.read_bytes())
    (project / "dvc.lock").unlink()
    md5 = hashlib.md5(served.read_bytes()).hexdigest()
    monkeypatch.setattr(
        weights, "mobilenetv2_weights",
        lambda alpha, size: weights.WeightsFile(f"{weights.KERAS}{FILENAME}", FILENAME, md5, "md5"),
    )
    main(["--experiment", EXPERIMENT, "--out", str(tmp_path / "published3"), "--params", str(published)])
    assert (tmp_path / "published3" / FILENAME).read_bytes() == served.read_bytes()
