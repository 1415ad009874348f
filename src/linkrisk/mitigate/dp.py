"""DP-SGD (Opacus) on the projection heads, encoders frozen, one patient per privacy unit.

Loss (:mod:`linkrisk.mitigate.losses`): by default each patient's loss
depends only on that patient's own image-report pairs and on a fixed
*public* negative bank (features of a cohort the user marks public, for
example Open-i), embedded under the current heads without gradient.
Per-patient gradients are then functions of one patient's data alone,
which is what Opacus's clipping and noise assume. ``loss="in_batch"``
(the usual CLIP loss, as in published DP-CLIP experiments) contrasts
patients with each other: its ε is reported but marked as no formal
guarantee.

Start (``init``): ``"original"`` fine-tunes the model's own heads, which
is sound when those heads were trained on other data than the private
cohort (a published model audited on a hospital's own data);
``"public"`` builds fresh heads from public-cohort features only
(standardisation and PCA axes), for heads that saw the private cohort.

Sampling and accounting: each patient enters each step independently
with probability ``sample_rate`` (Poisson sampling, Opacus's
``UniformWithReplacementSampler``), for ``ceil(1 / sample_rate)`` steps
per epoch. The noise multiplier is calibrated to the target (ε, δ) at
exactly that rate and step count, for both the PRV and the RDP
accountant (the larger noise wins), and ε is reported under both. A step with an empty batch still adds noise, as the
accounting assumes. Gradients are summed per step and the learning rate
is divided by the expected batch size, so an expected batch below one
patient works.

Clipping: with the public-bank loss, Opacus's ghost clipping computes
each patient's gradient norm without building per-patient gradients,
then backpropagates the losses reweighted by their clipping factors. The
clipped sum is the same as with per-sample gradients (to float rounding)
at a fraction of the time and memory (``benchmarks/dp.py``). It is exact
only because each patient's loss depends on that patient alone, so the
in-batch loss and patch-grid features keep Opacus's per-sample gradients.

Checkpoints: with ``checkpoint`` set, the training state is written
atomically after the noise calibration and after every epoch. It
contains the heads, the optimizer state (momentum), the step and
empty-batch counters, the accountant's step history and the calibrated
noise multiplier. With ``noise_seed``
set, the states of the sampling and noise generators are saved too, so a
resumed run gives bit-identical heads. Without a seed they are never
written to disk (that would record the noise), and a resumed run draws
fresh OS entropy. Each step's noise is then still independent of every
other step's, and the accountant counts every step once: the steps of
the saved epochs plus those run after the resume. The steps of a
partial epoch that was killed are discarded with their result. A
checkpoint is keyed by a hash of every input, option and library
version, so a changed run starts over instead of resuming stale state.

Privacy unit: the patient. A patient's pairs are padded to the largest
pair count and masked, and their losses are averaged into one
per-patient loss. Adding or removing a patient therefore changes one row
of the dataset. ``epsilon = inf`` trains the same way without clipping
or noise: the non-private end of an ε sweep.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import pickle
import secrets
import warnings
from pathlib import Path

import numpy as np
import opacus
import torch
from opacus import GradSampleModule
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer_fast_gradient_clipping import DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn

from linkrisk._io import atomic_write
from linkrisk._logging import logger, stage
from linkrisk._progress import progress_bar
from linkrisk.errors import ConfigError, InputError
from linkrisk.mitigate.losses import LOSSES, InBatchLoss, PublicBankLoss
from linkrisk.models.heads import DualHeads, HeadPair
from linkrisk.models.train import init_pca

# Published reference setting (MIMIC-CXR heads): epsilon 0.34 at delta 6e-6.
DEFAULT_EPSILON = 0.34
DEFAULT_DELTA = 6e-6


# Above this epsilon DP-SGD gives no meaningful protection, and Opacus's
# noise search over such targets runs for minutes in numerical overflow.
MAX_EPSILON = 100.0


def validate_privacy_target(epsilon: float, delta: float | None) -> None:
    """Raise :class:`ConfigError` unless ``0 < epsilon <= 100`` or infinite, and ``0 < delta < 1`` (or None)."""
    if not (0 < epsilon <= MAX_EPSILON or epsilon == math.inf):
        raise ConfigError(f"epsilon must be in (0, {MAX_EPSILON:g}] or inf (no DP), got {epsilon}")
    if delta is not None and not (0 < delta < 1):
        raise ConfigError(f"delta must be in (0, 1), got {delta}; the default is 6e-6 or 0.1/n when smaller")


def default_delta(n_units: int) -> float:
    """Return 6e-6, or ``0.1 / n_units`` when that is smaller, so that delta stays well below ``1 / n``."""
    return min(DEFAULT_DELTA, 0.1 / max(n_units, 1))


INITS = ("public", "original")


@dataclasses.dataclass
class DPConfig:
    """DP-SGD options; all of them are written to the results.

    ``batch_size`` is the expected number of patients per step: the
    sampling rate is ``batch_size / n_patients`` unless ``sample_rate``
    sets it directly. ``clipping`` ``"auto"`` uses ghost clipping where it is
    exact (see the module docstring) and ``"per_sample"`` always builds
    per-patient gradients. ``noise_multiplier`` None (default) calibrates the
    noise to ``(epsilon, delta)``; a number fixes it and the spent epsilon
    is reported instead.

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
    sample_rate: float | None = None
    max_grad_norm: float = 1.0
    lr: float = 0.05
    embed_dim: int = 64
    temperature: float = 0.1
    bank_size: int = 1024
    accountant: str = "prv"
    loss: str = "public_bank"
    init: str = "public"
    clipping: str = "auto"
    noise_multiplier: float | None = None
    secure_mode: bool = False
    noise_seed: int | None = None
    seed: int = 0

    def validate(self) -> "DPConfig":
        """Check every option; raise :class:`ConfigError` naming the first invalid one."""
        validate_privacy_target(self.epsilon, self.delta)
        if self.accountant not in ("prv", "rdp"):
            raise ConfigError(f"unknown accountant {self.accountant!r}; valid accountants: prv, rdp")
        if self.loss not in LOSSES:
            raise ConfigError(f"unknown loss {self.loss!r}; valid losses: {', '.join(LOSSES)}")
        if self.init not in INITS:
            raise ConfigError(f"unknown init {self.init!r}; valid values: {', '.join(INITS)}")
        if self.clipping not in ("auto", "per_sample"):
            raise ConfigError(f"unknown clipping {self.clipping!r}; valid values: auto, per_sample")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"epochs and batch size must be at least 1, got {self.epochs} and {self.batch_size}")
        if self.sample_rate is not None and not 0 < self.sample_rate <= 1:
            raise ConfigError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.max_grad_norm <= 0 or self.lr <= 0 or self.temperature <= 0:
            raise ConfigError("max_grad_norm, lr and temperature must be positive, got "
                              f"{self.max_grad_norm}, {self.lr} and {self.temperature}")
        return self


def patient_tensors(image_features: np.ndarray, text_features: np.ndarray, report_row: np.ndarray,
                    patient_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group pairs by patient: ``image [n_patients, P, ...]``, ``text [n_patients, P, d]``, ``mask [n_patients, P]``."""
    patients, index = np.unique(np.asarray(patient_ids), return_inverse=True)
    max_pairs = int(np.bincount(index).max())
    image = torch.zeros(len(patients), max_pairs, *image_features.shape[1:])
    text = torch.zeros(len(patients), max_pairs, text_features.shape[1])
    mask = torch.zeros(len(patients), max_pairs)
    slot = np.zeros(len(patients), dtype=np.int64)
    for row, p in enumerate(index):
        image[p, slot[p]] = torch.as_tensor(np.asarray(image_features[row], np.float32))
        text[p, slot[p]] = torch.as_tensor(np.asarray(text_features[report_row[row]], np.float32))
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
    if config.epsilon == math.inf:
        return ["epsilon = inf: trained without clipping or noise, no privacy guarantee"]
    if config.loss == "in_batch":
        notes = ["ε not a formal guarantee (in-batch negatives couple examples)"]
    else:
        notes = ["per-patient loss uses only that patient's pairs and a public negative bank, so clipping bounds "
                 "each patient's influence"]
    if config.noise_seed is not None:
        notes.append("sampling and noise were seeded and the seed is recorded: not a formal guarantee")
    if not config.secure_mode:
        notes.append("secure_mode off: noise from torch's default generator, not a cryptographically secure one, "
                     "and no protection against floating-point attacks on Gaussian sampling")
    if config.init == "original":
        notes.append("the heads started from the model's original heads; ε covers this fine-tuning only, not the "
                     "data those heads were first trained on")
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


def _generators(config: DPConfig) -> tuple[torch.Generator, torch.Generator]:
    """Return the sampling and noise generators: seeded, fresh entropy, or cryptographically secure."""
    if config.secure_mode:
        try:
            import torchcsprng
        except ImportError as err:
            raise ConfigError(f"secure_mode needs the torchcsprng package, which is not installed ({err}); "
                              "install a torchcsprng build for this torch version or turn secure_mode off") from err
        return (torchcsprng.create_random_device_generator("/dev/urandom"),
                torchcsprng.create_random_device_generator("/dev/urandom"))
    seed = config.noise_seed if config.noise_seed is not None else secrets.randbits(62)
    return torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)


def _rdp_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, steps)]
    return float(accountant.get_epsilon(delta, alphas=RDP_ORDERS))


def _noise_multiplier(config: DPConfig, delta: float, sample_rate: float, steps: int) -> float:
    """Return the smallest noise multiplier at which both the PRV and the RDP accountant stay within ε.

    Opacus's noise search calibrates the PRV accountant. The RDP bound over
    the extended orders (``RDP_ORDERS``) is then checked at that noise. If
    it exceeds ε, bisection raises the noise until it does not, so the
    reported ε of either accountant is at most the target.
    """
    if config.epsilon == math.inf:
        return 0.0
    if config.noise_multiplier is not None:
        return float(config.noise_multiplier)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_PRV_DOMAIN_WARNING)
        try:
            sigma = float(get_noise_multiplier(target_epsilon=config.epsilon, target_delta=delta,
                                               sample_rate=sample_rate, steps=steps, accountant="prv"))
        except ValueError as err:  # Opacus: "The privacy budget is too low."
            raise ConfigError(f"no noise level reaches epsilon {config.epsilon} at delta {delta:.3g} with {steps} "
                              f"steps at sampling rate {sample_rate:.3g} ({err}); raise epsilon or train fewer "
                              "epochs") from err
    if _rdp_epsilon(sigma, sample_rate, steps, delta) <= config.epsilon:
        return sigma
    low, high = sigma, 2.0 * sigma
    while _rdp_epsilon(high, sample_rate, steps, delta) > config.epsilon:
        low, high = high, 2.0 * high
        if high > 1e6:
            raise ConfigError(f"no noise level reaches epsilon {config.epsilon} at delta {delta:.3g} under the RDP "
                              "accountant; raise epsilon or train fewer epochs")
    for _ in range(40):
        middle = 0.5 * (low + high)
        low, high = (middle, high) if _rdp_epsilon(middle, sample_rate, steps, delta) > config.epsilon else (low, middle)
    return high


def _starting_heads(config: DPConfig, initial_heads: tuple[nn.Module, nn.Module] | None,
                    public_image: np.ndarray, public_text: np.ndarray) -> HeadPair:
    if config.init == "public":
        return init_private_heads(public_image, public_text, config)
    if initial_heads is None:
        raise ConfigError("init 'original' needs the model's heads; pass initial_heads, or use init 'public'")
    image_head, text_head = (copy.deepcopy(head).train().requires_grad_(True) for head in initial_heads)
    heads = HeadPair(image_head, text_head, config.temperature)
    heads.log_logit_scale.requires_grad_(False)
    return heads


TRAINING_STATE_FORMAT = "linkrisk-dp-training/1"


def _update_with_array(digest, array) -> None:
    array = np.ascontiguousarray(array)
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    if array.dtype == object:
        digest.update("\0".join(map(str, array.ravel())).encode())
    else:
        digest.update(array.data)


def training_key(image_features: np.ndarray, text_features: np.ndarray, report_row: np.ndarray,
                 patient_ids: np.ndarray, public_image_features: np.ndarray, public_text_features: np.ndarray,
                 config: DPConfig, initial_heads: tuple[nn.Module, nn.Module] | None = None) -> str:
    """Hash everything that determines a DP training run, for checkpoint keys.

    The hash covers the arrays, every option of ``config``, the starting heads when
    ``config.init`` is ``"original"`` and the torch, Opacus and NumPy versions. A library upgrade therefore starts training over, because the saved
    generator and optimizer states need not carry over between versions.
    """
    digest = hashlib.sha256()
    header = {"format": TRAINING_STATE_FORMAT, "config": dataclasses.asdict(config),
              "versions": [torch.__version__, opacus.__version__, np.__version__]}
    digest.update(json.dumps(header, sort_keys=True, default=str).encode())
    for array in (image_features, text_features, report_row, np.asarray(patient_ids).astype(str),
                  public_image_features, public_text_features):
        _update_with_array(digest, array)
    if config.init == "original" and initial_heads is not None:
        for head in initial_heads:
            for name, tensor in head.state_dict().items():
                digest.update(name.encode())
                _update_with_array(digest, tensor.detach().cpu().numpy())
    return digest.hexdigest()[:24]


def _remove_stale_temp_files(path: Path) -> None:
    """Delete temp files that a run killed while writing ``path`` left beside it (see ``atomic_write``)."""
    # NOTE: nothing locks a checkpoint folder, so a second run training the same point at the same time can
    # delete the first run's temp file mid-write, and its checkpoint write then fails.
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


def _load_training_state(path: Path, key: str) -> dict | None:
    """Return the saved training state at ``path`` if it carries ``key``; None when absent, unreadable or stale."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        logger.warning("DP: training checkpoint %s is not readable (%s), so training starts from epoch 0", path, err)
        return None
    if not isinstance(state, dict) or state.get("format") != TRAINING_STATE_FORMAT:
        logger.warning("DP: %s is not a linkrisk DP training checkpoint, so training starts from epoch 0", path)
        return None
    if state.get("key") != key:
        logger.info("DP: training checkpoint %s was written for other inputs or options, so training starts from "
                    "epoch 0", path)
        return None
    return state


def _save_training_state(path: Path, state: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def train_dp_heads(image_features: np.ndarray, text_features: np.ndarray, report_row: np.ndarray,
                   patient_ids: np.ndarray, public_image_features: np.ndarray, public_text_features: np.ndarray,
                   config: DPConfig = DPConfig(), progress: bool = True,
                   initial_heads: tuple[nn.Module, nn.Module] | None = None,
                   checkpoint: Path | None = None) -> tuple[HeadPair, dict]:
    """Train heads with DP-SGD at a target (epsilon, delta) per patient.

    Args:
        image_features: ``[n_images, ...]`` private training image features.
        text_features: ``[n_reports, text_dim]`` private training report features.
        report_row: ``[n_images]`` row of each image's report in ``text_features``.
        patient_ids: ``[n_images]`` patient of each image (the privacy unit).
        public_image_features: ``[n_pub_images, ...]`` features of a public cohort.
        public_text_features: ``[n_pub_reports, text_dim]`` features of a public cohort.
        config: DP and optimisation options.
        progress: show a progress bar over the DP-SGD steps.
        initial_heads: the model's own ``(image_head, text_head)``, copied and fine-tuned
            when ``config.init`` is ``"original"``.
        checkpoint: file for the training state, written atomically after calibration and
            after every epoch (see the module docstring). A run whose key (:func:`training_key`)
            matches the file's resumes after its last complete epoch. The file stays after
            training, so the caller deletes it once the heads are stored. None keeps nothing.

    Returns:
        ``(heads, record)``. ``record`` contains everything needed to reproduce
        the run and the epsilon spent under the PRV and RDP accountants.
    """
    config.validate()
    if public_image_features.shape[1:] != image_features.shape[1:] or public_text_features.shape[1:] != text_features.shape[1:]:
        raise InputError(
            f"public cohort features {public_image_features.shape[1:]}/{public_text_features.shape[1:]} differ in "
            f"dimension from the private ones {image_features.shape[1:]}/{text_features.shape[1:]}; use the same encoders"
        )
    if len(public_text_features) == 0 or len(public_image_features) == 0:
        raise InputError("DP training needs a public cohort with at least one image and one report for its negative bank")

    image, text, mask = patient_tensors(image_features, text_features, report_row, patient_ids)
    n_patients = len(image)
    delta = config.delta if config.delta is not None else default_delta(n_patients)
    if delta >= 1.0 / n_patients:
        logger.warning("DP: delta %.3g is not below 1/n = %.3g; the guarantee is weak", delta, 1.0 / n_patients)
    sample_rate = config.sample_rate if config.sample_rate is not None else min(1.0, config.batch_size / n_patients)
    # The tolerance keeps 1 / (10 / 30) = 3.0000000000000004 at 3 steps.
    steps_per_epoch = max(1, math.ceil(1.0 / sample_rate - 1e-9))
    planned_steps = config.epochs * steps_per_epoch
    expected_batch = n_patients * sample_rate
    state, key = None, ""
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        _remove_stale_temp_files(checkpoint)
        key = training_key(image_features, text_features, report_row, patient_ids, public_image_features,
                           public_text_features, config, initial_heads)
        state = _load_training_state(checkpoint, key)
    if state is not None:
        # The checkpoint's key covers every input of the calibration, so its noise multiplier is the one
        # calibration would return.
        noise_multiplier = float(state["noise_multiplier"])
    else:
        calibrating = config.epsilon != math.inf and config.noise_multiplier is None
        # The noise search runs the accountants many times and can take more than ten seconds.
        calibration = stage(f"DP: noise calibration to epsilon {config.epsilon:g} at delta {delta:.3g} over "
                            f"{planned_steps} steps") if calibrating else contextlib.nullcontext()
        with calibration:
            noise_multiplier = _noise_multiplier(config, delta, sample_rate, planned_steps)

    rng = np.random.default_rng(config.seed)
    bank_rows = rng.choice(len(public_text_features), size=min(config.bank_size, len(public_text_features)), replace=False)
    heads = _starting_heads(config, initial_heads, public_image_features, public_text_features)
    if config.loss == "public_bank":
        model = PublicBankLoss(heads.image_head, heads.text_head, torch.as_tensor(np.asarray(public_image_features, np.float32)),
                               torch.as_tensor(np.asarray(public_text_features[bank_rows], np.float32)), config.temperature)
    else:
        model = InBatchLoss(heads.image_head, heads.text_head, config.temperature)
    sampling, noise = _generators(config)
    # Summed per-patient gradients, divided by the expected batch size through the learning rate.
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=config.lr / expected_batch,
                                momentum=0.9)
    private = config.epsilon != math.inf
    # Ghost clipping needs per-patient losses that do not depend on each other, and pair features that are vectors.
    ghost = private and config.clipping == "auto" and config.loss == "public_bank" and image.ndim == 3
    if ghost:
        model = GradSampleModuleFastGradientClipping(model, max_grad_norm=config.max_grad_norm, loss_reduction="sum",
                                                     use_ghost_clipping=True)
        optimizer = DPOptimizerFastGradientClipping(optimizer, noise_multiplier=noise_multiplier,
                                                    max_grad_norm=config.max_grad_norm,
                                                    expected_batch_size=max(1, round(expected_batch)),
                                                    loss_reduction="sum", generator=noise,
                                                    secure_mode=config.secure_mode)
    elif private:
        model = GradSampleModule(model)
        optimizer = DPOptimizer(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=config.max_grad_norm,
                                expected_batch_size=max(1, round(expected_batch)), loss_reduction="sum",
                                generator=noise, secure_mode=config.secure_mode)
    if private:
        if not config.secure_mode:
            logger.info("DP: secure_mode is off (torch's generator, not a cryptographic one); turn it on for a release")
        if config.noise_seed is not None:
            logger.warning("DP: sampling and noise are seeded (noise_seed %d): the run is reproducible, "
                           "so its epsilon is not a formal guarantee", config.noise_seed)
        if config.loss == "in_batch":
            logger.warning("DP: in-batch negatives couple patients, so the reported epsilon is not a formal guarantee")
    sampler = UniformWithReplacementSampler(num_samples=n_patients, sample_rate=sample_rate, generator=sampling,
                                            steps=steps_per_epoch)

    # Generator states are saved only for seeded noise, because saving OS-entropy states would record the noise.
    save_generators = config.noise_seed is not None and not config.secure_mode
    history, steps, empty_batches, first_epoch = [], 0, 0, 0
    if state is not None:
        heads.load_state_dict(state["heads"])
        optimizer.load_state_dict(state["optimizer"])
        if save_generators:
            sampling.set_state(state["sampling_generator"])
            noise.set_state(state["noise_generator"])
        history = [tuple(entry) for entry in state["history"]]
        steps, empty_batches, first_epoch = int(state["steps"]), int(state["empty_batches"]), int(state["epoch"])
        logger.info("DP: resuming from %s after epoch %d of %d (%d steps done)%s", checkpoint, first_epoch,
                    config.epochs, steps, "" if save_generators else "; sampling and noise continue from fresh "
                    "OS entropy, independent of the steps before")

    def save_checkpoint(epochs_done: int) -> None:
        saved = {"format": TRAINING_STATE_FORMAT, "key": key, "epoch": epochs_done, "steps": steps,
                 "empty_batches": empty_batches, "history": [list(entry) for entry in _merge(history)],
                 "noise_multiplier": noise_multiplier, "heads": heads.state_dict(),
                 "optimizer": optimizer.state_dict()}
        if save_generators:
            saved["sampling_generator"] = sampling.get_state()
            saved["noise_generator"] = noise.get_state()
        _save_training_state(checkpoint, saved)

    if checkpoint is not None and state is None:
        # Saved before the first step, so a resumed run skips the noise calibration.
        save_checkpoint(0)
    model.train()
    with progress_bar(progress, "steps") as bar:
        description = (f"DP-SGD on projection heads (epsilon {config.epsilon:g})" if private
                       else "non-private fine-tuning (epsilon = inf)")
        task = bar.add_task(description, total=planned_steps, completed=steps)
        for epoch in range(first_epoch, config.epochs):
            for indices in sampler:
                batch = torch.as_tensor(indices, dtype=torch.long)
                optimizer.zero_grad()
                empty_batches += int(len(batch) == 0)
                if ghost and len(batch) == 0:
                    # Skip the forward pass, because its captured activations would wait for a backward that
                    # never comes. The zero gradient still receives noise in the step, as the accounting assumes.
                    for parameter in optimizer.params:
                        parameter.grad = torch.zeros_like(parameter)
                else:
                    per_patient = model(image[batch], text[batch], mask[batch])
                    with warnings.catch_warnings():
                        # Opacus's hooks fire on outputs: the frozen features need no gradient.
                        warnings.filterwarnings("ignore", message="Full backward hook is firing")
                        if ghost:
                            DPTensorFastGradientClipping(model, optimizer, per_patient, loss_reduction="sum").backward()
                        else:
                            per_patient.sum().backward()  # zero for an empty batch; the step still adds noise
                optimizer.step()
                history.append((noise_multiplier, sample_rate, 1))
                steps += 1
                bar.advance(task)
            if checkpoint is not None:
                save_checkpoint(epoch + 1)
    if private:
        model._close()

    if not private:
        spent = {"prv": math.inf, "rdp": math.inf}
    elif noise_multiplier > 0:
        spent = _spent_epsilon(_merge(history), delta)
    else:
        spent = {"prv": math.inf, "rdp": math.inf}
    heads.eval()
    clipping = None
    if ghost:
        clipping = "ghost (Opacus fast gradient clipping)"
    elif private:
        clipping = "per-sample gradients"
    formal = private and config.loss == "public_bank" and config.noise_seed is None
    record = {
        "epsilon": float(config.epsilon) if config.noise_multiplier is None or not private else spent[config.accountant],
        "epsilon_target": float(config.epsilon) if config.noise_multiplier is None else None,
        "epsilon_spent": spent,
        "delta": float(delta),
        "accountant": config.accountant,
        "noise_multiplier": float(noise_multiplier),
        "sample_rate": float(sample_rate),
        "expected_batch_size": float(expected_batch),
        "steps": int(steps),
        "steps_per_epoch": int(steps_per_epoch),
        "empty_batches": int(empty_batches),
        "epochs": int(config.epochs),
        "max_grad_norm": float(config.max_grad_norm) if private else None,
        "lr": float(config.lr),
        "optimizer": "SGD(momentum=0.9), summed gradients, lr / expected batch size",
        "clipping": clipping,
        "loss": config.loss,
        "loss_description": ("public-bank InfoNCE (per-patient, both directions)" if config.loss == "public_bank"
                             else "in-batch symmetric InfoNCE"),
        "init": config.init,
        "formal_guarantee": formal,
        "guarantee_notes": _guarantee_notes(config),
        "privacy_unit": "patient",
        "n_private_patients": int(n_patients),
        "public_bank": {"images": int(len(public_image_features)), "reports": int(len(bank_rows))}
        if config.loss == "public_bank" else None,
        "temperature": float(config.temperature),
        "embed_dim": int(config.embed_dim) if config.init == "public" else None,
        "initialisation": ("PCA of public-cohort features; standardisation from public-cohort features"
                           if config.init == "public" else "the model's original heads"),
        "secure_mode": bool(config.secure_mode),
        "noise_seed": config.noise_seed,
        "seed": int(config.seed),
    }
    logger.info("DP: %d steps, noise multiplier %.3f, sample rate %.4f, epsilon spent %.4f (PRV) / %.4f (RDP) at "
                "delta %.2g", steps, noise_multiplier, sample_rate, spent["prv"], spent["rdp"], delta)
    return heads, record


def _merge(history: list[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """Merge consecutive identical ``(noise, rate, steps)`` entries, as Opacus's accountants record them."""
    merged: list[tuple[float, float, int]] = []
    for noise, rate, count in history:
        if merged and merged[-1][:2] == (noise, rate):
            merged[-1] = (noise, rate, merged[-1][2] + count)
        else:
            merged.append((noise, rate, count))
    return merged
