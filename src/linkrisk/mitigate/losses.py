"""Per-patient contrastive losses for DP-SGD on the heads.

Both take a batch of patients as ``image [B, P, ...]`` (a patient's
image features, padded to P pairs), ``text [B, P, text_dim]`` (the true
report of each image) and ``mask [B, P]`` (1 for a real pair), and
return one loss per patient, ``[B]``.

- :class:`PublicBankLoss` (sound for DP): each pair is contrasted only
  with a fixed *public* negative bank, embedded under the current heads
  without gradient. A patient's loss, and so its per-sample gradient,
  depends on that patient's data alone, which is what Opacus's
  per-sample clipping and noise assume.
- :class:`InBatchLoss` (the usual CLIP loss): each pair is contrasted
  with the other pairs of the batch. One patient's data then moves the
  other patients' gradients, so clipping no longer bounds one patient's
  influence and the ε reported for it is not a formal guarantee.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LOSSES = ("public_bank", "in_batch")


class PublicBankLoss(nn.Module):
    """InfoNCE of each own pair against a fixed public bank, both directions, averaged per patient."""

    def __init__(self, image_head: nn.Module, text_head: nn.Module, bank_image: torch.Tensor,
                 bank_text: torch.Tensor, temperature: float):
        super().__init__()
        self.image_head = image_head
        self.text_head = text_head
        self.register_buffer("bank_image", bank_image)
        self.register_buffer("bank_text", bank_text)
        self.logit_scale = 1.0 / temperature

    def forward(self, image: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        u = F.normalize(self.image_head(image), dim=-1)
        v = F.normalize(self.text_head(text), dim=-1)
        with torch.no_grad():  # the bank is a constant per step: no per-patient gradient flows through it
            bank_u = F.normalize(self.image_head(self.bank_image), dim=-1)
            bank_v = F.normalize(self.text_head(self.bank_text), dim=-1)
        positive = (u * v).sum(-1, keepdim=True)
        image_to_text = torch.cat([positive, u @ bank_v.T], dim=-1) * self.logit_scale
        text_to_image = torch.cat([positive, v @ bank_u.T], dim=-1) * self.logit_scale
        pair_loss = 0.5 * (torch.logsumexp(image_to_text, -1) + torch.logsumexp(text_to_image, -1)) \
            - positive.squeeze(-1) * self.logit_scale
        return (pair_loss * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)


class InBatchLoss(nn.Module):
    """Symmetric InfoNCE over all real pairs of the batch, averaged per patient (couples patients)."""

    def __init__(self, image_head: nn.Module, text_head: nn.Module, temperature: float):
        super().__init__()
        self.image_head = image_head
        self.text_head = text_head
        self.logit_scale = 1.0 / temperature

    def forward(self, image: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        u = F.normalize(self.image_head(image), dim=-1)
        v = F.normalize(self.text_head(text), dim=-1)
        real = mask.reshape(-1) > 0
        u_flat, v_flat = u.reshape(-1, u.shape[-1])[real], v.reshape(-1, v.shape[-1])[real]
        if len(u_flat) == 0:
            return (u.sum(dim=(1, 2)) + v.sum(dim=(1, 2))) * 0.0
        logits = u_flat @ v_flat.T * self.logit_scale
        target = torch.arange(len(u_flat))
        pair_loss = 0.5 * (F.cross_entropy(logits, target, reduction="none")
                           + F.cross_entropy(logits.T, target, reduction="none"))
        per_pair = torch.zeros(mask.numel(), dtype=pair_loss.dtype).masked_scatter(real, pair_loss)
        return (per_pair.reshape(mask.shape) * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)
