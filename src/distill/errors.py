"""Typed errors. Everything below the CLI raises these; the CLI prints one line and exits 2."""


class DistillError(Exception):
    """A user-facing problem: bad recipe, missing file, incompatible models. One line, no traceback."""


class RecipeError(DistillError):
    """The recipe is invalid; the message names the field."""


class InputError(DistillError):
    """An input file or model is missing or unreadable; the message names the file."""


class CompatibilityError(DistillError):
    """Teacher and student (or method and teacher source) cannot work together."""
