"""Checks before any training: labels that make a run silently poor, images too small for the model,
and too few images for the method (``Method.from_scratch_min_images``)."""

from __future__ import annotations

import logging

import numpy as np
import torch

from cdmix.config import Config
from cdmix.data.types import RawData
from cdmix.errors import UserError

logger = logging.getLogger("cdmix")


def check_labels(data) -> None:
    """Warn about labels that make a run silently poor: test labels no training sample has (those test
    images can only count as errors), and ids far beyond the classes in use (a huge output layer).
    ``data``: ``engine.data.PreparedData``."""
    raw = data.raw
    train = np.unique(raw.train_labels[raw.train_labels >= 0])
    unseen = np.setdiff1d(np.unique(raw.test_labels), train)
    if len(unseen):
        n = int(np.isin(raw.test_labels, unseen).sum())
        names = ", ".join(str(raw.class_names[c]) if 0 <= c < raw.num_classes else str(c) for c in unseen[:5])
        logger.warning(f"{n} test image(s) have label(s) no training image has ({names}"
                       f"{', ...' if len(unseen) > 5 else ''}); the model cannot learn them, so they count as errors")
    unused = raw.num_classes - len(train)
    if unused > max(10, len(train)):
        logger.warning(f"the labels go up to {raw.num_classes - 1} but only {len(train)} different labels occur in "
                       f"training: the network gets a {raw.num_classes}-class output; if the labels are not class "
                       f"indices, renumber them 0..{len(train) - 1}")


def check_input_size(config: Config, raw: RawData) -> None:
    """Refuse images too small for the model, before any training: the model is run on the meta device
    (shapes only, no memory, no compute)."""
    from cdmix.models import create_model

    size, channels = raw.image_size, raw.train_images.shape[-1]
    try:
        with torch.device("meta"):
            net = create_model(config.model, num_classes=raw.num_classes, in_channels=channels, width=config.width)
            net.eval()(torch.zeros(2, channels, size, size))
    except UserError:
        raise
    except Exception as exc:  # only shape errors count; anything else shows in training as it would
        text = str(exc)
        if "too small" in text or "greater than input size" in text or "at least" in text:
            raise UserError(f"{size}px images are too small for {config.model}; use --image-size 32 (folder/csv "
                            "data) or --model small_cnn") from None


def small_data_caution(config: Config, num_train: int) -> str | None:
    """A warning before a method that failed from scratch on few images in our measurements
    (``Method.from_scratch_min_images``) trains from scratch on fewer; None otherwise."""
    from cdmix.methods import method_classes

    floor = getattr(method_classes().get(config.method), "from_scratch_min_images", 0)
    if config.pretrained or num_train >= floor:
        return None
    return (f"--method {config.method} trains from scratch on only {num_train} training images; on a few hundred "
            f"images it collapsed in our tests, and --method standard or a pretrained backbone (--pretrained FILE) "
            f"ranked label errors better; for a first ranking in minutes, `cdmix pretrain` on these images and then "
            f"`cdmix issues` on its run folder (kNN label disagreement, no classifier) put the most misplaced files "
            f"in its top K on 300 photos (README: 'Your own data')")
