"""Pathfinder / Path-X: every label re-derived from the drawn geometry, balance, determinism,
the LRA release reader (on a fixture tree), preview, and a tiny end-to-end run."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from tiny_runs import tiny_cli_run
from lra.tasks import DataError
from lra.tasks.base import data_params
from lra.tasks.pathfinder import (DIFFICULTY_DIRS, Pathfinder, PathfinderConfig, PathXConfig, generate,
                              geometry, read_metadata)


def point_segment_distance(p_Px2: np.ndarray, a_Sx2: np.ndarray, b_Sx2: np.ndarray) -> np.ndarray:
    """[P, S] Euclidean distance from each point to each segment a-b."""
    ab = b_Sx2 - a_Sx2
    ap = p_Px2[:, None] - a_Sx2[None]
    t = np.clip((ap * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-12), 0.0, 1.0)
    closest = a_Sx2[None] + t[..., None] * ab[None]
    return np.linalg.norm(p_Px2[:, None] - closest, axis=-1)


def path_segments(data: dict, i: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per path of image i, its placed dashes as (starts, ends) in output-pixel (x, y)."""
    out = []
    for p in range(data["placed"].shape[1]):
        keep = data["placed"][i, p]
        out.append((data["starts"][i, p][keep].astype(np.float64),
                    data["ends"][i, p][keep].astype(np.float64)))
    return out


def dense_points(a: np.ndarray, b: np.ndarray, per_dash: int = 12) -> np.ndarray:
    t = np.linspace(0, 1, per_dash)[None, :, None]
    return (a[:, None] + t * (b - a)[:, None]).reshape(-1, 2)


def check_image(cfg: PathfinderConfig, data: dict, i: int) -> int:
    """Independent check of image i from its geometry; returns the label the geometry implies."""
    geo = geometry(cfg)
    half_w, radius = geo.line_width / 2, geo.circle_radius
    segments = path_segments(data, i)
    assert all(len(a) == len(b) for a, b in segments)
    # Which paths' strokes each circle touches (centre within radius + half the line width).
    touched = []
    for centre in data["circles"][i].astype(np.float64):
        near = [p for p, (a, b) in enumerate(segments)
                if len(a) and point_segment_distance(centre[None], a, b).min() <= radius + half_w]
        assert len(near) == 1, f"image {i}: a circle touches paths {near}, expected exactly one"
        touched.append(near[0])
    assert touched == data["circle_paths"][i].tolist()
    # Different paths never touch, so a negative's circles cannot be joined by any stroke.
    points = [dense_points(a, b) for a, b in segments if len(a)]
    for p in range(len(points)):
        for q in range(p + 1, len(points)):
            gap = np.linalg.norm(points[p][:, None] - points[q][None], axis=-1).min()
            assert gap > geo.line_width + 0.25, f"image {i}: paths {p} and {q} are {gap:.2f} px apart"
    # The pixels agree with the geometry: ink at every dash and circle, none far from them.
    image = data["images"][i]
    res = cfg.resolution
    ys, xs = np.mgrid[0:res, 0:res]
    centres = np.stack([xs.ravel() + 0.5, ys.ravel() + 0.5], -1)
    a_all = np.concatenate([a for a, _ in segments])
    b_all = np.concatenate([b for _, b in segments])
    d_line = point_segment_distance(centres, a_all, b_all).min(1)
    d_circle = np.linalg.norm(centres[:, None] - data["circles"][i][None], axis=-1).min(1)
    slack = 0.75 + 1.0 / cfg.supersample
    far = (d_line > half_w + slack) & (d_circle > radius + slack)
    assert (image.ravel()[far] == 0).all(), f"image {i}: ink away from every path and circle"
    mid = np.floor((a_all + b_all) / 2).astype(int)
    assert (image[mid[:, 1], mid[:, 0]] > 0).all(), f"image {i}: a dash left no ink"
    c = np.floor(data["circles"][i]).astype(int)
    assert (image[c[:, 1], c[:, 0]] == 255).all(), f"image {i}: a circle is not drawn"
    return int(touched[0] == touched[1])


def test_every_label_matches_the_drawn_geometry():
    cfg = PathfinderConfig()  # LRA's setting: 32x32, 14-dash paths
    data = generate(cfg, 200, seed=11, keep_geometry=True)
    assert data["images"].shape == (200, 32, 32) and data["images"].dtype == np.uint8
    implied = [check_image(cfg, data, i) for i in range(200)]
    assert implied == data["labels"].tolist()
    # Two full-length paths and distractors in every image.
    assert data["placed"][:, :2].all()
    assert data["placed"][:, 2:].any(-1).sum(-1).min() >= 2
    # Circles sit on path ends: both ends of one path (positive) or one end of each (negative).
    for i in range(20):
        a, b = path_segments(data, i)[data["circle_paths"][i, 0]]
        ends = np.stack([a[0], b[-1]])
        assert np.linalg.norm(ends - data["circles"][i][0], axis=-1).min() < 1e-4


@pytest.mark.parametrize("resolution,difficulty", [(64, "baseline"), (128, "9")])
def test_larger_resolutions_and_difficulties(resolution, difficulty):
    cfg = PathfinderConfig(resolution=resolution, difficulty=difficulty)
    data = generate(cfg, 6, seed=2, keep_geometry=True)
    assert data["images"].shape == (6, resolution, resolution)
    assert [check_image(cfg, data, i) for i in range(6)] == data["labels"].tolist()
    dashes = {"baseline": 6, "9": 9}[difficulty]
    assert data["placed"][:, :2].sum(-1).tolist() == [[dashes, dashes]] * 6


def test_labels_balanced_and_generation_deterministic():
    cfg = PathfinderConfig(difficulty="baseline")
    a = generate(cfg, 301, seed=4)
    assert abs(int(a["labels"].sum()) - 150) <= 1  # balanced to one example
    b = generate(cfg, 301, seed=4)
    c = generate(cfg, 301, seed=5)
    assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["labels"], b["labels"])
    assert not np.array_equal(a["images"], c["images"])
    assert len({img.tobytes() for img in a["images"]}) == 301


def tiny_cfg(tmp_path, cls=PathfinderConfig, **kw) -> PathfinderConfig:
    base = dict(num_train=40, num_val=20, num_test=20, cache_dir=str(tmp_path), resolution=32,
                seq_len=1024)
    return cls(**{**base, **kw})


def test_task_arrays_cache_and_seed(tmp_path):
    task = Pathfinder(tiny_cfg(tmp_path))
    assert task.spec.vocab_size == 257 and task.spec.seq_len == 1024
    assert task.spec.kind == "classify" and task.spec.default_pool == "mean"
    directory = task.prepare()
    stamp = (directory / "train.npz").stat().st_mtime_ns
    train = task.split("train")
    assert train["inputs"].shape == (40, 1024) and train["inputs"].dtype == np.int32
    assert train["inputs"].min() >= 1 and train["inputs"].max() <= 256  # pixel + 1, no padding
    assert sorted(np.bincount(train["targets"]).tolist()) == [20, 20]
    again = Pathfinder(tiny_cfg(tmp_path))
    assert again.prepare() == directory and (directory / "train.npz").stat().st_mtime_ns == stamp
    assert np.array_equal(again.split("train")["inputs"], train["inputs"])
    other = Pathfinder(tiny_cfg(tmp_path, data_seed=1))
    assert other.prepare() != directory
    assert not np.array_equal(other.split("train")["inputs"], train["inputs"])
    val, test = task.split("val")["inputs"], task.split("test")["inputs"]
    assert not np.array_equal(val, test[: len(val)])  # splits use different seeds
    padded = Pathfinder(tiny_cfg(tmp_path, seq_len=1100)).split("val")["inputs"]
    assert np.array_equal(padded[:, :1024], val) and (padded[:, 1024:] == 0).all()


def test_cache_key_covers_the_generator_settings_only():
    generator = {"resolution", "difficulty", "num_train", "num_val", "num_test", "max_turn_deg",
                 "num_distractors", "dash_length", "dash_gap", "line_width", "circle_radius",
                 "margin", "supersample", "candidates", "lookahead", "path_attempts", "data_seed"}
    for cls in (PathfinderConfig, PathXConfig):  # PathX redeclares resolution: still a data field
        assert set(data_params(cls())) == generator


def test_pathx_config():
    cfg = PathXConfig()
    assert (cfg.name, cfg.resolution, cfg.seq_len, cfg.difficulty) == ("pathx", 128, 16384, "14")
    assert Pathfinder(cfg).spec.name == "pathx" and Pathfinder(cfg).spec.seq_len == 128 * 128
    with pytest.raises(ValueError, match="task.resolution"):
        Pathfinder(PathfinderConfig(resolution=48))
    with pytest.raises(ValueError, match="task.difficulty"):
        Pathfinder(PathfinderConfig(difficulty="hard"))


def write_release(root, resolution=32, difficulty="14", count=20):
    """A fixture in the LRA release layout: two metadata files (one NumPy string array, one
    plain text as in the real release), PNGs in imgs/0 and imgs/1, sample 3 an empty file."""
    base = root / f"pathfinder{resolution}" / DIFFICULTY_DIRS[difficulty]
    rng = np.random.default_rng(0)
    images, labels, rows = [], [], {0: [], 1: []}
    for i in range(count):
        part = 0 if i < count // 2 else 1
        (base / "imgs" / str(part)).mkdir(parents=True, exist_ok=True)
        image = rng.integers(0, 256, (resolution, resolution), dtype=np.uint8)
        label = int(i % 3 == 0)
        path = base / "imgs" / str(part) / f"sample_{i}.png"
        if i == 3:
            path.write_bytes(b"")
        else:
            Image.fromarray(image).save(path)
        images.append(image)
        labels.append(label)
        rows[part].append(f"imgs/{part} sample_{i}.png {i} {label} 14 1.5 2")
    (base / "metadata").mkdir(parents=True)
    np.save(base / "metadata" / "0.npy", np.array(rows[0]))
    (base / "metadata" / "1.npy").write_text("\n".join(rows[1]) + "\n")
    return base, images, labels


def test_reads_lra_release_layout(tmp_path, caplog):
    base, images, labels = write_release(tmp_path / "lra")
    cfg = tiny_cfg(tmp_path / "cache", data_dir=str(tmp_path / "lra"))
    with caplog.at_level(logging.WARNING, logger="lra.tasks.pathfinder"):
        task = Pathfinder(cfg)
        assert task.prepare() == base
    assert "skipped 1 empty or unreadable" in caplog.text
    train, val, test = (task.split(s) for s in ("train", "val", "test"))
    # 80/10/10 of the 20 rows in file order; row 3 (empty PNG) dropped from train.
    order = [i for i in range(16) if i != 3]
    assert train["targets"].tolist() == [labels[i] for i in order]
    assert val["targets"].tolist() == labels[16:18] and test["targets"].tolist() == labels[18:20]
    expected = np.stack([images[i] for i in order]).reshape(len(order), -1).astype(np.int32) + 1
    assert np.array_equal(train["inputs"], expected)
    assert np.array_equal(test["inputs"][1], images[19].reshape(-1).astype(np.int32) + 1)


def test_release_errors_name_the_fix(tmp_path):
    with pytest.raises(DataError, match="task.data_dir"):
        Pathfinder(tiny_cfg(tmp_path, data_dir=str(tmp_path / "nothing"))).prepare()
    base, _, _ = write_release(tmp_path / "lra", count=10)
    (base / "metadata" / "1.npy").write_text("imgs/1 sample_5.png 5 1\nimgs/1 sample_6.png\n")
    with pytest.raises(DataError, match=r"1\.npy:2"):
        Pathfinder(tiny_cfg(tmp_path, data_dir=str(tmp_path / "lra"))).prepare()
    np.save(base / "metadata" / "2.npy", np.arange(3))
    with pytest.raises(DataError, match="expected strings"):
        read_metadata(base / "metadata" / "2.npy")
    assert read_metadata(base / "metadata" / "0.npy")[0] == (1, "imgs/0 sample_0.png 0 1 14 1.5 2".split())


def bomb_png(path, width, height):
    """A real 1x1 PNG whose IHDR claims width x height pixels (CRC fixed): a decompression bomb
    as PIL sees it when opening, a few dozen bytes on disk."""
    import io
    import struct
    import zlib

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((1, 1), np.uint8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


def test_decompression_bomb_png_is_skipped_and_named(tmp_path, caplog):
    base, images, labels = write_release(tmp_path / "lra")
    bomb_png(base / "imgs" / "0" / "sample_5.png", 30000, 30000)  # past 2x MAX: PIL raises
    bomb_png(base / "imgs" / "0" / "sample_7.png", 10000, 10000)  # past 1x MAX: PIL warns
    assert 10000 * 10000 > Image.MAX_IMAGE_PIXELS
    cfg = tiny_cfg(tmp_path / "cache", data_dir=str(tmp_path / "lra"))
    with caplog.at_level(logging.WARNING, logger="lra.tasks.pathfinder"):
        task = Pathfinder(cfg)
        task.prepare()
    (line,) = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert "skipped 3 empty or unreadable images" in line
    assert "empty file: 1, first imgs/0/sample_3.png" in line
    assert "decompression bomb: 2, first imgs/0/sample_5.png (Image size" in line
    order = [i for i in range(16) if i not in (3, 5, 7)]
    train = task.split("train")
    assert train["targets"].tolist() == [labels[i] for i in order]
    assert np.array_equal(train["inputs"][4], images[6].reshape(-1).astype(np.int32) + 1)


def test_wrong_resolution_is_refused_from_the_header(tmp_path):
    base, _, _ = write_release(tmp_path / "lra", count=10)
    bomb_png(base / "imgs" / "0" / "sample_1.png", 64, 64)  # truncated data: never decoded
    with pytest.raises(DataError, match=r"sample_1.png: image is 64x64, expected 32x32; "
                                        r"check task.resolution"):
        Pathfinder(tiny_cfg(tmp_path / "cache", data_dir=str(tmp_path / "lra"))).prepare()


def test_preview_writes_png(tmp_path):
    task = Pathfinder(tiny_cfg(tmp_path))
    path = task.preview(task.prepare())
    assert path.parent == task.prepare() and path.suffix == ".png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_tiny_end_to_end(tmp_path):
    assert tiny_cli_run(tmp_path, "pathfinder")["seq_len"] == 1024
