"""One frozen config object: the only source of settings for a run.

Resolution order (later wins): dataclass defaults < preset file < ``--config`` TOML file < CLI
flags. ``resolve()`` fills the ``None`` "auto" fields (model, device, warm-up, ...) from the
dataset and method, so the config saved in the run folder says exactly what ran.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
import tomllib
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from cdmix.data.names import CIFARN_LABEL_SETS as _CIFARN_LABEL_SETS
from cdmix.data.names import DATA_PLACEMENTS
from cdmix.errors import UserError

DATASETS = ("digits", "cifar10", "cifar100", "cifar10n", "cifar100n", "folder", "csv", "npz", "store", "arrays",
            "clothing1m", "webvision", "food101n", "animal10n", "hf")
METHODS = ("standard", "dividemix", "josrc", "hybrid", "simclr")
# Methods with no warm-up of cross-entropy: the baseline, and SimCLR pretraining (``cdmix pretrain``).
NO_WARMUP_METHODS = ("standard", "simclr")
PRETRAINING_METHODS = ("simclr",)
NOISE_MODES = ("sym", "sym-exclusive", "asym", "pairflip")
CIFARN_LABEL_SETS = tuple(name for sets in _CIFARN_LABEL_SETS.values() for name in sets)  # every --labels name
# ``--warmup auto`` (``DivideMix.measure_warmup``, ``selection.warmup_decision``): floor and ceiling of the
# warm-up in optimiser steps per net.
WARMUP_MIN_STEPS = 200
WARMUP_MAX_STEPS = 4000
AUTO_WARMUP_METHODS = ("dividemix",)
LAMBDA_U = 25.0  # DivideMix's unlabeled loss weight unless the noise is known to be asymmetric
DIGITS_EPOCHS = 40  # the built-in demo: room for the auto warm-up's 200-step floor and 15+ DivideMix epochs
GROUPS = ("data", "model", "method", "Jo-SRC & hybrid", "stabilisers", "contrastive", "optimisation", "system")


def setting(default: Any, group: str, help: str, choices: tuple[str, ...] | None = None,
            bounds: str | None = None) -> Any:
    """A Config field whose CLI flag help, argparse group and allowed values live with it.

    ``bounds``: the interval a number must lie in, written "[0, 1]", "(0, inf)", "[1, inf)", ...
    (square bracket: the end is allowed). NaN and infinity are never allowed.
    """
    return field(default=default, metadata={"group": group, "help": help, "choices": choices, "bounds": bounds})


def _interval(bounds: str) -> tuple[float, float, bool, bool]:
    low, high = (float(v) for v in bounds[1:-1].split(","))
    return low, high, bounds[0] == "[", bounds[-1] == "]"


def _interval_text(bounds: str) -> str:
    low, high, low_in, high_in = _interval(bounds)
    if high == math.inf:
        return f"{low:g} or more" if low_in else f"greater than {low:g}"
    return f"in {bounds}"


def type_error(name: str, value: Any) -> str | None:
    """Why ``value`` does not fit the type of setting ``name`` (None when it does)."""
    kinds = FIELD_TYPES[name].replace(" ", "").split("|")
    if value is None:
        return None if "None" in kinds else "must be given"
    is_bool = isinstance(value, bool)
    if ("bool" in kinds and is_bool) or ("str" in kinds and isinstance(value, str)):
        return None
    if "int" in kinds and isinstance(value, numbers.Integral) and not is_bool:
        return None
    if "float" in kinds and isinstance(value, numbers.Real) and not is_bool:
        return None
    wanted = {"bool": "true or false", "int": "a whole number", "float": "a number", "str": "text"}
    return f"must be {' or '.join(wanted[k] for k in kinds if k in wanted)}, got {value!r}"


def bounds_error(name: str, value: Any) -> str | None:
    """Why a numeric ``value`` is outside the bounds of setting ``name`` (None when it is inside)."""
    bounds = FIELDS[name].metadata.get("bounds")
    if bounds is None or not isinstance(value, numbers.Real) or isinstance(value, bool):
        return None
    low, high, low_in, high_in = _interval(bounds)
    if not math.isfinite(value):
        return f"must be a finite number ({_interval_text(bounds)}), got {value}"
    if value < low or (value == low and not low_in) or value > high or (value == high and not high_in):
        return f"must be {_interval_text(bounds)}, got {value}"
    return None


@dataclass(frozen=True)
class Config:
    # --- data
    dataset: str = setting("digits", "data", "dataset (digits is built in)", DATASETS)
    data_path: str = setting("data", "data", "folder with the CIFAR pickles / image folder / CSV file / .npz file / "
                             "Hugging Face dataset (a save_to_disk folder, parquet or imagefolder files)")
    hf_image_column: str = setting("image", "data", "hf: the column holding the images (an Image feature)")
    hf_label_column: str = setting("label", "data", "hf: the column holding the labels (class names from its "
                                   "ClassLabel); label_issues.csv's id is the dataset's id column, else the row "
                                   "number in its split")
    labels: str | None = setting(None, "data", "CIFAR-N label set: worst | aggre | random1..3 (10N), noisy (100N)",
                                 CIFARN_LABEL_SETS)
    label_file: str | None = setting(None, "data", "path of CIFAR-10_human.pt / CIFAR-100_human.pt")
    download: bool = setting(False, "data", "download CIFAR / CIFAR-N files when missing (never done without this flag)")
    image_size: int | None = setting(None, "data", "folder/csv/hf images: short side resized to this size, center "
                                     "crop (default 32; see `cdmix prepare` for large data)",
                                     bounds="[1, inf)")
    normalization: str | None = setting(None, "data", "per-channel normalisation: the dataset's own statistics, "
                                        "ImageNet's, or those a --pretrained cdmix encoder was pretrained with (its "
                                        "encoder.json). Default: encoder with a cdmix encoder, imagenet with other "
                                        "--pretrained weights, else dataset", ("dataset", "imagenet", "encoder"))
    data_placement: str = setting("auto", "data", "where the training images live: device (one uint8 tensor on the "
                                  "device), host (memory), disk (read from the image store by index); auto: device "
                                  "when they take < 25%% of the free device memory, else disk", DATA_PLACEMENTS)
    crop_size: int | None = setting(None, "data", "training crop (random crop + flip; evaluation: center crop). "
                                    "Default: images up to 64 px keep their size (padded random crop, as CIFAR), "
                                    "larger ones round(0.875 x size), e.g. 224 of 256", bounds="[1, inf)")
    random_resized_crop: bool = setting(False, "data", "train on RandomResizedCrop (area 8-100%%, aspect 3/4-4/3) "
                                        "to the crop size instead of a random crop")
    # Synthetic noise only when asked for: the user's own labels are the data, not a noise experiment.
    noise_mode: str | None = setting(None, "data", "synthetic noise mode (sym when noise is asked for without one)",
                                     NOISE_MODES)
    noise_rate: float | None = setting(None, "data", "synthetic noise rate in [0, 1] (default: 0.4 on digits, the "
                                       "built-in demo; no synthetic noise on any other source unless asked for)",
                                       bounds="[0, 1]")
    noise_file: str | None = setting(None, "data", "read (or write, if missing) the noisy labels as a DivideMix JSON list")
    # Held-out part of the (noisy) training set: best.pt and the collapse guard use its accuracy,
    # so the test set is not used for model selection. Faithful presets set 0 (official code).
    val_fraction: float = setting(0.1, "data", "hold out this part of the training data for model selection",
                                  bounds="[0, 0.9)")
    open_set_classes: int = setting(0, "data", "Jo-SRC's open set: the last K classes' images relabelled over "
                                    "the others, noise among the rest (CIFAR-80N: cifar100 with 20)", bounds="[0, inf)")
    open_set_rate: float = setting(0.0, "data", "replace this part of the training images with synthetic "
                                   "open-set images (--open-set-source)", bounds="[0, 1)")
    open_set_source: str = setting("noise", "data", "open-set images: noise | digits | npz:PATH | cifar100:PATH "
                                   "(an .npz or cifar-100-python folder)")
    # --- real-world benchmarks (cdmix.data.realworld)
    extra_data_path: str | None = setting(None, "data", "webvision: the ILSVRC2012 folder of the second test set "
                                          "(default DATA/imagenet); food101n: the Food-101 folder (default "
                                          "DATA/food-101)")
    clean_train: bool = setting(False, "data", "clothing1m: train on clean_train_key_list.txt's images too, before "
                                "the noisy ones (Jo-SRC's training set; DivideMix's is the noisy list only)")
    epoch_subset_batches: int = setting(0, "data", "DivideMix on Clothing1M: every epoch trains on a fresh "
                                        "class-balanced random subset of this many x 2 x batch images and divides "
                                        "another of this many x batch (official 1000; 0 = the whole set)",
                                        bounds="[0, inf)")
    # --- model
    model: str | None = setting(None, "model", "preact_resnet18 | wrn28 | small_cnn (default: per dataset)")
    width: int | None = setting(None, "model", "model width (base channels; widen factor for wrn28)", bounds="[1, inf)")
    pretrained: str | None = setting(None, "model", "start from these weights: torchvision:resnet18|resnet34|resnet50"
                                     "[.IMAGENET1K_V1|.IMAGENET1K_V2] (the official file, downloaded once into "
                                     "$CDMIX_CACHE, default ~/.cache/cdmix, sha256-checked), timm:NAME (timm's "
                                     "pretrained loader), a local .pth/.pt/.safetensors state dict, or a `cdmix "
                                     "pretrain` run folder or its encoder file (every net gets the encoder and a "
                                     "fresh classifier; --model, --width and the normalisation come from its "
                                     "encoder.json); none: from scratch, over a preset's default. The file's sha256 "
                                     "is recorded in the run folder")
    # --- method (DivideMix defaults from REFERENCE §2)
    method: str = setting("dividemix", "method", "training method", METHODS)
    warmup: int | str | None = setting(None, "method", "warm-up epochs of plain cross-entropy, or auto: end it when "
                                       "the per-sample loss distribution has separated (default: auto for "
                                       "dividemix; presets use the official fixed value)", bounds="[0, inf)")
    warmup_min_steps: int = setting(WARMUP_MIN_STEPS, "method", "--warmup auto: at least this many optimiser steps "
                                    "per net, or 10 epochs when those come first", bounds="[1, inf)")
    warmup_max_steps: int = setting(WARMUP_MAX_STEPS, "method", "--warmup auto: at most this many optimiser steps "
                                    "per net (and never past two thirds of the epochs)", bounds="[1, inf)")
    lambda_u: float | None = setting(None, "method", "weight of the unlabeled loss (DivideMix; default 25, and 0 "
                                     "under synthetic asymmetric noise, as the official code's asym setting)",
                                     bounds="[0, inf)")
    p_threshold: float = setting(0.5, "method", "clean probability threshold of the division", bounds="[0, 1]")
    alpha: float = setting(4.0, "method", "MixUp Beta(alpha, alpha)", bounds="(0, inf)")
    mix_forward: str = setting("all", "method", "DivideMix MixUp rows forwarded: all 4B (official CIFAR code, "
                               "also at lambda_u 0) or only the 2B labeled ones (official Clothing1M and WebVision "
                               "code: no Lu, the prior penalty on those rows alone)", choices=("all", "labeled"))
    temperature: float = setting(0.5, "method", "sharpening temperature", bounds="(0, inf)")
    loss_history: int = setting(1, "method", "average per-sample losses over this many epochs (5 for 90%% noise)",
                                bounds="[1, inf)")
    neg_entropy: bool | None = setting(None, "method", "confidence penalty in warm-up (default: on for asym noise)")
    rampup_epochs: int = setting(16, "method", "epochs of the linear lambda_u ramp after warm-up", bounds="[0, inf)")
    faithful_order: bool = setting(True, "method", "official train-mode co-guess forwards, one per view "
                                   "(--no-faithful-order batches them)")
    # --- Jo-SRC / hybrid (REFERENCE §3, §4)
    ema_decay: float = setting(0.99, "Jo-SRC & hybrid", "EMA decay of the mean teacher", bounds="[0, 1]")
    tau_clean: float = setting(0.75, "Jo-SRC & hybrid", "Jo-SRC clean threshold at the end of warm-up", bounds="[0, 1]")
    tau_clean_max: float = setting(0.95, "Jo-SRC & hybrid", "clean threshold at the last epoch", bounds="[0, 1]")
    smooth_eps: float = setting(0.6, "Jo-SRC & hybrid", "label smoothing of the JS clean likelihood", bounds="[0, 1]")
    josrc_alpha: float = setting(0.5, "Jo-SRC & hybrid", "weight of the consistency loss in Jo-SRC", bounds="[0, inf)")
    ood_temperature: float = setting(10.0, "Jo-SRC & hybrid", "temperature of the OOD (flattened) targets",
                                     bounds="(0, inf)")
    lambda_cons: float = setting(1.0, "Jo-SRC & hybrid", "weight of the Jo-SRC consistency loss (hybrid)",
                                 bounds="[0, inf)")
    # --- stabilisers (off in faithful presets)
    stab_temperature_decay: bool = setting(False, "stabilisers", "late training: T rises to 1, lambda_u falls to half")
    stab_teacher_cap: float = setting(1.0, "stabilisers", "cap the pseudo-labels' top probability (1.0 = no cap)",
                                      bounds="(0, 1]")
    stab_gmm_running_mean: bool = setting(False, "stabilisers", "smooth the loss GMM across epochs (blends it in)")
    stab_blend_selection: float = setting(0.0, "stabilisers", "weight of the JS likelihood blended with the GMM prob",
                                          bounds="[0, 1]")
    stab_second_warmup: int = setting(0, "stabilisers", "epochs of CE on the selected set halfway through",
                                      bounds="[0, inf)")
    stab_slow_ema: float = setting(0.0, "stabilisers", "EMA decay after warm-up (0 = off)", bounds="[0, 1)")
    stab_strong_aug: bool = setting(False, "stabilisers", "strong augmentation for the trained nets")
    stab_confidence_penalty: float = setting(0.0, "stabilisers", "weight of a confidence penalty", bounds="[0, inf)")
    stab_label_smoothing: float = setting(0.0, "stabilisers", "label smoothing of warm-up CE and Lx", bounds="[0, 1)")
    stab_per_class_threshold: bool = setting(False, "stabilisers", "per-class selection thresholds")
    stab_soft_ood: bool = setting(False, "stabilisers", "soft OOD weight from the two views' disagreement")
    stab_swa_start: int = setting(0, "stabilisers", "epoch SWA averaging starts (0 = off)", bounds="[0, inf)")
    on_collapse: str = setting("warn", "stabilisers", "on a collapse: warn, or rollback (restore best.pt, cut lr "
                               "and pseudo-label weight)", ("warn", "rollback"))
    collapse_drop: float = setting(10.0, "stabilisers", "accuracy points below the best that count as a collapse",
                                   bounds="[0, inf)")
    # --- contrastive (issue #22: SimCLR pretraining as C2D, UNICON's in-training term, kNN scores)
    contrastive_weight: float = setting(0.0, "contrastive", "dividemix/hybrid: add this x NT-Xent on the projections "
                                        "of two strong views of the unlabeled batch at every step (UNICON's "
                                        "lambda_c 0.025; 0 = off, the official methods unchanged)", bounds="[0, inf)")
    contrastive_temperature: float = setting(0.05, "contrastive", "temperature of that NT-Xent (UNICON 0.05)",
                                             bounds="(0, inf)")
    simclr_temperature: float = setting(0.5, "contrastive", "pretraining: NT-Xent temperature (SupContrast's SimCLR "
                                        "run for C2D: 0.5)", bounds="(0, inf)")
    simclr_base_temperature: float = setting(0.07, "contrastive", "pretraining: the loss is scaled by temperature / "
                                             "this, as SupContrast's SupConLoss (0.07 there: x7.1 at T 0.5); "
                                             "equal to the temperature for the plain NT-Xent", bounds="(0, inf)")
    projection_dim: int = setting(128, "contrastive", "output size of the projection heads (pretraining's 2-layer "
                                  "MLP, SupContrast's 128; the contrastive term's Linear+BN, UNICON's 128)",
                                  bounds="[1, inf)")
    knn_k: int = setting(200, "contrastive", "pretraining: neighbours of the weighted kNN monitor (InstDisc's 200)",
                         bounds="[1, inf)")
    knn_temperature: float = setting(0.1, "contrastive", "neighbour weight exp(cosine / this) in the kNN monitor "
                                     "and the kNN label disagreement score", bounds="(0, inf)")
    knn_every: int = setting(5, "contrastive", "pretraining: kNN monitor of the test split every this many epochs "
                             "(and at the last; 0 = the last only)", bounds="[0, inf)")
    knn_disagreement_k: int = setting(10, "contrastive", "kNN label disagreement score: neighbours per sample "
                                      "(SimiFeat's 10)", bounds="[1, inf)")
    # --- optimisation
    epochs: int | None = setting(None, "optimisation", "number of epochs (default: per dataset)", bounds="[1, inf)")
    batch_size: int = setting(64, "optimisation", "batch size per process (DivideMix warm-up uses twice this)",
                              bounds="[1, inf)")
    lr: float = setting(0.02, "optimisation", "learning rate", bounds="(0, inf)")
    optimizer: str = setting("sgd", "optimisation", "sgd (momentum, DivideMix) or adam (official Jo-SRC CIFAR run)",
                             ("sgd", "adam"))
    momentum: float = setting(0.9, "optimisation", "SGD momentum (Adam: beta1)", bounds="[0, 1)")
    nesterov: bool = setting(False, "optimisation", "SGD with Nesterov momentum (official Jo-SRC real-world runs)")
    weight_decay: float = setting(5e-4, "optimisation", "weight decay", bounds="[0, inf)")
    schedule: str = setting("step", "optimisation", "lr schedule: step (/10 at --lr-step), cosine, josrc (the "
                            "official Jo-SRC Adam plan: constant to --lr-step, then linear to 0, beta1 0.1), or "
                            "supcon (SupContrast's: cosine to lr x 0.001 by 1-based epoch, and with a global batch "
                            "above 256 a linear warm-up from 0.01 over the first 10 epochs, per step; what "
                            "`cdmix pretrain` uses)", ("step", "cosine", "josrc", "supcon"))
    lr_step: int | None = setting(None, "optimisation", "step/josrc schedule: the decay starts after this many epochs "
                                  "(default: half the epochs; dividemix: half of those after the warm-up)",
                                  bounds="[0, inf)")
    # --- system
    seed: int = setting(0, "system", "random seed", bounds="[0, 4294967295]")
    device: str = setting("auto", "system", "auto | cpu | cuda | cuda:N")
    amp: bool | None = setting(None, "system", "bf16 autocast (default: on for CUDA, off for CPU)")
    compile: bool = setting(False, "system", "torch.compile the models (falls back to eager when unavailable)")
    sync_bn: bool = setting(False, "system", "under torchrun: synchronise BatchNorm statistics across ranks")
    eval_batch_size: int | None = setting(None, "system", "batch size of the loss and test passes "
                                          "(default 1024 on CUDA, 64 on CPU: measured 2.6x faster there)",
                                          bounds="[1, inf)")
    out: str | None = setting(None, "system", "run folder (default runs/<dataset>-<method>-<time>)")
    overwrite: bool = setting(False, "system", "replace the cdmix run in --out (only the run's own files are "
                              "removed; a folder that is not a cdmix run is never touched)")
    preset: str | None = setting(None, "system", "a published setting (see `cdmix presets`)")
    progress: bool = setting(True, "system", "progress bars (--no-progress: one line per epoch only)")
    top5: bool | None = setting(None, "system", "also report top-5 test accuracy (test_top5 columns; default: on "
                                "for webvision; needs more than 5 classes)")

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
FIELDS = {f.name: f for f in fields(Config)}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        with path.open("rb") as fh:
            values = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"config file {path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not UTF-8 text; save it as UTF-8") from None
    except OSError as exc:
        raise UserError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    for name, value in values.items():
        problem = type_error(name, value) if name in FIELD_TYPES else None
        if problem:
            raise UserError(f"config file {path}: {name} {problem}")
    return values


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


def build_config(preset: str | None = None, config_file: str | None = None, *, defaults: dict[str, Any] | None = None,
                 **overrides: Any) -> Config:
    """Merge defaults < preset < config file < overrides (``None`` overrides are ignored) and validate.
    ``defaults``: settings under the preset (``cdmix pretrain``'s SupContrast values)."""
    values: dict[str, Any] = dict(defaults or {})
    file_values = load_toml(config_file) if config_file else {}
    preset = overrides.get("preset") or preset or file_values.get("preset")
    if preset:
        values.update(load_preset(preset))
        values["preset"] = preset
    values.update(file_values)
    values.update({k: v for k, v in overrides.items() if v is not None})
    if values.get("pretrained") == "none":  # from scratch, over a preset's default weights
        values["pretrained"] = None
    config = Config.from_dict(values)
    validate(config)
    return config


def validate(config: Config) -> None:
    """Raise ``UserError`` for the first setting of the wrong type, outside its ``choices`` or its
    ``bounds`` (NaN and infinity included), or inconsistent with another; done before any data loads."""
    for f in fields(Config):
        choices = f.metadata.get("choices")
        value = getattr(config, f.name)
        what = f.name.replace("_", " ")
        problem = type_error(f.name, value) or bounds_error(f.name, value)
        if problem:
            raise UserError(f"{what} ({flag(f.name)}) {problem}")
        if choices and value is not None and value not in choices:
            raise UserError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")
    if isinstance(config.warmup, str) and config.warmup != "auto" or (
            isinstance(config.warmup, int) and config.warmup < 0):
        raise UserError(f"--warmup must be a number of epochs (0 or more) or auto, got {config.warmup!r}")
    if config.warmup == "auto" and config.method not in AUTO_WARMUP_METHODS:
        raise UserError(f"--warmup auto is for {', '.join(AUTO_WARMUP_METHODS)}; give --method "
                        f"{config.method} a number of warm-up epochs")
    if not 1 <= config.warmup_min_steps <= config.warmup_max_steps:
        raise UserError("--warmup-min-steps must be at least 1 and at most --warmup-max-steps")
    if config.method in PRETRAINING_METHODS and config.val_fraction > 0:
        raise UserError(f"pretraining (--method {config.method}) uses every training image and no labels to select "
                        f"by: --val-fraction must be 0, got {config.val_fraction}")
    if config.open_set_classes and config.open_set_rate:
        raise UserError("--open-set-classes and --open-set-rate are two different open-set settings; use one")
    if config.nesterov and (config.optimizer != "sgd" or config.momentum == 0):
        raise UserError("--nesterov needs --optimizer sgd with a --momentum above 0")
    if config.epoch_subset_batches and config.method != "dividemix":
        raise UserError(f"--epoch-subset-batches is DivideMix's Clothing1M protocol; --method {config.method} "
                        f"trains on the whole set (use 0)")
    if config.epoch_subset_batches and config.loss_history > 1:
        raise UserError("--loss-history averages each sample's loss over epochs, but with --epoch-subset-batches "
                        "every epoch divides another subset; use --loss-history 1")
    if config.device not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", config.device):
        raise UserError(f"unknown device {config.device!r}; use auto, cpu, cuda or cuda:N")
    if config.model is not None:
        from cdmix.models import model_names

        if config.model not in model_names():
            raise UserError(f"unknown model {config.model!r}; choose one of {', '.join(model_names())}")


DEMO_NOISE = ("sym", 0.4)  # the built-in digits demo's synthetic noise


def noise_setting(config: Config) -> tuple[str, float] | None:
    """The synthetic noise a run adds: ``(mode, rate)``, or None for the labels as given.

    Only when asked for (``noise_rate``, ``noise_mode`` or ``noise_file`` set, e.g. by a preset), or
    on ``digits`` (the built-in demo: 40% symmetric). Asked for without a mode: sym; without a rate:
    0.4 (a noise file that exists is read, whatever the rate). Rate 0 means none.
    """
    if config.noise_rate is None and config.noise_mode is None and config.noise_file is None:
        return DEMO_NOISE if config.dataset == "digits" else None
    rate = DEMO_NOISE[1] if config.noise_rate is None else float(config.noise_rate)
    mode = config.noise_mode or DEMO_NOISE[0]
    return (mode, rate) if rate > 0 or config.noise_file else None


def after_warmup_midpoint(warmup: int, epochs: int) -> int:
    """The 0-based epoch halfway through the epochs after a warm-up of ``warmup`` epochs: where
    DivideMix's step schedule drops the lr when ``--lr-step`` is not given, and where the hybrid's
    second warm-up starts. The one place this rule is written (``config.resolve``,
    ``engine.schedule`` and ``methods.hybrid`` use it)."""
    return warmup + (epochs - warmup) // 2


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
    if warmup is None and config.method in PRETRAINING_METHODS:
        warmup = 0  # no cross-entropy warm-up in pretraining (the lr warm-up is the schedule's)
    if warmup is None:
        warmup = "auto" if config.method in AUTO_WARMUP_METHODS else (3 if small else (30 if cifar100_like else 10))
    epochs = config.epochs
    if epochs is None:
        epochs = DIGITS_EPOCHS if small else 300
    if config.method not in NO_WARMUP_METHODS:  # a warm-up must leave epochs for the method itself
        if warmup == "auto" and epochs < 2:
            raise UserError(f"--epochs {epochs} leaves no {config.method} epoch after even one warm-up epoch; "
                            f"give at least 2 epochs")
        if warmup != "auto" and warmup >= epochs:
            raise UserError(f"--warmup {warmup} with --epochs {epochs} leaves no {config.method} epoch after the "
                            f"warm-up; use --warmup auto, fewer warm-up epochs or more --epochs")
    lr_step = config.lr_step
    if lr_step is None:
        # DivideMix: halfway through the epochs after the warm-up (with --warmup auto the engine places
        # it once the warm-up has ended and records it then); other methods: halfway through.
        if config.method == "dividemix" and config.schedule != "josrc":
            lr_step = None if warmup == "auto" else after_warmup_midpoint(warmup, epochs)
        else:
            lr_step = epochs // 2
    if config.schedule == "josrc" and not 0 <= lr_step < epochs:
        raise UserError(f"--schedule josrc decays from --lr-step {lr_step}, which must be below --epochs {epochs}")
    pretrained, encoder = config.pretrained, None
    from cdmix.models.weights import named_model, timm_name

    if timm_name(pretrained):  # timm's own loader fills timm's model when the nets are built
        if config.model not in (None, named_model(pretrained)):
            raise UserError(f"--pretrained {pretrained} is timm's weights for --model {named_model(pretrained)}, "
                            f"not --model {config.model}; leave out --model or give a weights file")
    elif pretrained:
        from cdmix.models.encoder import find_encoder

        # torchvision:NAME -> the cached official file (downloaded now, once); a `cdmix pretrain` folder -> its
        # encoder file
        pretrained, encoder = find_encoder(pretrained)
        pretrained = str(pretrained)
    model = (config.model or (encoder or {}).get("model") or named_model(config.pretrained)
             or default_model(config.dataset, image_size))
    width = config.width
    if encoder is not None:
        width = encoder.get("width") if width is None else width
        if (model, width) != (encoder.get("model"), encoder.get("width")):
            raise UserError(f"the encoder {pretrained} was pretrained as --model {encoder.get('model')} --width "
                            f"{encoder.get('width') or 'default'}, not --model {model} --width {width or 'default'}; "
                            f"leave out --model and --width (they follow the encoder) or pretrain another one")
    noise = noise_setting(config)
    noise_mode, noise_rate = noise if noise else (None, 0.0)
    neg_entropy = config.neg_entropy
    if neg_entropy is None:
        # Official: the penalty is on whenever the noise mode is asym, also for a noise file.
        neg_entropy = noise_mode == "asym"
    lambda_u = config.lambda_u
    if lambda_u is None:
        # Official: 0 for asymmetric noise (the unlabeled loss on the co-guesses of a class's flipped
        # members cost digits asym 40% 10-16 points, docs/RESULTS.md), 25 otherwise.
        lambda_u = 0.0 if noise_mode == "asym" else LAMBDA_U
    return config.replace(
        device=device,
        normalization=normalization_for(config),
        crop_size=crop_size_for(config, image_size),
        warmup=warmup,
        epochs=epochs,
        model=model,
        width=width,
        pretrained=pretrained,
        neg_entropy=neg_entropy,
        lambda_u=lambda_u,
        noise_mode=noise_mode,
        noise_rate=noise_rate,
        amp=device.startswith("cuda") if config.amp is None else config.amp,
        lr_step=lr_step,
        image_size=_used_image_size(config, image_size),
        eval_batch_size=config.eval_batch_size or (1024 if device.startswith("cuda") else 64),
        top5=(config.dataset == "webvision" if config.top5 is None else config.top5) and num_classes > 5,
    )


def normalization_for(config: Config) -> str:
    """The normalisation a run uses: as set, else the encoder's with a cdmix encoder (``cdmix pretrain``;
    its encoder.json), ImageNet's with other --pretrained weights, else the dataset's."""
    if config.normalization:
        return config.normalization
    if not config.pretrained:
        return "dataset"
    from cdmix.models.weights import is_weights_name

    if is_weights_name(config.pretrained):  # torchvision:/timm: ImageNet weights
        return "imagenet"
    from cdmix.models.encoder import find_encoder

    return "imagenet" if find_encoder(config.pretrained)[1] is None else "encoder"


def crop_size_for(config: Config, image_size: int) -> int:
    """The training crop: as set, else the image size up to 64 px (CIFAR-style padded crop), else
    round(0.875 x size) (224 of 256, ImageNet-style)."""
    if config.crop_size is not None:
        if config.crop_size > image_size:
            raise UserError(f"--crop-size {config.crop_size} is larger than the {image_size}px images; "
                            f"use at most {image_size}")
        return config.crop_size
    return image_size if image_size <= 64 else round(0.875 * image_size)


def _used_image_size(config: Config, image_size: int) -> int:
    """The image size the data has (what config.json records); warns when --image-size was not applied."""
    if config.image_size is not None and config.image_size != image_size:
        import logging

        logging.getLogger("cdmix").warning(f"--image-size {config.image_size} does not apply to {config.dataset} "
                                           f"(only folder and csv images are resized); its images are {image_size}px")
    return image_size


def save_json(config: Config, path: str | Path) -> None:
    from cdmix.atomic import atomic_write

    atomic_write(Path(path), json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")


def load_json(path: str | Path) -> Config:
    path = Path(path)
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read run config {path}: {exc}") from None
    if not isinstance(values, dict):
        raise UserError(f"run config {path} is not a JSON object; the file is damaged")
    config = Config.from_dict(values, source=str(path))
    try:
        validate(config)
    except UserError as exc:
        raise UserError(f"run config {path}: {exc}") from None
    return config
