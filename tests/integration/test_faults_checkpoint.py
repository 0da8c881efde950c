"""Fault injection, checkpoints and run directories: a crafted DCP index must not run code, a newer save replaces an
older one at the same step, a checkpoint that does not fit is one sentence, config changes on resume are shown and
applied (or refused), non-finite weights are never saved, and run directories are locked and never mixed.

Every case drives `launch/train.py` as a user does (a subprocess) or the library call a tool uses."""
import hashlib
import json
import math
import os
import pickle
import subprocess
import sys

import pytest
import torch

from dit_scale.checkpoint import CheckpointError, find_latest, load_checkpoint
from dit_scale.config import load_config
from dit_scale.training.metrics import read_metrics
from dit_scale.training.trainer import Trainer, TrainingAborted
from tiny import ROOT, tiny_overrides

QUICKSTART = os.path.join(ROOT, "configs", "quickstart.yaml")


def train_cli(shards, run, timeout=300, env=None, **extra):
    """launch/train.py on the tiny config (4 images per step); returns the finished process."""
    fields = {"data.batch_size": 4, "logging.log_every": 1, "logging.samples_per_class": 1,
              "diffusion.sample_steps": 1, **extra}
    cmd = [sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config", QUICKSTART,
           *tiny_overrides(shards, run, **fields)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def one_line_error(proc, code=2):
    """The process failed with `code` and said one line on stderr starting with 'error:' (no traceback)."""
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines and lines[-1].startswith("error:"), proc.stderr[-3000:]
    return lines[-1]


def rewrite_manifest(ckpt):
    """Recompute the sizes and sha256 of a sharded checkpoint's manifest, as an attacker would."""
    path = os.path.join(ckpt, "manifest.json")
    manifest = json.load(open(path))
    for name in manifest["files"]:
        data = open(os.path.join(ckpt, name), "rb").read()
        manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    json.dump(manifest, open(path, "w"))


@pytest.fixture(scope="module")
def four_steps(tiny_shards, tmp_path_factory):
    """A finished 4-step run with sharded checkpoints at steps 2 and 4 (copy it before changing it)."""
    run = str(tmp_path_factory.mktemp("four") / "run")
    proc = train_cli(tiny_shards, run, **{"train.steps": 4, "train.checkpoint_every": 2})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def copy_run(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return str(dst)


# ----------------------------------------------------------------------------------------------------------------
# 1. A crafted DCP index (.metadata) must not execute code
# ----------------------------------------------------------------------------------------------------------------

class _Payload:
    """Unpickling this runs a shell command (what an attacker would put into a .metadata)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def edit_index(ckpt, change, new_files=()):
    """Rewrite a sharded checkpoint's DCP index with change(metadata), and its manifest (listing `new_files` too),
    as an attacker would."""
    path = os.path.join(ckpt, ".metadata")
    with open(path, "rb") as f:
        metadata = pickle.load(f)                       # our own file, written by the test's own run
    change(metadata)
    with open(path, "wb") as f:
        pickle.dump(metadata, f)
    manifest = json.load(open(os.path.join(ckpt, "manifest.json")))
    manifest["files"].update({name: {} for name in new_files})
    json.dump(manifest, open(os.path.join(ckpt, "manifest.json"), "w"))
    rewrite_manifest(ckpt)


def plant_payload(ckpt, marker):
    """Stealth form: the real index, plus an attribute whose unpickling runs the payload; manifest recomputed."""
    edit_index(ckpt, lambda metadata: setattr(metadata, "planner_data", {"note": _Payload(marker)}))


def test_crafted_metadata_is_refused_on_resume_and_on_load(four_steps, tiny_shards, tmp_path):
    run = copy_run(four_steps, tmp_path / "run")
    marker = str(tmp_path / "pwned")
    plant_payload(find_latest(run), marker)
    with pytest.raises(CheckpointError, match="refusing to load it"):
        load_checkpoint(find_latest(run))                # what export, sampling and evaluation call
    assert not os.path.exists(marker)
    proc = train_cli(tiny_shards, run, **{"train.steps": 6, "train.resume": find_latest(run)})
    line = one_line_error(proc)
    assert "references posix.system" in line or "references os.system" in line
    assert not os.path.exists(marker)


def plant_bytes_entry(ckpt, marker):
    """The other form: an index that unpickles cleanly but declares one model tensor as pickled bytes, pointing at a
    payload file; DCP's planner would read that entry back with an unrestricted torch.load."""
    import io
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex
    buffer = io.BytesIO()
    torch.save(_Payload(marker), buffer)
    with open(os.path.join(ckpt, "__0_1.distcp"), "wb") as f:
        f.write(buffer.getvalue())

    def bytes_entry(metadata):
        key = sorted(k for k in metadata.state_dict_metadata if k.startswith("model."))[0]
        metadata.state_dict_metadata[key] = BytesStorageMetadata()
        metadata.storage_data = {k: v for k, v in metadata.storage_data.items() if k.fqn != key}
        metadata.storage_data[MetadataIndex(key)] = _StorageInfo("__0_1.distcp", 0, len(buffer.getvalue()))
    edit_index(ckpt, bytes_entry, new_files=["__0_1.distcp"])


def test_a_pickled_bytes_entry_is_refused_on_resume_and_on_load(four_steps, tiny_shards, tmp_path):
    run = copy_run(four_steps, tmp_path / "run")
    marker = str(tmp_path / "pwned")
    plant_bytes_entry(find_latest(run), marker)
    with pytest.raises(CheckpointError, match="declares pickled objects"):
        load_checkpoint(find_latest(run))
    proc = train_cli(tiny_shards, run, **{"train.steps": 6, "train.resume": "auto"})
    said = proc.stdout + proc.stderr          # auto: a warning, then the newest checkpoint before it
    assert "declares pickled objects (model." in said and "resumed from" in said, said[-3000:]
    assert not os.path.exists(marker)


def test_resuming_from_a_run_directory_without_a_complete_checkpoint_is_one_sentence(tiny_shards, tmp_path):
    """train.resume=DIR names another run whose only save never finished: the sentence says the directory holds no
    complete checkpoint, not that its checkpoints folder is an unfinished save."""
    other = tmp_path / "other"
    (other / "checkpoints" / "step_00000002.tmp").mkdir(parents=True)
    line = one_line_error(train_cli(tiny_shards, str(tmp_path / "run"), **{"train.steps": 2,
                                                                          "train.resume": str(other)}))
    assert f"train.resume='{other}' holds no complete checkpoint" in line, line


def test_an_index_declaring_more_than_its_files_hold_is_one_sentence(four_steps, tiny_shards, tmp_path):
    """A crafted index declaring a [2**40] tensor would have every reader allocate 4 TiB before reading a byte (a
    traceback from the allocator): the declared sizes are checked against the data files first."""
    run = copy_run(four_steps, tmp_path / "run")
    ckpt = find_latest(run)

    def huge(metadata):
        key = sorted(k for k in metadata.state_dict_metadata if k.startswith("model."))[0]
        meta = metadata.state_dict_metadata[key]
        meta.size = torch.Size([1 << 40])
        for chunk in meta.chunks:
            chunk.sizes = torch.Size([1 << 40])
    edit_index(ckpt, huge)
    with pytest.raises(CheckpointError, match=r"declares 4.1e\+03 GiB of tensors but its data files hold"):
        load_checkpoint(ckpt)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "export.py"), ckpt, "--out",
                           str(tmp_path / "w.safetensors")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "declares 4.1e+03 GiB of tensors" in one_line_error(proc)


# ----------------------------------------------------------------------------------------------------------------
# 2. A save at a step that already has a checkpoint replaces it
# ----------------------------------------------------------------------------------------------------------------

def test_newer_save_replaces_a_corrupt_checkpoint_at_the_same_step(four_steps, tiny_shards, tmp_path):
    run = copy_run(four_steps, tmp_path / "run")
    four = os.path.join(run, "checkpoints", "step_00000004")
    data = os.path.join(four, sorted(f for f in os.listdir(four) if f.endswith(".distcp"))[0])
    raw = bytearray(open(data, "rb").read())
    raw[200] ^= 0xFF                                         # same size, one byte flipped
    open(data, "wb").write(bytes(raw))
    proc = train_cli(tiny_shards, run, **{"train.steps": 4, "train.checkpoint_every": 2, "train.resume": "auto"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Falling back" in proc.stdout + proc.stderr
    assert find_latest(run) == four
    assert load_checkpoint(four)["step"] == 4                # verified: the retrained save, not the corrupt one


# ----------------------------------------------------------------------------------------------------------------
# 6. A sharded checkpoint that does not fit the model: one sentence, exit 2
# ----------------------------------------------------------------------------------------------------------------

def test_sharded_resume_into_another_model_is_one_sentence(four_steps, tiny_shards, tmp_path):
    proc = train_cli(tiny_shards, str(tmp_path / "other"), **{"train.steps": 6, "model.hidden_size": 128,
                                                              "model.num_heads": 4,
                                                              "train.resume": find_latest(four_steps)})
    line = one_line_error(proc)
    assert "does not fit this model" in line and "model.hidden_size" in line


# ----------------------------------------------------------------------------------------------------------------
# 7. Config changes on resume: shown, applied, or refused
# ----------------------------------------------------------------------------------------------------------------

def test_resume_applies_a_new_learning_rate_and_schedule(four_steps, tiny_shards, tmp_path):
    run = copy_run(four_steps, tmp_path / "run")
    proc = train_cli(tiny_shards, run, **{"train.steps": 6, "optim.lr": 5e-4, "train.resume": "auto"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = proc.stdout + proc.stderr
    assert "optim.lr: 0.002 -> 0.0005" in said and "train.steps: 4 -> 6" in said
    rows = {r["step"]: r for r in read_metrics(run)}
    # the quickstart's cosine (min_lr_ratio 0.1) over the new 6 steps, scaled to the new peak; row s logs the rate
    # of its step, 0-based s - 1
    cosine = lambda i: 5e-4 * (0.1 + 0.9 * 0.5 * (1 + math.cos(i / 6 * math.pi)))     # noqa: E731
    assert (rows[5]["lr"], rows[6]["lr"]) == pytest.approx((cosine(4), cosine(5)), rel=1e-6)


@pytest.mark.parametrize("change, key", [({"model.depth": 3}, "model.depth"),
                                         ({"model.num_heads": 4}, "model.num_heads"),     # same shapes, other heads
                                         ({"mup.enabled": True, "mup.base_width": 32}, "mup.enabled")])
def test_resume_refuses_a_change_of_what_the_model_computes(four_steps, tiny_shards, tmp_path, change, key):
    """A change of the parameters' shapes, or of what the same shapes compute (the head count, the μP
    parametrisation and its learning-rate groups), stops the resume in one sentence; a new head count used to be
    accepted and read the trained weights as another attention."""
    run = copy_run(four_steps, tmp_path / "run")
    line = one_line_error(train_cli(tiny_shards, run, **{"train.steps": 6, "train.resume": "auto", **change}))
    assert key in line and "cannot change on resume" in line


# ----------------------------------------------------------------------------------------------------------------
# 9. Divergence: non-finite weights are never saved; skipped intervals are logged as skipped; clean aborts
# ----------------------------------------------------------------------------------------------------------------

def test_diverged_weights_are_never_saved(tiny_shards, tmp_path):
    """A weight overflows at step 3: its save and every save of the non-finite streak after it are skipped, so
    retention keeps the good checkpoints; skipped intervals are logged as skipped; the abort names the last one."""
    run = str(tmp_path / "run")
    cfg = load_config(None, tiny_overrides(tiny_shards, run, **{
        "train.steps": 12, "train.checkpoint_every": 1, "train.keep_last": 2, "train.max_bad_steps": 4,
        "logging.log_every": 1, "data.batch_size": 4}))
    trainer = Trainer(cfg)
    real_step = trainer.engine.step

    def overflowing(ok):
        real_step(ok)
        if trainer.step == 2:                                # the update of step 3 overflows one weight
            with torch.no_grad():
                trainer.model.x_embedder.proj.weight[0, 0, 0, 0] = float("inf")
    trainer.engine.step = overflowing
    with pytest.raises(TrainingAborted) as info:
        trainer.fit()
    kept = sorted(os.listdir(os.path.join(run, "checkpoints")))
    assert kept == ["latest", "step_00000001", "step_00000002"], kept
    for name in kept[1:]:
        state = load_checkpoint(os.path.join(run, "checkpoints", name))
        assert all(torch.isfinite(v).all() for part in ("model", "ema") for v in state[part].values()), name
    assert "step_00000002" in str(info.value)
    rows = {r["step"]: r for r in read_metrics(run)}
    assert rows[2]["loss"] is not None and not rows[2].get("skipped")
    assert all(rows[s]["skipped"] and rows[s]["loss"] is None for s in (4, 5, 6)), rows    # step 7 aborts


@pytest.mark.parametrize("override, field", [("optim.lr=inf", "optim.lr"), ("optim.lr=nan", "optim.lr"),
                                             ("data.weights=[nan,1]", "data.weights"),
                                             ("optim.weight_decay=nan", "optim.weight_decay"),
                                             ("optim.grad_clip=nan", "optim.grad_clip"),
                                             ("optim.eps=-1e-8", "optim.eps"), ("train.seed=-1", "train.seed"),
                                             ("model.mlp_ratio=-2", "model.mlp_ratio"),
                                             ("logging.samples_per_class=0", "logging.samples_per_class"),
                                             ("model.class_dropout=0", "model.class_dropout"),
                                             ("train.run_dir=${nope}", "train.run_dir"),
                                             ("data.batch_size=1000000000", "data.batch_size")])
def test_bad_values_are_one_sentence(override, field, capsys):
    from launch.train import main                        # in this process: the entry point's own error handling
    code = main(["--config", QUICKSTART, override])
    err = capsys.readouterr().err
    assert field in one_line_error(subprocess.CompletedProcess([], code, "", err))


# ----------------------------------------------------------------------------------------------------------------
# 10. Run directories: one run at a time, never mixed, metrics rows once after a kill
# ----------------------------------------------------------------------------------------------------------------

def test_fresh_run_into_a_used_run_directory_is_refused(four_steps, tiny_shards, tmp_path):
    run = copy_run(four_steps, tmp_path / "run")
    line = one_line_error(train_cli(tiny_shards, run, **{"train.steps": 2}))
    assert run in line and "train.resume=auto" in line
    assert find_latest(run).endswith("step_00000004")       # `latest` did not move back


def test_second_run_on_a_locked_run_directory_is_refused(tiny_shards, tmp_path):
    run = str(tmp_path / "run")
    first = subprocess.Popen([sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config", QUICKSTART,
                              *tiny_overrides(tiny_shards, run, **{"train.steps": 10 ** 6, "data.batch_size": 4,
                                                                   "logging.log_every": 1})],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        metrics = os.path.join(run, "metrics.jsonl")
        for _ in range(600):                                  # until the first run is training
            if os.path.exists(metrics) and os.path.getsize(metrics) > 0:
                break
            assert first.poll() is None, first.stderr.read()
            subprocess.run(["sleep", "0.1"])
        line = one_line_error(train_cli(tiny_shards, run, **{"train.steps": 2, "train.resume": "auto"}))
        assert "in use by" in line and str(first.pid) in line
    finally:
        first.kill()
        first.wait()


def test_metrics_rows_after_the_resumed_step_are_dropped(four_steps, tiny_shards, tmp_path):
    run = copy_run(four_steps, tmp_path / "run")
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:   # a run killed after step 4's save logged 5 and 6
        f.write(json.dumps({"step": 5, "loss": 9.0}) + "\n" + json.dumps({"step": 6, "loss": 9.0}) + "\n")
    proc = train_cli(tiny_shards, run, **{"train.steps": 6, "train.resume": "auto"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [r["step"] for r in read_metrics(run)]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert all(r["loss"] != 9.0 for r in read_metrics(run))


def test_unwritable_run_directory_is_one_sentence(tiny_shards, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    line = one_line_error(train_cli(tiny_shards, str(blocker / "run"), **{"train.steps": 1}))
    assert str(blocker) in line


def test_sampling_a_class_the_model_does_not_know_is_one_sentence(four_steps, tmp_path):
    out = tmp_path / "grid.png"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "sample.py"), "--run", four_steps,
                           "--classes", "0,4", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    line = one_line_error(proc)
    assert "--classes has 4" in line and "0..3" in line and not out.exists()


# ----------------------------------------------------------------------------------------------------------------
# 11. A stored config that is not a config (a YAML tag, a list): one sentence naming the file, exit 2, for every
#     reader (sample, evaluate, convert --to, upcycle, train.init_from, resume)
# ----------------------------------------------------------------------------------------------------------------

BAD_STORED_CONFIGS = {"yaml tag": "model: !!python/object/apply:os.system ['touch {marker}']\n",
                      "list": "- model\n- train\n",
                      "list section": "model: [1, 2]\ntrain:\n  steps: 4\n"}


def with_stored_config(four_steps, tmp_path, text):
    """(an export of the 4-step run, a copy of its step_4 checkpoint) both storing `text` as their config."""
    from safetensors.torch import load_file, save_file
    from dit_scale.checkpoint import export
    exported = export(four_steps, str(tmp_path / "model.safetensors"), ema=True)
    save_file(load_file(exported), exported, metadata={"format": "dit_scale", "config": text, "step": "4"})
    ckpt = copy_run(os.path.join(four_steps, "checkpoints", "step_00000004"), tmp_path / "step_00000004")
    extra = torch.load(os.path.join(ckpt, "extra.pt"), weights_only=True)
    extra["config"] = text
    torch.save(extra, os.path.join(ckpt, "extra.pt"))
    rewrite_manifest(ckpt)
    return exported, ckpt


@pytest.mark.parametrize("kind", sorted(BAD_STORED_CONFIGS))
def test_a_bad_stored_config_is_one_sentence_for_every_reader(kind, four_steps, tiny_shards, tmp_path, capsys):
    from launch import convert, evaluate, sample, train, upcycle
    marker = str(tmp_path / "pwned")
    exported, ckpt = with_stored_config(four_steps, tmp_path, BAD_STORED_CONFIGS[kind].format(marker=marker))
    out = str(tmp_path / "out")
    calls = {"sample": (sample.main, ["--ckpt", exported, "--out", out + ".png"], exported),
             "evaluate": (evaluate.main, ["--ckpt", exported, "--ref", "shards:" + tiny_shards], exported),
             "convert --to": (convert.main, ["--to", "dit", exported, "--out", out + ".pt"], exported),
             "upcycle": (upcycle.main, [exported, "--experts", "2", "--top-k", "1", "--out", out + ".safetensors"],
                         exported),
             "init_from": (train.main, ["--config", QUICKSTART, *tiny_overrides(tiny_shards, str(tmp_path / "a"), **{
                 "train.steps": 1, "train.init_from": exported})], exported),
             "resume": (train.main, ["--config", QUICKSTART, *tiny_overrides(tiny_shards, str(tmp_path / "b"), **{
                 "train.steps": 6, "train.resume": ckpt})], ckpt)}
    for name, (main, argv, path) in calls.items():
        code = main(argv)
        err = capsys.readouterr().err
        line = one_line_error(subprocess.CompletedProcess([], code, "", err))
        assert path in line and "config stored in" in line, (name, line)
    assert not os.path.exists(marker)


# ----------------------------------------------------------------------------------------------------------------
# 12. A checkpoint folder that cannot be written, a resume on a full disk: the one-line disk message, exit 2
# ----------------------------------------------------------------------------------------------------------------

def mount_tmpfs(mount, options):
    """A tmpfs at `mount` (root only); skips the test where it cannot be mounted."""
    os.makedirs(mount, exist_ok=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a tmpfs")


def test_read_only_checkpoint_folder_is_the_disk_sentence(four_steps, tiny_shards, tmp_path):
    """checkpoints/ on a read-only mount (the run directory itself writable): the first save stops the run with
    the one line naming the folder and the newest complete checkpoint."""
    run = copy_run(four_steps, tmp_path / "run")
    folder = os.path.join(run, "checkpoints")
    mount_tmpfs(folder, "size=256m")
    try:
        copy_run(os.path.join(four_steps, "checkpoints", "step_00000004"), os.path.join(folder, "step_00000004"))
        with open(os.path.join(folder, "latest"), "w") as f:
            f.write("step_00000004\n")
        subprocess.run(["mount", "-o", "remount,ro", folder], check=True)
        proc = train_cli(tiny_shards, run, **{"train.steps": 6, "train.checkpoint_every": 1, "train.resume": "auto"})
        line = one_line_error(proc)
        assert folder in line and "read-only" in line.lower() and "step_00000004" in line, line
    finally:
        subprocess.run(["umount", "-l", folder], capture_output=True)


@pytest.mark.parametrize("async_save", [False, True])
def test_full_disk_is_one_sentence_naming_it_and_so_is_its_resume(tiny_shards, tmp_path, async_save):
    """The run directory on a 700 KiB filesystem: config and metrics fit, the first checkpoint does not; the
    sentence names the step whose save failed (a background save's too, found when the next save waits for it) and
    the partial folder it left; the resumed run on the same full disk stops with the same sentence before it writes
    anything."""
    mount = tmp_path / "small"
    mount_tmpfs(mount, "size=700k")
    try:
        run = str(mount / "run")
        proc = train_cli(tiny_shards, run, **{"train.steps": 3, "train.checkpoint_every": 1,
                                              "train.async_save": async_save})
        line = one_line_error(proc)
        assert "No space left on the disk holding" in line and str(mount) in line
        assert "while saving step 1;" in line and "the unfinished step_00000001.tmp in that folder" in line, line
        with open(os.path.join(run, "filler"), "wb") as f:      # whatever room the failed save left: none now
            with pytest.raises(OSError):
                f.write(b"\0" * (1 << 20))
                f.flush()
                os.fsync(f.fileno())
        before = {p: os.path.getsize(os.path.join(run, p)) for p in os.listdir(run) if p != ".lock"}
        proc = train_cli(tiny_shards, run, **{"train.steps": 3, "train.checkpoint_every": 1, "train.resume": "auto",
                                              "train.async_save": async_save})
        line = one_line_error(proc)
        assert "No space left on the disk holding" in line and str(mount) in line, line
        assert {p: os.path.getsize(os.path.join(run, p)) for p in os.listdir(run) if p != ".lock"} == before
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


# ----------------------------------------------------------------------------------------------------------------
# 13. Resume past a checkpoint without its manifest, or holding non-finite weights: one line, then the fallback
# ----------------------------------------------------------------------------------------------------------------

def test_a_checkpoint_without_its_manifest_is_reported_then_skipped(four_steps, tiny_shards, tmp_path):
    run = copy_run(four_steps, tmp_path / "run")
    four = os.path.join(run, "checkpoints", "step_00000004")
    os.remove(os.path.join(four, "manifest.json"))
    proc = train_cli(tiny_shards, run, **{"train.steps": 4, "train.checkpoint_every": 2, "train.resume": "auto"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = proc.stdout + proc.stderr
    assert f"warning: Checkpoint '{four}' has no readable manifest.json" in said, said[-3000:]
    assert "Falling back to the previous complete checkpoint 'step_00000002'" in said
    assert "resumed from" in said and "at step 2" in said
    assert load_checkpoint(four)["step"] == 4                 # retrained and saved again, with its manifest


def test_a_checkpoint_with_non_finite_weights_is_refused(four_steps, tiny_shards, tmp_path):
    """A NaN in the EMA of step 5 (saved with a valid manifest): resume=auto names it and continues from step 4;
    resume=PATH is an error naming it."""
    from dit_scale.checkpoint import save_checkpoint
    run = copy_run(four_steps, tmp_path / "run")
    state = load_checkpoint(find_latest(run))
    name = next(k for k, v in state["ema"].items() if v.is_floating_point())
    state["ema"][name] = state["ema"][name].clone()
    state["ema"][name].view(-1)[0] = float("nan")
    state["step"] = 5
    bad = save_checkpoint(run, 5, state)
    line = one_line_error(train_cli(tiny_shards, run, **{"train.steps": 6, "train.resume": bad}))
    assert bad in line and "not finite" in line
    proc = train_cli(tiny_shards, run, **{"train.steps": 6, "train.resume": "auto"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = proc.stdout + proc.stderr
    assert f"warning: Checkpoint '{bad}'" in said and "not finite" in said, said[-3000:]
    assert "Falling back to the previous complete checkpoint 'step_00000004'" in said


def test_a_run_that_cannot_save_its_last_step_is_aborted(tiny_shards, tmp_path):
    """Weights that turn non-finite in the last update (a finite loss, so no skipped step): the final save is
    refused and the run ends with TrainingAborted (exit 3) instead of a success without its last checkpoint."""
    run = str(tmp_path / "run")
    cfg = load_config(None, tiny_overrides(tiny_shards, run, **{"train.steps": 2, "logging.log_every": 1,
                                                                "data.batch_size": 4}))
    trainer = Trainer(cfg)
    real_step = trainer.engine.step

    def overflowing(ok):
        real_step(ok)
        if trainer.step == 1:                                # the update of the last step overflows one weight
            with torch.no_grad():
                trainer.model.x_embedder.proj.weight[0, 0, 0, 0] = float("nan")
    trainer.engine.step = overflowing
    with pytest.raises(TrainingAborted, match="without saving step 2"):
        trainer.fit()
    assert find_latest(run) is None


def test_a_preemption_on_a_skipped_step_requeues_from_the_newest_checkpoint(tiny_shards, tmp_path):
    """A stop signal that lands during a non-finite step (skipped; fewer than train.max_bad_steps in a row): that
    step's save is refused, but the run is not over, so it ends for a requeue (TrainingInterrupted, exit 75) naming
    the checkpoint the next start resumes from, not as aborted (exit 3, which SLURM would never requeue); the
    resumed run finishes."""
    from dit_scale.training.preemption import EXIT_REQUEUE, TrainingInterrupted
    run = str(tmp_path / "run")
    fields = {"train.steps": 8, "train.checkpoint_every": 2, "logging.log_every": 1, "data.batch_size": 4}
    trainer = Trainer(load_config(None, tiny_overrides(tiny_shards, run, **fields)))
    real_loss = trainer.loss.__class__.__call__

    def nan_at_step_4(self, module, batch, *, step, **kw):
        out = real_loss(self, module, batch, step=step, **kw)
        if step == 4:                                        # 0-based step 4: the fifth
            out.loss = out.loss * float("nan")
            trainer.preemption.reason = "SIGTERM"            # what the signal handler sets
        return out
    trainer.loss.__class__.__call__ = nan_at_step_4
    try:
        with pytest.raises(TrainingInterrupted) as info:
            trainer.fit()
    finally:
        trainer.loss.__class__.__call__ = real_loss
    newest = os.path.join(run, "checkpoints", "step_00000004")
    assert info.value.exit_code == EXIT_REQUEUE and info.value.path == newest
    assert str(info.value).startswith("SIGTERM: step 5 was not saved (the last 1 step(s) had a non-finite loss")
    assert f"to continue from {newest}." in str(info.value)
    assert find_latest(run) == newest
    trainer = Trainer(load_config(None, tiny_overrides(tiny_shards, run, **{**fields, "train.resume": "auto"})))
    assert trainer.fit()["step"] == 8


def test_a_checkpoint_from_a_gpu_run_resumes_on_a_cpu(four_steps, tiny_shards, tmp_path):
    """A CUDA generator's state is 16 bytes, a CPU one's 5056: a run moved from a GPU to a CPU (or back) resumes with
    its random streams restarted from the step, saying so, instead of a traceback. The training trajectory does not
    depend on them (samples carry their own draws), so the losses are those of a resume with its own streams."""
    run = copy_run(four_steps, tmp_path / "run")
    ckpt = find_latest(run)
    extra = torch.load(os.path.join(ckpt, "extra.pt"), weights_only=True)
    extra["per_rank"][0]["rng"]["generator"] = torch.zeros(16, dtype=torch.uint8)     # as a CUDA run saves it
    torch.save(extra, os.path.join(ckpt, "extra.pt"))
    rewrite_manifest(ckpt)
    proc = train_cli(tiny_shards, run, **{"train.steps": 6, "train.resume": "auto"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "random streams come from another device type" in proc.stdout + proc.stderr
    same = copy_run(four_steps, tmp_path / "same")                   # resumed with its own streams
    reference = train_cli(tiny_shards, same, **{"train.steps": 6, "train.resume": "auto"})
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert [r["loss"] for r in read_metrics(run)] == [r["loss"] for r in read_metrics(same)]


def test_the_sampling_tools_say_in_one_sentence_what_a_checkpoint_or_flag_lacks(four_steps, tiny_shards, tmp_path):
    """A checkpoint without EMA weights (hand-made or converted) is one sentence pointing at --no-ema for every tool
    that samples from it, not KeyError: 'ema'; the probe refuses a sampler of the other objective before it trains
    (a ValueError traceback after the training, before); evaluate refuses too few reference images before it
    samples anything."""
    state = load_checkpoint(find_latest(four_steps))
    bare = str(tmp_path / "bare.pt")
    torch.save({"model": state["model"], "config": state["config"], "step": state["step"]}, bare)
    for tool, argv in (("sample.py", ["--ckpt", bare, "--out", str(tmp_path / "g.png"), "--steps", "1"]),
                       ("export.py", [bare, "--ema", "--out", str(tmp_path / "w.safetensors")])):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", tool), *argv], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert f"Checkpoint '{bare}' holds no EMA weights; pass --no-ema" in one_line_error(proc), tool
    probe = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "probe.py"), four_steps, "--sampler",
                            "ancestral", "--data", tiny_shards], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "--sampler ancestral is not a sampler of the flow objective" in one_line_error(probe)
    evaluate = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "evaluate.py"), "--run-dir", four_steps,
                               "--ref", f"shards:{tiny_shards}", "--inception", str(tmp_path / "unused.pth"),
                               "--ref-samples", "1", "--no-log"], cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
    assert "--ref-samples=1 real images are too few" in one_line_error(evaluate)


@pytest.mark.parametrize("what", ["metrics", "grid"])
def test_a_full_disk_while_logging_or_drawing_is_one_sentence(tiny_shards, tmp_path, monkeypatch, what):
    """A full disk when rank 0 appends a metrics row or writes a sample grid: one sentence naming the newest
    checkpoint (exit 2 through launch/train.py), not a traceback (and, with several ranks, a broken connection on the
    others); closing the metrics file afterwards does not raise a second time."""
    import errno
    from dit_scale.training import metrics
    run = str(tmp_path / "run")
    trainer = Trainer(load_config(None, tiny_overrides(tiny_shards, run, **{
        "train.steps": 4, "train.checkpoint_every": 2, "logging.log_every": 1, "logging.sample_every": 3,
        "logging.samples_per_class": 1, "diffusion.sample_steps": 1})))
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if what == "metrics":
        real_log = metrics.MetricsLogger.log
        monkeypatch.setattr(metrics.MetricsLogger, "log", lambda self, step, values: (
            real_log(self, step, values) if step < 3 else (_ for _ in ()).throw(full)))
    else:
        trainer.evaluation.write_grid = lambda *a, **k: (_ for _ in ()).throw(full)
    with pytest.raises(CheckpointError) as caught:
        trainer.fit()
    message = str(caught.value)
    when = "while logging step 3" if what == "metrics" else "while writing step 3's sample grid"
    assert message.startswith("No space left on the disk holding") and when in message, message
    assert "the newest complete checkpoint is" in message and "step_00000002" in message, message
