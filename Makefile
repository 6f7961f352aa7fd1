# Every target creates and reuses .venv itself: `make demo` and `make test` are all a
# fresh clone needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
ARTIFACTS ?= artifacts

.PHONY: demo test test-fast container-engine test-containers bench lint venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

## demo: train the NumPy CNN with AdaMax on the bundled digits, in-process (no Redis, no Docker)
demo: $(STAMP)
	$(VENV)/bin/labctl run --model numpy-cnn --opt adamax --dataset digits \
		--epochs 10 --artifacts-dir $(ARTIFACTS)

## test: the whole suite, integration tests included (they start their own redis-server)
test: $(STAMP)
	$(PY) -m pytest -q -m "not containers"

## test-fast: skip the tests that start servers and workers
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not integration"

## test-containers: the compose stack in containers (podman from ../shared/tools/container-engine)
## Not part of `test`: it needs that engine. Builds the image first (its dependency layer is cached).
CONTAINER_ENGINE ?= ../shared/tools/container-engine
PODMAN_SOCKET := unix:///run/podman/podman.sock
# podman reads our settings instead of /etc's (tests/containers.conf says why: runc).
container-engine test-containers: export CONTAINERS_CONF := $(abspath tests/containers.conf)

## container-engine: set up podman and its socket for test-containers (fails with one line why)
container-engine:
	@command -v runc >/dev/null || { echo "container engine: runc is not installed (apt-get install runc)" >&2; exit 1; }
	@# The socket service outlives this checkout: started inside a clone that is later deleted,
	@# every container it starts fails with "write child: broken pipe". Start it from /, and
	@# restart one whose folder is gone.
	@for pid in $$(pgrep -f '[p]odman system service'); do \
	  if readlink /proc/$$pid/cwd | grep -q ' (deleted)$$'; then \
	    echo "container engine: restarting podman's socket service: the folder it was started in is gone" >&2; \
	    $(abspath $(CONTAINER_ENGINE)) stop; \
	  fi; done
	cd / && $(abspath $(CONTAINER_ENGINE)) setup
	@runtime=$$(podman --remote --url $(PODMAN_SOCKET) info --format '{{.Host.OCIRuntime.Name}}'); \
	  [ "$$runtime" = runc ] || { echo "container engine: podman's socket service runs $$runtime, not runc: it was started without tests/containers.conf; run $(CONTAINER_ENGINE) stop, then this again" >&2; exit 1; }

test-containers: $(STAMP) container-engine
	# Docker image format: podman's default (OCI) drops the Dockerfile's HEALTHCHECK, and the
	# workers' health (and compose's service_healthy) comes from it.
	BUILDAH_FORMAT=docker $(CONTAINER_ENGINE) build-image
	LABCTL_CONTAINER_TESTS=1 LABCTL_CONTAINER_ENGINE=$(abspath $(CONTAINER_ENGINE)) \
		DOCKER_HOST=$(PODMAN_SOCKET) $(PY) -m pytest -q -m containers tests/test_containers.py

## bench: speed ratios against references, written to docs/benchmarks.md
bench: $(STAMP)
	$(PY) -m labctl.bench.numpy_vs_torch
	$(PY) -m labctl.bench.resnet_throughput
	$(PY) -m labctl.bench.queue_latency
	$(PY) -m labctl.bench.data_path
	$(PY) -m labctl.bench.ddp_throughput

lint: $(STAMP)
	$(VENV)/bin/ruff check cli worker shared tests bench

clean:
	rm -rf $(VENV) $(ARTIFACTS)
