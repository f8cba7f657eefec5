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
            resolved = resolve(build_config(preset=name), num_classes=10, image_size=32)
            assert resolved.amp is False, name
    assert build_config(preset="dividemix-cifar10-sym50", amp=True).amp is True  # --amp still turns it on
    assert Config().amp is None  # auto: resolve() picks bf16 on CUDA only


def test_negative_entropy_penalty_follows_the_asym_mode_also_with_a_noise_file(tmp_path):
    noise_file = str(tmp_path / "0.4_asym.json")
    assert resolve(Config(noise_mode="asym", noise_file=noise_file), 10, 32).neg_entropy is True
    assert resolve(Config(noise_mode="sym", noise_file=noise_file), 10, 32).neg_entropy is False
