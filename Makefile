# clipfnd: the two commands of the README, and a few more.
#   make demo   install, generate the built-in data, train CLIP+GloFND on 2 CPU processes, evaluate,
#               write the report of what GloFND found (runs/demo/report.html)
#   make test   install with the test extra, run the test suite
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
PORT   ?= 29517
DATA   ?= data/shapes

.PHONY: install demo data test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

$(DATA)/train/manifest.json: | install
	$(PY) -m clipfnd data synthetic --out $(DATA) --num-samples 8192 --num-val 1024 \
		--num-concepts 64 --shard-size 1024 --seed 0

data: $(DATA)/train/manifest.json

demo: install data
	OMP_NUM_THREADS=1 $(VENV)/bin/accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
		--mixed_precision no --dynamo_backend no --main_process_port $(PORT) \
		-m clipfnd train configs/demo.yaml data.train=$(DATA)/train data.val=$(DATA)/val overwrite=true
	OMP_NUM_THREADS=2 $(PY) -m clipfnd report runs/demo --out runs/demo/report.html

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: install
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/glofnd_overhead.py
	$(PY) benchmarks/accumulation.py --batch 512 --k 4 --steps 3 --rounds 2 --glofnd
	$(PY) benchmarks/index_shards.py --shards 20 --rounds 1
	$(PY) benchmarks/vs_open_clip.py --samples 1024 --rounds 1 --log-every 4
	$(PY) benchmarks/vs_open_clip.py --samples 512 --rounds 1 --log-every 2 --precision bf16 --settings open_clip clipfnd
	$(PY) benchmarks/loader.py --quick
	$(PY) benchmarks/step_overhead.py --repeats 3
	$(PY) benchmarks/communication.py --quick
	$(PY) benchmarks/fn_benefit.py --quick
	$(PY) benchmarks/fn_regime.py --quick
	$(PY) benchmarks/fn_study.py --quick
	$(PY) benchmarks/per_anchor.py --epochs 4 --arms default "adam (the previous default)" --out runs/bench/per_anchor_quick
	$(PY) benchmarks/vision_results.py --study glofnd --quick
	$(PY) benchmarks/fsdp_memory.py --model clipfnd-tiny-vit --worlds 1 2 --out runs/fsdp_memory_quick.json

clean:
	rm -rf runs data
