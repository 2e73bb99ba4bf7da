"""Errors that bayescal reports to the user."""


class BadInput(ValueError):
    """Bad user input (data file, model card, option): the CLI prints the message and exits 2."""


class BayescalWarning(UserWarning):
    """Something the user should know but that does not stop the run (implausible units, a
    checkpoint being replaced): the CLI prints it as one line on stderr."""


class InvalidSetting(BadInput):
    """A setting out of its range, raised where settings are validated (the configuration
    objects). The message names the ``parameter`` as the library calls it; the CLI names the
    flag that set it instead, with the same ``problem``."""

    def __init__(self, parameter: str, problem: str, owner: str = "") -> None:
        self.parameter, self.problem = parameter, problem
        super().__init__(f"{owner + ' ' if owner else ''}{self.naming(parameter)}")

    def naming(self, name: str) -> str:
        """The message with the setting called ``name`` (e.g. its CLI flag)."""
        return f"{name}{'' if self.problem.startswith(':') else ' '}{self.problem}"
