"""Checks that a checkpoint folder can replace what a server serves, before the server is touched.

vLLM's weight reload from a bad path kills the engine, so every swap validates first: the folder
exists, has a config of the same architecture and shapes, complete safetensors weights whose tensor
names and shapes match the served model's, and a tokenizer. Only headers are read (no torch).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from humpback.contracts import CheckpointError

# Config fields that must agree for weights to load into the running model.
_SHAPE_FIELDS = (
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "vocab_size", "head_dim", "tie_word_embeddings",
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def _read_json(folder: Path, name: str) -> dict:
    path = folder / name
    if not path.is_file():
        raise CheckpointError(folder, f"{name} is missing")
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(folder, f"{name} is not valid JSON ({exc})") from exc


def safetensors_header(path: Path) -> dict[str, dict]:
    """Tensor name -> {dtype, shape, data_offsets}, from the file's JSON header."""
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError("file too short")
        (size,) = struct.unpack("<Q", raw)
        if size > 100_000_000:
            raise ValueError("header size is implausible")
        header = json.loads(f.read(size))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        f.seek(0, 2)
        if f.tell() < 8 + size + end:
            raise ValueError(f"truncated: {f.tell()} bytes, header promises {8 + size + end}")
    header.pop("__metadata__", None)
    return header


def weight_shapes(folder: Path) -> dict[str, list[int]]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(folder, "no *.safetensors weights")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = set(_read_json(folder, index.name).get("weight_map", {}).values())
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise CheckpointError(folder, f"weight shards missing: {', '.join(missing)}")
    shapes: dict[str, list[int]] = {}
    for f in files:
        try:
            header = safetensors_header(f)
        except (OSError, ValueError) as exc:
            raise CheckpointError(folder, f"{f.name} is not a readable safetensors file ({exc})") from exc
        shapes.update({name: t["shape"] for name, t in header.items()})
    return shapes


def validate_checkpoint(folder: Path, reference: Path) -> None:
    """Raise CheckpointError unless `folder` can replace the full weights served from `reference`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(folder, "no such folder")
    cfg, ref_cfg = _read_json(folder, "config.json"), _read_json(Path(reference), "config.json")
    if cfg.get("architectures") != ref_cfg.get("architectures"):
        raise CheckpointError(
            folder, f"architecture {cfg.get('architectures')} differs from the served {ref_cfg.get('architectures')}"
        )
    for field in _SHAPE_FIELDS:
        if cfg.get(field) != ref_cfg.get(field):
            raise CheckpointError(folder, f"config {field}={cfg.get(field)!r}, the served model has {ref_cfg.get(field)!r}")
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise CheckpointError(folder, f"no tokenizer ({', '.join(_TOKENIZER_FILES)})")
    shapes, ref_shapes = weight_shapes(folder), weight_shapes(Path(reference))
    missing = sorted(set(ref_shapes) - set(shapes))
    if missing:
        raise CheckpointError(folder, f"{len(missing)} tensors missing, e.g. {missing[0]}")
    wrong = sorted(n for n in ref_shapes if shapes[n] != ref_shapes[n])
    if wrong:
        raise CheckpointError(folder, f"tensor {wrong[0]} has shape {shapes[wrong[0]]}, served {ref_shapes[wrong[0]]}")


def validate_adapter(folder: Path) -> None:
    """Raise CheckpointError unless `folder` is a PEFT LoRA adapter vLLM can load at runtime."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(folder, "no such folder")
    cfg = _read_json(folder, "adapter_config.json")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(folder, f"peft_type {cfg.get('peft_type')!r} is not LORA")
    if not (folder / "adapter_model.safetensors").is_file():
        raise CheckpointError(folder, "adapter_model.safetensors is missing")
