"""transformers ``CLIPModel`` as "frozen encoder -> projection head", loaded from a local folder.

The towers' pooled outputs (``vision_model(...).pooler_output`` and
``text_model(...).pooler_output``) are the pre-projection features, and
``visual_projection`` and ``text_projection`` (``nn.Linear`` without bias)
are the heads. This reads the towers directly, so it does not depend on
``get_image_features`` and ``get_text_features``, whose return type
changed in transformers 5 from a tensor to a model output.
Loading never touches the network (``local_files_only=True``).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from linkrisk._logging import logger
from linkrisk.errors import InputError

# Files a saved CLIP tokenizer needs: the fast tokenizer file, or the BPE vocabulary and merges.
_TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))


def _check_folder(folder: Path) -> None:
    if not (folder / "config.json").is_file():
        raise InputError(f"{folder / 'config.json'}: not found; expected a CLIPModel saved with save_pretrained")
    if not any((folder / name).is_file() for name in ("model.safetensors", "pytorch_model.bin")):
        raise InputError(f"{folder}: no model.safetensors or pytorch_model.bin; expected a CLIPModel saved with "
                         "save_pretrained")
    if not any(all((folder / name).is_file() for name in files) for files in _TOKENIZER_FILES):
        missing = [name for files in _TOKENIZER_FILES for name in files if not (folder / name).is_file()]
        raise InputError(f"{folder}: the tokenizer is missing ({', '.join(missing)} not found); save the "
                         "tokenizer into the model folder too")
    if not (folder / "preprocessor_config.json").is_file():
        raise InputError(f"{folder / 'preprocessor_config.json'}: not found; save the CLIP image processor into the "
                         "model folder too")


class _ProcessorPreprocess:
    """Apply a CLIP image processor to one PIL image: ``[3, H, W]`` float tensor."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image) -> torch.Tensor:
        return self.processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]

    def __repr__(self) -> str:
        return f"CLIPImageProcessor({self.processor.to_json_string()})"


class HFClipAdapter:
    """A frozen transformers CLIP model split into towers and ``nn.Linear`` heads.

    Attributes:
        image_head, text_head: trainable copies of ``visual_projection`` and ``text_projection``.
        processor: the model's image processor; preprocess: it applied to one PIL image.
        tokenizer: the model's tokenizer.
        context_length: text tokens per report; longer reports are truncated.
        embed_dim: dimension of the projected embeddings.
    """

    def __init__(self, model, tokenizer, processor, name: str):
        self.name = name
        self.model = model.eval().requires_grad_(False)
        self.image_head = copy.deepcopy(model.visual_projection).requires_grad_(True)
        self.text_head = copy.deepcopy(model.text_projection).requires_grad_(True)
        self.tokenizer = tokenizer
        self.processor = processor
        self.context_length = int(model.config.text_config.max_position_embeddings)
        self.embed_dim = int(self.image_head.out_features)
        self._truncated = 0
        self.preprocess = _ProcessorPreprocess(processor)

    @classmethod
    def from_local_dir(cls, folder: str | Path) -> "HFClipAdapter":
        """Load a CLIPModel, its tokenizer and image processor from ``folder`` without network access."""
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        folder = Path(folder)
        _check_folder(folder)
        model = CLIPModel.from_pretrained(folder, local_files_only=True, torch_dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
        logger.info("transformers CLIP model loaded from %s", folder)
        return cls(model, tokenizer, processor, str(folder))

    @torch.inference_mode()
    def encode_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Compute pre-projection image features ``[B, hidden]`` of processed images ``[B, 3, H, W]``."""
        return self.model.vision_model(pixel_values=pixel_values).pooler_output

    @torch.inference_mode()
    def encode_text_features(self, texts: list[str]) -> torch.Tensor:
        """Compute pre-projection text features ``[B, hidden]``; counts reports longer than the context length."""
        lengths = [len(ids) for ids in self.tokenizer(texts, truncation=False)["input_ids"]]
        self._truncated += sum(length > self.context_length for length in lengths)
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=self.context_length,
                                return_tensors="pt").to(self.model.device)
        return self.model.text_model(input_ids=tokens["input_ids"],
                                     attention_mask=tokens["attention_mask"]).pooler_output

    def warn_truncated(self) -> None:
        """Log once how many reports were truncated at the context length so far."""
        if self._truncated:
            logger.warning("%s: %d reports were longer than %d tokens and were truncated", self.name,
                           self._truncated, self.context_length)
