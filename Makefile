# `make demo`: the pipeline end to end on this machine. `make test`: lint, types and the test suite.
# Both set up a local virtual environment (.venv) and the servers they need.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: demo test chaos chaos-cluster bench lint typecheck services cluster cluster-down clean constraints

# constraints.txt pins every package to the versions last tested; pyproject.toml pins the tools
# that judge the code (ruff, mypy, pytest) on its own.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test,bench]'
	touch $@

# After a dependency changes in pyproject.toml: resolve afresh, test, and commit the new pins.
constraints:
	rm -rf .venv-constraints
	$(PYTHON) -m venv .venv-constraints
	.venv-constraints/bin/python -m pip install -q -e '.[test,bench,postgres]'
	{ sed -n '1,2p' constraints.txt; .venv-constraints/bin/python -m pip freeze --exclude-editable; } > constraints.new
	mv constraints.new constraints.txt
	rm -rf .venv-constraints

demo: $(VENV)/.installed
	@PY=$(PY) bash scripts/services.sh broker
	$(VENV)/bin/multillm demo

# A few minutes of thousands of requests while workers are killed, connections cut and
# the mock fails at random; prints the table kept in docs/reliability.md.
chaos: $(VENV)/.installed
	@PY=$(PY) bash scripts/services.sh broker
	$(VENV)/bin/multillm --log-level error chaos --requests 3000 --duration 150

# The same on the local three-node cluster (scripts/cluster.sh, started if down), with broker
# nodes SIGKILLed and restarted beside the rest; its table is in docs/reliability.md too.
chaos-cluster: $(VENV)/.installed
	@PY=$(PY) bash scripts/services.sh broker --install
	$(VENV)/bin/multillm --log-level error chaos --cluster --requests 3000 --duration 150

# The eleven scenarios of docs/benchmarks.md, each against its baseline in the same run (about 15 minutes);
# rewrites the generated part of docs/benchmarks.md and docs/benchmarks.png.
bench: $(VENV)/.installed
	@PY=$(PY) bash scripts/services.sh broker
	@PY=$(PY) bash scripts/services.sh postgres
	$(VENV)/bin/multillm --log-level error bench --output docs/benchmarks.md

services:
	@PY=$(PY) bash scripts/services.sh broker --install
	@PY=$(PY) bash scripts/services.sh postgres --install
	@PY=$(PY) bash scripts/services.sh compose --install
	@PY=$(PY) bash scripts/services.sh prometheus --install

# Three RabbitMQ nodes clustered beside the system's own (AMQP on 5681..5683); prints their URLs.
cluster:
	bash scripts/cluster.sh up --install

cluster-down:
	bash scripts/cluster.sh down

lint: $(VENV)/.installed
	$(PY) -m ruff check multillm tests
	$(PY) -m ruff format --check multillm tests

typecheck: $(VENV)/.installed
	$(PY) -m mypy

# pip check: every installed package's own requirements are met (a bound too loose shows here first).
test: $(VENV)/.installed services lint typecheck
	$(PY) -m pip check
	$(PY) -m pytest -q -n 2 -m "not serial" --durations=10
	$(PY) -m pytest -q -m serial --durations=5

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache multillm.egg-info
