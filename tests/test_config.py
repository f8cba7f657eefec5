import json

import pytest

from cdmix.config import Config, build_config, load_json, preset_info, preset_names, resolve, save_json
from cdmix.errors import UserError


def test_flags_override_config_file_override_preset(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('preset = "dividemix-cifar10-sym50"\nlambda_u = 7.0\np_threshold = 0.7\n')
    config = build_config(config_file=str(toml), p_threshold=0.9, alpha=None)
    assert config.preset == "dividemix-cifar10-sym50"
    assert config.dataset == "cifar10"  # from the preset
    assert config.lambda_u == 7.0  # file beats preset (preset says 25)
    assert config.p_threshold == 0.9  # flag beats file
    assert config.alpha == 4.0  # None override leaves the value alone


@pytest.mark.parametrize("bad, message", [
    ({"noise_rate": 1.5}, "noise rate"),
    ({"noise_rate": -0.1}, "noise rate"),
    ({"dataset": "mnist"}, "unknown dataset"),
    ({"method": "coteaching"}, "unknown method"),
    ({"noise_mode": "weird"}, "unknown noise mode"),
    ({"device": "tpu"}, "unknown device"),
    ({"preset": "nope"}, "unknown preset"),
])
def test_bad_settings_raise_user_error(bad, message):
    with pytest.raises(UserError, match=message):
        build_config(**bad)


def test_unknown_key_in_config_file(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("lamda_u = 3\n")
    with pytest.raises(UserError, match="lamda_u"):
        build_config(config_file=str(toml))


def test_every_preset_loads_and_has_published_accuracy():
    names = preset_names()
    expected = {"dividemix-cifar10-sym20", "dividemix-cifar10-sym50", "dividemix-cifar10-sym80",
                "dividemix-cifar10-sym90", "dividemix-cifar10-asym40", "dividemix-cifar100-sym20",
                "dividemix-cifar100-sym50", "dividemix-cifar100-sym80", "dividemix-cifar100-sym90",
                "dividemix-cifar10n-worst", "dividemix-cifar10n-aggre", "dividemix-cifar10n-random1",
                "dividemix-cifar100n"}
    assert expected <= set(names)
    for name in names:
        config = build_config(preset=name)
        assert config.preset == name
        assert preset_info(name)["info"]["published"]


def test_published_per_setting_values():
    assert build_config(preset="dividemix-cifar10-sym90").p_threshold == 0.6
    assert build_config(preset="dividemix-cifar10-sym90").loss_history == 5
    assert build_config(preset="dividemix-cifar10-sym90").lambda_u == 50
    assert build_config(preset="dividemix-cifar10-sym20").lambda_u == 0
    assert build_config(preset="dividemix-cifar10-asym40").lambda_u == 0
    assert build_config(preset="dividemix-cifar100-sym50").lambda_u == 150
    assert build_config(preset="dividemix-cifar100-sym50").warmup == 30


def test_resolve_fills_auto_fields_and_round_trips(tmp_path):
    config = resolve(Config(), num_classes=10, image_size=8)
    assert config.device == "cpu" and config.amp is False
    assert config.model == "small_cnn" and config.warmup is not None and config.epochs is not None
    assert config.neg_entropy is False
    assert resolve(Config(noise_mode="asym"), 10, 32).neg_entropy is True
    # The unlabeled loss: 25, but 0 under asymmetric noise (official); an explicit value always wins.
    assert config.lambda_u == 25.0 and resolve(Config(noise_mode="sym", noise_rate=0.6), 10, 8).lambda_u == 25.0
    assert resolve(Config(noise_mode="asym", noise_rate=0.4), 10, 8).lambda_u == 0.0
    assert resolve(Config(noise_mode="asym", noise_rate=0.4, lambda_u=5.0), 10, 8).lambda_u == 5.0
    save_json(config, tmp_path / "config.json")
    assert load_json(tmp_path / "config.json") == config
    assert json.loads((tmp_path / "config.json").read_text())["model"] == "small_cnn"


def test_every_field_carries_its_flag_help_and_group():
    from dataclasses import fields

    from cdmix.config import GROUPS

    for f in fields(Config):
        assert f.metadata["group"] in GROUPS, f.name
        assert f.metadata["help"].strip(), f.name


def test_enumerated_settings_are_checked_from_their_choices():
    with pytest.raises(UserError, match="unknown optimizer 'lbfgs'; choose one of sgd, adam"):
        build_config(optimizer="lbfgs")
    with pytest.raises(UserError, match="unknown schedule"):
        build_config(schedule="linear")


def test_user_error_is_a_value_error():
    with pytest.raises(ValueError):
        build_config(noise_rate=2.0)


def test_faithful_presets_run_in_fp32_and_others_default_to_bf16_on_cuda():
    for name in preset_names():
        if name.startswith(("dividemix-", "josrc-")):
            # at the preset's own image size (the real-world ones crop 224 of 256); "none": resolve() would fetch
            # the real-world presets' torchvision weights
            config = build_config(preset=name, pretrained="none")
            resolved = resolve(config, num_classes=10, image_size=config.image_size or 32)
            assert resolved.amp is False, name
    assert build_config(preset="dividemix-cifar10-sym50", amp=True).amp is True  # --amp still turns it on
    assert Config().amp is None  # auto: resolve() picks bf16 on CUDA only


def test_negative_entropy_penalty_follows_the_asym_mode_also_with_a_noise_file(tmp_path):
    noise_file = str(tmp_path / "0.4_asym.json")
    assert resolve(Config(noise_mode="asym", noise_file=noise_file), 10, 32).neg_entropy is True
    assert resolve(Config(noise_mode="sym", noise_file=noise_file), 10, 32).neg_entropy is False


# Every numeric value #15 names, plus the neighbours of each bound (#15 extras marked "extra").
NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("name, value", [
    ("lr", -0.1), ("lr", 0.0), ("lr", NAN), ("lr", INF), ("lr", -INF),
    ("alpha", 0.0), ("alpha", -1.0), ("temperature", 0.0), ("seed", -1), ("warmup", -1),
    ("p_threshold", -0.01), ("p_threshold", 1.01), ("p_threshold", NAN), ("eval_batch_size", 0),
    ("lambda_u", NAN), ("lambda_u", -1.0), ("lambda_u", INF),
    # extra
    ("batch_size", 0), ("epochs", 0), ("momentum", 1.0), ("weight_decay", -1e-4), ("ema_decay", 1.5),
    ("tau_clean", NAN), ("ood_temperature", 0.0), ("seed", 2**32), ("loss_history", 0), ("width", 0),
    ("image_size", 0), ("val_fraction", 0.95), ("noise_rate", NAN), ("collapse_drop", -1.0),
    ("stab_label_smoothing", 1.0), ("rampup_epochs", -1), ("lr_step", -1), ("open_set_rate", 1.0),
])
def test_numbers_outside_their_domain_are_refused(name, value):
    flag = "--" + name.replace("_", "-")
    with pytest.raises(UserError, match=f"\\({flag}\\) must be"):
        build_config(**{name: value})


def test_every_numeric_setting_has_bounds():
    from dataclasses import fields

    numeric = [f.name for f in fields(Config) if "int" in str(f.type) or "float" in str(f.type)]
    assert numeric and all(f.metadata["bounds"] for f in fields(Config) if f.name in numeric)


@pytest.mark.parametrize("text, message", [
    ('lr = "fast"\n', "lr must be a number, got 'fast'"),
    ("epochs = 2.5\n", "epochs must be a whole number"),
    ('download = "yes"\n', "download must be true or false"),
    ("dataset = 3\n", "dataset must be text"),
    ("seed = true\n", "seed must be a whole number"),
    ("[lr]\nvalue = 1\n", "lr must be a number"),
])
def test_wrongly_typed_values_in_a_config_file(tmp_path, text, message):
    toml = tmp_path / "c.toml"
    toml.write_text(text)
    with pytest.raises(UserError, match=f"config file {toml}: {message}"):
        build_config(config_file=str(toml))


def test_a_config_file_that_is_not_utf8(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_bytes(b'dataset = "caf\xe9"\n')
    with pytest.raises(UserError, match="not UTF-8"):
        build_config(config_file=str(toml))


def test_config_records_the_image_size_used(caplog):
    config = resolve(Config(dataset="digits", image_size=32), num_classes=10, image_size=8)
    assert config.image_size == 8
    assert "--image-size 32 does not apply to digits" in caplog.text


def test_hand_edited_run_config_is_validated(tmp_path):
    path = tmp_path / "config.json"
    save_json(Config(), path)
    values = json.loads(path.read_text())
    values["lambda_u"] = "NaN"
    path.write_text(json.dumps(values))
    with pytest.raises(UserError, match="config.json: lambda u"):
        load_json(path)
    path.write_text("[1, 2]")
    with pytest.raises(UserError, match="not a JSON object"):
        load_json(path)


def test_synthetic_noise_only_when_asked_for():
    from cdmix.config import noise_setting

    assert noise_setting(Config()) == ("sym", 0.4)  # the built-in digits demo
    for dataset in ("folder", "csv", "npz", "arrays", "cifar10"):
        assert noise_setting(Config(dataset=dataset)) is None, dataset
        assert resolve(Config(dataset=dataset), 10, 32).noise_rate == 0.0
    assert noise_setting(Config(dataset="folder", noise_rate=0.2)) == ("sym", 0.2)
    assert noise_setting(Config(dataset="folder", noise_mode="asym")) == ("asym", 0.4)
    assert noise_setting(Config(dataset="digits", noise_rate=0.0)) is None
    assert noise_setting(build_config(preset="dividemix-cifar10-asym40")) == ("asym", 0.4)
    # a resolved config says what ran, and resolves to the same again (resume)
    ran = resolve(Config(dataset="folder"), 10, 32)
    assert noise_setting(ran) is None and resolve(ran, 10, 32).noise_rate == 0.0


def test_warmup_auto_default_and_no_epochs_left_is_an_error():
    assert resolve(Config(), 10, 8).warmup == "auto"
    assert resolve(Config(method="hybrid"), 10, 8).warmup == 3
    assert build_config(warmup="auto").warmup == "auto"
    with pytest.raises(UserError, match="leaves no dividemix epoch"):
        resolve(Config(epochs=10, warmup=10), 10, 32)
    with pytest.raises(UserError, match="at least 2 epochs"):
        resolve(Config(epochs=1), 10, 32)
    with pytest.raises(UserError, match="auto is for"):
        build_config(method="josrc", warmup="auto")
    with pytest.raises(UserError, match="--warmup must be"):
        build_config(warmup="soon")
    assert resolve(Config(method="standard", epochs=3, warmup=10), 10, 32).epochs == 3  # CE has no warm-up
