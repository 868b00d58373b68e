"""Errors for bad user input (the CLI maps them to exit code 2)."""


class InputError(ValueError):
    """A model, data file, option or output folder the user gave cannot be used; the message
    names the problem and the fix."""
