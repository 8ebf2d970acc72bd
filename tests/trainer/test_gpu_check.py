"""bench/gpu_check.sh, everything but CUDA: the trainer's LoRA and full jobs on the CPU for one step of a
tiny batch, merged, exported and loaded back, with the table the GPU run prints; and the stand-in model
built from config.json where the weights did not travel."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import MODEL_DIR, REPO


def test_the_gpu_check_runs_the_trainers_jobs_on_the_cpu() -> None:
    run = subprocess.run([str(REPO / "bench" / "gpu_check.sh"), "--device", "cpu", "--steps", "1", "--batch", "2",
                          "--max-length", "128"], cwd=REPO, capture_output=True, text=True, timeout=900,
                         env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]
    table = run.stdout.splitlines()
    assert table[0].startswith("trainer jobs on CPU") and "smollm2-135m-instruct (trained weights)" in table[0]
    rows = {line.split(" | ")[0].strip("| "): line.strip("|").split(" | ") for line in table[3:]}
    assert set(rows) == {"lora", "full"}
    for method, dtype in (("lora", "bf16"), ("full", "fp32")):
        row = [c.strip() for c in rows[method]]
        assert row[1] == dtype and row[2] == "1" and int(row[3]) > 0 and float(row[5]) > 0  # tokens/s
        assert float(row[6]) > 0.1 and row[-1] == "yes"  # peak memory (RSS on CPU) and the export generates


def test_without_weights_the_demo_architecture_gets_random_ones(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "bench"))
    from gpu_check import base_model

    bare = tmp_path / "bare"
    bare.mkdir()
    for f in MODEL_DIR.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, bare / f.name)
    assert base_model(MODEL_DIR, tmp_path / "x") == (MODEL_DIR, "trained weights")
    folder, weights = base_model(bare, tmp_path / "built")
    assert weights.startswith("random weights") and any(folder.glob("*.safetensors"))
    assert (folder / "tokenizer.json").is_file()
