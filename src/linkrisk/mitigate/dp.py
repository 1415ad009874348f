"""DP-SGD (Opacus) on the projection heads, encoders frozen, one patient per privacy unit.

Why this loss is sound for DP: in-batch InfoNCE scores each example
against the other private examples in its batch, so one patient's data
moves every other example's gradient and per-example clipping no longer
bounds one patient's influence. Here each patient's loss depends only on
that patient's own image-report pairs and on a fixed *public* negative
bank (features of a cohort the user marks public, for example Open-i),
embedded under the current heads without gradient. Per-patient gradients
are therefore functions of one patient's data alone, which is what
Opacus's clipping and noise assume.

Neither the heads' initialisation nor their input standardisation uses
private data: both come from the public cohort's features (PCA axes and
per-feature mean and standard deviation).

Privacy unit: the patient. A patient's pairs are padded to the largest
pair count and masked, and their losses are averaged into one
per-patient loss. Adding or removing a patient therefore changes one row of the dataset.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from rich.progress import Progress
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from linkrisk._logging import logger
from linkrisk.errors import ConfigError, InputError
from linkrisk.models.heads import DualHeads
from linkrisk.models.train import init_pca

# Published reference setting (MIMIC-CXR heads): epsilon 0.34 at delta 6e-6.
DEFAULT_EPSILON = 0.34
DEFAULT_DELTA = 6e-6


# Above this epsilon DP-SGD gives no meaningful protection, and Opacus's
# noise search over such targets runs for minutes in numerical overflow.
MAX_EPSILON = 100.0


def validate_privacy_target(epsilon: float, delta: float | None) -> None:
    """Raise :class:`ConfigError` unless ``0 < epsilon <= 100`` and ``0 < delta < 1`` (or delta is None)."""
    if not (0 < epsilon <= MAX_EPSILON):
        raise ConfigError(f"epsilon must be in (0, {MAX_EPSILON:g}], got {epsilon}")
    if delta is not None and not (0 < delta < 1):
        raise ConfigError(f"delta must be in (0, 1), got {delta}; the default is 6e-6 or 0.1/n when smaller")


def default_delta(n_units: int) -> float:
    """Return 6e-6, or ``0.1 / n_units`` when that is smaller, so that delta stays well below ``1 / n``."""
    return min(DEFAULT_DELTA, 0.1 / max(n_units, 1))


@dataclasses.dataclass
class DPConfig:
    """DP-SGD options; all of them are written to the results.

    ``noise_multiplier`` None (default) calibrates the noise to
    ``(epsilon, delta)``; a number fixes it and the spent epsilon is
    reported instead.

    ``noise_seed`` None (default) draws Poisson sampling and noise from a
    fresh, unrecorded OS-entropy seed. A number makes the run
    reproducible, but then anyone holding the seed and the other patients'
    data can re-run training with and without one patient and see which
    matches, so the record marks epsilon as no formal guarantee.
    ``seed`` drives only public choices (negative-bank rows, initialisation).
    """

    epsilon: float = DEFAULT_EPSILON
    delta: float | None = None
    epochs: int = 20
    batch_size: int = 64
    max_grad_norm: float = 1.0
    lr: float = 0.05
    embed_dim: int = 64
    temperature: float = 0.1
    bank_size: int = 1024
    accountant: str = "prv"
    noise_multiplier: float | None = None
    secure_mode: bool = False
    noise_seed: int | None = None
    seed: int = 0


class PublicBankLoss(nn.Module):
    """Per-patient loss: InfoNCE of each own pair against a fixed public bank, both directions.

    Input shapes: ``image [B, P, image_dim]``, ``text [B, P, text_dim]``,
    ``mask [B, P]`` (1 for a real pair). Output: ``[B]`` per-patient loss.
    """

    def __init__(self, heads: DualHeads, bank_image: torch.Tensor, bank_text: torch.Tensor, temperature: float):
        super().__init__()
        self.heads = heads
        self.register_buffer("bank_image", bank_image)
        self.register_buffer("bank_text", bank_text)
        self.logit_scale = 1.0 / temperature

    def forward(self, image: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        u = F.normalize(self.heads.image_head(image), dim=-1)
        v = F.normalize(self.heads.text_head(text), dim=-1)
        with torch.no_grad():  # the bank is a constant per step: no per-patient gradient flows through it
            bank_u = F.normalize(self.heads.image_head(self.bank_image), dim=-1)
            bank_v = F.normalize(self.heads.text_head(self.bank_text), dim=-1)
        positive = (u * v).sum(-1, keepdim=True)
        image_to_text = torch.cat([positive, u @ bank_v.T], dim=-1) * self.logit_scale
        text_to_image = torch.cat([positive, v @ bank_u.T], dim=-1) * self.logit_scale
        pair_loss = 0.5 * (torch.logsumexp(image_to_text, -1) + torch.logsumexp(text_to_image, -1)) \
            - positive.squeeze(-1) * self.logit_scale
        return (pair_loss * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)


def _patient_tensors(image_features: np.ndarray, text_features: np.ndarray, report_row: np.ndarray,
                     patient_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    patients, index = np.unique(np.asarray(patient_ids), return_inverse=True)
    max_pairs = int(np.bincount(index).max())
    image = torch.zeros(len(patients), max_pairs, image_features.shape[1])
    text = torch.zeros(len(patients), max_pairs, text_features.shape[1])
    mask = torch.zeros(len(patients), max_pairs)
    slot = np.zeros(len(patients), dtype=np.int64)
    for row, p in enumerate(index):
        image[p, slot[p]] = torch.as_tensor(image_features[row])
        text[p, slot[p]] = torch.as_tensor(text_features[report_row[row]])
        mask[p, slot[p]] = 1.0
        slot[p] += 1
    return image, text, mask


# Opacus's default RDP orders stop at 63; at the large noise multipliers that
# small epsilons need, the optimal order is higher, so the bound is taken
# over a longer grid (a tighter, still valid bound).
# The PRV accountant sizes its domain with a coarse RDP bound at delta/4. It
# warns when that bound's best order is the largest one, which leaves the PRV
# epsilon itself unaffected (Opacus 1.6, accountants/analysis/prv/domain.py).
_PRV_DOMAIN_WARNING = "Optimal order is the largest alpha"
RDP_ORDERS = RDPAccountant.DEFAULT_ALPHAS + list(range(64, 1025, 8))


def _spent_epsilon(history: list, delta: float) -> dict[str, float]:
    """Return epsilon at ``delta`` from the PRV and RDP accountants over one step history."""
    prv, rdp = PRVAccountant(), RDPAccountant()
    prv.history = list(history)
    rdp.history = list(history)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_PRV_DOMAIN_WARNING)
        prv_epsilon = float(prv.get_epsilon(delta))
    return {"prv": prv_epsilon, "rdp": float(rdp.get_epsilon(delta, alphas=RDP_ORDERS))}


def _guarantee_notes(config: DPConfig) -> list[str]:
    notes = ["per-patient loss uses only that patient's pairs and a public negative bank, so clipping bounds "
             "each patient's influence"]
    if config.noise_seed is not None:
        notes.append("sampling and noise were seeded and the seed is recorded: not a formal guarantee")
    if not config.secure_mode:
        notes.append("secure_mode off: noise from torch's default generator, not a cryptographically secure one, "
                     "and no protection against floating-point attacks on Gaussian sampling")
    return notes


def init_private_heads(public_image_features: np.ndarray, public_text_features: np.ndarray,
                       config: DPConfig) -> DualHeads:
    """Build the DP heads' starting point from public-cohort features only (standardisation and PCA axes)."""
    generator = torch.Generator().manual_seed(config.seed)
    heads = DualHeads(public_image_features.shape[1], public_text_features.shape[1], config.embed_dim,
                      config.temperature)
    heads.image_head.set_standardisation(public_image_features)
    heads.text_head.set_standardisation(public_text_features)
    init_pca(heads.image_head, public_image_features, generator)
    init_pca(heads.text_head, public_text_features, generator)
    heads.log_logit_scale.requires_grad_(False)
    return heads


def train_dp_heads(image_features: np.ndarray, text_features: np.ndarray, report_row: np.ndarray,
                   patient_ids: np.ndarray, public_image_features: np.ndarray, public_text_features: np.ndarray,
                   config: DPConfig = DPConfig(), progress: bool = True) -> tuple[DualHeads, dict]:
    """Train new heads with DP-SGD at a target (epsilon, delta) per patient.

    Args:
        image_features: ``[n_images, image_dim]`` private training image features.
        text_features: ``[n_reports, text_dim]`` private training report features.
        report_row: ``[n_images]`` row of each image's report in ``text_features``.
        patient_ids: ``[n_images]`` patient of each image (the privacy unit).
        public_image_features: ``[n_pub_images, image_dim]`` features of a public cohort.
        public_text_features: ``[n_pub_reports, text_dim]`` features of a public cohort.
        config: DP and optimisation options.

    Returns:
        ``(heads, record)``. ``record`` contains everything needed to reproduce
        the run and the epsilon spent under the PRV and RDP accountants.
    """
    if config.accountant not in ("prv", "rdp"):
        raise ConfigError(f"unknown accountant {config.accountant!r}; valid accountants: prv, rdp")
    validate_privacy_target(config.epsilon, config.delta)
    if config.epochs < 1 or config.batch_size < 1:
        raise ConfigError(f"epochs and batch size must be at least 1, got {config.epochs} and {config.batch_size}")
    if public_image_features.shape[1:] != image_features.shape[1:] or public_text_features.shape[1:] != text_features.shape[1:]:
        raise InputError(
            f"public cohort features {public_image_features.shape[1:]}/{public_text_features.shape[1:]} differ in "
            f"dimension from the private ones {image_features.shape[1:]}/{text_features.shape[1:]}; use the same encoders"
        )
    if len(public_text_features) == 0 or len(public_image_features) == 0:
        raise InputError("DP training needs a public cohort with at least one image and one report for its negative bank")

    image, text, mask = _patient_tensors(image_features, text_features, report_row, patient_ids)
    n_patients = len(image)
    delta = config.delta if config.delta is not None else default_delta(n_patients)
    if delta >= 1.0 / n_patients:
        logger.warning("DP: delta %.3g is not below 1/n = %.3g; the guarantee is weak", delta, 1.0 / n_patients)
    batch_size = min(config.batch_size, n_patients)

    rng = np.random.default_rng(config.seed)
    bank_rows = rng.choice(len(public_text_features), size=min(config.bank_size, len(public_text_features)), replace=False)
    heads = init_private_heads(public_image_features, public_text_features, config)
    model = PublicBankLoss(heads, torch.as_tensor(public_image_features),
                           torch.as_tensor(public_text_features[bank_rows]), config.temperature)

    # Opacus's Poisson loader samples each patient with probability 1 / len(loader)
    # per step, for len(loader) steps an epoch; calibrate the noise to exactly that.
    random_seed = config.noise_seed if config.noise_seed is not None else secrets.randbits(63)
    loader = DataLoader(TensorDataset(image, text, mask), batch_size=batch_size,
                        generator=torch.Generator().manual_seed(random_seed))
    sample_rate = 1.0 / len(loader)
    planned_steps = config.epochs * len(loader)
    if config.noise_multiplier is None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_PRV_DOMAIN_WARNING)
            try:
                noise_multiplier = get_noise_multiplier(target_epsilon=config.epsilon, target_delta=delta,
                                                        sample_rate=sample_rate, steps=planned_steps,
                                                        accountant=config.accountant)
            except ValueError as err:  # Opacus: "The privacy budget is too low."
                raise ConfigError(f"no noise level reaches epsilon {config.epsilon} at delta {delta:.3g} with "
                                  f"{planned_steps} steps at sampling rate {sample_rate:.3g} ({err}); raise epsilon "
                                  "or train fewer epochs") from err
    else:
        noise_multiplier = float(config.noise_multiplier)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=config.lr, momentum=0.9)
    if not config.secure_mode:
        logger.info("DP: secure_mode is off (torch's generator, not a cryptographic one); turn it on for a release")
    if config.noise_seed is not None:
        logger.warning("DP: sampling and noise are seeded (noise_seed %d): the run is reproducible, "
                       "so its epsilon is not a formal guarantee", config.noise_seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        try:
            engine = PrivacyEngine(accountant=config.accountant, secure_mode=config.secure_mode)
        except ImportError as err:
            raise ConfigError(f"secure_mode needs the torchcsprng package, which is not installed ({err}); "
                              "install a torchcsprng build for this torch version or turn secure_mode off") from err
    private_model, optimizer, private_loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=noise_multiplier,
        max_grad_norm=config.max_grad_norm, poisson_sampling=True,
        noise_generator=None if config.secure_mode else torch.Generator().manual_seed(random_seed + 1),
    )

    steps, empty_batches = 0, 0
    private_model.train()
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("DP-SGD on projection heads", total=config.epochs)
        for _ in range(config.epochs):
            for batch_image, batch_text, batch_mask in private_loader:
                optimizer.zero_grad()
                per_patient = private_model(batch_image, batch_text, batch_mask)
                if len(per_patient) == 0:
                    empty_batches += 1
                    loss = per_patient.sum()  # zero; the step still adds noise, as the accounting assumes
                else:
                    loss = per_patient.mean()
                with warnings.catch_warnings():
                    # Opacus's hooks fire on outputs: the frozen features need no gradient.
                    warnings.filterwarnings("ignore", message="Full backward hook is firing")
                    loss.backward()
                optimizer.step()
                steps += 1
            bar.advance(task)

    spent = _spent_epsilon(engine.accountant.history, delta) if noise_multiplier > 0 else {"prv": math.inf, "rdp": math.inf}
    heads.eval()
    record = {
        "epsilon": float(config.epsilon) if config.noise_multiplier is None else spent[config.accountant],
        "epsilon_target": float(config.epsilon) if config.noise_multiplier is None else None,
        "epsilon_spent": spent,
        "delta": float(delta),
        "accountant": config.accountant,
        "noise_multiplier": float(noise_multiplier),
        "sample_rate": float(private_loader.sample_rate),
        "expected_batch_size": float(n_patients * private_loader.sample_rate),
        "steps": int(steps),
        "empty_batches": int(empty_batches),
        "epochs": int(config.epochs),
        "max_grad_norm": float(config.max_grad_norm),
        "lr": float(config.lr),
        "optimizer": "SGD(momentum=0.9)",
        "loss": "public-bank InfoNCE (per-patient, both directions)",
        "formal_guarantee": config.noise_seed is None,
        "guarantee_notes": _guarantee_notes(config),
        "privacy_unit": "patient",
        "n_private_patients": int(n_patients),
        "public_bank": {"images": int(len(public_image_features)), "reports": int(len(bank_rows))},
        "temperature": float(config.temperature),
        "embed_dim": int(config.embed_dim),
        "initialisation": "PCA of public-cohort features; standardisation from public-cohort features",
        "secure_mode": bool(config.secure_mode),
        "noise_seed": config.noise_seed,
        "seed": int(config.seed),
    }
    logger.info("DP: %d steps, noise multiplier %.3f, sample rate %.3f, epsilon spent %.4f (PRV) / %.4f (RDP) at delta %.2g",
                steps, noise_multiplier, sample_rate, spent["prv"], spent["rdp"], delta)
    return heads, record
