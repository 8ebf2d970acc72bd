#!/usr/bin/env bash
# The trainer's jobs on a GPU, in minutes (under 10 on one GPU): LoRA (bf16) and full fine-tuning of the
# demo model with the trainer's own code, merge and export, the export loaded back; prints a table of
# tokens/s and peak memory (bench/gpu_check.py).
#
#   bench/gpu_check.sh                          # on CUDA, 20 steps per job
#   bench/gpu_check.sh --device cpu --steps 1   # everything but CUDA, on this machine (tests/bench)
#
# For a machine that has PyTorch, transformers, peft and accelerate and nothing else: what the trainer needs
# besides travels as wheels in .whl/, downloaded here with the versions the tests run (Python 3.12):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 pydantic==2.14.4 \
#     pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
# and installed into a folder of their own before the check runs. Where the model folder holds no weights
# (269 MB that may not travel), the demo model's architecture is built from its config.json with random
# weights: the same tokens/s and memory, not the same loss.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
if compgen -G ".whl/*.whl" > /dev/null; then
  site=$(mktemp -d /tmp/gpu_check_site.XXXX)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout "${GPU_CHECK_TIMEOUT:-600}" "$PY" bench/gpu_check.py "$@"
