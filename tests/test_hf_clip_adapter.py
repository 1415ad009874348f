"""transformers CLIPModel through the adapter: a tiny random model and hand-written tokenizer, saved and loaded offline."""

from __future__ import annotations

import json
import string

import pytest
import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

from linkrisk.errors import InputError
from linkrisk.models.hf_clip_adapter import HFClipAdapter


@pytest.fixture
def tiny_folder(tmp_path):
    """A tiny CLIPModel, a character-level BPE vocabulary and an image processor in save_pretrained layout."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in string.ascii_lowercase:
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), pad_token="<|endoftext|>")

    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 16, "eos_token_id": 1, "bos_token_id": 0,
                     "pad_token_id": 1},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 1, "num_attention_heads": 2},
        projection_dim=16)
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    folder = tmp_path / "tiny-hf-clip"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return model, folder


def test_heads_reproduce_model_embeddings(tiny_folder):
    original, folder = tiny_folder
    adapter = HFClipAdapter.from_local_dir(folder)
    pixels = torch.randn(2, 3, 32, 32)
    texts = ["lungs clear", "heart enlarged"]
    tokens = adapter.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected_image = original.visual_projection(original.vision_model(pixel_values=pixels).pooler_output)
        expected_text = original.text_projection(original.text_model(**tokens).pooler_output)
        image = adapter.image_head(adapter.encode_image_features(pixels))
        text = adapter.text_head(adapter.encode_text_features(texts))
    torch.testing.assert_close(image, expected_image, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(text, expected_text, rtol=1e-5, atol=1e-5)
    # The same figures through the model's own feature method (a model output in transformers 5).
    output = original.get_image_features(pixel_values=pixels)
    projected = output if isinstance(output, torch.Tensor) else output.pooler_output
    torch.testing.assert_close(image, projected, rtol=1e-5, atol=1e-5)
    assert adapter.embed_dim == 16
    assert adapter.context_length == 16


def test_truncated_reports_are_counted(tiny_folder, caplog):
    _, folder = tiny_folder
    adapter = HFClipAdapter.from_local_dir(folder)
    adapter.encode_text_features(["abcdefghijklmnopqrstuvwxyz", "ok"])
    with caplog.at_level("WARNING", logger="linkrisk"):
        adapter.warn_truncated()
    assert "1 reports were longer than 16 tokens" in caplog.text


def test_missing_tokenizer_names_the_files(tiny_folder):
    _, folder = tiny_folder
    for name in ("vocab.json", "merges.txt", "tokenizer.json"):
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(InputError, match=r"the tokenizer is missing \(tokenizer.json, vocab.json, merges.txt not found\)"):
        HFClipAdapter.from_local_dir(folder)
