"""The MAD synthetic tasks (Poli et al. 2024, "Mechanistic Design and Scaling of Hybrid
Architectures"; generators: athms/mad-lab `mad/data/instances.py`, baselines:
`configs/tasks/*.yml`, 1,280 test examples: `MADConfig`), kind=tokens; `task.task` picks one.

MAD trains causal language models; this harness's encoders are bidirectional. So a scored
position holds a placeholder in the input and its answer as target, and nothing to its right
shows that answer: the model has what MAD's causal model has when it predicts, plus later tokens
that are independent of the answer. Training is scored on the positions testing scores: as in
MAD for selective copying and memorization; for the recall tasks MAD's causal LM also trains on
every other next token (random keys, first-seen values, noise: what a bidirectional encoder sees
in its input). Nothing else is changed; MAD's quirks are kept.

Token ids: 0 PAD (never used: rows are full), 1 BLANK, 2 + t for MAD's token t, t < V =
`vocab_size` as MAD counts it (its special and noise tokens included). Targets are token ids
(num_classes = V + 2). Layouts in MAD's ids, L = seq_len, baselines in brackets:

  in_context_recall [V 16, L 128]: L/2 pairs `k v`, keys uniform over [0, S/2), S = V; a key's
      value (uniform over [S/2, S)) is drawn at its first occurrence and kept. The last pair
      repeats a key, uniformly one of the distinct keys shown. Every pair whose key came earlier
      is scored at its value (MAD's multi_query): input BLANK, target the value.
  noisy_in_context_recall [V 32 with 16 noise, frac 0.2, L 128]: the same with S = V - noise;
      each pair but the last is instead 2 noise tokens of [S, V) with probability frac_noise
      (one pair at a random slot is always kept).
  fuzzy_in_context_recall [V 16, motifs <= 3, L 128]: pairs of a key motif (uniform length 1..k,
      then uniform distinct tokens of [0, S/2), S = V - 1) and a value motif (length 1..v, tokens
      of [S/2, S)); val/test keys are always k long (MAD's test set). A probe pair goes in at the
      first pair boundary at or after a uniform index in [0, L - 2|probe|) unless its key came up
      already; pairs are added while the length is below L - |probe| - (k + v); then the probe
      pair again, and the row is left-padded with V - 1. Every value of a key shown before is
      scored, all its tokens BLANK; the last one is scored even in the rare rows whose probe was
      never placed (MAD's generator does so). The BLANK span shows the value's length, which
      MAD's causal model instead meets token by token.
  selective_copying [V 16, n 16, L 256]: n symbols of [0, V-2) in order with L-2n-1 blanks
      (V-2) spread before them (each before a uniformly chosen symbol, none after the last, as
      MAD's np.insert does), then COPY (V-1) and n blanks scored with the n symbols: MAD's own
      layout already has placeholders at the answers.
  memorization [V 256, L 32, 256 train]: L/2 pairs `k INSERT` (INSERT = V-1), keys uniform over
      [0, S/2), S = V-1, scored at INSERT with the key's value under one fixed injective map into
      [S/2, S) drawn from data_seed alone. The fixed train split is what is memorised: val/test
      are new rows of the same map, and task.fresh_train is refused.
  compression: not posed, see NOT_POSED.

Generated in memory by vectorised numpy from `data_seed`; only params.json is written.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from lra.tasks.base import (SPLITS, ArrayTask, TaskConfig, TaskSpec, atomic_file, data_field,
                            data_params, generated_dir, register_task, split_seed)

PAD_ID, BLANK_ID, OFFSET = 0, 1, 2  # MAD's token t is id t + OFFSET
TASKS = ("in_context_recall", "fuzzy_in_context_recall", "noisy_in_context_recall",
         "selective_copying", "compression", "memorization")
# MAD's baseline per task (configs/tasks/<task>.yml); a 0 in MADConfig takes these.
BASELINES = {
    "in_context_recall": dict(seq_len=128, vocab_size=16, num_train=12800),
    "fuzzy_in_context_recall": dict(seq_len=128, vocab_size=16, num_train=12800),
    "noisy_in_context_recall": dict(seq_len=128, vocab_size=32, num_train=12800),
    "selective_copying": dict(seq_len=256, vocab_size=16, num_train=12800),
    "compression": dict(seq_len=32, vocab_size=16, num_train=12800),
    "memorization": dict(seq_len=32, vocab_size=256, num_train=256),
}
NOT_POSED = {"compression": (
    "task.task=compression is not posed here: MAD decodes the sequence from one pooled token "
    "through an MLP (its autoencoder backbone), and a per-token encoder whose every output sees "
    "every input has no such bottleneck (it would be task=copy); pick another task.task")}
# Settings only some tasks read: a changed value elsewhere is refused, never silently unused.
KNOBS = {"noise_vocab_size": "noisy_in_context_recall", "frac_noise": "noisy_in_context_recall",
         "k_motif_size": "fuzzy_in_context_recall", "v_motif_size": "fuzzy_in_context_recall",
         "num_tokens_to_copy": "selective_copying"}


@dataclasses.dataclass
class MADConfig(TaskConfig):
    name: str = "mad"
    task: str = data_field("in_context_recall")  # one of TASKS
    # 0 = MAD's baseline of task.task (BASELINES): 128 (selective copying 256, memorization 32)
    seq_len: int = data_field(0)
    vocab_size: int = data_field(0)          # 16 (noisy recall 32, memorization 256)
    noise_vocab_size: int = data_field(16)   # noisy recall: noise symbols, part of vocab_size
    frac_noise: float = data_field(0.2)      # noisy recall: chance a pair is noise instead
    k_motif_size: int = data_field(3)        # fuzzy recall: longest key motif
    v_motif_size: int = data_field(3)        # fuzzy recall: longest value motif
    num_tokens_to_copy: int = data_field(16)  # selective copying: n
    num_train: int = data_field(0)           # 12,800 (memorization 256)
    num_val: int = data_field(1280)          # MAD has none (it selects on test): test's size
    num_test: int = data_field(1280)
    data_seed: int = data_field(0)
    # Train batches drawn afresh every step (ArrayTask.stream); refused for memorization.
    fresh_train: bool = data_field(False)


def baseline_seq_len(task: str) -> int:
    """configs/task/mad.yaml's `seq_len: ${mad_seq_len:${task.task}}`: the composed config (run
    directory, range checks, result rows) holds the length of MAD's baseline of `task`."""
    return BASELINES.get(task, BASELINES[MADConfig.task])["seq_len"]  # a bad name: resolve()


if not OmegaConf.has_resolver("mad_seq_len"):
    OmegaConf.register_new_resolver("mad_seq_len", baseline_seq_len)


def symbols(s: MADConfig) -> int:
    """MAD's non-special symbols: keys then values (recall, memorization), copy content."""
    return s.vocab_size - {"in_context_recall": 0, "noisy_in_context_recall": s.noise_vocab_size,
                           "fuzzy_in_context_recall": 1, "memorization": 1,
                           "selective_copying": 2}[s.task]


def resolve(cfg: MADConfig) -> MADConfig:
    """`cfg` with every 0 replaced by MAD's baseline of cfg.task, checked: ValueError with a
    one-line fix for an unknown or unposed task or settings that do not fit."""
    if cfg.task not in BASELINES:
        raise ValueError(f"task.task={cfg.task!r}; use one of "
                         f"{', '.join(t for t in TASKS if t not in NOT_POSED)}")
    if cfg.task in NOT_POSED:
        raise ValueError(NOT_POSED[cfg.task])
    default = MADConfig()
    for knob, user in KNOBS.items():
        if cfg.task != user and getattr(cfg, knob) != getattr(default, knob):
            raise ValueError(f"task.{knob} applies to task.task={user} only (got "
                             f"{getattr(cfg, knob)} with task.task={cfg.task}); leave it at "
                             f"{getattr(default, knob)}")
    baseline = BASELINES[cfg.task]
    s = dataclasses.replace(cfg, **{k: getattr(cfg, k) or v for k, v in baseline.items()})
    check(s)
    return s


def check(s: MADConfig) -> None:
    """ValueError naming the fix when a resolved config cannot be generated."""
    L, task = s.seq_len, s.task
    if s.num_train < 1:
        raise ValueError(f"task.num_train={s.num_train}: use >= 1 (0 = MAD's "
                         f"{BASELINES[task]['num_train']})")
    if task == "memorization" and s.fresh_train:
        raise ValueError("task.task=memorization memorises a fixed training set: set "
                         "task.fresh_train=false")
    if task in ("in_context_recall", "noisy_in_context_recall", "memorization") and (
            L % 2 or L < (2 if task == "memorization" else 4)):
        raise ValueError(f"{task} is made of 2-token pairs: task.seq_len must be even and >= "
                         f"{2 if task == 'memorization' else 4} (got {L})")
    if task == "noisy_in_context_recall" and not (
            0 <= s.frac_noise < 1 and s.noise_vocab_size >= (1 if s.frac_noise else 0)):
        raise ValueError(f"task.frac_noise={s.frac_noise} with task.noise_vocab_size="
                         f"{s.noise_vocab_size}: use frac_noise in [0, 1) and noise_vocab_size "
                         f">= 1 (MAD: 0.2 and 16)")
    if task == "fuzzy_in_context_recall":
        k, v = s.k_motif_size, s.v_motif_size
        if min(k, v) < 1 or symbols(s) // 2 < k or symbols(s) - symbols(s) // 2 < v:
            raise ValueError(f"fuzzy_in_context_recall draws motifs of distinct tokens: needs "
                             f"1 <= task.k_motif_size <= {symbols(s) // 2} and 1 <= "
                             f"task.v_motif_size <= {symbols(s) - symbols(s) // 2} at "
                             f"task.vocab_size={s.vocab_size} (got {k}, {v}); raise vocab_size")
        if L <= 2 * (k + v):
            raise ValueError(f"fuzzy_in_context_recall with motifs {k}, {v} needs task.seq_len > "
                             f"{2 * (k + v)} (got {L}): raise task.seq_len")
    if task == "selective_copying" and not 1 <= s.num_tokens_to_copy < (L - 1) / 2:
        raise ValueError(f"selective_copying needs 1 <= task.num_tokens_to_copy < (task.seq_len "
                         f"- 1) / 2 (got {s.num_tokens_to_copy} at seq_len {L}): lower "
                         f"num_tokens_to_copy or raise seq_len")
    if symbols(s) < (1 if task == "selective_copying" else 2):
        raise ValueError(f"task.vocab_size={s.vocab_size} leaves {task} {symbols(s)} symbols: "
                         f"raise task.vocab_size")


def answer_symbols(s: MADConfig) -> int:
    """How many symbols a scored target can be: the values (recall), the map's image
    (memorization: one per key), the copied symbols."""
    keys = symbols(s) // 2
    return {"memorization": keys, "selective_copying": symbols(s)}.get(s.task, symbols(s) - keys)


def scored_batch(inputs_NxL, targets_NxL, scored_NxL) -> dict[str, np.ndarray]:
    return {"inputs": inputs_NxL.astype(np.int32),
            "targets": np.where(scored_NxL, targets_NxL, 0).astype(np.int32),
            "weights": scored_NxL.astype(np.float32)}


def first_occurrence(codes_NxS: np.ndarray) -> np.ndarray:
    """int[N, S]: for each slot, the first slot of its row that holds the same code."""
    n, s = codes_NxS.shape
    rows, slots, flat = np.repeat(np.arange(n), s), np.tile(np.arange(s), n), codes_NxS.ravel()
    order = np.lexsort((slots, flat, rows))  # by row, then code, then slot
    starts = np.ones(n * s, bool)
    starts[1:] = (rows[order][1:] != rows[order][:-1]) | (flat[order][1:] != flat[order][:-1])
    head = np.maximum.accumulate(np.where(starts, np.arange(n * s), 0))
    first = np.empty(n * s, np.int64)
    first[order] = slots[order[head]]
    return first.reshape(n, s)


def recall(s: MADConfig, num: int, rng: np.random.Generator, training: bool) -> dict:
    """in_context_recall and noisy_in_context_recall (train and test rows alike)."""
    pairs, noise = s.seq_len // 2, s.vocab_size - symbols(s)
    num_keys, slot = symbols(s) // 2, np.arange(s.seq_len // 2)
    row = np.arange(num)
    keys_NxP = rng.integers(0, num_keys, (num, pairs))
    drawn_NxP = rng.integers(num_keys, symbols(s), (num, pairs))
    noise_NxP = rng.random((num, pairs)) < (s.frac_noise if noise else 0.0)
    # MAD keeps one pair (not_noise_idx); its draw over all P slots may pick the probe's, a
    # no-op that can leave a row without pairs (p = frac^(P-1)): here over the P-1 others.
    noise_NxP[row, rng.integers(0, pairs - 1, num)] = False
    noise_NxP[:, -1] = False
    alone = noise_NxP | (slot == pairs - 1)  # noise and the probe's slot match no key
    first_NxP = first_occurrence(np.where(alone, -1 - slot, keys_NxP))
    shown = ~noise_NxP & (first_NxP == slot)
    shown[:, -1] = False
    probe = np.argmax(np.where(shown, rng.random((num, pairs)), -1.0), axis=1)
    keys_NxP[:, -1], first_NxP[:, -1] = keys_NxP[row, probe], probe
    values_NxP = drawn_NxP[row[:, None], first_NxP]  # a key's value: drawn where it came first
    seq_NxPx2 = np.stack([keys_NxP, values_NxP], axis=-1)
    if noise:
        noise_tokens = rng.integers(symbols(s), s.vocab_size, (num, pairs, 2))
        seq_NxPx2 = np.where(noise_NxP[..., None], noise_tokens, seq_NxPx2)
    scored_NxPx2 = np.zeros((num, pairs, 2), bool)
    scored_NxPx2[..., 1] = ~noise_NxP & (first_NxP < slot)
    seq, scored = seq_NxPx2.reshape(num, -1) + OFFSET, scored_NxPx2.reshape(num, -1)
    return scored_batch(np.where(scored, BLANK_ID, seq), seq, scored)


def motifs(rng: np.random.Generator, shape: tuple, alphabet: int, size: int) -> np.ndarray:
    """int[*shape, size]: distinct symbols of range(alphabet) in random order; each prefix is a
    uniform draw from MAD's permutations(vocab, length)."""
    out = np.zeros((*shape, size), np.int64)
    for i in range(size):
        pick = rng.integers(0, alphabet - i, shape)
        taken = np.sort(out[..., :i], axis=-1)
        for j in range(i):  # skip the symbols taken before, smallest first
            pick += pick >= taken[..., j]
        out[..., i] = pick
    return out


def fuzzy_recall(s: MADConfig, num: int, rng: np.random.Generator, training: bool) -> dict:
    """fuzzy_in_context_recall: MAD's sequential generator (docstring) in vectorised form.
    Random pairs 0..R-1 are drawn ahead (R = L//2 + 1: more than any row uses), index R is the
    probe; the probe is placed before random pair j* or not at all."""
    L, K, V = s.seq_len, s.k_motif_size, s.v_motif_size
    num_keys, R = symbols(s) // 2, L // 2 + 1
    row, rows = np.arange(num), np.arange(num)[:, None]
    k_len = rng.integers(1, K + 1, (num, R + 1)) if training else np.full((num, R + 1), K)
    v_len = rng.integers(1, V + 1, (num, R + 1))
    k_tok = motifs(rng, (num, R + 1), num_keys, K)
    v_tok = motifs(rng, (num, R + 1), symbols(s) - num_keys, V) + num_keys
    used_k = np.arange(K) < k_len[..., None]
    k_code = np.sum(np.where(used_k, k_tok + 1, 0) * (num_keys + 1) ** np.arange(K), axis=-1)
    # The value of each pair: the probe's for the probe key, else the one drawn at the key's
    # first occurrence (MAD's kv_map); `src` indexes whose value.
    is_probe_key = k_code[:, :R] == k_code[:, R:]
    first = first_occurrence(k_code[:, :R])
    src = np.concatenate([np.where(is_probe_key, R, first), np.full((num, 1), R)], axis=1)
    v_len, v_tok = v_len[rows, src], v_tok[rows, src]
    probe_len = k_len[:, R] + v_len[:, R]
    start = np.zeros((num, R + 1), np.int64)  # random pair j's start if the probe is not before
    start[:, 1:] = np.cumsum((k_len + v_len)[:, :R], axis=1)
    probe_at = rng.integers(0, L - 2 * probe_len)
    limit = L - probe_len - (K + V)  # MAD adds pairs while the length is below this
    j_star = np.argmax(start >= probe_at[:, None], axis=1)
    seen = np.where(is_probe_key.any(1), np.argmax(is_probe_key, axis=1), R)
    placed = (seen >= j_star) & (start[row, j_star] < limit)
    after = np.arange(R) >= j_star[:, None]
    used = start[:, :R] + np.where(placed[:, None] & after, probe_len[:, None], 0) < limit[:, None]
    repeat = used & ((first < np.arange(R)) | (is_probe_key & placed[:, None] & after))
    # Blocks in order: random pairs, the placed probe at j*, the final probe (always scored).
    b = np.arange(R + 2)
    block = np.where(b < j_star[:, None], b, b - 1)
    block = np.where(b == j_star[:, None], R, block)
    block[:, -1] = R
    present = np.concatenate([used, placed[:, None]], axis=1)[rows, block]
    present[:, -1] = True
    scored = np.concatenate([repeat, np.zeros((num, 1), bool)], axis=1)[rows, block]
    scored[:, -1] = True
    tokens = np.concatenate([k_tok[rows, block], v_tok[rows, block]], axis=-1)
    is_value = np.arange(K + V) >= K
    keep = present[..., None] & np.concatenate(
        [np.arange(K) < k_len[rows, block][..., None],
         np.arange(V) < v_len[rows, block][..., None]], axis=-1)
    tokens, keep = tokens.reshape(num, -1), keep.reshape(num, -1)
    scored = (scored[..., None] & is_value).reshape(num, -1) & keep
    count = keep.sum(axis=1)
    assert (count < L).all(), "MAD's fuzzy recall rows are shorter than seq_len"
    at = L - count[:, None] + np.cumsum(keep, axis=1) - 1  # right-aligned: left padding
    seq = np.full((num, L), s.vocab_size - 1 + OFFSET)
    out_scored = np.zeros((num, L), bool)
    where_row = np.broadcast_to(rows, keep.shape)[keep]
    seq[where_row, at[keep]] = tokens[keep] + OFFSET
    out_scored[where_row, at[keep]] = scored[keep]
    return scored_batch(np.where(out_scored, BLANK_ID, seq), seq, out_scored)


def selective_copying(s: MADConfig, num: int, rng: np.random.Generator, training: bool) -> dict:
    """selective_copying (train and test rows alike)."""
    L, n, V = s.seq_len, s.num_tokens_to_copy, s.vocab_size
    row = np.arange(num)[:, None]
    content = rng.integers(0, symbols(s), (num, n))
    gap = rng.integers(0, n, (num, L - 2 * n - 1))  # the symbol each blank goes before
    before = np.bincount((row * n + gap).ravel(), minlength=num * n).reshape(num, n)
    inputs = np.full((num, L), V - 2)
    inputs[row, np.arange(n) + np.cumsum(before, axis=1)] = content
    inputs[:, L - n - 1] = V - 1
    targets, scored = np.zeros((num, L), np.int64), np.zeros((num, L), bool)
    targets[:, L - n:], scored[:, L - n:] = content, True
    return scored_batch(inputs + OFFSET, targets + OFFSET, scored)


def key_values(s: MADConfig) -> np.ndarray:
    """int[num_keys]: the fixed map key -> value (MAD ids) of memorization, from data_seed alone
    (seed entropy [data_seed, 3]: beside the splits' [data_seed, 0..2])."""
    num_keys = symbols(s) // 2
    rng = np.random.default_rng([s.data_seed, len(SPLITS)])
    return rng.permutation(np.arange(num_keys, symbols(s)))[:num_keys]


def memorization(s: MADConfig, num: int, rng: np.random.Generator, training: bool) -> dict:
    """memorization: new rows of the fixed map (train and test rows alike)."""
    value_of = key_values(s)
    keys = rng.integers(0, len(value_of), (num, s.seq_len // 2))
    inputs = np.stack([keys, np.full_like(keys, s.vocab_size - 1)], axis=-1).reshape(num, -1)
    targets = np.stack([keys, value_of[keys]], axis=-1).reshape(num, -1)
    scored = np.zeros(inputs.shape, bool)
    scored[:, 1::2] = True
    return scored_batch(inputs + OFFSET, targets + OFFSET, scored)


GENERATORS = {"in_context_recall": recall, "noisy_in_context_recall": recall,
              "fuzzy_in_context_recall": fuzzy_recall, "selective_copying": selective_copying,
              "memorization": memorization}


def generate(cfg: MADConfig, num: int, seed, training: bool = True) -> dict[str, np.ndarray]:
    """`num` examples as {"inputs", "targets", "weights"} of shape [num, seq_len]; `training`:
    train rows (fuzzy recall's keys of every length), else test rows."""
    s = resolve(cfg)
    return GENERATORS[s.task](s, num, np.random.default_rng(seed), training)


@register_task(MADConfig)
class MAD(ArrayTask):
    cfg: MADConfig
    kind = "tokens"
    default_pool = "mean"  # unused by the per-token head

    @property
    def spec(self) -> TaskSpec:
        s = resolve(self.cfg)
        return TaskSpec(self.cfg.name, vocab_size=s.vocab_size + OFFSET,
                        num_classes=s.vocab_size + OFFSET, seq_len=s.seq_len, kind=self.kind,
                        default_pool=self.default_pool)

    @classmethod
    def config_at_length(cls, cfg: MADConfig, seq_len: int) -> MADConfig:
        """The same task at another length (memorization: the same map)."""
        return dataclasses.replace(cfg, seq_len=seq_len, num_train=1)

    @classmethod
    def chance_accuracy(cls, cfg: MADConfig) -> float:
        """Uniform guessing over the symbols a scored target can be (answer_symbols)."""
        return 1.0 / answer_symbols(resolve(cfg))

    @classmethod
    def size_label(cls, cfg: MADConfig) -> tuple[str, str]:
        """Which MAD task a row poses is always named: "mad (selective_copying)"."""
        return "task", cfg.task

    def prepare(self) -> Path:
        """Checks the config; writes only a small params.json (the data lives in memory)."""
        s = resolve(self.cfg)
        params = data_params(self.cfg, **{k: getattr(s, k) for k in BASELINES[s.task]})
        directory = generated_dir(self.cfg, **params)
        path = directory / "params.json"
        if not path.is_file():
            directory.mkdir(parents=True, exist_ok=True)
            with atomic_file(path) as f:
                f.write(json.dumps(params, indent=1, sort_keys=True) + "\n")
        return directory

    def load_split(self, split: str) -> dict[str, np.ndarray]:
        num = getattr(resolve(self.cfg), f"num_{split}")
        return generate(self.cfg, num, split_seed(self.cfg.data_seed, split), split == "train")

    def generate(self, num: int, seed) -> dict[str, np.ndarray]:
        return generate(self.cfg, num, seed, training=True)
