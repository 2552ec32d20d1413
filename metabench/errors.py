"""The errors a command ends with: one class per exit status.

============================  ===========  ==================================================
class                         exit status  meaning
============================  ===========  ==================================================
:class:`MetabenchError`       2            bad input or configuration (argparse's convention):
                                           the message says what was wrong and what is accepted
:class:`PluginError`          1            a plugin misbehaved or its code failed: the message
                                           names the plugin
``KeyboardInterrupt``         130          interrupted
============================  ===========  ==================================================

The CLI prints either as one line ``metabench: error: ...`` and exits with ``exit_status``.
"""


class MetabenchError(Exception):
    """Bad input or configuration: the message says what was wrong and what is accepted."""

    exit_status = 2


class PluginError(MetabenchError):
    """A plugin misbehaved (a wrong registration or return value) or its code raised during a
    command (then the plugin's exception is the ``__cause__``): the message names the plugin."""

    exit_status = 1
