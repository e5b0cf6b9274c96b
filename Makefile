# The README's two commands: `make demo` (train a tiny cascade on the built-in synthetic shapes, CPU,
# no download) and `make test`. Both build .venv when missing, install the package with its test extra
# (again whenever pyproject.toml changes) and its tpu extra (libtpu: TPU ahead-of-time compilation on this CPU),
# and share that venv.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
CLI     = $(VENV)/bin/imagen-jax
STAMP   = $(VENV)/.installed

DEMO_DIR        ?= out/demo
DEMO_BASE_STEPS ?= 450
DEMO_SR_STEPS   ?= 200

.PHONY: test test-slow install demo demo-long clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[test,tpu]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

# Each step resumes or reuses what is done: re-running `make demo` continues where it stopped.
# The demo runs on the CPU: the venv holds libtpu (for compile-check), which would otherwise look for a TPU.
demo: export JAX_PLATFORMS ?= cpu
demo: $(STAMP)
	@echo "== demo 1/5: vocabulary and a tiny T5 encoder with random weights (untrained; real runs load T5-XXL)"
	$(PY) -m imagen_jax.demo prepare --out $(DEMO_DIR)
	@echo "== demo 2/5: embedding cache of the synthetic captioned shapes"
	$(CLI) cache-embeddings --gin_file=runs/demo_cache.gin --gin.VOCAB="'$(DEMO_DIR)/spiece.model'" \
	  --gin.ENCODER="'$(DEMO_DIR)/t5'" --gin.CACHE_DIR="'$(DEMO_DIR)/cache'"
	@echo "== demo 3/5: base stage, 32x32"
	$(CLI) train --gin_file=runs/demo_base.gin --gin.MODEL_DIR="'$(DEMO_DIR)/base'" \
	  --gin.TRAIN_DATA="'$(DEMO_DIR)/cache'" --gin.NUM_STEPS=$(DEMO_BASE_STEPS)
	@echo "== demo 4/5: super-resolution stage, 32 -> 64"
	$(CLI) train --gin_file=runs/demo_sr.gin --gin.MODEL_DIR="'$(DEMO_DIR)/sr'" \
	  --gin.TRAIN_DATA="'$(DEMO_DIR)/cache'" --gin.NUM_STEPS=$(DEMO_SR_STEPS)
	@echo "== demo 5/5: sample the cascade (base, then SR) for the demo prompts, with a guidance sweep of the base"
	rm -rf $(DEMO_DIR)/samples
	$(CLI) sample --gin_file=runs/sample_demo.gin --gin.VOCAB="'$(DEMO_DIR)/spiece.model'" \
	  --gin.ENCODER="'$(DEMO_DIR)/t5'" --gin.BASE_DIR="'$(DEMO_DIR)/base'" --gin.SR_DIR="'$(DEMO_DIR)/sr'" \
	  --prompts_file=$(DEMO_DIR)/prompts.txt --guidance base=1,3,5 --out $(DEMO_DIR)/samples
	cp $(DEMO_DIR)/samples/grid.png $(DEMO_DIR)/samples.png
	cp $(DEMO_DIR)/samples/base/sweep.png $(DEMO_DIR)/guidance_sweep.png
	@echo "== demo done. Under $(DEMO_DIR)/: spiece.model, t5/ (random encoder), cache/ (embeddings),"
	@echo "   base/ and sr/ (checkpoints/, samples/ grids during training, TensorBoard logs in train/, run.json),"
	@echo "   samples/ (every image, settings.json). The cascade's grid: $(DEMO_DIR)/samples.png"
	@echo "   The base stage's guidance sweep (w = 1, 3, 5; same seeds per row): $(DEMO_DIR)/guidance_sweep.png"
	@echo "   TensorBoard: $(VENV)/bin/tensorboard --logdir $(DEMO_DIR)"

# Longer training (about 1.5 hours on 2 cores) in its own folder: shapes, not only colours.
demo-long:
	$(MAKE) demo DEMO_DIR=out/demo-long DEMO_BASE_STEPS=5000 DEMO_SR_STEPS=1500

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
