# Two commands do everything on a fresh machine:
#   make demo   create .venv, install the tool, run the whole pipeline on the built-in model (edgeft quickstart)
#   make test   create .venv, install, run the test suite
#   make lint   ruff check and ruff format --check (CI runs it before the tests)
# On a machine without an NVIDIA GPU the CPU build of torch is installed first, so pip never
# pulls a multi-GB CUDA build: from a local wheel (pip --find-links) when there is one, else from
# PyTorch's CPU index. Extra pip arguments for torch go in TORCH_PIP_ARGS. setuptools' notice that
# every editable install prints (a boxed "!!" warning about folders named like the package) is
# silenced: a newcomer's screen shows progress and the result.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
TORCH_PIP_ARGS ?=
PYTEST_ARGS ?=
# pytest-xdist workers for the fast tests of `make test` and `make test-fast`
TEST_WORKERS ?= 2
comma := ,
QUIET_EDITABLE := ignore:::setuptools.command.editable_wheel

.PHONY: setup setup-tool demo test test-fast lint test-tools clean

setup: $(VENV)/.installed
setup-tool: $(VENV)/.installed-tool

# a venv with torch (the CPU build unless an NVIDIA GPU is there), then the project with $(1)
define install
	@test -x $(PY) || { echo "Creating the virtual environment $(VENV)"; $(PYTHON) -m venv $(VENV); }
	@$(PY) -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: installing torch with CUDA"; $(PY) -m pip install -q torch==$(TORCH_VERSION) $(TORCH_PIP_ARGS); \
	else \
		echo "No NVIDIA GPU: installing the CPU build of torch first"; \
		$(PY) -m pip install -q --no-index --no-deps torch==$(TORCH_VERSION) $(TORCH_PIP_ARGS) 2>/dev/null \
		|| $(PY) -m pip install -q --timeout 30 --retries 1 torch==$(TORCH_VERSION) $(TORCH_PIP_ARGS) \
			--index-url https://download.pytorch.org/whl/cpu; \
	fi
	@echo "Installing edgeft ($(1)) and its dependencies into $(VENV)"
	@PYTHONWARNINGS=$(QUIET_EDITABLE) $(PY) -m pip install -q -c constraints.txt -e "$(1)"
	@echo "Installed: $(VENV)/bin/edgeft"
endef

# `make demo` installs the tool and what it runs; `make test` and `make lint` the test and lint tools too
$(VENV)/.installed-tool: pyproject.toml constraints.txt
	$(call install,.[all])
	@touch $@

$(VENV)/.installed: pyproject.toml constraints.txt
	$(call install,.[all$(comma)dev])
	@touch $@ $(VENV)/.installed-tool

demo: setup-tool
	$(VENV)/bin/edgeft doctor
	$(VENV)/bin/edgeft quickstart

# The fast tests, then the real-model and browser tests, each on $(TEST_WORKERS) pytest-xdist
# workers, a test at a time; tests/conftest.py pins each worker to its own CPUs, so torch's and ONNX
# Runtime's threads are sized to them instead of thrashing (2-core AMD EPYC VM, 2026-12-07: the fast
# tests 6.5 min, 8.2 unpinned a file at a time; the real and browser ones 14.7, 18.9 one at a time).
# loadgroup hands out one test at a time as workers free up (6.5 min, against 7.4 for `load`,
# which queues tests on each worker ahead and ended unevenly), except tests marked with one
# xdist_group, which share an expensive module fixture and go to one worker (pytest 9.1: on 9.2
# pytest-xdist 3.8 cannot group, see constraints.txt).
XDIST := -n $(TEST_WORKERS) --dist loadgroup
test: setup test-tools
	$(VENV)/bin/python -m pytest -m "not real and not browser" $(XDIST) $(PYTEST_ARGS)
	$(VENV)/bin/python -m pytest -m "real or browser" $(XDIST) $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test-fast: setup
	$(VENV)/bin/python -m pytest -m "not real and not browser" $(XDIST) $(PYTEST_ARGS)

# The web page test drives Debian's chromium (test tools cannot download a browser here), and the
# CPU-kind test runs exports under qemu-user's AVX2-only CPU. Installed when missing and we are
# root; otherwise those tests skip and say why.
test-tools:
	@missing=""; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	command -v qemu-x86_64 >/dev/null 2>&1 || missing="$$missing qemu-user"; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "Installing$$missing for the browser and CPU-kind tests"; \
			(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing) >/dev/null \
				|| echo "$$missing could not be installed: their tests will be skipped"; \
		else \
			echo "Missing$$missing and not root: their tests will be skipped"; \
		fi; \
	fi

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
