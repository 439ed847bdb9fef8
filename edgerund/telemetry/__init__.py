"""edgerund.telemetry: compact, signed, store-and-forward telemetry over MQTT 5.

codec (wire format v1, pure), aggregate (window statistics, pure), batcher (samples,
events and time in, sealed batches out; pure), spool (SQLite WAL store-and-forward on one
writer thread), uplink (aiomqtt session, paced replay, cmd/ transport), commands (the
remote commands resend, upload_raw, rebirth and the dispatch of every cmd/ through the
root's RemoteCommands), component (the `telemetry` component wiring them together). The
reference backend side (decode, verify, dedup, gaps) is in edgerund.backend.
docs/telemetry.md is the normative description of what goes on the wire.
"""
