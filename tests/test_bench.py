"""The speed benchmark (benchmarks/bench.py, `cdmix bench`), its measuring tools, the official-style
reference pipeline, and faithful vs --fast DivideMix forwards."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cdmix import cli
from cdmix.data.batches import DeviceImages
from cdmix.models import create_model
from cdmix.selection import minmax_normalise

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))  # the benchmark is part of the checkout, not of the package

import bench  # noqa: E402
from bench import main  # noqa: E402
from measure import count_flops  # noqa: E402

ref = bench.load_reference()
needs_reference = pytest.mark.skipif(ref is None, reason="benchmarks/reference_pipeline.py not in this checkout")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
BASE = ["--images", "96", "--width", "2", "--batch-size", "16", "--workers", "0", "--eval-batch-size", "64",
        "--threads", "1"]
TINY = BASE + ["--steps", "2"]
ROWS = ("| warm-up epoch |", "| divide |", "| train net1 |", "| train net2 |", "| test |",
        "| DivideMix epoch (divide + train + test) |", "epoch / pure model compute", "data path images/s",
        "peak memory", "estimated achieved TFLOP/s", "dataset images/s")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one torch thread is faster and immune to a busy machine's scheduling stalls."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _tiny_method(faithful: bool = True, device: str = "cpu", images: int = 64, width: int = 2):
    opts = bench.BenchOptions(images=images, width=width, batch_size=16, device=device, fast=not faithful,
                              eval_batch_size=64)
    data = bench.build_data(opts)
    return bench.build_trainer(opts, data, run_dir=None).method


# ------------------------------------------------------------------------------------------------
# the command
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_bench_runs_end_to_end_and_prints_the_table(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(BASE + ["--out", str(out)]) == 0
    text = capsys.readouterr().out
    for row in ROWS:
        assert row in text, row
    result = json.loads(out.read_text())
    phases = {r["phase"]: r for r in result["phases"]}
    assert set(phases) == set(bench.PHASES)
    for name in bench.PHASES:
        assert phases[name]["cdmix_s"] > 0 and phases[name]["compute_s"] > 0
    assert phases["warm-up epoch"]["grad_steps"] == 6  # 2 nets x 96 / 32
    labeled = result["labeled"]
    for net in ("train net1", "train net2"):
        assert phases[net]["grad_steps"] == -(-labeled[net] // 16), net
    assert phases["divide"]["grad_steps"] == 0 and phases["divide"]["images"] == 2 * 96
    if ref is not None:  # same labeled sets, so the same steps
        for name in bench.PHASES:
            assert phases[name]["reference_s"] > 0
            assert phases[name]["reference_steps"] == phases[name]["grad_steps"], name
        assert result["data_path"]["reference_images_per_s"] > 0
    assert result["data_path"]["cdmix_images_per_s"] > 0
    assert result["memory"]["cdmix"]["max_rss_mib"] > 0


def test_steps_cap_every_training_phase_run_through_cdmix_bench(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # `cdmix bench` runs ./benchmarks/bench.py
    out = tmp_path / "steps.json"
    assert cli.main(["bench"] + TINY + ["--no-reference", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["options"]["command"].startswith("cdmix bench --images 96")
    phases = {r["phase"]: r for r in json.loads(out.read_text())["phases"]}
    assert phases["warm-up epoch"]["grad_steps"] == 4  # 2 nets x 2 steps
    assert phases["train net1"]["grad_steps"] == 2 and phases["train net2"]["grad_steps"] == 2


def test_bench_markdown_out_and_fast_without_reference(tmp_path, capsys):
    out = tmp_path / "table.md"
    assert main(TINY + ["--fast", "--no-reference", "--out", str(out)]) == 0
    text = out.read_text()
    assert "cdmix: fast (batched" in text and "reference skipped" in text
    assert "| train net1 |" in text


def test_bench_says_when_the_reference_is_missing(monkeypatch, capsys):
    monkeypatch.setattr(bench, "REFERENCE_FILE", bench.Path("no") / "such_file.py")
    monkeypatch.delitem(__import__("sys").modules, "cdmix_bench_reference_pipeline", raising=False)
    assert main(TINY + ["--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "reference not found (run from a source checkout)" in out


def test_compile_failure_falls_back_to_eager(monkeypatch, tmp_path, caplog):
    class Broken(torch.nn.Module):  # what a lazily failing torch.compile looks like at the first call
        def __init__(self, net):
            super().__init__()
            self._orig_mod = net

        def forward(self, x):
            raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", lambda net, *a, **k: Broken(net))
    out = tmp_path / "compile.json"
    assert main(TINY + ["--compile", "--no-reference", "--out", str(out)]) == 0
    assert "--compile could not be used (RuntimeError: no C++ compiler); running eagerly" in caplog.text
    assert json.loads(out.read_text())["compile"] == "eager (compile failed)"


def test_recorder_counts_a_wrapped_call_once():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    wrapper = Wrapper(net)
    recorder = bench.CallRecorder([net], [wrapper])
    x = torch.randn(4, 3, 2, 2)
    wrapper(x)
    with torch.no_grad():
        net(x[:2])
    recorder.remove()
    assert [(c.shape[0], c.wrapped, c.grad) for c in recorder.calls] == [(4, True, True), (2, False, False)]


@pytest.mark.parametrize("flags, message", [
    (["--images", "2"], "--images"),
    (["--steps", "0"], "--steps"),
    (["--source", "subset", "--classes", "100"], "CIFAR-10"),
    (["--source", "subset", "--subset-path", "/no/such.npz"], "does not exist"),
    (["--model", "nope"], "unknown model"),
])
def test_bench_bad_input_is_a_user_error(flags, message, capsys):
    assert main(["--no-reference"] + flags) == 2
    assert message in capsys.readouterr().err


def test_subset_source_is_tiled(shared_data):
    opts = bench.BenchOptions(source="subset", images=6000, subset_path=str(
        shared_data / "cifar10-subset" / "cifar10_subset.npz"))
    data = bench.build_data(opts)
    assert data.train_images.shape == (6000, 32, 32, 3) and data.test_images.shape[0] == 1017
    np.testing.assert_array_equal(data.train_images[5551:], data.train_images[:6000 - 5551])
    assert 0.4 < float((data.noisy_labels != data.true_labels).mean()) < 0.5  # 50% sym over 10 classes


def test_cdmix_bench_outside_a_checkout_says_where_to_run_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CDMIX_BENCHMARKS", raising=False)
    assert cli.main(["bench", "--width", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "python benchmarks/bench.py" in err
    monkeypatch.setenv("CDMIX_BENCHMARKS", str(REPO / "benchmarks"))  # or point at the folder
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "--help"])
    assert exit_.value.code == 0
    assert "usage: cdmix bench" in capsys.readouterr().out


def test_cli_parser_imports_nothing_heavy():
    """`cdmix --help`, `cdmix presets`, `cdmix train --help` stay fast: building the parser imports no torch,
    numpy or matplotlib (the commands import what they run)."""
    code = ("import sys, cdmix.cli; cdmix.cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'numpy', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------------------------------------
# FLOPs (torch.utils.flop_counter: 2 x multiply-accumulates of convolutions and matrix products)
# ------------------------------------------------------------------------------------------------


def test_count_flops_hand_computed():
    model = nn.Sequential(
        nn.Conv2d(2, 4, kernel_size=3, padding=1),  # 4x5x5 out, 2*3*3 MACs each
        nn.ReLU(),
        nn.Conv2d(4, 4, kernel_size=1, stride=2),  # 4x3x3 out, 4 MACs each
        nn.Flatten(),
        nn.Linear(36, 7),
    )
    macs = (4 * 5 * 5) * (2 * 3 * 3) + (4 * 3 * 3) * 4 + 36 * 7
    assert count_flops(model, (2, 5, 5)) == 2 * macs
    # A leading batch size is ignored: the count is per example.
    assert count_flops(model, (16, 2, 5, 5)) == 2 * macs


def test_count_flops_grouped_conv_matmul_and_mode_restored():
    model = nn.Sequential(nn.Conv2d(4, 8, kernel_size=3, padding=1, groups=2), nn.BatchNorm2d(8)).train()
    assert count_flops(model, (4, 6, 6)) == 2 * (8 * 6 * 6) * (2 * 3 * 3)
    assert model.training
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())

    class Gram(nn.Module):  # a bare matmul counts too (the hook counter saw only Conv2d / Linear)
        def forward(self, x):
            return x.flatten(1) @ x.flatten(1).T

    assert count_flops(Gram(), (1, 2, 3)) == 2 * 6
    with pytest.raises(ValueError):
        count_flops(model, (6, 6))


def test_count_flops_preact_resnet18():
    flops = count_flops(create_model("preact_resnet18", 10), (3, 32, 32))
    assert abs(flops - 2 * 0.557e9) / (2 * 0.557e9) < 0.05


# ------------------------------------------------------------------------------------------------
# reference augmentation == cdmix augmentation
# ------------------------------------------------------------------------------------------------


def _decode(out: torch.Tensor, pad: int) -> tuple[int, int, bool]:
    """(top, left, flip) of a crop of the position-coded image (R = row + 1, G = col + 1)."""
    pixels = np.rint((out.numpy() * np.array(STD)[:, None, None] + np.array(MEAN)[:, None, None]) * 255)
    r, g = pixels[0], pixels[1]
    top = int(r[16, 16]) - 17 + pad
    flip = g[16, 15] > g[16, 16]
    # output column x shows padded column left + x (no flip) or left + 31 - x (flip); G = column - pad + 1
    left = int(g[16, 16]) - 17 + pad if not flip else int(g[16, 16]) - 16 + pad
    return top, left, bool(flip)


def _position_image() -> np.ndarray:
    img = np.zeros((32, 32, 3), dtype=np.uint8)
    img[..., 0] = np.arange(1, 33)[:, None]
    img[..., 1] = np.arange(1, 33)[None, :]
    img[..., 2] = 7
    return img


@needs_reference
def test_reference_normalisation_and_forced_crop_equal_cdmix():
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    images = DeviceImages(raw, MEAN, STD, "cpu")
    plain = images.batch(torch.arange(8), augment=False)
    for i in range(8):
        # normalisation: ToTensor + Normalize per sample vs cdmix's batched scale/shift
        torch.testing.assert_close(ref.TestTransform(MEAN, STD)(raw[i]), plain[i], atol=1e-5, rtol=0)
        # crop offset "no shift" (= pad) and no flip / flip: identical pixels
        torch.testing.assert_close(ref.crop_flip_normalise(raw[i], 4, 4, False, 4, MEAN, STD), plain[i],
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(ref.crop_flip_normalise(raw[i], 4, 4, True, 4, MEAN, STD), plain[i].flip(-1),
                                   atol=1e-5, rtol=0)


@needs_reference
def test_reference_and_cdmix_crops_have_the_same_distribution():
    n, pad = 3000, 4
    img = _position_image()
    images = DeviceImages(np.repeat(img[None], n, axis=0), MEAN, STD, "cpu")
    cd_out = images.batch(torch.arange(n), augment=True, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    transform = ref.TrainTransform(MEAN, STD)
    ref_out = torch.stack([transform(img) for _ in range(n)])
    counts = {}
    for name, outs in (("cdmix", cd_out), ("reference", ref_out)):
        draws = [_decode(o, pad) for o in outs]
        for k, (top, left, flip) in enumerate(draws[:40]):
            # every output is exactly one crop of the grid, reproduced pixel for pixel
            torch.testing.assert_close(ref.crop_flip_normalise(img, top, left, flip, pad, MEAN, STD), outs[k],
                                       atol=1e-5, rtol=0)
        tops = np.bincount([d[0] for d in draws], minlength=2 * pad + 1)
        lefts = np.bincount([d[1] for d in draws], minlength=2 * pad + 1)
        flips = np.mean([d[2] for d in draws])
        assert len(tops) == len(lefts) == 2 * pad + 1, name
        expected = n / (2 * pad + 1)
        assert np.all(np.abs(tops - expected) < 5 * np.sqrt(expected)), (name, tops)
        assert np.all(np.abs(lefts - expected) < 5 * np.sqrt(expected)), (name, lefts)
        assert abs(flips - 0.5) < 0.05, (name, flips)
        counts[name] = (tops, lefts)


@needs_reference
def test_reference_eval_losses_equal_cdmix_per_sample_losses():
    method = _tiny_method(images=80)
    net = method.nets[0]
    losses = method.per_sample_losses(net).numpy()
    raw = method.train.images.images.permute(0, 2, 3, 1).numpy()
    labels = method.train.labels.numpy()
    with __import__("tempfile").TemporaryDirectory() as tmp:
        store = ref.PickleStore(tmp, raw, labels, raw[:10], labels[:10])
        model = ref.ReferenceDivideMix(store, 10, lambda: copy.deepcopy(net), "cpu", batch_size=16, num_workers=0)
        history: list = []
        model.eval_train(model.net1, history, model.loader.run("eval_train"))
        model.close()
    np.testing.assert_allclose(history[0].numpy(), minmax_normalise(losses), atol=1e-5)


# ------------------------------------------------------------------------------------------------
# faithful vs --fast: equal where they are meant to agree
# ------------------------------------------------------------------------------------------------


def _views(method, n=16, seed=1):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.arange(n)
    images = method.train.images
    return [images.batch(idx, augment=True, generator=gen) for _ in range(2)]


def test_eval_mode_partner_forwards_batched_equal_separate():
    method = _tiny_method()
    partner = method.nets[1].eval()
    u1, u2 = _views(method)
    with torch.no_grad():
        both = partner(torch.cat([u1, u2])).chunk(2)
        separate = partner(u1), partner(u2)
    for a, b in zip(both, separate):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _guess_and_refine(method, net_mode: str):
    net, partner = copy.deepcopy(method.nets[0]), copy.deepcopy(method.nets[1])
    net.train(net_mode == "train")
    partner.eval()
    u1, u2 = _views(method, seed=1)
    x1, x2 = _views(method, seed=2)
    onehot = torch.nn.functional.one_hot(method.train.labels[:16], 10).float()
    w = torch.linspace(0, 1, 16).view(-1, 1)
    with torch.no_grad():
        return method.guess_unlabeled(net, partner, u1, u2), method.refine_labeled(net, x1, x2, onehot, w), net


def test_fast_path_equals_faithful_when_the_net_is_in_eval_mode():
    faithful, fast = _tiny_method(faithful=True), _tiny_method(faithful=False)
    fast.nets[0].load_state_dict(faithful.nets[0].state_dict())
    fast.nets[1].load_state_dict(faithful.nets[1].state_dict())
    gu_a, rx_a, _ = _guess_and_refine(faithful, "eval")
    gu_b, rx_b, _ = _guess_and_refine(fast, "eval")
    torch.testing.assert_close(gu_a, gu_b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rx_a, rx_b, atol=1e-5, rtol=1e-5)


def test_fast_path_differs_in_train_mode_bn_statistics():
    """Documented difference: the net being trained runs its no-grad forwards in train mode (official),
    so BN normalises with the statistics of the batch it sees -- one view (faithful) or both views
    at once (--fast) -- and the running statistics are updated once per view or once per pair."""
    faithful, fast = _tiny_method(faithful=True), _tiny_method(faithful=False)
    fast.nets[0].load_state_dict(faithful.nets[0].state_dict())
    fast.nets[1].load_state_dict(faithful.nets[1].state_dict())
    gu_a, rx_a, net_a = _guess_and_refine(faithful, "train")
    gu_b, rx_b, net_b = _guess_and_refine(fast, "train")
    assert (gu_a - gu_b).abs().max() > 1e-6 or (rx_a - rx_b).abs().max() > 1e-6
    assert not torch.equal(net_a.bn1.running_mean, net_b.bn1.running_mean)


def test_loss_pass_does_not_depend_on_the_eval_batch_size():
    method = _tiny_method(images=80)
    a = method.per_sample_losses(method.nets[0])
    method.config = method.config.replace(eval_batch_size=7)
    b = method.per_sample_losses(method.nets[0])
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# CUDA
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
def test_dividemix_step_on_cuda_bf16_channels_last():
    from cdmix.engine import seed_epoch

    method = _tiny_method(device="cuda", images=128, width=8)
    config = method.config
    assert config.device == "cuda" and config.amp is True
    assert method.train.images.images.is_cuda and method.train.labels.is_cuda
    for net in method.nets:
        assert all(p.is_cuda for p in net.parameters()) and all(b.is_cuda for b in net.buffers())
        assert net.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    seen = []

    def record(module, args, output):
        seen.append((args[0].device.type, args[0].is_contiguous(memory_format=torch.channels_last),
                     output.dtype))

    handles = [net.register_forward_hook(record) for net in method.nets]
    for epoch in range(2):  # warm-up, then a DivideMix epoch
        ctx = seed_epoch(config, epoch)
        assert ctx.generator.device.type == "cuda"
        row = method.train_epoch(ctx)
    for h in handles:
        h.remove()
    assert row["labeled_used_net1"] > 0 and np.isfinite(row["train_loss"])
    assert seen and all(dev == "cuda" and cl and dtype == torch.bfloat16 for dev, cl, dtype in seen)
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = method.train.images.batch(torch.arange(8, device="cuda"), augment=True, generator=gen)
    assert x.is_cuda and x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.gpu
@needs_cuda
def test_bench_runs_on_cuda(tmp_path, capsys):
    out = tmp_path / "cuda.json"
    assert main(["--device", "cuda", "--images", "256", "--width", "8", "--steps", "3",
                 "--workers", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["amp"] and result["channels_last"]
    phases = {r["phase"]: r for r in result["phases"]}
    assert 1 <= phases["train net1"]["grad_steps"] == phases["train net1"]["reference_steps"] <= 3
    assert result["memory"]["cdmix"]["cuda_max_allocated_mib"] > 0
    assert "CUDA max allocated" in capsys.readouterr().out


@pytest.mark.gpu
@needs_cuda
def test_cuda_fast_path_equals_faithful_in_eval_mode():
    faithful, fast = _tiny_method(True, "cuda"), _tiny_method(False, "cuda")
    for a, b in zip(fast.nets, faithful.nets):
        a.load_state_dict(b.state_dict())
    gu_a, rx_a, _ = _guess_and_refine(faithful, "eval")
    gu_b, rx_b, _ = _guess_and_refine(fast, "eval")
    # bf16 autocast: batch-size dependent kernels may round differently
    torch.testing.assert_close(gu_a, gu_b, atol=2e-2, rtol=0)
    torch.testing.assert_close(rx_a, rx_b, atol=2e-2, rtol=0)
