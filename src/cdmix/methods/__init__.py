"""Training methods by name. Each is a ``Method`` subclass; the engine builds one with ``build_method``."""

from __future__ import annotations

from cdmix.errors import UserError


def method_classes() -> dict[str, type]:
    from cdmix.methods.dividemix import DivideMix
    from cdmix.methods.hybrid import Hybrid
    from cdmix.methods.josrc import JoSRC
    from cdmix.methods.simclr import SimCLR
    from cdmix.methods.standard import Standard

    return {"standard": Standard, "dividemix": DivideMix, "josrc": JoSRC, "hybrid": Hybrid, "simclr": SimCLR}


def build_method(config, train):
    classes = method_classes()
    if config.method not in classes:
        raise UserError(f"unknown method {config.method!r}; choose one of {', '.join(sorted(classes))}")
    if config.method == "dividemix" and config.epoch_subset_batches:  # the official Clothing1M sampling
        from cdmix.methods.epoch_subsets import EpochSubsetDivideMix

        return EpochSubsetDivideMix(config, train)
    return classes[config.method](config, train)
