"""BioViL and BioViL-T through the adapter: tiny random hi-ml-multimodal models saved in the Hub layout, loaded offline.

Each model folder contains the files of the Hub repository: a tiny CXR-BERT
saved with ``save_pretrained``, a hand-written ``vocab.txt`` and
``tokenizer_config.json``, and the image checkpoint under its published
name. The image models are hi-ml-multimodal ``ImageModel``s (ResNet-50
for BioViL, ResNet-18 for BioViL-T) with random weights and non-trivial
BatchNorm statistics, run on small inputs.
Every test runs with sockets blocked.
"""

from __future__ import annotations

import json
import os
import shutil
import socket

import numpy as np
import pytest
import torch
from health_multimodal.image.data.io import load_image
from health_multimodal.image.data.transforms import create_chest_xray_transform_for_inference
from health_multimodal.image.model.model import ImageModel
from health_multimodal.image.model.types import ImageEncoderType
from health_multimodal.text.model import CXRBertConfig, CXRBertModel
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from transformers import BertTokenizer

from linkrisk.data.images import read_image
from linkrisk.errors import InputError
from linkrisk.models.biovil_adapter import (BIOVIL, BIOVIL_T, BioVilAdapter, BioVilPreprocess, load_biovil,
                                            load_biovil_t)
from linkrisk.models.head_io import as_sequential

# Special tokens first, so [PAD] is id 0 and [UNK] id 1 as in BERT vocabularies. The words are synthetic test text.
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "no", "pleural", "effusion", "heart", "size", "is", "normal",
         "lung", "##s", "are", "clear", "mild", "small", "left", "right", "base", "stable", ".", ",", "!", "?"]
UNKNOWN_ID = 1
CONTEXT_LENGTH = 16
EMBED_DIM = 16
# 96x64 inputs give a 3x2 grid of ResNet feature-map cells (stride 32).
IMAGE_HEIGHT, IMAGE_WIDTH = 96, 64
PATCHES = 6
REPORTS = ["No pleural effusion.", "Heart size is normal!", "Lungs are clear, mild left base effusion"]


@pytest.fixture(scope="module")
def offline():
    """Block DNS lookups and socket connections for the whole module and return the list of attempted calls."""
    attempts = []

    def block_call(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access is blocked in this test")

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("TRANSFORMERS_OFFLINE", "1")
        patch.setattr(socket.socket, "connect", block_call)
        patch.setattr(socket.socket, "connect_ex", block_call)
        patch.setattr(socket, "getaddrinfo", block_call)
        yield attempts


@pytest.fixture(autouse=True)
def no_network_attempts(offline):
    yield
    assert offline == []


def write_text_model(folder, weights: str) -> CXRBertModel:
    """Save a tiny random CXR-BERT and its hand-written tokenizer files into ``folder`` and return the model.

    ``weights`` "bin" replaces save_pretrained's model.safetensors with a
    torch-saved pytorch_model.bin, the format the Hub repositories ship.
    """
    folder.mkdir(parents=True)
    config = CXRBertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=48, max_position_embeddings=CONTEXT_LENGTH, projection_size=EMBED_DIM)
    torch.manual_seed(0)
    model = CXRBertModel(config).eval()
    # BERT's 0.02 initialisation makes every [CLS] vector nearly the same, so wider weights tell reports apart.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "LayerNorm" not in name:
                parameter.normal_(0.0, 0.3)
    model.save_pretrained(folder)
    if weights == "bin":
        (folder / "model.safetensors").unlink()
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    # The Hub repositories ship vocab.txt and tokenizer_config.json but no tokenizer.json.
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"do_lower_case": True, "tokenizer_class": "CXRBertTokenizer", "model_max_length": 512}),
        encoding="utf-8")
    return model


def randomize_batch_norms(model: nn.Module, seed: int) -> None:
    """Give every BatchNorm random running statistics, scale and shift, so folding them is tested."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                size = module.num_features
                module.running_mean.copy_(torch.randn(size, generator=generator) * 0.5)
                module.running_var.copy_(torch.rand(size, generator=generator) * 1.5 + 0.5)
                module.weight.copy_(1.0 + 0.2 * torch.randn(size, generator=generator))
                module.bias.copy_(0.2 * torch.randn(size, generator=generator))


def make_image_model(encoder_type: ImageEncoderType, seed: int) -> ImageModel:
    torch.manual_seed(seed)
    model = ImageModel(img_encoder_type=encoder_type, joint_feature_size=EMBED_DIM)
    randomize_batch_norms(model, seed)
    missing = getattr(model.encoder, "missing_previous_emb", None)
    if missing is not None:
        with torch.no_grad():
            missing.normal_(0.0, 1.0)
    return model.eval()


@pytest.fixture(scope="module")
def biovil_files(tmp_path_factory, offline):
    """A BioViL folder with torch-saved text weights and image checkpoint, under their published names."""
    folder = tmp_path_factory.mktemp("biovil") / "BiomedVLP-CXR-BERT-specialized"
    text_model = write_text_model(folder, "bin")
    image_model = make_image_model(ImageEncoderType.RESNET50, seed=1)
    torch.save(image_model.state_dict(), folder / BIOVIL.image_weights_name)
    return folder, image_model, text_model


@pytest.fixture(scope="module")
def biovil_t_files(tmp_path_factory, offline):
    """A BioViL-T folder with text and image weights in safetensors files.

    The published BioViL-T uses ResNet-50. ResNet-18, which hi-ml-multimodal
    also builds as a multi-image encoder, keeps the test fast, and the BioViL
    fixture covers ResNet-50.
    """
    folder = tmp_path_factory.mktemp("biovil-t") / "BiomedVLP-BioViL-T"
    text_model = write_text_model(folder, "safetensors")
    image_model = make_image_model(ImageEncoderType.RESNET18_MULTI_IMAGE, seed=2)
    tensors = {key: value.contiguous() for key, value in image_model.state_dict().items()}
    save_file(tensors, str(folder / BIOVIL_T.image_weights_name.replace(".pt", ".safetensors")))
    return folder, image_model, text_model


@pytest.fixture(scope="module")
def biovil(biovil_files):
    return load_biovil(biovil_files[0])


@pytest.fixture(scope="module")
def biovil_t(biovil_t_files):
    return load_biovil_t(biovil_t_files[0])


def images(seed: int, batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, IMAGE_HEIGHT, IMAGE_WIDTH, generator=torch.Generator().manual_seed(seed))


def test_biovil_image_head_reproduces_model(biovil, biovil_files):
    _, original, _ = biovil_files
    pixels = images(seed=3)
    features = biovil.encode_image_features(pixels)
    assert features.shape == (3, PATCHES, 2048)
    assert features.dtype == torch.float32

    with torch.no_grad():
        expected = original(pixels).projected_global_embedding
        actual = biovil.image_head(features)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    assert biovil.embed_dim == EMBED_DIM


def test_projecting_mean_patch_differs(biovil, biovil_files):
    """The ReLU makes the order matter: projecting the averaged patch is not the model's embedding."""
    _, original, _ = biovil_files
    pixels = images(seed=4)
    first, relu, second, _ = biovil.image_head
    with torch.no_grad():
        expected = original(pixels).projected_global_embedding
        mean_first = second(relu(first(biovil.encode_image_features(pixels).mean(dim=1))))
    assert not torch.allclose(mean_first, expected, rtol=1e-3, atol=1e-3)


def test_biovil_t_image_head_reproduces_model(biovil_t, biovil_t_files):
    _, original, _ = biovil_t_files
    pixels = images(seed=5)
    features = biovil_t.encode_image_features(pixels)
    # Only the 256 image-dependent channels; the constant missing-prior half is folded into the head.
    assert features.shape == (3, PATCHES, 256)

    with torch.no_grad():
        expected = original(pixels).projected_global_embedding
        actual = biovil_t.image_head(features)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", ["biovil", "biovil_t"])
def test_text_head_reproduces_model(request, variant):
    adapter = request.getfixturevalue(variant)
    folder, _, original = request.getfixturevalue(f"{variant}_files")
    # An independent tokenizer, read the way transformers reads the Hub files.
    tokenizer = BertTokenizer.from_pretrained(folder, local_files_only=True)
    tokens = tokenizer([text.rstrip("!?.") for text in REPORTS], padding="longest", return_tensors="pt")
    assert UNKNOWN_ID not in tokens["input_ids"]

    with torch.no_grad():
        expected = original.get_projected_text_embeddings(tokens["input_ids"], tokens["attention_mask"],
                                                          normalize_embeddings=False)
        actual = adapter.text_head(adapter.encode_text_features(REPORTS))
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(actual[0], actual[1], rtol=1e-2, atol=1e-2)
    assert adapter.context_length == CONTEXT_LENGTH


def test_trailing_punctuation_is_stripped(biovil):
    features = biovil.encode_text_features(["lungs are clear.", "lungs are clear", "lungs are clear?!"])
    torch.testing.assert_close(features[0], features[1])
    torch.testing.assert_close(features[2], features[1])


def test_truncated_reports_are_counted(biovil, caplog):
    # A fresh adapter around the loaded models, so counts from other tests do not add up here.
    adapter = BioVilAdapter(biovil.image_model, biovil.text_model, biovil.tokenizer, BIOVIL, "biovil:counting")
    long_report = " ".join(["no pleural effusion"] * 6)
    adapter.encode_text_features([long_report, "heart size is normal"])
    with caplog.at_level("WARNING", logger="linkrisk"):
        adapter.warn_truncated()
    assert f"1 reports were longer than {CONTEXT_LENGTH} tokens" in caplog.text


@pytest.mark.parametrize("variant", ["biovil", "biovil_t"])
def test_heads_pass_opacus_validation(request, variant):
    adapter = request.getfixturevalue(variant)
    assert ModuleValidator.validate(adapter.image_head, strict=True) == []
    assert ModuleValidator.validate(adapter.text_head, strict=True) == []


@pytest.mark.parametrize("variant", ["biovil", "biovil_t"])
def test_heads_convert_to_saved_layer_lists(request, variant):
    adapter = request.getfixturevalue(variant)
    image_copy = as_sequential(adapter.image_head)
    features = adapter.encode_image_features(images(seed=6, batch=2))
    with torch.no_grad():
        torch.testing.assert_close(image_copy(features), adapter.image_head(features))
    as_sequential(adapter.text_head)


def test_image_head_per_sample_gradients(biovil_t):
    """Opacus computes per-sample gradients of the patch-grid head that match one backward pass per image."""
    # Features come from inference mode; a clone is an ordinary tensor that autograd can record.
    features = biovil_t.encode_image_features(images(seed=7)).clone()
    head = as_sequential(biovil_t.image_head)
    wrapped = GradSampleModule(head, loss_reduction="sum")
    wrapped(features).square().sum().backward()

    for index in range(len(features)):
        single = as_sequential(biovil_t.image_head)
        single(features[index:index + 1]).square().sum().backward()
        for (name, parameter), reference in zip(head.named_parameters(), single.parameters()):
            torch.testing.assert_close(parameter.grad_sample[index], reference.grad, rtol=1e-4, atol=1e-6,
                                       msg=f"per-sample gradient of {name}, image {index}")


@pytest.mark.parametrize("bit_depth", [8, 16])
def test_preprocess_matches_hi_ml_pipeline(tmp_path, bit_depth):
    """The adapter's preprocessing equals hi-ml-multimodal's load_image and inference transform."""
    rows = np.linspace(0.2, 0.7, 600)[:, None] * np.linspace(0.5, 1.0, 520)[None, :]
    if bit_depth == 8:
        image = Image.fromarray((rows * 255).astype(np.uint8))
    else:
        image = Image.fromarray((rows * 65535).astype(np.uint16))
    path = tmp_path / "radiograph.png"
    image.save(path)

    expected = create_chest_xray_transform_for_inference(resize=512, center_crop_size=480)(load_image(path))
    actual = BioVilPreprocess(512, 480)(read_image(path))
    assert actual.shape == (3, 480, 480)
    # read_image scales 16-bit values to [0, 1] in float32, so the 8-bit truncation can land one step lower.
    tolerance = 0.0 if bit_depth == 8 else 1.0 / 255 + 1e-6
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=tolerance)


def test_constant_image_preprocesses_to_zeros():
    tensor = BioVilPreprocess(512, 448)(Image.new("L", (600, 500), color=128))
    assert tensor.shape == (3, 448, 448)
    assert tensor.abs().max().item() == 0.0


def copy_text_files(source, target, skip: tuple[str, ...] = ()):
    """Copy the CXR-BERT files of ``source`` into a new folder ``target``, leaving out ``skip``."""
    target.mkdir()
    for name in ("config.json", "model.safetensors", "pytorch_model.bin", "vocab.txt", "tokenizer_config.json"):
        if name not in skip and (source / name).is_file():
            shutil.copy(source / name, target / name)


def test_missing_vocabulary_is_named(biovil_files, tmp_path):
    folder = tmp_path / "no-vocab"
    copy_text_files(biovil_files[0], folder, skip=("vocab.txt",))
    with pytest.raises(InputError, match=r"no-vocab/vocab.txt: not found; the reports are tokenized"):
        load_biovil(folder)


def test_missing_config_is_named(biovil_files, tmp_path):
    folder = tmp_path / "no-config"
    copy_text_files(biovil_files[0], folder, skip=("config.json",))
    with pytest.raises(InputError, match=r"no-config/config.json: not found"):
        load_biovil(folder)


def test_missing_image_checkpoint_is_named(biovil_files, tmp_path):
    folder = tmp_path / "text-only"
    copy_text_files(biovil_files[0], folder)
    with pytest.raises(InputError, match=rf"text-only/{BIOVIL_T.image_weights_name}: not found"):
        load_biovil_t(folder)


def test_wrong_checkpoint_keys_are_named(biovil_files, tmp_path):
    folder = tmp_path / "wrong-keys"
    copy_text_files(biovil_files[0], folder)
    torch.save({"visual.proj": torch.zeros(2, 2)}, folder / BIOVIL.image_weights_name)
    with pytest.raises(InputError, match=r"not a hi-ml-multimodal ImageModel state dict \(missing "
                                         r"encoder.encoder.conv1.weight"):
        load_biovil(folder)


def test_biovil_t_checkpoint_under_biovil_is_rejected(biovil_t_files, tmp_path):
    folder, _, _ = biovil_t_files
    checkpoint = folder / BIOVIL_T.image_weights_name.replace(".pt", ".safetensors")
    with pytest.raises(InputError, match="this is a BioViL-T \\(multi-image\\) image checkpoint, not biovil; load "
                                         "it as model 'biovil-t'"):
        BioVilAdapter.from_local_dir(folder, BIOVIL, image_weights=checkpoint)


def test_mismatched_image_weights_are_named(biovil_files, tmp_path):
    folder = tmp_path / "wrong-shapes"
    copy_text_files(biovil_files[0], folder)
    # A ResNet-18 checkpoint (no bottleneck blocks) keeps the test fast and covers that encoder type.
    state = make_image_model(ImageEncoderType.RESNET18, seed=8).state_dict()
    state["projector.model.3.bias"] = torch.zeros(EMBED_DIM + 1)
    torch.save(state, folder / BIOVIL.image_weights_name)
    with pytest.raises(InputError, match="the weights do not fit a hi-ml-multimodal resnet18 ImageModel"):
        load_biovil(folder)


class _RunsCode:
    """A pickle payload that would create ``marker`` when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_image_checkpoint_is_rejected(biovil_files, tmp_path):
    folder = tmp_path / "malicious-image"
    copy_text_files(biovil_files[0], folder)
    marker = tmp_path / "image-payload-ran"
    torch.save({"encoder.encoder.conv1.weight": _RunsCode(marker)}, folder / BIOVIL.image_weights_name)
    with pytest.raises(InputError, match="rejected, because the checkpoint is a pickle"):
        load_biovil(folder)
    assert not marker.exists()


def test_malicious_text_weights_are_rejected(biovil_files, tmp_path):
    folder = tmp_path / "malicious-text"
    copy_text_files(biovil_files[0], folder, skip=("pytorch_model.bin",))
    marker = tmp_path / "text-payload-ran"
    torch.save({"bert.embeddings.word_embeddings.weight": _RunsCode(marker)}, folder / "pytorch_model.bin")
    (folder / BIOVIL.image_weights_name).write_bytes(b"never read")
    with pytest.raises(InputError, match="pytorch_model.bin: rejected, because the checkpoint is a pickle"):
        load_biovil(folder)
    assert not marker.exists()


def test_text_weights_without_projection_are_rejected(biovil_files, tmp_path):
    source, _, text_model = biovil_files
    folder = tmp_path / "no-projection"
    copy_text_files(source, folder, skip=("pytorch_model.bin",))
    state = {key: value.contiguous() for key, value in text_model.state_dict().items()
             if not key.startswith("cls_projection_head.")}
    torch.save(state, folder / "pytorch_model.bin")
    (folder / BIOVIL.image_weights_name).write_bytes(b"never read")
    with pytest.raises(InputError, match="not a CXR-BERT model with a projection head \\(missing "
                                         "cls_projection_head.LayerNorm.bias"):
        load_biovil(folder)
