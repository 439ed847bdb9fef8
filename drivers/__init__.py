"""Hardware drivers for edgerund: I2C parts (smbus2), serial instruments (pyserial).

Each driver is a pure protocol module (bytes in, readings out; no I/O) plus a thin
transport. Drivers never import the daemon; the daemon finds them through
drivers.registry by the config's `driver:` name.
"""
