"""One frozen config object: the only source of settings for a run.

Resolution order (later wins): dataclass defaults < preset file < ``--config`` TOML file < CLI
flags. ``resolve()`` fills the ``None`` "auto" fields (model, device, warm-up, ...) from the
dataset and method, so the config saved in the run folder says exactly what ran.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

from cdmix.errors import UserError

DATASETS = ("digits", "cifar10", "cifar100", "cifar10n", "cifar100n", "folder", "csv", "npz")
METHODS = ("standard", "dividemix", "josrc", "hybrid")
NOISE_MODES = ("sym", "sym-exclusive", "asym", "pairflip")


@dataclass(frozen=True)
class Config:
    # --- data
    dataset: str = "digits"
    data_path: str = "data"
    labels: str | None = None  # CIFAR-N label set: worst|aggre|random1..3 (10N), noisy (100N)
    label_file: str | None = None
    download: bool = False
    image_size: int | None = None  # folder/csv resize target; None = 32
    noise_mode: str = "sym"
    noise_rate: float = 0.4
    noise_file: str | None = None
    # Held-out part of the (noisy) training set: best.pt and the collapse guard use its accuracy,
    # so the test set is not used for model selection. Faithful presets set 0 (official code).
    val_fraction: float = 0.1
    open_set_rate: float = 0.0
    open_set_source: str = "noise"  # noise | digits | npz:PATH | cifar100:PATH
    # --- model
    model: str | None = None  # None: a sensible default per dataset
    width: int | None = None
    # --- method (DivideMix defaults from REFERENCE §2)
    method: str = "dividemix"
    warmup: int | None = None  # None: per dataset/method default
    lambda_u: float = 25.0
    p_threshold: float = 0.5
    alpha: float = 4.0
    temperature: float = 0.5
    loss_history: int = 1  # epochs of per-sample loss averaged before the GMM (5 for 90% noise)
    neg_entropy: bool | None = None  # None: on for asym noise (official)
    rampup_epochs: int = 16
    faithful_order: bool = True  # keep the official train-mode co-guess forwards
    # --- Jo-SRC / hybrid (REFERENCE §3, §4)
    ema_decay: float = 0.99
    tau_clean: float = 0.75
    tau_clean_max: float = 0.95
    smooth_eps: float = 0.6
    josrc_alpha: float = 0.5
    ood_temperature: float = 10.0
    lambda_cons: float = 1.0
    # --- stabilisers (off in faithful presets)
    stab_temperature_decay: bool = False
    stab_teacher_cap: float = 1.0  # 1.0 = no cap
    stab_gmm_running_mean: bool = False
    stab_blend_selection: float = 0.0  # weight of the JS likelihood blended into the GMM prob
    stab_second_warmup: int = 0
    stab_slow_ema: float = 0.0  # 0 = off; else the EMA decay used after warm-up
    stab_strong_aug: bool = False
    stab_confidence_penalty: float = 0.0
    stab_label_smoothing: float = 0.0
    stab_per_class_threshold: bool = False
    stab_soft_ood: bool = False
    stab_swa_start: int = 0  # 0 = off; else the epoch SWA averaging starts
    on_collapse: str = "warn"  # warn | rollback
    collapse_drop: float = 10.0  # accuracy points below best that count as a collapse
    # --- optimisation
    epochs: int | None = None
    batch_size: int = 64
    lr: float = 0.02
    optimizer: str = "sgd"  # sgd | adam
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "step"  # step | cosine
    lr_step: int | None = None  # step schedule: lr /10 at this epoch; None = epochs // 2
    # --- system
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: bool | None = None  # None: bf16 autocast on CUDA only
    compile: bool = False
    sync_bn: bool = False  # torchrun: SyncBatchNorm instead of per-rank BN
    eval_batch_size: int | None = None  # None: 1024 on CUDA, 64 on CPU (measured 2.6x faster there)
    out: str | None = None
    overwrite: bool = False
    preset: str | None = None
    progress: bool = True

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
    if config.dataset not in DATASETS:
        raise UserError(f"unknown dataset {config.dataset!r}; choose one of {', '.join(DATASETS)}")
    if config.method not in METHODS:
        raise UserError(f"unknown method {config.method!r}; choose one of {', '.join(METHODS)}")
    if config.noise_mode not in NOISE_MODES:
        raise UserError(f"unknown noise mode {config.noise_mode!r}; choose one of {', '.join(NOISE_MODES)}")
    if not 0.0 <= config.noise_rate <= 1.0:
        raise UserError(f"noise rate must be in [0, 1], got {config.noise_rate}")
    if not 0.0 <= config.open_set_rate < 1.0:
        raise UserError(f"open-set rate must be in [0, 1), got {config.open_set_rate}")
    if not 0.0 <= config.val_fraction < 0.9:
        raise UserError(f"validation fraction must be in [0, 0.9), got {config.val_fraction}")
    if config.device not in ("auto", "cpu", "cuda") and not config.device.startswith("cuda:"):
        raise UserError(f"unknown device {config.device!r}; use auto, cpu or cuda")
    if config.schedule not in ("step", "cosine"):
        raise UserError(f"unknown lr schedule {config.schedule!r}; use step or cosine")
    if config.optimizer not in ("sgd", "adam"):
        raise UserError(f"unknown optimizer {config.optimizer!r}; use sgd or adam")
    if not 0.0 < config.stab_teacher_cap <= 1.0:
        raise UserError(f"teacher confidence cap must be in (0, 1], got {config.stab_teacher_cap}")
    if not 0.0 <= config.stab_blend_selection <= 1.0:
        raise UserError(f"selection blend weight must be in [0, 1], got {config.stab_blend_selection}")
    if not 0.0 <= config.stab_slow_ema < 1.0:
        raise UserError(f"slow EMA decay must be in [0, 1), got {config.stab_slow_ema}")
    if config.on_collapse not in ("warn", "rollback"):
        raise UserError(f"--on-collapse must be warn or rollback, got {config.on_collapse!r}")
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
        neg_entropy = config.noise_mode == "asym" and config.noise_rate > 0 and config.noise_file is None
    return config.replace(
        device=device,
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
    from cdmix.runs import atomic_write_text

    atomic_write_text(Path(path), json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")


def load_json(path: str | Path) -> Config:
    path = Path(path)
    try:
        values = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read run config {path}: {exc}") from None
    return Config.from_dict(values, source=str(path))
