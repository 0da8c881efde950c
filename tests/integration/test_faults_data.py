"""Fault injection for the shard loader: undecodable data that used to loop forever, a worker orphaned by its
training process, a stop signal to the whole process group, labels outside the model's classes, and shards cut
short at a tar header boundary.

    .venv/bin/python -m pytest tests/test_faults_data.py -q
"""
import contextlib
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from types import SimpleNamespace

import numpy as np
import pytest

from tiny import ROOT
from data_tools.writer import ShardWriter, encode_label, encode_npy
from dit_scale.config import ConfigError
from dit_scale.data import DataError, Manifest, build_loader, read_manifest, write_manifest

SIZES = [10, 10]


def write_shards(directory, sizes=SIZES, labels=True, manifest=True, image_key="npy", num_classes=3, garbage=(),
                 nonfinite=None):
    """Shards part-000.tar, ... of [1, 2, 2] float32 samples filled with their global id, label id % 3, with a
    manifest.json (image_key as given: it may name a member the shards lack); shards in `garbage` are random
    bytes instead of a tar; samples in `nonfinite` ({id: value}) hold that value (NaN, ±Inf) in one element."""
    os.makedirs(directory, exist_ok=True)
    entries, i = [], 0
    for s, size in enumerate(sizes):
        path = os.path.join(directory, "part-%03d.tar" % s)
        with ShardWriter(path) as shard:
            for i in range(i, i + size):
                x = np.full((1, 2, 2), i, np.float32)
                if nonfinite and i in nonfinite:
                    x[0, 1, 1] = nonfinite[i]
                members = {"npy": encode_npy(x)}
                if labels:
                    members["cls"] = encode_label(i % 3)
                shard.add("%06d" % i, members)
            i += 1
        entries.append(shard.entry)
        if s in garbage:
            with open(path, "wb") as f:
                f.write(np.random.default_rng(s).bytes(4096))
    if manifest:
        kind = "pixel" if image_key.endswith(("png", "jpg")) else "latent"
        write_manifest(Manifest(shards=entries, builder="test", kind=kind, image_key=image_key,
                                x_shape=[1, 2, 2], label_key="cls" if labels else None,
                                num_classes=num_classes if labels else None), str(directory))
    return str(directory)


def cfg(path, **kw):
    base = dict(path=str(path), batch_size=4, shuffle_buffer=0, hflip=False, image_key="auto", partitions=1)
    base.update(kw)
    return SimpleNamespace(**base)


def ids(batch):
    return batch["x"][:, 0, 0, 0].long().tolist()


class Hang(BaseException):
    """Not an Exception: the loader's per-sample `except Exception` must not swallow it."""


@contextlib.contextmanager
def deadline(seconds):
    """Raise Hang in the with-block after `seconds` (a loader that loops forever fails, not hangs)."""
    def on_alarm(signum, frame):
        raise Hang("still running after %d s: the loader loops forever" % seconds)
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def first_batch_error(loader, seconds=20):
    """The DataError the loader raises on its first batch (it is closed afterwards)."""
    try:
        with deadline(seconds), pytest.raises(DataError) as info:
            next(loader)
    finally:
        loader.close()
    return info.value


# -- undecodable data stops the run with one sentence ----------------------------------------------------------------
@pytest.mark.parametrize("case", ["config key", "manifest key", "manifest key, default limits"])
def test_wrong_image_key_stops_instead_of_looping(tmp_path, case):
    manifest_key = "npy" if case == "config key" else "latent.npy"
    directory = write_shards(tmp_path, image_key=manifest_key)
    limits = {} if "default" in case else {"max_corrupt_fraction": 1.0, "max_consecutive_corrupt": 50}
    image_key = "latent.npy" if case == "config key" else "auto"
    message = str(first_batch_error(build_loader(cfg(directory, image_key=image_key, **limits))))
    assert "no .latent.npy member" in message and "the sample has: cls, npy" in message and "\n" not in message
    if case == "config key":
        assert "data.image_key='latent.npy'" in message
    else:
        assert "the image_key of %s" % os.path.join(directory, "manifest.json") in message
    if limits:
        assert message.startswith("The last 50 samples read by partition 0 of 1 (data-parallel rank 0) were all "
                                  "unusable") and "data.max_consecutive_corrupt" in message
    else:
        assert message.startswith("2 of 2 samples read by partition 0 of 1 (data-parallel rank 0) were corrupt, "
                                  "more than data.max_corrupt_fraction=0.01")


@pytest.mark.parametrize("limits", [{}, {"max_corrupt_fraction": 1.0, "max_consecutive_corrupt": 20}])
def test_rank_with_only_corrupt_shards_stops_with_one_sentence_from_its_worker(tmp_path, limits):
    directory = write_shards(tmp_path, sizes=[10, 10, 10, 10], garbage={0, 1, 2, 3})
    loader = build_loader(cfg(directory, num_workers=1, partitions=2, **limits), dp_rank=1, dp_size=2)
    error = first_batch_error(loader)
    assert isinstance(error, ConfigError)                         # the entry point prints it and exits 2
    message = str(error)
    assert "\n" not in message and "DataLoader worker" not in message and "Traceback" not in message
    assert "partition 1 of 2 (data-parallel rank 1)" in message and "part-00" in message and "ReadError" in message
    if limits:
        assert message.startswith("The last 20 samples read by")
    else:                                                         # a broken shard counts its manifest's samples
        assert message.startswith("10 of 10 samples read by") and "the worst shard is %s" % directory in message
    assert not [p for p in multiprocessing.active_children() if p.is_alive()]


def test_corrupt_fraction_fires_without_a_full_batch(tmp_path):
    directory = write_shards(tmp_path, sizes=[10, 10], garbage={1})
    loader = build_loader(cfg(directory, batch_size=10_000))      # an epoch has 10 good samples
    message = str(first_batch_error(loader))
    assert re.match(r"10 of (10|20) samples read by partition 0 of 1 \(data-parallel rank 0\) were corrupt, more than "
                    r"data.max_corrupt_fraction=0.01; the worst shard is .*part-001.tar \(10 corrupt", message)


# -- worker processes ------------------------------------------------------------------------------------------------
def _script(tmp_path, body):
    path = tmp_path / "script.py"
    path.write_text("import multiprocessing, os, signal, sys, time\nfrom types import SimpleNamespace\n"
                    "from dit_scale.data import build_loader\n" + textwrap.dedent(body))
    return [sys.executable, str(path)]


def _alive(pid):
    """Running (not exited, not a zombie)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _children(pid):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry))
    return found


def _wait_for(condition, seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    return condition()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_worker_exits_when_its_training_process_is_killed(tmp_path):
    directory = write_shards(tmp_path / "shards", garbage={0, 1})
    command = _script(tmp_path, """
        loader = build_loader(SimpleNamespace(path=sys.argv[1], partitions=1, batch_size=2, shuffle_buffer=0, image_key="auto",
                                              num_workers=1, max_corrupt_fraction=1.0, max_consecutive_corrupt=10**9))
        print("started", flush=True)
        next(loader)                     # never completes: the worker reads broken shards without end
    """)
    proc = subprocess.Popen(command + [directory], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "started"
        workers = _wait_for(lambda: _children(proc.pid), 30)
        assert len(workers) == 1
        time.sleep(0.5)                  # the worker is in its sample loop
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert _wait_for(lambda: not _alive(workers[0]), 10), "the orphaned loader worker is still running"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_sigterm_to_the_process_group_leaves_the_decision_to_the_training_process(tmp_path):
    directory = write_shards(tmp_path / "shards")
    command = _script(tmp_path, """
        loader = build_loader(SimpleNamespace(path=sys.argv[1], partitions=1, batch_size=2, shuffle_buffer=0, image_key="auto",
                                              num_workers=1))
        next(loader)                     # the worker runs; then the training process takes over SIGTERM
        stop = []
        signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))
        print("workers", *[p.pid for p in multiprocessing.active_children()], flush=True)
        start = time.monotonic()
        while not stop and time.monotonic() - start < 30:
            next(loader)
            time.sleep(0.01)
        for _ in range(5):               # the run goes on to its checkpoint
            next(loader)
        print("stopped cleanly after", stop, flush=True)
        # the loader is left open: its worker must still stop at exit
    """)
    proc = subprocess.Popen(command + [directory], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        line = proc.stdout.readline().split()
        assert line[0] == "workers" and len(line) == 2
        worker = int(line[1])
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-2000:]
        assert "stopped cleanly after [%d]" % signal.SIGTERM in out
        assert _wait_for(lambda: not _alive(worker), 10), "the loader worker outlived the training process"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# -- labels ----------------------------------------------------------------------------------------------------------
def test_labels_outside_the_model_classes_are_corrupt(tmp_path, capsys):
    directory = write_shards(tmp_path, num_classes=2)           # labels are id % 3: the manifest is wrong
    loader = build_loader(cfg(directory, batch_size=14, max_corrupt_fraction=1.0), expect={"num_classes": 2})
    batch = next(loader)                                          # 14 of the 20 samples have labels 0 or 1
    assert sorted(ids(batch)) == [i for i in range(20) if i % 3 != 2]
    assert batch["y"].tolist() == [i % 3 for i in ids(batch)]
    assert loader.corrupt == (6, 20)
    assert "label 2 is outside [0, 2) (model.num_classes=2)" in capsys.readouterr().err


def test_non_finite_samples_are_corrupt(tmp_path, capfd):
    """NaN / ±Inf in a latent: skipped in the loader worker, named in a warning, counted toward
    data.max_corrupt_fraction (not left for the training step to skip with the good samples of its batch)."""
    bad = {3: np.nan, 11: np.inf, 17: -np.inf}
    directory = write_shards(tmp_path, nonfinite=bad)
    loader = build_loader(cfg(directory, batch_size=17, num_workers=1, max_corrupt_fraction=1.0))
    try:
        batch = next(loader)
    finally:
        loader.close()
    assert sorted(ids(batch)) == [i for i in range(20) if i not in bad]
    assert bool(np.isfinite(batch["x"].numpy()).all())
    assert loader.corrupt == (3, 20)
    err = capfd.readouterr().err                                  # the worker's warnings
    for i in bad:
        assert "data: skipping corrupt sample %06d" % i in err and "not finite" in err, err
    error = str(first_batch_error(build_loader(cfg(directory, batch_size=17))))     # past 1% of 100 samples
    assert re.match(r"2 of 1[0-9] samples read by partition 0 of 1 \(data-parallel rank 0\) .* the last: x holds "
                    r"values that are not finite", error), error


def test_class_count_mismatches_are_config_errors(tmp_path):
    labelled = write_shards(tmp_path / "labelled", num_classes=3)
    with pytest.raises(ConfigError) as info:
        build_loader(cfg(labelled), expect={"num_classes": 2})
    assert str(info.value).startswith("data.path=%r (manifest %s) has num_classes=3 in its manifest but "
                                      "model.num_classes=2; set model.num_classes=3"
                                      % (labelled, os.path.join(labelled, "manifest.json")))
    for manifest in (True, False):                                 # from the manifest, or from the first sample
        unlabelled = write_shards(tmp_path / ("unlabelled%d" % manifest), labels=False, manifest=manifest)
        with pytest.raises(ConfigError, match="holds no class labels .* but model.num_classes=4; set "
                                              "model.num_classes=0 for unconditional training"):
            build_loader(cfg(unlabelled), expect={"num_classes": 4})
        batch = next(build_loader(cfg(unlabelled, batch_size=20), expect={"num_classes": 0}))
        assert batch["y"].tolist() == [0] * 20                     # unconditional: the null class
    batch = next(build_loader(cfg(labelled, batch_size=20), expect={"num_classes": 0}))
    assert batch["y"].tolist() == [0] * 20


# -- shards cut short ------------------------------------------------------------------------------------------------
def _cut(path, member):
    """Truncate the tar at the header of `member` (a tar cut there reads as a shorter, valid tar)."""
    with tarfile.open(path) as tar:
        offset = tar.getmember(member).offset
    assert offset % 512 == 0
    with open(path, "r+b") as f:
        f.truncate(offset)


@pytest.mark.parametrize("case, corrupt, message", [
    ("at a sample", 4, "6 samples where its manifest lists 10"),             # 4 samples missing
    ("inside a sample", 4, "7 samples where its manifest lists 10"),         # sample 6 lacks .cls, 3 missing
    ("extra samples", 1, "10 samples where its manifest lists 8"),
])
def test_a_shard_holding_other_than_its_manifest_count_is_corrupt(tmp_path, capsys, case, corrupt, message):
    directory = write_shards(tmp_path, sizes=[10])
    shard = os.path.join(directory, "part-000.tar")
    if case == "at a sample":
        _cut(shard, "000006.npy")
    elif case == "inside a sample":
        _cut(shard, "000006.cls")
    else:
        manifest = read_manifest(os.path.join(directory, "manifest.json"))
        manifest.shards[0].num_samples = 8
        write_manifest(manifest, directory)
    loader = build_loader(cfg(directory, batch_size=1, max_corrupt_fraction=1.0))
    with deadline(20):
        while loader.state_dict()["partition_states"][0]["epochs"] != [1]:               # epoch 0 and the first sample of epoch 1
            next(loader)
    # the missing samples count as read and corrupt; samples past the listed ones are not read as data (the manifest
    # splits the epoch) and are reported as one corrupt sample
    assert loader.corrupt == (corrupt, 10 if case == "extra samples" else 11)
    assert "data: shard %s is damaged (%s); %d sample(s) counted as corrupt" % (
        shard, message, 1 if case == "extra samples" else 3 if case == "inside a sample" else 4) \
        in capsys.readouterr().err
    if case == "at a sample":                                      # 4 of 10: past the default limit
        error = str(first_batch_error(build_loader(cfg(directory, batch_size=10))))
        assert error.startswith("4 of 10 samples read by partition 0 of 1 (data-parallel rank 0)")
        assert "the worst shard is %s (4 corrupt, the last: 6 samples where its manifest lists 10)" % shard in error
