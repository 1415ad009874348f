"""CheXzero checkpoints: OpenAI CLIP ViT-B/32 state dicts fine-tuned on chest radiographs.

A checkpoint is a torch-saved state dict in OpenAI CLIP's key layout. It
is read weights-only (:func:`~linkrisk.models.checkpoints.load_state_dict`),
built with open_clip's OpenAI builder (QuickGELU), and kept in fp32: the
builder casts weights to fp16, so the model is cast back to fp32 and the
state dict loaded again at full precision. CheXzero's own preprocessing
applies: grayscale replicated to three channels, padded to a square,
resized to the model's input size, and normalised on the 0-255 scale with
mean 101.48761 and standard deviation 83.43944. CheXzero's public training
and zero-shot code applies these constants with ``Normalize`` and then a
bicubic ``Resize`` to 224 for models started from OpenAI CLIP; both steps
are linear, so their order does not change the result beyond rounding.
Reports are tokenised with CLIP's BPE to the checkpoint's context length
(77 for CheXzero).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from linkrisk._logging import logger
from linkrisk.errors import InputError
from linkrisk.models.checkpoints import load_state_dict
from linkrisk.models.openclip_adapter import OpenClipAdapter

PIXEL_MEAN = 101.48761
PIXEL_STD = 83.43944


class CheXzeroPreprocess:
    """Turn a PIL image into a ``[3, size, size]`` float tensor the CheXzero way."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        gray = ImageOps.pad(image.convert("L"), (self.size, self.size), method=Image.Resampling.BICUBIC, color=0)
        pixels = torch.from_numpy(np.asarray(gray, dtype=np.float32))
        return ((pixels - PIXEL_MEAN) / PIXEL_STD).expand(3, -1, -1).clone()


def load_chexzero(path: str | Path) -> OpenClipAdapter:
    """Load a CheXzero checkpoint (``.pt`` state dict or ``.safetensors``) as an adapter, in fp32."""
    import open_clip
    from open_clip.model import build_model_from_openai_state_dict

    path = Path(path)
    state = load_state_dict(path)
    required = ("visual.proj", "visual.conv1.weight", "text_projection", "positional_embedding",
                "token_embedding.weight", "ln_final.weight")
    missing = [key for key in required if key not in state]
    if missing:
        raise InputError(f"{path}: not an OpenAI CLIP ViT state dict (missing {', '.join(missing)}); CheXzero "
                         "checkpoints keep OpenAI CLIP's parameter names")
    try:
        model = build_model_from_openai_state_dict(dict(state), quick_gelu=True, cast_dtype=None)
        model.float()
        model.load_state_dict({k: v for k, v in state.items() if k not in ("input_resolution", "context_length",
                                                                           "vocab_size")})
    except (RuntimeError, ValueError, KeyError) as err:
        raise InputError(f"{path}: the state dict does not fit an OpenAI CLIP ViT ({err})") from err
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=int(model.context_length))
    logger.info("CheXzero checkpoint loaded from %s (fp32, context length %d)", path, model.context_length)
    return OpenClipAdapter(model, CheXzeroPreprocess(int(model.visual.image_size[0])), tokenizer, f"chexzero:{path}")
