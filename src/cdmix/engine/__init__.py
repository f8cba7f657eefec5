"""The engine: epochs, lr schedule, seeding, evaluation, collapse guard, checkpoints, run folder.

It never knows which method runs: a ``Method`` (``cdmix.methods.base``) trains one epoch and answers
the hooks documented there; the engine does the rest. One module per job:

- ``trainer``: the loop (seed, lr, train, evaluate, guard, checkpoint, print) and ``Trainer.fresh`` /
  ``Trainer.from_checkpoint``;
- ``lifecycle``: start a run, resume one (refusing a changed config, world size or data), the lock;
- ``schedule``: lr and Adam beta1 by epoch, and the decided settings (``--warmup auto``) the config records;
- ``seeding``: every epoch seeded from (seed, epoch); the random states a checkpoint keeps;
- ``collapse``: the collapse guard (best epoch, drops, ``ended_collapsed``), with its own state_dict;
- ``data``: the run's data (noise, validation split) and its fingerprints;
- ``preflight``: checks before training; ``artifacts``: summary.json and the end-of-run outputs;
- ``console``: the lines a run prints and the time-left estimate.

The two-net ensemble (summed logits for the class, mean softmax for probabilities) is written once
in ``cdmix.ensemble``.
"""

from cdmix.engine.artifacts import RunOutputs, final_scores, summary_dict, trained_model
from cdmix.engine.collapse import CollapseGuard, chance_drop
from cdmix.engine.console import device_name, duration, epoch_line, print_data_line, say
from cdmix.engine.data import (PreparedData, check_data_unchanged, hash_test_split, hash_train_images, load_data,
                               save_labels)
from cdmix.engine.lifecycle import on_main, resume, resume_run, start_run, train
from cdmix.engine.preflight import check_input_size, check_labels, small_data_caution
from cdmix.engine.schedule import beta1_at, lr_at
from cdmix.engine.seeding import epoch_seed, rng_states, seed_epoch, set_rng_states
from cdmix.engine.trainer import PRETRAINED, RunResult, Trainer, pretrained_record
from cdmix.ensemble import accuracy, top_k_accuracy

__all__ = ["RunOutputs", "final_scores", "summary_dict", "trained_model", "CollapseGuard", "chance_drop",
           "device_name", "duration", "epoch_line", "print_data_line", "say", "PreparedData", "check_data_unchanged",
           "hash_test_split", "hash_train_images", "load_data", "save_labels", "on_main", "resume", "resume_run",
           "start_run", "train", "check_input_size", "check_labels", "small_data_caution",
           "beta1_at", "lr_at", "epoch_seed", "rng_states", "seed_epoch", "set_rng_states", "PRETRAINED",
           "RunResult", "Trainer", "pretrained_record", "accuracy", "top_k_accuracy"]
