"""Errors that bayescal reports to the user."""


class BadInput(ValueError):
    """Bad user input (data file, model card, option): the CLI prints the message and exits 2."""
