"""Contrastive pieces (issue #22): NT-Xent (and its all-gathered form under gloo), SimCLR views,
kNN monitor and kNN label disagreement, the encoder, the SimCLR method, UNICON's in-training term."""

from __future__ import annotations

import copy
import math
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cdmix import losses as L
from cdmix import selection as S
from cdmix.data import batches as B
from cdmix.data.batches import DeviceImages
from cdmix.data.host_images import HostImages


# ------------------------------------------------------------------ NT-Xent


def test_nt_xent_by_hand():
    # Two images, unit vectors in 2-D. Anchor z1[0] = (1, 0): its positive z2[0] = (.6, .8) at dot
    # .6; negatives z1[1] = (0, 1) at 0 and z2[1] = (.8, -.6) at .8; and so on for the four anchors.
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[0.6, 0.8], [0.8, -0.6]])
    t = 0.5

    def term(pos, negs):
        return -pos / t + math.log(math.exp(pos / t) + sum(math.exp(d / t) for d in negs))

    expected = (term(0.6, [0.0, 0.8])      # z1[0]: others z1[1], z2[1]
                + term(-0.6, [0.0, 0.8])   # z1[1] with z2[1]; negatives z1[0] (0), z2[0] (.8)
                + term(0.6, [0.8, 0.0])    # z2[0] with z1[0]; negatives z1[1] (.8), z2[1] (.48-.48 = 0)
                + term(-0.6, [0.8, 0.0])   # z2[1] with z1[1]; negatives z1[0] (.8), z2[0] (0)
                ) / 4
    assert L.nt_xent(z1, z2, t).item() == pytest.approx(expected, abs=1e-6)


def test_nt_xent_matches_supcon_formula_and_anchor_split():
    gen = torch.Generator().manual_seed(0)
    z1 = F.normalize(torch.randn(5, 7, generator=gen), dim=1)
    z2 = F.normalize(torch.randn(5, 7, generator=gen), dim=1)
    # SupContrast's SupConLoss(features [bsz, 2, d], no labels), without its T / base_T factor.
    z = torch.cat([z1, z2]).double()
    logits = z @ z.T / 0.1
    eye = torch.eye(10, dtype=torch.bool)
    log_prob = logits - torch.logsumexp(logits.masked_fill(eye, -math.inf), dim=1, keepdim=True)
    positive = torch.arange(10).roll(5)
    expected = -log_prob[torch.arange(10), positive].mean()
    assert L.nt_xent(z1, z2, 0.1).item() == pytest.approx(expected.item(), abs=1e-5)
    # Anchors in blocks (the per-rank losses): their size-weighted mean is the whole loss.
    parts = [L.nt_xent(z1, z2, 0.1, anchors=(0, 2)), L.nt_xent(z1, z2, 0.1, anchors=(2, 5))]
    assert ((2 * parts[0] + 3 * parts[1]) / 5).item() == pytest.approx(expected.item(), abs=1e-5)
    # bf16 inputs are computed in float32; a perfect alignment with far negatives gives ~0.
    assert L.nt_xent(z1.bfloat16(), z2.bfloat16(), 0.1).dtype == torch.float32
    far = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert L.nt_xent(far, far, 0.05).item() < 1e-6
    with pytest.raises(ValueError):
        L.nt_xent(z1, z2[:3], 0.1)


def _gather_worker(rank: int, world: int, init_file: str, z: torch.Tensor, out_dir: str) -> None:
    import torch.distributed as dist

    from cdmix import distributed

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        info = distributed.current()
        n = len(z) // world
        local = z[rank * n:(rank + 1) * n].clone().requires_grad_(True)  # n x 2 x d: both views
        gathered, offset = distributed.all_gather_with_grad(local, info)
        loss = L.nt_xent(gathered[:, 0], gathered[:, 1], 0.3, anchors=(offset, offset + n))
        loss.backward()
        torch.save({"loss": loss.detach(), "grad": local.grad, "offset": offset}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_nt_xent_with_negatives_gathered_across_two_gloo_ranks_equals_one_process():
    import torch.multiprocessing as mp

    z = F.normalize(torch.randn(8, 2, 5, generator=torch.Generator().manual_seed(1)), dim=2)
    full = z.clone().requires_grad_(True)
    single = L.nt_xent(full[:, 0], full[:, 1], 0.3)
    single.backward()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_gather_worker, args=(2, os.path.join(tmp, "init"), z, tmp), nprocs=2, join=True)
        results = [torch.load(os.path.join(tmp, f"{r}.pt")) for r in range(2)]
    assert [r["offset"] for r in results] == [0, 4]
    # DDP averages gradients over ranks: the mean of the per-rank losses, the mean of their grads.
    assert ((results[0]["loss"] + results[1]["loss"]) / 2).item() == pytest.approx(single.item(), abs=1e-6)
    grads = torch.cat([r["grad"] for r in results]) / 2
    torch.testing.assert_close(grads, full.grad, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------ RandomResizedCrop boxes and views


def test_resized_crop_boxes_fit_follow_the_scale_and_are_seeded():
    gen = torch.Generator().manual_seed(0)
    top, left, h, w = B.resized_crop_boxes(4000, 24, 32, (0.2, 1.0), (3 / 4, 4 / 3), "cpu", gen)
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= 24).all() and (left + w <= 32).all()
    area = (h * w).double() / (24 * 32)
    # Rounding the sides moves the area a little outside [0.2, 1]; the fallback (whole-height
    # centre crop, ratio clamped to 4/3: 32 x 24) is area 1.
    assert area.min() > 0.15 and area.max() <= 1.0
    fallback = (h == 24) & (w == 32) & (top == 0) & (left == 0)
    assert 0 < fallback.sum() < 400  # 10 failed tries are rare but happen at up to area 1 in a 3:4 image
    again = B.resized_crop_boxes(4000, 24, 32, (0.2, 1.0), (3 / 4, 4 / 3), "cpu", torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip((top, left, h, w), again))


def test_resized_crop_boxes_fall_back_to_the_clamped_centre_crop():
    # No try can fit: every box is wider than the image (area > 1 at ratio 4/3); a 10 x 40 image
    # has ratio 4 > 4/3, so the fallback is the full height, width round(10 x 4/3) = 13, centred.
    top, left, h, w = B.resized_crop_boxes(5, 10, 40, (2.0, 3.0), (3 / 4, 4 / 3), "cpu",
                                           torch.Generator().manual_seed(0))
    assert (h == 10).all() and (w == 13).all() and (top == 0).all() and (left == (40 - 13) // 2).all()


def test_resized_crop_is_crop_then_bilinear_resize_without_antialias():
    images = torch.randint(0, 256, (6, 3, 12, 10), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    top, left, h, w = B.resized_crop_boxes(6, 12, 10, (0.08, 1.0), (3 / 4, 4 / 3), "cpu",
                                           torch.Generator().manual_seed(3))
    flip = torch.tensor([False, True, False, True, True, False])
    out = B.resized_crop(images, top, left, h, w, flip, 8)
    for i in range(6):
        box = images[i:i + 1, :, top[i]:top[i] + h[i], left[i]:left[i] + w[i]].float()
        ref = F.interpolate(box, size=(8, 8), mode="bilinear", align_corners=False, antialias=False)[0]
        torch.testing.assert_close(out[i], ref.flip(-1) if flip[i] else ref, atol=2e-4, rtol=0)
        if h[i] <= 8 and w[i] <= 8:  # upscaling: antialiasing changes nothing (the 32 -> 32 px case)
            aa = F.interpolate(box, size=(8, 8), mode="bilinear", align_corners=False, antialias=True)[0]
            torch.testing.assert_close(out[i], aa.flip(-1) if flip[i] else aa, atol=2e-3, rtol=0)


def test_colour_ops_by_hand():
    red = torch.tensor([255.0, 0.0, 0.0]).view(1, 3, 1, 1)
    assert B.adjust_hue(red, torch.tensor([1 / 3])).flatten().tolist() == pytest.approx([0, 255, 0], abs=1e-3)
    assert B.adjust_hue(red, torch.tensor([0.5])).flatten().tolist() == pytest.approx([0, 255, 255], abs=1e-3)
    x = torch.rand(4, 3, 5, 5, generator=torch.Generator().manual_seed(0)) * 255
    torch.testing.assert_close(B.adjust_hue(x, torch.zeros(4)), x, atol=1e-3, rtol=0)
    # A hue shift keeps each pixel's max and min channel (HSV value and saturation).
    shifted = B.adjust_hue(x, torch.full((4,), 0.17))
    torch.testing.assert_close(shifted.amax(1), x.amax(1), atol=1e-3, rtol=0)
    torch.testing.assert_close(shifted.amin(1), x.amin(1), atol=1e-3, rtol=0)
    grey = torch.tensor([100.0, 100.0, 100.0]).view(1, 3, 1, 1)
    # (torchvision's luma weights sum to 0.9999, so grey moves by 0.01%)
    torch.testing.assert_close(B.adjust_saturation(grey, torch.tensor([1.4])), grey, atol=0.02, rtol=0)
    assert B.adjust_brightness(torch.full((1, 3, 1, 1), 200.0), torch.tensor([1.4])).max().item() == 255.0
    two = torch.tensor([[0.0, 200.0]]).view(1, 1, 1, 2).expand(1, 3, 1, 2)  # grey mean 100
    assert B.adjust_contrast(two, torch.tensor([0.5])).flatten().tolist() == pytest.approx([50.0, 150.0] * 3, abs=0.01)


def test_color_distort_probabilities_ranges_and_grayscale_rows():
    n = 2000
    x = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * 255
    out = B.color_distort(x, torch.Generator().manual_seed(5))
    # Replay the documented draws: which rows were jittered and which made grey.
    gen = torch.Generator().manual_seed(5)
    apply = torch.rand(n, generator=gen) < 0.8
    torch.rand(4, n, generator=gen)
    torch.rand(n, 4, generator=gen)
    gray = torch.rand(n, generator=gen) < 0.2
    assert abs(apply.float().mean() - 0.8) < 0.03 and abs(gray.float().mean() - 0.2) < 0.03
    assert (out >= 0).all() and (out <= 255).all()
    untouched = ~apply & ~gray
    assert torch.equal(out[untouched], x[untouched])
    assert not torch.isclose(out[apply & ~gray], x[apply & ~gray]).all(dim=(1, 2, 3)).any()
    assert (out[gray][:, 0] == out[gray][:, 1]).all() and (out[gray][:, 1] == out[gray][:, 2]).all()
    assert not (out[~gray][:, 0] == out[~gray][:, 1]).all(dim=(1, 2)).any()
    # Brightness factors stay within 1 +- 0.4: each channel's mean moves by at most that
    # (contrast and saturation keep a row's grey mean; hue moves channels, not their max).
    ratio = out[apply & ~gray].amax(dim=(1, 2, 3)) / x[apply & ~gray].amax(dim=(1, 2, 3))
    assert ratio.max() <= 1.4 * 1.4 * 1.4 + 1e-4


def test_simclr_views_same_for_every_placement_and_seeded():
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (10, 12, 12, 3), dtype=np.uint8)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    idx = torch.tensor([3, 1, 7])
    device_images = DeviceImages(raw, mean, std, "cpu")
    host_images = HostImages(raw, mean, std, "cpu")
    a = B.simclr_views(device_images, idx, 10, torch.Generator().manual_seed(4))
    b = B.simclr_views(host_images, idx, 10, torch.Generator().manual_seed(4))
    c = B.simclr_views(device_images, idx, 10, torch.Generator().manual_seed(5))
    assert a.shape == (6, 3, 10, 10) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[:3], a[3:])  # two different views of each image
    grey = B.simclr_views(DeviceImages(raw[..., 0], (0.5,), (0.25,), "cpu"), idx, 8, torch.Generator().manual_seed(4))
    assert grey.shape == (6, 1, 8, 8) and torch.isfinite(grey).all()


# ------------------------------------------------------------------ kNN monitor and disagreement


def test_knn_predict_weighted_votes_by_hand():
    bank = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 2])
    query = torch.tensor([[2.0, 0.0]])  # scale does not matter: rows are normalised
    # k = 3 nearest: bank 0 (sim 1), bank 1 (.8), bank 2 (0). Votes: class 0 exp(1/T), class 1
    # exp(.8/T) + exp(0).
    pred, votes = S.knn_predict(query, bank, labels, 3, k=3, temperature=0.5)
    torch.testing.assert_close(votes[0], torch.tensor([math.exp(2.0), math.exp(1.6) + 1.0, 0.0]))
    assert pred.tolist() == [0]
    # A high temperature flattens the weights: two class-1 neighbours outvote one class-0.
    assert S.knn_predict(query, bank, labels, 3, k=3, temperature=100.0)[0].tolist() == [1]
    # k above the bank size is capped; batching does not change the answer.
    queries = torch.randn(7, 2, generator=torch.Generator().manual_seed(0))
    one = S.knn_predict(queries, bank, labels, 3, k=10, batch_size=1024)[1]
    torch.testing.assert_close(S.knn_predict(queries, bank, labels, 3, k=10, batch_size=2)[1], one)


def test_knn_accuracy_on_separated_clusters():
    gen = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(4, 16, generator=gen), dim=1) * 5
    labels = torch.arange(4).repeat_interleave(30)
    bank = centres[labels] + torch.randn(120, 16, generator=gen)
    query_labels = torch.arange(4).repeat(5)
    query = centres[query_labels] + torch.randn(20, 16, generator=gen)
    assert S.knn_accuracy(query, query_labels, bank, labels, 4, k=20, batch_size=7) == 100.0
    wrong = (query_labels + 1) % 4
    assert S.knn_accuracy(query, wrong, bank, labels, 4) == 0.0
    assert math.isnan(S.knn_accuracy(query[:0], wrong[:0], bank, labels, 4))


def test_knn_label_disagreement_by_hand():
    # Two tight pairs far apart: each sample's one neighbour is its pair partner.
    features = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.1, 0.99]])
    labels = torch.tensor([0, 0, 1, 0])  # sample 3 sits with a class-1 sample
    np.testing.assert_array_equal(S.knn_label_disagreement(features, labels, k=1), [0.0, 0.0, 1.0, 1.0])
    # k = 2: sample 0's neighbours are 1 (same) and 3 (label 0, same): 0; sample 2's are 3 and
    # one of 0/1: both label 0, 1.0.
    out = S.knn_label_disagreement(features, labels, k=2, batch_size=3)
    assert out.dtype == np.float64 and out[0] == 0.0 and out[2] == 1.0
    assert np.array_equal(out, S.knn_label_disagreement(features, labels, k=2, batch_size=1))
    assert np.array_equal(S.knn_label_disagreement(features[:1], labels[:1]), [0.0])


def test_knn_label_disagreement_weights_neighbours_by_similarity():
    # Points on the unit circle (angles in radians). Samples 0 and 3 (label 0) each have 2 nearest
    # neighbours, one of another label: the plain share is 0.5 for both. Sample 0's disagreeing neighbour
    # (1, label 1) is its nearer one, sample 3's (5, label 2) its farther one.
    angle = torch.tensor([0.0, 0.1, 0.5, 2.0, 2.1, 2.6])
    features = torch.stack([angle.cos(), angle.sin()], dim=1)
    labels = torch.tensor([0, 1, 0, 0, 0, 2])
    score, predicted = S.knn_label_scores(features, labels, k=2, temperature=0.1)

    def share(disagreeing: float, agreeing: float) -> float:  # weights exp(cos(angle) / 0.1)
        w_d, w_a = math.exp(math.cos(disagreeing) / 0.1), math.exp(math.cos(agreeing) / 0.1)
        return w_d / (w_d + w_a)

    assert score[0] == pytest.approx(share(0.1, 0.5)) and score[0] > 0.5
    assert score[3] == pytest.approx(share(0.6, 0.1)) and score[3] < 0.5
    assert predicted[0] == 1 and predicted[3] == 0  # the weighted vote: the nearer neighbour's class
    # A large temperature gives the plain share back (the tie); a tiny one neither overflows nor
    # divides 0 by 0: only the nearest neighbour counts.
    np.testing.assert_allclose(S.knn_label_disagreement(features, labels, k=2, temperature=1e6)[[0, 3]], [0.5, 0.5],
                               rtol=1e-5)
    np.testing.assert_array_equal(S.knn_label_disagreement(features, labels, k=2, temperature=1e-4)[[0, 3]], [1.0, 0.0])
    with pytest.raises(ValueError, match="temperature"):
        S.knn_label_disagreement(features, labels, k=2, temperature=0)


def test_knn_label_disagreement_ranks_flipped_labels_first():
    gen = torch.Generator().manual_seed(1)
    centres = F.normalize(torch.randn(3, 8, generator=gen), dim=1) * 4
    true = torch.arange(3).repeat_interleave(40)
    features = centres[true] + torch.randn(120, 8, generator=gen)
    given = true.clone()
    flipped = torch.tensor([5, 50, 90, 100])
    given[flipped] = (given[flipped] + 1) % 3
    score = S.knn_label_disagreement(features, given, k=10, batch_size=32)
    assert set(np.argsort(-score, kind="stable")[:4].tolist()) == set(flipped.tolist())


# ------------------------------------------------------------------ the encoder


@pytest.mark.parametrize("name,width,size", [("preact_resnet18", 8, 8), ("small_cnn", 8, 8), ("resnet18", 8, 16),
                                              ("wrn28", 1, 8), ("resnet18_mlp", 8, 16), ("josrc_cnn", 8, 8)])
def test_encoder_file_loads_into_a_fresh_classifier_net(tmp_path, name, width, size):
    from cdmix.models import create_model
    from cdmix.models.encoder import classifier_name, encoder_of, feature_dim, load_encoder, save_encoder

    torch.manual_seed(0)
    trained = create_model(name, num_classes=10, in_channels=3, width=width).eval()
    with torch.no_grad():  # move every weight away from its initial value
        for p in trained.parameters():
            p.add_(0.01 * torch.randn_like(p))
    encoder = encoder_of(trained).eval()
    head = classifier_name(trained)
    x = torch.randn(2, 3, size, size)
    features = encoder(x)
    assert features.shape == (2, feature_dim(trained))
    torch.testing.assert_close(trained.get_submodule(head)(features), trained(x))  # the classifier's input
    keys = set(encoder.state_dict())
    assert keys == {k for k in trained.state_dict() if not k.startswith(head + ".")}
    path = tmp_path / "encoder.pt"
    save_encoder(encoder, path)
    assert set(torch.load(path, weights_only=True)) == keys  # a plain state dict, the model's own names

    target = create_model(name, num_classes=4, in_channels=3, width=width)  # another number of classes
    fresh = {k: v.clone() for k, v in target.state_dict().items() if k.startswith(head + ".")}
    digest = load_encoder(target, path)
    assert len(digest) == 64
    for key, value in target.state_dict().items():
        if key.startswith(head + "."):
            assert torch.equal(value, fresh[key]), key  # the classifier stays as initialised
        else:
            assert torch.equal(value, trained.state_dict()[key]), key
    if name == "resnet18_mlp":  # a fresh_head model: load_pretrained already takes the encoder file
        from cdmix.models.pretrained import load_pretrained

        load_pretrained(create_model(name, num_classes=4, in_channels=3, width=width), path)


def test_encoder_file_of_another_model_is_refused_in_one_line(tmp_path):
    from cdmix.errors import UserError
    from cdmix.models import create_model
    from cdmix.models.encoder import encoder_of, load_encoder, save_encoder

    save_encoder(encoder_of(create_model("small_cnn", 10, 3, width=8)), tmp_path / "enc.pt")
    net = create_model("small_cnn", 10, 3, width=16)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(UserError, match="does not fit .*shape differs"):
        load_encoder(net, tmp_path / "enc.pt")
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_projection_heads():
    from cdmix.models import create_model
    from cdmix.models.encoder import ContrastiveNet, ProjectionHead, encoder_of

    mlp = ProjectionHead(16, 128)
    assert [type(m) for m in mlp] == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear]
    assert mlp[0].weight.shape == (16, 16) and mlp[2].weight.shape == (128, 16)
    unicon = ProjectionHead(16, 128, kind="linear_bn")
    assert [type(m) for m in unicon] == [torch.nn.Linear, torch.nn.BatchNorm1d]
    net = ContrastiveNet(encoder_of(create_model("small_cnn", 10, 1, width=8)), ProjectionHead(16, 32))
    z = net(torch.randn(4, 1, 8, 8))
    assert z.shape == (4, 32)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(4))
    assert {k.split(".")[0] for k in net.state_dict()} == {"encoder", "head"}


# ------------------------------------------------------------------ SimCLR pretraining


def _epoch(e: int):
    from cdmix.methods.base import EpochContext

    return EpochContext(e, torch.Generator().manual_seed(e), np.random.default_rng(e), False)


@pytest.fixture(scope="module")
def digits():
    from cdmix.data.sources import load_source

    raw = load_source("digits", "unused")
    return raw


def _simclr(digits, n=512, **kw):
    from cdmix.config import Config, resolve
    from cdmix.methods.base import TrainSet
    from cdmix.methods.simclr import SimCLR

    keep = np.arange(n)
    train = TrainSet(DeviceImages(digits.train_images[keep], digits.mean, digits.std, "cpu"),
                     torch.as_tensor(digits.train_labels[keep]), None, keep, 10)
    values = {"width": 16, "batch_size": 128, "lr": 0.02, "weight_decay": 1e-4, "epochs": 10, "progress": False,
              "method": "standard", "eval_batch_size": 512, **kw}
    config = resolve(Config(**values), 10, 8)
    torch.manual_seed(0)
    return SimCLR(config, train)


def test_simclr_pretraining_lowers_its_loss_and_its_knn_monitor_is_far_above_chance(digits):
    method = _simclr(digits)
    test_images = DeviceImages(digits.test_images, digits.mean, digits.std, "cpu")
    test_labels = torch.as_tensor(digits.test_labels)
    rows = [method.train_epoch(_epoch(e)) for e in range(10)]
    first, last = rows[0]["nt_xent"], np.mean([r["nt_xent"] for r in rows[-3:]])
    assert last < first - 0.2, [r["nt_xent"] for r in rows]
    assert rows[0]["loss_scaled"] == pytest.approx(first * 0.5 / 0.07)
    accuracy = method.knn_monitor(test_images, test_labels)
    assert accuracy > 50.0  # chance is 10%; a collapsed representation lands near it
    features = method.features(test_images)
    assert features.shape == (len(test_labels), method.feature_dim) and features.dtype == torch.float32
    # The engine hooks: the monitor row only when due (every knn_every = 5 epochs and the last).
    assert method.monitor_due() and not method.monitor_due(7) and method.monitor_due(5)
    # The encoder: the model's own names, no classifier, no head.
    keys = set(method.encoder_state_dict())
    assert keys and not any(k.startswith(("fc.", "head.", "encoder.")) for k in keys)


def test_simclr_is_seeded_and_its_state_round_trips(digits):
    a, b = _simclr(digits, n=256, epochs=2), _simclr(digits, n=256, epochs=2)
    assert a.train_epoch(_epoch(0)) == b.train_epoch(_epoch(0))
    state = copy.deepcopy(a.state_dict())  # as read back from a checkpoint: no tensor shared with a
    c = _simclr(digits, n=256, epochs=2)
    c.load_state_dict(state)
    assert c.epochs_done == 1
    assert a.train_epoch(_epoch(1)) == c.train_epoch(_epoch(1))
    for x, y in zip(a.nets[0].state_dict().values(), c.nets[0].state_dict().values()):
        assert torch.equal(x, y)


def test_knn_label_disagreement_of_the_encoder_ranks_flipped_digits(digits):
    from cdmix.selection import selection_metrics

    method = _simclr(digits, n=512, epochs=1)
    rng = np.random.default_rng(0)
    flipped = rng.random(512) < 0.2
    labels = method.train.labels.clone()
    labels[torch.as_tensor(flipped)] = (labels[torch.as_tensor(flipped)] + 1) % 10
    method.train.labels = labels
    score = method.label_disagreement()
    assert score.shape == (512,) and score.min() >= 0 and score.max() <= 1
    auc = selection_metrics(score < 0.5, 1 - score, ~flipped)["auc"]
    assert auc > 0.8


def _simclr_ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from cdmix.data.sources import load_source
    from cdmix.methods.base import EpochContext

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        method = _simclr(load_source("digits", "unused"), n=128, epochs=1, batch_size=32)
        assert method.dist.world_size == 2
        ctx = EpochContext(0, torch.Generator().manual_seed(0), np.random.default_rng(0), False,
                           aug_generator=torch.Generator().manual_seed(100 + rank))
        row = method.train_epoch(ctx)
        torch.save({"row": row, "net": method.nets[0].state_dict()}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_simclr_epoch_on_two_gloo_ranks_keeps_the_ranks_identical():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_simclr_ddp_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        results = [torch.load(os.path.join(tmp, f"{r}.pt")) for r in range(2)]
    assert all(np.isfinite(r["row"]["nt_xent"]) for r in results)
    # The gather's backward (an all_reduce) and DDP's gradient buckets interleave without a hang, and
    # the ranks, each with its own views, end the epoch with the same parameters. (That the gradients
    # are the single-process ones: test_nt_xent_with_negatives_gathered_across_two_gloo_ranks...)
    for key, value in results[0]["net"].items():
        if "running" not in key and "num_batches" not in key:  # BN statistics are per rank
            torch.testing.assert_close(value, results[1]["net"][key], msg=key)


# ------------------------------------------------------------------ UNICON's in-training term


@pytest.fixture(scope="module")
def noisy_digits(digits):
    from cdmix.data.noise import make_noisy_labels
    from cdmix.methods.base import TrainSet

    keep = np.arange(300)
    true = digits.train_labels[keep]
    noisy = make_noisy_labels(true, 10, "sym", 0.4, seed=0)
    images = DeviceImages(digits.train_images[keep], digits.mean, digits.std, "cpu")
    return TrainSet(images, torch.as_tensor(noisy), torch.as_tensor(true), keep, 10)


def _method(train, method="dividemix", **kw):
    from cdmix.config import Config, resolve
    from cdmix.methods.dividemix import DivideMix
    from cdmix.methods.hybrid import Hybrid

    values = {"width": 8, "batch_size": 32, "warmup": 1, "epochs": 3, "progress": False, "method": method, **kw}
    config = resolve(Config(**values), 10, 8)
    torch.manual_seed(0)
    return (Hybrid if method == "hybrid" else DivideMix)(config, train)


def test_contrastive_weight_zero_adds_nothing(noisy_digits):
    method = _method(noisy_digits)
    assert method.contrastive is None and method.part_names == ("loss", "lx", "lu", "penalty")
    assert [len(opt.param_groups) for opt in method.optimizers] == [1, 1]
    rows = [method.train_epoch(_epoch(e)) for e in range(2)]
    assert not any(k.startswith("lcontrast") for row in rows for k in row)
    assert "contrastive_heads" not in method.state_dict()["extra"]


@pytest.mark.parametrize("name", ["dividemix", "hybrid"])
def test_contrastive_weight_trains_a_projection_head_and_logs_the_term(noisy_digits, name):
    method = _method(noisy_digits, name, contrastive_weight=0.025)
    assert [len(opt.param_groups) for opt in method.optimizers] == [2, 2]  # each net's optimizer trains its head
    heads_before = [copy.deepcopy(h.state_dict()) for h in method.contrastive.heads]
    teachers = getattr(method, "teachers", [])
    assert all(not m._forward_pre_hooks for t in teachers for m in t.modules())
    method.train_epoch(_epoch(0))  # warm-up: CE only
    row = method.train_epoch(_epoch(1))
    for net in ("net1", "net2"):
        assert np.isfinite(row[f"lcontrast_{net}"]) and row[f"lcontrast_{net}"] > 0.1
    # The heads were trained; no hook is left on the nets (their copies stay plain).
    for head, before in zip(method.contrastive.heads, heads_before):
        assert not torch.equal(head[0].weight, before["0.weight"])
    assert all(not m._forward_pre_hooks for net in method.nets for m in net.modules())
    # The heads are part of the checkpoint and come back.
    state = copy.deepcopy(method.state_dict())
    other = _method(noisy_digits, name, contrastive_weight=0.025)
    other.load_state_dict(state)
    for a, b in zip(method.contrastive.heads, other.contrastive.heads):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_contrastive_term_is_the_nt_xent_of_the_projected_features(noisy_digits):
    method = _method(noisy_digits, contrastive_weight=0.025)
    net, term = method.nets[0], method.contrastive
    idx_u = torch.arange(8)
    inputs = noisy_digits.images.batch(torch.arange(8, 16), augment=False)
    torch.manual_seed(1)
    state = copy.deepcopy(net.state_dict())
    out, value = term.forward(0, net, inputs, idx_u, torch.Generator().manual_seed(3))
    # By hand: the same views, the features before the classifier, UNICON's head, NT-Xent at T 0.05.
    net.load_state_dict(state)  # undo the BN running-stat updates of those forwards
    from cdmix.models.encoder import encoder_of

    encoder = encoder_of(net)
    views = B.simclr_views(noisy_digits.images, idx_u, 8, torch.Generator().manual_seed(3))
    feats = torch.cat([encoder(views[:8]), encoder(views[8:])])
    z = F.normalize(term.heads[0](feats), dim=1)
    torch.testing.assert_close(value, L.nt_xent(z[:8], z[8:], 0.05))
    torch.testing.assert_close(out, net(inputs))
