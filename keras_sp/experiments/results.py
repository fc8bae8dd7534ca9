"""Files the runners write and read back: results, caches, tables.

Every file is written atomically (`atomic_write`): to a temporary file in
the same folder, then renamed over the target with `os.replace`, so an
interrupted write (a full disk, Ctrl-C, a killed process) leaves the
previous file whole. A write that fails raises an `OSError` that names the
file. The new file gets the permissions `open()` would give it
(`0o666 & ~umask`). A file read back that is truncated or not what the
runners write raises `CorruptFileError`, which names the file and says
what to do.
"""

import contextlib
import json
import os
import secrets
import zipfile

__all__ = [
    "CorruptFileError",
    "ResultsFile",
    "atomic_write",
    "check_archive",
    "write_text",
]

# What reading back a truncated or damaged file (.npz, .keras) raises.
READ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile)

_MISSING = "<missing>"


class CorruptFileError(ValueError):
    """A file the runners wrote earlier that cannot be read back.

    Args:
        path: the file.
        problem: what is wrong with it.
        remedy: what the user can do (e.g. delete it to recompute it).
    """

    def __init__(self, path, problem, remedy):
        self.path = os.fspath(path)
        super().__init__(f"Cannot use {self.path!r}: {problem}. {remedy}")


def _temporary_prefix(path):
    return f".{os.path.basename(path)}.tmp-"


def _remove_abandoned(path):
    """Removes temporary files of `path` left by writers that were killed.

    A temporary file's name holds its writer's process id; on POSIX one
    whose process no longer exists is removed.
    """
    if os.name != "posix":
        return
    folder = os.path.dirname(os.path.abspath(path))
    prefix = _temporary_prefix(path)
    for name in os.listdir(folder):
        if not name.startswith(prefix):
            continue
        pid = name[len(prefix) :].split("-")[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, name))
        except OSError:
            continue


@contextlib.contextmanager
def atomic_write(path):
    """Writes `path` atomically: yields a temporary path to write instead.

    The temporary file is in the same folder (created if missing) and has
    the same extension as `path` (Keras and NumPy check it). When the body
    of the `with` block ends, the temporary file is synced to disk and
    renamed over `path` (`os.replace`, atomic). If the body raises, the
    temporary file is removed and `path` is left as it was; an `OSError`
    is raised again as an `OSError` naming `path` (chained `from` the
    original). The file gets the permissions of a file made by `open()`:
    `0o666` minus the umask.

    Args:
        path: the file to write.

    Example:

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "notes.txt")
    >>> with atomic_write(path) as temporary:
    ...     with open(temporary, "w") as handle:
    ...         _ = handle.write("done")
    >>> with open(path) as handle:
    ...     handle.read()
    'done'
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    _, extension = os.path.splitext(path)
    temporary = os.path.join(
        folder,
        f"{_temporary_prefix(path)}{os.getpid()}-{secrets.token_hex(4)}"
        f"{extension}",
    )
    try:
        os.makedirs(folder, exist_ok=True)
        _remove_abandoned(path)
        # Created as open() creates files: the kernel applies the umask.
        handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        mode = os.fstat(handle).st_mode & 0o777
        os.close(handle)
        yield temporary
        # The writer may have replaced the file (with its own permissions).
        os.chmod(temporary, mode)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        if isinstance(error, OSError):
            raise OSError(
                f"Cannot write {path!r} ({error}); a previous version of "
                "the file, if any, is unchanged."
            ) from error
        raise


def check_archive(path):
    """Raises unless `path` is a whole zip archive (`.npz`, `.keras`).

    Reads every entry and checks its CRC, so a truncated or damaged file
    is found before NumPy or Keras read it (NumPy leaves such a file open).

    Raises:
        zipfile.BadZipFile: for a file that is not a whole zip archive.
    """
    with zipfile.ZipFile(path) as archive:
        damaged = archive.testzip()
    if damaged is not None:
        raise zipfile.BadZipFile(f"entry {damaged!r} is damaged")


def write_text(path, text):
    """Writes `text` to the file `path` atomically (see `atomic_write`)."""
    with atomic_write(path) as temporary:
        with open(temporary, "w") as handle:
            handle.write(text)


def _check_structure(path, data):
    """Raises CorruptFileError unless `data` is a results file's content."""
    expected = (
        "a JSON object {'settings': {...}, 'runs': [{'key': ...}, ...]} "
        "as keras-sp writes it"
    )
    remedy = "Move it away (or use another output folder) to start over."
    if not isinstance(data, dict):
        received = f"a JSON {type(data).__name__}"
    elif not isinstance(data.get("runs"), list):
        received = f"'runs'={data.get('runs')!r}"[:80]
    elif not isinstance(data.get("settings", {}), dict):
        received = f"'settings'={data['settings']!r}"[:80]
    else:
        bad = [
            index
            for index, run in enumerate(data["runs"])
            if not isinstance(run, dict) or "key" not in run
        ]
        if not bad:
            return
        received = f"runs[{bad[0]}]={data['runs'][bad[0]]!r}"[:80]
    raise CorruptFileError(
        path, f"it must hold {expected}. Received: {received}", remedy
    )


def _differences(stored, received, prefix=""):
    """`["'key': 1 on disk, 2 now", ...]`, one entry per differing key.

    Keys of nested dicts are joined with dots (`'alpha_grid.l2'`).
    """
    lines = []
    for key in sorted(set(stored) | set(received), key=str):
        old = stored.get(key, _MISSING)
        new = received.get(key, _MISSING)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            lines += _differences(old, new, f"{prefix}{key}.")
        else:
            old = old if old is _MISSING else repr(old)
            new = new if new is _MISSING else repr(new)
            lines.append(f"'{prefix}{key}': {old} on disk, {new} now")
    return lines


class ResultsFile:
    """A JSON file of run records, rewritten atomically after every run.

    Each record is a dict with a unique `"key"` (the run's settings and
    seed as a string). `done(key)` says whether a previous invocation already
    finished that run, so a rerun skips it. The file also keeps the
    experiment's settings under `"settings"`. Every write goes through
    `atomic_write`: an interrupted write leaves the previous file whole.

    Args:
        path: the JSON file (created with its folder if missing).
        settings: a JSON-serializable dict stored beside the runs. When the
            file exists with other settings, raises a `ValueError` naming
            each key that differs with both values, rather than mixing runs
            of different experiments.

    Raises:
        CorruptFileError: when the file exists but is not valid JSON (for
            instance truncated) or not the structure above.
    """

    def __init__(self, path, settings=None):
        self.path = os.fspath(path)
        self.settings = settings or {}
        self._data = {"settings": self.settings, "runs": []}
        if os.path.exists(self.path):
            with open(self.path) as handle:
                try:
                    data = json.load(handle)
                except (json.JSONDecodeError, UnicodeDecodeError) as error:
                    raise CorruptFileError(
                        self.path,
                        f"it is not valid JSON ({error}), perhaps truncated",
                        "Move it away (or use another output folder) to "
                        "start over; its runs will be made again.",
                    ) from error
            _check_structure(self.path, data)
            stored = data.get("settings", {})
            if settings is not None and _normalise(stored) != _normalise(
                settings
            ):
                differences = _differences(
                    _normalise(stored), _normalise(settings)
                )
                raise ValueError(
                    f"Results file {self.path!r} holds runs made with other "
                    f"settings: {'; '.join(differences)}. Use another output "
                    "folder or move the file away."
                )
            self._data = data

    @property
    def runs(self):
        """The finished runs, as a list of dicts."""
        return list(self._data["runs"])

    def done(self, key):
        return any(run.get("key") == key for run in self._data["runs"])

    def get(self, key):
        for run in self._data["runs"]:
            if run.get("key") == key:
                return run
        return None

    def append(self, record):
        """Adds a finished run and writes the file (atomic replace).

        If the write fails, the run is not added and the file on disk keeps
        the previous runs.
        """
        if "key" not in record:
            raise ValueError("A run record needs a 'key'.")
        if self.done(record["key"]):
            raise ValueError(f"Run {record['key']!r} is already recorded.")
        self._data["runs"].append(record)
        try:
            self._write()
        except BaseException:
            self._data["runs"].pop()
            raise

    def _write(self):
        with atomic_write(self.path) as temporary:
            with open(temporary, "w") as stream:
                json.dump(self._data, stream, indent=1, sort_keys=True)


def _normalise(value):
    return json.loads(json.dumps(value, sort_keys=True))
