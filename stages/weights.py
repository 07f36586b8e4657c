"""weights@<dataset>-<backbone>: the pretrained ImageNet weights file an experiment trains from.

    python -m stages.weights --experiment flowers-mobilenetv2 --out data/weights/flowers-mobilenetv2

Each pretrained backbone's no-top ImageNet weights file is downloaded once from its published URL
(the one Keras or the `efficientnet` package itself would fetch, listed in PUBLISHED below), checked
against its published hash, and written into `--out` beside `weights.json`, the record of what it
is. DVC tracks that folder, so a trained model stays reproducible when the upstream file moves: the
file is in DVC's cache and the lock holds its md5. Training loads the file by path (`weights_path`),
never through Keras's own download into ~/.keras.

Downloads are kept in `data/downloads/weights/` (or `$CLASSMATRIX_DOWNLOADS/weights/`), outside the
stage's output, so a rerun needs no network; failing that, a rerun takes the file from the
project's DVC cache (an earlier run's, or `dvc pull`'s); on a machine with neither and no network,
put the file there by hand (the error names the path). A backbone may name another source, a team's mirror, with
`weights_url`, and must then pin its sha256 in `weights_sha256`. A backbone with `weights: null`
gets a `weights.json` that says so and no file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from stages.backbones import get_backbone, mobilenetv2_alpha_problem
from stages.config import ConfigError, load_params
from stages.downloads import download, download_cache
from stages.errors import UserError, run_stage
from stages.files import write_json_atomic

RECORD = "weights.json"

HashAlgorithm = Literal["md5", "sha256"]


@dataclass(frozen=True)
class WeightsFile:
    """A published weights file: where it is, the name Keras saves it under, and its hash."""

    url: str
    filename: str
    hash: str | None  # None: the publisher gives no hash for this file
    hash_algorithm: HashAlgorithm | None


# --------------------------------------------------------------------------------------------
# The published files: copied from keras/src/applications/*.py (Keras 3.15.1) and
# efficientnet/weights.py + model.py (efficientnet 1.1.1), the no-top (include_top=False) file of
# each. Keras's get_file reads a 64-character hash as sha256 and a 32-character one as md5; the
# algorithm is written out here. File names are those Keras saves the file under, which differ from
# the URL's last part for NASNet.

KERAS = "https://storage.googleapis.com/tensorflow/keras-applications/"
KERAS_EFFICIENTNET = "https://storage.googleapis.com/keras-applications/"  # EfficientNet B0-B7
EFFICIENTNET_PACKAGE = "https://github.com/Callidior/keras-applications/releases/download/efficientnet/"


def _md5(url: str, md5: str, filename: str | None = None) -> WeightsFile:
    return WeightsFile(url, filename or url.rsplit("/", 1)[-1], md5, "md5")


def _sha256(url: str, sha256: str, filename: str | None = None) -> WeightsFile:
    return WeightsFile(url, filename or url.rsplit("/", 1)[-1], sha256, "sha256")


# registry name -> its no-top ImageNet weights file (MobileNetV2's depends on alpha and input size:
# see mobilenetv2_weights).
PUBLISHED: dict[str, WeightsFile] = {
    "vgg16": _md5(f"{KERAS}vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5", "6d6bbae143d832006294945121d1f1fc"),
    "resnet50v2": _md5(f"{KERAS}resnet/resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5", "fac2f116257151a9d068a22e544a4917"),
    "resnet101v2": _md5(f"{KERAS}resnet/resnet101v2_weights_tf_dim_ordering_tf_kernels_notop.h5", "c0ed64b8031c3730f411d2eb4eea35b5"),
    "resnet152v2": _md5(f"{KERAS}resnet/resnet152v2_weights_tf_dim_ordering_tf_kernels_notop.h5", "ed17cf2e0169df9d443503ef94b23b33"),
    "inceptionv3": _md5(f"{KERAS}inception_v3/inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5", "bcbd6486424b2319ff4ef7d526e38f63"),
    "densenet121": _md5(f"{KERAS}densenet/densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5", "30ee3e1110167f948a6b9946edeeb738"),
    "densenet169": _md5(f"{KERAS}densenet/densenet169_weights_tf_dim_ordering_tf_kernels_notop.h5", "b8c4d4c20dd625c148057b9ff1c1176b"),
    "densenet201": _md5(f"{KERAS}densenet/densenet201_weights_tf_dim_ordering_tf_kernels_notop.h5", "c13680b51ded0fb44dff2d8f86ac8bb1"),
    "nasnetmobile": _md5(f"{KERAS}nasnet/NASNet-mobile-no-top.h5", "1ed92395b5b598bdda52abe5c0dbfd63", "nasnet_mobile_no_top.h5"),
    "nasnetlarge": _md5(f"{KERAS}nasnet/NASNet-large-no-top.h5", "d81d89dc07e6e56530c4e77faddd61b5", "nasnet_large_no_top.h5"),
    "efficientnetb0": _md5(f"{KERAS_EFFICIENTNET}efficientnetb0_notop.h5", "50bc09e76180e00e4465e1a485ddc09d"),
    "efficientnetb1": _md5(f"{KERAS_EFFICIENTNET}efficientnetb1_notop.h5", "74c4e6b3e1f6a1eea24c589628592432"),
    "efficientnetb2": _md5(f"{KERAS_EFFICIENTNET}efficientnetb2_notop.h5", "111f8e2ac8aa800a7a99e3239f7bfb39"),
    "efficientnetb3": _md5(f"{KERAS_EFFICIENTNET}efficientnetb3_notop.h5", "af6d107764bb5b1abb91932881670226"),
    "efficientnetb4": _md5(f"{KERAS_EFFICIENTNET}efficientnetb4_notop.h5", "ebc24e6d6c33eaebbd558eafbeedf1ba"),
    "efficientnetb5": _md5(f"{KERAS_EFFICIENTNET}efficientnetb5_notop.h5", "38879255a25d3c92d5e44e04ae6cec6f"),
    "efficientnetb6": _md5(f"{KERAS_EFFICIENTNET}efficientnetb6_notop.h5", "9ecce42647a20130c1f39a5d4cb75743"),
    "efficientnetb7": _md5(f"{KERAS_EFFICIENTNET}efficientnetb7_notop.h5", "cbcfe4450ddf6f3ad90b1b398090fe4a"),
    "efficientnetv2b0": _md5(f"{KERAS}efficientnet_v2/efficientnetv2-b0_notop.h5", "893217f2bb855e2983157299931e43ff"),
    "efficientnetv2b1": _md5(f"{KERAS}efficientnet_v2/efficientnetv2-b1_notop.h5", "0e80663031ca32d657f9caa404b6ec37"),
    "efficientnetv2b2": _md5(f"{KERAS}efficientnet_v2/efficientnetv2-b2_notop.h5", "1dfe2e7a5d45b6632553a8961ea609eb"),
    "efficientnetv2b3": _md5(f"{KERAS}efficientnet_v2/efficientnetv2-b3_notop.h5", "f6abf7b5849ac99a89b50dd3fd532856"),
    "efficientnetv2s": _md5(f"{KERAS}efficientnet_v2/efficientnetv2-s_notop.h5", "af0682fb74e8c54910f2d4393339c070"),
    "efficientnetv2m": _md5(f"{KERAS}efficientnet_v2/efficientnetv2-m_notop.h5", "1b8dc055df72dde80d614482840fe342"),
    "efficientnetv2l": _md5(f"{KERAS}efficientnet_v2/efficientnetv2-l_notop.h5", "b0b66b5c863aef5b46e8608fe1711615"),
    "convnexttiny": _sha256(
        f"{KERAS}convnext/convnext_tiny_notop.h5", "d547c096cabd03329d7be5562c5e14798aa39ed24b474157cef5e85ab9e49ef1"
    ),
    # The `efficientnet` package (efficientnet.tfkeras, weights="imagenet": the AutoAugment weights).
    "efn_b0": _sha256(
        f"{EFFICIENTNET_PACKAGE}efficientnet-b0_weights_tf_dim_ordering_tf_kernels_autoaugment_notop.h5",
        "c1421ad80a9fc67c2cc4000f666aa50789ce39eedb4e06d531b0c593890ccff3",
    ),
    "efn_b1": _sha256(
        f"{EFFICIENTNET_PACKAGE}efficientnet-b1_weights_tf_dim_ordering_tf_kernels_autoaugment_notop.h5",
        "75de265d03ac52fa74f2f510455ba64f9c7c5fd96dc923cd4bfefa3d680c4b68",
    ),
    "efn_b2": _sha256(
        f"{EFFICIENTNET_PACKAGE}efficientnet-b2_weights_tf_dim_ordering_tf_kernels_autoaugment_notop.h5",
        "433b60584fafba1ea3de07443b74cfd32ce004a012020b07ef69e22ba8669333",
    ),
    "efn_b3": _sha256(
        f"{EFFICIENTNET_PACKAGE}efficientnet-b3_weights_tf_dim_ordering_tf_kernels_autoaugment_notop.h5",
        "c5d42eb6cfae8567b418ad3845cfd63aa48b87f1bd5df8658a49375a9f3135c7",
    ),
    "efn_b4": _sha256(
        f"{EFFICIENTNET_PACKAGE}efficientnet-b4_weights_tf_dim_ordering_tf_kernels_autoaugment_notop.h5",
        "7942c1407ff1feb34113995864970cd4d9d91ea64877e8d9c38b6c1e0767c411",
    ),
    "efn_b5": _sha256(
        f"{EFFICIENTNET_PACKAGE}efficientnet-b5_weights_tf_dim_ordering_tf_kernels_autoaugment_notop.h5",
        "9d197bc2bfe29165c10a2af8c2ebc67507f5d70456f09e584c71b822941b1952",
    ),
    "efn_b6": _sha256(
        f"{EFFICIENTNET_PACKAGE}efficientnet-b6_weights_tf_dim_ordering_tf_kernels_autoaugment_notop.h5",
        "1d0923bb038f2f8060faaf0a0449db4b96549a881747b7c7678724ac79f427ed",
    ),
    "efn_b7": _sha256(
        f"{EFFICIENTNET_PACKAGE}efficientnet-b7_weights_tf_dim_ordering_tf_kernels_autoaugment_notop.h5",
        "60b56ff3a8daccc8d96edfd40b204c113e51748da657afd58034d54d3cec2bac",
    ),
}

# MobileNetV2: one file per width multiplier (alpha) and input size. Keras publishes no hash for
# these files (its get_file call passes none); DVC's lock records the md5 of the first download.
MOBILENETV2_SIZES = (96, 128, 160, 192, 224)


def mobilenetv2_weights(alpha: float, input_size: int) -> WeightsFile:
    """The file keras.applications.MobileNetV2(weights="imagenet", include_top=False) asks for.

    As in Keras, a square input whose size has no file of its own gets the 224 file (the
    convolution weights fit any size; Keras warns and loads it).
    """
    rows = input_size if input_size in MOBILENETV2_SIZES else 224
    filename = f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(alpha)}_{rows}_no_top.h5"
    return WeightsFile(f"{KERAS}mobilenet_v2/{filename}", filename, None, None)


def lists_weights(model: str) -> bool:
    """Whether this module knows `model`'s ImageNet file: PUBLISHED, or MobileNetV2's by width."""
    return model in PUBLISHED or model == "mobilenetv2"


def published_weights(model: str, input_size: int, options: dict[str, Any]) -> WeightsFile:
    """The published no-top ImageNet weights file for a registry model at `input_size` with `options`.

    Raises UserError for a model that is not in the registry or has no pretrained weights, an input
    size below the smallest Keras accepts with them, or options Keras has no file for.
    """
    spec = get_backbone(model)
    if not spec.pretrained:
        raise UserError(f"backbone {model}: has no pretrained weights; set weights: null")
    if not lists_weights(model):
        # A pretrained registry entry added without its file: a bug, but one line says what to do.
        raise UserError(f"backbone {model}: no published weights file is listed in stages/weights.py; add it there")
    if input_size < spec.min_input_size:
        raise UserError(
            f"backbone {model}: input_size {input_size} is below {spec.min_input_size}, "
            f"the smallest its ImageNet weights accept"
        )
    if model == "mobilenetv2":
        alpha = options.get("alpha", 1.0)
        if problem := mobilenetv2_alpha_problem(alpha):
            raise UserError(f"backbone mobilenetv2: options.alpha {problem}")
        return mobilenetv2_weights(alpha, input_size)
    return PUBLISHED[model]


# --------------------------------------------------------------------------------------------
# The stage.


def fetch_weights(experiment_name: str, params_path: str, out: Path) -> dict[str, Any]:
    """Fill `out` with the experiment's weights file and `weights.json`; return the record, with `how`
    the file was obtained (None without weights)."""
    params = load_params(params_path)
    experiment = params.experiment(experiment_name)
    backbone = experiment.backbone
    stage = f"weights@{experiment.name}"
    if not backbone.weights:
        record: dict[str, Any] = {"experiment": experiment.name, "model": backbone.model, "weights": None}
        _publish(out, record, None)
        return {**record, "how": None}

    spec = get_backbone(backbone.model)
    size = backbone.input_size or spec.native_input_size or experiment.dataset.image_size
    published = published_weights(backbone.model, size, dict(backbone.options))
    overrides = params.experiments[experiment.name].backbone_overrides
    where = (
        f"experiments.{experiment.name}.backbone_overrides"
        if {"weights_url", "weights_sha256"} & set(overrides)
        else f"backbones.{experiment.backbone_name}"
    )
    key = f"{params_path}: {where}"
    # load_params checked the pin's form, the URL's, and that a weights_url comes with a pin.
    pinned = (backbone.weights_sha256 or "").strip().lower() or None
    if backbone.weights_url:
        url = backbone.weights_url
    else:
        url = published.url

    # What the file must match: the pinned sha256 if any, and the published hash of the published
    # file (a mirror's file is vouched for by its pin alone).
    expected: dict[str, str] = {}
    if pinned:
        expected["sha256"] = pinned
    if not backbone.weights_url and published.hash is not None and published.hash_algorithm:
        if published.hash_algorithm in expected and expected[published.hash_algorithm] != published.hash:
            raise ConfigError(
                f"{key}.weights_sha256: {pinned} is not the published sha256 of {published.filename} "
                f"({published.hash}); remove it or set weights_url to the file it pins"
            )
        expected[published.hash_algorithm] = published.hash.lower()

    target = download_cache("weights") / published.filename
    removed = ""

    project = _project_cache()
    locked = set(_locked_md5s(project[0] / "dvc.lock", published.filename, stage, project[1])) if project else set()

    def unvouched(path: Path) -> str | None:
        # What is wrong with a file no hash vouches for: not a Keras weights file, or not this base's
        # (unless dvc.lock, under git, names this very file: building the base costs seconds).
        if problem := _not_weights(path):
            return problem
        if _digests(path)["md5"] in locked:
            return None
        return _not_this_base(path, backbone.model, size, dict(backbone.options))

    digests: dict[str, str] | None = None
    if target.is_file():
        digests = _digests(target)
        mismatch = _mismatch(digests, expected)
        problem = f"had the wrong {mismatch}" if mismatch else None if expected else unvouched(target)
        if problem:
            # A stale or wrong file: fetch the one the pins name.
            target.unlink()
            digests = None
            removed = f"; the file that was there {problem} and was removed"
    how = "from the download cache"
    if digests is None and (found := _from_dvc_cache(project, published.filename, expected, experiment.name, unvouched)):
        # The file an earlier run of a weights stage put in DVC's cache (`dvc pull` fills it too):
        # a rerun after any change to the experiment's entry needs no network.
        copying = target.with_name(target.name + ".copying")
        copying.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(found, copying)
        os.replace(copying, target)
        digests = _digests(target)
        how = "from DVC's cache"
    if digests is None:
        how = "downloaded"
        try:
            download(url, target, sha256=None, what=stage)
        except UserError as error:
            # Training from scratch also gets past a machine with no way to the file, but it
            # trains another model than the course's pretrained one: the line says so.
            raise UserError(
                f"{stage}: cannot download {url} ({_reason(str(error), stage, url)}){removed}; "
                f"put that file at {target} and run again. Or train {backbone.model} from scratch instead, with "
                f"experiments.{experiment.name}.backbone_overrides: {{weights: null}}: another model, with no ImageNet start"
            ) from None
        digests = _digests(target)
        mismatch = _mismatch(digests, expected)
        if not expected and (problem := unvouched(target)):
            target.unlink()
            raise UserError(
                f"{stage}: the file downloaded from {url} {problem}; it was removed; run again, or put the "
                f"published file at {target}"
            )
        if mismatch:
            target.unlink()
            advice = (
                f"check {key}.weights_sha256 and the file at {url}"
                if pinned
                else "the upstream file changed or the download is corrupt; run again, or set weights_url "
                "and weights_sha256 to a copy you trust"
            )
            raise UserError(f"{stage}: {mismatch} for {url}; the file was removed; {advice}")

    record = {
        "experiment": experiment.name,
        "model": backbone.model,
        "weights": backbone.weights,
        "input_size": size,
        "url": url,
        "filename": published.filename,
        "bytes": target.stat().st_size,
        "sha256": digests["sha256"],
        "md5": digests["md5"],
        "published_url": published.url,
        "published_hash": published.hash,
        "published_hash_algorithm": published.hash_algorithm,
        # Whether the file is the published one, by its published hash (None: none is published).
        "matches_published": (
            None if published.hash_algorithm is None else digests[published.hash_algorithm] == published.hash.lower()
        ),
    }
    _publish(out, record, target)
    return {**record, "how": how}


def _project_cache() -> tuple[Path, Any] | None:
    """The root and local DVC cache of the project in the working directory, or None."""
    try:
        from dvc.exceptions import NotDvcRepoError
        from dvc.repo import Repo
    except ImportError:  # pragma: no cover - dvc is a dependency of the project
        return None
    try:
        root = Repo.find_root(os.getcwd())
        with Repo(root) as repo:
            return Path(root), repo.cache.local
    except (NotDvcRepoError, OSError):
        return None


def _from_dvc_cache(
    project: tuple[Path, Any] | None,
    filename: str,
    expected: dict[str, str],
    experiment: str,
    unvouched: Callable[[Path], str | None],
) -> Path | None:
    """A copy of `filename` in the DVC cache of the project in the working directory that passes
    the same checks as a download, or None. Looked up by the published md5 (DVC's cache is
    addressed by md5), then through dvc.lock: the weights stages' output folders recorded there,
    this experiment's first. Without `expected` hashes, dvc.lock (under git) is what vouches for a
    file, and only files named there are taken; `unvouched` must still find nothing wrong with them."""
    if project is None:
        return None
    root, cache = project
    candidates: list[str] = []
    if "md5" in expected:
        candidates.append(expected["md5"])
    candidates += _locked_md5s(Path(root) / "dvc.lock", filename, f"weights@{experiment}", cache)
    for md5 in dict.fromkeys(candidates):
        path = Path(cache.oid_to_path(md5))
        if not path.is_file():
            continue
        digests = _digests(path)
        if digests["md5"] != md5 or _mismatch(digests, expected):
            continue  # a corrupt cache entry, or a file the pins do not name
        if not expected and unvouched(path):
            continue
        return path
    return None


def _locked_md5s(lock: Path, filename: str, stage: str, cache: Any) -> list[str]:
    """The md5s dvc.lock gives `filename` in the weights stages' output folders, `stage`'s first."""
    try:
        import yaml

        stages = (yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages") or {}
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return []
    names = sorted((name for name in stages if str(name).startswith("weights@")), key=lambda name: name != stage)
    found: list[str] = []
    for name in names:
        for out in (stages[name] or {}).get("outs") or []:
            folder = str((out or {}).get("md5") or "")
            if not folder.endswith(".dir"):
                continue
            try:
                listing = json.loads(Path(cache.oid_to_path(folder)).read_text(encoding="utf-8"))
                found += [entry["md5"] for entry in listing if entry.get("relpath") == filename]
            except (OSError, ValueError, TypeError, KeyError, AttributeError):
                continue
    return found


def _not_weights(path: Path) -> str | None:
    """Why `path` is not a Keras weights file ("is not ..."), or None. For a file no hash vouches
    for (MobileNetV2's: Keras publishes none): an HTML error page or a truncated download would
    otherwise pass as the weights until training tried to load them. Keras's legacy HDF5 loader
    reads `layer_names` at the top of the file or under `model_weights`."""
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            group = handle["model_weights"] if "layer_names" not in handle.attrs and "model_weights" in handle else handle
            if len(group.attrs.get("layer_names", [])) == 0:
                return "is not a Keras weights file (an HDF5 file, but no layer_names in it)"
    except OSError as error:
        return f"is not a Keras weights file (not readable as HDF5: {str(error).split(';')[0]})"
    return None


def _not_this_base(path: Path, model: str, size: int, options: dict[str, Any]) -> str | None:
    """Why the Keras weights file `path` does not load into `model`'s base without its top, or None.
    For a file no hash vouches for: MobileNetV2's with-top file, or another width's, is a weights
    file too, and training would fail on it with advice to run this stage again, which would take
    the same file again. Loaded as Keras loads its ImageNet weights (by layer order and shape)."""
    import tempfile

    # Only what loading says of the file is its fault: a full disk or a failing build is not, and
    # goes up as such (the file is kept).
    base = get_backbone(model).build((size, size, 3), None, options)
    with tempfile.TemporaryDirectory() as folder:
        # load_weights goes by the name's suffix, which a file in DVC's cache lacks.
        named = Path(folder) / "weights.h5"
        named.symlink_to(path.resolve())
        try:
            base.load_weights(str(named))
        except (ValueError, KeyError, TypeError, IndexError) as error:  # layer count, names or shapes
            detail = (str(error).strip().splitlines() or [""])[0]
            return (f"does not fit {model}'s base at {size}x{size} with options {options} "
                    f"({type(error).__name__}: {detail})")
    return None


def _digests(path: Path) -> dict[str, str]:
    """sha256 and md5 of a file, in one read."""
    sha256, md5 = hashlib.sha256(), hashlib.md5()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            sha256.update(block)
            md5.update(block)
    return {"sha256": sha256.hexdigest(), "md5": md5.hexdigest()}


def _mismatch(digests: dict[str, str], expected: dict[str, str]) -> str | None:
    """'<algorithm> (expected X, got Y)' for the first expected hash the file's digests fail, else None."""
    for algorithm, wanted in expected.items():
        if digests[algorithm] != wanted:
            return f"{algorithm} (expected {wanted}, got {digests[algorithm]})"
    return None


def _reason(message: str, stage: str, url: str) -> str:
    """The reason part of a downloads.download error, without its prefix, URL and advice."""
    reason = message.removeprefix(f"{stage}: ").split("; ", 1)[0]
    reason = reason.replace(f"downloading {url} ", "").replace(f"{url} ", "").strip()
    return reason or "download failed"


def _publish(out: Path, record: dict[str, Any], source: Path | None) -> None:
    """Write `out` as a sibling `.partial` folder and rename it into place, so that a killed run
    never leaves a folder that looks complete."""
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        if source is not None:
            destination = partial / source.name
            try:
                # A hard link costs no space; DVC's cache (type hardlink) then shares it too.
                os.link(source, destination)
            except OSError:
                shutil.copyfile(source, destination)
        write_json_atomic(partial / RECORD, record)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)


# --------------------------------------------------------------------------------------------
# For the train stage.


def weights_path(folder: Path) -> str | None:
    """The absolute path of the weights file the weights stage left in `folder`, or None when the
    experiment trains from scratch (weights: null). Fails with one line if the stage has not run."""
    folder = Path(folder)
    stage = f"weights@{folder.name}"
    try:
        record = json.loads((folder / RECORD).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{folder / RECORD}: not found; run {stage} first (dvc repro {stage})") from None
    except (OSError, ValueError) as error:
        raise UserError(f"{folder / RECORD}: unreadable ({error}); run {stage} again") from None
    if not isinstance(record, dict) or "weights" not in record:
        raise UserError(f"{folder / RECORD}: not a weights record; run {stage} again")
    if record["weights"] is None:
        return None
    path = (folder / str(record.get("filename", ""))).resolve()
    if not record.get("filename") or not path.is_file():
        raise UserError(f"{path}: the weights file is missing; run {stage} again (dvc repro {stage})")
    if record.get("bytes") is not None and path.stat().st_size != record["bytes"]:
        raise UserError(
            f"{path}: {path.stat().st_size:,} bytes where {RECORD} says {record['bytes']:,}; run {stage} again"
        )
    # The digest train records in MLflow is the one weights.json holds: it must be this file's.
    if record.get("sha256") and _digests(path)["sha256"] != record["sha256"]:
        raise UserError(
            f"{path}: its sha256 is not the {record['sha256'][:12]}... {RECORD} records (the file changed "
            f"after {stage} wrote it); run {stage} again (dvc repro {stage})"
        )
    return str(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", required=True, help="an experiment name from params.yaml")
    parser.add_argument("--out", type=Path, required=True, help="folder to write the weights file and weights.json into")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    record = fetch_weights(args.experiment, args.params, args.out)
    if record["weights"] is None:
        print(f"weights@{record['experiment']}: {record['model']} trains from scratch (weights: null); {args.out}")
        return
    print(
        f"weights@{record['experiment']}: {record['filename']} ({record['bytes']:,} bytes, sha256 "
        f"{record['sha256'][:12]}...) {record['how']}, in {args.out}"
    )


if __name__ == "__main__":
    run_stage(main)
