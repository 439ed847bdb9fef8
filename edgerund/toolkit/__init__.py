"""The field technician's toolkit: `edgerunctl top`, `check`, `support-bundle`, `metrics`."""
