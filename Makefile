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
