"""python -m lra.data task=<name> [overrides]: generate / prepare a task's data, print where it is."""

from __future__ import annotations

import atexit
import shutil
import sys
import tempfile

import hydra
from omegaconf import DictConfig, OmegaConf

from lra import cli, tasks
from lra.config import CONFIG_DIR

cli.setup()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    cli.job_setup(cfg)
    task = tasks.build(OmegaConf.to_object(cfg.task))
    try:
        directory = task.prepare()
        sizes = {split: task.num_examples(split) for split in ("train", "val", "test")}
        if cfg.preview:
            if not hasattr(task, "preview"):
                cli.fail(f"task {cfg.task.name!r} has no preview")
            print(f"preview: {task.preview(directory)}")
    except tasks.DataError as err:
        cli.fail(str(err), code=1)
    print(f"{cfg.task.name}: " + ", ".join(f"{k}={v}" for k, v in sizes.items()))
    print(directory)


def scratch_overrides(argv: list[str], scratch: str) -> list[str]:
    """Hydra overrides that make lra.data leave no run directory behind (the shared config puts
    one under results/): run and sweep dirs in `scratch`, no .hydra/ copy of the config, job
    logging to the console only. Keys given on the command line win."""
    given = {a.partition("=")[0].lstrip("+~") for a in argv if "=" in a}
    wanted = {"hydra.run.dir": f"'{scratch}'", "hydra.sweep.dir": f"'{scratch}'",
              "hydra.sweep.subdir": "${hydra.job.num}", "hydra.output_subdir": "null"}
    if not any(k.startswith(("hydra.job_logging", "hydra/job_logging")) for k in given):
        wanted["hydra.job_logging.root.handlers"] = "[console]"  # no <run dir>/data.log
    return [f"{key}={value}" for key, value in wanted.items() if key not in given]


if __name__ == "__main__":
    cli.check_overrides(sys.argv[1:])
    scratch = tempfile.mkdtemp(prefix="lra-data-")
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    sys.argv += scratch_overrides(sys.argv[1:], scratch)
    main()
