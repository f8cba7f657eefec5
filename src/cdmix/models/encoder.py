"""The feature extractor of any registered model, projection heads, and encoder files.

* :func:`encoder_of` ``(net)``: a copy of a classifier net whose classifier is ``nn.Identity``, so
  ``encoder(x)`` is the N x d feature vector the classifier would see. The classifier is the
  model's ``fresh_head`` module where it has one (the MLP-head ResNets: the whole MLP), else its
  last ``nn.Linear`` (``fc``, ``linear``; for ``josrc_cnn`` the MLP's last layer, so its features
  are the MLP's 512-d hidden layer).
* :class:`ProjectionHead`: SupContrast's ``mlp`` head (Linear d -> d, ReLU, Linear d -> 128) or
  UNICON's (Linear d -> 128, BatchNorm1d); :class:`ContrastiveNet` = encoder + head, L2-normalised.
* :func:`save_encoder` / :func:`load_encoder`: the encoder as a plain state dict with the model's
  own parameter names and no classifier keys; loading it into a classifier net of the same model
  leaves the classifier freshly initialised (C2D: ``strict=False`` with a fresh linear head).
"""

from __future__ import annotations

import copy
import io
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cdmix.errors import UserError
from cdmix.models.pretrained import _classifier_name, _read_state_dict, load_pretrained, sha256_file

__all__ = ["classifier_name", "feature_dim", "encoder_of", "ProjectionHead", "ContrastiveNet", "save_encoder",
           "load_encoder", "find_encoder", "encoder_normalization", "encoder_file_name", "ENCODER_FILES", "PROVENANCE"]


def classifier_name(net: nn.Module) -> str:
    """Dotted name of the module :func:`encoder_of` replaces (the model's classifier)."""
    name = getattr(net, "fresh_head", None) or _classifier_name(net)
    if not name:
        raise UserError(f"the {type(net).__name__} model has no nn.Linear classifier to take features before")
    return name


def feature_dim(net: nn.Module) -> int:
    """d: the size of the feature vector the classifier takes."""
    head = net.get_submodule(classifier_name(net))
    first = head if isinstance(head, nn.Linear) else next(m for m in head.modules() if isinstance(m, nn.Linear))
    return first.in_features


def _replace(net: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, child, module)


def encoder_of(net: nn.Module) -> nn.Module:
    """A deep copy of ``net`` (same device, dtype, weights) with its classifier replaced by
    ``nn.Identity``: ``encoder_of(net)(x)`` is N x :func:`feature_dim` ``(net)``. Its
    ``state_dict`` keys are ``net``'s minus the classifier's."""
    name = classifier_name(net)
    encoder = copy.deepcopy(net)
    _replace(encoder, name, nn.Identity())
    return encoder


class ProjectionHead(nn.Sequential):
    """``kind="mlp"``: SupContrast's head, Linear(d, d) -> ReLU -> Linear(d, out) (SimCLR
    pretraining); ``kind="linear_bn"``: UNICON's, Linear(d, out) -> BatchNorm1d(out) (its
    in-training contrastive term). The output is not normalised (:class:`ContrastiveNet` does it)."""

    def __init__(self, in_features: int, out_features: int = 128, kind: str = "mlp"):
        if kind == "mlp":
            layers = [nn.Linear(in_features, in_features), nn.ReLU(inplace=True), nn.Linear(in_features, out_features)]
        elif kind == "linear_bn":
            layers = [nn.Linear(in_features, out_features), nn.BatchNorm1d(out_features)]
        else:
            raise ValueError(f"unknown projection head {kind!r}; use mlp or linear_bn")
        super().__init__(*layers)


class ContrastiveNet(nn.Module):
    """``encoder`` then ``head``, L2-normalised: N x C x H x W -> N x out unit vectors
    (SupContrast's ``SupConResNet``). State dict keys: ``encoder.<model's own names>``, ``head.*``."""

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.encoder(x)).float(), dim=1)


def encoder_state_dict(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """The encoder's weights as a plain ``{name: tensor}`` on the CPU (``module.`` of DDP stripped)."""
    encoder = getattr(encoder, "module", encoder)
    return {k.removeprefix("module."): v.detach().cpu().clone() for k, v in encoder.state_dict().items()}


# What `cdmix pretrain` writes in its run folder: the encoder (safetensors when the package is there, as
# the exported nets; else torch.save's format) and its provenance beside it (same stem, .json).
ENCODER_FILES = ("encoder.safetensors", "encoder.pt")
PROVENANCE = "encoder.json"


def encoder_file_name() -> str:
    """``encoder.safetensors`` when the safetensors package is installed, else ``encoder.pt``."""
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        return ENCODER_FILES[1]
    return ENCODER_FILES[0]


def save_encoder(encoder: nn.Module, path: str | Path) -> str:
    """Write the encoder's plain state dict to ``path`` (atomic): safetensors for a ``.safetensors``
    path, else ``torch.save``; return the file's sha256."""
    from cdmix.atomic import atomic_write

    state = {k: v.contiguous() for k, v in encoder_state_dict(encoder).items()}
    if Path(path).suffix == ".safetensors":
        from safetensors.torch import save

        data = save(state)
    else:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getvalue()
    atomic_write(Path(path), data)
    return sha256_file(path)


def find_encoder(path: str | Path) -> tuple[Path, dict | None]:
    """``--pretrained``'s weights file and, for a cdmix encoder, its provenance (encoder.json, as
    written by ``cdmix pretrain``; None for other weights files).

    ``path``: ``torchvision:ARCH[.VERSION]`` (the official file, from the cache or downloaded into it:
    :mod:`cdmix.models.weights`), a `cdmix pretrain` run folder (its encoder file is taken), an encoder file (its
    provenance is the ``.json`` of the same stem beside it), or any other weights file. A folder
    without an encoder, a provenance that is not JSON, or one whose sha256 is not the file's raise
    one :class:`UserError`."""
    import json

    from cdmix.models import weights

    if weights.is_weights_name(path):  # torchvision:NAME: the cached official file (downloaded once)
        if weights.timm_name(path):
            raise UserError(f"--pretrained {path} is loaded by timm into the model timm builds, not from a file; "
                            f"it has no encoder to read")
        return weights.fetch(str(path)), None
    path = Path(path).expanduser()
    if path.is_dir():
        found = [path / name for name in ENCODER_FILES if (path / name).is_file()]
        if not found:
            what = "a `cdmix pretrain` run that has not finished" if (path / "config.json").is_file() else "no run"
            raise UserError(f"--pretrained {path} is a folder without {' or '.join(ENCODER_FILES)} ({what}); give a "
                            f"finished `cdmix pretrain` run folder, its encoder file, or a .pth/.pt/.safetensors file")
        path = found[0]
    elif not path.is_file():
        raise UserError(f"--pretrained {path} not found (give a `cdmix pretrain` run folder, its encoder file, or "
                        f"a local .pth/.pt/.safetensors weights file)")
    record = path.with_suffix(".json")
    if not record.is_file():
        return path, None
    try:
        provenance = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"cannot read the encoder's provenance {record} ({exc}); the file is damaged") from None
    if not isinstance(provenance, dict) or provenance.get("kind") != "cdmix encoder":
        return path, None  # some other JSON beside some other weights file
    if provenance.get("sha256") != sha256_file(path):
        raise UserError(f"{path} is not the encoder {record} describes (its sha256 differs); the file was replaced "
                        f"or damaged: pretrain again, or put back the file it was written with")
    return path, provenance


def encoder_normalization(path: str | Path, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the cdmix encoder at ``path`` was pretrained with (its provenance), for images of
    ``channels`` channels; a :class:`UserError` for other weights or another number of channels."""
    weights, provenance = find_encoder(path)
    if provenance is None:
        raise UserError(f"--normalization encoder needs a `cdmix pretrain` encoder as --pretrained; {weights} has no "
                        f"{PROVENANCE}")
    if int(provenance["in_channels"]) != channels:
        raise UserError(f"the encoder {weights} was pretrained on {provenance['in_channels']}-channel images, these "
                        f"have {channels}; pretrain on images like these (greyscale vs colour)")
    return tuple(float(v) for v in provenance["mean"]), tuple(float(v) for v in provenance["std"])


def load_encoder(net: nn.Module, path: str | Path) -> str:
    """Load an encoder file (:func:`save_encoder`) into the classifier net ``net`` of the same model,
    in place, its classifier left as initialised; return the file's sha256.

    A file that does hold the classifier's keys (a whole model, ImageNet weights) goes to
    :func:`cdmix.models.pretrained.load_pretrained` unchanged. Otherwise every other key must match
    ``net`` in name and shape (a mismatch raises one :class:`UserError` naming the first keys) and
    ``net`` is untouched on error.
    """
    from cdmix.models.pretrained import check_finite, check_structure

    path = Path(path)
    if not path.is_file():
        raise UserError(f"encoder file {path} not found")
    check_structure(path)  # cheap, before the file is read
    state = _read_state_dict(path)
    head = classifier_name(net)
    # An ImageNet file's fc in a model with its own head (resnet18_mlp: Jo-SRC's presets) is skipped there too.
    imagenet_fc = getattr(net, "fresh_head", None) and "fc.weight" in state and "fc.weight" not in net.state_dict()
    if imagenet_fc or any(k.startswith(f"{head}.") for k in state):
        return load_pretrained(net, path)
    check_finite(path, state)
    own = {k: v for k, v in net.state_dict().items() if not k.startswith(f"{head}.")}
    missing = [k for k in own if k not in state and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shape_differs = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or shape_differs:
        problems = [f"{what} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                    for what, keys in (("missing", missing), ("unexpected", unexpected),
                                       ("shape differs for", shape_differs)) if keys]
        raise UserError(f"encoder file {path} does not fit the {type(net).__name__} model (pretrained with another "
                        f"--model or --width?): {'; '.join(problems)}")
    net.load_state_dict(state, strict=False)
    return sha256_file(path)
