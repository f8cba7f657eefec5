"""Load a local pretrained state dict (``.pth``/``.pt`` or ``.safetensors``) into a model.

The file is never unpickled as arbitrary code: ``.pth``/``.pt`` go through
``torch.load(weights_only=True)``, which refuses anything but tensors and plain
containers. ``.safetensors`` needs the optional ``safetensors`` package.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from cdmix.errors import UserError

__all__ = ["check_finite", "check_structure", "load_pretrained", "sha256_file"]

# How many key names an error message lists per kind of problem.
_SHOW = 3


def sha256_file(path: str | Path) -> str:
    """Hex sha256 digest of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def check_structure(path: Path) -> None:
    """Raise ``UserError`` unless ``path`` looks like a weights file, from its first and last bytes only
    (before it is hashed or read: a 4 GB file of zeros is refused at once): a ``.safetensors`` file must
    start with a JSON header whose length fits the file and whose tensors end where the file ends; any
    other file must be a zip archive (``torch.save``'s format, its end record present) or a pickle
    (torch's legacy format)."""
    import json
    import struct
    import zipfile

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if path.suffix == ".safetensors":
            if size < 8:
                raise UserError(f"cannot read weights file {path}: {size} bytes are too few for a .safetensors file")
            (header_len,) = struct.unpack("<Q", head)
            if not 2 <= header_len <= min(size - 8, 100 << 20):
                raise UserError(f"cannot read weights file {path}: not a .safetensors file (its header length "
                                f"{header_len} does not fit the file of {size} bytes); the file is damaged")
            try:
                header = json.loads(f.read(header_len))
                ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
            except (ValueError, TypeError, KeyError, IndexError, AttributeError):
                raise UserError(f"cannot read weights file {path}: not a .safetensors file (its header is not "
                                "the JSON safetensors writes); the file is damaged") from None
            if max(ends, default=0) != size - 8 - header_len:
                raise UserError(f"cannot read weights file {path}: its header describes {max(ends, default=0)} "
                                f"bytes of tensors, the file holds {size - 8 - header_len}; the file is damaged")
            return
    if head.startswith(b"PK\x03\x04"):
        if not zipfile.is_zipfile(path):  # reads only the end of the file
            raise UserError(f"cannot read weights file {path}: a damaged zip archive (no end record; truncated?)")
        return
    if not head.startswith(b"\x80"):  # pickle protocol 2+: torch's legacy (pre-1.6) format
        raise UserError(f"cannot read weights file {path}: neither torch.save's zip format, torch's legacy format "
                        "nor safetensors (wrong first bytes); give a .pth/.pt state dict or a .safetensors file")


def check_finite(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Raise ``UserError`` naming the first tensor of ``state`` that holds NaN or infinite values: such
    weights give NaN losses from the first step on, and every resume repeats them."""
    bad = [k for k, v in state.items() if v.is_floating_point() or v.is_complex()
           if not bool(torch.isfinite(v).all())]
    if bad:
        raise UserError(f"weights file {path} holds NaN or infinite values (in {_listed(bad)}); it is damaged or "
                        "from a training that diverged: give another file")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The file's ``{key: tensor}`` (unwrapped from ``state_dict``/``model``, ``module.`` stripped)."""
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise UserError(f"weights file {path} is .safetensors: pip install safetensors") from None
        try:
            raw: object = load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own SafetensorError for bad headers
            raise UserError(f"cannot read weights file {path}: {_first_line(exc)}") from None
    else:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError (refused object), RuntimeError / EOFError (corrupt)
            raise UserError(
                f"cannot read weights file {path} as a plain state dict (weights_only loading; "
                f"only tensors and plain containers are accepted): {_first_line(exc)}"
            ) from None

    if isinstance(raw, dict):
        for wrapper in ("state_dict", "model"):
            if isinstance(raw.get(wrapper), dict):
                raw = raw[wrapper]
                break
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"weights file {path} holds no state dict (a non-empty dict of tensors)")
    not_tensors = [str(k) for k, v in raw.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        shown = ", ".join(not_tensors[:_SHOW])
        raise UserError(f"weights file {path} is not a state dict: non-tensor values for {shown}")

    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in raw.items():
        key = str(key)
        state[key.removeprefix("module.")] = value  # DistributedDataParallel saves "module.<name>"
    # Keep the per-module versions torch saved, so version-dependent loaders (BN) behave as torch intends.
    metadata = getattr(raw, "_metadata", None)
    if metadata is not None:
        stripped = OrderedDict((k.removeprefix("module."), v) for k, v in metadata.items())
        state._metadata = stripped  # type: ignore[attr-defined]
    return state


def _classifier_name(net: nn.Module) -> str | None:
    """Name of the model's last ``nn.Linear`` (its classifier), or None."""
    linears = [name for name, m in net.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def _listed(keys: list[str]) -> str:
    more = f" (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


def load_pretrained(net: nn.Module, path: str | Path) -> str:
    """Copy the weights in the file ``path`` into ``net`` in place; return the file's sha256 hex digest.

    ``path``: a ``.safetensors`` file, or any other suffix (``.pth``, ``.pt``) read with
    ``torch.load(weights_only=True)``: a state dict, or a dict wrapping it under
    ``"state_dict"`` or ``"model"``; a leading ``"module."`` (DDP) is stripped from keys.

    The classifier (the model's last ``nn.Linear``, ``fc`` for the ResNets) is left
    freshly initialised when the file's classifier differs only in the number of
    classes. A model with a ``fresh_head`` attribute (the MLP-head ResNets) loaded from a
    file without that head (an ImageNet ResNet) keeps its head initialised and skips the
    file's ``fc``. Everything else must match exactly, as ``strict=True``: missing keys,
    unexpected keys or different shapes raise ONE :class:`UserError` naming the first
    few keys, and ``net`` is left untouched. A missing, unreadable or corrupt file,
    a pickled object in it, or ``.safetensors`` without the package also raise
    :class:`UserError`. BatchNorm's ``num_batches_tracked`` may be absent from the file
    (older torchvision files lack it; it is then set to 0).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} not found (give the path of a local .pth, .pt or .safetensors file)")
    if path.suffix == ".safetensors":
        try:
            import safetensors.torch  # noqa: F401
        except ImportError:
            raise UserError(f"weights file {path} is .safetensors: pip install safetensors") from None
    check_structure(path)  # cheap, before the whole file is hashed and read
    digest = sha256_file(path)
    state = _read_state_dict(path)
    check_finite(path, state)

    own = net.state_dict()
    classifier = _classifier_name(net)
    kept_fresh: set[str] = set()
    fresh_head = getattr(net, "fresh_head", None)
    if fresh_head and not any(k.startswith(f"{fresh_head}.") for k in state):
        # A model with its own head (Jo-SRC's MLP) on an ImageNet file: load the body, keep the head,
        # skip the file's classifier (torchvision's ``fc``) that the model does not have.
        kept_fresh.update(k for k in own if k.startswith(f"{fresh_head}."))
        for key in [k for k in state if k.startswith("fc.") and k not in own]:
            state.pop(key)
    elif classifier is not None:
        weight_key, bias_key = f"{classifier}.weight", f"{classifier}.bias"
        file_weight = state.get(weight_key)
        if (
            file_weight is not None
            and weight_key in own
            and file_weight.shape != own[weight_key].shape
            and file_weight.shape[1:] == own[weight_key].shape[1:]
        ):
            # Same features, another number of classes: the head is retrained, keep ours.
            for key in (weight_key, bias_key):
                if key in own:
                    kept_fresh.add(key)
                    state.pop(key, None)

    missing = [k for k in own if k not in state and k not in kept_fresh and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shape_differs = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or shape_differs:
        problems = []
        if missing:
            problems.append(f"missing {_listed(missing)}")
        if unexpected:
            problems.append(f"unexpected {_listed(unexpected)}")
        if shape_differs:
            pairs = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in shape_differs]
            problems.append(f"shape differs (file vs model) for {_listed(pairs)}")
        raise UserError(f"weights file {path} does not fit the {type(net).__name__} model: {'; '.join(problems)}")

    result = net.load_state_dict(state, strict=False)
    leftover = [k for k in result.missing_keys if k not in kept_fresh and not k.endswith(".num_batches_tracked")]
    leftover += list(result.unexpected_keys)
    if leftover:  # only reachable if a module's own loader disagrees with the checks above
        raise UserError(f"weights file {path} does not fit the {type(net).__name__} model: {_listed(leftover)}")
    return digest
