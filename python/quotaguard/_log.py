"""quotaguard's logger, ``"quotaguard"``: alerts, a callback that raised, an unpriced
model. Its records say they come from quotaguard.

Where the application configured no logging at all (no handler on the way from the
record's logger to the root), Python would print the bare message to stderr; the
handler here prints it as ``quotaguard: <message>`` instead, and stays silent as soon as
any other handler would see the record, so nothing is printed twice.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["logger"]

logger = logging.getLogger("quotaguard")


class _LastResort(logging.Handler):
    """Python's last resort for quotaguard's records, with the name in front."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.setFormatter(logging.Formatter("quotaguard: %(message)s"))

    def _others(self, record: logging.LogRecord) -> bool:
        """Whether a handler other than this one sees ``record`` (as logging counts them)."""
        current: logging.Logger | None = logging.getLogger(record.name)
        while current is not None:
            if any(h is not self for h in current.handlers):
                return True
            if not current.propagate:
                return False
            parent = current.parent
            current = parent if isinstance(parent, logging.Logger) else None
        return False

    def emit(self, record: logging.LogRecord) -> None:
        if logging.lastResort is None or self._others(record):
            return
        try:
            stream = sys.stderr
            if stream is not None:
                stream.write(self.format(record) + "\n")
                stream.flush()
        except Exception:
            self.handleError(record)


def _install() -> None:
    # Once per process, even if the module is loaded again.
    if not any(type(h).__name__ == "_LastResort" for h in logger.handlers):
        logger.addHandler(_LastResort())


_install()
