"""DeepSpeed's own console output, kept out of Ondol's. Nothing is hidden with ONDOL_DEBUG=1.

- On import, DeepSpeed warns "Setting accelerator to CPU ..." on every machine without a GPU, before any command
  runs (a config error included). Ondol chooses the device itself and the run header names it, so the `ondol`
  entry points drop that record with a filter on DeepSpeed's logger (`drop_import_noise`, before any import).
- Joining the process group builds DeepSpeed's shared-memory communication op on CPU (and compiling any op
  runs ninja), which prints to stdout. `build_output_to(path)` sends that to a file instead (both the Python
  streams and file descriptors 1 and 2, which compilers write to); if the step fails, the file's text is
  written to stderr before the error goes on. On a machine without libaio the file holds DeepSpeed's probe for
  its async-I/O op, `/usr/bin/ld: cannot find -laio`; a line after it says that this is harmless.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from ondol.errors import debug_env

IMPORT_NOISE = ("Setting accelerator to CPU",)
NO_LIBAIO = "cannot find -laio"
NO_LIBAIO_NOTE = ("ondol: 'cannot find -laio' above is DeepSpeed probing for libaio at start-up: without it only "
                  "DeepSpeed's async-I/O op (NVMe offload) is unavailable, which Ondol does not use\n")


class _DropImportNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in IMPORT_NOISE)


def drop_import_noise(debug: bool) -> None:
    """Install the filter on DeepSpeed's logger (it survives DeepSpeed setting the logger up on import), unless
    `debug` (--debug or ONDOL_DEBUG=1)."""
    logger = logging.getLogger("DeepSpeed")
    if not debug and not any(isinstance(f, _DropImportNoise) for f in logger.filters):
        logger.addFilter(_DropImportNoise())


@contextlib.contextmanager
def build_output_to(path: Path) -> Iterator[None]:
    """Everything printed inside the block, by Python or by child processes, is appended to `path`."""
    if debug_env():
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(path, "a", encoding="utf-8") as log:
            start = log.tell()
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            try:
                with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                    yield
            except BaseException:
                log.flush()
                os.dup2(saved[1], 2)
                sys.stderr.write(path.read_bytes()[start:].decode("utf-8", errors="replace"))
                raise
            finally:
                log.flush()
            if NO_LIBAIO in path.read_bytes()[start:].decode("utf-8", errors="replace"):
                log.write(NO_LIBAIO_NOTE)
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
