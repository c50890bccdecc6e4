"""Reference rows: a finished suite's training runs as one data file, so that a new model is
trained alone and reported beside them (`python -m lra.suite models=[mine] compare=reference`).

    python -m lra.reference export results/suite-small [--to results/reference/small.json]
                                   [--command "python -m lra.suite ..."]
    python -m lra.reference show [FILE]

The file: {"meta": {preset, command, commit, date, hardware, versions, models, tasks, runs},
"runs": [{"path": "runs/<task>/<point>" or "locality/<task>/<point>", "result": result.json}]}.
Every training and locality row is kept, failed ones included; bench rows are not: a speed
measured on another machine is no reference for this one (compare=reference benches the new
models beside transformer and flash, here). `materialise` writes the rows back as result.json
files under <suite out>/reference/, each with a `reference` field, which the report labels
"<model> (ref)" and names in Table 1's caption.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

from lra.labels import MARK

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("runs", "locality")  # a suite's training and locality points (bench left out)


def default_path(preset: str) -> Path:
    """The shipped reference of a suite preset: results/reference/<preset>.json in the checkout."""
    return ROOT / "results" / "reference" / f"{preset}.json"


def _unique(values) -> str | None:
    values = sorted({str(v) for v in values if v})
    return values[0] if len(values) == 1 else ("; ".join(values) if values else None)


def export(suite_out: str | Path, dest: str | Path, command: str | None = None) -> dict:
    """The runs of a finished suite (`suite_out`/runs and /locality) as one reference file at
    `dest`; returns its meta. A one-line SystemExit when there is nothing to export."""
    from lra.train.measure import source_commit  # it loads JAX; lra.report loads without JAX

    suite_out = Path(suite_out)
    runs = []
    for section in SECTIONS:
        for path in sorted((suite_out / section).rglob("result.json")):
            try:
                result = json.loads(path.read_text())
            except (OSError, ValueError, UnicodeDecodeError):
                continue
            if isinstance(result, dict) and "model" in result and "status" in result:
                result.pop("reference", None)
                runs.append({"path": path.parent.relative_to(suite_out).as_posix(),
                             "result": result})
    if not runs:
        raise SystemExit(f"error: no result.json under {suite_out}/runs or /locality; export "
                         f"a finished `python -m lra.suite out={suite_out}`")
    results = [r["result"] for r in runs]
    env = [r.get("env") or {} for r in results]
    # the runs' own code and machine where they recorded them, else the exporting tree's commit
    commit = _unique(e.get("commit") for e in env)
    meta = {
        "preset": _unique(r.get("preset") for r in results),
        "command": command or f"python -m lra.suite out={suite_out}",
        "commit": commit or f"{source_commit()} (the exporting tree: the runs recorded none)",
        "date": _unique(datetime.datetime.fromtimestamp(
            (suite_out / r["path"] / "result.json").stat().st_mtime, datetime.timezone.utc)
                         .strftime("%Y-%m-%d") for r in runs),
        "hardware": _unique(f"{e.get('cpu_model', '?')}, {e.get('cpu_count', '?')} cores, "
                            f"{e.get('platform', '?')}" for e in env if e),
        "versions": _unique(f"jax {e.get('jax_version')}, flax {e.get('flax_version')}"
                            for e in env if e),
        "models": sorted({r["model"] for r in results if r.get("kind", "run") == "run"}),
        "tasks": sorted({p["path"].split("/")[1] for p in runs}),
        "runs": len(runs),
        "exported": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps({"meta": meta, "runs": runs}, indent=1) + "\n")
    return meta


def load(path: str | Path) -> dict:
    """A reference file, checked; a one-line SystemExit naming the fix otherwise."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError:
        raise SystemExit(f"error: no reference file {path}; export one from a finished suite: "
                         f"python -m lra.reference export <suite out> --to {path}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise SystemExit(f"error: {path} is not a reference file ({e}); re-export it with "
                         f"python -m lra.reference export") from None
    if not isinstance(data, dict) or not isinstance(data.get("meta"), dict) \
            or not isinstance(data.get("runs"), list):
        raise SystemExit(f"error: {path} is not a reference file (no meta / runs); re-export it "
                         f"with python -m lra.reference export")
    return data


def materialise(data: dict, source: str | Path, out: str | Path) -> int:
    """The reference's rows as result.json files under `out` (the suite's out/reference), each
    with `reference`: {file, commit, date, hardware}; returns how many. Rewritten every time
    (the file is the truth), never mixed with the new runs."""
    out = Path(out)
    meta = data["meta"]
    mark = {"file": Path(source).name, "commit": meta.get("commit"), "date": meta.get("date"),
            "hardware": meta.get("hardware")}
    written = 0
    for run in data["runs"]:
        rel = Path(str(run.get("path", "")))
        if rel.is_absolute() or ".." in rel.parts or not rel.parts \
                or rel.parts[0] not in SECTIONS or not isinstance(run.get("result"), dict):
            continue  # a hand-edited file cannot write outside out/
        target = out / rel
        target.mkdir(parents=True, exist_ok=True)
        (target / "result.json").write_text(json.dumps({**run["result"], "reference": mark}))
        written += 1
    return written


def caption(frame) -> str | None:
    """Table 1's note on the reference rows in `frame` (None when there are none)."""
    column = "reference.file"
    if column not in frame or frame[column].isna().all():
        return None
    ref = frame[frame[column].notna()].iloc[0]
    return (f"{MARK}: reference rows from {ref[column]} (commit {ref.get('reference.commit')}, "
            f"{ref.get('reference.date')}, {ref.get('reference.hardware')}), not trained in this "
            f"run")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lra.reference", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    exp = sub.add_parser("export", help="a finished suite's runs as a reference file")
    exp.add_argument("suite_out", help="the suite's out= directory (its runs/ and locality/)")
    exp.add_argument("--to", help="the file (default results/reference/<preset>.json)")
    exp.add_argument("--command", help="the command that produced the suite, as it was run")
    show = sub.add_parser("show", help="a reference file's meta")
    show.add_argument("file", nargs="?", default=str(default_path("small")))
    args = parser.parse_args(argv)
    if args.action == "show":
        print(json.dumps(load(args.file)["meta"], indent=1))
        return
    if not Path(args.suite_out).is_dir():
        raise SystemExit(f"error: {args.suite_out} is not a directory; pass a suite's out=")
    tmp = Path(args.to) if args.to else None
    if tmp is None:  # the preset is known only from the rows
        probe = next(Path(args.suite_out).rglob("result.json"), None)
        preset = json.loads(probe.read_text()).get("preset") if probe else None
        tmp = default_path(preset or "small")
    meta = export(args.suite_out, tmp, args.command)
    print(f"{meta['runs']} runs of {len(meta['models'])} models on {', '.join(meta['tasks'])} "
          f"-> {tmp}")


if __name__ == "__main__":
    main(sys.argv[1:])
