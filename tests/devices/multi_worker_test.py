"""TensorFlow `MultiWorkerMirroredStrategy` with two local workers.

Keras 3's `fit` fails under it before the first step with "Attempt to
convert a value (PerReplica:{...}) with an unsupported type", with or
without a keras-sp penalty: the Keras bugs keras-team/keras#20585 and
keras-team/keras#20329, open for the Keras this project is tested with.
This test asserts that exact failure, so it fails, and says so, on the day
Keras fixes it; the guide "Scaling out" says what to use meanwhile.
"""

import os
import socket
import subprocess
import sys

import pytest
from device_runs import HERE
from device_runs import ROOT

UPSTREAM_FAILURE = (
    "ValueError: Attempt to convert a value (PerReplica:{",
    "with an unsupported type "
    "(<class 'tensorflow.python.distribute.values.PerReplica'>) to a Tensor.",
)


def free_ports(count):
    sockets = []
    for _ in range(count):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sockets.append(sock)
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def run_workers(kind):
    """Starts both workers of a two-worker cluster; returns their
    `(returncode, stdout, stderr)`."""
    ports = free_ports(2)
    environment = dict(os.environ)
    environment.pop("TF_CONFIG", None)
    environment.update(
        KERAS_BACKEND="tensorflow",
        TF_CPP_MIN_LOG_LEVEL="3",
        PYTHONPATH=os.pathsep.join(
            [str(ROOT), environment.get("PYTHONPATH", "")]
        ).rstrip(os.pathsep),
    )
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                str(HERE / "run_multi_worker.py"),
                str(index),
                kind,
                *map(str, ports),
            ],
            cwd=ROOT,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index in range(2)
    ]
    results = []
    try:
        for worker in workers:
            stdout, stderr = worker.communicate(timeout=300)
            results.append((worker.returncode, stdout, stderr))
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    return results


@pytest.mark.parametrize("kind", ["l2_sp", "plain"])
def test_multi_worker_fit_fails_with_the_keras_per_replica_error(kind):
    for index, (returncode, stdout, stderr) in enumerate(run_workers(kind)):
        assert returncode != 0, (
            f"worker {index} of a MultiWorkerMirroredStrategy fit ({kind}) "
            f"now succeeds (losses {stdout.strip()}): Keras has fixed "
            "keras-team/keras#20585; test the penalty under it and update "
            "the guide 'Scaling out'."
        )
        for part in UPSTREAM_FAILURE:
            assert part in stderr, stderr[-4000:]
        assert "model.fit" in stderr
