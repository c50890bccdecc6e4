"""The Task interface: a spec plus fixed-shape numpy batches. Padding id is always 0."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

import numpy as np

PAD_ID = 0
CLS_ID = 1
SPLITS = ("train", "val", "test")


class DataError(RuntimeError):
    """Missing or malformed data; the message is one line that names the fix."""


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str
    vocab_size: int
    num_classes: int
    seq_len: int
    # What a batch of each kind holds (B examples of L = seq_len; ids int32, 0 = padding); the
    # model's head follows the kind. Eval batches add `valid` bool[B] (False: padding rows).
    #   classify: inputs [B, L], targets [B] (class ids)
    #   match:    inputs1, inputs2 [B, L] (the two documents), targets [B]
    #   tokens:   inputs [B, L], targets [B, L], weights float32 [B, L] (1 = a scored position)
    kind: str                  # classify | match | tokens
    default_pool: str = "cls"  # cls | mean


@dataclasses.dataclass
class TaskConfig:
    name: str = "listops"
    seq_len: int = 512
    data_dir: str | None = None       # released files; None = generate / default location
    cache_dir: str | None = None      # None = $LRA_CACHE or ~/.cache/lra-bench


def data_field(default):
    """A config field the task's generated data depends on: it enters the cache key
    (`data_key`). Tasks that cache nothing they generate (text, retrieval, image) mark none."""
    return dataclasses.field(default=default, metadata={"data": True})


def data_params(cfg: TaskConfig, **extra) -> dict:
    """The config's `data_field`s by name, then `extra`: derived values (a resolved `auto`, a
    generator version) that replace or join them."""
    fields = [f.name for f in dataclasses.fields(cfg) if f.metadata.get("data")]
    return {**{name: getattr(cfg, name) for name in fields}, **extra}


def data_key(cfg: TaskConfig, **extra) -> str:
    """Short stable hash of `data_params`: one cache directory per data setting."""
    params = json.dumps(data_params(cfg, **extra), sort_keys=True)
    return hashlib.sha1(params.encode()).hexdigest()[:10]


def split_seed(data_seed: int, split: str, flat: bool = False) -> list[int] | int:
    """The seed of one split's data, so train/val/test are independent draws of one data_seed:
    [data_seed, split index] (numpy seed entropy), or with `flat` the single int
    data_seed * 3 + split index for generators seeded with one int (listops' random.Random;
    pathfinder keeps this form too, so its cached images stay the same)."""
    index = SPLITS.index(split)
    return data_seed * len(SPLITS) + index if flat else [data_seed, index]


def cache_root(cfg: TaskConfig) -> Path:
    root = cfg.cache_dir or os.environ.get("LRA_CACHE") or Path.home() / ".cache" / "lra-bench"
    return Path(root).expanduser()


def generated_dir(cfg: TaskConfig, **extra) -> Path:
    """Where a task's generated data lives: <cache root>/<task name>/<data_key(cfg, **extra)>."""
    return cache_root(cfg) / cfg.name / data_key(cfg, **extra)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """Write `path` through a private temp file in its directory (`mkstemp`: a unique name per
    writer), synced to disk and renamed over `path` only when the block succeeds; concurrent
    writers of one file never rename each other's half-written file, and readers (also after a
    crash) see old or new, never half. The project's one atomic writer."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """np.savez to `path` atomically (see `atomic_file`)."""
    with atomic_file(path, "wb") as f:
        np.savez(f, **arrays)


def content_key(paths: Iterable[str | os.PathLike], root: str | os.PathLike | None = None) -> str:
    """Short hash of the files' content: per file its name (relative to `root`, else the bare
    name), size and every byte, read in 1 MiB chunks. Caches keyed on it follow the data, not
    its mtime (a file restored with `cp -p` or from a tar is seen as the content it holds)."""
    digest = hashlib.sha1()
    for path in paths:
        path = Path(path)
        name = os.path.relpath(path, root) if root is not None else path.name
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            digest.update(f"{name}\0{size}\0".encode())
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def pad_or_truncate(rows: list[list[int]], length: int) -> np.ndarray:
    out = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        row = row[:length]
        out[i, : len(row)] = row
    return out


def fit_length(tokens_NxP: np.ndarray, length: int) -> np.ndarray:
    """int32[N, length]: each row's first `length` tokens, 0-padded past its end."""
    out = np.zeros((len(tokens_NxP), length), np.int32)
    keep = min(length, tokens_NxP.shape[1])
    out[:, :keep] = tokens_NxP[:, :keep]
    return out


class ArrayTask:
    """A task whose splits are in-memory arrays of equal first dimension.

    Subclasses declare the spec's fixed part below (or override `spec`) and implement
    `prepare()` and `load_split(split) -> dict[str, np.ndarray]`.
    """

    cfg: TaskConfig
    vocab_size: int
    num_classes: int
    kind: str = "classify"
    default_pool: str = "cls"
    fixed_length: str = ""  # why a task has one length ("32x32 pixels"): eval.seq_lens refuses it

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg
        self._splits: dict[str, dict[str, np.ndarray]] = {}

    @property
    def spec(self) -> TaskSpec:
        return TaskSpec(self.cfg.name, vocab_size=self.vocab_size, num_classes=self.num_classes,
                        seq_len=self.cfg.seq_len, kind=self.kind, default_pool=self.default_pool)

    @classmethod
    def config_at_length(cls, cfg: TaskConfig, seq_len: int) -> TaskConfig:
        """The config for evaluating at another length (`eval.seq_lens`): here the same data
        truncated/padded to `seq_len`; tasks with generated data make data for that length."""
        if cls.fixed_length:
            raise ValueError(f"task={cfg.name} has a fixed length ({cls.fixed_length}); "
                             f"eval.seq_lens applies to listops, copy, text and retrieval")
        return dataclasses.replace(cfg, seq_len=seq_len)

    @classmethod
    def chance_accuracy(cls, cfg: TaskConfig) -> float:
        """Accuracy of guessing uniformly over the classes (the report's chance row); tasks
        whose targets are a subset of their classes (per-token tasks) override it."""
        return 1.0 / cls.num_classes

    @classmethod
    def size_label(cls, cfg: TaskConfig) -> tuple[str, str] | None:
        """(config field, text) where `cfg` sets the task's size away from its canonical one (a
        preset that shrinks Path-X to 32x32): report columns name it ("pathx (32x32)"); None at
        the canonical size."""
        return None

    def prepare(self) -> Path:
        """Generate or check the data ahead of a run; returns the directory it lives in."""
        raise NotImplementedError

    def load_split(self, split: str) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def split(self, split: str) -> dict[str, np.ndarray]:
        if split not in self._splits:
            self._splits[split] = self.check_split(split, self.load_split(split))
        return self._splits[split]

    def check_split(self, split: str, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every reader's output, checked once: a non-empty split whose targets are classes of
        the spec (optax would silently wrap -1 to the last class and turn 42 into NaN)."""
        spec = self.spec
        n = len(next(iter(data.values()))) if data else 0
        if n == 0:
            raise DataError(f"{spec.name} {split} split is empty; check task.data_dir and the "
                            f"task.num_{split} setting")
        targets = np.asarray(data["targets"])
        if "weights" in data:  # per-token tasks: only weighted positions are scored
            targets = targets[np.asarray(data["weights"]) > 0]
        bad = (targets < 0) | (targets >= spec.num_classes)
        if bad.any():
            value = int(targets[bad][0])
            raise DataError(f"{spec.name} {split} split: {int(bad.sum())} target(s) outside "
                            f"[0, {spec.num_classes}), e.g. {value}; fix the data files")
        return data

    def num_examples(self, split: str) -> int:
        return len(next(iter(self.split(split).values())))

    def generate(self, num: int, seed) -> dict[str, np.ndarray]:
        """`num` fresh examples drawn with numpy seed `seed`: tasks with a generator that offer
        `task.fresh_train` implement it (see `stream`)."""
        raise NotImplementedError(f"task {self.spec.name} has no generator for task.fresh_train")

    def stream(self, batch_size: int, seed: int, start_step: int = 0
               ) -> Iterator[dict[str, np.ndarray]]:
        """task.fresh_train: every train batch drawn afresh, step `s` from numpy seed
        [data_seed, 0, seed, s] (the train split's entropy [data_seed, 0] extended), so no
        example is shown twice, a resumed run continues the same stream and val / test (seeds
        [data_seed, 1] and [data_seed, 2]) stay fixed, independent draws."""
        data_seed = getattr(self.cfg, "data_seed", 0)
        step = start_step
        while True:
            yield self.generate(batch_size, [data_seed, 0, seed, step])
            step += 1

    def batches(self, split: str, batch_size: int, seed: int = 0,
                start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Train: endless shuffled full batches, order a function of (seed, step) only; with
        `task.fresh_train` (generated tasks) fresh batches from a seeded stream (`stream`).
        Eval splits: one pass; the last batch padded to full size with `valid` False."""
        if split == "train" and getattr(self.cfg, "fresh_train", False):
            yield from self.stream(batch_size, seed, start_step)
            return
        data = self.split(split)
        n = self.num_examples(split)
        if split == "train":
            if n < batch_size:
                raise DataError(f"{self.spec.name} train split has {n} examples < "
                                f"train.batch_size={batch_size}; lower the batch size")
            per_epoch = n // batch_size
            step = start_step
            while True:
                epoch, index = divmod(step, per_epoch)
                order = np.random.default_rng([seed, epoch]).permutation(n)
                rows = order[index * batch_size:(index + 1) * batch_size]
                yield {key: value[rows] for key, value in data.items()}
                step += 1
        else:
            for start in range(0, n, batch_size):
                rows = np.arange(start, start + batch_size)
                valid = rows < n
                rows = np.where(valid, rows, 0)
                batch = {key: value[rows] for key, value in data.items()}
                batch["valid"] = valid
                yield batch


def synthetic_batch(spec: TaskSpec, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A batch of `spec.kind` (see TaskSpec) of random full-length tokens, no padding, ids from 2
    (above PAD and CLS): for benchmarks that need the shapes, not the data."""
    rng = np.random.default_rng(seed)

    def tokens() -> np.ndarray:
        return rng.integers(2, spec.vocab_size, (batch_size, spec.seq_len), dtype=np.int32)

    if spec.kind == "match":
        return {"inputs1": tokens(), "inputs2": tokens(),
                "targets": rng.integers(0, spec.num_classes, batch_size, dtype=np.int32)}
    if spec.kind == "tokens":
        return {"inputs": tokens(), "weights": np.ones((batch_size, spec.seq_len), np.float32),
                "targets": rng.integers(0, spec.num_classes, (batch_size, spec.seq_len),
                                        dtype=np.int32)}
    return {"inputs": tokens(),
            "targets": rng.integers(0, spec.num_classes, batch_size, dtype=np.int32)}


# task name -> (task class, config dataclass), filled by register_task.
REGISTRY: dict[str, tuple[type[ArrayTask], type[TaskConfig]]] = {}


def register_task(config_cls: type[TaskConfig]):
    """Class decorator factory: make a task available as `task=<name>` (the name is the config
    dataclass's `name` default). `@register_task(MyConfig)` on an ArrayTask subclass; one class
    may serve several configs (pathfinder and pathx)."""
    if not (dataclasses.is_dataclass(config_cls) and issubclass(config_cls, TaskConfig)):
        raise TypeError(f"register_task expects a TaskConfig dataclass, got {config_cls!r}")
    name = config_cls().name

    def decorate(cls: type[ArrayTask]) -> type[ArrayTask]:
        if not (isinstance(cls, type) and issubclass(cls, ArrayTask)):
            raise TypeError(f"@register_task expects an ArrayTask subclass, got {cls!r}")
        known = REGISTRY.get(name)
        if known is not None and known[1].__qualname__ != config_cls.__qualname__:
            raise ValueError(f"task {name!r} is already registered by {known[0].__module__}")
        REGISTRY[name] = (cls, config_cls)
        return cls

    return decorate
