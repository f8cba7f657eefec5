"""``timm:NAME`` models: any timm architecture, built fresh, when the optional ``timm`` is installed.

timm is imported only when such a model is asked for, so cdmix works without it.
"""

from __future__ import annotations

from torch import nn

from cdmix.errors import UserError

PREFIX = "timm:"


def create_timm_model(name: str, num_classes: int, in_channels: int = 3, width: int | None = None) -> nn.Module:
    """``timm.create_model(name, pretrained=False, num_classes=..., in_chans=...)``.

    ``name`` is the timm name without the ``timm:`` prefix. Weights are never
    downloaded: load local ones with :func:`cdmix.models.pretrained.load_pretrained`.
    Raises :class:`UserError` when timm is missing, the name is unknown to timm, or
    ``width`` is given (timm models have no such knob).
    """
    if width is not None:
        raise UserError(f"width does not apply to timm model {name!r}; leave it unset")
    try:
        import timm
    except ImportError:
        raise UserError(f"model {PREFIX}{name} needs timm: pip install timm") from None
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels)
    except RuntimeError as exc:  # timm's "Unknown model (...)"
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise UserError(f"timm could not build {name!r}: {first_line}; see timm.list_models()") from None
