# Convenience targets. The two set-up commands are scripts/simulate.sh and scripts/test.sh.
.PHONY: deb test simulate clean crash-check

deb:  ## build packaging/out/edgerund_VERSION_ARCH.deb for this machine's architecture
	packaging/build-deb.sh

test:
	scripts/test.sh

simulate:
	scripts/simulate.sh

crash-check:  ## power-cut consistency of updates and spool, every crash state (needs strace)
	PYTHONPATH=$(CURDIR) $(or $(PYTHON),.venv/bin/python) -m edgerund.toolkit.crashsim --keep-failed build/crash-failed

clean:
	rm -rf packaging/out build dist *.egg-info
