# The two set-up commands of the README: `make demo` (main job on the bundled trace) and `make test`.
PYTHON ?= python3
.PHONY: setup demo test lint docs
setup:
	bash scripts/setup.sh
# reports its own time: set-up (install, numba cache) and the simulate a user waits for, separately
demo:
	@t0=$$(date +%s.%N); bash scripts/setup.sh; t1=$$(date +%s.%N); lufreplay simulate; t2=$$(date +%s.%N); \
	awk -v a=$$t0 -v b=$$t1 -v c=$$t2 'BEGIN { printf "make demo: set-up %.1f s, simulate %.1f s, total %.1f s\n", b-a, c-b, c-a > "/dev/stderr" }'
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
