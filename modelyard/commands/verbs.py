"""One verb family across the command groups (`add`, `list`, `show`, `set`, `remove`); the older verbs stay as
hidden aliases, so scripts that use them keep working.

The groups keep defining their commands under the older names; this module adds the family's names when
the entry point loads a group, so the groups' own modules need no change.
"""

from __future__ import annotations

import copy

import click

# group -> (the family's verb, the older verb it replaces)
RENAMED: dict[str, tuple[tuple[str, str], ...]] = {
    "models": (("add", "upload"),),
    "pipelines": (("add", "register"),),
    "routes": (("remove", "clear"),),
}


def one_verb_family(name: str, group: click.Command) -> None:
    """Shows `group`'s commands under the family's verbs and hides the older ones (which still run)."""
    if not isinstance(group, click.Group):
        return
    for verb, older in RENAMED.get(name, ()):
        command = group.commands.get(older)
        if command is None or verb in group.commands:
            continue  # renamed at the source already, or not in this build
        group.add_command(command, verb)
        alias = copy.copy(command)
        alias.hidden = True
        group.commands[older] = alias
