"""Whether a model's weights load with its ``config.json``, from the safetensors headers only.

A config whose sizes differ from the weights' (``hidden_size`` edited, the wrong checkpoint
beside it) or a truncated ``model.safetensors`` passes a look for the files, and then every
trial fails at load. The headers say each tensor's shape and where its bytes end; reading them
(``safetensors.safe_open``, no torch) takes milliseconds, so the run stops before any trial.
``pytorch_model.bin`` files cannot be read without torch: they are left to the load.

Example:
    >>> weights_problem(Path("/nonexistent"))
    ''
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from search.spec.model_resolve import weights_files

# Tensor name endings -> the config fields their shape must equal, in order.
SHAPES: dict[str, tuple[str, ...]] = {
    "word_embeddings.weight": ("vocab_size", "hidden_size"),
    "embed_tokens.weight": ("vocab_size", "hidden_size"),
    "position_embeddings.weight": ("max_position_embeddings", "hidden_size"),
    "intermediate.dense.weight": ("intermediate_size", "hidden_size"),
    "mlp.up_proj.weight": ("intermediate_size", "hidden_size"),
}
_FLOATS = ("F16", "BF16", "F32", "F64")
_LAYER = re.compile(r"(?:^|\.)layers?\.(\d+)\.")  # encoder.layer.3. / model.layers.3.


def _shapes(files: list[Path]) -> tuple[dict[str, list[int]], str]:
    """Tensor name -> shape over ``files`` (safetensors only), or '' and the first problem."""
    from safetensors import SafetensorError
    from safetensors import safe_open

    shapes: dict[str, list[int]] = {}
    for file in files:
        if file.suffix != ".safetensors":
            continue
        try:
            with safe_open(str(file), framework="numpy") as f:
                for name in f.keys():  # noqa: SIM118 - a safe_open handle, not a dict
                    tensor = f.get_slice(name)
                    if tensor.get_dtype() in _FLOATS:  # packed (quantised) shapes differ
                        shapes[name] = list(tensor.get_shape())
        except (SafetensorError, OSError) as exc:
            why = " ".join(str(exc).split()).removeprefix("Error while deserializing header: ")
            size = file.stat().st_size if file.exists() else 0
            return {}, (
                f"{file}: not a whole safetensors file ({why}; {size} bytes): truncated or "
                "corrupt, copy or download it again"
            )
    return shapes, ""


def _config(directory: Path) -> dict[str, Any]:
    try:
        raw = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # unreadable: the spec check says so (search.spec.load)
    return raw if isinstance(raw, dict) else {}


def weights_problem(directory: Path) -> str:
    """'' when the safetensors weights in ``directory`` fit its ``config.json``, else one line
    naming the file, the tensor and the config field (or the truncated file)."""
    files = weights_files(directory) if directory.is_dir() else []
    shapes, problem = _shapes(files)
    if problem or not shapes:
        return problem
    config = _config(directory)
    config_file = directory / "config.json"
    for name, shape in sorted(shapes.items()):
        fields = next((f for end, f in SHAPES.items() if name.endswith(end)), None)
        if fields is None:
            continue
        expected = [config.get(f) for f in fields]
        for field, want, got in zip(fields, expected, shape, strict=False):
            if isinstance(want, int) and want != got:
                return (
                    f"{config_file}: {field} is {want}, but tensor {name} in "
                    f"{_file_of(files, name)} has shape {shape} ({' x '.join(fields)}): the "
                    "config and the weights are of different models"
                )
    # Fewer layers than the config: the rest would be trained from random weights. More: the
    # load drops them (a config cut to its first N layers is a known way to shrink a model).
    layers = {int(m.group(1)) for name in shapes if (m := _LAYER.search(name))}
    want_layers = config.get("num_hidden_layers")
    if layers and isinstance(want_layers, int) and len(layers) < want_layers:
        return (
            f"{config_file}: num_hidden_layers is {want_layers}, but the weights in "
            f"{files[0].parent} hold {len(layers)} layers: the config and the weights are of "
            "different models"
        )
    return ""


def _file_of(files: list[Path], name: str) -> str:
    """The file that holds tensor ``name`` (the first one when only one is there)."""
    if len(files) == 1:
        return str(files[0])
    from safetensors import safe_open

    for file in files:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="numpy") as f:
                if name in f.keys():  # noqa: SIM118
                    return str(file)
    return str(files[0])
