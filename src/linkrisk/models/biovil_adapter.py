"""BioViL and BioViL-T (hi-ml-multimodal) as "frozen encoder -> projection head", loaded from a local folder.

The models are built with hi-ml-multimodal's own classes (the optional
``biovil`` extra): ``ImageModel`` for the ResNet image encoder and
``CXRBertModel`` for the CXR-BERT text model. The code paths used here
run with hi-ml-multimodal 0.2.2, transformers 5.25, timm 1.0.31 and torch
2.14. Its ``TextInferenceEngine`` fails with transformers 5, because it
calls ``batch_encode_plus``, which transformers 5 tokenizers no longer
have, so reports are tokenized here.

Image side. hi-ml-multimodal's projector (1x1 convolution, BatchNorm,
ReLU, 1x1 convolution) runs on every cell of the ResNet feature map, and
the projected cells are then averaged (``ImageModel.forward_post_encoder``).
Because of the ReLU, projecting the mean cell would give a different
embedding. The pre-projection image feature is therefore the whole patch
grid, ``[B, P, C]`` float32, and the image head is
``Linear (convolution and eval BatchNorm folded) -> ReLU -> Linear -> PatchMean``
applied per patch. The features are large: BioViL (ResNet-50, 480x480
input, 15x15 grid) stores 225 x 2048 float32 values, 1.84 MB per image
(18.4 GB for 10,000 images). BioViL-T (448x448 input, 14x14 grid) stores
196 x 256 values, 0.20 MB per image.

BioViL-T's image encoder is a multi-image encoder used here with a single
image. With no prior image, hi-ml-multimodal appends a learned constant
(``missing_previous_emb``) to the 256 channels of every patch, so half of
its 512-channel patch feature is the same for every image. The adapter
returns only the 256 image-dependent channels and folds the constant's
contribution into the bias of the head's first layer. The result is the
same map, with features half the size. The vision transformer that
compares a prior and a current image is not used without a prior image.

Text side. ``CXRBertModel.get_projected_text_embeddings`` applies
``cls_projection_head`` (Linear, exact GELU, LayerNorm, Linear) to the
[CLS] token of the last hidden state. The text feature is that [CLS]
vector, computed by the BERT encoder alone without the masked-language
head. As in hi-ml-multimodal's ``TextInferenceEngine``, trailing ``!``,
``?`` and ``.`` are stripped from each report and a batch is padded to
its longest report. Reports longer than ``max_position_embeddings`` (512
for CXR-BERT) are truncated, which hi-ml-multimodal rejects instead.

Preprocessing follows hi-ml-multimodal's inference path: the image's
values are stretched to 0-255 (``remap_to_uint8``, as its ``load_image``
does), then resized (shorter side 512, bilinear), center-cropped (480 for
BioViL, 448 for BioViL-T), scaled to [0, 1] and repeated to three
channels.

Folder layout. The folder is a local copy of the model's Hub repository,
which contains the CXR-BERT files and the image checkpoint side by side::

    BiomedVLP-CXR-BERT-specialized/      (biovil; BiomedVLP-BioViL-T/ for biovil-t)
        config.json
        pytorch_model.bin or model.safetensors
        vocab.txt                         or tokenizer.json
        tokenizer_config.json             optional
        biovil_image_resnet50_proj_size_128.pt
                                          (biovil-t: biovil_t_image_model_proj_size_128.pt),
                                          or the same name ending in .safetensors

Weights are read weights-only. Nothing is downloaded
(``local_files_only=True``), and the Python files of the Hub repository
are never run.
"""

from __future__ import annotations

import copy
import dataclasses
import pickle
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from linkrisk._logging import logger
from linkrisk.errors import ConfigError, InputError
from linkrisk.models.checkpoints import load_state_dict
from linkrisk.models.convert import as_linear, copy_linear, fold_batchnorm
from linkrisk.models.head_io import PatchMean

_INSTALL_HINT = "install the optional extra: pip install 'linkrisk[biovil]'"
_TEXT_CONFIG_NAME = "config.json"
_TEXT_WEIGHTS_NAMES = ("model.safetensors", "pytorch_model.bin")
_VOCAB_NAMES = ("vocab.txt", "tokenizer.json")
# hi-ml-multimodal's TextInferenceEngine strips these characters from the end of every prompt.
_STRIPPED_SUFFIX = "!?."
# Keys of every hi-ml-multimodal ImageModel state dict. The projector is an nn.Sequential named "model".
_REQUIRED_IMAGE_KEYS = ("encoder.encoder.conv1.weight", "projector.model.0.weight", "projector.model.1.running_mean",
                        "projector.model.1.running_var", "projector.model.3.weight", "projector.model.3.bias")
_MULTI_IMAGE_KEY = "encoder.backbone_to_vit.weight"
# Only ResNet-50's bottleneck blocks have a third convolution.
_BOTTLENECK_KEY = "encoder.encoder.layer1.0.conv3.weight"


@dataclasses.dataclass(frozen=True)
class BioVilVariant:
    """One published BioViL model: its image weights file and inference transform sizes (hi-ml-multimodal 0.2.2)."""

    name: str
    image_weights_name: str
    multi_image: bool
    resize: int = 512
    center_crop: int = 480


BIOVIL = BioVilVariant("biovil", "biovil_image_resnet50_proj_size_128.pt", multi_image=False, center_crop=480)
BIOVIL_T = BioVilVariant("biovil-t", "biovil_t_image_model_proj_size_128.pt", multi_image=True, center_crop=448)


class BioVilPreprocess:
    """Turn a PIL image into a ``[3, crop, crop]`` float tensor the way hi-ml-multimodal's inference path does."""

    def __init__(self, resize: int, center_crop: int):
        from health_multimodal.image.data.transforms import create_chest_xray_transform_for_inference

        self.resize = resize
        self.center_crop = center_crop
        self.transform = create_chest_xray_transform_for_inference(resize=resize, center_crop_size=center_crop)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.mode not in ("L", "F", "I", "I;16"):
            image = image.convert("L")
        return self.transform(Image.fromarray(_stretch_to_uint8(np.asarray(image))))

    def __repr__(self) -> str:
        return f"BioVilPreprocess(stretch to 0-255, resize={self.resize}, center_crop={self.center_crop})"


def _stretch_to_uint8(array: np.ndarray) -> np.ndarray:
    """Map the minimum to 0 and the maximum to 255 with hi-ml-multimodal's ``remap_to_uint8``.

    A constant image becomes all zeros, where ``remap_to_uint8`` would divide by zero.
    """
    from health_multimodal.image.data.io import remap_to_uint8

    if array.size == 0 or array.min() == array.max():
        return np.zeros(array.shape, dtype=np.uint8)
    return remap_to_uint8(array)


class BioVilAdapter:
    """A frozen BioViL or BioViL-T model split into encoders and trainable heads.

    Attributes:
        image_model: hi-ml-multimodal ``ImageModel`` in eval mode. Its projector is not used.
        text_model: hi-ml-multimodal ``CXRBertModel`` in eval mode. Only its BERT encoder runs.
        image_head: per-patch ``Linear -> ReLU -> Linear`` followed by :class:`PatchMean`,
            mapping ``[B, P, C]`` patch features to ``[B, embed_dim]``.
        text_head: ``Linear -> GELU -> LayerNorm -> Linear`` on the [CLS] feature.
        preprocess: :class:`BioVilPreprocess` for the variant's input size.
        tokenizer: the CXR-BERT WordPiece tokenizer.
        context_length: text tokens per report (``max_position_embeddings``). Longer reports are truncated.
        embed_dim: size of the joint embedding space (128 for the published models).
        accepts_float_images: flag for the embedding run to pass 16-bit images as float ``F`` images,
            so they keep their precision until the 0-255 stretch.
    """

    accepts_float_images = True

    def __init__(self, image_model: nn.Module, text_model: nn.Module, tokenizer, variant: BioVilVariant, name: str):
        self.name = name
        self.variant = variant
        self.image_model = image_model.eval().requires_grad_(False)
        self.text_model = text_model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_head, self._image_channels = _split_image_projector(image_model)
        self.text_head = _split_text_projection(text_model)
        self.embed_dim = int(self.image_head[2].out_features)
        text_dim = int(self.text_head[-1].out_features)
        if text_dim != self.embed_dim:
            raise InputError(f"{name}: the image model projects to {self.embed_dim} dimensions but the text model to "
                             f"{text_dim}; the image checkpoint and the CXR-BERT files come from different models")
        self.context_length = int(text_model.config.max_position_embeddings)
        self.preprocess = BioVilPreprocess(variant.resize, variant.center_crop)
        self._truncated = 0

    @classmethod
    def from_local_dir(cls, folder: str | Path, variant: BioVilVariant = BIOVIL,
                       image_weights: str | Path | None = None) -> "BioVilAdapter":
        """Load the image checkpoint and the CXR-BERT model and tokenizer from ``folder`` without network access.

        ``image_weights`` is the path of the image checkpoint. By default it is
        the variant's published file name in ``folder``, or the same name
        ending in ``.safetensors`` when that file exists.
        """
        _import_health_multimodal()
        folder = Path(folder)
        if not folder.is_dir():
            raise InputError(f"{folder}: not a folder; pass a local copy of the {variant.name} model's Hub "
                             "repository (CXR-BERT files and the image checkpoint)")
        _check_text_files(folder)
        image_path = Path(image_weights) if image_weights is not None else _find_image_weights(folder, variant)
        # The text model loads first because it is smaller, so errors in its files show sooner.
        text_model = _load_text_model(folder)
        tokenizer = _load_tokenizer(folder, text_model.config)
        image_model = _load_image_model(image_path, variant)
        logger.info("%s loaded: image weights %s, CXR-BERT from %s", variant.name, image_path, folder)
        return cls(image_model, text_model, tokenizer, variant, f"{variant.name}:{folder}")

    def to(self, device) -> "BioVilAdapter":
        """Move both frozen encoders to ``device``. The heads stay on their device."""
        self.image_model.to(device)
        self.text_model.to(device)
        return self

    @torch.inference_mode()
    def encode_image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Compute the pre-projection patch grid ``[B, P, C]`` (float32) of preprocessed images ``[B, 3, H, W]``.

        ``P`` is the number of ResNet feature-map cells (``(H / 32) * (W / 32)``).
        ``C`` is 2048 for BioViL and 256 for BioViL-T, whose constant second half is left out.
        """
        patches, _ = self.image_model.encoder(images, return_patch_embeddings=True)
        patches = patches[:, :self._image_channels]
        return patches.flatten(2).transpose(1, 2).float().contiguous()

    @torch.inference_mode()
    def encode_text_features(self, texts: list[str]) -> torch.Tensor:
        """Compute the [CLS] vectors ``[B, hidden]`` of the last hidden state and count truncated reports."""
        texts = [text.rstrip(_STRIPPED_SUFFIX) for text in texts]
        lengths = [len(ids) for ids in self.tokenizer(texts, truncation=False)["input_ids"]]
        self._truncated += sum(length > self.context_length for length in lengths)
        tokens = self.tokenizer(texts, padding="longest", truncation=True, max_length=self.context_length,
                                return_tensors="pt")
        device = next(self.text_model.parameters()).device
        # hi-ml-multimodal passes no token_type_ids, so BERT uses zeros, as the tokenizer returns for one segment.
        output = self.text_model.bert(input_ids=tokens["input_ids"].to(device),
                                      attention_mask=tokens["attention_mask"].to(device))
        return output.last_hidden_state[:, 0].float()

    def warn_truncated(self) -> None:
        """Log how many reports were truncated at the context length so far."""
        if self._truncated:
            logger.warning("%s: %d reports were longer than %d tokens and were truncated", self.name,
                           self._truncated, self.context_length)


def load_biovil(path: str | Path) -> BioVilAdapter:
    """Load BioViL from a local copy of microsoft/BiomedVLP-CXR-BERT-specialized."""
    return BioVilAdapter.from_local_dir(path, BIOVIL)


def load_biovil_t(path: str | Path) -> BioVilAdapter:
    """Load BioViL-T, single-image, from a local copy of microsoft/BiomedVLP-BioViL-T."""
    return BioVilAdapter.from_local_dir(path, BIOVIL_T)


def _import_health_multimodal() -> None:
    try:
        import health_multimodal  # noqa: F401
    except ImportError as err:
        raise ConfigError(f"BioViL models need hi-ml-multimodal, which is not installed ({err}); "
                          f"{_INSTALL_HINT}") from err


def _check_text_files(folder: Path) -> None:
    """Raise InputError naming the first CXR-BERT file that ``folder`` lacks."""
    if not (folder / _TEXT_CONFIG_NAME).is_file():
        raise InputError(f"{folder / _TEXT_CONFIG_NAME}: not found; copy the CXR-BERT config.json from the model's "
                         "Hub repository into the folder")
    if not any((folder / name).is_file() for name in _TEXT_WEIGHTS_NAMES):
        raise InputError(f"{folder}: no CXR-BERT weights ({' or '.join(_TEXT_WEIGHTS_NAMES)} not found); copy them "
                         "from the model's Hub repository into the folder")
    if not any((folder / name).is_file() for name in _VOCAB_NAMES):
        raise InputError(f"{folder / _VOCAB_NAMES[0]}: not found; the reports are tokenized with CXR-BERT's "
                         "WordPiece vocabulary, so copy vocab.txt (and tokenizer_config.json) from the model's Hub "
                         "repository into the folder")


def _find_image_weights(folder: Path, variant: BioVilVariant) -> Path:
    """Return the variant's image checkpoint in ``folder``, preferring a safetensors copy."""
    published = folder / variant.image_weights_name
    candidates = (published.with_suffix(".safetensors"), published)
    found = next((path for path in candidates if path.is_file()), None)
    if found is None:
        raise InputError(f"{published}: not found; copy the {variant.name} image checkpoint "
                         f"{variant.image_weights_name} from the model's Hub repository into the folder, or convert it "
                         f"to {published.with_suffix('.safetensors').name}")
    return found


def _image_encoder_type(state: dict[str, torch.Tensor], path: Path, variant: BioVilVariant):
    """Return hi-ml-multimodal's ``ImageEncoderType`` for the state dict, checked against the variant."""
    from health_multimodal.image.model.types import ImageEncoderType

    missing = [key for key in _REQUIRED_IMAGE_KEYS if key not in state]
    if missing:
        raise InputError(f"{path}: not a hi-ml-multimodal ImageModel state dict (missing {', '.join(missing)}); "
                         f"pass the {variant.name} image checkpoint {variant.image_weights_name}")
    multi_image = _MULTI_IMAGE_KEY in state
    if multi_image != variant.multi_image:
        found = "BioViL-T (multi-image)" if multi_image else "BioViL (single-image)"
        other = "biovil-t" if multi_image else "biovil"
        raise InputError(f"{path}: this is a {found} image checkpoint, not {variant.name}; load it as model {other!r}")
    resnet50 = _BOTTLENECK_KEY in state
    if multi_image:
        return ImageEncoderType.RESNET50_MULTI_IMAGE if resnet50 else ImageEncoderType.RESNET18_MULTI_IMAGE
    return ImageEncoderType.RESNET50 if resnet50 else ImageEncoderType.RESNET18


def _load_image_model(path: Path, variant: BioVilVariant) -> nn.Module:
    """Build hi-ml-multimodal's ``ImageModel`` for the checkpoint at ``path`` and load it strictly."""
    from health_multimodal.image.model.model import ImageModel

    # NOTE: the published .pt files were not opened here, only hi-ml-multimodal 0.2.2's key layout was checked.
    # hi-ml-multimodal reads them into this class with torch.load, which is weights-only by default since torch 2.6.
    state = load_state_dict(path)
    encoder_type = _image_encoder_type(state, path, variant)
    joint_size = int(state["projector.model.3.weight"].shape[0])
    # Built without pretrained_model_path, so hi-ml-multimodal reads and downloads nothing.
    model = ImageModel(img_encoder_type=encoder_type, joint_feature_size=joint_size)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise InputError(f"{path}: the weights do not fit a hi-ml-multimodal {encoder_type.value} ImageModel with a "
                         f"{joint_size}-dimensional projection ({err})") from err
    return model.eval()


def _load_text_model(folder: Path) -> nn.Module:
    """Load ``CXRBertModel`` from ``folder`` in float32 and check that its encoder and projection weights loaded."""
    from health_multimodal.text.model import CXRBertModel

    try:
        model, info = CXRBertModel.from_pretrained(folder, local_files_only=True, output_loading_info=True)
    except pickle.UnpicklingError as err:
        weights = folder / _TEXT_WEIGHTS_NAMES[1]
        # torch 2.x names a blocked import as "GLOBAL module.name". Other unpickling errors mean damaged data.
        if "GLOBAL" not in str(err):
            raise InputError(f"{weights}: not a readable torch checkpoint (the pickle data is damaged); download "
                             "or export the weights again") from err
        raise InputError(f"{weights}: rejected, because the checkpoint is a pickle that needs more than tensors to "
                         "load and could run code. Convert a trusted copy to model.safetensors and remove the "
                         "pickle") from err
    except (OSError, ValueError, RuntimeError) as err:
        raise InputError(f"{folder}: the CXR-BERT model could not be loaded ({type(err).__name__}: {err})") from err

    # The masked-language head (cls.predictions) is never used, so only the encoder and projection must load.
    missing = sorted(key for key in info["missing_keys"] if key.startswith(("bert.", "cls_projection_head.")))
    mismatched = sorted(str(key) for key in info.get("mismatched_keys", ()))
    if missing or mismatched:
        problem = f"missing {', '.join(missing)}" if missing else f"wrong shapes for {', '.join(mismatched)}"
        raise InputError(f"{folder}: the weights are not a CXR-BERT model with a projection head ({problem}); "
                         "copy config.json and the weights of one BioViL model from its Hub repository")
    # transformers 5 keeps the dtype the weights were saved in, so a half-precision copy is cast back here.
    return model.float().eval()


def _load_tokenizer(folder: Path, config):
    """Load the CXR-BERT WordPiece tokenizer from ``folder`` and check that its vocabulary fits the model."""
    from health_multimodal.text.model import CXRBertTokenizer

    try:
        tokenizer = CXRBertTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise InputError(f"{folder}: the CXR-BERT tokenizer could not be loaded ({err}); copy vocab.txt and "
                         "tokenizer_config.json from the model's Hub repository into the folder") from err
    size = len(tokenizer)
    # transformers 5 falls back to a vocabulary of only the special tokens when it cannot read one.
    if size <= len(tokenizer.all_special_tokens):
        raise InputError(f"{folder}: the tokenizer has only its {size} special tokens, so vocab.txt or "
                         "tokenizer.json was not read; copy vocab.txt from the model's Hub repository")
    if size > config.vocab_size:
        raise InputError(f"{folder}: the tokenizer has {size} tokens but the model's vocab_size is "
                         f"{config.vocab_size}; vocab.txt and config.json come from different models")
    return tokenizer


def _split_image_projector(image_model: nn.Module) -> tuple[nn.Sequential, int]:
    """Copy the projector into a per-patch head and return ``(head, channels of the patch feature it takes)``.

    BatchNorm is folded with its running statistics, so the head equals the
    projector in eval mode. For BioViL-T, the constant ``missing_previous_emb``
    channels are folded into the first bias.
    """
    convolution, norm, activation, output = image_model.projector.model
    if not isinstance(activation, nn.ReLU):
        raise ConfigError(f"unsupported hi-ml-multimodal projector: expected ReLU between the layers, got "
                          f"{type(activation).__name__}")
    first = fold_batchnorm(convolution, norm)
    encoder = image_model.encoder
    channels = first.in_features
    constant = getattr(encoder, "missing_previous_emb", None)
    if constant is not None:
        # MultiImageEncoder.forward concatenates [current patches, missing_previous_emb] along the channels.
        channels = int(encoder.backbone_to_vit.out_channels)
        reduced = nn.Linear(channels, first.out_features)
        with torch.no_grad():
            reduced.weight.copy_(first.weight[:, :channels])
            reduced.bias.copy_(first.bias + first.weight[:, channels:] @ constant.detach().reshape(-1))
        first = reduced
    head = nn.Sequential(first, nn.ReLU(), as_linear(output), PatchMean())
    return head.requires_grad_(True), channels


def _split_text_projection(text_model: nn.Module) -> nn.Sequential:
    """Copy ``cls_projection_head`` (Linear, GELU, LayerNorm, Linear) into an ``nn.Sequential`` head."""
    projection = text_model.cls_projection_head
    # hi-ml-multimodal 0.2.2 applies the exact (erf) GELU function, which nn.GELU() computes.
    if projection.transform_act_fn is not nn.functional.gelu:
        raise ConfigError(f"unsupported CXR-BERT projection: expected torch.nn.functional.gelu as its activation, got "
                          f"{projection.transform_act_fn!r}")
    head = nn.Sequential(copy_linear(projection.dense_to_hidden), nn.GELU(), copy.deepcopy(projection.LayerNorm),
                         copy_linear(projection.dense_to_output))
    return head.requires_grad_(True)
