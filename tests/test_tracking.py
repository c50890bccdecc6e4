"""Experiment tracking and run feedback: TensorBoard event files read back record by record,
wandb through a fake module, plain progress lines off a terminal, and the rounded summary."""

from __future__ import annotations

import io
import logging
import struct
import sys
import types

import pytest

from lra.config import TrainConfig
from lra.results import RunResult
from lra.train.tracking import Tracker, backends, duration, problem, rate, size, summary
from lra.train.loop import Progress

CONFIG = {"model": {"name": "transformer", "attention": {"kind": "dense", "window": [1, 2]}},
          "task": {"name": "listops", "seq_len": 64}, "train": {"lr": 0.001, "progress": True},
          "seed": 3, "preset": "tiny", "logger": "tensorboard", "plugins": []}
CURVE = [{"step": 1, "train_loss": 2.5, "train_accuracy": 0.25, "steps_per_s": float("nan")},
         {"step": 2, "train_loss": 2.0, "train_accuracy": 0.5, "steps_per_s": 8.0},
         {"step": 3, "train_loss": 1.5, "train_accuracy": 0.75, "steps_per_s": 9.0,
          "val_accuracy": 0.625, "val_loss": 1.25}]


def result(**fields) -> RunResult:
    base = dict(task="listops", model="transformer", seq_len=64, seed=3, preset="tiny", steps=3,
                test_accuracy=0.5, val_accuracy=0.625, steps_per_s=9.0,
                peak_memory_bytes=3 * 2**20, compile_time_s=1.5, wall_time_s=12.0,
                config={"train": {"steps": 3}})
    return RunResult(**{**base, **fields})


def masked_crc(data: bytes) -> int:
    """TFRecord's checksum: CRC-32C, rotated right by 15 bits, plus a constant."""
    from tensorboardX.crc32c import crc32c

    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(directory) -> list[list]:
    """Every event file in `directory` (oldest first) as its list of Event protos; each record's
    length and data checksums are verified as TensorBoard's reader does."""
    from tensorboardX.proto.event_pb2 import Event

    files = []
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data, at, events = path.read_bytes(), 0, []
        while at < len(data):
            header, (length_crc,) = data[at:at + 8], struct.unpack("<I", data[at + 8:at + 12])
            (length,) = struct.unpack("<Q", header)
            payload = data[at + 12:at + 12 + length]
            (payload_crc,) = struct.unpack("<I", data[at + 12 + length:at + 16 + length])
            assert masked_crc(header) == length_crc and masked_crc(payload) == payload_crc
            events.append(Event.FromString(payload))
            at += 16 + length
        files.append(events)
    return files


def scalars(events) -> dict[str, dict[int, float]]:
    out: dict = {}
    for event in events:
        for value in event.summary.value:
            if value.HasField("simple_value"):
                out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out


def hparams_data(events, tag: str):
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData

    found = [HParamsPluginData.FromString(v.metadata.plugin_data.content)
             for e in events for v in e.summary.value if v.tag == tag]
    assert len(found) == 1, tag
    return found[0]


def test_tensorboard_events_hold_curves_finals_and_hparams(tmp_path):
    tracker = Tracker(["tensorboard"], tmp_path)
    tracker.start(CONFIG)
    tracker.log(CURVE[:2])
    tracker.log(CURVE)  # the whole curve again, as fit passes it: each row is written once
    tracker.finish(result())
    [events] = read_events(tmp_path / "tb")
    got = scalars(events)
    assert got["train/loss"] == {1: 2.5, 2: 2.0, 3: 1.5}
    assert got["train/accuracy"] == {1: 0.25, 2: 0.5, 3: 0.75}
    assert got["train/steps_per_s"] == {2: 8.0, 3: 9.0}  # nan (clock not started) left out
    assert got["val/accuracy"] == {3: 0.625} and got["val/loss"] == {3: 1.25}
    assert got["final/test_accuracy"] == {3: 0.5} and got["final/peak_memory_mib"] == {3: 3.0}
    assert got["final/compile_time_s"] == {3: 1.5} and got["final/wall_time_s"] == {3: 12.0}
    start = hparams_data(events, "_hparams_/session_start_info").session_start_info.hparams
    assert start["train.lr"].number_value == 0.001 and start["seed"].number_value == 3
    assert start["model.name"].string_value == "transformer"
    assert start["model.attention.window"].string_value == "[1, 2]"
    assert not {"train.progress", "logger", "plugins"} & set(start)  # bookkeeping is no hparam
    end = hparams_data(events, "_hparams_/session_end_info").session_end_info
    assert end.status == 1  # STATUS_SUCCESS


def test_each_attempt_rewrites_the_events_from_the_checkpoint_record(tmp_path):
    first = Tracker(["tensorboard"], tmp_path)
    first.start(CONFIG)
    first.log(CURVE)  # logged up to step 3, then killed; its checkpoint is at step 2
    first.close()
    resumed = Tracker(["tensorboard"], tmp_path)
    resumed.start(CONFIG)
    resumed.log(CURVE[:2])  # what fit sends first: the curve the checkpoint restored
    resumed.log(CURVE[:2] + [{**CURVE[2], "train_loss": 1.25}])  # step 3, computed again
    resumed.finish(result(status="error"))
    [events] = read_events(tmp_path / "tb")  # the killed attempt's file is gone
    assert scalars(events)["train/loss"] == {1: 2.5, 2: 2.0, 3: 1.25}
    assert hparams_data(events, "_hparams_/session_start_info")
    assert hparams_data(events, "_hparams_/session_end_info").session_end_info.status == 2  # FAILURE


def test_an_interrupted_run_ends_its_session_as_unknown(tmp_path, caplog):
    # It was STATUS_ABORTED, a name TensorBoard's Status lacks: the end was never written.
    tracker = Tracker(["tensorboard"], tmp_path)
    tracker.start(CONFIG)
    tracker.log(CURVE)
    tracker.finish(result(status="interrupted"))
    [events] = read_events(tmp_path / "tb")
    assert hparams_data(events, "_hparams_/session_end_info").session_end_info.status == 0  # UNKNOWN
    assert "failed" not in caplog.text


@pytest.fixture
def fake_wandb(monkeypatch):
    """A `wandb` module that records init kwargs, log calls, the summary and finish."""
    calls: dict = {"log": [], "summary": {}, "finish": []}

    class Run:
        summary = calls["summary"]

        def log(self, data, step=None):
            calls["log"].append((step, dict(data)))

        def finish(self, exit_code=None):
            calls["finish"].append(exit_code)

    def init(**kwargs):
        calls["init"] = kwargs
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    return calls


def test_wandb_gets_config_curve_and_finals(tmp_path, fake_wandb, monkeypatch):
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))
    assert problem(["tensorboard", "wandb"]) is None
    with Tracker(backends("wandb"), tmp_path) as tracker:
        tracker.start(CONFIG)
        tracker.log(CURVE[:2])
        tracker.log(CURVE)
        tracker.finish(result(status="diverged", test_accuracy=None))
    init = fake_wandb["init"]
    assert init["project"] == "lra-bench" and init["dir"] == str(tmp_path / "elsewhere")
    assert init["config"] == CONFIG and init["group"] == "listops"
    assert init["name"] == "transformer-listops-L64-s3"
    assert [step for step, _ in fake_wandb["log"]] == [1, 2, 3]
    assert fake_wandb["log"][2][1] == {"train/loss": 1.5, "train/accuracy": 0.75,
                                       "train/steps_per_s": 9.0, "val/accuracy": 0.625,
                                       "val/loss": 1.25}
    assert fake_wandb["summary"]["status"] == "diverged"
    assert fake_wandb["summary"]["final/val_accuracy"] == 0.625
    assert "final/test_accuracy" not in fake_wandb["summary"]
    assert fake_wandb["finish"] == [1]  # one finish, marked failed


def test_wandb_project_comes_from_the_environment(tmp_path, fake_wandb, monkeypatch):
    monkeypatch.setenv("WANDB_PROJECT", "mine")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    with Tracker(["wandb"], tmp_path) as tracker:
        tracker.start(CONFIG)
    assert fake_wandb["init"]["project"] == "mine" and fake_wandb["init"]["dir"] == str(tmp_path)
    assert fake_wandb["finish"] == [1]  # closed without a result: failed


def test_logger_names_and_missing_packages_give_one_line_fixes(monkeypatch):
    assert backends("none") == [] and backends(None) == []
    assert backends(["wandb", "tensorboard", "wandb"]) == ["wandb", "tensorboard"]
    assert "use tensorboard, wandb, none" in problem("mlflow")
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    assert problem(["tensorboard", "wandb"]) == ("logger=wandb needs the wandb package: "
                                                 "pip install wandb")


def test_summary_rounds_for_people():
    line = summary(result(test_accuracy=0.43912, val_accuracy=0.44071, steps_per_s=9.6123,
                          peak_memory_bytes=99_614_720, compile_time_s=4.6189, wall_time_s=73.8))
    assert line == ("transformer on listops L=64: status=ok test_acc=43.9% val_acc=44.1% "
                    "steps/s=9.61 peak=95 MiB compile=4.6s wall=74s")
    timeout = summary(result(status="timeout", steps=2, test_accuracy=None, steps_per_s=None,
                             compile_time_s=0.0, wall_time_s=4000.0))
    assert timeout == ("transformer on listops L=64: status=timeout steps=2/3 val_acc=62.5% "
                       "peak=3.0 MiB wall=1h06m")
    assert [rate(x) for x in (0.041234, 8.0, 43.21, 99.97, 1234.4)] == [
        "0.0412", "8.00", "43.2", "100", "1234"]
    assert [size(x) for x in (100, 512 * 1024, 1.25 * 2**30)] == ["100 B", "512 KiB", "1.2 GiB"]
    assert [duration(x) for x in (0.04, 99.4, 754, 7380)] == ["0.0s", "99s", "12m34s", "2h03m"]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_plain_lines_off_a_terminal_and_a_bar_that_stays_on_one(monkeypatch, caplog):
    cfg = TrainConfig(steps=3)
    monkeypatch.setattr(sys, "stdout", io.StringIO())  # a SLURM log: not a terminal
    with caplog.at_level(logging.INFO, logger="lra.train"):
        progress = Progress(cfg)
        for row in CURVE:
            progress.update(row["step"], row)
        progress.close()
    assert progress.bar is None
    assert [r.getMessage() for r in caplog.records] == [
        "step 1/3 loss=2.500 acc=25.0%", "step 2/3 loss=2.000 acc=50.0% steps/s=8.00 eta=0.1s",
        "step 3/3 loss=1.500 acc=75.0% steps/s=9.00"]
    caplog.clear()
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    monkeypatch.setattr(sys, "stderr", terminal)
    progress = Progress(cfg)
    progress.update(3, CURVE[-1])
    progress.close()
    assert progress.bar.leave and "3/3" in terminal.getvalue().rsplit("\r", 1)[-1]
    assert not caplog.records
    quiet = Progress(TrainConfig(steps=3, progress=False))
    quiet.update(3, CURVE[-1])
    assert quiet.bar is None and not caplog.records


def test_a_logger_whose_package_is_missing_stops_the_run_at_start_up(tmp_path):
    import importlib.util

    from conftest import run_cli

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    proc = run_cli("lra.run", "model=transformer", "task=listops", "preset=tiny",
                   "logger=[tensorboard,wandb]", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: logger=wandb needs the wandb package: "
                                   "pip install wandb")
    assert not (tmp_path / "result.json").exists()
