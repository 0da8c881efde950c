"""Evaluation building blocks against direct computations: the Fréchet distance against scipy (and torchmetrics'
FID), the Inception Score against its formula (and torchmetrics'), precision/recall against brute force, the
TensorFlow resize on linear images, weight loading, feature gathering order, index batches, reference files, the
validation loss against a hand computation, the eval.* config checks and titled grids.

    .venv/bin/python -m pytest -q tests/unit/test_evaluation.py
"""
import glob
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

from eval_utils import write_random_inception
from tiny import tiny_cfg, write_tiny_shards
from dit_scale.config import ConfigError
from dit_scale.evaluation.features import FeatureStore
from dit_scale.evaluation.generate import class_of, rank_batches, sample_seed
from dit_scale.evaluation.inception import InceptionV3, load_inception, tf1_bilinear_resize
from dit_scale.evaluation.reference import FeatureExtractor, Reference, load_reference, read_npz
from dit_scale.evaluation.scores import (frechet_distance, frechet_distance_of, gaussian_stats, inception_score,
                                         precision_recall)


def random_spd(d, seed):
    a = np.random.default_rng(seed).normal(size=(d, 2 * d))
    return a @ a.T / (2 * d)


# --------------------------------------------------------------------------------------------------------- scores
def scipy_frechet(mu1, s1, mu2, s2):
    """ADM's / pytorch-fid's formula, directly: Tr((S1 S2)^½) by scipy.linalg.sqrtm."""
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2)).real)


def test_frechet_distance_matches_a_direct_scipy_computation():
    rng = np.random.default_rng(0)
    d = 12
    mu1, mu2, s1, s2 = rng.normal(size=d), rng.normal(size=d), random_spd(d, 1), random_spd(d, 2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(scipy_frechet(mu1, s1, mu2, s2), rel=1e-9)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)
    # 1-D Gaussians: (m1 - m2)² + (σ1 - σ2)²
    assert frechet_distance([0.5], [[4.0]], [-1.0], [[1.0]]) == pytest.approx(1.5 ** 2 + 1.0, rel=1e-12)
    with pytest.raises(ValueError, match="differ in size"):
        frechet_distance(mu1, s1, mu2[:3], s2[:3, :3])


@pytest.mark.parametrize("n", [40, 6])          # more samples than dimensions, and fewer (the n × n form)
def test_frechet_distance_of_features_matches_scipy(n):
    rng = np.random.default_rng(n)
    d = 12
    x = rng.normal(loc=0.2, size=(n, d)) @ rng.normal(size=(d, d))
    mu2, s2 = rng.normal(size=d), random_spd(d, 7)
    mu1, s1 = x.mean(0), np.cov(x, rowvar=False)
    expect = scipy_frechet(mu1, s1, mu2, s2)
    assert frechet_distance_of(x, mu2, s2) == pytest.approx(expect, rel=1e-7)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expect, rel=1e-7)


def test_frechet_distance_of_features_agrees_with_torchmetrics_fid():
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Identity(torch.nn.Module):
        num_features = 6

        def forward(self, x):
            return x

    rng = np.random.default_rng(3)
    real, fake = rng.normal(size=(200, 6)), rng.normal(loc=0.3, scale=1.2, size=(150, 6))
    fid = FrechetInceptionDistance(feature=Identity())
    fid.update(torch.from_numpy(real), real=True)
    fid.update(torch.from_numpy(fake), real=False)
    ours = frechet_distance_of(fake, *gaussian_stats(real))
    assert ours == pytest.approx(float(fid.compute()), rel=1e-6)
    mu, sigma = gaussian_stats(real)
    np.testing.assert_allclose(sigma, np.cov(real.T), rtol=1e-12)
    np.testing.assert_allclose(mu, real.mean(0), rtol=1e-12)


def test_inception_score_matches_the_formula_and_torchmetrics():
    from torchmetrics.image.inception import InceptionScore
    logits = np.random.default_rng(4).normal(scale=3.0, size=(60, 10))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    direct = np.exp(np.mean(np.sum(p * (np.log(p) - np.log(p.mean(0, keepdims=True))), axis=1)))
    assert inception_score(logits) == pytest.approx(direct, rel=1e-10)
    # ADM: the mean over consecutive splits
    halves = [inception_score(logits[:30]), inception_score(logits[30:])]
    assert inception_score(logits, split_size=30) == pytest.approx(np.mean(halves), rel=1e-12)

    class Identity(torch.nn.Module):
        def forward(self, x):
            return x

    metric = InceptionScore(feature=Identity(), splits=1)
    metric.update(torch.from_numpy(logits))
    assert inception_score(logits) == pytest.approx(float(metric.compute()[0]), rel=1e-6)


def brute_force_precision_recall(real, fake, k):
    def radii(x):
        return np.array([np.sort(np.linalg.norm(x - p, axis=1))[k] for p in x])   # [0] is the point itself

    r_real, r_fake = radii(real), radii(fake)
    precision = np.mean([any(np.linalg.norm(f - real[j]) <= r_real[j] for j in range(len(real))) for f in fake])
    recall = np.mean([any(np.linalg.norm(r - fake[j]) <= r_fake[j] for j in range(len(fake))) for r in real])
    return precision, recall


@pytest.mark.parametrize("k, block", [(3, 10000), (2, 7)])
def test_precision_recall_matches_brute_force(k, block):
    rng = np.random.default_rng(5)
    real = rng.normal(size=(40, 5))
    fake = np.concatenate([rng.normal(size=(20, 5)), rng.normal(loc=4.0, size=(15, 5))])    # 15 far off
    precision, recall = precision_recall(real, fake, k=k, block=block)
    assert (precision, recall) == pytest.approx(brute_force_precision_recall(real, fake, k), abs=1e-12)
    assert precision < 0.75                               # the far-off cluster is outside the real manifold
    with pytest.raises(ValueError, match="needs more than 3"):
        precision_recall(real[:3], fake)


# --------------------------------------------------------------------------------------------------------- Inception
def test_tf1_resize_is_exact_on_linear_images():
    """TensorFlow 1.x bilinear (align_corners=False): output (i, j) samples the input at (i·h/out, j·w/out), so a
    linear image gives exactly that linear function wherever no edge clamping happens."""
    h, w, out = 8, 6, 20
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    image = (3 * yy + 2 * xx + 1).view(1, 1, h, w)
    got = tf1_bilinear_resize(image, out)[0, 0]
    src_y = torch.arange(out, dtype=torch.float64) * (h / out)
    src_x = torch.arange(out, dtype=torch.float64) * (w / out)
    expect = 3 * src_y.view(-1, 1) + 2 * src_x.view(1, -1) + 1
    inside_y, inside_x = src_y <= h - 1, src_x <= w - 1
    torch.testing.assert_close(got[inside_y][:, inside_x], expect[inside_y][:, inside_x], rtol=1e-6, atol=1e-5)


class Payload:
    """An arbitrary class: unpickling it could run code, so a weights-only load must refuse it."""


def test_inception_loads_local_weights_and_refuses_others(tmp_path):
    pth = write_random_inception(str(tmp_path / "inception.pth"))
    st = write_random_inception(str(tmp_path / "inception.safetensors"))
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    a, b = load_inception(pth)(images), load_inception(st)(images)
    assert a["pool"].shape == (2, 2048) and a["spatial"].shape == (2, 2023) and a["logits"].shape == (2, 1008)
    torch.testing.assert_close(a["pool"], b["pool"])
    assert a["pool"].std() > 1e-3                          # random weights, but features that vary
    with pytest.raises(ValueError, match=r"--inception='.*nothing.pth' is not a file"):
        load_inception(str(tmp_path / "nothing.pth"))
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="is not the FID Inception-v3 state dict"):
        load_inception(str(tmp_path / "other.pth"))
    torch.save({"weights": torch.zeros(1), "obj": Payload()}, tmp_path / "pickled.pth")   # a pickled object: refused
    with pytest.raises(ValueError, match="cannot be read as a state dict of tensors"):
        load_inception(str(tmp_path / "pickled.pth"))
    with pytest.raises(ValueError, match="expects uint8 RGB images"):
        InceptionV3()(images.float())


# ---------------------------------------------------------------------------------------------- order and batches
def test_feature_store_returns_features_sorted_by_index():
    store = FeatureStore(keys=("pool",))
    store.update(torch.tensor([4, 2]), {"pool": torch.tensor([[4.0], [2.0]])})
    store.update(torch.tensor([0, 3, 1]), {"pool": torch.tensor([[0.0], [3.0], [1.0]])})
    store.add_nothing({"pool": 1})
    out = store.compute()
    assert out["index"].tolist() == [0, 1, 2, 3, 4] and out["pool"][:, 0].tolist() == [0, 1, 2, 3, 4]
    store = FeatureStore(keys=("pool",))
    store.update(torch.tensor([1, 1]), {"pool": torch.zeros(2, 1)})
    with pytest.raises(RuntimeError, match="same global sample index twice"):
        store.compute()


@pytest.mark.parametrize("world", [1, 2, 3])
def test_rank_batches_cover_every_index_once_in_the_same_batches(world):
    n, b = 23, 4
    batches = [batch.indices for r in range(world) for batch in rank_batches(n, b, r, world)]
    assert sorted(i for batch in batches for i in batch) == list(range(n))
    assert sorted(batches) == [list(range(s, min(n, s + b))) for s in range(0, n, b)]
    padded = [list(rank_batches(n, b, r, world, pad=True)) for r in range(world)]
    assert len({len(p) for p in padded}) == 1                          # same number of forwards on every rank
    assert [i for p in padded for batch in p if batch.real for i in batch.indices] != []
    assert sample_seed(0, 1) != sample_seed(1, 0) and class_of(1003, 1000) == 3


# ---------------------------------------------------------------------------------------------------- references
class FakeInception:
    """Deterministic 'features' of uint8 images: pool = mean colour repeated, spatial and logits likewise."""

    def __call__(self, images):
        m = images.float().mean(dim=(2, 3))                               # [N, 3]
        return {"pool": m.repeat(1, 2), "spatial": m[:, :2], "logits": m}


def test_reference_npz_files(tmp_path):
    extractor = FeatureExtractor(FakeInception(), "cpu", batch_size=3, fingerprint="x")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 5, 5, 3), dtype=np.uint8)
    np.savez(tmp_path / "adm.npz", mu=np.zeros(6), sigma=np.eye(6), mu_s=np.zeros(2), sigma_s=np.eye(2),
             arr_0=images)
    ref = load_reference(str(tmp_path / "adm.npz"), extractor)
    np.testing.assert_allclose(ref.pool, np.tile(images.astype(np.float32).mean(axis=(1, 2)), 2), rtol=1e-6)
    assert ref.mu_s.shape == (2,)
    path = Reference(np.ones(3), np.eye(3), pool=np.zeros((4, 3)), source="mine").save(str(tmp_path / "r.npz"))
    back = load_reference(path, extractor)
    assert back.source == "mine" and back.pool.shape == (4, 3) and back.mu_s is None
    np.savez(tmp_path / "obj.npz", mu=np.array([{"a": 1}], dtype=object), sigma=np.eye(1))
    with pytest.raises(ConfigError, match="cannot be read as an .npz of arrays"):
        load_reference(str(tmp_path / "obj.npz"), extractor)
    np.save(tmp_path / "one.npy", np.zeros(3))             # one array, not named ones: a sentence, not a TypeError
    with pytest.raises(ConfigError, match=r"holds one array \(an .npy file\), not named arrays"):
        load_reference(str(tmp_path / "one.npy"), extractor)
    np.savez(tmp_path / "nomu.npz", arr_0=images)
    with pytest.raises(ConfigError, match="has no 'mu' and 'sigma'"):
        load_reference(str(tmp_path / "nomu.npz"), extractor)
    with pytest.raises(ConfigError, match="neither an .npz file nor shards:PATH"):
        load_reference(str(tmp_path / "missing.npz"), extractor)


def test_reference_from_pixel_shards_is_cached(tmp_path):
    shards = write_tiny_shards(str(tmp_path / "shards"))                # 96 images in 2 shards of 48
    extractor = FeatureExtractor(FakeInception(), "cpu", batch_size=10, fingerprint="fake")
    ref = load_reference(f"shards:{shards}", extractor, num_samples=60)
    [cache] = glob.glob(os.path.join(shards, "inception_ref_fake_60_*.npz"))
    assert ref.pool.shape == (60, 6)
    from dit_scale.evaluation.shard_samples import ShardSet
    x = np.concatenate([b.x for b in ShardSet.open(shards, "test").batches(60, 7)])   # another batch size
    direct = np.tile(x.astype(np.float32).mean(axis=(1, 2)), 2)
    np.testing.assert_allclose(ref.pool, direct, rtol=1e-6)
    np.testing.assert_allclose(ref.mu, direct.mean(0), rtol=1e-6)
    again = load_reference(f"shards:{shards}", FeatureExtractor(None, "cpu", fingerprint="fake"), num_samples=60)
    np.testing.assert_array_equal(again.sigma, ref.sigma)                # read from the cache: no network needed


def test_a_reference_cache_of_other_data_is_recomputed_not_read(tmp_path, capsys):
    """The cache records what its statistics came from: shards rebuilt in place (other images, same names and
    count) give a new cache, and an explicit cache file of another reference is recomputed, not read (it used to
    be, giving a silently wrong FID)."""
    shards = write_tiny_shards(str(tmp_path / "shards"))
    extractor = FeatureExtractor(FakeInception(), "cpu", batch_size=10, fingerprint="fake")
    first = load_reference(f"shards:{shards}", extractor, num_samples=60)
    explicit = str(tmp_path / "mine.npz")
    assert load_reference(f"shards:{shards}", extractor, num_samples=60, cache=explicit).key == first.key
    for name in os.listdir(shards):                      # rebuilt in place: other images, same names and counts
        if not name.startswith("inception_ref_"):
            os.remove(os.path.join(shards, name))
    time.sleep(0.01)
    write_tiny_shards(shards, seed=1)
    rebuilt = load_reference(f"shards:{shards}", extractor, num_samples=60)
    assert rebuilt.key != first.key and not np.allclose(rebuilt.mu, first.mu)
    assert len(glob.glob(os.path.join(shards, "inception_ref_fake_60_*.npz"))) == 2
    from dit_scale.evaluation.shard_samples import ShardSet
    x = np.concatenate([b.x for b in ShardSet.open(shards, "test").batches(60, 7)])
    np.testing.assert_allclose(rebuilt.mu, np.tile(x.astype(np.float32).mean(axis=(1, 2)), 2).mean(0), rtol=1e-6)
    capsys.readouterr()
    again = load_reference(f"shards:{shards}", extractor, num_samples=60, cache=explicit)     # the old data's file
    assert "holds statistics of other data" in capsys.readouterr().out
    np.testing.assert_array_equal(again.mu, rebuilt.mu)
    assert load_reference(explicit, extractor).key == "" and str(read_npz(explicit)["key"]) == rebuilt.key


# ------------------------------------------------------------------------------------------------ validation loss
def test_validation_loss_matches_a_direct_computation(tmp_path):
    from dit_scale.build import build
    from dit_scale.evaluation.val_loss import ValidationLoss
    shards = write_tiny_shards(str(tmp_path / "val"))
    cfg = tiny_cfg(f"eval.val_path={shards}", "eval.val_samples=10", "eval.val_t_bins=2", "eval.val_batch_size=4",
                   "eval.every=1")
    built = build(cfg)
    val = ValidationLoss.from_config(cfg, built.objective, "cpu")
    row = val(built.model)
    assert set(row) == {"val_loss", "val_loss/t=0.25", "val_loss/t=0.75"}
    assert val(built.model) == row                                        # fixed noise: deterministic
    # direct: the first 10 images in shard order, flow loss at t = 0.25 and 0.75 with the same noise draws
    x0, y = val.x, val.y
    assert x0.shape == (10, 3, 16, 16) and float(x0.min()) >= -1 and float(x0.max()) <= 1
    model = built.model.eval()
    for k, t in enumerate((0.25, 0.75)):
        losses = []
        for i in range(10):
            seed = int(np.random.SeedSequence([cfg.eval.seed, i, k]).generate_state(1)[0])
            noise = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(seed))
            x_t = (1 - t) * x0[i] + t * noise
            with torch.no_grad():
                out = model(x_t[None], torch.tensor([t * 1000.0]), y[i:i + 1])[0]
            losses.append(((out[0] - (noise - x0[i])) ** 2).mean().item())
        assert row[f"val_loss/t={t:g}"] == pytest.approx(np.mean(losses), rel=1e-5)
    assert row["val_loss"] == pytest.approx((row["val_loss/t=0.25"] + row["val_loss/t=0.75"]) / 2)


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("auto", torch.float32),
                                              ("fp32", torch.float32)])
def test_evaluation_samples_in_the_runs_precision(precision, dtype):
    """Evaluation draws its images in train.precision resolved for the device, as training runs its forwards:
    bf16 autocast for train.precision=bf16 (also on the CPU), fp32 for auto on the CPU."""
    from dit_scale.build import build
    from dit_scale.evaluation.evaluator import sample_images
    from dit_scale.evaluation.generate import SamplingSpec
    cfg = tiny_cfg(f"train.precision={precision}")
    built = build(cfg)
    seen = []
    linear = next(m for m in built.model.modules() if isinstance(m, torch.nn.Linear))
    linear.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    spec = SamplingSpec.from_config(cfg, steps=2)
    batches = list(sample_images(built.model, built.objective, cfg, spec, lambda x: x.clamp(-1, 1), 2, 2, 0, 1, "cpu"))
    assert len(batches) == 1 and batches[0][1].dtype == torch.uint8
    assert seen and set(seen) == {dtype}


# --------------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("overrides, message", [
    (["eval.every=5"], "eval.every=5 has nothing to evaluate"),
    (["eval.fid_samples=100", "eval.inception=x.pth"], "eval.fid_samples=100 needs eval.ref"),
    (["eval.fid_samples=2", "eval.inception=x", "eval.ref=y"], "eval.fid_samples=2 is too few"),
    (["eval.sampler=ancestral"], "eval.sampler='ancestral' does not fit diffusion.objective=flow"),
    (["eval.guide_channels=4"], "eval.guide_channels=4 must be between 1 and model.in_channels=3"),
    (["eval.val_t_bins=0"], "eval.val_t_bins must be a positive integer"),
])
def test_eval_config_errors_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_cfg(*overrides)
    ok = tiny_cfg("diffusion.objective=ddpm", "model.learn_sigma=true", "eval.sampler=ancestral", "eval.steps=250",
                  "eval.guide_channels=3", "eval.cfg_scale=1.5")
    assert ok.eval.sampler == "ancestral"


# ----------------------------------------------------------------------------------------------------------- grids
def test_titled_grid_keeps_the_images(tmp_path):
    from dit_scale.generation.sampling import save_grid
    images = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    plain = np.asarray(Image.open(save_grid(images, 3, str(tmp_path / "a.png"), upscale=2)))
    titled = np.asarray(Image.open(save_grid(images, 3, str(tmp_path / "b.png"), upscale=2,
                                             row_titles=["red circle", "class 7"], title="step 10")))
    h, w, _ = plain.shape
    assert titled.shape[0] > h and titled.shape[1] > w
    np.testing.assert_array_equal(titled[-h:, -w:], plain)            # the grid itself, right-bottom aligned
    assert (titled[:-h, :] < 128).any() and (titled[:, :-w] < 128).any()   # some dark text in both margins
