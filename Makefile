# The two set-up commands of the README: `make demo` (main job on the embedded tiny model) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
OUT ?= out

.PHONY: demo test venv bench clean

$(BIN)/mvgen: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# the CPU wheel of torch (see ENVIRONMENT.md); GPU nodes bring their own torch
	$(BIN)/pip install --quiet torch==2.13.0 "numpy<2"
	$(BIN)/pip install --quiet -e ".[kernels,server,export,test]"
	touch $(BIN)/mvgen

venv: $(BIN)/mvgen

demo: venv
	$(BIN)/mvgen demo-inputs --out $(OUT)/inputs
	$(BIN)/mvgen generate --model tiny --first-frame $(OUT)/inputs/first_frame.png \
		--first-frame-mask $(OUT)/inputs/first_frame_mask.png --reference $(OUT)/inputs/front.png --reference $(OUT)/inputs/back.png --reference $(OUT)/inputs/side.png \
		--prompt "a person turns around, showing the back of the jacket" --out $(OUT)/demo.mp4

test: venv
	$(BIN)/python -m pytest -q tests

bench: venv
	$(BIN)/python -m benchmarks.reference_cache --out $(OUT)/benchmarks

clean:
	rm -rf $(VENV) $(OUT)
