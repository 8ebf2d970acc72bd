"""Checkpoint validation on real model folders: what a swap refuses before touching a server, and why.

Every refused kind is built from the real model folder: its small files copied, its weights hard-linked,
or a safetensors file written by hand (8-byte little-endian header length, JSON header, data) with the
real model's tensors. Such a file is sparse (its data are zeros that take no disk), so a kind costs
milliseconds; only the NaN/Inf kinds read all of it. `REFUSED` is shared with tests/services/test_serve.py,
which sends the kinds through `humpback serve swap` to a real server.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest

from humpback.contracts import CheckpointError
from services.checkpoint import validate_adapter, validate_checkpoint
from tests.services.helpers import copy_small_files, edit_config, linked_checkpoint

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
NORM = "model.norm.weight"
EMBED = "model.embed_tokens.weight"
BITS = {"BF16": 16, "F32": 32, "I8": 8, "BOOL": 8}
# The fixes the messages name.
EXPORT = "export the model again with save_pretrained(safe_serialization=True)"
TOKENIZER = "copy the served model's tokenizer files, or save the tokenizer with save_pretrained"
OTHER_MODEL = "only a fine-tune of the served model can replace it"
NONFINITE = ("holds NaN or Inf values: the training diverged; deploy an earlier checkpoint or train with a "
             "lower learning rate")

Tensors = dict[str, tuple[str, list[int]]]


def served_tensors(model_dir: Path) -> Tensors:
    """The real model's tensors, name -> (dtype, shape), in file order."""
    with (model_dir / WEIGHTS).open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__")
    ordered = sorted(header.items(), key=lambda item: item[1]["data_offsets"])
    return {name: (t["dtype"], t["shape"]) for name, t in ordered}


def laid_out(tensors: Tensors) -> tuple[dict, int]:
    """A safetensors header for `tensors` back to back, as safetensors writes them, and the data's size."""
    header: dict = {"__metadata__": {"format": "pt"}}
    end = 0
    for name, (dtype, shape) in tensors.items():
        size = BITS[dtype] * math.prod(shape) // 8
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [end, end + size]}
        end += size
    return header, end


def write_raw(path: Path, header: object, data_size: int, poke: dict[int, bytes] | None = None) -> int:
    """Write a safetensors file of `header` and `data_size` zero bytes (sparse), with `poke` bytes at
    data offsets; returns the file's size."""
    raw = json.dumps(header).encode()
    path.unlink(missing_ok=True)  # never write through a hard link to the real weights
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for offset, data in (poke or {}).items():
            f.seek(8 + len(raw) + offset)
            f.write(data)
        f.truncate(8 + len(raw) + data_size)
    return 8 + len(raw) + data_size


def write_tensors(path: Path, tensors: Tensors, poke: dict[str, tuple[int, bytes]] | None = None) -> dict:
    """Write `tensors` laid out; `poke` puts bytes at a byte offset inside named tensors. Returns the header."""
    header, size = laid_out(tensors)
    at = {header[name]["data_offsets"][0] + offset: data for name, (offset, data) in (poke or {}).items()}
    write_raw(path, header, size, at)
    return header


# --- the refused kinds: each builds a folder in `dst` and returns it with the problem it must be refused for ---


def inconsistent_offsets(model_dir: Path, dst: Path) -> tuple[Path, str]:
    """The final norm's data range is 2 bytes longer than BF16 x [576]; every tensor after it moves along."""
    folder = copy_small_files(model_dir, dst)
    header, size = laid_out(served_tensors(model_dir))
    norm = header[NORM]["data_offsets"]
    for entry in list(header.values())[1:]:
        if entry["data_offsets"][0] >= norm[1]:
            entry["data_offsets"] = [o + 2 for o in entry["data_offsets"]]
    norm[1] += 2
    write_raw(folder / WEIGHTS, header, size + 2)
    return folder, (f"{WEIGHTS} is not a valid safetensors file (tensor {NORM}: data_offsets {norm} hold 1154 "
                    f"bytes, BF16 x [576] needs 1152): {EXPORT}")


def overlapping_offsets(model_dir: Path, dst: Path) -> tuple[Path, str]:
    folder = copy_small_files(model_dir, dst)
    header, size = laid_out(served_tensors(model_dir))
    second = list(header)[2]  # the tensor after the first (after __metadata__)
    header[second]["data_offsets"] = [o - 2 for o in header[second]["data_offsets"]]
    write_raw(folder / WEIGHTS, header, size)
    return folder, (f"{WEIGHTS} is not a valid safetensors file (tensor {second} at data_offsets "
                    f"{header[second]['data_offsets']} overlaps the tensor before it): {EXPORT}")


def out_of_file(model_dir: Path, dst: Path) -> tuple[Path, str]:
    folder = copy_small_files(model_dir, dst)
    header, size = laid_out(served_tensors(model_dir))
    last = header[list(header)[-1]]["data_offsets"]
    file_size = write_raw(folder / WEIGHTS, header, size - (last[1] - last[0]))
    return folder, (f"{WEIGHTS} is not a valid safetensors file (truncated: {file_size} bytes, the header promises "
                    f"{file_size + last[1] - last[0]}): {EXPORT}")


def other_dtype(dtype: str, model_dir: Path, dst: Path) -> tuple[Path, str]:
    folder = copy_small_files(model_dir, dst)
    tensors = served_tensors(model_dir)
    tensors[NORM] = (dtype, tensors[NORM][1])
    write_tensors(folder / WEIGHTS, tensors)
    return folder, (f"tensor {NORM} in {WEIGHTS} is {dtype}, the served model's is BF16: export the weights "
                    "model.to(torch.bfloat16)")


def extra_tensor(model_dir: Path, dst: Path) -> tuple[Path, str]:
    folder = copy_small_files(model_dir, dst)
    tensors = served_tensors(model_dir)
    write_tensors(folder / WEIGHTS, {**tensors, "lm_head.weight": tensors[EMBED]})
    return folder, (f"tensor lm_head.weight in {WEIGHTS} is not in the served model (1 such): export the merged "
                    "model (merge_and_unload) only")


def stray_adapter(model_dir: Path, dst: Path) -> tuple[Path, str]:
    folder = linked_checkpoint(model_dir, dst)
    write_tensors(folder / "adapter_model.safetensors",
                  {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": ("BF16", [8, 576])})
    return folder, ("adapter_model.safetensors is a LoRA adapter beside full weights (a reload would load it as "
                    "weights): remove it, or swap the adapter alone with --method lora")


def stray_weights(name: str, model_dir: Path, dst: Path) -> tuple[Path, str]:
    folder = linked_checkpoint(model_dir, dst)
    (folder / name).write_bytes(b"\x80\x02}q\x00.")  # an empty pickled state dict
    return folder, (f"{name} lies beside the safetensors weights, and a loader that prefers it would serve other "
                    "weights: remove it")


def stale_shard_beside_weights(model_dir: Path, dst: Path) -> tuple[Path, str]:
    folder = linked_checkpoint(model_dir, dst)
    write_tensors(folder / SHARDS[1], {NORM: ("BF16", [64])})
    return folder, f"tensor {NORM} is in both {SHARDS[1]} and {WEIGHTS}: one is a stale shard; remove it"


def stale_shard_beside_index(model_dir: Path, dst: Path) -> tuple[Path, str]:
    folder = linked_checkpoint(model_dir, dst)
    (folder / INDEX).write_text(json.dumps({"weight_map": {name: WEIGHTS for name in served_tensors(model_dir)}}))
    write_tensors(folder / SHARDS[1], {NORM: ("BF16", [64])})
    return folder, f"{SHARDS[1]} is not named in {INDEX}: a stale shard; remove it"


def sharded(model_dir: Path, folder: Path, norm_shape: list[int] | None = None) -> dict[str, str]:
    """The model in two shards (the final norm alone in the second) and its index; the weight map."""
    tensors = served_tensors(model_dir)
    norm = tensors.pop(NORM)
    write_tensors(folder / SHARDS[0], tensors)
    write_tensors(folder / SHARDS[1], {NORM: (norm[0], norm_shape or norm[1])})
    weight_map = {**{name: SHARDS[0] for name in tensors}, NORM: SHARDS[1]}
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


def shard_of_wrong_shape(model_dir: Path, dst: Path) -> tuple[Path, str]:
    folder = copy_small_files(model_dir, dst)
    sharded(model_dir, folder, norm_shape=[64])
    return folder, f"tensor {NORM} in {SHARDS[1]} has shape [64], served [576]: {OTHER_MODEL}"


def index_disagrees(model_dir: Path, dst: Path) -> tuple[Path, str]:
    folder = copy_small_files(model_dir, dst)
    weight_map = sharded(model_dir, folder)
    (folder / INDEX).write_text(json.dumps({"weight_map": {**weight_map, EMBED: SHARDS[1]}}))
    return folder, f"{INDEX} puts tensor {EMBED} in {SHARDS[1]}, which does not hold it: a stale index or shard; {EXPORT}"


def index_names_missing_shard(model_dir: Path, dst: Path) -> tuple[Path, str]:
    folder = copy_small_files(model_dir, dst)
    sharded(model_dir, folder)
    (folder / SHARDS[1]).unlink()
    return folder, f"weight shards missing: {SHARDS[1]} (named in {INDEX}): {EXPORT}"


def nonfinite(tensor: str, at_end: bool, value: bytes, model_dir: Path, dst: Path) -> tuple[Path, str]:
    folder = copy_small_files(model_dir, dst)
    tensors = served_tensors(model_dir)
    offset = 2 * math.prod(tensors[tensor][1]) - 2 if at_end else 0
    write_tensors(folder / WEIGHTS, tensors, poke={tensor: (offset, value)})
    return folder, f"tensor {tensor} in {WEIGHTS} {NONFINITE}"


def with_tokenizer(text: str, problem: str, model_dir: Path, dst: Path) -> tuple[Path, str]:
    folder = linked_checkpoint(model_dir, dst)
    (folder / "tokenizer.json").write_text(text)
    return folder, problem


def foreign_tokenizer(model_dir: Path, dst: Path) -> tuple[Path, str]:
    """A GPT-2-sized vocabulary: ids past the model's embedding table."""
    tok = {"model": {"type": "BPE", "vocab": {f"t{i}": i for i in range(50257)}, "merges": []}, "added_tokens": []}
    return with_tokenizer(json.dumps(tok), f"tokenizer.json has token ids up to 50256, beyond the model's vocab_size "
                                           f"49152: a tokenizer of another model; {TOKENIZER}", model_dir, dst)


def reordered_tokenizer(model_dir: Path, dst: Path) -> tuple[Path, str]:
    """The served vocabulary with two ids swapped: same size, other tokens."""
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    first, second = list(vocab)[100:102]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    return with_tokenizer(json.dumps(tok), f"tokenizer.json's vocabulary is not the served model's ({len(vocab)} "
                                           f"tokens, the served {len(vocab)}; 2 unknown or with other ids): "
                                           f"{TOKENIZER}", model_dir, dst)


def symlink_out(name: str, model_dir: Path, dst: Path) -> tuple[Path, str]:
    """`name` is a symlink to a valid file outside the folder."""
    folder = linked_checkpoint(model_dir, dst)
    outside = dst.parent / f"{dst.name}-{name}"
    (folder / name).replace(outside)
    (folder / name).symlink_to(outside)
    return folder, (f"{name} is a symlink to {outside.resolve()}, outside the folder: copy the file into the folder "
                    "(the server must read what was checked)")


def with_config(text: str, problem: str, model_dir: Path, dst: Path) -> tuple[Path, str]:
    folder = linked_checkpoint(model_dir, dst)
    (folder / "config.json").write_text(text)
    return folder, problem


def architectures_string(model_dir: Path, dst: Path) -> tuple[Path, str]:
    folder = linked_checkpoint(model_dir, dst)
    edit_config(folder, architectures="LlamaForCausalLM")
    return folder, (f"config.json architectures 'LlamaForCausalLM' differs from the served ['LlamaForCausalLM']: "
                    f"{OTHER_MODEL}")


def with_header(header: object, problem: str, model_dir: Path, dst: Path) -> tuple[Path, str]:
    folder = copy_small_files(model_dir, dst)
    write_raw(folder / WEIGHTS, header, 0)
    return folder, f"{WEIGHTS} is not a valid safetensors file ({problem}): {EXPORT}"


def with_index(index: object, problem: str, model_dir: Path, dst: Path) -> tuple[Path, str]:
    folder = linked_checkpoint(model_dir, dst)
    (folder / INDEX).write_text(json.dumps(index))
    return folder, f"{problem}: {EXPORT}"


REFUSED: dict[str, Callable[[Path, Path], tuple[Path, str]]] = {
    "inconsistent_offsets": inconsistent_offsets,
    "overlapping_offsets": overlapping_offsets,
    "offsets_out_of_file": out_of_file,
    "dtype_I8": partial(other_dtype, "I8"),
    "dtype_BOOL": partial(other_dtype, "BOOL"),
    "dtype_F32": partial(other_dtype, "F32"),
    "extra_tensor": extra_tensor,
    "stray_adapter": stray_adapter,
    "stray_bin": partial(stray_weights, "pytorch_model.bin"),
    "stray_pt": partial(stray_weights, "model.pt"),
    "stale_shard_beside_weights": stale_shard_beside_weights,
    "stale_shard_beside_index": stale_shard_beside_index,
    "shard_of_wrong_shape": shard_of_wrong_shape,
    "index_disagrees_with_shards": index_disagrees,
    "index_names_missing_shard": index_names_missing_shard,
    "nan": partial(nonfinite, NORM, False, b"\xc0\x7f"),
    "inf_in_last_chunk": partial(nonfinite, EMBED, True, b"\x80\xff"),
    "tokenizer_not_json": partial(with_tokenizer, "<html>404</html>", "tokenizer.json is not valid JSON (Expecting "
                                  f"value: line 1 column 1 (char 0)): {TOKENIZER}"),
    "tokenizer_list": partial(with_tokenizer, "[]", f"tokenizer.json is a list, not a JSON object: {TOKENIZER}"),
    "tokenizer_without_vocab": partial(with_tokenizer, '{"version": "1.0"}', "tokenizer.json is not a tokenizers file "
                                       f"(no model.vocab of token ids): {TOKENIZER}"),
    "tokenizer_foreign": foreign_tokenizer,
    "tokenizer_reordered": reordered_tokenizer,
    "tokenizer_symlinked_out": partial(symlink_out, "tokenizer.json"),
    "weights_symlinked_out": partial(symlink_out, WEIGHTS),
    "config_list": partial(with_config, "[]", f"config.json is a list, not a JSON object: {EXPORT}"),
    "config_string": partial(with_config, '"LlamaForCausalLM"', f"config.json is a string, not a JSON object: {EXPORT}"),
    "config_architectures_string": architectures_string,
    "header_list": partial(with_header, [], "header is a list, not a JSON object"),
    "header_entry_string": partial(with_header, {NORM: "BF16"}, f"tensor {NORM} is a string, not an object"),
    "header_entry_without_offsets": partial(with_header, {NORM: {"dtype": "BF16", "shape": [0]}},
                                            f"tensor {NORM} has data_offsets None, not [begin, end]"),
    "index_list": partial(with_index, [], f"{INDEX} is a list, not a JSON object"),
    "index_weight_map_list": partial(with_index, {"weight_map": [WEIGHTS]},
                                     f"{INDEX} has no weight_map object of tensor -> shard"),
}


def trainer_export(model_dir: Path, target: Path) -> Path:
    """The served weights written as the trainer writes a finished job (trainer/export.py), untrained."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.export import export_model

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)  # full fine-tuning trains in f32
    return export_model(model, AutoTokenizer.from_pretrained(model_dir), target)


@pytest.mark.parametrize("kind", REFUSED)
def test_refused(model_dir, tmp_path, kind):
    folder, problem = REFUSED[kind](model_dir, tmp_path / kind)
    with pytest.raises(CheckpointError) as err:
        validate_checkpoint(folder, model_dir)
    assert err.value.problem == problem
    assert err.value.folder == folder


def test_served_model_passes(model_dir):
    validate_checkpoint(model_dir, model_dir)


def test_valid_copy_passes(model_dir, tmp_path):
    validate_checkpoint(linked_checkpoint(model_dir, tmp_path / "ok"), model_dir)


def test_symlinks_inside_the_folder_pass(model_dir, tmp_path):
    folder = linked_checkpoint(model_dir, tmp_path / "ok")
    (folder / "tokenizer.json").replace(folder / "tokenizer.orig.json")
    (folder / "tokenizer.json").symlink_to("tokenizer.orig.json")
    validate_checkpoint(folder, model_dir)


def test_sharded_copy_passes(model_dir, tmp_path):
    folder = copy_small_files(model_dir, tmp_path / "sharded")
    sharded(model_dir, folder)
    validate_checkpoint(folder, model_dir)


def test_trainer_export_passes(model_dir, tmp_path):
    folder = trainer_export(model_dir, tmp_path / "final")
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["chat_template.jinja", "config.json", "generation_config.json", WEIGHTS, "tokenizer.json",
         "tokenizer_config.json"])
    validate_checkpoint(folder, model_dir)


def test_missing_folder(model_dir, tmp_path):
    with pytest.raises(CheckpointError, match="no such folder"):
        validate_checkpoint(tmp_path / "nope", model_dir)


def test_missing_weights(model_dir, tmp_path):
    folder = copy_small_files(model_dir, tmp_path / "noweights")
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        validate_checkpoint(folder, model_dir)


def test_missing_config(model_dir, tmp_path):
    folder = linked_checkpoint(model_dir, tmp_path / "noconfig")
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        validate_checkpoint(folder, model_dir)


def test_wrong_architecture(model_dir, tmp_path):
    folder = linked_checkpoint(model_dir, tmp_path / "arch")
    edit_config(folder, architectures=["Qwen2ForCausalLM"])
    with pytest.raises(CheckpointError, match="architecture"):
        validate_checkpoint(folder, model_dir)


def test_other_shapes(model_dir, tmp_path):
    folder = linked_checkpoint(model_dir, tmp_path / "shapes")
    edit_config(folder, num_hidden_layers=3)
    with pytest.raises(CheckpointError, match="num_hidden_layers"):
        validate_checkpoint(folder, model_dir)


def test_truncated_weights(model_dir, tmp_path):
    folder = copy_small_files(model_dir, tmp_path / "trunc")
    with (model_dir / WEIGHTS).open("rb") as src:
        (folder / WEIGHTS).write_bytes(src.read(4_000_000))
    with pytest.raises(CheckpointError, match="truncated"):
        validate_checkpoint(folder, model_dir)


def test_missing_tokenizer(model_dir, tmp_path):
    folder = linked_checkpoint(model_dir, tmp_path / "notok")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer"):
        validate_checkpoint(folder, model_dir)


def test_adapter_needs_config_and_weights(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(CheckpointError, match="adapter_config.json"):
        validate_adapter(tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(CheckpointError, match="adapter_model.safetensors"):
        validate_adapter(tmp_path / "a")
