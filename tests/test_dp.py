"""DP-SGD on the heads: accounting, that training really ran, and per-patient independence."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch
from opacus import GradSampleModule

from linkrisk.mitigate import DPConfig, default_delta, train_dp_heads
from linkrisk.mitigate.dp import init_private_heads, patient_tensors
from linkrisk.mitigate.losses import InBatchLoss, PublicBankLoss
from linkrisk.models.heads import DualHeads


@pytest.fixture(scope="module")
def toy():
    """60 images of 30 patients, 30 reports, plus a public cohort, from a seeded generator."""
    rng = np.random.default_rng(0)
    reports = rng.normal(size=(30, 12)).astype(np.float32)
    report_row = np.repeat(np.arange(30), 2)
    images = (reports[report_row] @ rng.normal(size=(12, 20)) + 0.1 * rng.normal(size=(60, 20))).astype(np.float32)
    patients = np.repeat(np.arange(30), 2).astype(str)
    public_images = rng.normal(size=(25, 20)).astype(np.float32)
    public_reports = rng.normal(size=(40, 12)).astype(np.float32)
    return images, reports, report_row, patients, public_images, public_reports




def test_epsilon_spent_within_target(toy):
    config = DPConfig(epsilon=0.5, delta=1e-5, epochs=5, batch_size=10, embed_dim=8, bank_size=40)
    _, record = train_dp_heads(*toy, config, progress=False)
    assert record["accountant"] == "prv"
    assert record["epsilon_spent"]["prv"] <= 0.5
    assert record["epsilon_spent"]["rdp"] > 0
    assert record["noise_multiplier"] > 1.0
    assert record["sample_rate"] == pytest.approx(10 / 30)
    assert record["privacy_unit"] == "patient"
    assert record["formal_guarantee"] is True
    assert record["noise_seed"] is None
    assert record["steps"] == 5 * 3


def test_sample_rate_is_batch_size_over_patients():
    # 31 patients, expected batch 10: sampling rate 10/31, ceil(31/10) = 4 steps an epoch.
    rng = np.random.default_rng(1)
    reports = rng.normal(size=(31, 12)).astype(np.float32)
    images = rng.normal(size=(31, 20)).astype(np.float32)
    config = DPConfig(epsilon=0.5, delta=1e-5, epochs=2, batch_size=10, embed_dim=8, bank_size=40)
    _, record = train_dp_heads(images, reports, np.arange(31), np.arange(31).astype(str),
                               rng.normal(size=(5, 20)).astype(np.float32), rng.normal(size=(40, 12)).astype(np.float32),
                               config, progress=False)
    assert record["sample_rate"] == pytest.approx(10 / 31)
    assert record["expected_batch_size"] == pytest.approx(10)
    assert record["steps"] == 8
    assert record["epsilon_spent"]["prv"] <= 0.5
    assert 0.4 < record["epsilon_spent"]["rdp"] <= 0.5


def test_unseeded_noise_differs_and_seeded_is_flagged(toy):
    config = DPConfig(epsilon=1.0, delta=1e-5, epochs=2, batch_size=10, embed_dim=8, bank_size=40)
    first, record = train_dp_heads(*toy, config, progress=False)
    second, _ = train_dp_heads(*toy, config, progress=False)
    assert not torch.equal(first.image_head.linear.weight, second.image_head.linear.weight)
    assert record["formal_guarantee"] is True
    _, seeded = train_dp_heads(*toy, dataclasses.replace(config, noise_seed=5), progress=False)
    assert seeded["formal_guarantee"] is False
    assert seeded["noise_seed"] == 5


def test_heads_change_and_noise_is_added(toy):
    config = DPConfig(epsilon=1.0, delta=1e-5, epochs=3, batch_size=10, embed_dim=8, bank_size=40, seed=1,
                      noise_seed=11)
    start = init_private_heads(toy[4], toy[5], config)
    noisy, _ = train_dp_heads(*toy, config, progress=False)
    noisy_again, _ = train_dp_heads(*toy, config, progress=False)
    silent, record = train_dp_heads(*toy, dataclasses.replace(config, noise_multiplier=0.0), progress=False)

    w0 = start.image_head.linear.weight
    assert not torch.allclose(noisy.image_head.linear.weight, w0)
    assert not torch.allclose(silent.image_head.linear.weight, w0)
    # Same seed: identical run. Same sampling without noise: a different result, so noise entered the update.
    assert torch.equal(noisy.image_head.linear.weight, noisy_again.image_head.linear.weight)
    difference = (noisy.image_head.linear.weight - silent.image_head.linear.weight).norm()
    assert difference > 0.1
    assert record["epsilon_spent"]["prv"] == float("inf")


def test_empty_poisson_batches_do_not_crash(toy):
    config = DPConfig(epsilon=5.0, delta=1e-5, epochs=4, batch_size=1, embed_dim=8, bank_size=40, noise_seed=3)
    _, record = train_dp_heads(*toy, config, progress=False)
    assert record["steps"] == 4 * 30
    assert record["empty_batches"] > 0  # P(empty) = (29/30)^30 ~ 0.36 per step


def test_default_delta_below_one_over_n():
    assert default_delta(100) == 6e-6
    assert default_delta(10**6) == pytest.approx(1e-7)
    assert default_delta(146) < 1 / 146


def _per_patient_grads(model, image, text, mask):
    module = GradSampleModule(model)
    module.zero_grad()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        module(image, text, mask).sum().backward()
    grads = [p.grad_sample.detach().clone() for p in module.parameters() if p.requires_grad]
    module._close()
    return grads


def test_per_patient_gradients_are_independent(toy):
    images, reports, report_row, patients, public_images, public_reports = toy
    image, text, mask = patient_tensors(images, reports, report_row, patients)
    heads = DualHeads(20, 12, 8, 0.1)
    model = PublicBankLoss(heads.image_head, heads.text_head, torch.as_tensor(public_images),
                           torch.as_tensor(public_reports), 0.1)
    before = _per_patient_grads(model, image[:6], text[:6], mask[:6])

    changed = image[:6].clone()
    changed[0] = changed[0] * -3.0 + 1.0  # replace patient 0's data
    after = _per_patient_grads(model, changed, text[:6], mask[:6])
    for g0, g1 in zip(before, after):
        assert not torch.allclose(g0[0], g1[0])
        torch.testing.assert_close(g0[1:], g1[1:], rtol=0, atol=1e-6)


def test_in_batch_infonce_couples_patients(toy):
    """The contrast: with in-batch negatives, one patient's data moves the others' gradients."""
    images, reports, report_row, *_ = toy
    heads = DualHeads(20, 12, 8, 0.1)

    def grads(batch_images):
        heads.zero_grad()
        u = torch.nn.functional.normalize(heads.image_head(torch.as_tensor(batch_images)), dim=-1)
        v = torch.nn.functional.normalize(heads.text_head(torch.as_tensor(reports[report_row[:6:2]])), dim=-1)
        logits = heads.log_logit_scale.exp() * u @ v.T
        # example 1's own symmetric loss: its row (image to reports) and its column (report to images)
        target = torch.arange(3)
        row = torch.nn.functional.cross_entropy(logits, target, reduction="none")[1]
        column = torch.nn.functional.cross_entropy(logits.T, target, reduction="none")[1]
        (0.5 * (row + column)).backward()
        return heads.image_head.linear.weight.grad.clone()

    batch = images[:6:2].copy()
    g_before = grads(batch)
    batch[0] = batch[0] * -3.0 + 1.0
    g_after = grads(batch)
    assert not torch.allclose(g_before, g_after)


def test_secure_mode_without_torchcsprng_is_clear(toy):
    pytest.importorskip("opacus")
    try:
        import torchcsprng  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("torchcsprng is installed")
    from linkrisk.errors import ConfigError

    config = DPConfig(epsilon=1.0, delta=1e-5, epochs=1, batch_size=10, embed_dim=8, bank_size=40, secure_mode=True)
    with pytest.raises(ConfigError, match="secure_mode needs the torchcsprng package"):
        train_dp_heads(*toy, config, progress=False)


def test_tiny_sample_rate_completes():
    """500 patients sampled at rate 0.001: about one patient every other step, many empty batches."""
    rng = np.random.default_rng(2)
    reports = rng.normal(size=(500, 12)).astype(np.float32)
    images = rng.normal(size=(500, 20)).astype(np.float32)
    config = DPConfig(epsilon=1.0, delta=1e-5, epochs=1, sample_rate=0.001, embed_dim=8, bank_size=40, noise_seed=4)
    _, record = train_dp_heads(images, reports, np.arange(500), np.arange(500).astype(str),
                               rng.normal(size=(5, 20)).astype(np.float32), rng.normal(size=(40, 12)).astype(np.float32),
                               config, progress=False)
    assert record["sample_rate"] == 0.001
    assert record["steps"] == 1000
    assert record["empty_batches"] > 400
    assert record["epsilon_spent"]["prv"] <= 1.0
    assert record["epsilon_spent"]["rdp"] <= 1.0


def test_in_batch_loss_is_marked(toy):
    config = DPConfig(epsilon=1.0, delta=1e-5, epochs=2, batch_size=10, embed_dim=8, loss="in_batch")
    _, record = train_dp_heads(*toy, config, progress=False)
    assert record["formal_guarantee"] is False
    assert "ε not a formal guarantee (in-batch negatives couple examples)" in record["guarantee_notes"]
    assert record["public_bank"] is None


def test_in_batch_loss_couples_opacus_gradients(toy):
    images, reports, report_row, patients, *_ = toy
    image, text, mask = patient_tensors(images, reports, report_row, patients)
    heads = DualHeads(20, 12, 8, 0.1)
    model = InBatchLoss(heads.image_head, heads.text_head, 0.1)
    before = _per_patient_grads(model, image[:6], text[:6], mask[:6])
    changed = image[:6].clone()
    changed[0] = changed[0] * -3.0 + 1.0
    after = _per_patient_grads(model, changed, text[:6], mask[:6])
    assert any(not torch.allclose(g0[1:], g1[1:], atol=1e-6) for g0, g1 in zip(before, after))


def test_fine_tunes_original_heads(toy):
    torch.manual_seed(0)
    image_head = torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    text_head = torch.nn.Linear(12, 8)
    config = DPConfig(epsilon=2.0, delta=1e-5, epochs=2, batch_size=10, init="original", noise_seed=1)
    heads, record = train_dp_heads(*toy, config, progress=False, initial_heads=(image_head, text_head))
    assert record["init"] == "original"
    assert any("covers this fine-tuning only" in note for note in record["guarantee_notes"])
    assert isinstance(heads.image_head, torch.nn.Sequential)
    assert not torch.equal(heads.image_head[0].weight, image_head[0].weight)
    with pytest.raises(Exception, match="init 'original' needs the model's heads"):
        train_dp_heads(*toy, config, progress=False)


def test_infinite_epsilon_trains_without_noise(toy):
    config = DPConfig(epsilon=float("inf"), epochs=2, batch_size=10, embed_dim=8, seed=3, noise_seed=2)
    first, record = train_dp_heads(*toy, config, progress=False)
    second, _ = train_dp_heads(*toy, config, progress=False)
    assert record["noise_multiplier"] == 0.0
    assert record["epsilon_spent"] == {"prv": float("inf"), "rdp": float("inf")}
    assert record["formal_guarantee"] is False
    assert torch.equal(first.image_head.linear.weight, second.image_head.linear.weight)


def test_ghost_clipping_matches_per_sample_gradients(toy):
    """Same sampling, no noise: ghost clipping and per-patient gradients train the same heads."""
    config = DPConfig(epsilon=1.0, delta=1e-5, epochs=3, batch_size=10, embed_dim=8, bank_size=40, noise_seed=5,
                      noise_multiplier=0.0, max_grad_norm=0.05)
    ghost, record = train_dp_heads(*toy, config, progress=False)
    per_sample, other = train_dp_heads(*toy, dataclasses.replace(config, clipping="per_sample"), progress=False)
    assert record["clipping"].startswith("ghost")
    assert other["clipping"] == "per-sample gradients"
    torch.testing.assert_close(ghost.image_head.linear.weight, per_sample.image_head.linear.weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ghost.text_head.linear.weight, per_sample.text_head.linear.weight, rtol=1e-4, atol=1e-5)
    start = init_private_heads(toy[4], toy[5], config)
    assert not torch.allclose(ghost.image_head.linear.weight, start.image_head.linear.weight)
