# Two commands for a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdir/demo
export XLA_PYTHON_CLIENT_PREALLOCATE := false

.PHONY: setup demo test test-all golden bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	touch $@

demo: setup
	$(PY) -m xblip_jax.main --config configs/demo.py --workdir $(WORKDIR)
	@echo "--- ask the trained model about a held-out image (reference: demo_data/image/annotations/coco_vqa_val.json)"
	$(PY) -m xblip_jax.main --config configs/demo.py --workdir $(WORKDIR) --mode generate \
	  --media image=$(WORKDIR)/demo_data/image/images/val/val_0000.png \
	  --instruction "What colour is the shape?"

test: setup
	$(PY) -m pytest -m "not slow" -q

test-all: setup
	$(PY) -m pytest -q

golden: setup
	$(PY) -m xblip_jax.golden ../shared/golden/*.npz

clean:
	rm -rf $(VENV) workdir
