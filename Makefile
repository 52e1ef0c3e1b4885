# One entry point per job: install, demo, test, bench, lint.
# Everything runs from a virtual environment in $(VENV), created on first use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_PIN := torch==2.13.0

# The parallel stack: Open MPI and an HDF5 built with it. Elsewhere than Debian/Ubuntu
# as root, load them before `make install` (e.g. `module load openmpi hdf5/parallel`,
# then HDF5_DIR=<its prefix> if it ships no pkg-config file).
HDF5_PKGCONFIG_NAME ?= hdf5-openmpi
MPI_APT_PACKAGES := openmpi-bin libopenmpi-dev libhdf5-openmpi-dev pkg-config
HAVE_PARALLEL_HDF5 := command -v mpicc >/dev/null && \
	{ [ -n "$$HDF5_DIR" ] || pkg-config --exists $(HDF5_PKGCONFIG_NAME) 2>/dev/null; }
H5PY_HAS_MPI := $(PY) -c 'import h5py, sys; sys.exit(not h5py.get_config().mpi)' 2>/dev/null
# -O1 builds h5py in about a minute instead of two; h5py's own tests pass on it.
H5PY_BUILD_ENV := CC=mpicc HDF5_MPI=ON HDF5_PKGCONFIG_NAME=$(HDF5_PKGCONFIG_NAME) \
	CFLAGS="-O1 -g0 -fwrapv -DNDEBUG"

SLURM_APT_PACKAGES := slurm-wlm munge slurmdbd mariadb-server

.PHONY: install parallel-stack system-mpi local-slurm browser demo test bench gallery lint clean

install: $(STAMP)

# Re-runs only when pyproject.toml changes, so a second `make install` is instant.
# torch is pinned and installed first: an unpinned torch would pull CUDA wheels.
# The parallel stack comes before the package, whose plain `h5py` it then satisfies.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(MAKE) --no-print-directory parallel-stack
	$(PY) -m pip install --quiet -e '.[test,data]'
	touch $(STAMP)

# mpi4py's registry wheel finds the system MPI by itself; h5py has no parallel wheel
# anywhere, so it is built from source against the parallel HDF5 (--no-cache-dir: pip
# would otherwise reuse any h5py wheel it built before, with or without MPI).
parallel-stack: system-mpi
	@set -e; if $(HAVE_PARALLEL_HDF5); then \
		$(PY) -m pip install --quiet mpi4py; \
		if ! $(H5PY_HAS_MPI); then \
			echo "building h5py against parallel HDF5 (about a minute)"; \
			$(PY) -m pip install --quiet numpy Cython pkgconfig packaging 'setuptools>=77.0.1'; \
			$(H5PY_BUILD_ENV) $(PY) -m pip install --quiet --no-binary=h5py --no-build-isolation \
				--no-cache-dir --force-reinstall --no-deps h5py; \
		fi; \
		$(H5PY_HAS_MPI) || { echo "error: h5py was built without MPI support" >&2; exit 1; }; \
		$(PY) -c 'import h5py, mpi4py.MPI as m; print("parallel stack: h5py", h5py.__version__, \
			"on HDF5", h5py.version.hdf5_version, "with", m.Get_library_version().split(",")[0])'; \
	else \
		echo "parallel stack: no mpicc with a parallel HDF5 found; runs with several ranks"; \
		echo "  will need mpi4py and use part files (--writer parts). On a cluster, load MPI"; \
		echo "  and parallel HDF5 (module load ...) and run make install again."; \
	fi

# Debian/Ubuntu as root: install the system packages when they are missing.
system-mpi:
	@if ! { $(HAVE_PARALLEL_HDF5); } && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing $(MPI_APT_PACKAGES) with apt-get" && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends $(MPI_APT_PACKAGES) >/dev/null; \
	fi

# SLURM, munge and MariaDB for slurm/local-cluster.sh, which the SLURM tests start (they
# are skipped without it, and this says so). Debian/Ubuntu as root; `make test` runs it.
local-slurm:
	@if command -v slurmctld >/dev/null; then \
		echo "local SLURM: $$(slurmctld -V)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing $(SLURM_APT_PACKAGES) with apt-get" && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends $(SLURM_APT_PACKAGES) >/dev/null; \
	else \
		echo "local SLURM: not installed (needs root and apt-get); the SLURM tests will be skipped"; \
	fi

# Chromium from Debian's packages, for the tests that load a report page and an HTML
# export in a real headless browser (skipped without it, and this says so). Debian as
# root; `make test` runs it. Ubuntu's chromium is a snap: install it by hand there.
browser:
	@if command -v chromium >/dev/null; then \
		echo "browser: $$(chromium --version 2>/dev/null)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing chromium with apt-get (a few minutes)" && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends chromium >/dev/null; \
	else \
		echo "browser: no chromium (needs root and apt-get); the browser tests will be skipped"; \
	fi

demo: install
	$(VENV)/bin/landscape demo --out results/demo

test: install local-slurm browser
	$(PY) -m pytest -q

bench: install
	$(PY) -m benchmarks.bench --out results/bench.json

# Li et al.'s experiments at digits scale, their claims measured: results/gallery/claims.html
gallery: install
	$(PY) -m landscape.gallery --out results/gallery

lint: install
	$(VENV)/bin/ruff check pipeline tests benchmarks
	$(VENV)/bin/ruff format --check pipeline tests benchmarks

clean:
	rm -rf $(VENV) results build pipeline/*.egg-info
