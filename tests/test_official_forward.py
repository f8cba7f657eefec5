"""DivideMix's MixUp forward of the official Clothing1M / WebVision code (``mix_forward = "labeled"``):
only the 2B labeled mixes go through the net, the loss is Lx + the prior penalty on those rows."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cdmix import losses as L
from cdmix.config import Config, load_preset, resolve
from cdmix.data.batches import DeviceImages
from cdmix.data.noise import make_noisy_labels
from cdmix.data.sources import load_source
from cdmix.engine import seed_epoch
from cdmix.methods.base import TrainSet
from cdmix.methods.dividemix import DivideMix


@pytest.fixture(scope="module")
def train_set():
    raw = load_source("digits", "unused")
    keep = np.arange(200)
    true = raw.train_labels[keep]
    noisy = make_noisy_labels(true, 10, "sym", 0.4, seed=0)
    images = DeviceImages(raw.train_images[keep], raw.mean, raw.std, "cpu")
    return TrainSet(images, torch.as_tensor(noisy), torch.as_tensor(true), keep, 10)


def make(train_set, **kw):
    config = resolve(Config(**{"width": 8, "batch_size": 16, "warmup": 1, "epochs": 4, "progress": False,
                               "lambda_u": 0.0, **kw}), 10, 8)
    torch.manual_seed(0)
    return DivideMix(config, train_set)


def official_loss(method, idx_x, idx_u, weights, ctx):
    """Train_clothing1M.py's train() step written out: mix all 4B views with one permutation,
    forward mixed_input[:2B], Lx = -mean(sum(log_softmax * target)), penalty = sum(prior * log(prior / mean p))."""
    net, partner = method.train_nets[0], method.nets[1]
    views, targets_x, targets_u = method.views_and_targets(
        net, idx_x, idx_u, weights, lambda u1, u2: method.guess_unlabeled(net, partner, u1, u2),
        method.config.temperature, ctx.aug_generator)
    all_inputs = torch.cat(views)
    all_targets = torch.cat([targets_x, targets_x, targets_u, targets_u])
    lam = L.sample_mix_lambda(method.config.alpha, ctx.rng)
    idx = torch.randperm(all_inputs.size(0), generator=ctx.aug_generator)
    n = 2 * len(idx_x)
    mixed_input = lam * all_inputs[:n] + (1 - lam) * all_inputs[idx][:n]
    mixed_target = lam * all_targets[:n] + (1 - lam) * all_targets[idx][:n]
    logits = net(mixed_input)
    lx = -torch.mean(torch.sum(F.log_softmax(logits, dim=1) * mixed_target, dim=1))
    prior = torch.ones(method.num_classes) / method.num_classes
    pred_mean = torch.softmax(logits, dim=1).mean(0)
    penalty = torch.sum(prior * torch.log(prior / pred_mean))
    return lx + penalty, lx, penalty


def batch_of(method):
    """A fixed labeled and unlabeled batch, clean-probability weights and epoch 2's random sources."""
    idx_x, idx_u = torch.arange(0, 16), torch.arange(100, 116)
    weights = torch.full((len(method.train),), 0.7)
    ctx = seed_epoch(method.config, 1)
    return idx_x, idx_u, weights, ctx


def test_labeled_forward_equals_official_formula(train_set):
    method = make(train_set, mix_forward="labeled")
    idx_x, idx_u, weights, ctx = batch_of(method)
    gen_state, rng_state = ctx.aug_generator.get_state(), copy.deepcopy(ctx.rng.bit_generator.state)
    total, lx, lu, penalty = method.loss_parts(0, 1, idx_x, idx_u, weights, 0.0, ctx)
    ctx.aug_generator.set_state(gen_state)
    ctx.rng.bit_generator.state = rng_state
    want_total, want_lx, want_penalty = official_loss(method, idx_x, idx_u, weights, ctx)
    torch.testing.assert_close(total, want_total, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lx, want_lx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(penalty, want_penalty, rtol=1e-5, atol=1e-6)
    assert float(lu.detach()) == 0.0


def test_all_rows_forward_differs_and_is_the_cifar_default(train_set):
    """The CIFAR code forwards all 4B rows even at lambda_u 0 (its asym setting): the penalty then
    covers the unlabeled half too, so the two modes give different losses on the same batch."""
    assert Config().mix_forward == "all"
    losses = {}
    for mode in ("all", "labeled"):
        method = make(train_set, mix_forward=mode)
        idx_x, idx_u, weights, ctx = batch_of(method)
        losses[mode] = method.loss_parts(0, 1, idx_x, idx_u, weights, 0.0, ctx)[3].item()
    assert losses["all"] != pytest.approx(losses["labeled"], rel=1e-4)


@pytest.mark.parametrize("preset", ["dividemix-clothing1m", "dividemix-webvision"])
def test_real_world_presets_forward_labeled_rows_only(preset):
    values = load_preset(preset)
    assert values["lambda_u"] == 0 and values["mix_forward"] == "labeled"
