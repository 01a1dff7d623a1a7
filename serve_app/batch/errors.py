"""What stops a batch job: input it cannot use, and a stop it was asked for."""

from __future__ import annotations

from pathlib import Path


class JobInputError(Exception):
    """Input the job cannot use: the message is the sentence the user reads."""


STOPPED = "The job was stopped before it finished; no output was written."


class JobStopped(Exception):
    """The job was asked to stop (SIGTERM); its message has already been printed."""


def refuse_repeats(file: Path, names: list[str]) -> None:
    """Refuse a file with two columns of one name (or two with none)."""
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        which = ", ".join("one with no name" if not n else repr(n) for n in repeated)
        raise JobInputError(
            f"{file.name} has more than one column named {which}: give each column a name "
            "of its own (columns are matched by name)."
        )
