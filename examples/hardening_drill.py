"""Attack the harness as an unlucky cluster and a careless user would, and count what held.

    python examples/hardening_drill.py --kills 10      # ~6 min on 2 CPU cores

1. Kills: one reference sweep point (tiny transformer on ListOps, 60 steps, a checkpoint every
   10), then `--kills` times the same point in a fresh sweep directory, killed with SIGKILL at a
   random moment (seeded): alternately the point's own process (the row must say `killed`:
   no OOM kill was recorded) and the sweep process (its point gets SIGTERM through
   PR_SET_PDEATHSIG, checkpoints and says `interrupted`). The same command is then run again:
   it must resume (when a checkpoint was written) and end `ok` with the reference's numbers.
2. Bad input: config values and keys that must be refused at start-up (exit 2, one `error:`
   line, no run directory), and bad ListOps files that must fail in one line naming file:line.
3. Disks and stale rows: a pool sweep on a 3 MiB disk filled to its last ~170 KiB (each point an
   `error` row naming the file, never `oom`; the sweep goes on; after space is freed the same
   command runs both to `ok`); a read-only tree (its finished run skipped; a re-run, a new run
   and a sweep refused in one line); a directory holding another config's row (re-run, the old
   row kept under stale/). Real tmpfs mounts when run as root, else the same faults injected
   (tests/faults/sitecustomize.py).

Prints the tallies; exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
POINT = ("model=transformer", "task=listops", "preset=tiny", "train.steps=60",
         "train.checkpoint_every=10", "train.eval_every=20", "train.log_every=10",
         "train.progress=false")
SAME = ("status", "steps", "val_accuracy", "test_accuracy", "best_step", "train_loss")


def sweep(directory: Path, kill_after: float | None = None, victim: str = "point"):
    """Run the point as a one-point sweep; with `kill_after`, SIGKILL the point's process or
    the sweep that many seconds after the point's worker process starts. Returns the row."""
    proc = subprocess.Popen([sys.executable, "-m", "lra.run", "-m", *POINT,
                             f"hydra.sweep.dir={directory}"], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = []
    for line in proc.stdout:
        log.append(line)
        if kill_after is not None and "-> worker pid " in line:  # lra.sweep.executor's worker
            pid = int(line.split("-> worker pid ")[1].split()[0])
            target = pid if victim == "point" else proc.pid
            threading.Timer(kill_after, _kill, (target,)).start()
    proc.wait()
    if victim == "sweep" and kill_after is not None:
        _wait_for_orphan(directory)
    rows = list(directory.glob("listops/transformer/*/result.json"))
    return json.loads(rows[0].read_text()) if rows else {"status": "no row", "log": "".join(log)}


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # it had already finished


def _wait_for_orphan(directory: Path) -> None:
    """After the sweep is killed its point checkpoints and exits; wait on the run dir's lock."""
    import fcntl

    for lock in directory.glob("listops/transformer/*/.lock"):
        with open(lock) as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # blocks until the orphaned point has ended


def kills(n: int, seed: int, work: Path) -> bool:
    reference = sweep(work / "reference")
    print(f"reference: {reference['status']} steps={reference['steps']} "
          f"test_acc={reference['test_accuracy']} wall={reference['wall_time_s']:.1f}s")
    rng = random.Random(seed)
    tally = {"killed_rows": 0, "interrupted_rows": 0, "finished_before_kill": 0, "resumed": 0,
             "rerun_from_scratch": 0, "identical": 0}
    good = True
    for trial in range(n):
        victim = "point" if trial % 2 == 0 else "sweep"
        delay = rng.uniform(2.0, reference["wall_time_s"])
        directory = work / f"kill{trial}"
        first = sweep(directory, delay, victim)
        if first["status"] == "ok":
            tally["finished_before_kill"] += 1
        else:
            tally[f"{first['status']}_rows"] = tally.get(f"{first['status']}_rows", 0) + 1
        again = sweep(directory)
        resumed = again.get("resumed_from_step")
        if first["status"] != "ok":
            tally["resumed" if resumed else "rerun_from_scratch"] += 1
        same = all(again.get(k) == reference[k] for k in SAME)
        tally["identical"] += same
        expected = {"point": "killed", "sweep": "interrupted"}[victim]
        ok = same and first["status"] in (expected, "ok")
        good &= ok
        print(f"kill {trial}: SIGKILL the {victim} at {delay:.1f}s -> {first['status']} "
              f"(step {first.get('steps')}); re-run -> {again['status']} resumed_from_step="
              f"{resumed} {'identical' if same else 'DIFFERENT'} to the reference"
              + ("" if ok else "  <-- FAILED " + json.dumps(
                  {k: (again.get(k), reference[k]) for k in SAME if again.get(k) != reference[k]})))
    print("kills:", json.dumps(tally))
    return good


BAD_CONFIG = [
    ["train.steps=0"], ["train.steps=-3"], ["task.seq_len=0"], ["task.seq_len=-5"],
    ["train.batch_size=0"], ["train.eval_every=0"], ["train.log_every=0"], ["train.lr=-1"],
    ["train.warmup_steps=-1"], ["model.dropout=2"], ["model.num_heads=0"], ["model.emb_dim=0"],
    ["train.max_time_s=-5"], ["point_timeout_s=-1"], ["+train.stepz=5"], ["+foo=1"],
    ["train.stepz=5"], ["model=nonexistent"], ["task=nope"], ["preset=huge"],
    ["model.attention.kind=myattn"], ["model.attention.kind=performer"], ["task.seq_len=abc"],
    ["-m", "train.steps=5,0"], ["-m", "model.attention.kind=dense,performer"],
    ["train.lr=inf"], ["train.weight_decay=nan"],
]


def bad_inputs(work: Path) -> bool:
    tried = rejected = 0
    good = True
    for i, args in enumerate(BAD_CONFIG):
        run_dir = work / f"bad{i}"
        where = f"hydra.sweep.dir={run_dir}" if args[0] == "-m" else f"hydra.run.dir={run_dir}"
        proc = subprocess.run([sys.executable, "-m", "lra.run", "model=transformer", "task=listops",
                               "preset=tiny", *args, where], cwd=ROOT, env=ENV,
                              capture_output=True, text=True)
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
        ok = proc.returncode == 2 and last.startswith("error: ") and not run_dir.exists()
        tried += 1
        rejected += ok
        good &= ok
        print(f"{' '.join(args):32s} exit {proc.returncode} dir={'yes' if run_dir.exists() else 'no'}"
              f"  {last[:110]}" + ("" if ok else "  <-- FAILED"))
    data_tried = data_rejected = 0
    for name, body in [("label -1", b"Source\tTarget\n( [MAX 1 2 ] )\t-1\n"),
                       ("label 42", b"Source\tTarget\n( [MAX 1 2 ] )\t42\n"),
                       ("empty", b"Source\tTarget\n"),
                       ("not UTF-8", b"Source\tTarget\n( [MAX 1 \xff ] )\t2\n")]:
        data = work / f"data-{name.replace(' ', '')}"
        data.mkdir()
        good_row = b"( [MAX 1 2 ] )\t2\n" * 16
        for split in ("train", "val", "test"):
            (data / f"basic_{split}.tsv").write_bytes(
                body if split == "train" else b"Source\tTarget\n" + good_row)
        run_dir = work / f"baddata-{name.replace(' ', '')}"
        proc = subprocess.run([sys.executable, "-m", "lra.run", "model=transformer", "task=listops",
                               "preset=tiny", f"task.data_dir={data}", "task.file_prefix=basic",
                               f"hydra.run.dir={run_dir}"], cwd=ROOT, env=ENV,
                              capture_output=True, text=True)
        row = json.loads((run_dir / "result.json").read_text())
        ok = row["status"] == "error" and "DataError" in row["error"] and "basic_train.tsv" in row["error"]
        data_tried += 1
        data_rejected += ok
        good &= ok
        print(f"ListOps TSV with {name:10s} -> {row['status']}: {row['error'][:110]}"
              + ("" if ok else "  <-- FAILED"))
    print(f"bad config inputs: {tried} tried, {rejected} rejected at start-up (exit 2, one line, "
          f"no run directory); bad data files: {data_tried} tried, {data_rejected} rejected "
          f"with a DataError naming the file before training")
    return good


TINY = ("task=listops", "preset=tiny", "train.steps=20", "train.progress=false", "logger=none")


def _lra(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lra.run", *args], cwd=ROOT, env=env or ENV,
                          capture_output=True, text=True)


def _mount(path: Path, size: str) -> bool:
    """A tmpfs of `size` at `path` (root only); False where it cannot be mounted."""
    path.mkdir(parents=True, exist_ok=True)
    return os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True).returncode == 0


def _fault_env(kind: str, directory: Path, names: str = "") -> dict:
    return {**ENV, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "faults"), str(ROOT)]),
            "LRA_FAULT": kind, "LRA_FAULT_DIR": str(directory), "LRA_FAULT_NAMES": names}


def _check(name: str, ok: bool, detail: str) -> bool:
    print(f"{name:44s} {'ok  ' if ok else 'FAIL'} {detail[:150]}")
    return ok


def disks(work: Path) -> bool:
    good, mounted = True, []
    # Full disk: two pool points; the first checkpoint fills the disk.
    full = work / "full"
    real = _mount(full, "3m")
    if real:
        mounted.append(full)
        subprocess.run(["dd", "if=/dev/zero", f"of={full / 'fill'}", "bs=1k", "count=2900"],
                       capture_output=True)
    env = ENV if real else _fault_env("enospc", full, "result.json")
    sweep_args = ("-m", "hydra/launcher=pool", "hydra.launcher.n_jobs=1", "fresh_process=false",
                  "model=transformer,linear", *TINY, f"hydra.sweep.dir={full / 'sweep'}")
    proc = _lra(*sweep_args, env=env)
    rows = [json.loads(p.read_text()) for p in sorted(full.glob("sweep/listops/*/*/result.json"))]
    said = [line for line in proc.stderr.splitlines() if "no space left on device" in line]
    good &= _check(f"full disk ({'3 MiB tmpfs' if real else 'injected'}): sweep goes on",
                   # no traceback through the harness's code (orbax's own threads print theirs)
                   proc.returncode == 0 and f'File "{ROOT / "lra"}' not in proc.stderr
                   and bool(rows or said)
                   and not any(r["status"] == "oom" for r in rows),
                   f"exit {proc.returncode}; rows: {[r['status'] for r in rows]}; "
                   f"{(rows[0]['error'] if rows else said[0]) if rows or said else 'nothing said'}")
    if real:
        (full / "fill").unlink()
    again = _lra(*sweep_args)
    rows = [json.loads(p.read_text()) for p in sorted(full.glob("sweep/listops/*/*/result.json"))]
    good &= _check("full disk: space freed, the same command", again.returncode == 0 and
                   [r["status"] for r in rows] == ["ok", "ok"], f"rows: {[r['status'] for r in rows]}")
    # Read-only tree: a finished run, then the tree made read-only.
    ro = work / "ro"
    real = _mount(ro, "20m")
    if real:
        mounted.append(ro)
    run_dir = ro / "run"
    first = _lra("model=linear", *TINY, f"hydra.run.dir={run_dir}")
    if real:
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
    env = ENV if real else _fault_env("erofs", ro)
    kind = "read-only tmpfs" if real else "injected"
    skip = _lra("model=linear", *TINY, f"hydra.run.dir={run_dir}", env=env)
    good &= _check(f"read-only ({kind}): finished run skipped", first.returncode == 0 and
                   skip.returncode == 0 and "skipped:" in skip.stdout, skip.stdout.strip()[-150:])
    for name, args in (("re-run (skip_done=false)", ("model=linear", *TINY, "skip_done=false",
                                                       f"hydra.run.dir={run_dir}")),
                       ("new run", ("model=linear", *TINY, f"hydra.run.dir={ro / 'new'}")),
                       ("sweep", ("-m", "model=linear,local", *TINY, f"hydra.sweep.dir={ro}"))):
        proc = _lra(*args, env=env)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        good &= _check(f"read-only: {name} refused in one line", proc.returncode == 1 and
                       len(errors) == 1 and "Traceback" not in proc.stderr, errors[0] if errors else
                       proc.stderr[-150:])
    # A directory holding another configuration's row.
    stale = work / "stale"
    _lra("model=linear", *TINY, f"hydra.run.dir={stale}")
    proc = _lra("model=local", *TINY, f"hydra.run.dir={stale}")
    row = json.loads((stale / "result.json").read_text())
    kept = list(stale.glob("stale/*/row.json"))
    good &= _check("another config's row: re-run, old row kept", row["model"] == "local" and
                   len(kept) == 1 and "re-running" in proc.stdout,
                   next((line for line in proc.stdout.splitlines() if "re-running" in line), ""))
    proc = _lra("model=linear", *TINY, "hydra.run.dir=")
    good &= _check("hydra.run.dir= (empty) refused", proc.returncode == 2,
                   proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "")
    for path in mounted:
        subprocess.run(["umount", str(path)], capture_output=True)
    return good


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-kills", action="store_true")
    parser.add_argument("--only-disks", action="store_true", help="part 3 only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lra-drill-") as tmp:
        work = Path(tmp)
        good = True
        if not args.skip_kills and not args.only_disks:
            good &= kills(args.kills, args.seed, work)
        if not args.only_disks:
            good &= bad_inputs(work)
        good &= disks(work)
    raise SystemExit(0 if good else 1)


if __name__ == "__main__":
    main()
