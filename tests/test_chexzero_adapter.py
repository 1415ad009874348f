"""CheXzero-shaped checkpoints: a tiny OpenAI-layout state dict saved with torch.save and loaded in fp32."""

from __future__ import annotations

import open_clip
import pytest
import torch
from PIL import Image

from linkrisk.errors import InputError
from linkrisk.models.chexzero_adapter import PIXEL_MEAN, PIXEL_STD, CheXzeroPreprocess, load_chexzero

# OpenAI's layout derives heads from width // 64, so the tiny towers are 64 wide.
TINY = {"embed_dim": 16, "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1}}


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY).eval()
    path = tmp_path / "best_64_5e-05_original_22000_0.864.pt"
    torch.save(model.state_dict(), path)
    return model, path


def test_checkpoint_loads_in_fp32_and_reproduces_embeddings(checkpoint):
    original, path = checkpoint
    adapter = load_chexzero(path)
    assert all(p.dtype == torch.float32 for p in adapter.model.parameters())
    images = torch.randn(2, 3, 32, 32)
    texts = ["no acute process", "small effusion"]
    with torch.no_grad():
        torch.testing.assert_close(adapter.image_head(adapter.encode_image_features(images)),
                                   original.encode_image(images), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(adapter.text_head(adapter.encode_text_features(texts)),
                                   original.encode_text(adapter.tokenizer(texts)), rtol=1e-5, atol=1e-5)
    assert adapter.context_length == 77


def test_preprocess_uses_chexzero_constants():
    image = Image.new("L", (40, 20), color=200)
    tensor = CheXzeroPreprocess(32)(image)
    assert tensor.shape == (3, 32, 32)
    assert tensor[0, 16, 16].item() == pytest.approx((200 - PIXEL_MEAN) / PIXEL_STD)
    assert tensor[0, 0, 16].item() == pytest.approx((0 - PIXEL_MEAN) / PIXEL_STD)  # padding above the wide image


def test_wrong_state_dict_is_named(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(InputError, match="other.pt: not an OpenAI CLIP ViT state dict"):
        load_chexzero(path)


def test_registry_loads_by_name(checkpoint):
    from linkrisk.errors import ConfigError
    from linkrisk.models.adapters import load_adapter

    _, path = checkpoint
    assert load_adapter("CheXzero", path).embed_dim == 16
    with pytest.raises(ConfigError, match="unknown model 'medclip'; supported: ") as error:
        load_adapter("medclip", path)
    for name in ("clip-vit-b-32", "open-clip", "biomedclip", "hf-clip", "chexzero", "reference", "precomputed"):
        assert name in str(error.value)
    with pytest.raises(InputError, match="not a folder|not found"):
        load_adapter("biovil", path)
