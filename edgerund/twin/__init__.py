"""The device twin and signed remote operations (docs/twin.md): operator-signed commands
and desired state, gateway-signed replies and reported state."""
