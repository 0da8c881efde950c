"""ADM-format sample export, the FD-DINOv2 feature network and its reference statistics, and the expert-routing
balance statistics, against direct computations: the merged .npz against the rows each rank added, DINOv2 features
against the transformers model run on hand-preprocessed images, the reference statistics against numpy on those
features, the balance numbers against their formulas.

    .venv/bin/python -m pytest -q tests/unit/test_eval_export_dinov2.py
"""
import os

import numpy as np
import pytest
import torch

from eval_utils import direct_dino_features, write_tiny_dinov2
from dit_scale.config import ConfigError
from dit_scale.evaluation.export import SampleWriter

transformers = pytest.importorskip("transformers")

@pytest.fixture(scope="module")
def dino(tmp_path_factory):
    return write_tiny_dinov2(str(tmp_path_factory.mktemp("dino")))


# ------------------------------------------------------------------------------------------------------ export
def test_sample_writer_merges_the_ranks_parts_in_index_order(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 5, 6, 3), dtype=np.uint8)           # sample i: images[i]
    labels = np.arange(7) % 3
    path = str(tmp_path / "samples.npz")
    # batches of 2 handed out round-robin over 2 ranks (as generate.rank_batches), written without a process group
    ranks = {0: [[0, 1], [4, 5]], 1: [[2, 3], [6]]}
    for rank in (1, 0):                                                     # rank 0 merges: it finishes last here
        writer = SampleWriter(path, rank, 2)
        for idx in ranks[rank]:
            writer.add(idx, torch.from_numpy(images[idx]).permute(0, 3, 1, 2), labels[idx].tolist())
        assert writer.finish() == path
    with np.load(path, allow_pickle=False) as data:
        assert sorted(data.files) == ["arr_0", "arr_1"]
        assert data["arr_0"].dtype == np.uint8 and data["arr_1"].dtype == np.int64
        np.testing.assert_array_equal(data["arr_0"], images)
        np.testing.assert_array_equal(data["arr_1"], labels)
    assert sorted(os.listdir(tmp_path)) == ["samples.npz"]                 # parts and tmp files gone


def test_sample_writer_without_labels_and_with_an_empty_rank(tmp_path):
    images = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    path = str(tmp_path / "s.npz")
    SampleWriter(path, 1, 2).finish()                                      # rank 1 drew nothing
    writer = SampleWriter(path, 0, 2)
    writer.add([1, 0], torch.from_numpy(images[[1, 0]]).permute(0, 3, 1, 2), None)
    writer.finish()
    with np.load(path, allow_pickle=False) as data:
        assert data.files == ["arr_0"]
        np.testing.assert_array_equal(data["arr_0"], images)


def test_sample_writer_refuses_duplicate_indices_and_a_wrong_suffix_and_makes_its_folder(tmp_path):
    path = str(tmp_path / "s.npz")
    image = torch.zeros(1, 3, 2, 2, dtype=torch.uint8)
    for rank in (1, 0):
        writer = SampleWriter(path, rank, 2)
        writer.add([0], image, [0])
        if rank == 1:
            writer.finish()
    with pytest.raises(RuntimeError, match="exactly once"):
        writer.finish()
    with pytest.raises(ConfigError, match="must end in .npz"):
        SampleWriter(str(tmp_path / "s.png"))
    SampleWriter(str(tmp_path / "missing" / "s.npz"))
    assert (tmp_path / "missing").is_dir()                  # its folder is made, as for every --out


# ------------------------------------------------------------------------------------------------------ DINOv2
def test_dinov2_features_are_the_cls_token_of_edm2_preprocessed_images(dino):
    from dit_scale.evaluation.dinov2 import load_dinov2
    images = np.random.default_rng(1).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    ours = load_dinov2(dino)(torch.from_numpy(images).permute(0, 3, 1, 2))["dino"].numpy()
    assert ours.shape == (3, 16)
    np.testing.assert_allclose(ours, direct_dino_features(dino, images), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="not a local transformers DINOv2 folder"):
        load_dinov2(os.path.dirname(dino) + "/nothing")


def test_dino_reference_from_shards_and_from_npz_images_match_numpy(dino, tiny_shards, tmp_path):
    from dit_scale.evaluation.dinov2 import folder_fingerprint, load_dinov2
    from dit_scale.evaluation.reference import FeatureExtractor, load_dino_reference
    from dit_scale.evaluation.shard_samples import ShardSet
    extractor = FeatureExtractor(load_dinov2(dino), "cpu", batch_size=5, fingerprint=folder_fingerprint(dino))
    images = np.concatenate([b.x for b in ShardSet.open(tiny_shards, "t").batches(12, 12)])
    direct = direct_dino_features(dino, images).astype(np.float64)
    cache = str(tmp_path / "dino_ref.npz")
    ref = load_dino_reference(f"shards:{tiny_shards}", extractor, num_samples=12, cache=cache)
    np.testing.assert_allclose(ref.mu, direct.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ref.sigma, np.cov(direct, rowvar=False), rtol=1e-3, atol=1e-5)
    cached = load_dino_reference(f"shards:{tiny_shards}", extractor, num_samples=12, cache=cache)
    np.testing.assert_array_equal(cached.mu, ref.mu)
    assert cached.features == "dinov2"
    # an ADM-style batch: images (arr_0) and Inception statistics; the DINOv2 ones come from the images, cached
    adm = str(tmp_path / "adm_ref.npz")
    np.savez(adm, arr_0=images, mu=np.zeros(2048), sigma=np.eye(2048))
    from_images = load_dino_reference(adm, extractor)
    np.testing.assert_allclose(from_images.mu, ref.mu, rtol=1e-6, atol=1e-7)
    assert os.path.isfile(str(tmp_path / f"adm_ref_dinov2_{folder_fingerprint(dino)}.npz"))
    no_images = str(tmp_path / "stats_only.npz")
    np.savez(no_images, mu=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(ConfigError, match="neither DINOv2 statistics nor images"):
        load_dino_reference(no_images, extractor)


# ------------------------------------------------------------------------------------------------------ experts
def test_expert_balance_statistics_match_their_formulas():
    from dit_scale.evaluation.experts import balance, report
    counts = np.array([[5.0, 5.0, 5.0, 5.0], [20.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
    b = balance(counts)
    share = counts[2] / 10
    np.testing.assert_allclose(b["max_over_mean"], [1.0, 4.0, 0.4 * 4])
    np.testing.assert_allclose(b["entropy"], [np.log(4), 0.0, -(share * np.log(share)).sum()])
    np.testing.assert_allclose(b["normalized_entropy"], np.array(b["entropy"]) / np.log(4))
    # counts [bins=2, classes=3, layers=1, experts=2]: shares by t sum the classes, by class sum the bins
    c = np.arange(12, dtype=float).reshape(2, 3, 1, 2) + 1
    rep = report(c, [0.25, 0.75], [0, 1, 2], [1])
    by_t = c.sum(1)[:, 0]
    by_class = c.sum(0)[:, 0]
    np.testing.assert_allclose(rep["share_by_t"][0], by_t / by_t.sum(1, keepdims=True))
    np.testing.assert_allclose(rep["share_by_class"][0], by_class / by_class.sum(1, keepdims=True))
    np.testing.assert_allclose(rep["balance_by_t"]["mean_max_over_mean"], 2 * (by_t / by_t.sum(1, keepdims=True)
                                                                               ).max(1))
