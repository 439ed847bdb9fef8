# Convenience targets. The two set-up commands are scripts/simulate.sh and scripts/test.sh.
.PHONY: deb test simulate clean crash-check arm64-check trixie-check

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

crash-check:  ## power-cut consistency of updates and spool, every crash state (needs strace)
	PYTHONPATH=$(CURDIR) $(or $(PYTHON),.venv/bin/python) -m edgerund.toolkit.crashsim --keep-failed build/crash-failed

clean:
	rm -rf packaging/out build dist *.egg-info
