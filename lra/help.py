"""`--help` of lra.run and lra.bench: Hydra's `hydra.help.template` is `${lra_help:}`, resolved
here into the harness's own groups (each choice with the first line of its YAML's header) and
the keys users set most, each with the value this command line gives it, instead of Hydra's list
of every config group (schema/*, protocol_model/*, ... included)."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

from omegaconf import OmegaConf

from lra.config import CONFIG_DIR, GROUPS, choices, search_dirs

USAGE = {
    "config": [
        "python -m lra.run model=<model> task=<task> [preset=tiny|small|paper] [key=value ...]",
        "    train, evaluate (val, then test with the best val parameters), write result.json",
        "python -m lra.run -m model=transformer,bigbird task.seq_len=512,1024 seed=0,1",
        "    a sweep: one run dir per point; ends with a table of its points and keeps a record",
        "    of them in <hydra.sweep.dir>/sweeps/"],
    "bench": [
        "python -m lra.bench model=<model> [task=<task>] bench.seq_lens=[1024,2048,3072,4096]",
        "    LRA Table 2: steps/s and peak memory of the full train step per length, each",
        "    length in a fresh process (preset=paper: the task's paper-size model)",
        "python -m lra.bench -m model=transformer,performer    a sweep over models, then a table"],
}
GROUP_NOTES = {
    "model": "the attention variant (configs/model/, models/attention/)",
    "task": "the data (configs/task/, tasks/)",
    "preset": "sizes and budget, per task (configs/task_preset/<task>/<preset>.yaml)",
    "protocol": "whose settings the models run with (docs/models.md \"Protocols\")",
    "patterns": "pattern sizes scaled to the sequence length",
    "suite": "a task of lra.suite, as the suite runs it",
}
MODEL_KEYS = [
    ("model.emb_dim", "embedding width"),
    ("model.num_heads", "attention heads"),
    ("model.num_layers", "encoder blocks"),
    ("model.mlp_dim", "MLP hidden width"),
    ("model.dropout", "dropout rate"),
    ("model.pool", "cls | mean | auto (the task's default)"),
    ("model.pos", "learned | sinusoidal | rope | alibi | none"),
    ("model.layers", "a hybrid stack: [hawk,hawk,local] repeats over the layers (kinds); "
                     "+model.mixers.<kind>.<field>=V sets a kind's own field"),
]
SWEEP_KEYS = [
    ("hydra.sweep.dir", ("points in <dir>/<task>/<model>/..., a record per sweep in "
                         "<dir>/sweeps/ (<dir>/multirun.yaml: only the last sweep's config)")),
    ("hydra/launcher", ("pool: points in parallel in reused workers, a dead worker costs its "
                        "point only (hydra.launcher.n_jobs=N); joblib, submitit_*: Hydra's")),
]
# Per entry point: (section, [(key, what it is)]); the value shown is the composed config's.
KEYS = {
    "config": [
        ("experiment", [
            ("seed", "training seed: init, dropout, data order (sweep seed=0,1,2 for mean ± std)"),
            ("task.seq_len", "sequence length (the run dir's L<seq_len>)"),
            ("task.data_dir", "the LRA release's files (null: generate, or the default location)"),
            ("task.num_train", "training examples (0: the whole split of released data; mad: its "
                              "baseline)"),
            *MODEL_KEYS]),
        ("training", [
            ("train.batch_size", "examples per step"),
            ("train.steps", "training steps"),
            ("train.lr", "peak learning rate (schedule=rsqrt: LRA's base rate)"),
            ("train.schedule", "cosine | rsqrt | constant"),
            ("train.warmup_steps", "linear warm-up steps"),
            ("train.weight_decay", "AdamW weight decay"),
            ("train.eval_every", "steps between val evaluations (and at the end)"),
            ("train.max_time_s", "time budget, then status timeout (0: none)"),
            ("train.pretrain.objective", "self-pretraining on the task's inputs first: none | "
                                         "masked | causal (docs/suite.md)"),
            ("train.pretrain.steps", "its share of train.steps (the first steps)"),
            ("train.checkpoint_every", "checkpoint period in steps (0: at the end, -1: never)"),
            ("train.resume", "an unfinished run dir with a checkpoint continues from it"),
            ("train.progress", "the progress line"),
            ("eval.seq_lens", "after training, test accuracy at these lengths too ([]: off)"),
        ]),
        ("sweeps (-m)", [
            ("skip_done", "a point whose dir holds a finished result is kept, not re-run"),
            ("fresh_process", "each point in a process of its own (its own peak memory)"),
            ("point_timeout_s", "a point running longer is stopped, recorded timeout (0: none)"),
            *SWEEP_KEYS]),
        ("other", [
            ("compile_cache_dir", "JAX persistent compilation cache ('': off)"),
            ("plugins", "modules imported first: your attention variants and tasks"),
        ]),
    ],
    "bench": [
        ("bench", [
            ("bench.seq_lens", "the lengths, each timed in a fresh process"),
            ("bench.batch_size", "examples per step"),
            ("bench.steps", "timed steps per length (the median is reported)"),
            ("bench.warmup_steps", "untimed steps after the compile"),
            ("bench.point_timeout_s", "a length running longer is recorded timeout"),
            ("bench.find_max_len", "double L from seq_lens[0] until a point fails"),
            ("bench.max_len_cap", "find_max_len stops here"),
            ("bench.out_dir", "where the L<L>-b<B> dirs go ('': the Hydra run/sweep dir)"),
        ]),
        ("model", [("seed", "initialisation seed"), *MODEL_KEYS]),
        ("sweeps (-m)", SWEEP_KEYS),
        ("other", [
            ("compile_cache_dir", "JAX persistent compilation cache ('': off)"),
            ("plugins", "modules imported first: your attention variants and tasks"),
        ]),
    ],
}
WIDTH = 100


def template(_root_) -> str:
    """The help text of the config being composed (config: lra.run, bench: lra.bench)."""
    name = "bench" if _root_.hydra.job.config_name == "bench" else "config"
    app = "lra.bench" if name == "bench" else "lra.run"
    chosen = dict(_root_.hydra.runtime.choices)
    lines = [f"{app}: usage", *["  " + u for u in USAGE[name]], "",
             "== Groups (group=choice; * marks this command line's) =="]
    lines += groups(chosen, [str(d) for d in _root_.hydra.searchpath])
    lines += ["", "== Keys users set most (key=this command line's value) =="]
    for section, keys in KEYS[name]:
        lines.append(f"{section}:")
        for key, what in keys:
            value = chosen[key] if "/" in key else _value(OmegaConf.select(_root_, key))
            lines.append(_row(f"{key}={value}", what))
        if section == "experiment" or (name == "bench" and section == "model"):
            lines += attention_rows(_root_)
    lines += ["", f"Every key and its value: python -m {app} [overrides] --cfg job",
              ("Bad keys or values fail at start-up in one line that names the fix. "
               "Hydra's own flags: --hydra-help")]
    return "\n".join(lines).replace("$", "$$")  # Hydra passes the text through string.Template


def groups(chosen: dict, searchpath: list[str]) -> list[str]:
    """Each of the harness's groups (lra.GROUPS) this config has, with its choices."""
    override = [f"hydra.searchpath=[{','.join(searchpath)}]"]  # as lra.cli reads them
    dirs = search_dirs(override)
    lines = []
    for group in [g for g in GROUPS if g in chosen]:
        lines.append(f"{group}=  {GROUP_NOTES.get(group, '')}".rstrip())
        names = choices(group, override)
        width = max(map(len, names), default=0)
        for choice in names:
            left = f"  {'*' if choice == chosen[group] else ' '} {choice:<{width}}  "
            lines.append(left + describe(group, choice, dirs, WIDTH - len(left)))
    return lines


def attention_rows(root) -> list[str]:
    """The current model's own attention fields (`kind` is the model's, not a setting)."""
    attention = OmegaConf.select(root, "model.attention")
    if attention is None:
        return []
    fields = [k for k in attention if k != "kind"]
    what = f"this model's own fields ({attention.kind}; model=<m> --help: another's)"
    return [_row(f"model.attention.{k}={_value(attention[k])}", "" if i else what)
            for i, k in enumerate(fields)]


def describe(group: str, choice: str, searchpath_dirs: list[Path], width: int) -> str:
    """The first sentence of a choice's YAML header comment, shortened to fit one line."""
    paths = [d / group / f"{choice}.yaml" for d in [CONFIG_DIR, *searchpath_dirs]]
    path = next((p for p in paths if p.is_file()), None)
    if path is None:
        return "registered by a plugin (its dataclass's defaults)"
    text = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        if "@package" not in line:
            text.append(line.lstrip("# ").strip())
    first = re.split(r"(?<!\bal)\.\s+(?!\d)|\s{2,}", " ".join(text))[0]  # not at "et al."
    # "protocol=lra: ...", "patterns=none (the default): ...", "lra.suite task copy256: ...".
    first = re.sub(r"^[\w.]+(=| task )\w+( \(the default\))?:\s*", "", first)
    return _shorten(first, width)


def _row(left: str, what: str) -> str:
    """`  key=value` and what it is, wrapped in a column of its own from character 34 on."""
    left, lines = f"  {left}", textwrap.wrap(what, WIDTH - 34)
    if len(left) >= 33:
        lines = ["", *lines]
    return "\n".join([f"{left:<34}{lines[0]}".rstrip() if lines else left,
                      *[" " * 34 + line for line in lines[1:]]])


def _value(value) -> str:
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value) if value != "" else "''"


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 3].rsplit(" ", 1)[0] + " ..."
