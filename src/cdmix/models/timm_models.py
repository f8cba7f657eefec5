"""``timm:NAME`` models: any timm architecture, built fresh, when the optional ``timm`` is installed.

timm is imported only when such a model is asked for, so cdmix works without it.
"""

from __future__ import annotations

from torch import nn

from cdmix.errors import UserError

PREFIX = "timm:"


def create_timm_model(name: str, num_classes: int, in_channels: int = 3, width: int | None = None,
                      pretrained: bool = False) -> nn.Module:
    """``timm.create_model(name, pretrained=pretrained, num_classes=..., in_chans=...)``.

    ``name`` is the timm name without the ``timm:`` prefix. Weights are downloaded only with
    ``pretrained`` (``--pretrained timm:NAME``), by timm's own loader into its cache (the
    Hugging Face hub's); local ones load with :func:`cdmix.models.pretrained.load_pretrained`.
    Raises :class:`UserError` when timm is missing, the name is unknown to timm, ``width`` is
    given (timm models have no such knob), or timm cannot fetch the weights (offline).
    """
    if width is not None:
        raise UserError(f"width does not apply to timm model {name!r}; leave it unset")
    try:
        import timm
    except ImportError:
        what = "--pretrained" if pretrained else "model"
        raise UserError(f"{what} {PREFIX}{name} needs timm: pip install timm (or pip install 'cdmix[timm]')") from None
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_channels)
    except RuntimeError as exc:  # timm's "Unknown model (...)", or no pretrained weights for it
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise UserError(f"timm could not build {name!r}: {first_line}; see timm.list_models()") from None
    except Exception as exc:  # offline: the hub's / requests' / urllib's errors, whatever timm fetches with
        if not pretrained:
            raise
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"could not fetch timm's pretrained weights for {name!r} ({first_line}); timm reads them "
                        f"from the Hugging Face hub (or the model's URL) into its cache: run once online, or put "
                        f"them in that cache ($HF_HOME, default ~/.cache/huggingface) by hand") from None
