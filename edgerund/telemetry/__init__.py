"""edgerund.telemetry: compact, signed, store-and-forward telemetry over MQTT 5.

codec (wire format v1, pure), aggregate (window statistics, pure), spool (SQLite WAL
store-and-forward on one writer thread), uplink (aiomqtt session, paced replay, cmd/),
component (the `telemetry` component: hub samples and events in, batches out), consumer
and cli (the reference backend side: decode, verify, dedup, gaps). docs/telemetry.md is
the normative description of what goes on the wire.
"""
