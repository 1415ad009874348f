"""BiomedCLIP layout through the adapter: a tiny random timm + BERT CustomTextCLIP saved as a folder, loaded offline.

The folder has BiomedCLIP's on-disk shape: ``open_clip_config.json`` naming
the text tower by Hub id, ``open_clip_pytorch_model.bin`` (or a
safetensors file), and the BERT ``config.json`` and a hand-written
``vocab.txt`` beside them. Every test runs with sockets blocked.
"""

from __future__ import annotations

import json
import os
import pickle
import socket

import open_clip
import pytest
import torch
from opacus.validators import ModuleValidator
from safetensors.torch import save_file
from torch import nn
from transformers import BertConfig

from linkrisk.errors import ConfigError, InputError
from linkrisk.models.openclip_adapter import OpenClipAdapter

# Special tokens come first, so [PAD] is id 0 as in BERT vocabularies. The words are synthetic test text.
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "no", "is", "are", "and", "of", "with", ".", ",",
         "lung", "##s", "clear", "heart", "size", "normal", "left", "right", "base", "small", "mild", "new",
         "stable", "line", "tube", "seen", "shadow", "zone", "upper", "lower", "side"]
HUB_ID = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
CONTEXT_LENGTH = 16
EMBED_DIM = 16
TEXT_WIDTH = 32
IMAGE_SIZE = 32
# open_clip passes no trunk sizes to timm, so the tiny trunk is timm's registered test_vit (width 64, depth 6).
VISION_WIDTH = 64


def biomedclip_config(timm_proj: str = "linear", hf_proj_type: str = "mlp") -> dict:
    """open_clip_config.json in BiomedCLIP's shape, with a tiny timm model and a short context."""
    return {
        "model_cfg": {
            "embed_dim": EMBED_DIM,
            "vision_cfg": {"timm_model_name": "test_vit", "timm_model_pretrained": False, "timm_pool": "",
                           "timm_proj": timm_proj, "image_size": IMAGE_SIZE},
            "text_cfg": {"hf_model_name": HUB_ID, "hf_tokenizer_name": HUB_ID, "hf_proj_type": hf_proj_type,
                         "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": CONTEXT_LENGTH},
        },
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]},
    }


def write_text_tower_files(folder, hidden_size: int = TEXT_WIDTH) -> None:
    """Write a tiny BERT config.json and the hand-written vocab.txt into ``folder``."""
    BertConfig(vocab_size=len(VOCAB), hidden_size=hidden_size, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=48, max_position_embeddings=64).to_json_file(folder / "config.json")
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")


def save_model_folder(folder, weights: str = "bin", timm_proj: str = "linear", hf_proj_type: str = "mlp"):
    """Build a random BiomedCLIP-style model, save it into ``folder``, and return it in eval mode."""
    folder.mkdir()
    write_text_tower_files(folder)
    config = biomedclip_config(timm_proj, hf_proj_type)
    (folder / "open_clip_config.json").write_text(json.dumps(config), encoding="utf-8")

    # The original is built from the same local config.json the adapter will read.
    model_cfg = json.loads(json.dumps(config["model_cfg"]))
    model_cfg["text_cfg"].update(hf_model_name=str(folder), hf_model_pretrained=False)
    torch.manual_seed(0)
    model = open_clip.CustomTextCLIP(**model_cfg).eval()
    state = model.state_dict()
    if weights == "bin":
        torch.save(state, folder / "open_clip_pytorch_model.bin")
    else:
        tensors = {key: value.contiguous() for key, value in state.items()}
        save_file(tensors, str(folder / "open_clip_model.safetensors"))
    return model


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Block DNS lookups and socket connections, and return the list of attempted calls."""
    attempts = []

    def block_call(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access is blocked in this test")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", block_call)
    monkeypatch.setattr(socket.socket, "connect_ex", block_call)
    monkeypatch.setattr(socket, "getaddrinfo", block_call)
    return attempts


@pytest.fixture
def bin_folder(tmp_path):
    folder = tmp_path / "biomedclip"
    return save_model_folder(folder, "bin"), folder


def embeddings(adapter, original, images, texts):
    """Return (adapter image, model image, adapter text, model text) embeddings, unnormalised."""
    with torch.no_grad():
        tokens = adapter.tokenizer(texts)
        return (adapter.image_head(adapter.encode_image_features(images)), original.encode_image(images),
                adapter.text_head(adapter.encode_text_features(texts)), original.encode_text(tokens))


@pytest.mark.parametrize("weights", ["bin", "safetensors"])
def test_heads_reproduce_model_embeddings(tmp_path, offline, weights):
    folder = tmp_path / "biomedclip"
    original = save_model_folder(folder, weights)
    adapter = OpenClipAdapter.from_local_dir(folder)

    torch.manual_seed(1)
    images = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE)
    texts = ["The lungs are clear.", "no new shadow, heart size normal", "tube seen"]
    image, expected_image, text, expected_text = embeddings(adapter, original, images, texts)

    torch.testing.assert_close(image, expected_image, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(text, expected_text, rtol=1e-5, atol=1e-5)
    assert adapter.embed_dim == EMBED_DIM
    assert offline == [], f"network calls attempted: {offline}"


def test_tokenizer_reads_folder_vocab(bin_folder):
    _, folder = bin_folder
    adapter = OpenClipAdapter.from_local_dir(folder)
    tokens = adapter.tokenizer(["The Lungs are clear."])
    ids = [VOCAB.index(token) for token in ["[CLS]", "the", "lung", "##s", "are", "clear", ".", "[SEP]"]]
    expected = ids + [0] * (CONTEXT_LENGTH - len(ids))
    assert tokens.tolist() == [expected]


@pytest.mark.parametrize("timm_proj, hf_proj_type", [("mlp", "linear"), ("linear", "linear"), ("mlp", "mlp")])
def test_other_projection_types(tmp_path, timm_proj, hf_proj_type):
    folder = tmp_path / "biomedclip"
    original = save_model_folder(folder, "safetensors", timm_proj, hf_proj_type)
    adapter = OpenClipAdapter.from_local_dir(folder)

    torch.manual_seed(2)
    images = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    image, expected_image, text, expected_text = embeddings(adapter, original, images, ["a small line", "x"])

    torch.testing.assert_close(image, expected_image, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(text, expected_text, rtol=1e-5, atol=1e-5)


def test_towers_return_pre_projection_features(bin_folder):
    _, folder = bin_folder
    adapter = OpenClipAdapter.from_local_dir(folder)
    image_features = adapter.encode_image_features(torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE))
    text_features = adapter.encode_text_features(["a", "heart size normal"])
    assert image_features.shape == (2, VISION_WIDTH)
    assert text_features.shape == (2, TEXT_WIDTH)


def test_heads_are_trainable_linear_copies(bin_folder):
    original, folder = bin_folder
    adapter = OpenClipAdapter.from_local_dir(folder)
    allowed = (nn.Linear, nn.GELU, nn.Sequential)
    model_parameters = {id(p) for p in adapter.model.parameters()}
    for head in (adapter.image_head, adapter.text_head):
        kinds = [type(layer).__name__ for layer in head.modules()]
        assert all(isinstance(layer, allowed) for layer in head.modules()), kinds
        ModuleValidator.validate(head, strict=True)
        assert all(p.requires_grad for p in head.parameters())
        assert not any(id(p) in model_parameters for p in head.parameters())
    assert isinstance(adapter.image_head, nn.Linear)
    assert [type(layer) for layer in adapter.text_head] == [nn.Linear, nn.GELU, nn.Linear]


def test_context_length_from_open_clip_config(bin_folder):
    _, folder = bin_folder
    adapter = OpenClipAdapter.from_local_dir(folder)
    # BERT's config allows 64 positions, but the tokenizer cuts at text_cfg.context_length.
    assert adapter.context_length == CONTEXT_LENGTH
    assert adapter.tokenizer(["a"]).shape == (1, CONTEXT_LENGTH)


def test_long_reports_are_counted(bin_folder, caplog):
    _, folder = bin_folder
    adapter = OpenClipAdapter.from_local_dir(folder)
    adapter.encode_text_features(["the lung is clear " * 10, "heart size normal"])
    adapter.encode_text_features(["small shadow " * 20])
    with caplog.at_level("WARNING", logger="linkrisk"):
        adapter.warn_truncated()
    assert f"2 reports were longer than {CONTEXT_LENGTH} tokens" in caplog.text


def test_missing_vocab_is_named(bin_folder):
    _, folder = bin_folder
    (folder / "vocab.txt").unlink()
    with pytest.raises(InputError, match=r"vocab.txt: not found; .*copy its vocab.txt"):
        OpenClipAdapter.from_local_dir(folder)


def test_missing_text_config_is_named(bin_folder):
    _, folder = bin_folder
    (folder / "config.json").unlink()
    with pytest.raises(InputError, match=r"config.json: not found; .*BiomedBERT.*copy its config.json"):
        OpenClipAdapter.from_local_dir(folder)


def test_missing_tokenizer_name_is_an_error(bin_folder):
    _, folder = bin_folder
    config = biomedclip_config()
    del config["model_cfg"]["text_cfg"]["hf_tokenizer_name"]
    (folder / "open_clip_config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(InputError, match="no hf_tokenizer_name"):
        OpenClipAdapter.from_local_dir(folder)


def test_mismatched_text_config_is_an_error(bin_folder):
    _, folder = bin_folder
    write_text_tower_files(folder, hidden_size=TEXT_WIDTH * 2)
    with pytest.raises(InputError, match="weights do not fit"):
        OpenClipAdapter.from_local_dir(folder)


class _RunsCommand:
    """Unpickles by calling os.system, as a malicious checkpoint would."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_code_running_pickle_is_rejected(bin_folder, tmp_path, writer):
    _, folder = bin_folder
    marker = tmp_path / "code-ran"
    weights = folder / "open_clip_pytorch_model.bin"
    payload = {"visual.head.proj.weight": _RunsCommand(marker)}
    if writer == "torch.save":
        torch.save(payload, weights)
    else:
        weights.write_bytes(pickle.dumps(payload, protocol=2))

    with pytest.raises(InputError, match=r"open_clip_pytorch_model.bin: rejected, because .*could run code"):
        OpenClipAdapter.from_local_dir(folder)
    assert not marker.exists()


def test_context_beyond_positions_is_an_error(bin_folder):
    _, folder = bin_folder
    config = biomedclip_config()
    config["model_cfg"]["text_cfg"]["context_length"] = 65
    (folder / "open_clip_config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ConfigError, match="context_length 65 exceeds the text tower's max_position_embeddings 64"):
        OpenClipAdapter.from_local_dir(folder)


def test_unreadable_tokenizer_is_an_error(bin_folder):
    _, folder = bin_folder
    (folder / "vocab.txt").unlink()
    (folder / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(InputError, match="tokenizer .* could not be loaded from the folder"):
        OpenClipAdapter.from_local_dir(folder)
