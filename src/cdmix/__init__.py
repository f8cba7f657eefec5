"""cdmix: train image classifiers on noisy labels and rank the samples whose labels are wrong.

Python API::

    import cdmix
    result = cdmix.train(cdmix.Config(dataset="digits", noise_rate=0.4, out="runs/demo"))
    issues = cdmix.rank_label_issues(result.run_dir)   # arrays, most suspicious first
"""

from cdmix.config import Config, build_config
from cdmix.errors import UserError

__version__ = "0.1.0"
__all__ = ["Config", "build_config", "UserError", "train", "resume", "rank_label_issues", "RunResult"]


def train(config: Config):
    """Train a run described by ``config``; returns ``RunResult(run_dir, test_acc_best, test_acc_last, summary, metrics)``."""
    from cdmix.engine import train as _train

    return _train(config)


def resume(run_dir):
    """Continue the run in ``run_dir`` from its last completed epoch; returns a ``RunResult``."""
    from cdmix.engine import resume as _resume

    return _resume(run_dir)


def rank_label_issues(run_dir, top=None):
    """A finished run's training samples ranked by how likely their label is wrong (``LabelIssues`` arrays)."""
    from cdmix.issues import rank_label_issues as _rank

    return _rank(run_dir, top=top)


def __getattr__(name):
    if name == "RunResult":
        from cdmix.engine import RunResult

        return RunResult
    raise AttributeError(name)
