"""The command line, one module per command: its arguments, the library call, what it prints.

Each module has ``register(commands)``, which adds its sub-parser(s) to ``clipforge``'s and sets ``run`` to the
function that executes it. User mistakes surface as :class:`~clipforge.commands.common.UserError` (or the
library's ``ConfigError``/``CheckpointError``); :func:`clipforge.cli.main` prints them as one line and exits 2.
Library modules never import this package.
"""

from clipforge.commands import (
    classify,
    data,
    demo,
    embed,
    evaluate,
    explain,
    export,
    import_,
    index,
    merge,
    search,
    serve,
    train,
)

# the order of ``clipforge --help``: the run's path first, then using what it made
MODULES = (train, demo, evaluate, merge, data, embed, search, index, classify, explain, serve, import_, export)

__all__ = ["MODULES"]
