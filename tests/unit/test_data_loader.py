"""Shard loader: data-parallel ranks x worker processes, resume with workers, corruption, mixing, shape checks,
and a 2-process run on uneven shards.

    .venv/bin/python -m pytest tests/test_data_loader.py -q
"""
import io
import multiprocessing
import os
import tarfile
from collections import Counter
from datetime import timedelta
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dist_utils import free_port
from dit_scale.config import ConfigError
from dit_scale.data import Manifest, ShardEntry, build_loader, merge_states, split_rows, write_manifest

UNEVEN = [5, 3, 6, 2, 7, 4, 1, 8]              # 36 samples in 8 shards


def cfg(path, **kw):
    base = dict(path=str(path), batch_size=1, shuffle_buffer=0, hflip=False, image_key="auto", partitions=1)
    base.update(kw)
    return SimpleNamespace(**base)


def add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def npy(array):
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def write_shards(directory, sizes, start=0, feat=False, corrupt=()):
    """Shards of [1, 2, 2] samples filled with their global id (label id % 3); ids in `corrupt` get a broken npy."""
    os.makedirs(directory, exist_ok=True)
    i = start
    for s, size in enumerate(sizes):
        with tarfile.open(os.path.join(directory, "part-%03d.tar" % s), "w") as tar:
            for i in range(i, i + size):
                data = npy(np.full((1, 2, 2), i, np.float32))
                add(tar, "%06d.npy" % i, data[:40] if i in corrupt else data)
                add(tar, "%06d.cls" % i, str(i % 3).encode())
                if feat:
                    add(tar, "%06d.feat.npy" % i, npy(np.arange(4 * 3, dtype=np.float16).reshape(4, 3) + i))
            i += 1
    return str(directory)


def ids(batch):
    return batch["x"][:, 0, 0, 0].long().tolist()


def write_manifest_for(directory, sizes, shape=(1, 2, 2)):
    """A manifest.json listing each shard's sample count (the loader then splits the epoch into equal ranges)."""
    entries = [ShardEntry("part-%03d.tar" % s, size) for s, size in enumerate(sizes)]
    write_manifest(Manifest(shards=entries, kind="latent", image_key="npy", x_shape=list(shape), x_dtype="float32",
                            label_key="cls"), str(directory))


def global_order(c, layouts_batches, dp, seed=0, workers=0, uniforms=0):
    """The samples of the first `layouts_batches` batches of every rank of a `dp`-rank layout, put back in global
    order (rank r's k-th sample is global sample r + dp·k): a list of (index, id, flipped?, uniform, noise)."""
    rows = {}
    for r in range(dp):
        loader = build_loader(SimpleNamespace(**{**vars(c), "num_workers": workers}), dp_rank=r, dp_size=dp, seed=seed,
                              uniforms=uniforms)
        try:
            for _ in range(layouts_batches):
                batch = next(loader)
                for j, n in enumerate(batch["index"].tolist()):
                    rows[n] = (ids(batch)[j], batch["x"][j].tolist(), batch["key"][j],
                               batch["uniform"][j].tolist() if uniforms else None,
                               batch["noise"][j].tolist() if uniforms else None)
        finally:
            loader.close()
    assert sorted(rows) == list(range(len(rows)))            # the ranks' samples tile the global order
    return [rows[n] for n in range(len(rows))]


@pytest.mark.parametrize("sizes,manifest", [(UNEVEN, True), (UNEVEN, False), ([4, 5], False)])
def test_the_global_order_is_the_same_for_any_number_of_ranks_and_workers(tmp_path, sizes, manifest):
    """Equal-range partitions (manifest), whole shards, and fewer shards than partitions: 1, 2 and 4 ranks, with and
    without loader workers, hand out the same samples with the same flips and draws at every global position."""
    directory = write_shards(tmp_path, sizes)
    if manifest:
        write_manifest_for(directory, sizes)
    c = cfg(directory, batch_size=2, shuffle_buffer=8, hflip=True, partitions=4, image_key="npy")
    want = global_order(c, 24, 1, seed=3, uniforms=5)        # 48 samples: more than an epoch
    assert global_order(c, 12, 2, seed=3, uniforms=5) == want
    assert global_order(c, 6, 4, seed=3, uniforms=5, workers=1) == want[:48]
    assert global_order(c, 24, 1, seed=3, uniforms=5, workers=3) == want   # 3 workers over 4 partitions
    index, _, _, uniform, noise = zip(*[(n, *row[:2], row[3], row[4]) for n, row in enumerate(want)])
    assert len({tuple(u) for u in uniform}) == 48 and all(len(u) == 5 for u in uniform)
    first = np.random.default_rng([3, 2_000_003, 7])                          # sample 7's own draws
    assert np.allclose(uniform[7], first.random(5, dtype=np.float32))
    assert np.allclose(noise[7], first.standard_normal((1, 2, 2), dtype=np.float32))


def test_equal_partitions_visit_every_sample_once_per_epoch(tmp_path):
    directory = write_shards(tmp_path, UNEVEN)
    write_manifest_for(directory, UNEVEN)
    c = cfg(directory, batch_size=4, shuffle_buffer=6, partitions=4, image_key="npy")
    order = [row[0] for row in global_order(c, 9, 2)]       # 72 samples: two epochs of 36
    assert sorted(order[:36]) == sorted(order[36:]) == list(range(36)) and order[:36] != order[36:]
    with pytest.raises(ConfigError, match="data.partitions=4 is not a multiple of the data-parallel size 3"):
        build_loader(c, dp_rank=0, dp_size=3)


def test_worker_processes_equal_in_process_reading(tmp_path):
    directory = write_shards(tmp_path, UNEVEN)
    c = cfg(directory, batch_size=3, shuffle_buffer=4, hflip=True, partitions=8)
    workers = build_loader(SimpleNamespace(**vars(c), num_workers=2), dp_rank=1, dp_size=2, uniforms=3)
    inline = build_loader(c, dp_rank=1, dp_size=2, uniforms=3)
    rng_before = torch.get_rng_state()
    try:
        for _ in range(15):                                  # several epochs
            a, b = next(workers), next(inline)
            assert all(torch.equal(a[k], b[k]) for k in ("x", "y", "index", "uniform", "noise"))
            assert a["key"] == b["key"]
        assert workers.state_dict() == inline.state_dict()
        assert torch.equal(torch.get_rng_state(), rng_before)   # starting workers leaves the global RNG alone
        assert len(multiprocessing.active_children()) >= 2
    finally:
        workers.close()
    assert not [p for p in multiprocessing.active_children() if p.is_alive()]   # no leaked workers


def test_on_a_gpu_machine_in_process_batches_are_pinned(tmp_path, monkeypatch):
    """Without workers the loader pins each batch itself where a GPU exists (the DataLoader does it for workers): a
    copy from pageable memory makes the host wait for the GPU's stream. Here, without a GPU, pinning is recorded
    (a copy) and the batches are those of the same loader unpinned."""
    directory = write_shards(tmp_path, UNEVEN)
    c = cfg(directory, batch_size=3, partitions=2)
    pinned, plain = build_loader(c, uniforms=3), build_loader(c, uniforms=3)
    assert pinned.pin == torch.cuda.is_available()
    pinned.pin, calls = True, []

    def pin_memory(self):
        calls.append(self.shape)
        return self.clone()
    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    for _ in range(3):
        a, b = next(pinned), next(plain)
        assert all(torch.equal(a[k], b[k]) for k in ("x", "y", "index", "uniform", "noise")) and a["key"] == b["key"]
    tensors = sum(isinstance(v, torch.Tensor) for v in b.values())
    assert len(calls) == 3 * tensors and calls[-tensors:] == [v.shape for v in b.values()
                                                             if isinstance(v, torch.Tensor)]


def test_workers_give_the_in_process_batches_when_only_some_samples_have_a_caption(tmp_path):
    """Each loader worker collates its share of a batch alone: a share without any caption used to have no caption
    key, and merging the shares failed (KeyError) or dropped the captions. Merged, the batches are the in-process
    ones: "" for a sample without a caption."""
    directory = str(tmp_path / "captions")
    os.makedirs(directory)
    with tarfile.open(os.path.join(directory, "part-000.tar"), "w") as tar:
        for i in range(16):
            add(tar, "%06d.npy" % i, npy(np.full((1, 2, 2), i, np.float32)))
            add(tar, "%06d.cls" % i, b"0")
            if i % 4 == 0:
                add(tar, "%06d.caption.txt" % i, ("caption %d" % i).encode())
    got = {}
    for workers in (0, 2):
        loader = build_loader(SimpleNamespace(**{**vars(cfg(directory, batch_size=4, partitions=4)),
                                                 "num_workers": workers}))
        try:
            got[workers] = [(ids(b), b.get("caption")) for b in (next(loader) for _ in range(4))]
        finally:
            loader.close()
    assert got[2] == got[0]
    assert sum(c != "" for _, captions in got[0] for c in captions or []) == 4


def test_teacher_features_are_found_whether_the_image_key_is_given_or_found(tmp_path):
    """Shards without a manifest: feat.npy was looked for only when data.image_key was auto, so naming the key hid
    the features (REPA then refused the shards as featureless)."""
    directory = write_shards(tmp_path / "f", [4, 4], feat=True)
    for key in ("auto", "npy"):
        batch = next(build_loader(cfg(directory, batch_size=2, image_key=key)))
        assert batch["feat"].shape == (2, 4, 3), key


def test_members_that_are_not_numbers_are_corrupt_samples(tmp_path):
    """Teacher features of strings or void records and a latent of structured records are skipped and counted like
    any corrupt sample (they failed in the collate, outside the per-sample skip, or a "1" became 1.0)."""
    directory = str(tmp_path / "odd")
    os.makedirs(directory)
    bad = {2: ("feat.npy", np.array([["1"] * 3] * 4)), 4: ("feat.npy", np.zeros((4, 3), dtype="V2")),
           5: ("npy", np.zeros((1, 2, 2), dtype=[("a", "f4")]))}
    with tarfile.open(os.path.join(directory, "part-000.tar"), "w") as tar:
        for i in range(8):
            members = {"npy": np.full((1, 2, 2), i, np.float32), "feat.npy": np.zeros((4, 3), np.float16)}
            if i in bad:
                members[bad[i][0]] = bad[i][1]
            for name, value in members.items():
                add(tar, "%06d.%s" % (i, name), npy(value))
            add(tar, "%06d.cls" % i, b"0")
    loader = build_loader(cfg(directory, batch_size=5, image_key="npy", max_corrupt_fraction=0.5))
    batch = next(loader)
    assert ids(batch) == [0, 1, 3, 6, 7] and batch["feat"].dtype == torch.float32


def test_a_manifest_must_list_the_shards_it_counts(tmp_path):
    """A shard the manifest does not list (added after it was written) used to drop every count silently, and a
    resumed run then repeated and skipped samples; a folder missing a listed shard trained on without it. Both are one
    sentence at start-up; a pattern that picks a subset of the listed shards is fine."""
    directory = write_shards(tmp_path / "d", UNEVEN)
    write_manifest_for(directory, UNEVEN)
    build_loader(cfg(directory, partitions=2))
    build_loader(cfg(os.path.join(directory, "part-00{0..3}.tar"), partitions=2))        # a subset: counted
    write_shards(tmp_path / "extra", [3], start=100)
    os.rename(tmp_path / "extra" / "part-000.tar", os.path.join(directory, "part-999.tar"))
    with pytest.raises(ConfigError, match=r"has 1 shard\(s\) that its manifest .* does not list, e\.g\. .*part-999"):
        build_loader(cfg(directory, partitions=2))
    os.remove(os.path.join(directory, "part-999.tar"))
    os.remove(os.path.join(directory, "part-003.tar"))
    with pytest.raises(ConfigError, match=r"lacks 1 shard\(s\) its manifest .* lists, e\.g\. part-003\.tar"):
        build_loader(cfg(directory, partitions=2))


def test_resume_with_workers_mid_epoch(tmp_path):
    directory = write_shards(tmp_path, UNEVEN)
    c = cfg(directory, batch_size=4, shuffle_buffer=6, hflip=True, num_workers=2, partitions=4)
    reference = build_loader(c, seed=7)
    want = [ids(next(reference)) for _ in range(12)]
    reference.close()
    first = build_loader(c, seed=7)
    assert [ids(next(first)) for _ in range(5)] == want[:5]
    state = first.state_dict()
    first.close()
    assert state["samples"] == 20
    resumed = build_loader(c, seed=7)
    resumed.load_state_dict(state)
    assert [ids(next(resumed)) for _ in range(7)] == want[5:]
    resumed.close()
    inline = build_loader(SimpleNamespace(**{**vars(c), "num_workers": 0}), seed=7)
    inline.load_state_dict(state)                            # the same state drives the in-process path
    assert [ids(next(inline)) for _ in range(7)] == want[5:]


@pytest.mark.parametrize("before,after,mode", [(2, 1, "epoch"), (2, 4, "epoch"), (4, 2, "epoch"),
                                               (2, 1, "resampled"), (1, 4, "resampled")])
def test_a_run_saved_by_one_layout_continues_the_global_order_in_another(tmp_path, before, after, mode):
    """Any data-parallel size continues the saved run's global order. Resampled mode too: its epoch length per
    partition comes from the global batch at the start and travels in the state (a resume with another global batch
    used to fail, blaming the shards, or silently change the order)."""
    directory = write_shards(tmp_path, UNEVEN)
    write_manifest_for(directory, UNEVEN)
    c = cfg(directory, batch_size=2, shuffle_buffer=6, hflip=True, partitions=4, image_key="npy", mode=mode,
            steps_per_epoch=3 if mode == "resampled" else 0)
    want = global_order(c, 80 // (2 * before), before, uniforms=2)      # 80 samples of the saved run's layout
    saved = []
    for r in range(before):                                  # 24 global samples, then every rank's state
        loader = build_loader(c, dp_rank=r, dp_size=before, uniforms=2)
        for _ in range(24 // (2 * before)):
            next(loader)
        saved.append(loader.state_dict())
    merged = merge_states(saved)
    assert merged["samples"] == 24 and sorted(s["partition"] for s in merged["partition_states"]) == [0, 1, 2, 3]
    rows = {}
    for r in range(after):
        loader = build_loader(c, dp_rank=r, dp_size=after, uniforms=2)
        loader.load_state_dict(merged)
        for _ in range(48 // (2 * after)):
            batch = next(loader)
            rows.update({n: (ids(batch)[j], batch["x"][j].tolist(), batch["key"][j], batch["uniform"][j].tolist(),
                             batch["noise"][j].tolist()) for j, n in enumerate(batch["index"].tolist())})
    assert sorted(rows) == list(range(24, 72)) and [rows[n] for n in range(24, 72)] == want[24:72]
    if before > 1:
        damaged = [saved[0], {**saved[1], "samples": 26}]
        with pytest.raises(ConfigError, match="loader states disagree"):
            merge_states(damaged)


def test_split_rows_groups_micro_batches_by_global_position():
    """Gradient accumulation: micro-batch i of rank r of D holds the step's samples at offsets ≡ r + D·i (mod D·A),
    the same groups whether the D·A micro-batches of a step are spread over ranks or accumulation."""
    step = 16                                                # global batch, micro-batches of 4: U = 4 groups
    groups = {}
    for dp, accum in ((1, 4), (2, 2), (4, 1)):
        found = set()
        for r in range(dp):
            rank_rows = {"index": torch.arange(r, step, dp), "key": [str(n) for n in range(r, step, dp)]}
            for micro in split_rows(rank_rows, accum):
                assert micro["key"] == [str(n) for n in micro["index"].tolist()]
                found.add(tuple(micro["index"].tolist()))
        groups[(dp, accum)] = found
    assert groups[(1, 4)] == groups[(2, 2)] == groups[(4, 1)] == {(u, u + 4, u + 8, u + 12) for u in range(4)}


# -- corruption ------------------------------------------------------------------------------------------------------
def test_corrupt_member_is_skipped_and_counted(tmp_path):
    directory = write_shards(tmp_path, [10, 10], corrupt={3, 14})
    loader = build_loader(cfg(directory, batch_size=6, max_corrupt_fraction=0.05))
    got = [i for _ in range(3) for i in ids(next(loader))]
    assert sorted(got) == sorted(set(range(20)) - {3, 14})  # one clean epoch minus the two broken samples
    assert loader.corrupt == (2, 20) and loader.state_dict()["partition_states"][0]["corrupt"] == 2
    strict = build_loader(cfg(directory, batch_size=6, max_corrupt_fraction=0.0))
    with pytest.raises(RuntimeError, match="corrupt, more than data.max_corrupt_fraction=0"):
        for _ in range(3):
            next(strict)


def test_truncated_shard_is_counted_and_skipped(tmp_path):
    directory = write_shards(tmp_path, [10, 10])
    path = os.path.join(directory, "part-001.tar")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:5 * 2048 + 700])                      # ends inside sample 15's npy member
    loader = build_loader(cfg(directory, batch_size=5, max_corrupt_fraction=1.0))
    got = [i for _ in range(4) for i in ids(next(loader))]   # epoch 0: 15 samples and the broken tail
    assert sorted(got[:15]) == list(range(15)) and loader.corrupt == (1, 21)


# -- mixing ----------------------------------------------------------------------------------------------------------
def test_weighted_mixing_and_resume(tmp_path):
    a = write_shards(tmp_path / "a", [50, 50])
    b = write_shards(tmp_path / "b", [50, 50], start=1000)
    c = SimpleNamespace(path="unused", sources=[a, b], weights=[3.0, 1.0], batch_size=20, shuffle_buffer=0,
                        hflip=False, image_key="auto", partitions=1)
    loader = build_loader(c)
    batches = [ids(next(loader)) for _ in range(30)]
    counts = Counter(i >= 1000 for batch in batches for i in batch)
    assert 0.70 < counts[False] / 600 < 0.80                 # 3:1 by weight (600 draws)
    draws = np.random.default_rng([0, 1_000_003, 0, 0]).random(600)      # the documented mixture stream
    assert [i >= 1000 for batch in batches for i in batch] == list(draws >= 0.75)
    resumed = build_loader(c)
    take = build_loader(c)
    for _ in range(11):
        next(take)
    resumed.load_state_dict(take.state_dict())
    assert [ids(next(resumed)) for _ in range(19)] == batches[11:]
    with pytest.raises(ConfigError, match="data.weights has 1 entries for 2 data.sources"):
        build_loader(SimpleNamespace(**{**vars(c), "weights": [1.0]}))


# -- shape checks ----------------------------------------------------------------------------------------------------
def test_manifest_mismatch_is_a_config_error(tmp_path):
    directory = write_shards(tmp_path, [4, 4], feat=True)
    loader = build_loader(cfg(directory, batch_size=4), expect={"x": (1, 2, 2), "feat_dim": 3, "feat_tokens": 4})
    batch = next(loader)
    assert batch["feat"].shape == (4, 4, 3) and batch["feat"].dtype == torch.float32
    with pytest.raises(ConfigError) as info:
        build_loader(cfg(directory), expect={"x": (4, 32, 32)})
    assert str(info.value).startswith("data.path=%r holds samples of shape [1, 2, 2] but the model expects x of "
                                      "shape [4, 32, 32]" % directory)
    assert "model.in_channels=1 model.input_size=2" in str(info.value)
    with pytest.raises(ConfigError, match="teacher features of dim 3 but the alignment head expects 768"):
        build_loader(cfg(directory), expect={"feat_dim": 768})
    with pytest.raises(ConfigError, match="features for 4 tokens but the model has 256.*--feat-grid 16"):
        build_loader(cfg(directory), expect={"feat_tokens": 256})
    plain = write_shards(tmp_path / "plain", [2, 2])
    with pytest.raises(ConfigError, match="holds no teacher features"):
        build_loader(cfg(plain), expect={"feat_dim": 3})


def test_feature_flip_mirrors_the_token_grid(tmp_path):
    directory = write_shards(tmp_path, [8], feat=True)
    plain = next(build_loader(cfg(directory, batch_size=8), seed=4))
    flipped = next(build_loader(cfg(directory, batch_size=8, hflip=True), seed=4))
    assert plain["key"] == flipped["key"]
    for fp, ff in zip(plain["feat"], flipped["feat"]):
        mirrored = fp.reshape(2, 2, 3).flip(1).reshape(4, 3)
        assert torch.equal(ff, fp) or torch.equal(ff, mirrored)
    assert not torch.equal(plain["feat"], flipped["feat"])


# -- 2 processes, uneven shards --------------------------------------------------------------------------------------
def _uneven_rank(rank, world, port, directory, steps, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        for mode in ("epoch", "resampled"):
            loader = build_loader(cfg(directory, batch_size=4, mode=mode, num_workers=1, steps_per_epoch=4,
                                      partitions=2), dp_rank=rank, dp_size=world)
            seen = []
            for _ in range(steps):                           # a training step: every rank joins the collective
                batch = next(loader)
                total = batch["x"].sum().reshape(1)
                dist.all_reduce(total)
                seen += ids(batch)
            gathered = [None] * world
            dist.all_gather_object(gathered, {**loader.state_dict(), "epoch": loader.epoch,
                                              "batches": loader.batches})
            loader.close()
            results[(mode, rank)] = {"seen": seen, "states": gathered}
    finally:
        dist.destroy_process_group()


def test_uneven_shards_do_not_hang_two_processes(tmp_path):
    directory = write_shards(tmp_path, [30, 1, 2, 1])        # rank shares differ a lot in every epoch
    results = mp.get_context("fork").Manager().dict()
    steps = 25                                               # > 2 epochs of the smaller rank
    # fork: the ranks start in milliseconds (no re-import); they only use 1 torch thread and gloo
    mp.start_processes(_uneven_rank, args=(2, free_port(), directory, steps, results), nprocs=2, join=True,
                       start_method="fork")
    for mode in ("epoch", "resampled"):
        for rank in range(2):
            assert len(results[(mode, rank)]["seen"]) == 4 * steps
            assert results[(mode, rank)]["states"][rank]["batches"] == steps
    resampled = [results[("resampled", 0)]["states"][r]["epoch"] for r in range(2)]
    assert resampled == [steps // 4] * 2                     # resampled epochs stay in step on every rank
