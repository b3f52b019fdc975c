# ferrograd: `make demo` runs the main job, `make bench` the benchmarks, `make test` every check,
# `make fuzz` the long fuzz campaign.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deps-installed
SIMD_PATHS := scalar avx2 avx512
# The features of the VNNI and BF16 kernels: `make test` runs cargo test and the SIMD tests
# once more without them (rust/simd.rs, FERROGRAD_DISABLE_FEATURES).
NO_VNNI := avx512vnni,avx512bf16,avxvnni
SIMD_WITHOUT := avx2:avxvnni avx512:$(NO_VNNI)

.PHONY: develop test test-torch fuzz demo bench wheel clean

$(PY):
	python3 -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "maturin>=1.9.4,<2" "torch>=2.5" "numpy>=1.24" "pytest>=8" "ruff>=0.6" "mypy>=1.11" "transformers>=4.50" "accelerate>=1.1" "hypothesis>=6.100"
	touch $@

develop: $(STAMP)
	VIRTUAL_ENV=$(abspath $(VENV)) $(VENV)/bin/maturin develop --release -q --features dev

test: develop
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	cargo test -q
	FERROGRAD_DISABLE_FEATURES=$(NO_VNNI) cargo test -q
	$(VENV)/bin/ruff check python tests bench
	$(VENV)/bin/ruff format --check python tests bench
	$(PY) -m mypy.stubtest ferrograd._core --allowlist .stubtest-allowlist
	$(PY) -m pytest -q tests
	@for simd in $(SIMD_PATHS); do \
		if $(PY) -c "import ferrograd, sys; sys.exit('$$simd' not in ferrograd.cpu_info()['supported'])"; then \
			echo "== SIMD path $$simd =="; \
			FERROGRAD_SIMD=$$simd $(PY) -m pytest -q -m "simd and not slow" tests || exit 1; \
		else \
			echo "== SIMD path $$simd: not supported by this CPU, skipped =="; \
		fi; \
	done
	@# Runs as CPUs with fewer features, where this CPU has any of them (path:features off):
	@# AVX2 without AVX-VNNI (Zen 2, Zen 3, Haswell to Comet Lake: the 256-bit vpmaddubsw GEMM
	@# kernels), and AVX-512 without VNNI, BF16 and AVX-VNNI (Skylake-SP's set; Cascade Lake and
	@# Ice Lake lack BF16: the 512-bit vpmaddubsw kernels and the paths without BF16).
	@for run in $(SIMD_WITHOUT); do \
		simd=$${run%%:*}; off=$${run#*:}; \
		if $(PY) -c "import ferrograd, sys; i = ferrograd.cpu_info(); sys.exit('$$simd' not in i['supported'] or not any(i['features'][f] for f in '$$off'.split(',')))"; then \
			echo "== SIMD path $$simd without $$off =="; \
			FERROGRAD_SIMD=$$simd FERROGRAD_DISABLE_FEATURES=$$off \
				$(PY) -m pytest -q -m "simd and not slow" tests || exit 1; \
		fi; \
	done

# The Python suite on another torch release (TORCH; the default is the oldest that
# pyproject.toml accepts) and Python interpreter (PYTHON, e.g. python3.13) in a venv of its own,
# against the abi3 wheel built as `make develop` builds (with the tests' hooks): about 3 GB of
# downloads, so not part of `make test` (docs/ops.md, "Torch and Python versions").
TORCH ?= 2.5.1
PYTHON ?= python3
# More packages for that venv, e.g. "transformers>=4.50 accelerate>=1.1" with a recent torch
# (recent transformers releases need one; without them the transformers tests skip).
TORCH_EXTRAS ?=
TORCH_VENV := .venv-torch-$(TORCH)-$(notdir $(PYTHON))
test-torch: $(STAMP)
	$(VENV)/bin/maturin build --release -q --features dev -o target/wheels-dev
	$(PYTHON) -m venv $(TORCH_VENV)
	$(TORCH_VENV)/bin/pip install -q "torch==$(TORCH)" "numpy>=1.24" "pytest>=8" "hypothesis>=6.100" "maturin>=1.9.4,<2" "cuda-python>=12.6" $(foreach p,$(TORCH_EXTRAS),"$(p)")
	$(TORCH_VENV)/bin/pip install -q --no-deps --force-reinstall $$(ls -t target/wheels-dev/ferrograd-*.whl | head -1)
	$(TORCH_VENV)/bin/python -m pytest -q tests

# The long fuzz campaign (tests/fuzz/campaign.py): FUZZ_EXAMPLES cases per op, crash-isolated,
# bounded by FUZZ_SECONDS; the table goes to stdout and bench/results/fuzz.json.
FUZZ_EXAMPLES ?= 10000
FUZZ_SECONDS ?= 14400
FUZZ_JOBS ?= 2
fuzz: develop
	$(PY) tests/fuzz/campaign.py --examples $(FUZZ_EXAMPLES) --time-limit $(FUZZ_SECONDS) \
		--jobs $(FUZZ_JOBS) $(FUZZ_ARGS)

demo: develop
	$(PY) -m pip install -q matplotlib  # the loss plot (loss.png); not a dependency of the package
	$(PY) -m ferrograd demo --compare

bench: develop
	$(PY) bench/run.py

# A wheel for any x86-64 Linux with glibc 2.17 or newer (manylinux2014), linked by zig (the
# ziglang package): linked by this machine's toolchain it takes its glibc's symbol versions
# (manylinux_2_34 on Debian 12), and pip refuses it on older systems (Ubuntu 20.04, RHEL 8).
wheel: $(STAMP)
	$(PY) -m pip install -q "ziglang>=0.13"
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/maturin build --release --zig --compatibility manylinux2014

clean:
	rm -rf target dist $(VENV) .venv-torch-*
