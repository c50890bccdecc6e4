"""Bad or changed data: caches follow the files' content, readers fail in one line naming the
file and the fix, and `lra.data` leaves no run directory behind."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image as PILImage

from conftest import ROOT
from lra.tasks import DataError
from lra.tasks.image import RECORD, TEST_FILE, TRAIN_FILES, Image, ImageConfig, read_binary
from lra.tasks.listops import ListOps, ListOpsConfig, write_tsv
from lra.tasks.pathfinder import DIFFICULTY_DIRS, Pathfinder, PathfinderConfig
from lra.tasks.text import Text, TextConfig

# ----------------------------------------------------------------------------- ListOps cache


def write_listops(folder, train_rows):
    folder.mkdir(parents=True, exist_ok=True)
    write_tsv(folder / "basic_train.tsv", train_rows)
    for split in ("val", "test"):
        write_tsv(folder / f"basic_{split}.tsv", [("( [MAX 1 2 ] )", 2)])


def test_listops_cache_follows_tsv_content_not_mtime(tmp_path):
    data = tmp_path / "listops"
    write_listops(data, [("( [MAX 1 2 ] )", 2), ("( [MIN 3 4 ] )", 3)])
    cfg = ListOpsConfig(data_dir=str(data), seq_len=16)
    assert ListOps(cfg).split("train")["targets"].tolist() == [2, 3]
    (cache,) = data.glob("basic_train.L16*.npz")
    # The TSV is restored with different rows and an mtime older than the cache (cp -p, tar).
    write_listops(data, [("( [SM 4 4 ] )", 8), ("( [MED 1 5 7 ] )", 5), ("( [MAX 9 ] )", 9)])
    old = cache.stat().st_mtime_ns - 3600 * 10**9
    os.utime(data / "basic_train.tsv", ns=(old, old))
    train = ListOps(cfg).split("train")
    assert train["targets"].tolist() == [8, 5, 9]
    assert train["inputs"].shape == (3, 16)
    (fresh,) = data.glob("basic_train.L16*.npz")  # the stale cache was replaced, not kept
    assert fresh != cache and not cache.exists()
    assert ListOps(cfg).split("train")["targets"].tolist() == [8, 5, 9]  # served from the cache


# ----------------------------------------------------------------------------- Pathfinder release


def write_release(root, count, resolution=32):
    """A minimal LRA release difficulty directory: imgs/0/sample_<i>.png, text metadata/0.npy."""
    base = root / f"pathfinder{resolution}" / DIFFICULTY_DIRS["14"]
    (base / "imgs" / "0").mkdir(parents=True)
    (base / "metadata").mkdir()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (resolution, resolution), dtype=np.uint8) for _ in range(count)]
    labels = [i % 2 for i in range(count)]
    for i, image in enumerate(images):
        PILImage.fromarray(image).save(base / "imgs" / "0" / f"sample_{i}.png")
    rows = "".join(f"imgs/0 sample_{i}.png {i} {labels[i]} 14 1.5 2\n" for i in range(count))
    (base / "metadata" / "0.npy").write_text(rows)
    return base, images, labels


def release_task(tmp_path) -> Pathfinder:
    cfg = PathfinderConfig(data_dir=str(tmp_path / "lra"), cache_dir=str(tmp_path / "cache"),
                           resolution=32, seq_len=1024)
    return Pathfinder(cfg)


def tokens(image: np.ndarray) -> np.ndarray:
    return image.reshape(-1).astype(np.int32) + 1


def test_pathfinder_release_cache_follows_images_and_metadata(tmp_path):
    base, images, labels = write_release(tmp_path / "lra", count=10)
    train = release_task(tmp_path).split("train")
    assert train["targets"].tolist() == labels[:8]
    assert np.array_equal(train["inputs"][2], tokens(images[2]))
    # A repaired image: new pixels (and, as any new file, a new size or mtime).
    image_path = base / "imgs" / "0" / "sample_2.png"
    stamp = image_path.stat().st_mtime_ns
    repaired = 255 - images[2]
    PILImage.fromarray(repaired).save(image_path)
    os.utime(image_path, ns=(stamp + 10**9, stamp + 10**9))
    assert np.array_equal(release_task(tmp_path).split("train")["inputs"][2], tokens(repaired))
    # A corrected label of the same width, with the metadata file's old mtime put back.
    meta = base / "metadata" / "0.npy"
    stat = meta.stat()
    meta.write_text(meta.read_text().replace("sample_0.png 0 0 ", "sample_0.png 0 1 "))
    assert meta.stat().st_size == stat.st_size
    os.utime(meta, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert release_task(tmp_path).split("train")["targets"].tolist() == [1] + labels[1:8]
    # An added image and row: 11 rows split 8/1/2.
    extra = np.full((32, 32), 7, np.uint8)
    PILImage.fromarray(extra).save(base / "imgs" / "0" / "sample_10.png")
    with open(meta, "a") as f:
        f.write("imgs/0 sample_10.png 10 1 14 1.5 2\n")
    test = release_task(tmp_path).split("test")
    assert test["targets"].tolist() == [labels[9], 1]
    assert np.array_equal(test["inputs"][1], tokens(extra))


def test_pathfinder_release_without_images_fails_in_one_line(tmp_path):
    base, _, _ = write_release(tmp_path / "lra", count=10)
    for png in (base / "imgs" / "0").glob("*.png"):
        png.unlink()
    with pytest.raises(DataError) as err:
        release_task(tmp_path).prepare()
    message = str(err.value)
    assert "\n" not in message
    assert f"no readable images for the train split under {base}" in message
    assert "8 metadata rows" in message and "task.data_dir" in message
    assert not list((tmp_path / "cache").rglob("*.npz"))  # nothing half-prepared is cached


def test_pathfinder_release_with_an_empty_split_names_it(tmp_path):
    write_release(tmp_path / "lra", count=5)  # 80/10/10 of 5 rows: train 4, val 0, test 1
    with pytest.raises(DataError, match="no readable images for the val split under .*none of the "
                                        "5 metadata rows"):
        release_task(tmp_path).prepare()


def test_pathfinder_empty_cached_split_is_a_data_error(tmp_path):
    task = release_task(tmp_path)
    write_release(tmp_path / "lra", count=10)
    cache = task.cache_dir()
    cache.mkdir(parents=True)
    for split in ("train", "val", "test"):  # as an older version could leave them
        np.savez(cache / f"{split}.npz", images=np.zeros((0, 32, 32), np.uint8),
                 labels=np.zeros(0, np.int32))
    with pytest.raises(DataError, match="pathfinder val split is empty"):
        task.split("val")


# ----------------------------------------------------------------------------- lra.data


def test_lra_data_creates_no_run_directory(tmp_path):
    work, scratch = tmp_path / "work", tmp_path / "tmp"
    work.mkdir()
    scratch.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "TMPDIR": str(scratch)}
    args = ["task=listops", "task.num_train=8", "task.num_val=4", "task.num_test=4",
            "task.min_length=5", "task.max_length=30", "task.seq_len=32",
            f"task.cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.run([sys.executable, "-m", "lra.data", *args], cwd=work, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[-2] == "listops: train=8, val=4, test=4"
    assert list(work.iterdir()) == []      # no results/, outputs/, .hydra/ or data.log
    assert list(scratch.iterdir()) == []   # Hydra's scratch run directory is removed at exit
    assert list((tmp_path / "cache" / "listops").glob("*/basic_train.tsv"))


def test_lra_data_overrides_leave_given_keys_alone():
    from lra.data import scratch_overrides

    overrides = scratch_overrides(["task=listops", "hydra.run.dir=mine"], "/scratch")
    assert "hydra.output_subdir=null" in overrides and "hydra.sweep.dir='/scratch'" in overrides
    assert not any(o.startswith("hydra.run.dir=") for o in overrides)
    assert not any("job_logging" in o for o in scratch_overrides(["hydra/job_logging=none"], "/s"))


# ----------------------------------------------------------------------------- readers, messages


def test_missing_imdb_and_cifar_offer_the_download_route_not_tfds_build(tmp_path, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    with pytest.raises(DataError) as err:
        Text(TextConfig(data_dir=None)).prepare()
    message = str(err.value)
    assert "\n" not in message and "tfds build" not in message
    assert "https://ai.stanford.edu/~amaas/data/sentiment/" in message
    assert message.index("aclImdb_v1.tar.gz") < message.index("tensorflow-datasets")
    assert "task.data_dir=/path/to/aclImdb" in message
    with pytest.raises(DataError) as err:
        Image(ImageConfig(data_dir=None)).prepare()
    message = str(err.value)
    assert "\n" not in message and "tfds build" not in message
    assert message.index("cifar-10-binary.tar.gz") < message.index("tensorflow-datasets")


def test_unreadable_review_file_is_named(tmp_path):
    for split in ("train", "test"):
        for label in ("pos", "neg"):
            folder = tmp_path / "aclImdb" / split / label
            folder.mkdir(parents=True)
            (folder / "0_7.txt").write_bytes(b"\xff\xfe not UTF-8, still a review")
    (tmp_path / "aclImdb" / "train" / "pos" / "1_9.txt").mkdir()  # cannot be read as a file
    with pytest.raises(DataError, match=r"train/pos/1_9\.txt: unreadable review") as err:
        Text(TextConfig(data_dir=str(tmp_path), seq_len=16)).prepare()
    assert "\n" not in str(err.value)


def test_unreadable_cifar_batch_is_named(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    (folder / TRAIN_FILES[0]).mkdir()  # a directory in the file's place
    with pytest.raises(DataError, match=f"{TRAIN_FILES[0]}: unreadable"):
        read_binary(folder / TRAIN_FILES[0])
    records = np.zeros((3, RECORD), np.uint8)
    records[1, 0] = 12
    (folder / TEST_FILE).write_bytes(records.tobytes())
    with pytest.raises(DataError, match=f"{TEST_FILE}: record 1 has label 12 > 9.*task.data_dir"):
        read_binary(folder / TEST_FILE)
