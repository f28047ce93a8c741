# Two entry points for a fresh machine: `make quickstart` (main job on the embedded synthetic data) and
# `make test` (the test suite). Both set up .venv first; a second `make setup` takes seconds.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mmt_psm_setup

.PHONY: setup test quickstart lint clean psm gpu-check

setup: $(STAMP)

$(STAMP): setup.py tools/install_detectron2.py tools/prepare_pretrained.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel setuptools
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) tools/install_detectron2.py
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) tools/prepare_pretrained.py
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff check .

quickstart: setup
	$(PY) tools/quickstart.py

# PSM label-free nuclei segmentation (docs/nuclei.md): the MoNuSeg protocol by default; your own folder of H&E
# tiles with `make psm PSM_ARGS="--images my_tiles/ --output output/psm_my_tiles"`. MONUSEG_SOURCE: the MoNuSeg
# folder datasets/prepare_monuseg.py converts (train/ and test/, each images/ + annotations_xml/; datasets/README.md
# says where to get it); the default is the copy CI finds beside the repository.
MONUSEG_SOURCE ?= ../shared/data/nuclei/monuseg
PSM_ARGS ?= --images monuseg_train --train-gt monuseg_train_labels_for_eval --test monuseg_test \
	--output output/psm_monuseg
psm: setup
	test -d datasets/nuclei/monuseg/test || $(PY) datasets/prepare_monuseg.py --source $(MONUSEG_SOURCE)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) tools/psm_pipeline.py $(PSM_ARGS)

# GPU check (tools/gpu_check.sh, its header says what to bring): on a GPU machine, at most 8 minutes, one PASS/FAIL
# line per check and output/gpu_check/summary.json; no .venv there (the machine's python + the carried wheels)
gpu-check:
	PYTHON=$(PYTHON) bash tools/gpu_check.sh

clean:
	rm -rf build output_quickstart .pytest_cache
