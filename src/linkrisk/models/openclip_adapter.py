"""open_clip models as "frozen encoder -> projection head", loaded from local folders.

Two layouts are covered:

* open_clip's native ``CLIP``: a vision tower whose ``proj`` is a bare
  ``[width, embed]`` parameter and a text tower with ``text_projection``
  (parameter or ``nn.Linear``).
* ``CustomTextCLIP`` in BiomedCLIP's layout: a timm vision tower
  (``open_clip.timm_model.TimmModel``) whose ``head`` contains the projection
  (``timm_proj`` "linear", or "mlp" for Linear-GELU-Linear), and a Hugging
  Face text tower (``open_clip.hf_model.HFTextEncoder``) whose ``proj`` is
  Linear-GELU-Linear (``hf_proj_type`` "mlp"), one ``nn.Linear``
  ("linear"), or an identity when the text width equals the embedding size.

The adapter copies each projection into a trainable head of ``nn.Linear``
and activation modules (:mod:`linkrisk.models.convert`) and replaces the
model's own projection with an identity, so the frozen towers return
pre-projection features and the heads reproduce the model's
``encode_image`` / ``encode_text`` output (unnormalised).

Loading is offline. A ``local-dir:PATH`` folder contains
``open_clip_config.json`` (``model_cfg`` and optional ``preprocess_cfg``)
and weights named as open_clip 3.x looks for them. A folder whose only
weights file has a name open_clip does not search for (for example a lone
``model.pt``) is an error here, because open_clip would build a randomly
initialised model with only a log warning. The adapter has open_clip
(3.3.0) read ``.bin`` and ``.pth`` weights with
``torch.load(weights_only=True)``, so a pickle that would import or call
anything beyond tensors is rejected with :class:`~linkrisk.errors.InputError`
before any of it runs.

BiomedCLIP's ``open_clip_config.json`` names its text tower and tokenizer
by Hub id (``hf_model_name``, ``hf_tokenizer_name``). Nothing is
downloaded, so the text tower's Hugging Face files sit in the same
folder::

    biomedclip/
        open_clip_config.json        from microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224
        open_clip_pytorch_model.bin  from the same repository
        config.json                  from the hf_model_name repository
                                     (microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract)
        vocab.txt                    from the hf_tokenizer_name repository (the same one)
        tokenizer_config.json        optional, from the same repository, as is special_tokens_map.json

The text tower is built from the folder's ``config.json`` in place of the
Hub id, and its weights come from the open_clip checkpoint, so the text
model's own weights are not needed. open_clip 3.x reads the tokenizer of a
``local-dir:`` folder from the folder itself; the adapter adds
``local_files_only=True``.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from torch import nn

from linkrisk._logging import logger
from linkrisk.errors import ConfigError, InputError
from linkrisk.models.convert import chain_to_head, copy_linear, projection_to_linear

# Weight file suffixes open_clip 3.x searches for in a local-dir folder.
_SEARCHED_SUFFIXES = (".safetensors", ".bin", ".pth")
_CONFIG_NAME = "open_clip_config.json"
# Hugging Face files of the text tower, read from the model folder.
_TEXT_CONFIG_NAME = "config.json"
_BERT_VOCAB_NAME = "vocab.txt"
_FAST_TOKENIZER_NAME = "tokenizer.json"


class OpenClipAdapter:
    """A frozen open_clip model split into towers (pre-projection features) and trainable projection heads.

    Attributes:
        image_head, text_head: trainable copies of the model's projections,
            ``nn.Linear`` or an ``nn.Sequential`` of ``nn.Linear`` and GELU
            (BiomedCLIP's MLP text projection).
        preprocess: the model's image transform (PIL image to tensor).
        tokenizer: the model's tokenizer (list of str to ``[B, context_length]`` tokens).
        context_length: text tokens per report; longer reports are truncated.
        embed_dim: dimension of the projected embeddings.
    """

    def __init__(self, model: nn.Module, preprocess, tokenizer, name: str):
        import open_clip

        self.name = name
        self.model = model.eval().requires_grad_(False)
        if isinstance(model, open_clip.CLIP) and isinstance(getattr(model.visual, "proj", None), nn.Parameter):
            self.image_head, self.text_head = _split_native_clip(model)
        elif isinstance(model, open_clip.CustomTextCLIP):
            self.image_head = _split_timm_vision(model.visual, name)
            self.text_head = _split_hf_text(model.text, name)
        else:
            raise ConfigError(f"{name}: unsupported open_clip layout {type(model).__name__} with a "
                              f"{type(getattr(model, 'visual', None)).__name__} vision tower; supported are native "
                              "CLIP (vision proj parameter) and CustomTextCLIP with a timm vision tower and a "
                              "Hugging Face text tower (BiomedCLIP)")
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        # BiomedCLIP's tokenizer cuts at text_cfg.context_length (256), below BERT's 512 positions.
        self.context_length = int(getattr(tokenizer, "context_length", None) or model.context_length)
        _check_context_length(model, self.context_length, name)
        hf_tokenizer = getattr(tokenizer, "tokenizer", None)
        self._pad_id = int(getattr(hf_tokenizer, "pad_token_id", None) or 0)
        self.embed_dim = _output_dim(self.image_head)
        self._truncated = 0

    @classmethod
    def from_local_dir(cls, folder: str | Path) -> "OpenClipAdapter":
        """Load ``open_clip_config.json``, its weights and, for a Hugging Face text tower, its files from ``folder``.

        Nothing is downloaded. The module docstring shows the folder layout.
        """
        import open_clip

        folder = Path(folder)
        config_path = folder / _CONFIG_NAME
        config = _read_json(config_path, f"an open_clip model folder needs {_CONFIG_NAME} beside its weights")
        if "model_cfg" not in config:
            raise InputError(f"{config_path}: no model_cfg entry")
        weights = [p for p in folder.iterdir() if p.suffix in _SEARCHED_SUFFIXES]
        if not weights:
            others = sorted(p.name for p in folder.iterdir() if p.name != config_path.name)
            raise InputError(f"{folder}: no weights file open_clip would load ({', '.join(_SEARCHED_SUFFIXES)}); "
                             f"found {others or 'nothing else'}. Rename or convert the weights, for example to "
                             "open_clip_model.safetensors")

        text_cfg = config["model_cfg"].get("text_cfg", {})
        if not text_cfg.get("hf_model_name"):
            model, preprocess = _create_model(folder, weights, {})
            tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
        else:
            _check_text_tower_files(folder, text_cfg)
            # The text tower is built from the folder's config.json in place of the Hub id.
            # The open_clip checkpoint fills its weights.
            local_text_cfg = {**text_cfg, "hf_model_name": str(folder), "hf_model_pretrained": False}
            model, preprocess = _create_model(folder, weights, {"text_cfg": local_text_cfg})
            try:
                # open_clip passes extra keywords on to transformers' AutoTokenizer.from_pretrained.
                tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}", local_files_only=True)
            except (OSError, ValueError) as err:
                raise InputError(f"{folder}: the tokenizer {text_cfg['hf_tokenizer_name']!r} could not be loaded "
                                 f"from the folder ({err}). Copy its tokenizer files (vocab.txt or tokenizer.json, "
                                 "and tokenizer_config.json) into the folder") from err
        logger.info("open_clip model loaded from %s", folder)
        return cls(model, preprocess, tokenizer, f"local-dir:{folder}")

    @classmethod
    def from_hub(cls, name: str, allow_download: bool = False) -> "OpenClipAdapter":
        """Load an ``hf-hub:ORG/REPO`` model through open_clip, which downloads it into the Hugging Face cache.

        Raises:
            ConfigError: ``allow_download`` is false, because this reaches the network.
        """
        import open_clip
        from huggingface_hub import snapshot_download

        if not allow_download:
            raise ConfigError(f"{name} would be downloaded from the Hugging Face Hub; pass --allow-download, or "
                              "download the model once and pass its local folder")
        model, _, preprocess = open_clip.create_model_and_transforms(name, device="cpu", precision="fp32",
                                                                     weights_only=True)
        adapter = cls(model, preprocess, open_clip.get_tokenizer(name), name)
        # The files open_clip fetched, for the weights hash of the feature cache.
        adapter.weights_path = Path(snapshot_download(name.removeprefix("hf-hub:"), local_files_only=True))
        logger.info("open_clip model %s loaded from the Hugging Face cache %s", name, adapter.weights_path)
        return adapter

    def to(self, device: str | torch.device) -> "OpenClipAdapter":
        """Move the frozen towers to ``device``; the heads stay where they are."""
        self.model.to(device)
        return self

    @torch.inference_mode()
    def encode_image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Compute pre-projection image features ``[B, width]`` of preprocessed images ``[B, 3, H, W]``."""
        return self.model.visual(images)

    @torch.inference_mode()
    def encode_text_features(self, texts: list[str]) -> torch.Tensor:
        """Compute pre-projection text features ``[B, width]``; counts reports that fill the whole context."""
        tokens = self.tokenizer(texts)
        # A row without padding was cut at the context length (or fits it exactly, which is rare).
        self._truncated += int((np.asarray(tokens)[:, -1] != self._pad_id).sum())
        return self.model.encode_text(tokens.to(next(self.model.parameters()).device))

    def warn_truncated(self) -> None:
        """Log once how many reports have filled the context length so far (almost all of them cut)."""
        if self._truncated:
            logger.warning("%s: %d reports were longer than %d tokens and were truncated", self.name,
                           self._truncated, self.context_length)


def _split_native_clip(model: nn.Module) -> tuple[nn.Linear, nn.Linear]:
    """Move a native CLIP's ``visual.proj`` and ``text_projection`` into ``nn.Linear`` heads."""
    image_head = projection_to_linear(model.visual.proj)
    projection = model.text_projection
    text_head = projection_to_linear(projection) if isinstance(projection, nn.Parameter) else copy_linear(projection)
    # The towers stop before their projections, and the heads take over.
    model.visual.proj = None
    model.text_projection = None
    return image_head, text_head


def _split_timm_vision(visual: nn.Module, name: str) -> nn.Module:
    """Move a ``TimmModel``'s projection (its ``head``) into a head, so the tower returns trunk features."""
    from open_clip.timm_model import TimmModel
    from timm.layers import Mlp

    if not isinstance(visual, TimmModel):
        raise ConfigError(f"{name}: a CustomTextCLIP needs a timm vision tower (vision_cfg.timm_model_name), got "
                          f"{type(visual).__name__}")
    # TimmModel.head is an nn.Sequential: "drop" + "proj" for timm_proj "linear", "mlp" for "mlp".
    layers: list[nn.Module] = []
    for key, layer in visual.head.named_children():
        if key == "pool":
            raise ConfigError(f"{name}: attention pooling ({type(layer).__name__}, vision_cfg.timm_pool 'abs_attn' "
                              "or 'rot_attn') is not supported, because its projection sits inside the pooling layer")
        if isinstance(layer, Mlp):
            # timm's Mlp.forward applies these in this order.
            layers += [layer.fc1, layer.act, layer.drop1, layer.norm, layer.fc2, layer.drop2]
        else:
            layers.append(layer)
    if not layers:
        raise ConfigError(f"{name}: the timm vision tower has no separate projection (vision_cfg.timm_proj is "
                          "empty or 'none'); supported are timm_proj 'linear' and 'mlp'")
    image_head = chain_to_head(layers)
    visual.head = nn.Identity()
    return image_head


def _split_hf_text(text: nn.Module, name: str) -> nn.Module:
    """Move an ``HFTextEncoder``'s projection (its ``proj``) into a head, so the tower returns pooled features."""
    from open_clip.hf_model import HFTextEncoder

    if not isinstance(text, HFTextEncoder):
        raise ConfigError(f"{name}: a CustomTextCLIP needs a Hugging Face text tower (text_cfg.hf_model_name), got "
                          f"{type(text).__name__}")
    projection = getattr(text, "proj", None)
    if projection is None:
        # open_clip 3.3.0 sets no proj when hf_proj_type is unset and the widths differ, so encode_text fails.
        raise ConfigError(f"{name}: the Hugging Face text tower has no projection; set text_cfg.hf_proj_type to "
                          "'linear' or 'mlp'")
    if isinstance(projection, nn.Identity):
        # The text width equals the embedding size and there is no projection, so the head starts as the identity.
        identity = nn.Linear(text.output_dim, text.output_dim, bias=False)
        with torch.no_grad():
            identity.weight.copy_(torch.eye(text.output_dim))
        text_head = identity
    else:
        layers = list(projection) if isinstance(projection, nn.Sequential) else [projection]
        text_head = chain_to_head(layers)
    text.proj = nn.Identity()
    return text_head


def _output_dim(head: nn.Module) -> int:
    """Return the output size of the last ``nn.Linear`` in ``head``."""
    linears = [layer for layer in head.modules() if isinstance(layer, nn.Linear)]
    return int(linears[-1].out_features)


def _check_context_length(model: nn.Module, context_length: int, name: str) -> None:
    """Raise ConfigError when the tokenizer's context is longer than a Hugging Face text tower's positions."""
    text_config = getattr(getattr(model, "text", None), "config", None)
    positions = getattr(text_config, "max_position_embeddings", None)
    if positions is not None and context_length > positions:
        raise ConfigError(f"{name}: text_cfg.context_length {context_length} exceeds the text tower's "
                          f"max_position_embeddings {positions}; lower context_length in {_CONFIG_NAME}")


def _read_json(path: Path, purpose: str) -> dict:
    """Read a JSON object from ``path``; a missing file raises InputError ending with ``purpose``."""
    if not path.is_file():
        raise InputError(f"{path}: not found; {purpose}")
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(loaded, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(loaded).__name__}")
    return loaded


def _check_text_tower_files(folder: Path, text_cfg: dict) -> None:
    """Raise InputError unless ``folder`` contains the config and tokenizer files of the Hugging Face text tower."""
    from open_clip.hf_configs import arch_dict

    model_name = text_cfg["hf_model_name"]
    tokenizer_name = text_cfg.get("hf_tokenizer_name")
    if not tokenizer_name:
        raise InputError(f"{folder / _CONFIG_NAME}: text_cfg names the Hugging Face text tower {model_name!r} but "
                         "no hf_tokenizer_name, so open_clip would tokenize with CLIP's BPE vocabulary, which does "
                         "not fit that tower; add hf_tokenizer_name (usually the same id as hf_model_name)")

    never_downloaded = f"into {folder}, because linkrisk never downloads models"
    text_config = _read_json(folder / _TEXT_CONFIG_NAME,
                             f"the text tower is the Hugging Face model {model_name!r}; copy its "
                             f"{_TEXT_CONFIG_NAME} {never_downloaded}")
    model_type = text_config.get("model_type")
    if model_type not in arch_dict:
        raise InputError(f"{folder / _TEXT_CONFIG_NAME}: model_type {model_type!r} is not a text tower open_clip "
                         f"supports ({', '.join(arch_dict)}); copy the config.json of {model_name!r}")

    # BERT tokenizers (BiomedCLIP) read vocab.txt, or tokenizer.json when the repository ships one.
    has_vocabulary = (folder / _BERT_VOCAB_NAME).is_file() or (folder / _FAST_TOKENIZER_NAME).is_file()
    if model_type == "bert" and not has_vocabulary:
        raise InputError(f"{folder / _BERT_VOCAB_NAME}: not found; the reports are tokenized with "
                         f"{tokenizer_name!r}; copy its {_BERT_VOCAB_NAME} (and tokenizer_config.json, if it has "
                         f"one) {never_downloaded}")


def _create_model(folder: Path, weights: list[Path], model_overrides: dict) -> tuple[nn.Module, object]:
    """Build a local-dir folder's model with open_clip (weights-only loading); returns ``(model, preprocess)``."""
    import open_clip

    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            f"local-dir:{folder}", device="cpu", precision="fp32", weights_only=True, **model_overrides)
    except pickle.UnpicklingError as err:
        pickles = ", ".join(str(p) for p in weights if p.suffix != ".safetensors")
        # torch 2.x names a blocked import as "GLOBAL module.name". Other errors come from damaged data or from
        # pickle opcodes the weights-only loader does not accept (a raw protocol-4 pickle fails on FRAME).
        if "GLOBAL" in str(err):
            raise InputError(f"{pickles}: rejected, because the checkpoint is a pickle that needs more than tensors "
                             "to load and could run code. Convert a trusted copy to open_clip_model.safetensors "
                             "and remove the pickle") from err
        raise InputError(f"{pickles}: rejected, because torch.load(weights_only=True) cannot read it: the file is "
                         "damaged or uses pickle features beyond plain tensors. Download or export the weights "
                         "again, or convert a trusted copy to open_clip_model.safetensors") from err
    except SafetensorError as err:
        damaged = ", ".join(str(p) for p in weights if p.suffix == ".safetensors")
        raise InputError(f"{damaged}: not a readable safetensors file ({err}); the file is damaged or truncated, so "
                         "download or export the weights again") from err
    except (RuntimeError, EOFError) as err:
        if "Error(s) in loading state_dict" in str(err):
            raise InputError(f"{folder}: the weights do not fit the model that {_CONFIG_NAME} (and config.json for "
                             "a Hugging Face text tower) describe. Check that all files come from one model "
                             f"({err})") from err
        pickles = ", ".join(str(p) for p in weights if p.suffix != ".safetensors") or str(folder)
        # A truncated torch checkpoint fails in its zip reader (RuntimeError) or at the end of the data (EOFError).
        raise InputError(f"{pickles}: not a readable torch checkpoint ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}); the file is damaged or truncated, so "
                         "download or export the weights again") from err
    return model, preprocess
