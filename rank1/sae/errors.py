"""The one error type of the SAE module: bad input that the user can fix; the message names it."""


class SAEError(ValueError):
    """Bad activations, settings or files for the SAE tools; the message names the file or flag."""
