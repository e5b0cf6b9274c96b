# The README's two commands: `make demo` (train a tiny cascade on the built-in synthetic shapes, CPU,
# no download) and `make test`. Both build .venv when missing and share it: `make demo` installs the package
# alone (115 s on 2 cores, 2026-12-07, against 226-266 s with the extras), `make test` adds its test extra
# and its tpu extra (libtpu: TPU ahead-of-time compilation on this CPU); again whenever pyproject.toml
# changes.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
CLI     = $(VENV)/bin/imagen-jax
STAMP   = $(VENV)/.installed
CORE    = $(VENV)/.installed-core

DEMO_DIR        ?= out/demo
DEMO_BASE_STEPS ?= 400
DEMO_SR_STEPS   ?= 150

# The base stage's held-out alignment during training (eval/colour, eval/count, ... in TensorBoard and
# DEMO_DIR/base/eval/shapes.jsonl): 32 captions every DEMO_EVAL_EVERY steps. Off in `make demo` (each
# evaluation samples for 24-32 s on 2 cores, 2026-12-07; `make demo DEMO_EVAL_EVERY=100` turns it on),
# every 500 steps in `make demo-long`.
DEMO_EVAL_EVERY ?= 0
DEMO_EVAL_HOOK = --gin.EVAL_EVERY=$(DEMO_EVAL_EVERY) --gin.train.eval_hook='@ShapesEvalHook()' \
  --gin.ShapesEvalHook.vocab="'$(DEMO_DIR)/spiece.model'" --gin.ShapesEvalHook.encoder="'$(DEMO_DIR)/t5'"

DEMO_SAMPLE_FLAGS = --gin_file=runs/sample_demo.gin --gin.VOCAB="'$(DEMO_DIR)/spiece.model'" \
  --gin.ENCODER="'$(DEMO_DIR)/t5'" --gin.BASE_DIR="'$(DEMO_DIR)/base'" --gin.SR_DIR="'$(DEMO_DIR)/sr'"

.PHONY: test test-unit test-slow lint format docs install browser demo demo-long eval-demo clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(CORE): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e .
	touch $(CORE)

$(STAMP): $(CORE) pyproject.toml
	$(PY) -m pip install -q -e '.[test,tpu]'
	# The FID test's PyTorch reference (torch-fidelity's self-contained Inception): --no-deps, because its other
	# modules need torchvision, which has no CPU build on the registry (tests/test_fid.py loads only the one it needs).
	$(PY) -m pip install -q --no-deps torch-fidelity==0.4.0
	touch $(STAMP)

install: $(STAMP)

# Two workers: most tests spend their time in XLA compiles, which use one core each (measured on a fresh
# clone, 2 cores: 1299 s in one process, 841 s in two with --dist loadfile, 901 s with worksteal, which
# builds the module fixtures on both workers).
test: $(STAMP) browser
	$(PY) -m pytest -n 2 --dist loadfile

# The DrawBench rating page is tested in a real headless browser: Debian's chromium, installed here when missing
# and possible (root); without it that test fails and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "== installing Debian's chromium (the rating-page test drives it headless)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "warning: chromium is missing and cannot be installed here: the rating-page test will fail"; fi; }

# The formatter and the linter (pinned in the test extra); CI runs `make lint` before the tests.
lint: $(STAMP)
	$(VENV)/bin/ruff format --check imagen_jax tests docs launch
	$(VENV)/bin/ruff check imagen_jax tests docs launch

format: $(STAMP)
	$(VENV)/bin/ruff format imagen_jax tests docs launch
	$(VENV)/bin/ruff check --fix imagen_jax tests docs launch

# docs/cli.md is generated from the parser (a test checks it is current).
docs: $(STAMP)
	$(PY) -m imagen_jax.cli.reference > docs/cli.md

# The quick loop: the unit tier (pure functions, networks, architecture checks; a few minutes). `make test`
# runs every tier: tests/unit, tests/integration (commands in-process, data, training, sampling, metrics)
# and tests/e2e (kill/resume, several processes, the installed wheel, launch scripts).
test-unit: $(STAMP)
	$(PY) -m pytest tests/unit

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

# Each step resumes or reuses what is done: re-running `make demo` continues where it stopped.
# The demo runs on the CPU: the venv holds libtpu (for compile-check), which would otherwise look for a TPU.
# It splits the CPU into DEMO_DEVICES data-parallel XLA devices: one XLA CPU device keeps about one core
# busy with these small convolutions, two use both (a train step of the demo base at batch 12: 1.21 s on
# one device, 0.82 s on two; docs/findings.md). Batch sizes are multiples of 2.
DEMO_DEVICES ?= 2
demo: export JAX_PLATFORMS ?= cpu
demo: export XLA_FLAGS ?= --xla_force_host_platform_device_count=$(DEMO_DEVICES)
demo: $(CORE)
	@echo "== demo 1/6: vocabulary and a tiny T5 encoder with random weights (untrained; real runs load T5-XXL)"
	$(PY) -m imagen_jax.demo prepare --out $(DEMO_DIR)
	@echo "== demo 2/6: embedding cache of the synthetic captioned shapes"
	$(CLI) cache-embeddings --gin_file=runs/demo_cache.gin --gin.VOCAB="'$(DEMO_DIR)/spiece.model'" \
	  --gin.ENCODER="'$(DEMO_DIR)/t5'" --gin.CACHE_DIR="'$(DEMO_DIR)/cache'"
	@echo "== demo 3/6: base stage, 32x32"
	$(CLI) train --gin_file=runs/demo_base.gin --gin.MODEL_DIR="'$(DEMO_DIR)/base'" \
	  --gin.TRAIN_DATA="'$(DEMO_DIR)/cache'" --gin.NUM_STEPS=$(DEMO_BASE_STEPS) $(DEMO_EVAL_HOOK)
	@echo "== demo 4/6: super-resolution stage, 32 -> 64"
	$(CLI) train --gin_file=runs/demo_sr.gin --gin.MODEL_DIR="'$(DEMO_DIR)/sr'" \
	  --gin.TRAIN_DATA="'$(DEMO_DIR)/cache'" --gin.NUM_STEPS=$(DEMO_SR_STEPS)
	@echo "== demo 5/6: sample the cascade (base, then SR) for the demo prompts, with a guidance sweep of the base"
	rm -rf $(DEMO_DIR)/samples
	$(CLI) sample $(DEMO_SAMPLE_FLAGS) --prompts_file=$(DEMO_DIR)/prompts.txt --guidance base=1,3,5 --out $(DEMO_DIR)/samples
	cp $(DEMO_DIR)/samples/grid.png $(DEMO_DIR)/samples.png
	cp $(DEMO_DIR)/samples/base/sweep.png $(DEMO_DIR)/guidance_sweep.png
	@echo "== demo 6/6: measured on held-out scenes: does the SR stage follow its input; does the base draw the caption"
	$(CLI) eval sr-conditioning $(DEMO_SAMPLE_FLAGS) --num_images 16 --label demo --out $(DEMO_DIR)/eval/sr_conditioning
	$(CLI) eval shapes $(DEMO_SAMPLE_FLAGS) --gin.cascade_config.stages="[@base/stage()]" --num_prompts 64 \
	  --guidance 3 --thresholding dynamic --batch_size 32 --train_examples 3000 --no_images \
	  --label demo --out $(DEMO_DIR)/eval/shapes
	@echo "== demo done. Under $(DEMO_DIR)/: spiece.model, t5/ (random encoder), cache/ (embeddings),"
	@echo "   base/ and sr/ (checkpoints/, samples/ grids during training, TensorBoard logs in train/, run.json),"
	@echo "   samples/ (every image, settings.json). The cascade's grid: $(DEMO_DIR)/samples.png"
	@echo "   The base stage's guidance sweep (w = 1, 3, 5; same seeds per row): $(DEMO_DIR)/guidance_sweep.png"
	@echo "   TensorBoard: $(VENV)/bin/tensorboard --logdir $(DEMO_DIR)"

# Longer training in its own folder, sized for an hour on 2 cores from the demo's measured step rates on two host
# devices (base about 1.35 steps/s, SR about 0.95): 3000 base steps (37 min) and 600 SR steps (11 min), plus
# the demo's set-up, sampling and evaluation.
demo-long:
	$(MAKE) demo DEMO_DIR=out/demo-long DEMO_BASE_STEPS=3000 DEMO_SR_STEPS=600 DEMO_EVAL_EVERY=500

# Alignment of the demo cascade on held-out synthetic captions (guidance x thresholding sweep) against the same
# cascade trained with its text always dropped (chance). Needs `make demo` first; trains the text-free cascade
# (as long as the demo's) in $(DEMO_DIR)-notext, then sweeps both: $(DEMO_DIR)/eval/ holds shapes.json and plots.
EVAL_PROMPTS ?= 32
EVAL_FLAGS = --gin_file=runs/sample_demo.gin --gin.VOCAB="'$(DEMO_DIR)/spiece.model'" --gin.ENCODER="'$(DEMO_DIR)/t5'" \
  --num_prompts $(EVAL_PROMPTS) --guidance 1,3,5,8 --thresholding none,static,dynamic --steps base=32 --steps sr=16 \
  --batch_size 32 --train_examples 3000
eval-demo: export JAX_PLATFORMS ?= cpu
eval-demo: export XLA_FLAGS ?= --xla_force_host_platform_device_count=$(DEMO_DEVICES)
eval-demo: $(CORE)
	@echo "== eval 1/4: base stage trained with its text always dropped (cond_drop_prob = 1)"
	$(CLI) train --gin_file=runs/demo_base.gin --gin.MODEL_DIR="'$(DEMO_DIR)-notext/base'" \
	  --gin.TRAIN_DATA="'$(DEMO_DIR)/cache'" --gin.NUM_STEPS=$(DEMO_BASE_STEPS) --gin.DiffusionConfig.cond_drop_prob=1.0
	@echo "== eval 2/4: SR stage trained with its text always dropped"
	$(CLI) train --gin_file=runs/demo_sr.gin --gin.MODEL_DIR="'$(DEMO_DIR)-notext/sr'" \
	  --gin.TRAIN_DATA="'$(DEMO_DIR)/cache'" --gin.NUM_STEPS=$(DEMO_SR_STEPS) --gin.DiffusionConfig.cond_drop_prob=1.0
	@echo "== eval 3/4: shapes alignment sweep of the text-free cascade (chance)"
	rm -rf $(DEMO_DIR)/eval_notext $(DEMO_DIR)/eval
	$(CLI) eval shapes $(EVAL_FLAGS) --checkpoints base=$(DEMO_DIR)-notext/base,sr=$(DEMO_DIR)-notext/sr \
	  --label "text dropped" --out $(DEMO_DIR)/eval_notext
	@echo "== eval 4/4: shapes alignment sweep of the demo cascade, against the text-free one"
	$(CLI) eval shapes $(EVAL_FLAGS) --checkpoints base=$(DEMO_DIR)/base,sr=$(DEMO_DIR)/sr \
	  --label "demo cascade" --baseline $(DEMO_DIR)/eval_notext --out $(DEMO_DIR)/eval
	@echo "== eval done: $(DEMO_DIR)/eval/shapes.json, alignment_vs_guidance.png, alignment_vs_fidelity.png, sweep_sr.png"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
