"""Test accuracy of a run's saved checkpoint (``cdmix evaluate``)."""

from __future__ import annotations

from pathlib import Path

import torch

from cdmix import runs
from cdmix.config import load_json


def evaluate_run(run_dir: str | Path, which: str = "last") -> dict[str, float]:
    """Rebuild the run's method from ``checkpoint.pt`` (or ``best.pt``) and test it.

    Returns {"test_acc": ensemble accuracy, "test_acc_net1": ..., ...} in percent.
    """
    from cdmix.engine import Trainer, check_data_unchanged, load_data

    run_dir = Path(run_dir)
    if not (run_dir / runs.CONFIG).is_file():
        from cdmix.errors import UserError

        raise UserError(f"{run_dir} is not a cdmix run folder (no {runs.CONFIG})")
    config = runs.on_this_machine(load_json(run_dir / runs.CONFIG)).replace(progress=False)
    name = runs.CHECKPOINT if which == "last" else runs.BEST
    state = runs.load_checkpoint(run_dir / name, map_location=config.device, config=config)
    data = load_data(config)
    check_data_unchanged(run_dir, data)  # the test split scored must be the one the run was tested on
    # The nets come from the checkpoint: the --pretrained file (which may have moved) is not read, and
    # pretrained.json is left as the training wrote it.
    trainer = Trainer.from_checkpoint(config, run_dir, data, name, state=state, resume=False)
    with torch.inference_mode():
        return {k: v for k, v in trainer.evaluate().items()}
