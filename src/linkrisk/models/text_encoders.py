"""Frozen text encoder: WordLlama static token embeddings, mean-pooled.

WordLlama (https://github.com/dleemiller/WordLlama) ships pretrained
256-d token embeddings (``l2_supercat``) inside its wheel, so the
reference model works offline. The encoder returns the average token
embedding, not L2-normalised: ``[B, 256]`` float32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from linkrisk.errors import ConfigError


class WordLlamaTextEncoder:
    """Mean-pooled WordLlama embeddings loaded from a local folder.

    Args:
        weights_dir: folder with ``weights/<config>_<dim>.safetensors`` and
            ``tokenizers/<config>_tokenizer_config.json``; default: the
            folder of the installed ``wordllama`` package.
        config_name: WordLlama model config (``l2_supercat``).
        dim: embedding size stored in the weights file (the wheel has 256).
        allow_download: fetch missing files from the Hugging Face Hub.
    """

    name = "wordllama"

    def __init__(self, weights_dir: str | Path | None = None, config_name: str = "l2_supercat", dim: int = 256,
                 allow_download: bool = False):
        import wordllama
        from wordllama import WordLlama

        self.weights_dir = Path(weights_dir) if weights_dir else Path(wordllama.__file__).parent
        self.config_name = config_name
        self.feature_dim = dim
        try:
            self._model = WordLlama.load(config=config_name, dim=dim, cache_dir=self.weights_dir,
                                         disable_download=not allow_download)
        except FileNotFoundError as err:
            raise ConfigError(
                f"WordLlama weights {config_name!r} (dim {dim}) not found under {self.weights_dir}: {err} "
                "Pass the folder holding weights/ and tokenizers/, or allow downloads."
            ) from err

    def config(self) -> dict:
        return {"name": self.name, "config_name": self.config_name, "dim": self.feature_dim}

    def encode(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self._model.embed(list(texts), norm=False), dtype=np.float32)
