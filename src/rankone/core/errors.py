"""One exception type for every input problem: the CLI turns it into one line and exit code 2."""


class RankoneError(Exception):
    """Bad input or a refused operation. The message says what is wrong and how to fix it."""

    exit_code = 2


class OverflowRefused(RankoneError):
    """An update that would overflow the weight's dtype (or is not finite) was refused unwritten:
    a sequential run records it as a failed edit and goes on."""
