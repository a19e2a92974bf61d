# Two entry points: `make demo` runs the default workflow, `make test` runs the test suite.
# Both create .venv in the repository root if it is missing and install the project into it.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
CORES ?= 2

.PHONY: demo benchmark benchmark-tissue new-site demo-model hdbet-tiny scale test lint dryrun clean

$(STAMP): pyproject.toml requirements-cluster.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e ".[test]"
	$(VENV)/bin/pip install --quiet --no-deps -r requirements-cluster.txt
	touch $(STAMP)

demo: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/snakemake --cores $(CORES) --profile workflow/profiles/default
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/snakemake --profile workflow/profiles/default --report results/report.html

# The demo with nine traveling subjects instead of three (config/benchmark.yaml on top of config.yaml,
# the same shipped model), in benchmark-run/ so the demo's results stay: ~1.5 h on 2 cores. Its tables
# are committed in benchmarks/benchmark.md (benchmarks/benchmark_tables.py writes it).
benchmark: $(STAMP)
	mkdir -p benchmark-run && ln -sfn ../resources benchmark-run/resources
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/snakemake --cores $(CORES) --profile workflow/profiles/default \
		--directory benchmark-run --configfile $(CURDIR)/config/config.yaml $(CURDIR)/config/benchmark.yaml
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/python benchmarks/benchmark_tables.py benchmark-run/results \
		> benchmarks/benchmark.md

# `make benchmark` on the tissue site model, with age's regional effect (config/benchmark-tissue.yaml on
# top of both): it trains its own model (~50 min), ~2 h on 2 cores in all, in benchmark-tissue-run/;
# tables in benchmarks/benchmark_tissue.md.
benchmark-tissue: $(STAMP)
	mkdir -p benchmark-tissue-run && ln -sfn ../resources benchmark-tissue-run/resources
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/snakemake --cores $(CORES) --profile workflow/profiles/default \
		--directory benchmark-tissue-run --configfile $(CURDIR)/config/config.yaml $(CURDIR)/config/benchmark.yaml \
		$(CURDIR)/config/benchmark-tissue.yaml
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/python benchmarks/benchmark_tables.py benchmark-tissue-run/results \
		> benchmarks/benchmark_tissue.md

# The demo with a target scanner the shipped model never saw (config/new-site.yaml on top of config.yaml):
# its token learned from four target-only scans, the traveling subjects harmonized to it and scored
# against their truth there, in new-site-run/; tables in benchmarks/new_site.md.
new-site: $(STAMP)
	mkdir -p new-site-run && ln -sfn ../resources new-site-run/resources
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/snakemake --cores $(CORES) --profile workflow/profiles/default \
		--directory new-site-run --configfile $(CURDIR)/config/config.yaml $(CURDIR)/config/new-site.yaml
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/python benchmarks/new_site_tables.py new-site-run/results \
		> benchmarks/new_site.md

# Retrains the demo's shipped model (resources/demo-model/) with config/config.yaml's settings on the
# demo cohort, on CPU, and writes its checkpoint, loss curve and sha256 there. `make demo` then checks
# the shipped file against the config (train.pretrained / pretrained_sha256) instead of training.
demo-model: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/snakemake --cores $(CORES) --profile workflow/profiles/default \
		--configfile config/config.yaml config/demo-model.yaml --until train
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/python -m harmodiff.train export \
		results/model/demo-model/checkpoint.pt resources/demo-model
	@echo "set train.pretrained_sha256 in config/config.yaml to: $$(cut -d' ' -f1 resources/demo-model/checkpoint.pt.sha256)"

# Retrains the tests' small HD-BET 2 model folder (tests/data/hd-bet-tiny/) on a synthetic 4 mm
# cohort with known brain masks (the cohort tests/test_hdbet.py scores it on). ~6 min on 1 core.
hdbet-tiny: $(STAMP)
	$(VENV)/bin/python -m harmodiff.synth --train-sites 3 --train-subjects-per-site 3 --test-sites 2 \
		--test-subjects 2 --seed 3 --render-spacing 4 --native-spacing 3.6 4.4 --quiet results/hdbet-tiny-cohort
	$(VENV)/bin/python -m harmodiff.hdbet_weights --cohort results/hdbet-tiny-cohort --scans 9 --steps 300 \
		--out tests/data/hd-bet-tiny

# An SRPBS-shaped synthetic cohort (10 traveling subjects x 10 sites, 3 scans missing, + 20 training
# scans) through every rule for real, on a 4 mm grid with a tiny model: job count, wall time and each
# rule's cost in scale-run/scale.md (benchmarks/scale.md keeps the measured runs).
# SCALE_ARGS="--subjects 2 --sites 3" runs a smaller one; SCALE_ARGS=--resume continues a stopped run.
scale: $(STAMP)
	mkdir -p scale-run
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/python benchmarks/scale_run.py --workdir scale-run \
		--cores $(CORES) $(SCALE_ARGS) > scale-run/scale.md

test: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/python -m pytest -q

lint: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/snakemake --lint

dryrun: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/snakemake -n --profile workflow/profiles/default

clean:
	rm -rf results .snakemake
