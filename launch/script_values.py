"""Values ondol writes into a generated script or a command line that a shell reads (the sbatch script, the
DeepSpeed runner's command, the rank spec): each goes through `script_value` first.

A control character is refused wherever it appears: a newline or carriage return would end the line the value
is on and start a command of its own (in a `#SBATCH` directive, a comment or an unquoted remote line), and bash
drops a NUL from a script. Shell lines quote every value with shlex besides (`shell_word`); `#SBATCH` lines put
it in Slurm's double quotes, one option each (`sbatch_option`). Refusals are one line naming the config key or
the derived path, with the value shown escaped.
"""

from __future__ import annotations

import os
import re
import shlex
import unicodedata

from ondol.errors import LaunchError

# Unicode control characters (C0, DEL, C1 including NEL) and the line and paragraph separators.
_LINE_BREAKING = frozenset(("Cc", "Zl", "Zp"))
SBATCH_OPTION = re.compile(r"--[A-Za-z][A-Za-z0-9-]*(=.*)?", re.DOTALL)
# Characters a shell gives a meaning to; pdsh joins the words after its options into the remote shell line.
SHELL_SPECIAL = frozenset(" \t;&|<>()$`\\\"'*?[]{}!#~")


class UnsafeValueError(LaunchError):
    """A value that cannot be written into a generated script or command line as it is."""


def script_value(key: str, value: str | os.PathLike) -> str:
    """`value` as text, refused when it holds a control character; `key` names its config key or what it is."""
    text = os.fspath(value)
    bad = next((c for c in text if unicodedata.category(c) in _LINE_BREAKING), None)
    if bad is not None:
        raise UnsafeValueError(f"{key} {text!r} contains the control character {bad!r}, and it would be written into "
                               "a generated script or command line: remove it")
    return text


def shell_word(key: str, value: str | os.PathLike) -> str:
    """One checked value as one shell word."""
    return shlex.quote(script_value(key, value))


def sbatch_option(key: str, option: str) -> str:
    """One checked sbatch option (`--name` or `--name=value`), the argument of one `#SBATCH` line."""
    script_value(key, option)
    if not SBATCH_OPTION.fullmatch(option):
        raise UnsafeValueError(f"{key} {option!r} is not one sbatch option: write each as --name or --name=value, "
                               "e.g. --constraint=h100")
    return option


def option_words(key: str, text: str) -> list[str]:
    """Options for a runner (pdsh, mpirun) as words, none holding a character a remote shell would interpret."""
    try:
        words = shlex.split(script_value(key, text))
    except ValueError as e:  # an unclosed quote
        raise UnsafeValueError(f"{key} {text!r}: {e}: close the quote or drop it") from None
    bad = next((w for w in words if SHELL_SPECIAL & set(w)), None)
    if bad is not None:
        raise UnsafeValueError(f"{key} word {bad!r} has characters a remote shell would interpret, and the runner "
                               "may pass it into the remote command line: use plain options and values")
    return words
