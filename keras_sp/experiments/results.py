"""Results files that grow run by run, so an interrupted experiment resumes."""

import json
import os
import tempfile

__all__ = [
    "ResultsFile",
]


class ResultsFile:
    """A JSON file of run records, rewritten atomically after every run.

    Each record is a dict with a unique `"key"` (the run's settings and
    seed as a string). `done(key)` says whether a previous invocation already
    finished that run, so a rerun skips it. The file also keeps the
    experiment's settings under `"settings"`.

    Args:
        path: the JSON file (created with its folder if missing).
        settings: a JSON-serializable dict stored beside the runs. When the
            file exists with other settings, raises rather than mixing runs
            of different experiments.
    """

    def __init__(self, path, settings=None):
        self.path = os.fspath(path)
        self.settings = settings or {}
        self._data = {"settings": self.settings, "runs": []}
        if os.path.exists(self.path):
            with open(self.path) as handle:
                try:
                    data = json.load(handle)
                except json.JSONDecodeError as error:
                    raise ValueError(
                        f"Results file {self.path!r} is not valid JSON "
                        f"({error}); move it away to start over."
                    ) from None
            stored = data.get("settings", {})
            if settings is not None and _normalise(stored) != _normalise(
                settings
            ):
                raise ValueError(
                    f"Results file {self.path!r} holds runs made with other "
                    "settings; use another output folder or move it away. "
                    f"Stored: {stored}. Received: {settings}"
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
        """Adds a finished run and writes the file (atomic replace)."""
        if "key" not in record:
            raise ValueError("A run record needs a 'key'.")
        if self.done(record["key"]):
            raise ValueError(f"Run {record['key']!r} is already recorded.")
        self._data["runs"].append(record)
        self._write()

    def _write(self):
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(handle, "w") as stream:
            json.dump(self._data, stream, indent=1, sort_keys=True)
        os.replace(temporary, self.path)


def _normalise(value):
    return json.loads(json.dumps(value, sort_keys=True))
