"""Device identity and remote attestation (TPM 2.0 through tpm2-pytss, or an explicitly
insecure software identity), plus the pure-Python verifier. See docs/identity.md.

Modules: config (schema), component (the daemon component), base (shared API), tpm (TPM
identity), worker (the one thread owning the ESAPI context), tpm_errors (actionable
messages), software (software identity), tpmstruct (TPM wire structures, pure Python),
verify (the verifier), cli (`edgerund attest verify|export`).
"""
