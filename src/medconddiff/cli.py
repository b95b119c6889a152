"""``medconddiff`` command line: segment, train, fine-tune, keep a training set, evaluate, plan, benchmark.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
helpers they share live in :mod:`medconddiff.commands.common`, never here (this module loads the
commands). User errors (bad files, wrong checkpoints, existing outputs: the types of
:func:`medconddiff.errors.user_error_types`) print one line and exit with status 2; anything else is
a bug and prints its traceback, exit status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import warnings
from typing import Iterator, Optional, Sequence

from . import __version__
from .commands.common import failure_report
from .errors import UserInputError, user_error_types  # noqa: F401  (importable from here, as before)

SUBCOMMANDS = {
    "segment": ("medconddiff.commands.segment", "segment NIfTI scans or DICOM series (a file or a folder)"),
    "train": ("medconddiff.commands.train", "train a model on labelled scans (torchrun for DDP)"),
    "finetune": ("medconddiff.commands.finetune", "fine-tune a model on a few labelled slices of a scan"),
    "add-to-set": ("medconddiff.commands.add_to_set",
                   "add a scan's checked slices to a training set (nnU-Net v2, 'ignore' elsewhere)"),
    "remove-from-set": ("medconddiff.commands.remove_from_set",
                        "take a case, or some of its verified slices, out of a training set"),
    "merge-cases": ("medconddiff.commands.merge_cases",
                    "merge two cases of a training set that hold the same scan"),
    "evaluate": ("medconddiff.commands.evaluate", "score a checkpoint on labelled scans"),
    "choose-consensus": ("medconddiff.commands.choose_consensus",
                         "choose and record a model's consensus and step cap on labelled slices"),
    "benchmark": ("medconddiff.commands.benchmark", "measure speed and memory on this device"),
    "plan": ("medconddiff.commands.plan", "print a dataset's fingerprint and the preprocessing plan it implies"),
}


#: Kept for code that raised the CLI's own error type: it is the project's user error now.
UserError = UserInputError


def build_parser(only: Optional[str] = None) -> argparse.ArgumentParser:
    """The full parser; with ``only``, the other subcommands' modules are not imported (fast start)."""
    parser = argparse.ArgumentParser(prog="medconddiff", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"medconddiff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=help_text)
            continue
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


@contextlib.contextmanager
def _plain_warnings() -> Iterator[None]:
    """This package's warnings (a NaN voxel replaced, a scan read without orientation, …) print as one
    ``medconddiff: warning: …`` line, without the source line a Python warning shows; other libraries'
    warnings keep Python's format, which says where they come from."""
    python_format = warnings.formatwarning

    def formatwarning(message, category, filename, lineno, line=None):
        if os.path.abspath(filename).startswith(_PACKAGE_DIR + os.sep):
            return f"medconddiff: warning: {message}\n"
        return python_format(message, category, filename, lineno, line)

    warnings.formatwarning = formatwarning
    try:
        yield
    finally:
        warnings.formatwarning = python_format


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(only=command if command in SUBCOMMANDS else None).parse_args(argv)
    try:
        with _plain_warnings():
            return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("medconddiff: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - sorted by failure_report: user error, out of memory, or bug
        text, status = failure_report(error, f"medconddiff {args.command}: error")
        print(text, file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
