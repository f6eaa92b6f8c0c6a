"""Errors the service layer raises for every interface (CLI, console, API) to report."""


class NotFound(LookupError):
    """No such record."""


class InvalidState(ValueError):
    """The record is not in a state that allows the operation."""
