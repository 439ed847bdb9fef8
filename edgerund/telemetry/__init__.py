"""edgerund.telemetry"""
