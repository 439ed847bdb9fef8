"""What a model publisher runs: signing keys, keyrings and bundle building.

Never imported by the daemon (tests/test_architecture.py enforces it). It uses only the pure
cores of the daemon package: `edgerund.updates.manifest` and `edgerund.updates.keyring`.
"""
