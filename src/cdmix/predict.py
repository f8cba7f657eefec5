"""A run's final nets for inference: exported weights, ``load_model``, and ``cdmix predict``.

At the end of a run the folder gets each final net as a plain ``state_dict`` (``net1.safetensors``,
``net2.safetensors`` for two-net methods; ``net1.pt`` when the ``safetensors`` package is absent)
and ``model.json``, which says how to rebuild them (model name, width, classes, input size and
normalisation). ``load_model`` reads those, not the resumable checkpoint.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from cdmix import runs
from cdmix.atomic import atomic_write
from cdmix.data.names import IMAGE_EXTENSIONS
from cdmix.errors import UserError


def _state_bytes(state: dict[str, torch.Tensor]) -> tuple[bytes, str]:
    """A state_dict serialised as safetensors (or torch's format without the package): (bytes, extension)."""
    try:
        from safetensors.torch import save
    except ImportError:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        return buffer.getvalue(), "pt"
    return save(state), "safetensors"


def export_model(run_dir: Path, nets: Sequence[torch.nn.Module], *, model: str, width: int | None,
                 class_names: Sequence[str], image_size: int, in_channels: int, mean: Sequence[float],
                 std: Sequence[float]) -> list[Path]:
    """Write each net's state_dict (CPU tensors) and ``model.json`` into ``run_dir``; returns the weight files."""
    files = []
    for i, net in enumerate(nets, start=1):
        net = getattr(net, "module", net)  # an SWA average or a DDP wrapper holds the net as .module
        state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
        data, ext = _state_bytes(state)
        path = Path(run_dir) / f"net{i}.{ext}"
        atomic_write(path, data)
        files.append(path)
    spec = {"model": model, "width": width, "num_classes": len(class_names), "class_names": list(class_names),
            "image_size": int(image_size), "in_channels": int(in_channels), "mean": list(mean), "std": list(std),
            "nets": [p.name for p in files],
            "ensemble": "mean of the nets' softmax; images are uint8 N x H x W x C, normalised with mean/std"}
    atomic_write(Path(run_dir) / runs.MODEL, json.dumps(spec, indent=2) + "\n")
    return files


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except ImportError:
        raise UserError(f"{path} needs the safetensors package: pip install safetensors") from None
    except Exception as exc:  # damaged file: many exception types
        raise UserError(f"{path} could not be read ({type(exc).__name__}); the file is damaged") from None


@dataclass
class TrainedModel:
    """The final nets of a run, in eval mode: ``model(images)`` gives N x C class probabilities.

    images: uint8 N x H x W x C (or N x H x W) arrays; other sizes are resized like the training
    images (short side to ``image_size``, centre square). ``predict(images)`` gives class indices;
    ``class_names[i]`` names them.
    """

    nets: list[torch.nn.Module]
    class_names: list[str]
    image_size: int
    in_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    device: str = "cpu"
    batch_size: int = 256

    def prepare(self, images: np.ndarray) -> np.ndarray:
        """uint8 N x S x S x C at this model's size and channel count."""
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise UserError(f"images must be N x H x W or N x H x W x C with C = 1 or 3, got shape {images.shape}")
        if images.dtype != np.uint8:
            raise UserError(f"images must be uint8 pixel values 0..255, got {images.dtype}")
        if images.shape[-1] != self.in_channels:
            images = images.mean(axis=-1, keepdims=True).round().astype(np.uint8) if self.in_channels == 1 \
                else np.repeat(images, 3, axis=-1)
        if images.shape[1:3] != (self.image_size, self.image_size):
            images = np.stack([_resize(img, self.image_size) for img in images])
        return images

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        from cdmix.data.batches import DeviceImages
        from cdmix.ensemble import ensemble_probs

        images = self.prepare(images)
        if len(images) == 0:
            return np.zeros((0, len(self.class_names)), dtype=np.float32)
        device_images = DeviceImages(images, self.mean, self.std, self.device)
        out = []
        for start in range(0, len(images), self.batch_size):
            idx = torch.arange(start, min(start + self.batch_size, len(images)), device=device_images.device)
            x = device_images.batch(idx, augment=False)
            probs = ensemble_probs([net(x) for net in self.nets])  # the one ensemble rule
            out.append(probs.cpu().numpy())
        return np.concatenate(out).astype(np.float32)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Class index (int64) of each image: the argmax of ``self(images)``."""
        return self(images).argmax(1).astype(np.int64)


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    from cdmix.data.store import fit_square

    channels = image.shape[-1]
    img = Image.fromarray(image[..., 0] if channels == 1 else image)
    out = np.asarray(fit_square(img, size), dtype=np.uint8)
    return out[..., None] if out.ndim == 2 else out


MAX_IMAGE_SIZE = 4096  # model.json's image_size above this is refused (an edited file, not a trained net)
MAX_WIDTH = 1024  # model.json's width above this is refused (no cdmix preset comes near; memory)


def _spec_error(spec_path: Path, what: str) -> UserError:
    return UserError(f"{spec_path}: {what}; the file is damaged or was edited (it is written when a run ends: "
                     "restore the run's original model.json)")


def _number_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                           and np.isfinite(v) for v in value)


def read_model_spec(run_dir: str | Path) -> tuple[dict[str, Any], list[Path]]:
    """``model.json`` of a run, checked: (the spec, the weight files it names, inside ``run_dir``).

    Raises ``UserError`` (one line, naming the file and the field) for a missing or unreadable file,
    a missing key or a value of the wrong type, ``class_names`` whose length is not ``num_classes``,
    ``in_channels`` other than 1 or 3, ``mean`` / ``std`` that are not ``in_channels`` finite numbers
    (``std`` > 0), ``image_size`` outside 1..``MAX_IMAGE_SIZE``, ``width`` above ``MAX_WIDTH``, and
    ``nets`` that is empty or names a file outside the run folder, or one that is not there.
    """
    run_dir = Path(run_dir)
    spec_path = run_dir / runs.MODEL
    if not spec_path.is_file():
        raise UserError(f"{run_dir} has no {runs.MODEL}; the trained nets are exported when a run ends "
                        f"(finish it with `cdmix resume {run_dir}`)")
    try:
        spec = json.loads(spec_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{spec_path} cannot be read ({type(exc).__name__}); the file is damaged") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{spec_path} is not valid JSON ({exc.msg}); the file is damaged") from None
    if not isinstance(spec, dict):
        raise _spec_error(spec_path, "not a JSON object")

    def integer(key: str, low: int, high: int | None = None, optional: bool = False) -> None:
        value = spec.get(key)
        if value is None and optional and key in spec:
            return
        if key not in spec:
            raise _spec_error(spec_path, f"{key} is missing")
        if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
            bound = f"{low}..{high}" if high is not None else f">= {low}"
            raise _spec_error(spec_path, f"{key} must be a whole number {bound}, got {value!r}"[:300])

    if not isinstance(spec.get("model"), str) or not spec["model"]:
        raise _spec_error(spec_path, "model (the model name) is missing or not text")
    integer("width", 1, MAX_WIDTH, optional=True)
    integer("num_classes", 1)
    integer("image_size", 1, MAX_IMAGE_SIZE)
    integer("in_channels", 1, 3)
    if spec["in_channels"] not in (1, 3):
        raise _spec_error(spec_path, f"in_channels must be 1 or 3, got {spec['in_channels']}")
    names = spec.get("class_names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise _spec_error(spec_path, "class_names is missing or not a list of text")
    if len(names) != spec["num_classes"]:
        raise _spec_error(spec_path, f"{len(names)} class_names for num_classes {spec['num_classes']}")
    for key in ("mean", "std"):
        if not _number_list(spec.get(key)) or len(spec[key]) != spec["in_channels"]:
            raise _spec_error(spec_path, f"{key} must be {spec['in_channels']} finite number(s), one per channel, "
                                         f"got {spec.get(key)!r}"[:300])
    if min(spec["std"]) <= 0:
        raise _spec_error(spec_path, f"std must be above 0 (a division by it normalises the images), got {spec['std']}")
    nets = spec.get("nets")
    if not isinstance(nets, list) or not nets or not all(isinstance(n, str) and n for n in nets):
        raise _spec_error(spec_path, "nets (the weight files) is missing, empty or not a list of file names")
    root = run_dir.resolve()
    files = []
    for name in nets:
        path = run_dir / name
        if Path(name).is_absolute() or not path.resolve().is_relative_to(root) or path.resolve() == root:
            raise _spec_error(spec_path, f"the net {name!r} is outside the run folder; cdmix loads weights only "
                                         "from the run's own folder")
        if path.suffix not in (".safetensors", ".pt") or not path.is_file():
            raise UserError(f"{path}: the weights named in {spec_path} are missing (or not .safetensors / .pt); "
                            "the run folder is incomplete")
        files.append(path)
    return spec, files


def load_model(run_dir: str | Path, device: str = "cpu") -> TrainedModel:
    """The final nets of a finished run, ready for inference (see ``TrainedModel``).

    Reads ``model.json`` (checked by ``read_model_spec``) and the exported ``net*.safetensors`` /
    ``net*.pt`` state_dicts (written when a run ends). Raises UserError for a folder without them, a
    damaged or edited model.json, and weights that do not fit the model it names.
    """
    from cdmix.models import create_model

    run_dir = Path(run_dir)
    spec, files = read_model_spec(run_dir)
    nets = []
    for path in files:
        try:
            net = create_model(spec["model"], num_classes=spec["num_classes"], in_channels=spec["in_channels"],
                               width=spec["width"])
        except (MemoryError, RuntimeError) as exc:
            raise UserError(f"{run_dir / runs.MODEL}: the {spec['model']} net it describes cannot be built "
                            f"({type(exc).__name__}); the file is damaged or was edited") from None
        try:
            net.load_state_dict(_load_state(path))
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise UserError(f"{path} does not fit a {spec['model']} net with {spec['num_classes']} classes "
                            f"as {runs.MODEL} says ({first})") from None
        nets.append(net.to(device).eval())
    return TrainedModel(nets, list(spec["class_names"]), int(spec["image_size"]), int(spec["in_channels"]),
                        tuple(float(v) for v in spec["mean"]), tuple(float(v) for v in spec["std"]), device)


def image_files(paths: Sequence[str | Path]) -> list[Path]:
    """The image files named by ``paths``: files as given, folders searched recursively (sorted)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS))
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"{p} does not exist; give image files or folders of them")
    if not files:
        raise UserError(f"no images ({'/'.join(IMAGE_EXTENSIONS)}) in {', '.join(map(str, paths))}")
    return files


def predict_files(model: TrainedModel, paths: Sequence[str | Path]) -> tuple[list[Path], np.ndarray]:
    """Decode the image files (as training decoded them) and classify them: (files, N x C probabilities)."""
    from cdmix.data.store import decode_image

    files = image_files(paths)
    return files, model(np.stack([_decode(f, model.image_size) for f in files]))


def _decode(path: Path, size: int) -> np.ndarray:
    """``decode_image``, with any failure (truncated or damaged file, a decompression bomb: more pixels than
    PIL's ``MAX_IMAGE_PIXELS``) as one ``UserError`` naming the file."""
    import warnings

    from PIL import Image

    from cdmix.data.store import decode_image
    from cdmix.safetext import printable

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return decode_image(path, size)
    except UserError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UserError(printable(f"cannot decode {path}: it declares too many pixels for an image "
                                  f"(a decompression bomb?): {exc}")) from None
    except Exception as exc:  # PIL raises many types for a damaged file: OSError, SyntaxError, struct.error ...
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise UserError(printable(f"cannot decode {path} ({type(exc).__name__}: {text}); the file is damaged "
                                  "or not an image")) from None


def describe(probs: np.ndarray, class_names: Sequence[str]) -> list[dict[str, Any]]:
    """Per image: predicted class index and name, and its probability."""
    top = probs.argmax(1)
    return [{"label": int(k), "class": class_names[int(k)], "prob": float(probs[i, k])} for i, k in enumerate(top)]
