"""The ``keras-ce`` console script's entry point, outside the package on purpose.

Importing :mod:`keras_ce_plugin` imports Keras and, with the TensorFlow backend,
TensorFlow, whose C++ start-up writes INFO lines straight to the process's standard
error before its logging is set up, where ``TF_CPP_MIN_LOG_LEVEL`` cannot silence
them (tensorflow/tensorflow#100442), and reads ``TF_CPP_MIN_LOG_LEVEL`` once, when it
loads. A command prints its result or one error line, so this module runs before the
package: it sets ``TF_CPP_MIN_LOG_LEVEL`` (unless the caller did), and while the
package imports it drops TensorFlow's INFO and WARNING lines from standard error.
Everything else written then (an error, a Python warning) still reaches it.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator

# TensorFlow's log level for the command and the processes it starts: errors reach
# the user as exceptions, and CUDA builds log one at the first op on a machine
# without a GPU.
TF_LOG_LEVEL = "3"

# A TensorFlow (absl) log line at INFO or WARNING, and absl's notice that it logs to
# standard error before it is set up.
_TF_NOTICE = re.compile(
    r"[IW]\d{4} [\d:.]+ +\d+ \S+:\d+\] "
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called"
)


def tensorflow_notices_dropped(text: str) -> str:
    """``text`` without TensorFlow's INFO/WARNING log lines.

    >>> tensorflow_notices_dropped(
    ...     "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\\n"
    ...     "I0000 00:00:1796476338.601917   31196 port.cc:153] oneDNN custom operations are on.\\n"
    ...     "E0000 00:00:1796476338.6 31196 x.cc:1] kept\\n"
    ...     "a Python warning\\n"
    ... )
    'E0000 00:00:1796476338.6 31196 x.cc:1] kept\\na Python warning\\n'
    """
    return "".join(line for line in text.splitlines(keepends=True) if not _TF_NOTICE.match(line))


@contextlib.contextmanager
def _stderr_without_tensorflow_notices() -> Iterator[None]:
    """Within: file descriptor 2 goes to a temporary file, written back to standard
    error on the way out with TensorFlow's notices dropped (unchanged where standard
    error has no file descriptor)."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # no file behind stderr: nothing to drop
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), fd)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            caught.seek(0)
            sys.stderr.write(tensorflow_notices_dropped(caught.read().decode(errors="replace")))
            sys.stderr.flush()


def main() -> int:
    """Runs ``keras-ce`` (:func:`keras_ce_plugin.cli.main`); returns the exit status."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", TF_LOG_LEVEL)
    with _stderr_without_tensorflow_notices():
        import keras_ce_plugin.cli
    return keras_ce_plugin.cli.main()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
