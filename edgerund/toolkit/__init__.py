"""The field technician's toolkit: `edgerunctl top`, `check`, `support-bundle`, `metrics`.

Also the developer's: `crashsim` (the power-cut consistency check, `make crash-check`) and
`daemonproc` (run the real daemon as a child, for crashsim and benchmarks). The daemon
imports none of these two."""
