"""The offline reference model as an adapter: fixed image encoder, WordLlama text, fitted heads.

``linkrisk demo`` fits the reference model's heads and saves them as
``models/original/`` (or ``models/dp/``): ``heads.json`` names the image
encoder config (``randconv`` or ``histdct``) and the WordLlama config with
its weights' SHA-256, and ``heads.safetensors`` holds the heads. This
adapter rebuilds the same encoders from that folder and exposes the
heads as plain ``nn.Linear`` layers: each head's fixed standardisation
``(x - mean) / std`` is folded into its linear layer, which computes the
same map up to float rounding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from linkrisk.data.images import grayscale_array
from linkrisk.errors import InputError
from linkrisk.models.heads import fold_standardisation, load_heads
from linkrisk.models.image_encoders import create_image_encoder
from linkrisk.models.text_encoders import WordLlamaTextEncoder


class GrayscalePreprocess:
    """Turn a PIL image (mode ``L`` or ``F``) into a ``[size, size]`` float tensor in [0, 1], as the demo does."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.mode not in ("L", "F"):
            image = image.convert("L")
        return torch.tensor(grayscale_array(image, self.size))

    def __repr__(self) -> str:
        return f"GrayscalePreprocess(size={self.size}, resample=bilinear, range=[0, 1])"


class ReferenceAdapter:
    """The reference model rebuilt from a heads folder written by ``linkrisk demo``.

    Args:
        folder: ``models/original`` or ``models/dp`` of a demo run.
        text_weights: folder with WordLlama ``weights/`` and ``tokenizers/``
            (default: the installed ``wordllama`` package). Its weights must
            have the SHA-256 recorded in ``heads.json``.
    """

    context_length = None  # WordLlama reads whole texts; nothing is truncated.
    accepts_float_images = True  # 16-bit images reach the preprocessing at full precision, as in the demo.

    def __init__(self, folder: str | Path, text_weights: str | Path | None = None):
        folder = Path(folder)
        heads, metadata = load_heads(folder)
        for key in ("image_encoder", "text_encoder"):
            if key not in metadata:
                raise InputError(f"{folder / 'heads.json'}: no {key} entry; pass a heads folder written by "
                                 "linkrisk demo (models/original or models/dp)")
        try:
            image_config = dict(metadata["image_encoder"])
            self.image_encoder = create_image_encoder(image_config.pop("name"), **image_config)
            text_config = dict(metadata["text_encoder"])
            config_name, dim = str(text_config["config_name"]), int(text_config["dim"])
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(f"{folder / 'heads.json'}: damaged encoder entry ({type(err).__name__}: {err}); "
                             "pass a heads folder written by linkrisk demo") from err
        self.text_encoder = WordLlamaTextEncoder(text_weights, config_name=config_name, dim=dim)
        if self.text_encoder.weights_sha256 != text_config.get("weights_sha256"):
            raise InputError(f"{folder / 'heads.json'}: the heads were fitted on WordLlama weights with SHA-256 "
                             f"{text_config.get('weights_sha256')}, but {self.text_encoder.weights_dir} holds "
                             f"{self.text_encoder.weights_sha256}; install the wordllama version the heads were "
                             "fitted with, or pass its folder as text_weights (Python API)")

        self.name = f"reference:{folder}"
        self.image_head = fold_standardisation(heads.image_head)
        self.text_head = fold_standardisation(heads.text_head)
        self.preprocess = GrayscalePreprocess(self.image_encoder.image_size)
        self.tokenizer = None
        self.embed_dim = int(self.image_head.out_features)
        self.config = {"image_encoder": self.image_encoder.config(), "text_encoder": self.text_encoder.config()}

    @torch.inference_mode()
    def encode_image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Compute encoder features ``[B, feature_dim]`` of preprocessed images ``[B, size, size]``."""
        return torch.from_numpy(self.image_encoder.encode(images.float().cpu().numpy()))

    @torch.inference_mode()
    def encode_text_features(self, texts: list[str]) -> torch.Tensor:
        """Compute mean-pooled WordLlama features ``[B, 256]``."""
        return torch.from_numpy(np.ascontiguousarray(self.text_encoder.encode(texts)))

    def warn_truncated(self) -> None:
        """Log nothing: WordLlama pools over every token, so no report is truncated."""
