"""Subcommands of the ``medconddiff`` command line, one module each."""
