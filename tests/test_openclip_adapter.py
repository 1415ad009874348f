"""open_clip native CLIP through the adapter: a tiny random model saved as a local folder, loaded offline."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch

from linkrisk.errors import InputError
from linkrisk.models.openclip_adapter import OpenClipAdapter

TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture
def tiny_folder(tmp_path):
    """A randomly initialised native CLIP saved in the local-dir layout (config JSON + safetensors)."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY).eval()
    folder = tmp_path / "tiny-clip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return model, folder


def test_heads_reproduce_model_embeddings(tiny_folder):
    original, folder = tiny_folder
    adapter = OpenClipAdapter.from_local_dir(folder)
    images = torch.randn(3, 3, 32, 32)
    texts = ["synthetic report one", "another synthetic report", "x"]
    with torch.no_grad():
        expected_image = original.encode_image(images)
        expected_text = original.encode_text(adapter.tokenizer(texts))
        image = adapter.image_head(adapter.encode_image_features(images))
        text = adapter.text_head(adapter.encode_text_features(texts))
    torch.testing.assert_close(image, expected_image, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(text, expected_text, rtol=1e-5, atol=1e-5)
    assert adapter.embed_dim == 16
    assert adapter.context_length == 12
    assert isinstance(adapter.image_head, torch.nn.Linear) and isinstance(adapter.text_head, torch.nn.Linear)


def test_long_reports_are_counted(tiny_folder, caplog):
    _, folder = tiny_folder
    adapter = OpenClipAdapter.from_local_dir(folder)
    adapter.encode_text_features(["word " * 40, "short"])
    with caplog.at_level("WARNING", logger="linkrisk"):
        adapter.warn_truncated()
    assert "1 reports were longer than 12 tokens" in caplog.text


def test_lone_pt_checkpoint_is_an_error(tiny_folder):
    _, folder = tiny_folder
    (folder / "open_clip_model.safetensors").rename(folder / "model.pt")
    with pytest.raises(InputError, match=r"no weights file open_clip would load .*found \['model.pt'\]"):
        OpenClipAdapter.from_local_dir(folder)


def test_missing_config_is_named(tmp_path):
    with pytest.raises(InputError, match="open_clip_config.json: not found"):
        OpenClipAdapter.from_local_dir(tmp_path)


@pytest.mark.parametrize("name, keep", [("open_clip_model.safetensors", 100_000), ("open_clip_model.pth", 200_000)])
def test_truncated_weights_are_named(tiny_folder, name, keep):
    """A weights file cut short (an interrupted download) gives one line naming it, not a traceback."""
    _, tiny_folder = tiny_folder
    weights = tiny_folder / name
    if name.endswith(".pth"):
        from safetensors.torch import load_file

        torch.save(load_file(str(tiny_folder / "open_clip_model.safetensors")), weights)
        (tiny_folder / "open_clip_model.safetensors").unlink()
    weights.write_bytes(weights.read_bytes()[:keep])
    with pytest.raises(InputError) as caught:
        OpenClipAdapter.from_local_dir(tiny_folder)
    assert str(weights) in str(caught.value)
    assert "damaged or truncated" in str(caught.value)
