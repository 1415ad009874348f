"""Safe reading of model weights from local files.

safetensors files are read as they are. Other checkpoints go through
``torch.load(weights_only=True)``, which unpickles tensors and plain
containers only. A pickle that would import or call anything else is
rejected with an error naming the file, and nothing in it runs.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from linkrisk.errors import InputError

# Keys under which training scripts commonly nest the weights.
_NESTED_KEYS = ("state_dict", "model_state_dict", "model")


def _unpickler_detail(err: pickle.UnpicklingError) -> str:
    """Return the part of torch's weights-only unpickler error that names the cause.

    torch 2.x puts it in a paragraph after a fixed explanation of ``weights_only``, either as
    "Trying to load unsupported GLOBAL ..." or after "WeightsUnpickler error:".
    """
    paragraphs = [" ".join(part.split()) for part in str(err).split("\n\n") if part.strip()]
    for paragraph in paragraphs[1:]:
        if paragraph.startswith("Check the documentation"):
            continue
        return paragraph.split("WeightsUnpickler error:")[-1].strip() or paragraph
    return paragraphs[0] if paragraphs else type(err).__name__


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict (name to tensor) from a ``.safetensors`` file or a weights-only torch checkpoint.

    A checkpoint that nests its weights under ``state_dict``,
    ``model_state_dict`` or ``model`` is unwrapped.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder; pass the checkpoint file inside it")
    if not path.is_file():
        raise InputError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as err:
            raise InputError(f"{path}: not a readable safetensors file ({err}); the file is damaged or truncated, so "
                             "download or export the weights again") from err
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = _unpickler_detail(err)
        # torch 2.x names a blocked import as "GLOBAL module.name". Any other unpickling error means damage, or
        # pickle opcodes that the weights-only unpickler does not read (such as protocol 4 frames).
        if "GLOBAL" not in detail:
            raise InputError(f"{path}: not a readable torch checkpoint ({detail}); the pickle data is damaged, or "
                             "uses more than tensors and plain containers, which weights-only loading rejects. "
                             "Download or export the weights again, or convert a trusted copy to safetensors") from err
        raise InputError(f"{path}: rejected, because the checkpoint is a pickle that needs more than tensors to "
                         f"load and could run code ({detail}). Convert a trusted copy to safetensors and pass that "
                         "instead") from err
    except (RuntimeError, EOFError, OSError) as err:
        raise InputError(f"{path}: not a readable torch checkpoint ({type(err).__name__}: {err}); the file is "
                         "damaged or truncated, so download or export the weights again") from err

    for key in _NESTED_KEYS:
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
            break
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise InputError(f"{path}: expected a mapping of parameter names to tensors, got {type(loaded).__name__}")
    return dict(loaded)
