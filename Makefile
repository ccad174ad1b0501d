# The two set-up commands of the README: `make demo` (main job on the embedded tiny model) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
OUT ?= out

.PHONY: demo test test-fast venv bench clean

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
	# Wan2.1-T2V: reference-to-video, no first frame (Mv2ID)
	$(BIN)/mvgen generate --model tiny-t2v --reference $(OUT)/inputs/front.png --reference $(OUT)/inputs/back.png \
		--reference $(OUT)/inputs/side.png --prompt "the person of the references walks" --out $(OUT)/demo_t2v.mp4
	# Wan2.2-I2V-A14B's layout: high-noise then low-noise expert, each with its own guidance scale
	$(BIN)/mvgen generate --model tiny-wan22 --first-frame $(OUT)/inputs/first_frame.png --reference $(OUT)/inputs/back.png \
		--guidance-scale 4 --guidance-scale-2 3 --prompt "a person turns around" --out $(OUT)/demo_wan22.mp4
	# Wan2.2-TI2V-5B's layout (48-channel VAE, 16x spatial): the first frame is optional, references as on every Wan
	$(BIN)/mvgen generate --model tiny-ti2v --first-frame $(OUT)/inputs/first_frame.png --reference $(OUT)/inputs/back.png \
		--prompt "a person turns around" --out $(OUT)/demo_ti2v.mp4
	# Wan2.2-T2V-A14B's layout: text/reference-to-video, high-noise then low-noise expert (boundary 0.875)
	$(BIN)/mvgen generate --model tiny-wan22-t2v --reference $(OUT)/inputs/front.png --guidance-scale 4 \
		--guidance-scale-2 3 --prompt "the person of the references walks" --out $(OUT)/demo_wan22_t2v.mp4
	# Stand-In on Wan2.1-T2V: one face image (its crop is the user's), Stand-In's sampler (Euler, linear sigmas)
	$(BIN)/mvgen generate --model tiny-standin --reference $(OUT)/inputs/front.png --ref-size 64x64 \
		--scheduler euler_linear --prompt "the person of the reference smiles" --out $(OUT)/demo_standin.mp4
	# Phantom-Wan's layout (original-name transformer shards): references letterboxed on white, three-row guidance
	$(BIN)/mvgen generate --model tiny-phantom --reference $(OUT)/inputs/front.png --reference $(OUT)/inputs/side.png \
		--prompt "the person of the references walks" --out $(OUT)/demo_phantom.mp4

# two processes (xdist) for what does not time itself, then the timing and memory measurements alone
test: venv
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not serial" --durations=25 tests
	$(BIN)/python -m pytest -q -m serial --durations=10 tests

# the iteration tier (a few minutes): no tritonserver, nothing marked slow (compilation for GPU targets, exports of
# every family, CLI subprocesses, sequence-parallel spawns)
test-fast: venv
	$(BIN)/python -m pytest -q -x -n 2 -m "not server and not slow and not serial" tests

bench: venv
	$(BIN)/python -m benchmarks.reference_cache --out $(OUT)/benchmarks

clean:
	rm -rf $(VENV) $(OUT)
