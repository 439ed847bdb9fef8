# Convenience targets. The two set-up commands are scripts/simulate.sh and scripts/test.sh.
.PHONY: deb test simulate soak clean crash-check

deb:  ## build packaging/out/edgerund_VERSION_ARCH.deb for this machine's architecture
	packaging/build-deb.sh

test:
	scripts/test.sh

simulate:
	scripts/simulate.sh

# The long soak profile (tests/soak, issue #19): SOAK_SEED=soak1-N reproduces a run.
SOAK_SECONDS ?= 3600
SOAK_SEED ?=
SOAK_REPORT ?= soak-report.json
soak:  ## seeded chaos run against mosquitto/swtpm/ptys; writes $(SOAK_REPORT)
	PYTHONPATH=$(CURDIR) .venv/bin/python benchmarks/soak.py --seconds $(SOAK_SECONDS) \
	    $(if $(SOAK_SEED),--seed $(SOAK_SEED)) --report $(SOAK_REPORT)

crash-check:  ## power-cut consistency of updates and spool, every crash state (needs strace)
	PYTHONPATH=$(CURDIR) $(or $(PYTHON),.venv/bin/python) -m edgerund.toolkit.crashsim --keep-failed build/crash-failed

clean:
	rm -rf packaging/out build dist *.egg-info
