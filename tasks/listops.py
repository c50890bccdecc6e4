"""ListOps (Nangia & Bowman 2018) as in LRA: a generator of the grammar and a TSV reader.

Files follow the LRA release: `<prefix>_{train,val,test}.tsv`, header `Source<TAB>Target`,
sources such as `( ( [MAX 2 ) 9 ) ] )`. Tokenisation as LRA: parentheses dropped, `]` a token.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import glob
import random
import sys
from pathlib import Path

import numpy as np

from lra.tasks.base import (CLS_ID, SPLITS, ArrayTask, DataError, TaskConfig, atomic_file,
                            content_key, data_field, generated_dir, pad_or_truncate, register_task,
                            save_npz, split_seed)

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
END = "]"
VOCAB = {tok: i for i, tok in enumerate([str(d) for d in range(10)] + list(OPERATORS) + [END], start=2)}
NUM_CLASSES = 10  # results of ListOps expressions: digits 0-9


@dataclasses.dataclass
class ListOpsConfig(TaskConfig):
    name: str = "listops"
    seq_len: int = 512
    file_prefix: str = "basic"   # with data_dir: reads DIR/<prefix>_{train,val,test}.tsv
    # data_field: the generated TSVs depend on it (cache key); seq_len only pads/cuts them.
    num_train: int = data_field(20000)
    num_val: int = data_field(1000)
    num_test: int = data_field(1000)
    min_length: int = data_field(100)   # in tokens (operators, digits and `]`)
    max_length: int = data_field(500)
    max_depth: int = data_field(10)
    max_args: int = data_field(10)
    leaf_prob: float = data_field(0.75)
    data_seed: int = data_field(0)      # generator seed (independent of the training seed)


def apply_op(op: str, values: list[int]) -> int:
    if op == "[MIN":
        return min(values)
    if op == "[MAX":
        return max(values)
    if op == "[MED":
        return int(np.median(values))  # LRA: int() of numpy's median (floors .5 on digits)
    if op == "[SM":
        return sum(values) % 10
    raise ValueError(op)


class _TooLong(Exception):
    pass


def _tree(rng: random.Random, depth: int, cfg: ListOpsConfig, budget: list[int]):
    """Random tree as nested (op, [children]) / int; gives up once past max_length tokens."""
    if depth >= cfg.max_depth or rng.random() < cfg.leaf_prob:
        budget[0] -= 1
        return rng.randrange(10)
    budget[0] -= 2
    if budget[0] < 0:
        raise _TooLong
    op = OPERATORS[rng.randrange(len(OPERATORS))]
    num_args = rng.randint(2, cfg.max_args)
    return op, [_tree(rng, depth + 1, cfg, budget) for _ in range(num_args)]


def _evaluate_tree(tree) -> int:
    if isinstance(tree, int):
        return tree
    op, children = tree
    return apply_op(op, [_evaluate_tree(c) for c in children])


def _to_string(tree) -> str:
    """LRA's bracketing: ((op a) b) ... then `]`, every pair wrapped in parentheses."""
    if isinstance(tree, int):
        return str(tree)
    op, children = tree
    text = f"( {op} {_to_string(children[0])} )"
    for child in children[1:]:
        text = f"( {text} {_to_string(child)} )"
    return f"( {text} {END} )"


def _num_tokens(tree) -> int:
    if isinstance(tree, int):
        return 1
    return 2 + sum(_num_tokens(c) for c in tree[1])


def generate(cfg: ListOpsConfig, n: int, seed: int) -> list[tuple[str, int]]:
    """`n` examples whose token count lies in [min_length, max_length] (rejection sampling)."""
    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))
    rng = random.Random(seed)  # scalar draws: ~10x faster than numpy's Generator here
    out = []
    while len(out) < n:
        try:
            tree = _tree(rng, 1, cfg, [cfg.max_length])
        except _TooLong:
            continue
        if cfg.min_length <= _num_tokens(tree) <= cfg.max_length:
            out.append((_to_string(tree), _evaluate_tree(tree)))
    return out


def write_tsv(path: Path, rows: list[tuple[str, int]]) -> None:
    with atomic_file(path, "w", newline="") as f:
        f.write("Source\tTarget\n")
        for source, target in rows:
            f.write(f"{source}\t{target}\n")


def tokenize(source: str) -> list[int]:
    return [VOCAB[tok] for tok in source.split() if tok not in ("(", ")")]


COLUMNS = ("Source", "Target")
# Longest field read, in characters per token of the task's length (max(seq_len, max_length)):
# LRA's bracketing spends at most ~7 characters per token (`( ( [MAX 2 ) 9 ) ] )`), so 16 per
# token leaves room while still refusing a runaway field (a stray `"` opens a quoted field that
# reads on across lines). Never below Python csv's own default limit (131072 characters).
FIELD_CHARS_PER_TOKEN = 16
CSV_DEFAULT_FIELD_LIMIT = 131072


def field_limit(cfg: ListOpsConfig) -> int:
    """Longest TSV field read for `cfg` (see FIELD_CHARS_PER_TOKEN)."""
    return max(CSV_DEFAULT_FIELD_LIMIT, FIELD_CHARS_PER_TOKEN * max(cfg.seq_len, cfg.max_length))


@contextlib.contextmanager
def _csv_field_limit(limit: int):
    """csv's field limit raised to `limit` (never lowered) while reading, then put back."""
    old = csv.field_size_limit()
    csv.field_size_limit(max(old, limit))
    try:
        yield max(old, limit)
    finally:
        csv.field_size_limit(old)


def read_tsv(path: Path, max_field: int = CSV_DEFAULT_FIELD_LIMIT
             ) -> tuple[list[list[int]], list[int]]:
    """Rows of a ListOps TSV (header `Source<TAB>Target`, then two columns per row); a malformed
    row, a row with another number of columns, a field longer than `max_field` characters (see
    field_limit), a label outside 0-9, non-UTF-8 bytes or a file without rows raise a one-line
    DataError naming the file and the line (where a row starts)."""
    sources, targets = [], []
    line_no = 1
    try:
        with open(path, newline="", encoding="utf-8") as f, _csv_field_limit(max_field) as limit:
            reader = csv.reader(f, delimiter="\t")
            try:
                header = next(reader, None)
                if header is None or [h.strip() for h in header] != list(COLUMNS):
                    raise DataError(f"{path}:1: expected header 'Source<TAB>Target' (2 columns), "
                                    f"got {header}")
                while True:
                    line_no = reader.line_num + 1  # where the next row starts
                    row = next(reader, None)
                    if row is None:
                        break
                    if len(row) != len(COLUMNS):
                        raise DataError(f"{path}:{line_no}: {_columns(row)}, expected "
                                        f"{len(COLUMNS)} (Source<TAB>Target); fix or remove the row")
                    try:
                        source, target = row[0], int(row[1])
                        sources.append([CLS_ID] + tokenize(source))
                    except (ValueError, KeyError) as err:
                        raise DataError(f"{path}:{line_no}: malformed ListOps row ({err!r})") from None
                    if not 0 <= target < NUM_CLASSES:
                        raise DataError(f"{path}:{line_no}: label {target} outside 0-"
                                        f"{NUM_CLASSES - 1}; fix or remove the row")
                    targets.append(target)
            except csv.Error as err:
                if "field limit" not in str(err):
                    raise DataError(f"{path}:{line_no}: unreadable TSV row ({err}); fix or remove "
                                    f"the row") from None
                raise DataError(
                    f"{path}:{line_no}: a field longer than {limit} characters (the reader's bound: "
                    f"{FIELD_CHARS_PER_TOKEN} per token of max(task.seq_len, task.max_length)); "
                    f"a stray '\"' may have opened a quoted field running over the lines after "
                    f"it: fix the row; if the source is really this long, raise task.seq_len "
                    f"(it is cut to seq_len tokens anyway) or shorten it") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); "
                        f"re-export the file as UTF-8") from None
    if not targets:
        raise DataError(f"{path}: no examples after the header; regenerate it (delete the file) "
                        f"or point task.data_dir at the LRA release")
    return sources, targets


def _columns(row: list[str]) -> str:
    """'3 tab-separated columns' / 'an empty line', and a hint when a quote joined lines."""
    if not row:
        return "an empty line"
    joined = any("\n" in field or "\r" in field for field in row)
    hint = " (a '\"' opened a quoted field that runs across lines)" if joined else ""
    return f"{len(row)} tab-separated column{'s' if len(row) != 1 else ''}{hint}"


@register_task(ListOpsConfig)
class ListOps(ArrayTask):
    cfg: ListOpsConfig
    vocab_size = len(VOCAB) + 2
    num_classes = NUM_CLASSES

    @classmethod
    def config_at_length(cls, cfg: ListOpsConfig, seq_len: int) -> ListOpsConfig:
        """Generated data: expression lengths scaled with the sequence (a train split of one
        example, never used); released files: the same files, truncated/padded to seq_len."""
        if cfg.data_dir:
            return dataclasses.replace(cfg, seq_len=seq_len)
        scale = seq_len / cfg.seq_len
        return dataclasses.replace(cfg, seq_len=seq_len, num_train=1,
                                   min_length=max(1, round(cfg.min_length * scale)),
                                   max_length=max(1, round(cfg.max_length * scale)))

    def data_dir(self) -> Path:
        if self.cfg.data_dir:
            return Path(self.cfg.data_dir).expanduser()
        return generated_dir(self.cfg)

    def prepare(self) -> Path:
        directory = self.data_dir()
        prefix = self.cfg.file_prefix
        if self.cfg.data_dir:
            for split in SPLITS:
                if not (directory / f"{prefix}_{split}.tsv").is_file():
                    raise DataError(
                        f"ListOps file {directory / f'{prefix}_{split}.tsv'} not found: put the LRA "
                        f"release's {prefix}_{{train,val,test}}.tsv in task.data_dir, set "
                        f"task.file_prefix, or drop task.data_dir to generate the data")
            return directory
        if all((directory / f"{prefix}_{s}.tsv").is_file() for s in SPLITS):
            return directory
        directory.mkdir(parents=True, exist_ok=True)
        for split in SPLITS:
            rows = generate(self.cfg, getattr(self.cfg, f"num_{split}"),
                            split_seed(self.cfg.data_seed, split, flat=True))
            write_tsv(directory / f"{prefix}_{split}.tsv", rows)
        return directory

    def load_split(self, split: str) -> dict[str, np.ndarray]:
        """The split's arrays, cached beside the TSV as `<stem>.L<seq_len>.<content key>.npz`:
        keyed on the TSV's bytes, not its mtime, so a file restored with an old mtime is read."""
        path = self.prepare() / f"{self.cfg.file_prefix}_{split}.tsv"
        stem = f"{path.stem}.L{self.cfg.seq_len}"
        cached = path.with_name(f"{stem}.{content_key([path])}.npz")
        if cached.is_file():
            with np.load(cached, allow_pickle=False) as f:
                return {"inputs": f["inputs"], "targets": f["targets"]}
        sources, targets = read_tsv(path, field_limit(self.cfg))
        arrays = {"inputs": pad_or_truncate(sources, self.cfg.seq_len),
                  "targets": np.asarray(targets, np.int32)}
        try:
            save_npz(cached, **arrays)
        except OSError:
            return arrays  # read-only release directory: re-tokenise next time
        for old in path.parent.glob(f"{glob.escape(stem)}.*npz"):  # this TSV's older caches
            if old.name != cached.name:
                try:
                    old.unlink()
                except OSError:
                    pass
        return arrays
