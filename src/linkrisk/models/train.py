"""Non-private fitting of the projection heads with symmetric InfoNCE.

Heads memorise a few hundred pairs within tens of steps, so fitting keeps
back a patient-disjoint validation part of the training cohort and stops
on its mean normalised rank (image to report, chance 0.5).
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from linkrisk._logging import logger
from linkrisk._progress import progress_bar
from linkrisk.errors import InputError
from linkrisk.models.heads import DualHeads, ProjectionHead


@dataclasses.dataclass
class FitConfig:
    """Options of :func:`fit_heads`; every field goes into the saved heads' metadata."""

    embed_dim: int = 64
    temperature: float = 0.07
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.01
    max_steps: int = 400
    eval_every: int = 5
    patience: int = 60
    val_fraction: float = 0.2
    seed: int = 0


def init_pca(head: ProjectionHead, features: np.ndarray, generator: torch.Generator) -> None:
    """Set the head's weights to the top principal axes of its standardised features.

    Axes beyond the data's rank are filled with random unit vectors; the bias is zero.
    """
    x = (torch.as_tensor(features) - head.mean) / head.std
    x = x - x.mean(0)
    out_dim, in_dim = head.linear.weight.shape
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    weight = torch.randn(out_dim, in_dim, generator=generator)
    weight = F.normalize(weight, dim=1)
    n = min(out_dim, vh.shape[0])
    weight[:n] = vh[:n]
    with torch.no_grad():
        head.linear.weight.copy_(weight)
        head.linear.bias.zero_()


def mean_normalised_rank(image_emb: torch.Tensor, text_emb: torch.Tensor, report_row: torch.Tensor) -> float:
    """Mean of (rank - 1) / (M - 1) of each image's true report among ``M`` reports; ties count half."""
    scores = image_emb @ text_emb.T
    true = scores.gather(1, report_row.view(-1, 1))
    above = (scores > true).sum(1).float()
    equal = (scores == true).sum(1).float() - 1
    return float(((above + equal / 2) / max(text_emb.shape[0] - 1, 1)).mean())


def symmetric_infonce(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP loss on ``B`` matched rows ``[B, D]`` (L2-normalised): mean of both directions' cross-entropy."""
    logits = logit_scale * image_emb @ text_emb.T
    target = torch.arange(len(logits))
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def _split_patients(patient_ids: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    patients = np.unique(patient_ids)
    if len(patients) < 4:
        raise InputError(f"fitting heads needs at least 4 training patients, got {len(patients)}")
    n_val = max(1, round(fraction * len(patients)))
    val = set(rng.permutation(patients)[:n_val])
    return np.array([p in val for p in patient_ids])


def fit_heads(image_features: np.ndarray, text_features: np.ndarray, report_row: np.ndarray,
              patient_ids: np.ndarray, config: FitConfig = FitConfig(), progress: bool = True) -> tuple[DualHeads, dict]:
    """Fit image and text heads on paired features.

    Args:
        image_features: ``[n_images, image_dim]`` frozen image features.
        text_features: ``[n_reports, text_dim]`` frozen report features.
        report_row: ``[n_images]`` row of each image's true report in ``text_features``.
        patient_ids: ``[n_images]`` patient of each image; the validation part is patient-disjoint.
        config: optimisation options.
        progress: show a progress bar over the optimisation steps.

    Returns:
        ``(heads, history)``: the heads at the best validation step, and a
        record of the steps run, the best step and its validation mean
        normalised rank.
    """
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    is_val = _split_patients(np.asarray(patient_ids), config.val_fraction, rng)

    fit_images = np.flatnonzero(~is_val)
    fit_reports = np.unique(report_row[fit_images])
    images_of_report = {r: fit_images[report_row[fit_images] == r] for r in fit_reports}
    val_images = np.flatnonzero(is_val)
    val_reports, val_target = np.unique(report_row[val_images], return_inverse=True)

    heads = DualHeads(image_features.shape[1], text_features.shape[1], config.embed_dim, config.temperature)
    heads.image_head.set_standardisation(image_features[fit_images])
    heads.text_head.set_standardisation(text_features[fit_reports])
    init_pca(heads.image_head, image_features[fit_images], generator)
    init_pca(heads.text_head, text_features[fit_reports], generator)

    image_t = torch.as_tensor(image_features)
    text_t = torch.as_tensor(text_features)
    val_target_t = torch.as_tensor(val_target)
    optimizer = torch.optim.AdamW(heads.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    def validate() -> float:
        heads.eval()
        with torch.no_grad():
            u = F.normalize(heads.image_head(image_t[val_images]), dim=-1)
            v = F.normalize(heads.text_head(text_t[val_reports]), dim=-1)
        heads.train()
        return mean_normalised_rank(u, v, val_target_t)

    best = (validate(), 0, copy.deepcopy(heads.state_dict()))
    step = 0
    # The bar's total is max_steps, and early stopping ends it sooner.
    with progress_bar(progress, "steps") as bar:
        task = bar.add_task("fitting projection heads", total=config.max_steps)
        for step in range(1, config.max_steps + 1):
            batch = rng.choice(fit_reports, size=min(config.batch_size, len(fit_reports)), replace=False)
            images = np.array([rng.choice(images_of_report[r]) for r in batch])
            u = F.normalize(heads.image_head(image_t[images]), dim=-1)
            v = F.normalize(heads.text_head(text_t[batch]), dim=-1)
            loss = symmetric_infonce(u, v, heads.log_logit_scale.exp().clamp(max=100.0))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            bar.advance(task)
            if step % config.eval_every == 0:
                score = validate()
                if score < best[0]:
                    best = (score, step, copy.deepcopy(heads.state_dict()))
                elif step - best[1] >= config.patience:
                    break

    heads.load_state_dict(best[2])
    heads.eval()
    history = {"steps_run": step, "best_step": best[1], "val_mean_normalised_rank": round(best[0], 6),
               "n_fit_patients": int(len(np.unique(patient_ids[~is_val]))),
               "n_val_patients": int(len(np.unique(patient_ids[is_val])))}
    logger.info("heads: best validation mean normalised rank %.3f at step %d of %d (chance 0.5)",
                best[0], best[1], step)
    return heads, history
