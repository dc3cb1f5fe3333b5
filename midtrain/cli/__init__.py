"""The command line: ``midtrain <command>``.

Owns the command table (``main``), the LightningCLI subcommands (``fit``), midtrain's own
tools (``tools``, ``configs``), and turning input and errors into one line (``yaml_input``,
``errors``, ``quiet``). The top layer: it may import every other package; nothing imports it.
"""

from __future__ import annotations

from midtrain.cli.main import main

__all__ = ["main"]
