"""The errors a user can act on. str(error) is the whole message: what went wrong, then what to do.

The UI turns these into gr.Error, the CLI into one line on stderr and exit code 2; anything else is a bug and keeps
its traceback in the log.
"""


class FluxdemoError(Exception):
    """A problem the user can fix; the message says how."""


class OptionsError(FluxdemoError, ValueError):
    """A generation option out of range (names the field, the rule and the value)."""


class HubError(FluxdemoError):
    """A file could not be had from the Hugging Face Hub (gated, offline, missing, disk full)."""


class ModelFileError(FluxdemoError):
    """A weights file that is not what the preset expects (wrong model, variant, missing blocks, corrupt)."""


class LoraError(FluxdemoError):
    """A LoRA file that cannot be used: unreadable, not safetensors, for another model, or unsupported."""


class OutOfMemoryError(FluxdemoError):
    """The device ran out of memory even after falling back to a lighter strategy."""


class CancelledError(FluxdemoError):
    """The user cancelled the run; the manager is clean and the next run works."""
