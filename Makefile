# Convenience targets. The two set-up commands are scripts/simulate.sh and scripts/test.sh.
.PHONY: deb test simulate soak clean crash-check arm64-check trixie-check

deb:  ## build packaging/out/edgerund_VERSION_ARCH.deb for this machine's architecture
	packaging/build-deb.sh

test:
	scripts/test.sh

# Slow checks, not part of CI's run (results and dates in README, "Other architectures
# and distributions"): build the .deb in a debootstrapped root and install-test it there.
arm64-check:  ## arm64 bookworm (Raspberry Pi OS base) under qemu-user-static; about an hour
	scripts/distro-check.sh bookworm arm64

trixie-check:  ## Debian 13 trixie (Python 3.13), native; about 10 minutes
	scripts/distro-check.sh trixie

simulate:
	scripts/simulate.sh

# The long soak profile (benchmarks/soak, issue #19): SOAK_SEED=soak1-N reproduces a run.
SOAK_SECONDS ?= 3600
SOAK_SEED ?=
SOAK_REPORT ?= soak-report.json
SOAK_ARGS ?=  # more harness flags, e.g. --exclude-faults daemon_kill9,daemon_restart
soak:  ## seeded chaos run against mosquitto/swtpm/ptys; writes $(SOAK_REPORT)
	PYTHONPATH=$(CURDIR) .venv/bin/python -m benchmarks.soak --seconds $(SOAK_SECONDS) \
	    $(if $(SOAK_SEED),--seed $(SOAK_SEED)) --report $(SOAK_REPORT) $(SOAK_ARGS)

crash-check:  ## power-cut consistency of updates and spool, every crash state (needs strace)
	PYTHONPATH=$(CURDIR) $(or $(PYTHON),.venv/bin/python) -m edgerund.toolkit.crashsim --keep-failed build/crash-failed

clean:
	rm -rf packaging/out build dist *.egg-info
