"""open_clip models as "frozen encoder -> projection head", loaded from local folders.

Covers open_clip's native CLIP layout: a vision tower whose ``proj`` is a
bare ``[width, embed]`` parameter and a text tower with
``text_projection`` (parameter or ``nn.Linear``). The adapter moves each
projection out of the model into an ``nn.Linear`` head
(:mod:`linkrisk.models.convert`), so the frozen towers return
pre-projection features and the heads reproduce the model's embeddings.

Loading is offline: ``local-dir:PATH`` folders hold ``open_clip_config.json``
(``model_cfg`` and optional ``preprocess_cfg``) and weights named as
open_clip 3.x looks for them. A folder whose only weights file has a name
open_clip does not search for (for example a lone ``model.pt``) is an
error here, because open_clip would build a randomly initialised model
with only a log warning.

NOTE: the BiomedCLIP layout (timm vision tower, Hugging Face text tower
with an MLP head) is not covered yet; such models are rejected by name.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from linkrisk._logging import logger
from linkrisk.errors import ConfigError, InputError
from linkrisk.models.convert import projection_to_linear

# Weight file suffixes open_clip 3.x searches for in a local-dir folder.
_SEARCHED_SUFFIXES = (".safetensors", ".bin", ".pth")


class OpenClipAdapter:
    """A frozen open_clip model split into towers (pre-projection features) and ``nn.Linear`` heads.

    Attributes:
        image_head, text_head: ``nn.Linear`` projections, trainable copies of the model's own.
        preprocess: the model's image transform (PIL image to tensor).
        tokenizer: the model's tokenizer (list of str to ``[B, context_length]`` tokens).
        context_length: text tokens per report; longer reports are truncated.
        embed_dim: dimension of the projected embeddings.
    """

    def __init__(self, model: nn.Module, preprocess, tokenizer, name: str):
        import open_clip

        if not isinstance(model, open_clip.CLIP) or not isinstance(getattr(model.visual, "proj", None), nn.Parameter):
            raise ConfigError(f"{name}: only open_clip's native CLIP layout (vision proj parameter) is supported so "
                              "far; custom text towers such as BiomedCLIP are not")
        self.name = name
        self.model = model.eval().requires_grad_(False)
        self.image_head = projection_to_linear(model.visual.proj)
        projection = model.text_projection
        self.text_head = projection_to_linear(projection) if isinstance(projection, nn.Parameter) else projection
        # The towers stop before their projections; the heads take over.
        model.visual.proj = None
        model.text_projection = None
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.context_length = int(model.context_length)
        self.embed_dim = int(self.image_head.out_features)
        self._truncated = 0

    @classmethod
    def from_local_dir(cls, folder: str | Path) -> "OpenClipAdapter":
        """Load ``open_clip_config.json`` and its weights from ``folder`` without network access."""
        import open_clip

        folder = Path(folder)
        config_path = folder / "open_clip_config.json"
        if not config_path.is_file():
            raise InputError(f"{config_path}: not found; an open_clip model folder needs open_clip_config.json "
                             "beside its weights")
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InputError(f"{config_path}: not valid JSON ({err})") from err
        if "model_cfg" not in config:
            raise InputError(f"{config_path}: no model_cfg entry")
        weights = [p for p in folder.iterdir() if p.suffix in _SEARCHED_SUFFIXES]
        if not weights:
            others = sorted(p.name for p in folder.iterdir() if p.name != config_path.name)
            raise InputError(f"{folder}: no weights file open_clip would load ({', '.join(_SEARCHED_SUFFIXES)}); "
                             f"found {others or 'nothing else'}. Rename or convert the weights, for example to "
                             "open_clip_model.safetensors")
        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}", device="cpu",
                                                                     precision="fp32")
        tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
        logger.info("open_clip model loaded from %s", folder)
        return cls(model, preprocess, tokenizer, f"local-dir:{folder}")

    @torch.inference_mode()
    def encode_image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Compute pre-projection image features ``[B, width]`` of preprocessed images ``[B, 3, H, W]``."""
        return self.model.visual(images)

    @torch.inference_mode()
    def encode_text_features(self, texts: list[str]) -> torch.Tensor:
        """Compute pre-projection text features ``[B, width]``; counts reports that fill the whole context."""
        tokens = self.tokenizer(texts)
        # A row without padding was cut at the context length (or fits it exactly, which is rare).
        self._truncated += int((np.asarray(tokens)[:, -1] != 0).sum())
        return self.model.encode_text(tokens)

    def warn_truncated(self) -> None:
        """Log once how many reports have filled the context length so far (almost all of them cut)."""
        if self._truncated:
            logger.warning("%s: %d reports were longer than %d tokens and were truncated", self.name,
                           self._truncated, self.context_length)
