# calcjax: `make demo` runs the main job on the embedded default, `make test` runs the checks.
# Both set themselves up on a fresh machine (a .venv with the package and the extras the tests need).

PYTHON ?= python3
, := ,
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
NATIVE := calcjax/native/libcalcjax_cpu.so
DEMO_OUT ?= demo_out
PYTEST_ARGS ?=
# The real sample (never copied into the repository): $CALCJAX_REAL_DATA, else ../shared/data.
REAL_DATA ?= $(or $(CALCJAX_REAL_DATA),../shared/data)
REAL_OUT ?= real_eval
REAL_SHARDS ?= real_shards
CHECKPOINT ?=
# Extra calcjax.score flags for real-eval, e.g. SCORE_FLAGS=--lesion_completion_mm2=40.
SCORE_FLAGS ?=
# Leave one real scan out (calcjax.research.real_loo): the plan written before its runs, and where they go.
LOO_PLAN ?= docs/experiments/2026-12-02-real-loo-plan.json
LOO_OUT ?= real_loo
LOO_SEEDS ?= 0,1,2
# The full COCA release (make train-coca COCA=/path/to/cocacalciumandchestcts): where its build, run and
# scores go; COCA_PHANTOMS=SHARDS mixes a phantom shard folder in at a quarter of the slices;
# COCA_BUILD_FLAGS / COCA_TRAIN_FLAGS pass more flags (e.g. --salt, --config.train.steps=...).
COCA ?=
COCA_OUT ?= coca_out
COCA_PHANTOMS ?=
COCA_BUILD_FLAGS ?=
COCA_TRAIN_FLAGS ?=

.PHONY: install test test-fast lint format demo bench fuzz repro clean real-eval real-shards real-loo train-coca check-install

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,codecs,torch]'
	touch $(STAMP)

# The native CPU kernels for JAX's CPU backend (calcjax.native: oneDNN's convolutions, BatchNorm-ReLU);
# without a C++ compiler calcjax uses XLA's kernels and says so here.
$(NATIVE): $(STAMP) calcjax/native/onednn_kernels.cc calcjax/native/batchnorm_kernels.cc
	$(BIN)/python -m calcjax.native.build --if_possible

install: $(STAMP) $(NATIVE)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint | $(NATIVE)
	$(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)

test-fast: $(STAMP) | $(NATIVE)
	$(BIN)/python -m pytest -n 2 -m 'not slow' $(PYTEST_ARGS)

# The demo's phantoms hold no patient data, so a fixed salt is fine: it gives the same split every time
# (10 train, 3 val, 3 test scans covering both protocols and risk categories 0-IV).
demo: $(STAMP) | $(NATIVE)
	$(BIN)/python -m data_prep.phantom --out $(DEMO_OUT)/phantom --scans 16 --protocol mixed --seed 0 \
		--workers 2 --preview $(DEMO_OUT)/phantom/preview.png --preview_scans 4,9
	$(BIN)/python -m data_prep.build --input $(DEMO_OUT)/phantom --out $(DEMO_OUT)/shards --workers 2 \
		--split train=0.6,val=0.2,test=0.2 --salt calcjax-demo-36
	$(BIN)/python -m calcjax.train --config configs/demo.py --workdir $(DEMO_OUT)/run \
		--config.data.shards=$(DEMO_OUT)/shards
	$(BIN)/python -m calcjax.score --shards '$(DEMO_OUT)/shards/test-*.array_record' \
		--checkpoint $(DEMO_OUT)/run --out $(DEMO_OUT)/score --resume
	@echo "demo: phantoms in $(DEMO_OUT)/phantom, shards in $(DEMO_OUT)/shards, run in $(DEMO_OUT)/run"
	@echo "demo: report in $(DEMO_OUT)/score/report.md (figures in $(DEMO_OUT)/score/figures)"

# Scores the real COCA sample with the shipped model (or CHECKPOINT=RUN): gated scans against their
# calcium masks, chest scans against the release's sheet of physician scores -> $(REAL_OUT)/report.md;
# with $(REAL_DATA)/qrm-canon, the model on the real QRM insert too -> $(REAL_OUT)/qrm_check.json.
# The shipped model's outputs on a fixed phantom set against calcjax/model/shipped/reference_scores.csv.
check-install: $(STAMP) | $(NATIVE)
	$(BIN)/python -m data_prep.check_install

real-eval: $(STAMP) | $(NATIVE)
	@test -d "$(REAL_DATA)/coca-sample" || { echo "real-eval: no $(REAL_DATA)/coca-sample (set CALCJAX_REAL_DATA)"; exit 2; }
	rm -rf $(REAL_OUT)
	$(BIN)/python -m calcjax.score --dicom "$(REAL_DATA)/coca-sample" --out $(REAL_OUT) \
		--reference_scores "$(REAL_DATA)/coca-sample/deidentified_nongated/scores.xlsx" \
		$(if $(CHECKPOINT),--checkpoint $(CHECKPOINT)) $(SCORE_FLAGS)
	@cat $(REAL_OUT)/report.md
	@if test -d "$(REAL_DATA)/qrm-canon/dicom"; then \
		$(BIN)/python -m calcjax.research.qrm_check "$(REAL_DATA)/qrm-canon/dicom" $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT)) \
			> $(REAL_OUT)/qrm_check.json && echo "QRM insert (calcjax.research.qrm_check):" && cat $(REAL_OUT)/qrm_check.json; fi

# Every labelled real scan as a shard folder of its own (data_prep.real_shards): $(REAL_SHARDS)/gated-1..3
# (COCA masks) and gated-1..3-thick5 (the same as 5 mm slices), chest-zero (physician score 0: all
# background), qrm (the QRM inserts from HU). Train on
# them with --config.data.sources; watch one with --config.data.real_val_shards=$(REAL_SHARDS)/gated-1.
real-shards: $(STAMP) | $(NATIVE)
	@test -d "$(REAL_DATA)/coca-sample" || { echo "real-shards: no $(REAL_DATA)/coca-sample (set CALCJAX_REAL_DATA)"; exit 2; }
	$(BIN)/python -m data_prep.real_shards --real "$(REAL_DATA)" --out $(REAL_SHARDS) --workers 2 --thick_mm 5

# Every candidate of LOO_PLAN trained without each real scan in turn (LOO_SEEDS) and scored on it:
# $(LOO_OUT)/summary.md. A rerun finishes what is missing; another plan needs another LOO_OUT.
real-loo: real-shards
	$(BIN)/python -m calcjax.research.real_loo --plan $(LOO_PLAN) --real_shards $(REAL_SHARDS) --out $(LOO_OUT) \
		--seeds $(LOO_SEEDS)

# The COCA recipe (configs/coca.py): gated scans -> shards split by patient -> the paper's network ->
# the gated test split scored against its masks, the chest scans against the release's score sheet.
train-coca: $(STAMP) | $(NATIVE)
	@test -d "$(COCA)/Gated_release_final" || { echo "train-coca: no Gated_release_final in COCA=$(COCA)"; exit 2; }
	$(BIN)/python -m data_prep.build --input "$(COCA)/Gated_release_final" --out $(COCA_OUT)/gated \
		--split train=0.8,val=0.1,test=0.1 --split_by patient --workers 2 $(COCA_BUILD_FLAGS)
	$(BIN)/python -m calcjax.train --config configs/coca.py --workdir $(COCA_OUT)/run \
		--config.data.sources=coca:$(COCA_OUT)/gated:1$(if $(COCA_PHANTOMS),$(,)phantom:$(COCA_PHANTOMS):0.25) \
		$(COCA_TRAIN_FLAGS)
	$(BIN)/python -m calcjax.score --shards '$(COCA_OUT)/gated/test-*.array_record' --checkpoint $(COCA_OUT)/run \
		--out $(COCA_OUT)/score-gated
	$(BIN)/python -m calcjax.score --dicom "$(COCA)/deidentified_nongated" --checkpoint $(COCA_OUT)/run \
		--reference_scores "$(COCA)/deidentified_nongated/scores.xlsx" --out $(COCA_OUT)/score-chest
	@echo "train-coca: gated test split $(COCA_OUT)/score-gated/report.md, chest $(COCA_OUT)/score-chest/report.md"

# The reproducibility study (calcjax.research.repro): the shipped recipe in JAX and in PyTorch, three seeds
# each, on its 48 v3 phantoms; writes docs/reproducibility.md. Hours on 2 CPU cores.
V3_PHANTOMS ?= phantom_v3
V3_SHARDS ?= phantom_v3_shards
REPRO_OUT ?= repro_out
$(V3_SHARDS)/manifest.json: $(STAMP) | $(NATIVE)
	$(BIN)/python -m data_prep.phantom --out $(V3_PHANTOMS) --scans 48 --protocol mixed --seed 1 --phantom_version 3 \
		--workers 2
	$(BIN)/python -m data_prep.build --input $(V3_PHANTOMS) --out $(V3_SHARDS) --split train=0.8,val=0.1,test=0.1 \
		--salt calcjax-model-v1 --workers 2

repro: $(V3_SHARDS)/manifest.json
	$(BIN)/python -m calcjax.research.repro --config configs/shipped.py --shards $(V3_SHARDS) --out $(REPRO_OUT) \
		--seeds 0,1,2 --margin 0.05 --doc docs/reproducibility.md

# The seeded DICOM fuzzer (bench/fuzz_dicom.py): 1,000 mutated series through data_prep.build and
# calcjax.score; one JSON line (tracebacks, unexplained refusals and silent changes must all be 0).
FUZZ_CASES ?= 1000
fuzz: $(STAMP) | $(NATIVE)
	CALCJAX_REAL_DATA="$(REAL_DATA)" $(BIN)/python -m bench.fuzz_dicom --cases $(FUZZ_CASES) --seed 0

bench: $(STAMP) | $(NATIVE)
	$(BIN)/python bench/phantom.py
	$(BIN)/python bench/agatston.py
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/tfds_decode.py
	$(BIN)/python bench/score.py
	$(BIN)/python bench/heart_region.py
	$(BIN)/python bench/scaling.py
	$(BIN)/python bench/compile.py
	$(BIN)/python bench/startup.py
	$(BIN)/python bench/hlo_profile.py
	$(BIN)/python bench/dense_forms.py
	$(BIN)/python bench/conv_dtypes.py
	$(BIN)/python bench/batchnorm.py
	$(BIN)/python bench/memory.py
	$(BIN)/python bench/model.py --torch_compile
	$(BIN)/python bench/train.py

clean:
	rm -rf $(DEMO_OUT) $(REAL_OUT) $(REAL_SHARDS) .pytest_cache .ruff_cache .import_linter_cache
