"""The `keras-sp` console script, without TensorFlow's start-up log.

While TensorFlow loads, its C++ libraries write log lines to the standard
error stream ("All log messages before absl::InitializeLog() is called are
written to STDERR", "Could not find cuda drivers on your machine...")
before `TF_CPP_MIN_LOG_LEVEL` applies to them. They are written as soon as
`keras_sp` is imported, so the console script starts here, outside the
`keras_sp` package: it imports the command line with the standard error
stream captured, writes back every captured line that is not such a log
line, and runs `keras_sp.experiments.cli.main`. With `--debug` nothing is
filtered.
"""

import os
import re
import sys
import tempfile

__all__ = [
    "main",
]

# A line TensorFlow's C++ logging writes while it loads: the note that
# logging is not initialised yet, and INFO or WARNING lines in the
# `I0101 12:00:00.000000 1234 file.cc:31] message` format.
START_UP_LOG = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|[IW]\d{4} [\d:.]+ +\d+ [\w./-]+:\d+\] )"
)


def _import_command_line(argv):
    """`keras_sp.experiments.cli`, imported with the start-up log removed."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "--debug" in argv:
        from keras_sp.experiments import cli

        return cli
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            from keras_sp.experiments import cli
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode("utf-8", errors="replace")
            for line in text.splitlines(keepends=True):
                if not START_UP_LOG.match(line):
                    sys.stderr.write(line)
            sys.stderr.flush()
    return cli


def main(argv=None):
    """Runs `keras-sp` with the arguments `argv` (default: `sys.argv`).

    Returns:
        The exit code.
    """
    if argv is None:
        argv = sys.argv[1:]
    return _import_command_line(argv).main(argv)


if __name__ == "__main__":
    sys.exit(main())
