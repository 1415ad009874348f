"""Frozen text encoder: WordLlama static token embeddings, mean-pooled.

WordLlama (https://github.com/dleemiller/WordLlama) ships pretrained
256-d token embeddings (``l2_supercat``) inside its wheel, so the
reference model works offline. The encoder returns the average token
embedding, not L2-normalised: ``[B, 256]`` float32.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from linkrisk.errors import ConfigError, InputError


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class WordLlamaTextEncoder:
    """Mean-pooled WordLlama embeddings loaded from a local folder.

    Args:
        weights_dir: folder with ``weights/<config>_<dim>.safetensors`` and
            ``tokenizers/<config>_tokenizer_config.json``; default: the
            folder of the installed ``wordllama`` package.
        config_name: WordLlama model config (``l2_supercat``).
        dim: embedding size stored in the weights file (the wheel has 256).
        allow_download: with no ``weights_dir``, let WordLlama fetch missing
            files from the Hugging Face Hub.

    The weights file's SHA-256 enters :meth:`config`, so cached features
    of other weights are never reused.
    """

    name = "wordllama"

    def __init__(self, weights_dir: str | Path | None = None, config_name: str = "l2_supercat", dim: int = 256,
                 allow_download: bool = False):
        import wordllama
        from safetensors import safe_open
        from wordllama import WordLlama
        from wordllama.config.models import WordLlamaModels
        from wordllama.inference import WordLlamaInference

        self.config_name = config_name
        self.feature_dim = dim
        model_uri = getattr(WordLlamaModels, config_name, None)
        if model_uri is None:
            raise ConfigError(f"unknown WordLlama config {config_name!r}")

        if weights_dir is None and allow_download:
            self.weights_dir = None
            self._model = WordLlama.load(config=config_name, dim=dim, disable_download=False)
            self.weights_sha256 = None
            return

        # Read the two files from one folder directly: WordLlama.load looks in
        # its own package folder before cache_dir, so it would ignore weights_dir.
        self.weights_dir = Path(weights_dir) if weights_dir else Path(wordllama.__file__).parent
        weights = self.weights_dir / "weights" / WordLlama.get_filename(config_name, dim)
        tokenizer = self.weights_dir / "tokenizers" / WordLlama.get_tokenizer_filename(model_uri)
        missing = [str(p) for p in (weights, tokenizer) if not p.is_file()]
        if missing:
            raise InputError(f"WordLlama files not found under {self.weights_dir}: {', '.join(missing)}; pass the "
                             "folder holding weights/ and tokenizers/")
        try:
            with safe_open(str(weights), framework="np", device="cpu") as fh:
                embedding = fh.get_tensor("embedding.weight")
            self._model = WordLlamaInference(embedding, WordLlama.load_tokenizer(tokenizer), binary=False)
        except Exception as err:  # safetensors and tokenizers raise library-specific errors
            raise InputError(f"cannot load WordLlama weights from {self.weights_dir}: {type(err).__name__}: {err}") from err
        if embedding.shape[1] != dim:
            raise InputError(f"{weights}: embeddings have {embedding.shape[1]} dimensions, expected {dim}")
        self.weights_sha256 = _sha256(weights)

    def config(self) -> dict:
        return {"name": self.name, "config_name": self.config_name, "dim": self.feature_dim,
                "weights_sha256": self.weights_sha256}

    def encode(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self._model.embed(list(texts), norm=False), dtype=np.float32)
