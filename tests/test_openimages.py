"""The `openimages` source kind against a local Open Images (tests/fake_openimages.py).

The real boto3 client fetches from moto's S3 server on 127.0.0.1 (through
CLASSMATRIX_OPENIMAGES_S3_ENDPOINT); the metadata CSVs, generated with the real names and
columns, come from a local HTTP host (through `metadata_url`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from fake_openimages import BUCKET, CLASSES, CsvHost, FakeBucket, OpenImagesWorld, image_id  # noqa: E402

from stages import layouts, openimages  # noqa: E402
from stages.errors import UserError  # noqa: E402
from stages.fetch import fetch as fetch_stage  # noqa: E402
from stages.sources import OpenImagesOptions, get_source  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CAT, DOG, HORSE, BIRD, PERSON = "/m/01yrx", "/m/0bt9lr", "/m/03k3r", "/m/015p6", "/m/01g317"
NAME = {label: name for label, name in CLASSES.items()}


# --------------------------------------------------------------------------------------------
# The world the tests fetch from.


def small_world(split: str = "train") -> OpenImagesWorld:
    """Cat 9 eligible (one also a Person), Dog 5 (one absent from the bucket), Horse 3, two
    Cat+Dog images, Cat images outside the boxable subset, Confidence-0 rows, and Birds."""
    world = OpenImagesWorld(split=split)
    n = iter(range(10_000))

    def add(labels: set[str], *, boxable: bool = True, negatives: set[str] = frozenset(), absent: bool = False) -> str:
        image = image_id(next(n))
        world.positives[image] = set(labels)
        if negatives:
            world.negatives[image] = set(negatives)
        if boxable:
            world.boxable.add(image)
        if absent:
            world.absent.add(image)
        return image

    for _ in range(8):
        add({CAT})
    add({CAT, PERSON})
    for _ in range(4):
        add({DOG})
    add({DOG}, absent=True)
    for _ in range(3):
        add({HORSE})
    for _ in range(2):
        add({CAT, DOG})
    for _ in range(2):
        add({CAT}, boxable=False)  # labelled, but not in the bucket's boxable subset
    for _ in range(2):
        add(set(), negatives={CAT})  # verified NOT to show a cat (Confidence 0)
    add({BIRD}, negatives={DOG})
    for _ in range(3):
        add({BIRD})
    return world


@pytest.fixture(scope="module")
def servers():
    bucket = FakeBucket().start()
    host = CsvHost().start()
    yield bucket, host
    bucket.stop()
    host.stop()


@pytest.fixture
def oi(servers, tmp_path, monkeypatch):
    """A fresh bucket and CSV host with small_world() published, and the environment pointing at them."""
    bucket, host = servers
    bucket.reset()
    host.files.clear()
    host.requests.clear()
    world = small_world()
    world.publish(host, bucket)
    monkeypatch.setenv("CLASSMATRIX_DOWNLOADS", str(tmp_path / "downloads"))
    monkeypatch.setenv(openimages.ENDPOINT_ENV, bucket.endpoint)
    # Endpoints meant for AWS in general must not divert the Open Images client.
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setattr(openimages, "BACKOFF_S", 0.01)
    monkeypatch.setattr(openimages, "RETRIES", 1)

    class OI:
        pass

    env = OI()
    env.bucket, env.host, env.world, env.tmp = bucket, host, world, tmp_path
    env.options = lambda **kw: OpenImagesOptions(
        **{"classes": ["Cat", "Dog", "Horse"], "per_class": 5, "seed": 7, "workers": 4,
           "metadata_url": host.url("/openimages/v7"), **kw}
    )
    return env


def run(oi, dest_name: str = "raw", **options):
    dest = oi.tmp / dest_name
    dest.mkdir()
    details = get_source("openimages").fetch(oi.options(**options), dest, "pets")
    return dest, details


def files_by_class(dest: Path) -> dict[str, set[str]]:
    """Class folder -> ImageIDs of the files in it."""
    found: dict[str, set[str]] = {}
    for path in dest.rglob("*"):
        if path.is_file():
            assert path.suffix == ".jpg" and path.parent.parent == dest, path
            found.setdefault(path.parent.name, set()).add(path.stem)
    return found


def cached_keys(oi) -> set[str]:
    root = oi.tmp / "downloads" / "openimages" / "images"
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------------------------
# Selection, exclusion, sampling.


def test_selection_keeps_confidence_1_boxable_images_of_the_chosen_classes(oi):
    """Every image fetched has a Confidence-1 label of its class, is boxable, and carries no other
    chosen class; Confidence-0, non-boxable, Bird-only and Cat+Dog images never appear."""
    dest, details = run(oi, per_class=100)

    chosen = [CAT, DOG, HORSE]
    got = files_by_class(dest)
    assert got == {
        "Cat": oi.world.ids(CAT, chosen),
        "Dog": oi.world.ids(DOG, chosen) - oi.world.absent,
        "Horse": oi.world.ids(HORSE, chosen),
    }
    assert len(got["Cat"]) == 9  # 8 cats plus the cat with a person (Person is not chosen)
    everything = set().union(*got.values())
    assert everything <= oi.world.boxable
    verified_absent_only = {i for i in oi.world.negatives if not oi.world.positives[i] & set(chosen)}
    assert verified_absent_only and not everything & verified_absent_only
    by_class = {c["folder"]: c for c in details["classes"]}
    assert by_class["Cat"]["labelled"] == 13 and by_class["Cat"]["boxable"] == 11
    assert by_class["Cat"]["excluded_multi_class"] == 2 and by_class["Cat"]["available"] == 9
    assert by_class["Cat"]["label_name"] == CAT and by_class["Dog"]["label_name"] == DOG


def test_exclusive_off_keeps_images_with_several_chosen_classes_in_each_folder(oi):
    """With exclusive: false, the two Cat+Dog images are candidates (and here chosen) for both."""
    both = {i for i, labels in oi.world.positives.items() if {CAT, DOG} <= labels}
    dest, details = run(oi, per_class=100, exclusive=False)

    got = files_by_class(dest)
    assert both <= got["Cat"] and both <= got["Dog"]
    assert len(got["Cat"]) == 11 and len(got["Dog"]) == 6
    # Downloaded once, placed twice.
    gets = oi.bucket.gets()
    assert all(gets.count(f"train/{i}.jpg") == 1 for i in both)
    by_class = {c["folder"]: c for c in details["classes"]}
    assert by_class["Cat"]["excluded_multi_class"] == 0 and by_class["Cat"]["multi_class"] == 2


def test_sampling_is_deterministic_given_the_seed(oi):
    """Same seed, same images (in another folder, from another cache); another seed, another sample."""
    first, _ = run(oi, "a", seed=7)
    again, _ = run(oi, "b", seed=7)
    other, _ = run(oi, "c", seed=8)

    assert files_by_class(first) == files_by_class(again)
    assert files_by_class(first)["Cat"] != files_by_class(other)["Cat"]
    # What was picked is exactly the first five of the sha256 ranking.
    ranked = sorted(oi.world.ids(CAT, [CAT, DOG, HORSE]), key=lambda i: openimages.rank_key(7, i))
    assert files_by_class(first)["Cat"] == set(ranked[:5])


def test_more_candidates_never_reorder_the_ranking():
    """sample() is a prefix of one fixed ranking: adding candidates only inserts among them."""
    base = [image_id(n) for n in range(200)]
    extra = [image_id(n) for n in range(200, 400)]
    whole = openimages.sample(base + extra, 400, seed=3)
    assert [i for i in whole if i in set(base)] == openimages.sample(base, 200, seed=3)
    assert openimages.sample(base, 20, seed=3) == openimages.sample(list(reversed(base)), 20, seed=3)
    assert openimages.sample(base, 20, seed=3) != openimages.sample(base, 20, seed=4)


def test_per_class_caps_and_a_short_class_warns_and_records_its_real_count(oi, capsys):
    """Cat (9) and Dog (5) are cut to 5; Horse has 3: a warning, and 3 recorded."""
    dest, details = run(oi, per_class=5)

    got = files_by_class(dest)
    assert len(got["Cat"]) == 5 and len(got["Horse"]) == 3
    err = capsys.readouterr().err
    horse_lines = [line for line in err.splitlines() if "'Horse'" in line]
    assert len(horse_lines) == 1 and horse_lines[0].startswith("warning: datasets.pets.source.classes: 'Horse' has 3 images")
    assert "fewer than per_class 5" in horse_lines[0]
    assert not any("'Cat'" in line for line in err.splitlines())
    horse = next(c for c in details["classes"] if c["folder"] == "Horse")
    assert (horse["requested"], horse["available"], horse["selected"], horse["images"]) == (5, 3, 3, 3)


# --------------------------------------------------------------------------------------------
# Errors.


def test_a_class_name_typo_fails_with_the_closest_names(oi):
    """'Dgo' is not a class: one line naming the key and the nearest display names."""
    with pytest.raises(UserError) as caught:
        run(oi, classes=["Cat", "Dgo"])

    message = str(caught.value)
    assert message.startswith("datasets.pets.source.classes: 'Dgo' is not an Open Images class; closest: 'Dog'")
    assert "'Dot'" in message and "\n" not in message
    assert oi.bucket.gets() == []  # nothing downloaded for a dataset that cannot be made


def test_a_class_with_no_images_in_the_split_fails_with_one_line(oi):
    """'Dot' is a class of the descriptions but no image of the split carries it: the dataset
    cannot have it, so the fetch stops, before any download, instead of warning and going on
    with two classes where params declare three."""
    with pytest.raises(UserError) as caught:
        run(oi, classes=["Cat", "Dog", "Dot"])

    message = str(caught.value)
    assert message.startswith("datasets.pets.source.classes: 'Dot' has no images in Open Images' train split")
    assert "oidv7-class-descriptions-boxable.csv" in message and "split" in message and "\n" not in message
    assert oi.bucket.gets() == []


def test_a_class_whose_images_all_carry_another_chosen_class_fails_with_one_line(oi):
    """Person's one image is also a Cat: with exclusive it is left out, and the line says so."""
    with pytest.raises(UserError) as caught:
        run(oi, classes=["Cat", "Person"])

    message = str(caught.value)
    assert message.startswith("datasets.pets.source.classes: 'Person' has no images in Open Images' train split")
    assert "1 with several of the chosen classes" in message and "exclusive" in message
    assert oi.bucket.gets() == []


def test_a_label_name_may_stand_for_its_class_and_the_folder_is_the_display_name(oi):
    dest, details = run(oi, classes=[CAT, "Dog"], per_class=2)
    assert set(files_by_class(dest)) == {"Cat", "Dog"}
    assert details["classes"][0]["name"] == CAT and details["classes"][0]["display_name"] == "Cat"


def test_the_same_class_twice_is_an_error(oi):
    with pytest.raises(UserError, match="'Cat' and '/m/01yrx' are the same class"):
        run(oi, classes=["Cat", CAT])


def test_an_image_missing_from_the_bucket_is_skipped_recorded_and_counts_reconcile(oi, capsys):
    """Dog's absent image answers 404: no file, one `missing` entry, and per class
    selected = images + missing, images = files in the folder."""
    absent = next(iter(oi.world.absent))
    dest, details = run(oi, per_class=5)

    got = files_by_class(dest)
    assert absent not in got["Dog"] and len(got["Dog"]) == 4
    assert details["missing"] == [{
        "image_id": absent, "class": "Dog", "url": f"{oi.bucket.endpoint}/{BUCKET}/train/{absent}.jpg",
        "reason": "HTTP 404 NoSuchKey",
    }]
    for entry in details["classes"]:
        assert entry["selected"] == entry["images"] + entry["missing"]
        assert entry["images"] == len(got[entry["folder"]])
    assert details["this_run"] == {"downloaded": 12, "cached": 0}
    assert {c["folder"]: c["missing"] for c in details["classes"]} == {"Cat": 0, "Dog": 1, "Horse": 0}
    assert details["counts"] == {"selected": 13, "images": 12, "missing": 1, "unique_images": 12}
    assert "1 selected images are not in the bucket" in capsys.readouterr().err
    # A 404 is an answer, not a failure: asked once, not retried.
    assert oi.bucket.gets().count(f"train/{absent}.jpg") == 1


@pytest.mark.parametrize("endpoint", ["127.0.0.1:9000", "localhost:9000", "s3://open-images-dataset"])
def test_an_endpoint_without_its_scheme_is_one_line_before_any_download(oi, monkeypatch, endpoint):
    """MinIO's habit of `host:port`: botocore's "Invalid endpoint" traceback came after the
    metadata (2.7 GB for train) and the selection; now one line naming the variable, first."""
    monkeypatch.setenv(openimages.ENDPOINT_ENV, endpoint)
    with pytest.raises(UserError) as caught:
        run(oi)

    message = str(caught.value)
    assert message.startswith(f"{openimages.ENDPOINT_ENV}: {endpoint!r} is not an http(s) URL")
    example = "http://127.0.0.1:9000" if "://" in endpoint else f"http://{endpoint}"
    assert f"e.g. {example}," in message and "\n" not in message
    assert oi.host.requests == [] and oi.bucket.gets() == []


def test_an_aws_profile_that_is_not_configured_does_not_stop_the_unsigned_fetch(oi, monkeypatch):
    """AWS_PROFILE exported in a shell (or a CI job) without its ~/.aws/config: the requests are
    unsigned and need nothing from a profile, yet botocore's ProfileNotFound traceback stopped the
    fetch after the metadata had been read."""
    config = oi.tmp / "aws-config"
    config.write_text("[profile other]\nregion = eu-west-1\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")

    # Cat and Horse: no 404 to answer (moto, in this process, reads the same variables and
    # fails to build its error page with them).
    dest, details = run(oi, classes=["Cat", "Horse"])

    assert details["counts"] == {"selected": 8, "images": 8, "missing": 0, "unique_images": 8}


def test_a_class_none_of_whose_selected_images_the_bucket_has_fails_with_one_line(oi):
    """per_class 1 and a seed whose first Dog is the image the bucket lacks: Dog would be left with
    no folder at all (before: one warning about a missing image, and a dataset without Dog)."""
    absent = next(iter(oi.world.absent))
    seed = next(s for s in range(1000) if openimages.sample(oi.world.ids(DOG, [CAT, DOG]), 1, s) == [absent])

    with pytest.raises(UserError) as caught:
        run(oi, classes=["Cat", "Dog"], per_class=1, seed=seed)

    message = str(caught.value)
    assert message.startswith("datasets.pets.source.classes: none of the 1 images selected for 'Dog' are in the bucket")
    assert f"train/{absent}.jpg" in message and "HTTP 404" in message and "per_class" in message
    assert "\n" not in message


def test_a_wrong_bucket_fails_with_one_line(oi):
    with pytest.raises(UserError, match="bucket 'no-such-bucket' does not exist"):
        run(oi, bucket="no-such-bucket")


# --------------------------------------------------------------------------------------------
# Caching, interruption and resume.


def test_a_new_metadata_url_fetches_its_own_files(oi):
    """Switching `metadata_url` to a mirror fetches the mirror's CSVs: the cache is per file name,
    and the provenance must name the file it used, with that file's sha256."""
    _, first = run(oi, "a")
    for path, data in list(oi.host.files.items()):
        if path.startswith("/openimages/"):
            mirrored = "/mirror/" + path.removeprefix("/openimages/")
            oi.host.files[mirrored] = data + b"/m/0mirror,Mirror only\n" if "class-descriptions" in path else data

    _, second = run(oi, "b", metadata_url=oi.host.url("/mirror/v7"))

    assert sorted(p for p in oi.host.requests if p.startswith("/mirror/")) == sorted(
        p.replace("/openimages/", "/mirror/", 1) for p in oi.world.files())
    assert [entry["url"] for entry in second["metadata"]] == [
        entry["url"].replace("/openimages/", "/mirror/", 1) for entry in first["metadata"]]
    assert second["metadata"][0]["sha256"] != first["metadata"][0]["sha256"]


def test_metadata_is_downloaded_once_and_its_sha256_recorded(oi):
    """Two fetches: each CSV is requested once; the provenance names it with its sha256 and URL."""
    _, first = run(oi, "a")
    _, second = run(oi, "b")

    assert sorted(oi.host.requests) == sorted(oi.world.files())
    assert first["metadata"] == second["metadata"]
    import hashlib

    for entry in first["metadata"]:
        path = entry["url"].split(":", 2)[2].split("/", 1)[1]
        data = oi.host.files["/" + path]
        assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["bytes"] == len(data)
    assert [e["name"] for e in first["metadata"]] == [
        "oidv7-class-descriptions-boxable.csv",
        "oidv7-train-annotations-human-imagelabels.csv",
        "train-images-boxable-with-rotation.csv",
    ]
    assert first["metadata"][2]["url"] == oi.host.url("/openimages/2018_04/train/train-images-boxable-with-rotation.csv")
    # The images too: the second fetch asked the bucket only for the one it does not have.
    assert second["this_run"] == {"downloaded": 0, "cached": 12}
    assert second["classes"] == first["classes"]
    gets = oi.bucket.gets()
    assert len(gets) == 14 and gets[13] == f"train/{next(iter(oi.world.absent))}.jpg"


def test_s3_throttling_that_outlasts_the_retries_says_to_lower_the_workers(oi):
    """S3's 503 SlowDown is a rate limit, not a network failure: the line says so, and names the
    `workers` key to lower."""
    broken = f"train/{openimages.sample(oi.world.ids(CAT, [CAT, DOG, HORSE]), 5, 7)[0]}.jpg"
    oi.bucket.fail[f"/{BUCKET}/{broken}"] = 503

    with pytest.raises(UserError) as caught:
        run(oi, workers=1)

    message = str(caught.value)
    assert "\n" not in message and "(HTTP 503 SlowDown)" in message
    assert "S3 is limiting requests: lower datasets.pets.source.workers (now 1) or wait a few minutes" in message


def test_a_failing_download_stops_the_fetch_and_the_rerun_resumes(oi):
    """A server error on one image outlasts the retries: the fetch fails with one line, keeps what
    it finished (whole files only), and the next run asks only for what is still missing."""
    reference, _ = run(oi, "reference")
    expected = files_by_class(reference)
    for path in (oi.tmp / "downloads" / "openimages" / "images").rglob("*.jpg"):
        path.unlink()  # start the real test from an empty image cache
    oi.bucket.requests.clear()
    ranked = openimages.sample(oi.world.ids(CAT, [CAT, DOG, HORSE]), 5, 7)
    broken = f"train/{ranked[2]}.jpg"
    oi.bucket.fail[f"/{BUCKET}/{broken}"] = 500

    with pytest.raises(UserError) as caught:
        run(oi, "first", workers=1)

    message = str(caught.value)
    assert broken in message and "failed after 2 tries" in message and "run again" in message
    assert oi.bucket.gets().count(broken) == 2  # one try and one retry
    kept = cached_keys(oi)
    assert kept and broken not in kept and all(k.endswith(".jpg") for k in kept)  # no .part left
    first_gets = oi.bucket.gets()

    oi.bucket.fail.clear()
    oi.bucket.requests.clear()
    dest, details = run(oi, "second", workers=1)

    again = oi.bucket.gets()
    assert not set(again) & kept, "an image finished before the failure was downloaded again"
    assert broken in again
    assert files_by_class(dest) == expected
    assert details["this_run"]["cached"] == len(kept)
    assert set(first_gets) | set(again) >= {f"train/{i}.jpg" for ids in expected.values() for i in ids}


def test_an_interrupt_keeps_finished_images_and_the_rerun_does_not_fetch_them_again(oi, monkeypatch):
    """Ctrl-C after three images: KeyboardInterrupt propagates, no partial file is left, and the
    rerun downloads only the images the first run had not finished; the result is the same."""
    reference, _ = run(oi, "reference")
    expected = files_by_class(reference)
    for path in (oi.tmp / "downloads" / "openimages" / "images").rglob("*.jpg"):
        path.unlink()
    oi.bucket.requests.clear()
    real_place = openimages.place
    calls = []

    def interrupted(source, target):
        calls.append(target)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_place(source, target)

    monkeypatch.setattr(openimages, "place", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(oi, "first", workers=2)
    monkeypatch.setattr(openimages, "place", real_place)

    kept = cached_keys(oi)
    assert 3 <= len(kept) < 12 and all(k.endswith(".jpg") for k in kept)
    oi.bucket.requests.clear()
    dest, details = run(oi, "second", workers=2)

    assert not set(oi.bucket.gets()) & kept
    assert len(oi.bucket.gets()) == 13 - len(kept)  # 12 images and the 404, minus those kept
    assert files_by_class(dest) == expected


def test_a_damaged_cached_image_is_fetched_again(oi):
    _, _ = run(oi, "a")
    ranked = openimages.sample(oi.world.ids(HORSE, [CAT, DOG, HORSE]), 5, 7)
    damaged = oi.tmp / "downloads" / "openimages" / "images" / "train" / f"{ranked[0]}.jpg"
    damaged.unlink()
    damaged.write_bytes(b"\xff\xd8\xff not a jpeg")
    oi.bucket.requests.clear()

    dest, details = run(oi, "b")

    absent = f"train/{next(iter(oi.world.absent))}.jpg"
    assert sorted(oi.bucket.gets()) == sorted([f"train/{ranked[0]}.jpg", absent])
    assert (dest / "Horse" / f"{ranked[0]}.jpg").read_bytes()[:2] == b"\xff\xd8"
    assert openimages.intact(dest / "Horse" / f"{ranked[0]}.jpg")


# --------------------------------------------------------------------------------------------
# Provenance and layout.


def test_provenance_lists_every_image_with_its_source_url(oi):
    dest, details = run(oi)

    listed = {(e["class"], e["image_id"]) for e in details["images"]}
    on_disk = {(folder, i) for folder, ids in files_by_class(dest).items() for i in ids}
    assert listed == on_disk and len(details["images"]) == len(on_disk)
    for entry in details["images"]:
        assert entry["url"] == f"{oi.bucket.endpoint}/{BUCKET}/train/{entry['image_id']}.jpg"
    assert details["version"] == "v7" and details["split"] == "train"
    assert details["selection"] == {"per_class": 5, "seed": 7, "exclusive": True,
                                    "rank": "sha256('<seed>:<ImageID>'), ascending"}


def test_the_public_url_is_the_buckets_https_address_on_aws():
    assert openimages.public_url(None, BUCKET, "train/0a1b2c3d4e5f6a7b.jpg") == (
        "https://open-images-dataset.s3.amazonaws.com/train/0a1b2c3d4e5f6a7b.jpg"
    )


def test_fetch_stage_end_to_end_lays_out_folders_the_folders_layout_reads(oi):
    """Through stages.fetch and params.yaml: a `pets` dataset from Open Images, whose raw folder
    the `folders` layout reads as the declared classes, with every file accepted."""
    raw = copy.deepcopy(yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8")))
    raw["datasets"]["pets"] = {
        "source": {"kind": "openimages", "classes": ["Cat", "Dog", "Horse"], "split": "train", "per_class": 5,
                   "seed": 7, "exclusive": True, "metadata_url": oi.host.url("/openimages/v7"), "workers": 4},
        "layout": {"kind": "folders"},
        "classes": ["Cat", "Dog", "Horse"],
        "image_size": 24,
        "channels": 3,
        "split": {"val": 0.2, "test": 0.2, "seed": 42},
        "validation": {"min_per_class": 3, "min_side": 8, "max_side": 4000},
        "augmentation": {"flip": "horizontal"},
        "reference": {},
        "metric": "auto",
    }
    params = oi.tmp / "params.yaml"
    params.write_text(yaml.safe_dump(raw), encoding="utf-8")
    out = oi.tmp / "data" / "raw" / "pets"
    provenance = oi.tmp / "data" / "raw" / "pets.provenance.json"

    record = fetch_stage("pets", str(params), out, provenance)

    assert json.loads(provenance.read_text()) == record
    assert record["files"] == 12 and record["source"]["kind"] == "openimages"
    layout = layouts.get_layout("folders")
    candidates = layout.candidates(layout.options(), out)
    assert len(candidates) == 12 and all(c.reason == "" for c in candidates)
    assert {c.label for c in candidates} == {"Cat", "Dog", "Horse"}


# --------------------------------------------------------------------------------------------
# The CSV readers.


def test_class_descriptions_are_read_with_or_without_a_header(tmp_path):
    with_header = tmp_path / "v7.csv"
    with_header.write_text("LabelName,DisplayName\n/m/01yrx,Cat\n/m/0bt9lr,Dog\n", encoding="utf-8")
    without = tmp_path / "v6.csv"
    without.write_bytes("\ufeff/m/01yrx,Cat\r\n/m/0bt9lr,Dog\r\n".encode())

    assert openimages.read_class_descriptions(with_header) == [("/m/01yrx", "Cat"), ("/m/0bt9lr", "Dog")]
    assert openimages.read_class_descriptions(without) == [("/m/01yrx", "Cat"), ("/m/0bt9lr", "Dog")]


def test_v6_class_descriptions_without_a_header_work_end_to_end(oi):
    oi.world.header_in_classes = False
    oi.host.files.update(oi.world.files())
    dest, _ = run(oi, per_class=2)
    assert set(files_by_class(dest)) == {"Cat", "Dog", "Horse"}


def test_the_labels_csv_is_filtered_block_by_block(tmp_path):
    """Small blocks (many batches), a byte-order mark, CRLF, "1.0" and "0.0" confidences: the same
    answer as one block, and only Confidence-1 rows of the wanted labels."""
    rows = ["\ufeffImageID,Source,LabelName,Confidence"]
    expected = {CAT: set(), DOG: set()}
    for n in range(3000):
        image = image_id(n)
        label = (CAT, DOG, BIRD)[n % 3]
        confidence = ("1", "0", "1.0", "0.0")[n % 4]
        rows.append(f"{image},verification,{label},{confidence}")
        if label in expected and float(confidence) == 1:
            expected[label].add(image)
    path = tmp_path / "labels.csv"
    path.write_bytes(("\r\n".join(rows) + "\r\n").encode())

    small = openimages.select_labelled(path, [CAT, DOG], block_size=4096)
    whole = openimages.select_labelled(path, [CAT, DOG], block_size=1 << 24)

    assert small == whole == expected
    assert len(expected[CAT]) == 500


def test_image_ids_that_are_not_plain_names_are_never_chosen():
    """An ImageID becomes a path: one that could climb out of its folder is counted and refused."""
    labelled = {CAT: {"0a1b2c3d4e5f6a7b", "../../etc/passwd", "a/b"}}
    listed = {"0a1b2c3d4e5f6a7b", "../../etc/passwd", "a/b"}

    selection = openimages.select(labelled, listed, per_class=10, seed=1, exclusive=True)

    assert selection.chosen[CAT] == ["0a1b2c3d4e5f6a7b"]
    assert selection.counts[CAT]["unusable_image_id"] == 2 and selection.counts[CAT]["available"] == 1


def test_a_labels_csv_without_the_needed_columns_fails_with_one_line(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("ImageID,LabelName\nabc,/m/01yrx\n")
    with pytest.raises(UserError, match="no column Confidence"):
        openimages.select_labelled(path, [CAT])


def test_the_catalogs_open_images_entry_fetches_validates_and_splits(oi):
    """params.yaml's openimages_animals, as written but for the counts a miniature cannot meet and
    the hosts: fetched from the fakes, validated and split into the declared classes."""
    from stages.split import split as split_stage
    from stages.validate import validate as validate_stage

    world = OpenImagesWorld(split="train")
    for number in range(90):
        label = (CAT, DOG, HORSE)[number % 3]
        image = image_id(20_000 + number)
        world.positives[image] = {label}
        world.boxable.add(image)
    oi.bucket.reset()
    oi.host.files.clear()
    world.publish(oi.host, oi.bucket)

    raw = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    entry = raw["datasets"]["openimages_animals"]
    entry["source"].update(per_class=25, metadata_url=oi.host.url("/openimages/v7"))
    entry["validation"].update(min_per_class=20, expected_count=75, min_side=8)
    params = oi.tmp / "params.yaml"
    params.write_text(yaml.safe_dump(raw), encoding="utf-8")
    data = oi.tmp / "data"

    record = fetch_stage("openimages_animals", str(params), data / "raw" / "oi", data / "oi.json")
    summary = validate_stage(
        "openimages_animals", str(params), data / "raw" / "oi", data / "manifest.parquet",
        data / "docs", data / "summary.json",
    )
    counts = split_stage("openimages_animals", str(params), data / "manifest.parquet", data / "raw" / "oi", data / "out")

    assert record["files"] == 75 and len(record["images"]) == 75
    assert summary["accepted"] == 75 and summary["per_class"] == {"Cat": 25, "Dog": 25, "Horse": 25}
    assert json.loads((data / "out" / "classes.json").read_text()) == ["Cat", "Dog", "Horse"]
    assert sum(counts.values()) == 75 and all(counts[s] > 0 for s in ("train", "val", "test"))
