"""Synthetic dataset writer and the shard loader (main-process paths; workers, ranks and corruption are in
tests/test_data_loader.py).

    .venv/bin/python -m pytest tests/test_data.py -q
"""
import importlib.util
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from dit_scale.config import ConfigError
from dit_scale.data import Manifest, ShardEntry, ShardLoader, SourceSpec, build_loader, iter_tar_samples, \
    read_manifest, write_manifest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("make_synthetic", ROOT / "data_tools" / "make_synthetic.py")
make_synthetic_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_synthetic_module)
make_synthetic = make_synthetic_module.make_synthetic

TINY = dict(num_samples=120, num_classes=10, size=32, samples_per_shard=40, seed=0)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    return out, make_synthetic(str(out), **TINY)


def read_tar(path):
    """{key: {ext: bytes}} of a tar, in file order."""
    samples = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def cfg(path, batch_size=8, shuffle_buffer=0, hflip=False, image_key="auto", partitions=1, **extra):
    """A data config; one partition, so the global order is one stream (tests/unit/test_data_loader.py has many)."""
    return SimpleNamespace(path=str(path), batch_size=batch_size, shuffle_buffer=shuffle_buffer, hflip=hflip,
                           image_key=image_key, partitions=partitions, **extra)


def position(loader, partition=0):
    """(epochs, positions) of one partition in the loader's state."""
    state = {s["partition"]: s for s in loader.state_dict()["partition_states"]}[partition]
    return state["epochs"], state["positions"]


def write_npy_shards(directory, num_shards, per_shard):
    """Shards of [1, 2, 2] float32 samples filled with their global index i (label i % 3); per_shard may be a
    list of sizes (uneven shards)."""
    sizes = per_shard if isinstance(per_shard, list) else [per_shard] * num_shards
    os.makedirs(directory, exist_ok=True)
    start = 0
    for s, size in enumerate(sizes):
        with tarfile.open(os.path.join(directory, "part-%03d.tar" % s), "w") as tar:
            for i in range(start, start + size):
                buf = io.BytesIO()
                np.save(buf, np.full((1, 2, 2), i, np.float32))
                for name, data in (("%06d.npy" % i, buf.getvalue()), ("%06d.cls" % i, str(i % 3).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        start += size
    return directory


def ids(batch):
    return batch["x"][:, 0, 0, 0].long().tolist()


def take(loader, n):
    return [next(loader) for _ in range(n)]


# -- writer ---------------------------------------------------------------------------------------------------------
def test_manifest_matches_tars(synthetic):
    out, paths = synthetic
    manifest = json.loads((out / "manifest.json").read_text())
    assert [os.path.basename(p) for p in paths] == ["shard-%06d.tar" % i for i in range(3)]
    assert [s["name"] for s in manifest["shards"]] == [os.path.basename(p) for p in paths]
    assert manifest["num_samples"] == 120 and manifest["num_classes"] == 10
    assert manifest["image_size"] == 32 and manifest["channels"] == 3 and len(manifest["class_names"]) == 10
    keys, labels = [], []
    for path, entry in zip(paths, manifest["shards"]):
        samples = read_tar(path)
        assert len(samples) == entry["num_samples"] == 40
        for key, sample in samples.items():
            assert set(sample) == {"png", "cls"} and len(key) == 8
            keys.append(int(key))
            labels.append(int(sample["cls"].decode("ascii")))
    assert sorted(keys) == list(range(120))
    assert np.bincount(labels, minlength=10).tolist() == [12] * 10       # balanced, every class present
    assert Image.open(out / "preview.png").size[1] >= 10 * 32


def test_images_vary_and_classes_differ(synthetic):
    _, paths = synthetic
    per_class = {}
    for path in paths:
        for sample in read_tar(path).values():
            image = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB"), dtype=np.float64)
            assert image.shape == (32, 32, 3)
            assert image.std() > 20                                       # a shape on a background
            per_class.setdefault(int(sample["cls"]), []).append(image)
    means = np.stack([np.mean(per_class[c], axis=(0, 1, 2)) for c in range(10)])   # [class, RGB]
    distances = np.linalg.norm(means[:, None] - means[None], axis=-1)
    assert distances[~np.eye(10, dtype=bool)].min() > 3.0
    first = per_class[0]
    assert all(not np.array_equal(first[0], other) for other in first[1:])   # jittered examples


def test_rerun_skips_complete_shards_and_rebuilds_deleted_one_identically(tmp_path):
    paths = make_synthetic(str(tmp_path), **TINY)
    before = {p: (os.stat(p).st_mtime_ns, Path(p).read_bytes()) for p in paths}
    os.remove(paths[1])
    assert make_synthetic(str(tmp_path), **TINY) == paths
    for p in (paths[0], paths[2]):
        assert os.stat(p).st_mtime_ns == before[p][0]
    assert Path(paths[1]).read_bytes() == before[paths[1]][1]
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]
    with pytest.raises(ValueError, match="another --out"):
        make_synthetic(str(tmp_path), **dict(TINY, seed=1))


def test_an_interrupted_set_is_not_completed_with_other_arguments(tmp_path):
    """Killed before its manifest: the arguments written first still guard the folder, so a re-run with other ones
    is refused (it used to keep the old shards under a manifest of the new arguments); a folder of shards of unknown
    arguments is written anew, not kept."""
    make_synthetic(str(tmp_path / "a"), **TINY)
    os.remove(tmp_path / "a" / "manifest.json")
    with pytest.raises(ValueError, match="another --out"):
        make_synthetic(str(tmp_path / "a"), **dict(TINY, size=16))
    assert make_synthetic(str(tmp_path / "a"), **TINY)                    # the same arguments complete it
    other = make_synthetic(str(tmp_path / "b"), **dict(TINY, size=16))
    for name in ("manifest.json", "make_synthetic.json"):
        os.remove(tmp_path / "b" / name)
    before = [Path(p).read_bytes() for p in other]
    fresh = make_synthetic(str(tmp_path / "b"), **TINY)
    assert [Path(p).read_bytes() for p in fresh] != before
    assert fresh == [p.replace(str(tmp_path / "b"), str(tmp_path / "b")) for p in other]
    again = make_synthetic(str(tmp_path / "c"), **TINY)
    assert [Path(p).read_bytes() for p in fresh] == [Path(p).read_bytes() for p in again]


def test_cli(tmp_path):
    script = ROOT / "data_tools" / "make_synthetic.py"
    subprocess.run([sys.executable, str(script), "--out", str(tmp_path), "--num-samples", "12", "--num-classes",
                    "16", "--size", "16", "--samples-per-shard", "5", "--seed", "3"], check=True, capture_output=True)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [s["num_samples"] for s in manifest["shards"]] == [5, 5, 2]
    assert len(set(manifest["class_names"])) == 16


# -- loader ---------------------------------------------------------------------------------------------------------
def test_batches_shapes_dtypes_ranges(synthetic):
    out, paths = synthetic
    loader = build_loader(cfg(out, batch_size=16, shuffle_buffer=32, hflip=True), expect={"x": (3, 32, 32)})
    assert loader.shards == paths and loader.total_samples == 120 and loader.steps_per_epoch == 7
    batch = next(loader)
    assert set(batch) == {"x", "y", "key", "index"} and len(batch["key"]) == 16 and batch["index"].tolist() == \
        list(range(16))
    assert batch["x"].shape == (16, 3, 32, 32) and batch["x"].dtype == torch.float32
    assert batch["y"].shape == (16,) and batch["y"].dtype == torch.long
    assert batch["x"].min() >= -1 and batch["x"].max() <= 1 and batch["x"].std() > 0.1
    assert 0 <= batch["y"].min() and batch["y"].max() < 10
    state = loader.state_dict()
    assert position(loader) == ([0], [16]) and state["samples"] == 16 and loader.batches == 1
    assert torch.load(_roundtrip(state), weights_only=True) == state         # plain values only


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return buf


def test_same_seed_same_batches_different_seed_different(synthetic):
    out, _ = synthetic
    c = cfg(out, batch_size=8, shuffle_buffer=16, hflip=True)
    a, b = take(build_loader(c, seed=5), 4), take(build_loader(c, seed=5), 4)
    other = take(build_loader(c, seed=6), 4)
    assert all(torch.equal(p["x"], q["x"]) and torch.equal(p["y"], q["y"]) for p, q in zip(a, b))
    assert not all(torch.equal(p["x"], q["x"]) for p, q in zip(a, other))


def test_hflip_flips_some_images(synthetic):
    out, _ = synthetic
    plain = next(build_loader(cfg(out, batch_size=40), seed=1))["x"]
    flipped = next(build_loader(cfg(out, batch_size=40, hflip=True), seed=1))["x"]
    same = [torch.equal(p, f) for p, f in zip(plain, flipped)]
    mirrored = [torch.equal(p.flip(-1), f) for p, f in zip(plain, flipped)]
    assert all(s or m for s, m in zip(same, mirrored)) and 0 < sum(mirrored) < 40


def test_one_epoch_without_shuffle_visits_every_sample_once(tmp_path):
    loader = build_loader(cfg(write_npy_shards(tmp_path, 3, 10), batch_size=6))
    batches = take(loader, 5)
    assert batches[0]["x"].shape == (6, 1, 2, 2) and batches[0]["x"].dtype == torch.float32
    seen = [i for b in batches for i in ids(b)]
    assert sorted(seen) == list(range(30))
    assert [i % 3 for i in seen] == [y for b in batches for y in b["y"].tolist()]
    order = np.random.default_rng([0, 0, 0]).permutation(3)                 # exact mode: shard order of epoch 0
    assert seen == [i for s in order for i in range(10 * s, 10 * s + 10)]
    assert position(loader) == ([0], [30])
    next(loader)
    assert position(loader) == ([1], [6])


@pytest.mark.parametrize("k", [3, 4, 6])                                # before, across and after an epoch end
@pytest.mark.parametrize("mode", ["epoch", "resampled"])
def test_resume_continues_identically(tmp_path, k, mode):
    c = cfg(write_npy_shards(tmp_path, 3, 10), batch_size=7, shuffle_buffer=8, hflip=True, mode=mode,
            steps_per_epoch=4)
    reference = take(build_loader(c, seed=3), k + 4)
    interrupted = build_loader(c, seed=3)
    take(interrupted, k)
    state = interrupted.state_dict()
    resumed = build_loader(c, seed=3)
    resumed.load_state_dict(state)
    assert [ids(b) for b in take(resumed, 4)] == [ids(b) for b in reference[k:]]


def test_resume_png_with_flips(synthetic):
    out, _ = synthetic
    c = cfg(out, batch_size=16, shuffle_buffer=20, hflip=True)
    reference = take(build_loader(c, seed=2), 10)                       # 160 samples: crosses 120
    loader = build_loader(c, seed=2)
    take(loader, 7)
    resumed = build_loader(c, seed=2)
    resumed.load_state_dict(loader.state_dict())
    for got, want in zip(take(resumed, 3), reference[7:]):
        assert torch.equal(got["x"], want["x"]) and torch.equal(got["y"], want["y"])


def test_resume_state_must_match(tmp_path):
    c = cfg(write_npy_shards(tmp_path, 4, 5), batch_size=2)
    state = build_loader(c).state_dict()
    with pytest.raises(ConfigError, match="data.partitions=1 and this run has 2"):
        build_loader(SimpleNamespace(**{**vars(c), "partitions": 2})).load_state_dict(state)
    with pytest.raises(ConfigError, match="another version"):
        build_loader(c).load_state_dict({"epoch": 0, "samples_in_epoch": 3})


def test_epochs_reshuffle(tmp_path):
    loader = build_loader(cfg(write_npy_shards(tmp_path, 3, 10), batch_size=30, shuffle_buffer=10))
    first, second = ids(next(loader)), ids(next(loader))
    assert sorted(first) == sorted(second) == list(range(30)) and first != second


def test_resampled_mode_draws_shards_with_replacement(tmp_path):
    directory = write_npy_shards(tmp_path, 4, 5)
    loader = build_loader(cfg(directory, batch_size=5, mode="resampled", steps_per_epoch=3))
    assert loader.spec.epoch_samples == [15]
    draw = np.random.default_rng([0, 0, 0, 0, 0])                        # [seed, source, epoch, partition, 0]
    expected = [i for s in (int(draw.integers(4)) for _ in range(3)) for i in range(5 * s, 5 * s + 5)]
    assert [i for b in take(loader, 3) for i in ids(b)] == expected
    assert loader.epoch == 1 and position(loader)[0] == [0]
    next(loader)                                                         # the next epoch reseeds the draws
    assert position(loader) == ([1], [5])


def test_a_resampled_epoch_is_the_same_on_every_layout(tmp_path):
    """An epoch's length comes from the manifest's sample count or from data.steps_per_epoch global batches, so
    1 process × 2 micro-batches and 2 processes × 1 read the same order (it was batches per rank, which left out
    train.grad_accum: 25 against 24 samples per partition, a different order from the 11th step)."""
    directory = write_npy_shards(tmp_path, 5, 20)                       # 100 samples
    spec = dict(batch_size=2, mode="resampled", steps_per_epoch=3, partitions=4)
    one = build_loader(cfg(directory, **spec), dp_size=1, grad_accum=2)
    two = [build_loader(cfg(directory, **spec), dp_rank=r, dp_size=2) for r in range(2)]
    assert one.spec.epoch_samples == two[0].spec.epoch_samples == [3]    # 3 steps × 4 images / 4 partitions
    n = 14                                                              # steps: past four epochs' ends
    order = [i for b in take(one, 2 * n) for i in ids(b)]
    both = [i for _ in range(n) for loader in two for b in take(loader, 1) for i in ids(b)]
    assert sorted(order[:4 * n]) == sorted(both)


def test_path_forms(synthetic):
    out, paths = synthetic
    for path in (out, out / "shard-*.tar", out / "shard-{000000..000002}.tar"):
        assert len(build_loader(cfg(path)).shards) == 3
    assert len(build_loader(cfg(out / "shard-{000000,000002}.tar")).shards) == 2
    with pytest.raises(ConfigError, match="shard-000003.tar, which does not exist"):
        build_loader(cfg(out / "shard-{000000..000003}.tar"))
    # pipe: URLs stream through a command; same batches as the local files (manifest given explicitly)
    piped = build_loader(cfg("pipe:cat %s/shard-{000000..000002}.tar" % out, batch_size=16, shuffle_buffer=8,
                             manifest=str(out / "manifest.json")))
    local = build_loader(cfg(out, batch_size=16, shuffle_buffer=8))
    assert piped.total_samples == 120
    for a, b in zip(take(piped, 9), take(local, 9)):
        assert torch.equal(a["x"], b["x"]) and a["key"] == b["key"]


def test_missing_path_error(tmp_path):
    missing = tmp_path / "nothing_here"
    with pytest.raises(ConfigError) as info:
        build_loader(cfg(missing))
    message = str(info.value)
    assert repr(str(missing)) in message and "data_tools/make_synthetic.py --out" in message


def test_unreadable_shard_error(tmp_path):
    directory = write_npy_shards(tmp_path, 2, 3)
    os.chmod(os.path.join(directory, "part-001.tar"), 0)
    try:
        if os.access(os.path.join(directory, "part-001.tar"), os.R_OK):
            pytest.skip("running as root: permissions are not enforced")
        with pytest.raises(ConfigError, match="part-001.tar .* is not readable"):
            build_loader(cfg(directory))
    finally:
        os.chmod(os.path.join(directory, "part-001.tar"), 0o644)


class _Payload:
    """Unpickling this creates the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_members_are_ignored(tmp_path):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Payload(str(marker)))
    image = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(image, format="PNG")
    members = [("000000.png", image.getvalue()), ("000000.cls", b"1"), ("000000.pickle", payload),
               ("000001.pyd", payload), ("000002.pickle", payload), ("000002.png", image.getvalue()),
               ("000002.cls", b"2"), ("000003.latent.pth", payload)]
    (tmp_path / "shards").mkdir()
    with tarfile.open(tmp_path / "shards" / "evil.tar", "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    loader = build_loader(cfg(tmp_path / "shards", batch_size=4, max_corrupt_fraction=1.0))
    batch = next(loader)
    assert batch["y"].tolist() == [1, 2, 1, 2] and batch["x"].shape == (4, 3, 8, 8)
    assert torch.all(batch["x"][:, 0] == 1) and torch.all(batch["x"][:, 1] == -1)
    assert not marker.exists()


def test_bad_arguments(synthetic):
    out, _ = synthetic
    with pytest.raises(ValueError, match="image_key"):
        build_loader(cfg(out, image_key="pickle"))
    with pytest.raises(ValueError, match="dp_rank"):
        ShardLoader([SourceSpec([str(out / "shard-000000.tar")])], batch_size=1, dp_rank=1, dp_size=1)
    with pytest.raises(ConfigError, match=r"data.partitions=1 is not a multiple of the data-parallel size 8, .*"
                                          r"\(e.g. 8\)"):
        build_loader(cfg(out), dp_rank=0, dp_size=8)
    with pytest.raises(ConfigError, match="holds 120 samples, fewer than data.partitions=128"):
        build_loader(cfg(out, partitions=128))
    with pytest.raises(ConfigError, match="data.steps_per_epoch"):
        build_loader(cfg(write_npy_shards(out.parent / "nomanifest", 2, 2), mode="resampled"))


# -- manifest --------------------------------------------------------------------------------------------------------
def _copy_shards(out, to):
    os.makedirs(to)
    for name in os.listdir(out):
        if name.endswith((".tar", ".json")):
            Path(to, name).write_bytes(Path(out, name).read_bytes())
    return to


FORMAT_1_SYNTHETIC = {                          # what data_tools/make_synthetic.py wrote before format_version 2
    "format": "webdataset", "image_key": "png", "label_key": "cls", "image_size": 32, "channels": 3,
    "num_classes": 10, "class_names": ["c%d" % i for i in range(10)], "num_samples": 120,
    "shards": [{"name": "shard-%06d.tar" % i, "num_samples": 40} for i in range(3)], "params": {"seed": 0}}
FORMAT_1_BUILDER = {                            # what data_tools/build_shards.py (and the data benchmark) wrote
    "format": "webdataset", "kind": "latent", "image_key": "latent.npy", "flip_key": "latent_flip.npy",
    "feat_key": "feat.npy", "label_key": "cls", "caption_key": None, "x_shape": [4, 8, 8], "x_dtype": "float16",
    "feat_shape": [16, 24], "feat_dtype": "float16", "resolution": 16, "num_samples": 12, "num_classes": 3,
    "class_names": ["ant", "bee", "cow"], "vae": {"path": "/m/vae", "scaling_factor": 0.18215, "shift_factor": None},
    "teacher": {"path": "/m/dino", "model_type": "dinov2"},
    "shards": [{"name": "shard-000000.tar", "num_samples": 12, "bytes": 10240, "sha256": "ab" * 32}],
    "params": {"hash": "0123"}, "source": "/data/images"}


def test_format_1_manifests_still_load(synthetic, tmp_path):
    out, _ = synthetic
    legacy = _copy_shards(out, tmp_path / "legacy")
    (legacy / "manifest.json").write_text(json.dumps(FORMAT_1_SYNTHETIC))
    loader = build_loader(cfg(legacy, batch_size=4), expect={"x": (3, 32, 32), "num_classes": 10})
    assert loader.total_samples == 120 and loader.sources[0].x_shape == (3, 32, 32)
    assert next(loader)["x"].shape == (4, 3, 32, 32)
    m = Manifest.from_dict(FORMAT_1_BUILDER, "m.json")
    assert (m.kind, m.image_key, m.flip_key, m.x_shape, m.feat_shape, m.num_classes) == (
        "latent", "latent.npy", "latent_flip.npy", [4, 8, 8], [16, 24], 3)
    assert m.vae["scaling_factor"] == 0.18215 and m.shards[0] == ShardEntry("shard-000000.tar", 12, 10240, "ab" * 32)
    assert m.to_dict()["format_version"] == 2 and Manifest.from_dict(m.to_dict()) == m
    pixels = Manifest.from_dict(FORMAT_1_SYNTHETIC)
    assert (pixels.kind, pixels.x_shape, pixels.resolution) == ("pixel", [3, 32, 32], 32)
    assert {k: pixels.to_dict()[k] for k in ("image_size", "channels", "x_shape")} == {
        "image_size": 32, "channels": 3, "x_shape": [3, 32, 32]}     # format 1's names stay for older readers


@pytest.mark.parametrize("change, message", [
    ({"x_shape": [3, 32]}, "has x_shape=[3, 32], not a list of 3 positive integers"),
    ({"shards": [{"name": "shard-000000.tar", "num_samples": -1}]}, "has shards[0].num_samples=-1, not a count"),
    ({"shards": []}, "has shards=[], not a non-empty list"),
    ({"num_samples": 7}, "has num_samples=7 but its shards hold 120 samples"),
    ({"kind": "latent"}, "has kind='latent' but image_key='png'"),
    ({"image_key": "pickle"}, "has image_key='pickle', which is not an image or array member"),
    ({"format_version": 3}, "has format_version=3 but this dit_scale reads up to 2"),
    (None, "is not valid JSON"),
])
def test_bad_manifest_is_a_config_error_naming_file_and_field(synthetic, tmp_path, change, message):
    out, _ = synthetic
    shards = _copy_shards(out, tmp_path / "bad")
    path = shards / "manifest.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, **change}) if change is not None else "{not json")
    with pytest.raises(ConfigError) as info:
        build_loader(cfg(shards))
    assert str(info.value).startswith("Manifest %s %s" % (path, message)) and "\n" not in str(info.value)


def test_write_manifest_is_atomic_and_checked(synthetic, tmp_path):
    out, _ = synthetic
    manifest = read_manifest(str(out / "manifest.json"))
    assert manifest.builder == "make_synthetic" and manifest.num_samples == 120
    assert all(e.bytes == os.path.getsize(out / e.name) and len(e.sha256) == 64 for e in manifest.shards)
    path = write_manifest(manifest, str(tmp_path))
    assert read_manifest(path) == manifest and os.listdir(tmp_path) == ["manifest.json"]
    broken = Manifest(shards=manifest.shards, kind="latent", image_key="png")
    with pytest.raises(ConfigError, match="kind='latent' but image_key='png'"):
        write_manifest(broken, str(tmp_path))
    assert read_manifest(path) == manifest and os.listdir(tmp_path) == ["manifest.json"]   # the old one stays


# -- data tools as a package -----------------------------------------------------------------------------------------
def test_module_entry_point(tmp_path):
    subprocess.run([sys.executable, "-m", "data_tools.make_synthetic", "--out", str(tmp_path / "m"), "--num-samples",
                    "3", "--num-classes", "2", "--size", "8"], check=True, capture_output=True, cwd=tmp_path)
    assert read_manifest(str(tmp_path / "m" / "manifest.json")).num_samples == 3


def test_console_script(tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "dit-make-synthetic")
    if not os.path.exists(script):
        pytest.skip("dit_scale is not installed with its console scripts (pip install -e .)")
    subprocess.run([script, "--out", str(tmp_path / "c"), "--num-samples", "3", "--num-classes", "2", "--size", "8"],
                   check=True, capture_output=True, cwd=tmp_path)
    assert read_manifest(str(tmp_path / "c" / "manifest.json")).num_samples == 3


# -- streams ---------------------------------------------------------------------------------------------------------
def test_http_shards_and_failed_commands(synthetic, tmp_path):
    """http(s) shards go through webdataset.gopen (curl); a command that fails is a damaged shard."""
    import functools
    import http.server
    import shutil
    import threading
    out, paths = synthetic
    if shutil.which("curl") is None:
        pytest.skip("needs curl")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(out)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = "http://127.0.0.1:%d/shard-{000000..000002}.tar" % server.server_address[1]
        remote = build_loader(cfg(url, batch_size=40, manifest=str(out / "manifest.json")))
        local = build_loader(cfg(out, batch_size=40))
        for a, b in zip(take(remote, 4), take(local, 4)):
            assert torch.equal(a["x"], b["x"]) and a["key"] == b["key"]
        missing = list(iter_tar_samples("http://127.0.0.1:%d/shard-000009.tar" % server.server_address[1], 40))
        assert len(missing) == 1 and "exited with status 22" in missing[0]["__error__"]   # curl -f: HTTP 404
    finally:
        server.shutdown()
        server.server_close()
    failed = list(iter_tar_samples("pipe:cat %s; exit 3" % paths[0], 40))
    assert len(failed) == 41 and failed[-1]["__error__"].endswith("exited with status 3")
    assert failed[-1]["__samples__"] == 1
