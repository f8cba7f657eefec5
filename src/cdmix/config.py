"""One frozen config object: the only source of settings for a run.

Resolution order (later wins): dataclass defaults < preset file < ``--config`` TOML file < CLI
flags. ``resolve()`` fills the ``None`` "auto" fields (model, device, warm-up, ...) from the
dataset and method, so the config saved in the run folder says exactly what ran.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from cdmix.errors import UserError

DATASETS = ("digits", "cifar10", "cifar100", "cifar10n", "cifar100n", "folder", "csv", "npz")
METHODS = ("standard", "dividemix", "josrc", "hybrid")
NOISE_MODES = ("sym", "sym-exclusive", "asym", "pairflip")
CIFARN_LABEL_SETS = ("worst", "aggre", "random1", "random2", "random3", "noisy")
GROUPS = ("data", "model", "method", "Jo-SRC & hybrid", "stabilisers", "optimisation", "system")


def setting(default: Any, group: str, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A Config field whose CLI flag help, argparse group and allowed values live with it."""
    return field(default=default, metadata={"group": group, "help": help, "choices": choices})


@dataclass(frozen=True)
class Config:
    # --- data
    dataset: str = setting("digits", "data", "dataset (digits is built in)", DATASETS)
    data_path: str = setting("data", "data", "folder with the CIFAR pickles / image folder / CSV file / .npz file")
    labels: str | None = setting(None, "data", "CIFAR-N label set: worst | aggre | random1..3 (10N), noisy (100N)",
                                 CIFARN_LABEL_SETS)
    label_file: str | None = setting(None, "data", "path of CIFAR-10_human.pt / CIFAR-100_human.pt")
    download: bool = setting(False, "data", "download CIFAR / CIFAR-N files when missing (never done without this flag)")
    image_size: int | None = setting(None, "data", "resize folder/csv images to this size (default 32)")
    normalization: str | None = setting(None, "data", "per-channel normalisation: the dataset's own statistics "
                                        "or ImageNet's (default: imagenet with --pretrained weights, else dataset)",
                                        ("dataset", "imagenet"))
    noise_mode: str = setting("sym", "data", "synthetic noise mode", NOISE_MODES)
    noise_rate: float = setting(0.4, "data", "synthetic noise rate in [0, 1]")
    noise_file: str | None = setting(None, "data", "read (or write, if missing) the noisy labels as a DivideMix JSON list")
    # Held-out part of the (noisy) training set: best.pt and the collapse guard use its accuracy,
    # so the test set is not used for model selection. Faithful presets set 0 (official code).
    val_fraction: float = setting(0.1, "data", "hold out this part of the training data for model selection")
    open_set_classes: int = setting(0, "data", "Jo-SRC's open set: the last K classes' images relabelled over "
                                    "the others, noise among the rest (CIFAR-80N: cifar100 with 20)")
    open_set_rate: float = setting(0.0, "data", "replace this part of the training images with synthetic "
                                   "open-set images (--open-set-source)")
    open_set_source: str = setting("noise", "data", "open-set images: noise | digits | npz:PATH | cifar100:PATH "
                                   "(an .npz or cifar-100-python folder)")
    # --- model
    model: str | None = setting(None, "model", "preact_resnet18 | wrn28 | small_cnn (default: per dataset)")
    width: int | None = setting(None, "model", "model width (base channels; widen factor for wrn28)")
    # --- method (DivideMix defaults from REFERENCE §2)
    method: str = setting("dividemix", "method", "training method", METHODS)
    warmup: int | None = setting(None, "method", "warm-up epochs of plain cross-entropy (default: per dataset)")
    lambda_u: float = setting(25.0, "method", "weight of the unlabeled loss (DivideMix)")
    p_threshold: float = setting(0.5, "method", "clean probability threshold of the division")
    alpha: float = setting(4.0, "method", "MixUp Beta(alpha, alpha)")
    temperature: float = setting(0.5, "method", "sharpening temperature")
    loss_history: int = setting(1, "method", "average per-sample losses over this many epochs (5 for 90%% noise)")
    neg_entropy: bool | None = setting(None, "method", "confidence penalty in warm-up (default: on for asym noise)")
    rampup_epochs: int = setting(16, "method", "epochs of the linear lambda_u ramp after warm-up")
    faithful_order: bool = setting(True, "method", "official train-mode co-guess forwards, one per view "
                                   "(--no-faithful-order batches them)")
    # --- Jo-SRC / hybrid (REFERENCE §3, §4)
    ema_decay: float = setting(0.99, "Jo-SRC & hybrid", "EMA decay of the mean teacher")
    tau_clean: float = setting(0.75, "Jo-SRC & hybrid", "Jo-SRC clean threshold at the end of warm-up")
    tau_clean_max: float = setting(0.95, "Jo-SRC & hybrid", "clean threshold at the last epoch")
    smooth_eps: float = setting(0.6, "Jo-SRC & hybrid", "label smoothing of the JS clean likelihood")
    josrc_alpha: float = setting(0.5, "Jo-SRC & hybrid", "weight of the consistency loss in Jo-SRC")
    ood_temperature: float = setting(10.0, "Jo-SRC & hybrid", "temperature of the OOD (flattened) targets")
    lambda_cons: float = setting(1.0, "Jo-SRC & hybrid", "weight of the Jo-SRC consistency loss (hybrid)")
    # --- stabilisers (off in faithful presets)
    stab_temperature_decay: bool = setting(False, "stabilisers", "late training: T rises to 1, lambda_u falls to half")
    stab_teacher_cap: float = setting(1.0, "stabilisers", "cap the pseudo-labels' top probability (1.0 = no cap)")
    stab_gmm_running_mean: bool = setting(False, "stabilisers", "smooth the loss GMM across epochs (blends it in)")
    stab_blend_selection: float = setting(0.0, "stabilisers", "weight of the JS likelihood blended with the GMM prob")
    stab_second_warmup: int = setting(0, "stabilisers", "epochs of CE on the selected set halfway through")
    stab_slow_ema: float = setting(0.0, "stabilisers", "EMA decay after warm-up (0 = off)")
    stab_strong_aug: bool = setting(False, "stabilisers", "strong augmentation for the trained nets")
    stab_confidence_penalty: float = setting(0.0, "stabilisers", "weight of a confidence penalty")
    stab_label_smoothing: float = setting(0.0, "stabilisers", "label smoothing of warm-up CE and Lx")
    stab_per_class_threshold: bool = setting(False, "stabilisers", "per-class selection thresholds")
    stab_soft_ood: bool = setting(False, "stabilisers", "soft OOD weight from the two views' disagreement")
    stab_swa_start: int = setting(0, "stabilisers", "epoch SWA averaging starts (0 = off)")
    on_collapse: str = setting("warn", "stabilisers", "on a collapse: warn, or rollback (restore best.pt, cut lr "
                               "and pseudo-label weight)", ("warn", "rollback"))
    collapse_drop: float = setting(10.0, "stabilisers", "accuracy points below the best that count as a collapse")
    # --- optimisation
    epochs: int | None = setting(None, "optimisation", "number of epochs (default: per dataset)")
    batch_size: int = setting(64, "optimisation", "batch size per process (DivideMix warm-up uses twice this)")
    lr: float = setting(0.02, "optimisation", "learning rate")
    optimizer: str = setting("sgd", "optimisation", "sgd (momentum, DivideMix) or adam (official Jo-SRC CIFAR run)",
                             ("sgd", "adam"))
    momentum: float = setting(0.9, "optimisation", "SGD momentum")
    weight_decay: float = setting(5e-4, "optimisation", "weight decay")
    schedule: str = setting("step", "optimisation", "lr schedule", ("step", "cosine"))
    lr_step: int | None = setting(None, "optimisation", "step schedule: lr /10 from this epoch (default epochs // 2)")
    # --- system
    seed: int = setting(0, "system", "random seed")
    device: str = setting("auto", "system", "auto | cpu | cuda | cuda:N")
    amp: bool | None = setting(None, "system", "bf16 autocast (default: on for CUDA, off for CPU)")
    compile: bool = setting(False, "system", "torch.compile the models (falls back to eager when unavailable)")
    sync_bn: bool = setting(False, "system", "under torchrun: synchronise BatchNorm statistics across ranks")
    eval_batch_size: int | None = setting(None, "system", "batch size of the loss and test passes "
                                          "(default 1024 on CUDA, 64 on CPU: measured 2.6x faster there)")
    out: str | None = setting(None, "system", "run folder (default runs/<dataset>-<method>-<time>)")
    overwrite: bool = setting(False, "system", "replace an existing run in --out")
    preset: str | None = setting(None, "system", "a published setting (see `cdmix presets`)")
    progress: bool = setting(True, "system", "progress bars (--no-progress: one line per epoch only)")

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "Config":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"{source}: unknown setting(s) {', '.join(unknown)}")
        return cls(**values)


FIELD_TYPES = {f.name: f.type for f in fields(Config)}


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"config file {path} is not valid TOML: {exc}") from None


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("cdmix.presets").iterdir() if p.name.endswith(".toml"))


def load_preset(name: str) -> dict[str, Any]:
    """Settings of a named preset, without its ``[info]`` table (published accuracy etc.)."""
    return dict(preset_info(name)["settings"])


def preset_info(name: str) -> dict[str, Any]:
    """``{"settings": {...}, "info": {...}}`` of a preset file in ``cdmix/presets``."""
    resource = resources.files("cdmix.presets") / f"{name}.toml"
    if not resource.is_file():
        raise UserError(f"unknown preset {name!r}; `cdmix presets` lists them")
    data = tomllib.loads(resource.read_text())
    info = data.pop("info", {})
    return {"settings": data, "info": info}


def build_config(preset: str | None = None, config_file: str | None = None, **overrides: Any) -> Config:
    """Merge preset < config file < overrides (``None`` overrides are ignored) and validate."""
    values: dict[str, Any] = {}
    file_values = load_toml(config_file) if config_file else {}
    preset = overrides.get("preset") or preset or file_values.get("preset")
    if preset:
        values.update(load_preset(preset))
        values["preset"] = preset
    values.update(file_values)
    values.update({k: v for k, v in overrides.items() if v is not None})
    config = Config.from_dict(values)
    validate(config)
    return config


def validate(config: Config) -> None:
    for f in fields(Config):
        choices = f.metadata.get("choices")
        value = getattr(config, f.name)
        if choices and value is not None and value not in choices:
            what = f.name.replace("_", " ")
            raise UserError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")
    if not 0.0 <= config.noise_rate <= 1.0:
        raise UserError(f"noise rate must be in [0, 1], got {config.noise_rate}")
    if config.open_set_classes < 0:
        raise UserError(f"--open-set-classes must be 0 or more, got {config.open_set_classes}")
    if config.open_set_classes and config.open_set_rate:
        raise UserError("--open-set-classes and --open-set-rate are two different open-set settings; use one")
    if not 0.0 <= config.open_set_rate < 1.0:
        raise UserError(f"open-set rate must be in [0, 1), got {config.open_set_rate}")
    if not 0.0 <= config.val_fraction < 0.9:
        raise UserError(f"validation fraction must be in [0, 0.9), got {config.val_fraction}")
    if config.device not in ("auto", "cpu", "cuda") and not config.device.startswith("cuda:"):
        raise UserError(f"unknown device {config.device!r}; use auto, cpu or cuda")
    if not 0.0 < config.stab_teacher_cap <= 1.0:
        raise UserError(f"teacher confidence cap must be in (0, 1], got {config.stab_teacher_cap}")
    if not 0.0 <= config.stab_blend_selection <= 1.0:
        raise UserError(f"selection blend weight must be in [0, 1], got {config.stab_blend_selection}")
    if not 0.0 <= config.stab_slow_ema < 1.0:
        raise UserError(f"slow EMA decay must be in [0, 1), got {config.stab_slow_ema}")
    if config.batch_size < 1 or (config.epochs is not None and config.epochs < 1):
        raise UserError("batch size and epochs must be positive")
    if config.model is not None:
        from cdmix.models import model_names

        if config.model not in model_names():
            raise UserError(f"unknown model {config.model!r}; choose one of {', '.join(model_names())}")
    if config.loss_history < 1:
        raise UserError("loss history must be at least 1 epoch")


def default_model(dataset: str, image_size: int) -> str:
    return "small_cnn" if dataset == "digits" or image_size <= 16 else "preact_resnet18"


def resolve(config: Config, num_classes: int, image_size: int) -> Config:
    """Fill every ``None`` "auto" field with the value that will actually be used."""
    import torch

    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    small = config.dataset == "digits"
    cifar100_like = num_classes >= 100
    warmup = config.warmup
    if warmup is None:
        warmup = 3 if small else (30 if cifar100_like else 10)
    epochs = config.epochs
    if epochs is None:
        epochs = 12 if small else 300
    model = config.model or default_model(config.dataset, image_size)
    neg_entropy = config.neg_entropy
    if neg_entropy is None:
        # Official: the penalty is on whenever the noise mode is asym, also for a noise file.
        neg_entropy = config.noise_mode == "asym"
    return config.replace(
        device=device,
        normalization=config.normalization or "dataset",
        warmup=warmup,
        epochs=epochs,
        model=model,
        neg_entropy=neg_entropy,
        amp=device.startswith("cuda") if config.amp is None else config.amp,
        lr_step=config.lr_step if config.lr_step is not None else epochs // 2,
        image_size=config.image_size or image_size,
        eval_batch_size=config.eval_batch_size or (1024 if device.startswith("cuda") else 64),
    )


def save_json(config: Config, path: str | Path) -> None:
    from cdmix.atomic import atomic_write

    atomic_write(Path(path), json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")


def load_json(path: str | Path) -> Config:
    path = Path(path)
    try:
        values = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read run config {path}: {exc}") from None
    return Config.from_dict(values, source=str(path))
