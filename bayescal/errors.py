"""Errors that bayescal reports to the user."""


class BadInput(ValueError):
    """Bad user input (data file, model card, option): the CLI prints the message and exits 2."""


class BayescalWarning(UserWarning):
    """Something the user should know but that does not stop the run (implausible units, a
    checkpoint being replaced): the CLI prints it as one line on stderr."""
