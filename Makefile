# Two commands on a fresh machine: `make demo` and `make test`. Both create the environment first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0 CPU first and pinned with every install, so nothing can pull a CUDA build.
TORCH := torch==2.13.0
export OMP_NUM_THREADS ?= 1
# Bytecode is written on first import, for the modules used (pip's --no-compile: compiling every
# installed file took a third of the set-up). Where PYTHONDONTWRITEBYTECODE is set, every process
# the tests start (each `gradwatch run`, each fix trial) would compile torch's modules again.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: env test demo bench clean

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile $(TORCH)
	$(PY) -m pip install -q --no-compile -e '.[dev,integrations]' $(TORCH)
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	@# the report's browser test needs Debian's chromium; without it that one test is skipped
	@command -v chromium >/dev/null 2>&1 || (timeout 300 sh -c 'apt-get update -qq && apt-get install -y -qq chromium' >/dev/null 2>&1 \
		|| echo "chromium not installed: the report's browser test will be skipped")
	touch $@

# One worker per core (each single-threaded: OMP_NUM_THREADS=1); a test file's tests share a worker,
# so its module fixtures run once.
test: env
	$(PY) -m pytest -n auto --dist loadfile

GW := $(VENV)/bin/gradwatch
demo: env
	$(GW) lab all --quick --out demo-out/lab
	$(GW) run --out demo-out/sigmoid examples/train_mlp.py --act sigmoid
	$(GW) diagnose demo-out/sigmoid
	$(GW) report demo-out/sigmoid -o demo-out/sigmoid.html
	$(GW) run --out demo-out/relu examples/train_mlp.py --act relu
	$(GW) diagnose demo-out/relu
	$(GW) report demo-out/relu -o demo-out/relu.html
	@echo "Pages: demo-out/lab/index.html (the classic experiments), demo-out/sigmoid.html and demo-out/relu.html (reports)"

bench: env
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/clip_overhead.py
	$(PY) benchmarks/probe.py
	$(PY) benchmarks/detection/run.py --markdown

clean:
	rm -rf $(VENV) runs demo-out
