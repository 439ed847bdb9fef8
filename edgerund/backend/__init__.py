"""What a fleet backend runs: the attestation verifier and the reference telemetry consumer.

Never imported by the daemon (tests/test_architecture.py enforces it). It uses only the pure
cores of the daemon package: `edgerund.telemetry.codec`, `edgerund.identity.tpmstruct` and
`edgerund.identity.binding`.
"""
