"""A run's life: start (data, resolved config, run folder, lock), resume (the same run, refused when
its config, data or world size changed), and the ``train`` / ``resume`` entry points."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from cdmix import distributed, runs
from cdmix.config import Config, load_json, resolve, save_json, validate
from cdmix.data.host_images import choose_placement
from cdmix.data.types import RawData
from cdmix.engine.console import print_data_line, say
from cdmix.engine.data import check_data_unchanged, load_data, save_labels
from cdmix.engine.preflight import check_input_size, check_labels, small_data_caution
from cdmix.engine.trainer import DECIDED_FIELDS, RunResult, Trainer, update_config_file
from cdmix.errors import UserError

logger = logging.getLogger("cdmix")

# Fields the machine decides, not the user: ``runs.on_this_machine`` moves a GPU run to the CPU (amp off),
# and under torchrun each process holds its own cuda:N. A resume does not compare them.
MACHINE_FIELDS = ("device", "amp")


def start_run(config: Config, raw: RawData | None = None) -> Trainer:
    """Load the data, resolve the config, create the run folder and the trainer for a new run.

    ``raw``: the user's own arrays (``cdmix.data.arrays``) instead of the config's dataset; then a run
    folder is made only when ``config.out`` asks for one (it keeps the arrays as its data).
    """
    validate(config)
    if config.preset and not config.pretrained:
        from cdmix.config import preset_info

        weights = preset_info(config.preset)["info"].get("weights", "")
        if weights.startswith("--pretrained"):
            kind = "a SimCLR encoder" if "cdmix pretrain" in weights else "ImageNet weights"
            logger.warning(f"the preset {config.preset} starts from {kind} ({weights}); without "
                           f"--pretrained the network trains from scratch and will not reach the published figure")
    data = load_data(config, raw)
    config = resolve(config, data.raw.num_classes, data.raw.image_size)
    check_labels(data)
    check_input_size(config, data.raw)
    caution = small_data_caution(config, len(data.train_pos))
    info, rank_device = distributed.setup(config.device)
    if caution and info.is_main:
        logger.warning(caution)
    placement = choose_placement(config.data_placement, data.raw.train_images, data.raw.test_images, rank_device)
    config = config.replace(data_placement=distributed.broadcast_object(placement, info))
    if raw is not None and not config.out:  # arrays in, no folder asked for: nothing is written
        if info.is_main:
            print_data_line(config, data)
        return Trainer.fresh(config.replace(device=rank_device), None, data)
    run_dir = Path(config.out) if config.out else runs.default_run_dir(config.dataset, config.method)
    run_dir = Path(distributed.broadcast_object(str(run_dir), info))
    config = config.replace(out=str(run_dir))
    if raw is not None:  # the arrays are kept in the run folder as its data, so it can be resumed
        config = config.replace(dataset="arrays", data_path=str((run_dir / runs.ARRAYS).resolve()))

    def prepare() -> runs.RunLock:
        lock = runs.prepare_run_dir(run_dir, config.overwrite)
        try:
            if raw is not None:
                from cdmix.data.arrays import save_arrays

                save_arrays(run_dir / runs.ARRAYS, raw)
            save_json(config, run_dir / runs.CONFIG)
            save_labels(run_dir, data)
        except BaseException:
            lock.release()
            raise
        print_data_line(config, data)
        return lock

    lock = on_main(info, prepare)
    distributed.barrier(info)
    return _locked_trainer(lock, lambda: Trainer.fresh(config.replace(device=rank_device), run_dir, data))


def on_main(info: distributed.DistInfo, action):
    """``action()`` on rank 0 (None elsewhere); under torchrun a ``UserError`` there is raised on every
    rank, so no rank waits forever for one that has stopped."""
    if not info.enabled:
        return action()
    result, error = None, None
    if info.is_main:
        try:
            result = action()
        except UserError as exc:
            error = str(exc)
    error = distributed.broadcast_object(error, info)
    if error is not None:
        raise UserError(error)
    return result


def _locked_trainer(lock: runs.RunLock | None, build) -> Trainer:
    """``build()``'s trainer holding ``lock`` (released if building fails)."""
    try:
        trainer = build()
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    trainer.lock = lock
    return trainer


def resume_run(run_dir: str | Path) -> Trainer:
    """The trainer that continues the run in ``run_dir`` from its last checkpoint (holding its lock).

    Refused with a ``UserError``: a config.json whose settings differ from those the checkpoint was
    written with, another number of processes, other training labels or images, another test split."""
    run_dir = Path(run_dir)
    if not (run_dir / runs.CONFIG).is_file():
        raise UserError(f"{run_dir} is not a cdmix run folder (no {runs.CONFIG})")
    if not (run_dir / runs.CHECKPOINT).is_file():
        raise UserError(f"{run_dir} has no {runs.CHECKPOINT}; nothing to resume (did the first epoch finish?)")
    config = runs.on_this_machine(load_json(run_dir / runs.CONFIG))  # validated: a hand edit is refused here
    info, rank_device = distributed.setup(config.device)

    def lock_folder() -> runs.RunLock:
        lock = runs.RunLock(run_dir)
        runs.remove_stale_temp_files(run_dir)
        return lock

    lock = on_main(info, lock_folder)

    def build() -> Trainer:
        path = run_dir / runs.CHECKPOINT
        state = runs.load_checkpoint(path, map_location=str(rank_device), config=config)
        run_config = check_resume_config(run_dir, config, state, info)
        data = load_data(run_config)
        check_data_unchanged(run_dir, data, training=True)
        say(f"resuming {run_dir}")
        return Trainer.from_checkpoint(run_config.replace(device=rank_device), run_dir, data, state=state)

    return _locked_trainer(lock, build)


def check_resume_config(run_dir: Path, config: Config, state: dict[str, Any],
                        info: distributed.DistInfo) -> Config:
    """The config to resume with: config.json's (``config``), refused when a setting differs from the
    checkpoint's copy (config.json edited by hand: another seed, λu, threshold, ... would continue the
    run as another run) or when the number of processes changed (another global batch). A config.json
    one step behind the checkpoint in the decided fields (``DECIDED_FIELDS``: a kill between the two
    writes) is brought up to date instead."""
    saved_world = state.get("world_size")  # checkpoints from before it was recorded: not checked
    if saved_world is not None and int(saved_world) != info.world_size:
        raise UserError(f"the run was trained with {saved_world} process(es) and is resumed with {info.world_size}; "
                        f"that changes the global batch. Resume it with {saved_world} process(es) (torchrun "
                        f"--nproc-per-node {saved_world}, or no torchrun for 1)")
    saved = state.get("config")
    if not isinstance(saved, dict):
        return config
    path = run_dir / runs.CONFIG
    current = json.loads(path.read_text(encoding="utf-8"))
    saved = json.loads(json.dumps(saved))  # as JSON holds it (tuples become lists)
    behind = {}
    for key in sorted(set(saved) | set(current)):
        if key in MACHINE_FIELDS or saved.get(key) == current.get(key):
            continue
        if key in DECIDED_FIELDS and current.get(key) in ("auto", None) and saved.get(key) is not None:
            behind[key] = saved[key]
            continue
        raise UserError(f"{path} was edited since the run's last checkpoint: {key} is {current.get(key)!r} there, "
                        f"but the run trained with {saved.get(key)!r}. A changed setting would make the rest "
                        f"another run: put back {key} = {json.dumps(saved.get(key))}, or train a new run with "
                        f"--out")
    if not behind:
        return config
    if info.is_main:
        update_config_file(path, behind)
    return config.replace(**behind)


def train(config: Config, raw: RawData | None = None) -> RunResult:
    """Train a new run described by ``config`` (on ``raw``, the user's arrays, when given); returns a
    ``RunResult`` (see ``cdmix.train``)."""
    trainer = start_run(config, raw)
    try:
        return trainer.run()
    finally:
        trainer.release_lock()


def resume(run_dir: str | Path) -> RunResult:
    """Continue the run in ``run_dir`` from its last completed epoch."""
    trainer = resume_run(run_dir)
    try:
        return trainer.run()
    finally:
        trainer.release_lock()
