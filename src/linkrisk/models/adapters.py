"""Registry of model adapters: short names to loaders of local weights.

Every adapter exposes ``encode_image_features`` and ``encode_text_features``
(frozen, pre-projection), ``image_head`` and ``text_head`` (``nn.Linear``, or
an ``nn.Sequential`` of ``nn.Linear`` and activations where the model's head is an MLP),
the model's preprocessing and tokenizer, ``context_length`` and
``embed_dim``. Weights come from a local path. Nothing is downloaded,
unless an open_clip model is named as ``hf-hub:ORG/REPO`` and the caller
passes ``allow_download``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from linkrisk.errors import ConfigError


def _open_clip(path: Path, allow_download: bool = False):
    from linkrisk.models.openclip_adapter import OpenClipAdapter

    if str(path).startswith("hf-hub:"):
        return OpenClipAdapter.from_hub(str(path), allow_download)
    return OpenClipAdapter.from_local_dir(path)


def _hf_clip(path: Path, allow_download: bool = False):
    from linkrisk.models.hf_clip_adapter import HFClipAdapter

    return HFClipAdapter.from_local_dir(path)


def _reference(path: Path, allow_download: bool = False):
    from linkrisk.models.reference_adapter import ReferenceAdapter

    return ReferenceAdapter(path)


def _precomputed(path: Path, allow_download: bool = False):
    from linkrisk.models.precomputed import PrecomputedAdapter

    return PrecomputedAdapter(path)


def _biovil(path: Path, allow_download: bool = False):
    from linkrisk.models.biovil_adapter import load_biovil

    return load_biovil(path)


def _biovil_t(path: Path, allow_download: bool = False):
    from linkrisk.models.biovil_adapter import load_biovil_t

    return load_biovil_t(path)


def _chexzero(path: Path, allow_download: bool = False):
    from linkrisk.models.chexzero_adapter import load_chexzero

    return load_chexzero(path)


# name -> (loader of a local path, what the path is)
ADAPTERS: dict[str, tuple[Callable, str]] = {
    "clip-vit-b-32": (_open_clip, "an open_clip local-dir folder (open_clip_config.json + weights)"),
    "open-clip": (_open_clip, "an open_clip local-dir folder (open_clip_config.json + weights), or hf-hub:ORG/REPO "
                              "with --allow-download"),
    "biomedclip": (_open_clip, "an open_clip local-dir folder with BiomedCLIP's open_clip_config.json and "
                               "open_clip_pytorch_model.bin, plus its BERT config.json and vocab.txt"),
    "hf-clip": (_hf_clip, "a transformers CLIPModel folder with its tokenizer and image processor"),
    "chexzero": (_chexzero, "a CheXzero checkpoint (.pt state dict or .safetensors)"),
    "biovil": (_biovil, "a local copy of microsoft/BiomedVLP-CXR-BERT-specialized (config.json, CXR-BERT weights, "
                        "vocab.txt, biovil_image_resnet50_proj_size_128.pt or its .safetensors)"),
    "biovil-t": (_biovil_t, "a local copy of microsoft/BiomedVLP-BioViL-T (config.json, CXR-BERT weights, vocab.txt, "
                            "biovil_t_image_model_proj_size_128.pt or its .safetensors)"),
    "reference": (_reference, "a heads folder written by linkrisk demo (runs/demo/models/original)"),
    "precomputed": (_precomputed, "a folder of embeddings made elsewhere (layout: docs/models.md)"),
}


def load_adapter(name: str, weights: str | Path, allow_download: bool = False):
    """Load the model ``name`` from the local ``weights`` path.

    The open_clip names (``clip-vit-b-32``, ``open-clip``, ``biomedclip``)
    also take a Hub name (``hf-hub:ORG/REPO``) in place of a path, but only
    with ``allow_download``.
    """
    name = name.strip().lower()
    if name not in ADAPTERS:
        raise ConfigError(f"unknown model {name!r}; supported: {', '.join(ADAPTERS)}")
    loader, _ = ADAPTERS[name]
    return loader(Path(weights) if not str(weights).startswith("hf-hub:") else weights, allow_download)
