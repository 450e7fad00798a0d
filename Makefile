# The two set-up commands of the README: `make demo` (main job on the bundled trace) and `make test`.
PYTHON ?= python3
.PHONY: setup demo test lint docs
setup:
	bash scripts/setup.sh
demo: setup
	lufreplay simulate
test: setup
	$(PYTHON) -m pytest -q -ra
lint:
	ruff check lufreplay tests bench
	ruff format --check lufreplay tests bench
docs:
	lufreplay schema --markdown > docs/trace-format.md

# The many-CPU test bed (opt-in, not part of `make test`): a vanilla 6.12 guest kernel built once into
# ${XDG_CACHE_HOME:-~/.cache}/lufreplay-testbed, booted under qemu with 4 and 8 vCPUs (testbed/README.md).
.PHONY: testbed testbed-test
testbed:
	bash testbed/build-kernel.sh
testbed-test: testbed
	bash testbed/test.sh
