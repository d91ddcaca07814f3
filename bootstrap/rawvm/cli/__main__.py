"""``python -m rawvm.cli``: the same as the ``rawvm`` command."""

import sys

from rawvm.cli import command

sys.exit(command())
