# Convenience targets. The two set-up commands are scripts/simulate.sh and scripts/test.sh.
.PHONY: deb test simulate clean

deb:  ## build packaging/out/edgerund_VERSION_ARCH.deb for this machine's architecture
	packaging/build-deb.sh

test:
	scripts/test.sh

simulate:
	scripts/simulate.sh

clean:
	rm -rf packaging/out build dist *.egg-info
