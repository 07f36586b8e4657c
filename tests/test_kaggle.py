"""The kaggle source against a fake Kaggle API, driven by the real `kaggle` client.

tests/fake_kaggle.py routes the client's HTTPS through a local CONNECT proxy that answers for
api.kaggle.com and storage.googleapis.com with a throwaway CA, so nothing here patches the client:
the requests, redirects, authentication and resumes are the ones it makes against Kaggle.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import io
import json
import os
import shutil
import uuid
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image


from fake_kaggle import CREATED, RULES_MESSAGE, FakeKaggle  # noqa: E402

from stages import kaggle_api  # noqa: E402
from stages.errors import UserError  # noqa: E402
from stages.fetch import fetch as fetch_stage  # noqa: E402
from stages.sources import KaggleOptions, get_source  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOKEN_PAGE_URL = "https://www.kaggle.com/settings/api"
MIB = 1 << 20


def png(seed: int, size: int = 6) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def zip_bytes(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as handle:
        for name, data in entries.items():
            handle.writestr(name, data)
    return buffer.getvalue()


def class_images(seed: int = 0) -> dict[str, bytes]:
    """A miniature class-folder dataset: two classes, two tiny PNGs each."""
    return {f"{label}/{index}.png": png(seed + 10 * k + index) for k, label in enumerate(("cat", "dog")) for index in range(2)}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def files_under(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def run(tmp_path: Path, name: str = "demo", **options) -> tuple[dict, Path]:
    """Fetch through the registered `kaggle` source into a fresh, empty folder."""
    dest = tmp_path / "raw" / f"{name}-{uuid.uuid4().hex[:8]}"
    dest.mkdir(parents=True)
    return get_source("kaggle").fetch(KaggleOptions(**options), dest, name), dest


def fails(tmp_path: Path, **options) -> str:
    with pytest.raises(UserError) as caught:
        run(tmp_path, **options)
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.fixture
def fake(tmp_path, monkeypatch):
    with FakeKaggle(tmp_path) as server:
        server.apply(monkeypatch)
        yield server


DS_PATH = "/kaggle-fake/datasets/own/pets/{}/pets.zip"


# --------------------------------------------------------------------------------------------
# Fetching.


def test_dataset_fetch_resolves_the_current_version_and_fills_dest(fake, tmp_path):
    """Unpinned: the API's current version is asked for, downloaded, extracted and recorded."""
    old, new = zip_bytes(class_images(0)), zip_bytes(class_images(100))
    fake.add_dataset("own/pets", old, version=1)
    fake.add_dataset("own/pets", new, version=2)

    details, dest = run(tmp_path, dataset="own/pets")

    assert files_under(dest) == class_images(100)
    assert details["origin"] == "kaggle dataset own/pets version 2"
    assert details["version"] == 2
    assert details["archives"] == [{"name": "pets.zip", "sha256": sha256(new), "bytes": len(new)}]
    assert details["refused"] == [] and details["this_run"]["downloaded"] is True
    assert len(fake.rpc("GetDataset")) == 1
    assert [s.body.get("datasetVersionNumber") for s in fake.rpc("DownloadDataset")] == [2]
    assert fake.count("GET", DS_PATH.format(2)) == 1
    cached = fake.downloads / "demo" / "kaggle" / "datasets" / "own" / "pets" / "v2" / "pets.zip"
    assert cached.read_bytes() == new


def test_pinned_version_is_requested_as_asked(fake, tmp_path):
    old, new = zip_bytes(class_images(0)), zip_bytes(class_images(100))
    fake.add_dataset("own/pets", old, version=1)
    fake.add_dataset("own/pets", new, version=2)

    details, dest = run(tmp_path, dataset="own/pets", version=1)

    assert [s.body.get("datasetVersionNumber") for s in fake.rpc("DownloadDataset")] == [1]
    assert fake.rpc("GetDataset") == []  # a pinned version needs no lookup
    assert files_under(dest) == class_images(0)
    assert details["version"] == 1
    assert details["origin"] == "kaggle dataset own/pets version 1"
    assert details["archives"][0]["sha256"] == sha256(old)


def test_competition_fetch_extracts_the_zips_nested_in_the_bundle(fake, tmp_path):
    """Kaggle zips competition files inside the bundle (train.csv.zip); those are unpacked too."""
    csv = b"id,label\n1,cat\n2,dog\n"
    bundle = zip_bytes({"train.csv.zip": zip_bytes({"train.csv": csv}), **class_images(7)})
    fake.add_competition("pets-challenge", bundle)

    details, dest = run(tmp_path, competition="pets-challenge")

    assert files_under(dest) == {"train.csv": csv, **class_images(7)}
    assert details["origin"] == "kaggle competition pets-challenge"
    assert details["version"] is None
    assert details["archives"] == [{"name": "pets-challenge.zip", "sha256": sha256(bundle), "bytes": len(bundle)}]
    assert [s.body for s in fake.rpc("DownloadDataFiles")] == [{"competitionName": "pets-challenge"}]


def test_files_subset_downloads_only_those_files(fake, tmp_path):
    """`files`: one request per file; a file Kaggle serves zipped lands under its own name."""
    labels = b"file,label\ncat/0.png,cat\n"
    fake.add_dataset(
        "own/pets",
        zip_bytes(class_images(0)),
        version=3,
        files={"cat/0.png": png(1)},
        zipped_files={"meta/labels.csv": zip_bytes({"labels.csv": labels})},
    )

    details, dest = run(tmp_path, dataset="own/pets", version=3, files=["cat/0.png", "meta/labels.csv"])

    assert files_under(dest) == {"cat/0.png": png(1), "meta/labels.csv": labels}
    assert sorted(s.body.get("fileName") for s in fake.rpc("DownloadDataset")) == ["cat/0.png", "meta/labels.csv"]
    assert fake.count("GET", DS_PATH.format(3)) == 0  # never the whole bundle
    assert [a["name"] for a in details["archives"]] == ["files/cat/0.png", "files/meta/labels.csv.zip"]
    assert details["origin"] == "kaggle dataset own/pets version 3, files cat/0.png, meta/labels.csv"


def test_competition_files_subset(fake, tmp_path):
    fake.add_competition("pets-challenge", zip_bytes(class_images(0)), files={"sample.csv": b"id\n1\n"})

    details, dest = run(tmp_path, competition="pets-challenge", files=["sample.csv"])

    assert files_under(dest) == {"sample.csv": b"id\n1\n"}
    assert [s.body for s in fake.rpc("DownloadDataFile")] == [{"competitionName": "pets-challenge", "fileName": "sample.csv"}]
    assert fake.rpc("DownloadDataFiles") == []
    # For `fetch --check`: Kaggle's list of the files fetched, not of the whole competition.
    assert details["competition_files"] == [{"name": "sample.csv", "bytes": 5, "created": CREATED}]


# --------------------------------------------------------------------------------------------
# The download cache and resuming.


def test_rerun_with_the_archive_cached_downloads_nothing(fake, tmp_path):
    archive = zip_bytes(class_images(0))
    fake.add_dataset("own/pets", archive, version=1)
    first, _ = run(tmp_path, dataset="own/pets", version=1)
    gets, everything = fake.count("GET", DS_PATH.format(1)), fake.count()

    again, dest = run(tmp_path, dataset="own/pets", version=1)

    assert again["this_run"]["downloaded"] is False and first["this_run"]["downloaded"] is True
    assert gets == 1 and fake.count("GET", DS_PATH.format(1)) == 1
    assert fake.count() == everything  # a pinned version, verified in the cache: no request at all
    assert files_under(dest) == class_images(0)
    assert again["archives"] == first["archives"]


def test_unpinned_rerun_only_asks_for_the_current_version(fake, tmp_path):
    fake.add_dataset("own/pets", zip_bytes(class_images(0)), version=1)
    run(tmp_path, dataset="own/pets")
    gets = fake.count("GET")

    again, dest = run(tmp_path, dataset="own/pets")

    assert again["this_run"]["downloaded"] is False and again["version"] == 1
    assert fake.count("GET") == gets and len(fake.rpc("DownloadDataset")) == 1
    assert len(fake.rpc("GetDataset")) == 2
    # A new version on Kaggle is a new download.
    newer = zip_bytes(class_images(50))
    fake.add_dataset("own/pets", newer, version=2)
    latest, dest = run(tmp_path, dataset="own/pets")
    assert latest["this_run"]["downloaded"] is True and latest["version"] == 2
    assert files_under(dest) == class_images(50)


def test_a_damaged_cached_archive_is_downloaded_again(fake, tmp_path):
    archive = zip_bytes(class_images(0))
    fake.add_dataset("own/pets", archive, version=1)
    run(tmp_path, dataset="own/pets", version=1)
    cached = fake.downloads / "demo" / "kaggle" / "datasets" / "own" / "pets" / "v1" / "pets.zip"
    cached.write_bytes(archive[:-1] + bytes([archive[-1] ^ 0xFF]))  # same size, one byte flipped

    again, dest = run(tmp_path, dataset="own/pets", version=1)

    assert again["this_run"]["downloaded"] is True
    assert cached.read_bytes() == archive
    assert files_under(dest) == class_images(0)


def test_competition_rerun_checks_the_server_but_reads_no_body_unless_it_changed(fake, tmp_path):
    """No versions: the archive is revalidated with the size, ETag and MD5 the server announces."""
    bundle = zip_bytes(class_images(0))
    fake.add_competition("pets-challenge", bundle)
    run(tmp_path, competition="pets-challenge")
    cached = fake.downloads / "demo" / "kaggle" / "competitions" / "pets-challenge" / "pets-challenge.zip"
    stamp = cached.stat().st_mtime_ns

    again, dest = run(tmp_path, competition="pets-challenge")

    assert again["this_run"]["downloaded"] is False
    assert cached.stat().st_mtime_ns == stamp and files_under(dest) == class_images(0)
    changed = zip_bytes(class_images(30))
    fake.add_competition("pets-challenge", changed)
    third, dest = run(tmp_path, competition="pets-challenge")
    assert third["this_run"]["downloaded"] is True and cached.read_bytes() == changed
    assert files_under(dest) == class_images(30)


def big_archive() -> bytes:
    """A zip over the client's 1 MiB read size, so an interruption leaves a partial file."""
    return zip_bytes({"cat/0.png": png(0), "blob/noise.bin": os.urandom(MIB + MIB // 2)})


def test_an_interrupted_download_resumes_on_the_next_run(fake, tmp_path, monkeypatch):
    archive = big_archive()
    fake.add_dataset("own/pets", archive, version=1)
    monkeypatch.setattr(kaggle_api, "DOWNLOAD_RETRIES", 0)  # give up at once: the run fails
    fake.cut_once(DS_PATH.format(1), MIB + 200_000)

    message = fails(tmp_path, dataset="own/pets", version=1)

    assert "interrupted" in message and "run again to resume" in message
    partial = fake.downloads / "demo" / "kaggle" / "datasets" / "own" / "pets" / "v1" / "pets.zip"
    kept = partial.stat().st_size
    assert 0 < kept < len(archive)
    details, dest = run(tmp_path, dataset="own/pets", version=1)
    ranges = [s.headers.get("range") for s in fake.requests("GET", DS_PATH.format(1))]
    assert f"bytes={kept}-" in ranges
    assert details["this_run"]["downloaded"] is True
    assert details["archives"][0]["sha256"] == sha256(archive) == sha256(partial.read_bytes())
    assert (dest / "cat" / "0.png").read_bytes() == png(0)


def test_a_download_cut_off_once_resumes_within_the_run(fake, tmp_path):
    """The client's own retry resumes with a Range request (after its ~2 s backoff)."""
    archive = big_archive()
    fake.add_dataset("own/pets", archive, version=1)
    fake.cut_once(DS_PATH.format(1), MIB + 200_000)

    details, _ = run(tmp_path, dataset="own/pets", version=1)

    gets = fake.requests("GET", DS_PATH.format(1))
    assert [(s.status, s.headers.get("range") is None) for s in gets] == [(200, True), (206, False)]
    offset = int(gets[1].headers["range"].removeprefix("bytes=").removesuffix("-"))
    assert 0 < offset <= MIB + 200_000  # from where the cut left the file, not from scratch
    assert details["archives"][0]["sha256"] == sha256(archive)


def test_a_signed_link_that_expires_mid_download_says_run_again_and_the_rerun_resumes(fake, tmp_path, monkeypatch):
    """The client retries a dropped download with the same signed link; once that link has
    expired, storage answers 400 ExpiredToken. That is no "no access" of the API: the message
    says to run again, and the run asks for a new link and resumes."""
    archive = big_archive()
    fake.add_dataset("own/pets", archive, version=1)
    fake.links_expire_on_cut = True
    monkeypatch.setattr(kaggle_api, "DOWNLOAD_RETRIES", 1)  # one retry with the old link
    fake.cut_once(DS_PATH.format(1), MIB + 200_000)

    message = fails(tmp_path, dataset="own/pets", version=1)

    partial = fake.downloads / "demo" / "kaggle" / "datasets" / "own" / "pets" / "v1" / "pets.zip"
    kept = partial.stat().st_size
    assert message == (
        f"the download link for dataset own/pets version 1 stopped working after {kept:,} bytes (HTTP 400 from "
        f"storage.googleapis.com; Kaggle's signed links expire); run again: it asks Kaggle for a new link and "
        f"resumes from the partial file in {partial.parent}"
    )
    details, dest = run(tmp_path, dataset="own/pets", version=1)
    gets = fake.requests("GET", DS_PATH.format(1))
    assert [(s.status, s.headers.get("range")) for s in gets][-1] == (206, f"bytes={kept}-")
    assert details["archives"][0]["sha256"] == sha256(archive)
    assert (dest / "cat" / "0.png").read_bytes() == png(0)


def test_a_download_the_disk_cannot_hold_is_refused_before_it_starts(fake, tmp_path, monkeypatch):
    """Else the client retries a full disk for a minute and the message names no folder."""
    fake.add_dataset("own/pets", big_archive(), version=1)
    monkeypatch.setattr(kaggle_api.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 5000, 5000))

    message = fails(tmp_path, dataset="own/pets", version=1)

    folder = fake.downloads / "demo" / "kaggle" / "datasets" / "own" / "pets" / "v1"
    assert message.startswith(f"{folder}: no room for dataset own/pets version 1 (")
    assert "5,000 free); free some space, or set CLASSMATRIX_DOWNLOADS" in message
    assert not (folder / "pets.zip").exists()  # the response was opened, its body never read


def test_a_rate_limit_keeps_kaggles_own_words(fake, tmp_path, monkeypatch):
    fake.add_dataset("own/pets", zip_bytes(class_images(0)), version=1)
    answer = fake._api

    def limited(method, body, headers):
        if method == "DownloadDataset":
            return 429, {"code": 429, "message": "Too many requests. Please try again in 57 seconds."}
        return answer(method, body, headers)

    monkeypatch.setattr(fake, "_api", limited)

    message = fails(tmp_path, dataset="own/pets", version=1)

    assert "(HTTP 429: Too many requests. Please try again in 57 seconds.); wait a while and run again" in message


# --------------------------------------------------------------------------------------------
# Credentials and errors: one line each, saying what to do.


def test_no_credentials_is_one_line_naming_where_they_were_looked_for(fake, tmp_path, monkeypatch, capsys):
    fake.apply(monkeypatch, credentials="none")
    fake.add_dataset("own/pets", zip_bytes(class_images(0)))

    message = fails(tmp_path, dataset="own/pets")

    assert message.startswith("datasets.demo.source: no Kaggle credentials found")
    for looked_at in ("KAGGLE_API_TOKEN", "~/.kaggle/access_token", "kaggle.json", "KAGGLE_USERNAME", "KAGGLE_KEY"):
        assert looked_at in message
    assert "https://www.kaggle.com/settings/api" in message
    captured = capsys.readouterr()
    assert "Authentication required" not in captured.out + captured.err  # the client's help text
    assert fake.count("POST") == 0


@pytest.mark.parametrize("content, problem", [
    ('{"username": "own", "key": "abc",}', "is not valid JSON (line 1"),  # a trailing comma, hand-edited
    ('["own", "abc"]', "is not a JSON object"),
    ('{"username": "own"}', "has no \"key\""),
])
def test_a_malformed_kaggle_json_is_named_not_reported_as_missing(fake, tmp_path, content, problem):
    """The client swallows a kaggle.json it cannot parse (then "no credentials found", while the
    file is right there), and a JSON list crashed it with a TypeError."""
    config = Path(os.environ["KAGGLE_CONFIG_DIR"]) / "kaggle.json"
    config.write_text(content)
    fake.add_dataset("own/pets", zip_bytes(class_images(0)))

    message = fails(tmp_path, dataset="own/pets")

    assert message.startswith(f"datasets.demo.source: {config} {problem}"), message
    assert TOKEN_PAGE_URL in message and "abc" not in message


def test_bad_key_is_a_401_naming_the_credentials_file(fake, tmp_path):
    fake.write_kaggle_json(Path(os.environ["KAGGLE_CONFIG_DIR"]), key="wrong" + fake.key[5:])
    fake.add_dataset("own/pets", zip_bytes(class_images(0)))

    message = fails(tmp_path, dataset="own/pets")  # the first call, the version lookup, is refused

    assert "HTTP 401" in message and os.environ["KAGGLE_CONFIG_DIR"] + "/kaggle.json" in message
    assert "https://www.kaggle.com/settings/api" in message
    assert fake.key[5:] not in message


def test_an_expired_access_token_is_reported_as_rejected(fake, tmp_path, monkeypatch):
    fake.apply(monkeypatch, credentials="none")
    monkeypatch.setenv("KAGGLE_API_TOKEN", "KGAT_expired")

    message = fails(tmp_path, dataset="own/pets", version=1)

    assert "rejected the access token from KAGGLE_API_TOKEN" in message
    assert "KGAT_expired" not in message
    assert [s.body for s in fake.rpc("IntrospectToken")][-1] == {"token": "KGAT_expired"}


def test_an_access_token_pasted_with_a_line_break_works_and_a_broken_one_is_never_printed(fake, tmp_path, monkeypatch):
    """A token copied with its line break (a CI secret, `export KAGGLE_API_TOKEN="$(cat ...)\n"`):
    the client puts it in an Authorization header as it is, and urllib3 refused the header with a
    ValueError traceback that printed the token. Around it, the break is dropped, as the client
    does for ~/.kaggle/access_token; inside it, one line that does not show the token."""
    fake.apply(monkeypatch, credentials="none")
    fake.add_dataset("own/pets", zip_bytes(class_images(0)), version=1)
    monkeypatch.setenv("KAGGLE_API_TOKEN", f" {fake.token}\n")

    details, dest = run(tmp_path, dataset="own/pets", version=1)

    assert details["version"] == 1 and len(files_under(dest)) == 4

    monkeypatch.setenv("KAGGLE_API_TOKEN", f"{fake.token[:8]}\n{fake.token[8:]}")
    message = fails(tmp_path, dataset="own/pets")  # unpinned: the version is asked for

    assert "KAGGLE_API_TOKEN" in message and "line break" in message and TOKEN_PAGE_URL in message
    assert fake.token[8:] not in message and fake.token[:8] not in message


def test_competition_rules_not_accepted_gives_the_rules_url(fake, tmp_path):
    fake.add_competition("pets-challenge", zip_bytes(class_images(0)), rules_accepted=False)

    message = fails(tmp_path, competition="pets-challenge")

    assert "HTTP 403" in message and RULES_MESSAGE in message
    assert "https://www.kaggle.com/competitions/pets-challenge/rules" in message
    assert "accept" in message


def test_private_dataset_is_a_403_without_rules_advice(fake, tmp_path):
    fake.add_dataset("own/secret", zip_bytes(class_images(0)), private=True)

    message = fails(tmp_path, dataset="own/secret", version=1)

    assert "no access to dataset own/secret version 1 (HTTP 403" in message
    assert "/rules" not in message


@pytest.mark.parametrize(
    "options, named",
    [
        ({"dataset": "own/missing"}, "dataset own/missing"),
        ({"dataset": "own/pets", "version": 9}, "dataset own/pets version 9"),
        ({"dataset": "own/pets", "version": 1, "files": ["nope.csv"]}, "file 'nope.csv' of dataset own/pets version 1"),
        ({"competition": "no-such-challenge"}, "competition no-such-challenge"),
    ],
)
def test_not_found_names_what_was_missing(fake, tmp_path, options, named):
    fake.add_dataset("own/pets", zip_bytes(class_images(0)), version=1)

    message = fails(tmp_path, **options)

    assert f"{named} was not found on Kaggle (HTTP 404" in message


def test_server_down_is_a_network_error_naming_the_host(fake, tmp_path):
    fake.add_dataset("own/pets", zip_bytes(class_images(0)))
    fake.stop()  # the port is closed now

    message = fails(tmp_path, dataset="own/pets", version=1)

    assert "cannot reach api.kaggle.com through the proxy" in message
    assert f"127.0.0.1:{fake.port}" in message and "connection refused" in message


def test_a_stalled_server_times_out_with_a_network_error(fake, tmp_path, monkeypatch):
    """The client sets no timeout on its calls; the source adds one, so a stall cannot hang a run."""
    fake.add_dataset("own/pets", zip_bytes(class_images(0)))
    monkeypatch.setattr(kaggle_api, "TIMEOUT", (5, 0.3))
    fake.stall_once("DownloadDataset", 1.5)

    message = fails(tmp_path, dataset="own/pets", version=1)

    assert "api.kaggle.com did not answer in time" in message and "proxy" in message


@pytest.mark.parametrize("options", [{"dataset": "own/pets", "competition": "pets"}, {}], ids=["both", "neither"])
def test_exactly_one_of_dataset_and_competition(tmp_path, options):

    message = fails(tmp_path, **options)

    assert message.startswith("datasets.demo.source: a kaggle source needs exactly one of")


def test_malformed_references_are_refused_before_any_request(tmp_path):
    assert "datasets.demo.source.dataset" in fails(tmp_path, dataset="https://www.kaggle.com/datasets/own/pets")
    assert "datasets.demo.source.version" in fails(tmp_path, competition="pets", version=2)
    assert "datasets.demo.source.files" in fails(tmp_path, dataset="own/pets", files=["../x.csv"])


@pytest.mark.parametrize("pasted, pin", [
    ("https://www.kaggle.com/datasets/own/pets", "`dataset: own/pets`"),
    ("https://www.kaggle.com/datasets/own/pets/versions/3", "`dataset: own/pets` and `version: 3`"),
    ("own/pets/versions/3", "`dataset: own/pets` and `version: 3`"),  # a kagglehub handle
    ("www.kaggle.com/datasets/own/pets/data?select=train.csv", "`dataset: own/pets`"),
])
def test_a_pasted_dataset_url_or_versioned_handle_gets_the_keys_to_write(tmp_path, pasted, pin):
    """A version page's URL, or kagglehub's `owner/slug/versions/N`: the part after
    kaggle.com/datasets/, as the message said to use, still holds the version; the message now
    gives the reference and the version pin to write (before: 'use the part after
    kaggle.com/datasets/ (e.g. msambare/fer2013)', what was done)."""
    message = fails(tmp_path, dataset=pasted)

    assert message.startswith(f"datasets.demo.source.dataset: {pasted!r} is not an <owner>/<slug> reference;")
    assert message.endswith(f"write {pin}"), message


@pytest.mark.parametrize("pasted, hint", [
    ("kaggle.com/competitions/titanic", "`competition: titanic`"),
    ("https://www.kaggle.com/competitions/titanic/data", "`competition: titanic`"),
    ("www.kaggle.com/code/alice/eda", "(e.g. msambare/fer2013)"),
])
def test_a_pasted_url_of_another_kaggle_page_is_not_read_as_owner_and_slug(tmp_path, pasted, hint):
    """A page that is not a dataset's, pasted without https://: its host is not an owner (before:
    'write `dataset: kaggle.com/competitions`', a reference that is wrong again); a competition's
    page gives the key to write instead."""
    message = fails(tmp_path, dataset=pasted)

    assert "`dataset: " not in message, message
    assert message.endswith(hint), message


# --------------------------------------------------------------------------------------------
# Safety: hostile archives, secrets, key file permissions.


def test_entries_escaping_dest_are_refused_and_reported(fake, tmp_path):
    inner = zip_bytes({"../inner-evil.txt": b"x", "ok.csv": b"a\n"})
    bundle = zip_bytes({"../evil.txt": b"owned", "/abs.txt": b"owned", "nested.zip": inner, **class_images(0)})
    fake.add_dataset("own/pets", bundle)

    details, dest = run(tmp_path, dataset="own/pets", version=1)

    assert {(r["archive"], r["entry"]) for r in details["refused"]} == {
        ("pets.zip", "../evil.txt"),
        ("pets.zip", "/abs.txt"),
        ("nested.zip", "../inner-evil.txt"),
    }
    assert files_under(dest) == {"ok.csv": b"a\n", **class_images(0)}
    assert not [p for p in tmp_path.rglob("*evil.txt")] and not [p for p in tmp_path.rglob("abs.txt")]


def test_a_damaged_archive_inside_a_whole_download_is_named_as_kaggles_own(fake, tmp_path):
    """A dataset whose zip is whole but holds a damaged `parts/train.zip`: one line naming it in
    the dataset, saying fetching again gives the same bytes, and where to tell the owner (before:
    '<dest>/parts/train.zip: not a readable archive (...); download it again')."""
    fake.add_dataset("own/pets", zip_bytes({"parts/train.zip": b"not a zip" * 20, **class_images(0)}))

    message = fails(tmp_path, dataset="own/pets", version=1)

    assert message.startswith("parts/train.zip inside kaggle dataset own/pets version 1: not a readable archive "
                              "(File is not a zip file); the source itself holds it damaged"), message
    assert "https://www.kaggle.com/datasets/own/pets/versions/1" in message and "download it again" not in message


def params_with_kaggle_source(tmp_path: Path, source: dict) -> Path:
    raw = copy.deepcopy(yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8")))
    raw["datasets"]["digits"]["source"] = {"kind": "kaggle", **source}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


@pytest.mark.parametrize("credentials", ["kaggle.json", "env", "token", "token-file"])
def test_credentials_never_reach_output_provenance_or_cache(fake, tmp_path, monkeypatch, capsys, credentials):
    """The whole fetch stage, for each way of giving credentials; the fake checks they are sent."""
    fake.apply(monkeypatch, credentials=credentials)
    fake.add_dataset("own/pets", zip_bytes(class_images(0)), version=1)
    params = params_with_kaggle_source(tmp_path, {"dataset": "own/pets"})
    provenance = tmp_path / "raw" / "digits.provenance.json"

    record = fetch_stage("digits", str(params), tmp_path / "raw" / "digits", provenance)

    assert record["files"] == 4 and record["origin"] == "kaggle dataset own/pets version 1"
    assert json.loads(provenance.read_text(encoding="utf-8")) == record
    sent = {s.headers.get("authorization", "").split(" ")[0] for s in fake.requests("POST")}
    assert sent == ({"Bearer"} if credentials.startswith("token") else {"Basic"})
    captured = capsys.readouterr()
    cache_files = "".join(p.read_text(errors="replace") for p in fake.downloads.rglob("*.json"))
    basic = base64.b64encode(f"{fake.username}:{fake.key}".encode()).decode()
    for secret in (fake.key, fake.token, basic):
        for text in (provenance.read_text(encoding="utf-8"), captured.out, captured.err, cache_files):
            assert secret not in text


def test_a_key_file_readable_by_others_warns_once_on_stderr(fake, tmp_path, capsys):
    os.chmod(Path(os.environ["KAGGLE_CONFIG_DIR"]) / "kaggle.json", 0o644)
    fake.add_dataset("own/pets", zip_bytes(class_images(0)), version=1)

    run(tmp_path, dataset="own/pets", version=1)

    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if "chmod 600" in line]
    assert len(warnings) == 1 and "kaggle.json" in warnings[0] and "readable by other users" in warnings[0]
    assert "Your Kaggle API key is readable" not in captured.out  # the client's own warning is not repeated


# --------------------------------------------------------------------------------------------
# `python -m stages.fetch --check`: a new version on Kaggle, which DVC cannot see.


def check_project(tmp_path: Path, monkeypatch, pets: dict, local: bool = False) -> Path:
    """A project whose dataset `pets` has the kaggle source `pets` (and `shapes`, a local folder of
    cat and dog images, if `local`), run from its folder; returns it."""
    from tests.toy import toy_params

    project = tmp_path / "project"
    project.mkdir()
    params = toy_params(["cat", "dog"])
    entry = params["datasets"].pop("toy")
    params["datasets"]["pets"] = {**entry, "source": {"kind": "kaggle", **pets}}
    if local:
        for name, data in class_images(7).items():
            (project / "shapes" / name).parent.mkdir(parents=True, exist_ok=True)
            (project / "shapes" / name).write_bytes(data)
        params["datasets"]["shapes"] = {**entry, "source": {"kind": "local", "path": "shapes"}}
    (project / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    monkeypatch.chdir(project)
    return project


def fetch_into_project(name: str) -> dict:
    return fetch_stage(name, "params.yaml", Path(f"data/raw/{name}"), Path(f"data/raw/{name}.provenance.json"))


def run_check(capsys, *argv: str) -> tuple[int, list[str]]:
    from stages.fetch import main

    capsys.readouterr()
    try:
        main(["--check", *argv])
        status = 0
    except SystemExit as exit_status:
        status = exit_status.code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    return status, captured.out.splitlines()


def test_check_sees_a_new_kaggle_version_of_an_unpinned_dataset(fake, tmp_path, monkeypatch, capsys):
    """Unpinned, fetch takes Kaggle's latest version, and DVC cannot see a newer one: --check asks
    Kaggle (through the client fetch uses) and reports it like a changed local source, exit 1,
    with the pin that makes it a params change; before, it said 'not local; nothing to check'."""
    fake.add_dataset("own/pets", zip_bytes(class_images(0)), version=1)
    check_project(tmp_path, monkeypatch, {"dataset": "own/pets"})
    fetch_into_project("pets")

    assert run_check(capsys) == (0, [
        "fetch: pets is version 1 of Kaggle dataset own/pets, the latest; pin it (datasets.pets.source.version: 1) "
        "so that DVC and CI see a new version"])

    fake.add_dataset("own/pets", zip_bytes(class_images(100)), version=2)
    assert run_check(capsys, "--dataset", "pets") == (1, [
        "fetch@pets: Kaggle dataset own/pets has a new version, 2 (fetch@pets took version 1); DVC cannot see it: "
        "to use it, pin it, datasets.pets.source.version: 2, a params change that `dvc repro` and CI's "
        "`plan --changed` see"])
    assert len(fake.rpc("GetDataset")) == 3  # one for the fetch, one for each check

    # Version 2 deleted on Kaggle after fetch@ took it: a new fetch would take 1, not "a new version".
    fetch_into_project("pets")
    del fake.datasets["own/pets"].versions[2]
    assert run_check(capsys) == (1, [
        "fetch@pets: Kaggle dataset own/pets's current version is 1, older than the version 2 fetch@pets took "
        "(Kaggle no longer has it as current); a new fetch would take 1: to use it, pin it, "
        "datasets.pets.source.version: 1, a params change that `dvc repro` and CI's `plan --changed` see"])


def test_check_says_a_pinned_kaggle_version_is_pinned_and_whether_a_newer_one_exists(fake, tmp_path, monkeypatch, capsys):
    fake.add_dataset("own/pets", zip_bytes(class_images(0)), version=1)
    check_project(tmp_path, monkeypatch, {"dataset": "own/pets", "version": 1})
    assert run_check(capsys) == (0, [  # not fetched yet: the pin is what fetch would take
        "fetch: pets is pinned to version 1 of Kaggle dataset own/pets, the latest"])
    fetch_into_project("pets")
    fake.add_dataset("own/pets", zip_bytes(class_images(100)), version=2)
    assert run_check(capsys) == (0, [
        "fetch: pets is pinned to version 1 of Kaggle dataset own/pets; Kaggle has a newer one, version 2: "
        "to use it, set datasets.pets.source.version: 2"])
    Path("params.yaml").write_text(Path("params.yaml").read_text().replace("version: 1", "version: 3"))
    assert run_check(capsys, "--dataset", "pets")[1] == [  # a typo: fetch would get a 404
        "fetch: datasets.pets.source has changed since the fetch; `dvc repro report@<suite>`, for a suite that "
        "trains on pets, fetches it again"]
    shutil.rmtree("data/raw")
    assert run_check(capsys, "--dataset", "pets") == (0, [
        "fetch: pets is pinned to version 3 of Kaggle dataset own/pets, which Kaggle does not have (its current "
        "version is 2), so fetch fails; set datasets.pets.source.version: 2 or lower"])


def test_check_gives_the_kaggle_version_to_pin_before_the_first_fetch_and_says_competitions_have_none(
        fake, tmp_path, monkeypatch, capsys):
    fake.add_dataset("own/pets", zip_bytes(class_images(0)), version=3)
    check_project(tmp_path, monkeypatch, {"dataset": "own/pets"})
    assert run_check(capsys) == (0, [
        "fetch: pets has not been fetched here (data/raw/pets.provenance.json is missing); Kaggle's current "
        "version of own/pets, which fetch takes, is 3: to pin it, datasets.pets.source.version: 3"])

    fake.add_competition("titanic", zip_bytes({"train.csv": b"a\n"}))
    (Path("params.yaml")).write_text(Path("params.yaml").read_text().replace("dataset: own/pets", "competition: titanic"))
    assert run_check(capsys) == (0, [
        "fetch: pets has not been fetched here (data/raw/pets.provenance.json is missing); its source is the Kaggle "
        "competition titanic, which has no versions: once fetched, --check compares Kaggle's list of its files with "
        "the one fetch@pets recorded"])
    assert len(fake.rpc("GetDataset")) == 1  # the first check's; a competition is not asked
    assert fake.rpc("ListDataFiles") == []


# A competition has no versions, but its hosts can re-upload or add files: --check compares Kaggle's
# list of them (name, size, creation date) with the one fetch recorded.

BUNDLE = {"train.csv": b"id,label\n1,cat\n", **class_images(0)}
FETCH_AGAIN = ("run `dvc repro -f -s fetch@pets` (DVC watches the source's params, not Kaggle), then "
               "`dvc repro report@<suite>`, for a suite that trains on pets")


def competition_project(tmp_path: Path, monkeypatch, fake, local: bool = False) -> Path:
    """check_project with `pets` the Kaggle competition titanic (five files), fetched."""
    fake.add_competition("titanic", zip_bytes(BUNDLE))
    project = check_project(tmp_path, monkeypatch, {"competition": "titanic"}, local=local)
    fetch_into_project("pets")
    return project


def test_check_says_a_competition_kaggle_lists_as_fetched_is_unchanged(fake, tmp_path, monkeypatch, capsys):
    """fetch records the competition's files as Kaggle's list gives them, every page of it; --check
    lists them again (before: 'which has no versions; nothing to check', whatever Kaggle had)."""
    fake.list_page_limit = 2
    competition_project(tmp_path, monkeypatch, fake)

    record = json.loads(Path("data/raw/pets.provenance.json").read_text(encoding="utf-8"))
    assert record["competition_files"] == [{"name": name, "bytes": len(data), "created": CREATED}
                                           for name, data in sorted(BUNDLE.items())]
    assert [s.body.get("pageToken") for s in fake.rpc("ListDataFiles")] == [None, "2", "4"]

    assert run_check(capsys) == (0, [
        "fetch: pets's source is the Kaggle competition titanic, whose 5 files Kaggle lists as fetch@pets took them"])
    assert len(fake.rpc("ListDataFiles")) == 6


def test_check_names_a_competition_file_reuploaded_with_another_size_or_date(fake, tmp_path, monkeypatch, capsys):
    """A file re-uploaded (another size, or only another creation date) is a change DVC cannot see:
    exit 1, the files named and what to run; --pin writes nothing for a competition."""
    project = competition_project(tmp_path, monkeypatch, fake)
    before = (project / "params.yaml").read_text(encoding="utf-8")
    listed = fake.competitions["titanic"].listed
    listed["train.csv"] = (listed["train.csv"][0] + 7, CREATED)
    listed["cat/1.png"] = (listed["cat/1.png"][0], "2025-03-04T05:06:07.000Z")

    for argv in ([], ["--pin"]):
        assert run_check(capsys, *argv) == (1, [
            "fetch@pets: Kaggle competition titanic's files have changed since fetch@pets took them (changed in "
            f"size or date: cat/1.png, train.csv); {FETCH_AGAIN}"])
    assert (project / "params.yaml").read_text(encoding="utf-8") == before


def test_check_names_a_file_added_to_or_removed_from_a_competition(fake, tmp_path, monkeypatch, capsys):
    competition_project(tmp_path, monkeypatch, fake)
    fake.add_competition("titanic", zip_bytes(BUNDLE), files={"extra.csv": b"id\n1\n"})

    assert run_check(capsys) == (1, [
        f"fetch@pets: Kaggle competition titanic's files have changed since fetch@pets took them (added: extra.csv); "
        f"{FETCH_AGAIN}"])

    fetch_into_project("pets")  # what `dvc repro -f -s fetch@pets` runs
    assert run_check(capsys)[0] == 0
    del fake.competitions["titanic"].listed["cat/0.png"]
    assert run_check(capsys) == (1, [
        f"fetch@pets: Kaggle competition titanic's files have changed since fetch@pets took them (removed: cat/0.png); "
        f"{FETCH_AGAIN}"])


def test_check_of_a_competition_fetched_before_its_files_were_recorded_says_it_cannot_tell(
        fake, tmp_path, monkeypatch, capsys):
    """A provenance record from before fetch recorded the list: --check cannot tell, says how to
    record one, and asks Kaggle nothing; the other datasets are checked as ever."""
    competition_project(tmp_path, monkeypatch, fake, local=True)
    fetch_into_project("shapes")
    path = Path("data/raw/pets.provenance.json")
    record = json.loads(path.read_text(encoding="utf-8"))
    del record["competition_files"]
    path.write_text(json.dumps(record), encoding="utf-8")
    asked = len(fake.seen)

    status, lines = run_check(capsys)

    assert status == 0 and len(lines) == 2, lines
    assert lines[0] == (
        "fetch: data/raw/pets.provenance.json holds no list of Kaggle competition titanic's files (fetch@pets ran before "
        "fetch recorded one), so --check cannot tell whether they changed; `dvc repro -f -s fetch@pets` records it")
    assert lines[1].startswith("fetch: the local source of shapes is as fetched")
    assert len(fake.seen) == asked


@pytest.mark.parametrize("fault", ["no credentials", "rules not accepted"])
def test_check_of_a_competition_kaggle_cannot_be_asked_about_is_exit_status_2(fake, tmp_path, monkeypatch, capsys, fault):
    project = competition_project(tmp_path, monkeypatch, fake)
    if fault == "no credentials":
        params = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))
        params["datasets"]["zoo"] = {**params["datasets"]["pets"], "source": {"kind": "kaggle", "dataset": "own/zoo"}}
        (project / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
        fake.apply(monkeypatch, credentials="none")
        start = ("fetch: cannot ask Kaggle whether zoo has a newer version or whether the files of pets changed: "
                 "no Kaggle credentials found")
    else:
        fake.competitions["titanic"].rules_accepted = False
        start = (f"fetch: cannot ask Kaggle for the files of pets: datasets.pets.source: Kaggle refused access to "
                 f"competition titanic (HTTP 403: {RULES_MESSAGE}): you must accept this competition's rules")

    status, lines = run_check(capsys)

    assert status == 2 and len(lines) == 1, lines
    assert lines[0].startswith(start), lines[0]
    assert fake.key not in lines[0]


@pytest.mark.parametrize("fault", ["no credentials", "server down", "bad key"])
def test_check_without_kaggle_is_one_line_and_the_local_checks_still_run(fake, tmp_path, monkeypatch, capsys, fault):
    fake.add_dataset("own/pets", zip_bytes(class_images(0)), version=1)
    project = check_project(tmp_path, monkeypatch, {"dataset": "own/pets"}, local=True)
    fetch_into_project("pets")
    fetch_into_project("shapes")
    (project / "shapes" / "cat" / "new.png").write_bytes(png(99))
    if fault == "no credentials":
        fake.apply(monkeypatch, credentials="none")
        reason = "no Kaggle credentials found"
    elif fault == "bad key":
        fake.write_kaggle_json(Path(os.environ["KAGGLE_CONFIG_DIR"]), key="wrong")
        reason = "Kaggle rejected the credentials"
    else:
        fake.stop()
        reason = "cannot reach api.kaggle.com through the proxy"

    status, lines = run_check(capsys)

    assert status == 1 and len(lines) == 2, lines
    assert lines[0].startswith("fetch@shapes: shapes has changed since fetch@shapes copied it;")
    assert lines[1].startswith(f"fetch: cannot ask Kaggle whether pets has a newer version: {reason}"), lines[1]
    assert fake.key not in lines[1]


def test_check_without_kaggle_does_not_pin_its_one_line_on_the_first_dataset_asked(fake, tmp_path, monkeypatch, capsys):
    """The line for every dataset Kaggle could not be asked about is about Kaggle, not about the
    first one asked (before: '... whether pets, zoo have a newer version: cannot reach
    api.kaggle.com ... while fetching dataset own/more version 2', a fetch --check never makes,
    of a version it never asks for, naming one of the two)."""
    project = check_project(tmp_path, monkeypatch, {"dataset": "own/more", "version": 2})
    params = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))
    params["datasets"]["zoo"] = {**params["datasets"]["pets"], "source": {"kind": "kaggle", "dataset": "own/pets"}}
    (project / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    fake.stop()

    status, lines = run_check(capsys)

    assert status == 2 and len(lines) == 1, lines  # not 0: "nothing new" is not known
    assert lines[0].startswith("fetch: cannot ask Kaggle whether pets, zoo have a newer version: cannot reach "
                               "api.kaggle.com through the proxy"), lines[0]
    assert "own/more" not in lines[0] and "version 2" not in lines[0] and "fetching dataset" not in lines[0], lines[0]


def test_check_without_kaggle_still_says_a_source_changed_since_its_fetch(fake, tmp_path, monkeypatch, capsys):
    """A source whose params changed since its fetch needs no answer from Kaggle: its line is said
    even after Kaggle could not be asked about an earlier one (before: it joined the 'cannot ask'
    line, which said only that its version was unknown)."""
    fake.add_dataset("own/zoo", zip_bytes(class_images(0)), version=1)
    project = check_project(tmp_path, monkeypatch, {"dataset": "own/pets"})
    params = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))
    params["datasets"]["zoo"] = {**params["datasets"]["pets"], "source": {"kind": "kaggle", "dataset": "own/zoo"}}
    (project / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    fetch_into_project("zoo")
    params["datasets"]["zoo"]["source"]["version"] = 1
    (project / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    fake.stop()

    status, lines = run_check(capsys)

    assert status == 2 and len(lines) == 2, lines
    assert lines[0] == ("fetch: datasets.zoo.source has changed since the fetch; `dvc repro report@<suite>`, for a suite "
                        "that trains on zoo, fetches it again")
    assert lines[1].startswith("fetch: cannot ask Kaggle whether pets has a newer version: cannot reach api.kaggle.com")


# `--check --pin`: what the weekly retrain runs, so that a new version comes as a params change.

PINNED_PARAMS = """\
# The project's params (a comment that must survive)
datasets:
  pets:
    source:
      kind: kaggle
      dataset: own/pets   # <owner>/<slug>
      files: [cat/0.png]
    layout: {kind: folders}
  zoo:
    source: {kind: kaggle, dataset: "own/zoo"}   # flow style, quoted
    layout: {kind: folders}
  held:
    source: {kind: kaggle, dataset: own/held, version: 1}
    layout: {kind: folders}
  titanic:
    source: {kind: kaggle, competition: titanic}
    layout: {kind: folders}
training:
  distribution: "off"
"""


def pin_project(tmp_path: Path, monkeypatch, fake) -> Path:
    """PINNED_PARAMS with every other key toy_params has, each dataset fetched at version 1 (and
    the competition once), and version 2 of each on Kaggle; returns params.yaml."""
    from tests.toy import toy_params

    toy = toy_params(["cat", "dog"])["datasets"]["toy"]
    rest = "".join(f"    {key}: {json.dumps(value)}\n" for key, value in toy.items() if key not in ("source", "layout"))
    text = PINNED_PARAMS.replace("    layout: {kind: folders}\n", "    layout: {kind: folders}\n" + rest)
    text += "".join(f"{key}: {{}}\n" for key in ("backbones", "experiments", "suites"))
    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text(text, encoding="utf-8")
    monkeypatch.chdir(project)
    for slug in ("pets", "zoo", "held"):
        fake.add_dataset(f"own/{slug}", zip_bytes(class_images(0)), version=1, files={"cat/0.png": png(1)})
    fake.add_competition("titanic", zip_bytes(class_images(0)))
    for name in ("pets", "zoo", "held", "titanic"):
        fetch_into_project(name)
    for slug in ("pets", "zoo", "held"):
        fake.add_dataset(f"own/{slug}", zip_bytes(class_images(100)), version=2, files={"cat/0.png": png(2)})
    return project / "params.yaml"


def test_check_pin_writes_each_new_version_into_params_keeping_the_rest_of_the_file(fake, tmp_path, monkeypatch, capsys):
    """--pin writes `version: N` into the source of each unpinned dataset Kaggle has a newer
    version of, and moves a pinned one's `version` on to it, the rest of params.yaml byte for byte
    (comments, quotes, flow style): a params change that `dvc repro` and CI's `plan --changed` see.
    A competition is not touched. Exit status 3: pinned, nothing else to do."""
    params = pin_project(tmp_path, monkeypatch, fake)
    before = params.read_text(encoding="utf-8")

    status, lines = run_check(capsys, "--pin")

    assert status == 3, lines
    assert params.read_text(encoding="utf-8") == (
        before.replace("      dataset: own/pets   # <owner>/<slug>\n",
                       "      dataset: own/pets   # <owner>/<slug>\n      version: 2\n")
        .replace('{kind: kaggle, dataset: "own/zoo"}', '{kind: kaggle, dataset: "own/zoo", version: 2}')
        .replace("{kind: kaggle, dataset: own/held, version: 1}", "{kind: kaggle, dataset: own/held, version: 2}"))
    assert lines[:2] == [f"fetch: pinned {name}: datasets.{name}.source.version: 2 written into params.yaml "
                         f"(Kaggle dataset own/{name}'s new version; fetch@{name} took version 1)" for name in ("pets", "zoo")]
    # A pinned dataset's pin moves on to Kaggle's newer version: else, once pinned, the weekly
    # job would never propose another.
    assert lines[2] == ("fetch: pinned held: datasets.held.source.version: 2 written into params.yaml "
                        "(Kaggle dataset own/held's new version; it was pinned to version 1)")
    assert lines[3].startswith("fetch: titanic's source is the Kaggle competition titanic")
    assert len(lines) == 4

    # Pinned now: a second run finds nothing new and writes nothing.
    after = params.read_text(encoding="utf-8")
    status, lines = run_check(capsys, "--pin", "--dataset", "pets", "--dataset", "zoo")
    assert status == 0 and params.read_text(encoding="utf-8") == after, lines
    assert lines == [f"fetch: datasets.{name}.source has changed since the fetch; `dvc repro report@<suite>`, for a "
                     f"suite that trains on {name}, fetches it again" for name in ("pets", "zoo")]


def test_check_pin_leaves_params_alone_when_kaggle_cannot_be_asked_or_has_gone_back(fake, tmp_path, monkeypatch, capsys):
    """Without an answer from Kaggle nothing is pinned (exit 2, its one line); a current version
    older than the one fetched (the newer one deleted on Kaggle) is left to a person (exit 1)."""
    params = pin_project(tmp_path, monkeypatch, fake)
    before = params.read_text(encoding="utf-8")
    fake.apply(monkeypatch, credentials="none")

    status, lines = run_check(capsys, "--pin")

    assert status == 2 and params.read_text(encoding="utf-8") == before, lines
    assert lines[-1].startswith("fetch: cannot ask Kaggle whether pets, zoo, held have a newer version or whether the "
                                "files of titanic changed: no Kaggle credentials found")

    fake.apply(monkeypatch)
    del fake.datasets["own/pets"].versions[2]
    fetch_into_project("pets")  # at version 1, the current one
    fake.add_dataset("own/pets", zip_bytes(class_images(100)), version=2, files={"cat/0.png": png(2)})
    fetch_into_project("pets")
    del fake.datasets["own/pets"].versions[2]
    status, lines = run_check(capsys, "--pin", "--dataset", "pets")
    assert status == 1 and params.read_text(encoding="utf-8") == before, lines
    assert lines == ["fetch@pets: Kaggle dataset own/pets's current version is 1, older than the version 2 fetch@pets took "
                     "(Kaggle no longer has it as current); a new fetch would take 1: to use it, pin it, "
                     "datasets.pets.source.version: 1, a params change that `dvc repro` and CI's `plan --changed` see"]


def test_a_local_source_checked_first_neither_pins_without_pin_nor_stops_pin(fake, tmp_path, monkeypatch, capsys):
    """A local source not yet fetched, checked before the Kaggle dataset (`birds` sorts first),
    must not change what --pin means for it (before: its line's advice was kept in the variable
    that held --pin, so a folder there pinned `pets` without --pin, and a folder missing kept
    --pin from pinning it)."""
    fake.add_dataset("own/pets", zip_bytes(class_images(0)), version=1)
    project = check_project(tmp_path, monkeypatch, {"dataset": "own/pets"}, local=True)
    fetch_into_project("pets")
    params = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))
    params["datasets"]["birds"] = params["datasets"].pop("shapes")
    (project / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    before = (project / "params.yaml").read_text(encoding="utf-8")
    fake.add_dataset("own/pets", zip_bytes(class_images(100)), version=2)

    status, lines = run_check(capsys)  # the folder is there: its line offers a sha256 to pin
    assert status == 1 and lines[0].startswith("fetch@pets: Kaggle dataset own/pets has a new version, 2"), lines
    assert (project / "params.yaml").read_text(encoding="utf-8") == before  # no --pin: nothing written

    shutil.rmtree(project / "shapes")
    status, lines = run_check(capsys, "--pin")
    assert status == 3 and lines[0].startswith("fetch: pinned pets: datasets.pets.source.version: 2"), lines
    assert yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))["datasets"]["pets"]["source"]["version"] == 2


@pytest.mark.parametrize("shared", ["anchor", "merge key"])
def test_pin_refuses_a_source_it_cannot_edit_alone_and_writes_nothing(tmp_path, shared):
    """A source written once for two datasets (a YAML anchor) or through a merge key cannot take
    one dataset's version as inserted text: one line saying to set it by hand, the file untouched."""
    from stages.fetch import pin_versions

    source = ("    source: &kaggle {kind: kaggle, dataset: own/pets}\n" if shared == "anchor"
              else "    source: {<<: *kaggle}\n")
    text = ("base: &kaggle {kind: kaggle, dataset: own/pets}\n" if shared == "merge key" else "") + (
        "datasets:\n  pets:\n" + source + "  zoo:\n    source: *kaggle\n")
    params = tmp_path / "params.yaml"
    params.write_text(text, encoding="utf-8")

    with pytest.raises(UserError) as caught:
        pin_versions(params, {"pets": 2})

    assert str(caught.value).startswith(f"{params}: cannot write ")
    assert "datasets.pets.source.version" in str(caught.value) and str(caught.value).endswith("by hand")
    assert params.read_text(encoding="utf-8") == text


@pytest.mark.parametrize("source", ["      kind: kaggle\n      ? dataset\n      : own/pets\n",
                                    "      kind: kaggle\n      dataset: >-\n        own/pets\n\n"],
                         ids=["explicit key", "folded scalar"])
def test_pin_that_would_break_the_yaml_is_the_one_line_to_set_it_by_hand(tmp_path, source):
    """Legal YAML the inserted line would make illegal (an explicit `? dataset` key, a block scalar
    ending in a blank line) is the refusal's one line, the file untouched (before: PyYAML's
    ScannerError or ParserError, a traceback)."""
    from stages.fetch import pin_versions

    text = "datasets:\n  pets:\n    source:\n" + source + "  zoo:\n    source: {kind: kaggle, dataset: own/zoo}\n"
    params = tmp_path / "params.yaml"
    params.write_text(text, encoding="utf-8")

    with pytest.raises(UserError) as caught:
        pin_versions(params, {"pets": 2})

    assert str(caught.value) == (f"{params}: cannot write the new versions into it (datasets.pets.source.version: 2); "
                                 "set them by hand")
    assert params.read_text(encoding="utf-8") == text


@pytest.mark.parametrize("written, moved", [
    ("    source:\n      kind: kaggle\n      dataset: own/pets\n      version: 1   # pinned\n",
     "    source:\n      kind: kaggle\n      dataset: own/pets\n      version: 3   # pinned\n"),
    ("    source: {kind: kaggle, version: 1, dataset: own/pets}\n", "    source: {kind: kaggle, version: 3, dataset: own/pets}\n"),
    ("    source: {kind: kaggle, dataset: own/pets, version: null}\n", "    source: {kind: kaggle, dataset: own/pets, version: 3}\n"),
    ("    source:\n      kind: kaggle\n      dataset: own/pets\n      version:\n",
     "    source:\n      kind: kaggle\n      dataset: own/pets\n      version: 3\n"),
], ids=["block", "flow", "null", "empty"])
def test_pin_moves_a_written_version_on_in_place(tmp_path, written, moved):
    """A source that has a `version:` (a pin, or null, or empty) gets its value replaced where it
    is written, its comment and the key's place kept."""
    from stages.fetch import pin_versions

    params = tmp_path / "params.yaml"
    params.write_text(f"datasets:\n  pets:\n{written}  zoo:\n    source: {{kind: kaggle, dataset: own/zoo, version: 1}}\n",
                      encoding="utf-8")

    pin_versions(params, {"pets": 3})

    assert params.read_text(encoding="utf-8") == (
        f"datasets:\n  pets:\n{moved}  zoo:\n    source: {{kind: kaggle, dataset: own/zoo, version: 1}}\n")


def test_pin_keeps_the_crlf_line_endings_of_a_params_file_saved_on_windows(tmp_path):
    """A params.yaml with CRLF line endings (Windows editors, git's autocrlf) gets its version line
    with CRLF too, the rest byte for byte (before: read with universal newlines and written back
    with LF, every line of the file changed in the pull request)."""
    from stages.fetch import pin_versions

    text = ("# params\r\ndatasets:\r\n  pets:\r\n    source:\r\n      kind: kaggle\r\n      dataset: own/pets  # c\r\n"
            "      files: [a.png]\r\n  zoo:\r\n    source: {kind: kaggle,\r\n      dataset: own/zoo}\r\n")
    params = tmp_path / "params.yaml"
    params.write_bytes(text.encode())

    pin_versions(params, {"pets": 2, "zoo": 5})

    assert params.read_bytes().decode() == (
        text.replace("# c\r\n", "# c\r\n      version: 2\r\n").replace("own/zoo}", "own/zoo, version: 5}"))


def test_matrix_pin_checks_the_suites_unpinned_kaggle_datasets_and_titles_the_pull_request(fake, tmp_path, monkeypatch, capsys):
    """`python -m stages.matrix pin --suite S` (the weekly retrain's job) checks the Kaggle datasets
    of the suite's experiments only (not `zoo`, another suite's, nor the competition), pins the
    unpinned one and moves the pinned one's pin on, and writes the pull request's title to
    $GITHUB_OUTPUT; exit status 3."""
    from stages import matrix

    params = pin_project(tmp_path, monkeypatch, fake)
    small_cnn = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))["backbones"]["small_cnn"]
    experiments = {f"{name}-small_cnn": {"suite": "other" if name == "zoo" else "weekly", "dataset": name, "backbone": "small_cnn"}
                   for name in ("pets", "zoo", "held", "titanic")}
    params.write_text(params.read_text(encoding="utf-8").replace("backbones: {}\nexperiments: {}\nsuites: {}\n", yaml.safe_dump(
        {"backbones": {"small_cnn": small_cnn}, "experiments": experiments, "suites": {"weekly": {}, "other": {}}})))
    monkeypatch.setenv("GITHUB_OUTPUT", str(tmp_path / "github_output"))
    monkeypatch.delenv("GITHUB_ACTIONS", raising=False)
    monkeypatch.setenv("PATH", os.environ["PATH"])  # matrix.main puts this venv's bin first: undone after the test
    capsys.readouterr()

    with pytest.raises(SystemExit) as exit_status:
        matrix.main(["pin", "--suite", "weekly"])

    assert exit_status.value.code == 3
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "matrix: no default DVC remote (dvc remote add -d ...): the provenance records here are compared"
    assert out[1:] == ["fetch: pinned held: datasets.held.source.version: 2 written into params.yaml "
                       "(Kaggle dataset own/held's new version; it was pinned to version 1)",
                       "fetch: pinned pets: datasets.pets.source.version: 2 written into params.yaml "
                       "(Kaggle dataset own/pets's new version; fetch@pets took version 1)"]
    assert "source: {kind: kaggle, dataset: \"own/zoo\"}" in params.read_text(encoding="utf-8")
    assert (tmp_path / "github_output").read_text() == "title=Pin held to Kaggle version 2, pets to Kaggle version 2\n"

    # Run again: nothing newer than the pins, so nothing pinned, and no title (the pins already
    # set are not named again as if new).
    matrix.main(["pin", "--suite", "weekly"])  # exit status 0
    assert (tmp_path / "github_output").read_text().endswith("title=\n")
