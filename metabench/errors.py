"""Errors a user can fix. The CLI prints them as one line and exits with status 2."""


class MetabenchError(Exception):
    """Bad input or configuration: the message says what was wrong and what is accepted."""


class PluginError(MetabenchError):
    """A plugin misbehaved: the message names the plugin."""
