"""python -m lra.data task=<name> [overrides]: generate / prepare a task's data, print where it is."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from lra import cli

cli.setup()


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def main(cfg: DictConfig) -> None:
    import tasks

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


if __name__ == "__main__":
    cli.check_overrides(sys.argv[1:])
    main()
