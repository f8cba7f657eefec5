"""cdmix: train image classifiers on noisy labels and rank the samples whose labels are wrong.

Python API::

    import cdmix
    result = cdmix.train(cdmix.Config(dataset="digits", out="runs/demo"))   # or settings as keywords
    issues = cdmix.rank_label_issues(result.run_dir)   # arrays, most suspicious first
    model = cdmix.load_model(result.run_dir)           # model(images) -> N x C probabilities

    # arrays in, scikit-learn / cleanlab style (nothing written unless out= is given)
    ranked = cdmix.find_label_issues(images, labels, epochs=30)   # suspected label errors, worst first

    # SimCLR pretraining on the images themselves (no labels needed), then training from its encoder
    enc = cdmix.pretrain(dataset="digits", out="runs/enc")          # enc.encoder, enc.knn_disagreement
    result = cdmix.train(dataset="digits", pretrained=str(enc.run_dir))
"""

from cdmix.config import Config, build_config
from cdmix.errors import UserError

__version__ = "0.1.0"
__all__ = ["Config", "build_config", "UserError", "train", "pretrain", "resume", "rank_label_issues",
           "find_label_issues", "load_model", "RunResult", "LabelIssueResult", "PretrainResult"]

_ARRAY_KEYWORDS = ("test_images", "test_labels", "class_names", "ids", "true_labels")


def train(config_or_images=None, labels=None, **settings):
    """Train a run; returns ``RunResult(run_dir, test_acc_best, test_acc_last, summary, metrics, scores, model)``.

    ``config_or_images``: a ``cdmix.Config``, or the images of ``(images, labels)`` (also accepted as
    the keyword ``config=``, its former name).

    - ``cdmix.train(cdmix.Config(...))``: the run a Config describes (``settings`` replace its fields);
    - ``cdmix.train(dataset="digits", epochs=20)``: settings as keywords (``cdmix.build_config``);
    - ``cdmix.train(images, labels, epochs=30, out="runs/mine")``: your own arrays, trained on directly.
      images: uint8 N x H x W (x C), square; labels: (N,) class indices or class names. Optional
      keywords: test_images, test_labels (a test set), class_names, ids (names of the samples, the
      ``id`` column of the label issues), true_labels (where known). A run folder (which keeps the
      arrays, so it can be resumed) is written only when ``out`` is given; without one,
      ``run_dir`` is None and ``scores`` / ``model`` hold the results.

    ``scores``: every training sample scored by the final nets (``cdmix.issues.score_samples``:
    pred_probs, issue_score, clean_prob, loss, in_sample); ``model``: the final nets for inference.
    """
    from cdmix.engine import train as _train

    if "config" in settings and config_or_images is None:  # the parameter's former name, as a keyword
        config_or_images = settings.pop("config")
    if labels is not None or (config_or_images is not None and not isinstance(config_or_images, Config)):
        from cdmix.data.arrays import raw_from_arrays

        if labels is None:
            raise UserError("cdmix.train(images, labels): give one label per image")
        array_kw = {k: settings.pop(k) for k in _ARRAY_KEYWORDS if k in settings}
        raw = raw_from_arrays(config_or_images, labels, **array_kw)
        return _train(build_config(**{"dataset": "arrays", "data_path": "", **settings}), raw)
    config = config_or_images
    if config is None:
        config = build_config(**settings)
    elif settings:
        config = config.replace(**settings)
    return _train(config)


def pretrain(images=None, labels=None, **settings):
    """SimCLR pretraining of an encoder (``cdmix pretrain``; C2D's first stage); returns a
    ``PretrainResult`` (run_dir, encoder: the encoder file, knn_acc, knn_disagreement and
    knn_predicted of every training sample, summary, metrics).

    - ``cdmix.pretrain(dataset="cifar10", data_path="data", epochs=50)``: any data source, by settings;
    - ``cdmix.pretrain(images, labels, out="runs/enc")``: your own arrays (uint8 N x H x W (x C),
      square); ``labels`` are only used for the kNN monitor and the kNN label disagreement (None: no
      labels, no label issues); the keywords of ``cdmix.train`` for arrays (test_images, test_labels,
      class_names, ids, true_labels) work here too. Arrays without ``out`` get a new folder under
      runs/ all the same: the encoder is the result.

    Settings: SupContrast's (batch 1024, lr 0.5, temperature 0.5, its cosine, SGD 0.9, weight decay
    1e-4), 100 epochs, val_fraction 0, then ``preset`` and the keywords. Then
    ``cdmix.train(..., pretrained=result.run_dir)``.
    """
    from cdmix.pretraining import pretrain_config, run_pretraining

    if images is None:
        if labels is not None:
            raise UserError("cdmix.pretrain(images, labels): labels without images")
        return run_pretraining(pretrain_config(**settings))
    import numpy as np

    from cdmix import runs
    from cdmix.data.arrays import raw_from_arrays

    array_kw = {k: settings.pop(k) for k in _ARRAY_KEYWORDS if k in settings}
    if labels is None:  # no labels: all in one class, nothing for the kNN scores to disagree with
        labels = np.zeros(len(images), dtype=np.int64)
        array_kw["class_names"] = ["unlabelled", "(unused)"]  # arrays need two classes; the second stays empty
        if "test_images" in array_kw and "test_labels" not in array_kw:
            array_kw["test_labels"] = np.zeros(len(array_kw["test_images"]), dtype=np.int64)
    raw = raw_from_arrays(images, labels, **array_kw)
    settings.setdefault("out", str(runs.default_run_dir("arrays", "simclr")))
    return run_pretraining(pretrain_config(**{"dataset": "arrays", "data_path": "", **settings}), raw)


def find_label_issues(images, labels, *, return_result: bool = False, verbose: bool = False, **settings):
    """Train on ``(images, labels)`` and find the samples whose label is probably wrong.

    images: uint8 N x H x W (x C), square; labels: (N,) class indices or class names. ``settings``:
    any ``cdmix.Config`` field (method, epochs, model, width, ...; ``val_fraction`` defaults to 0 here,
    so every sample is trained on and scored in-sample) and the keywords of ``cdmix.train`` for
    arrays (test_images, test_labels, class_names, ids, true_labels). Nothing is written unless
    ``out`` is given. ``verbose``: print the per-epoch lines.

    Returns:
        int64 indices of the flagged samples (clean_prob < 0.5), most suspicious first (highest
        issue_score); with ``return_result=True``, ``(indices, LabelIssueResult)``, whose arrays
        cover every sample (``ranking``: all N indices, most suspicious first; ``issue_score``,
        ``clean_prob``, ``pred_probs``, ``predicted_label``, ``flagged``) and ``run`` the RunResult.
    """
    import contextlib
    import io

    from cdmix.issues import LabelIssueResult

    settings.setdefault("val_fraction", 0.0)
    settings.setdefault("progress", False)
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        run = train(images, labels, **settings)
    result = LabelIssueResult.from_run(run)
    return (result.issues, result) if return_result else result.issues


def load_model(run_dir, device: str = "cpu"):
    """A finished run's final nets, ready for inference: ``model(images)`` gives N x C class
    probabilities (mean softmax of the nets), ``model.predict(images)`` class indices,
    ``model.class_names`` their names. Images: uint8 N x H x W (x C); see ``cdmix.predict``."""
    from cdmix.predict import load_model as _load

    return _load(run_dir, device=device)


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
    if name == "PretrainResult":
        from cdmix.pretraining import PretrainResult

        return PretrainResult
    if name == "LabelIssueResult":
        from cdmix.issues import LabelIssueResult

        return LabelIssueResult
    raise AttributeError(name)
