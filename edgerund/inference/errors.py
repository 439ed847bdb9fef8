"""The inference runtime's error type.

`ModelError` is raised when a model directory cannot be used: manifest missing or
malformed (the message names the field), model file missing or not ONNX, the graph's
inputs/outputs do not match the manifest's ABI (both sides named), golden vectors not
reproduced. At start-up the component turns it into a ConfigError naming the config key;
a swap at run time raises it to the caller (the updates component) and keeps the old
runner.
"""

from __future__ import annotations

from edgerund.errors import EdgerundError


class ModelError(EdgerundError):
    """A model directory is unusable. `str()` says which file/field and expected vs got."""

    def __init__(self, message: str, *, code: str = "model_error") -> None:
        self.code = code
        super().__init__(message)
