"""The command-line contract of the entry points that are not the trainer's: a bad input is one line on stderr,
"error: " and a sentence naming the flag or field, and exit code 2 (as launch/train.py's config errors), not a
traceback or Python's exit code 1. Each main runs in this process, as the console scripts call it.

    .venv/bin/python -m pytest -q tests/unit/test_cli_errors.py
"""
import pytest

CASES = [
    ("launch.bench", ["parallel", "--layout", "x"], "--layout x is not a layout; choose one of: cp2, ep2, tp2."),
    ("launch.model_info", ["--model", "DiT-Q/2"], "model.name='DiT-Q/2' is not in the registry"),
    ("launch.gpu_check", ["--dry-run", "--attention", "fast"], "--attention fast is not a backend; choose one of: auto"),
    ("launch.gpu_check", ["--dry-run", "--models", "DiT-Q/9"], "--models: model.name='DiT-Q/9' is not in the registry"),
    ("launch.sweep", ["aggregate", "{tmp}/none"], "none holds no sweep.json; pass the --out folder of a"),
    ("launch.evaluate", ["--run-dir", "{tmp}/none"], "--run-dir '{tmp}/none' does not exist; pass a run directory"),
    ("launch.evaluate", ["--run-dir", "{tmp}/none", "--npz", "{tmp}"],
     "--npz '{tmp}' is a directory; give a file name, e.g. --npz {tmp}/result.npz."),
    ("launch.probe", ["{tmp}/none"], "Run or checkpoint '{tmp}/none' does not exist; pass a run directory"),
    ("launch.analyze_experts", ["{tmp}/none"], "Run or checkpoint '{tmp}/none' does not exist"),
    ("launch.export", ["{tmp}/none", "--out", "{tmp}/x.safetensors"], "Checkpoint '{tmp}/none' does not exist"),
    ("launch.train", ["--config", "configs/quickstart.yaml", "{tiny run}", "train.resume={tmp}/none"],
     "train.resume='{tmp}/none' does not exist; pass a run directory, a step_* checkpoint folder or a step_*.pt "
     "file, or train.resume=auto"),
    ("data_tools.make_synthetic", ["--out", "{tmp}/s", "--num-classes", "0"], "num_classes must be in 1.."),
    ("data_tools.make_text_encoder", ["--out", "{tmp}/t5", "--width", "30", "--heads", "4"],
     "need --width a multiple of --heads"),
    ("data_tools.build_shards", ["--out", "{tmp}/b", "--images", "{tmp}", "--pixels"], "has no class sub-folders"),
    ("data_tools.build_shards", ["--out", "{tmp}/b", "--list", "{tmp}/none.txt", "--pixels"],
     "--list {tmp}/none.txt is not a file"),
    ("data_tools.make_synthetic", ["--out", "/proc/synthetic"], "--out '/proc/synthetic' cannot be written"),
]


@pytest.mark.parametrize("module, argv, message", CASES, ids=[c[0].split(".")[1] for c in CASES])
def test_a_bad_input_is_one_line_and_exit_code_2(module, argv, message, tmp_path, capsys, request):
    import importlib
    main = importlib.import_module(module).main
    if "{tiny run}" in argv:                    # the tiny model on the tiny shards (the trainer reads them first)
        from tiny import tiny_overrides
        i = argv.index("{tiny run}")
        argv = argv[:i] + tiny_overrides(request.getfixturevalue("tiny_shards"), "{tmp}/run") + argv[i + 1:]
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message.replace("{tmp}", str(tmp_path)) in err[0], err
    assert not any(tmp_path.iterdir()) or module == "launch.train"     # nothing written (the trainer: its log)


def test_the_output_file_is_checked_before_the_work(tmp_path):
    """check_output_file: what every --out of a result file goes through before sampling, exporting or scoring."""
    from dit_scale.errors import ConfigError
    from dit_scale.cli import IMAGE_SUFFIXES, check_output_file
    assert check_output_file(None, "--out") is None                     # the command's default
    good = tmp_path / "new" / "deeper" / "grid.png"
    assert check_output_file(str(good), "--out", IMAGE_SUFFIXES) == str(good)
    assert good.parent.is_dir() and not any(good.parent.iterdir())      # its folder made, the probe file gone
    with pytest.raises(ConfigError, match=rf"^--out '{tmp_path}' is a directory; give a file name, e\.g\. --out "
                                          rf"{tmp_path}/result\.png\.$"):
        check_output_file(str(tmp_path), "--out", IMAGE_SUFFIXES)
    with pytest.raises(ConfigError, match=r"^--npz 'x\.png' must end with \.npz\.$"):
        check_output_file("x.png", "--npz", (".npz",))
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=rf"^--out '{blocker}/x\.json' cannot be written \(.*\); choose a writable"):
        check_output_file(str(blocker / "x.json"), "--out")             # its folder would be a file
    from dit_scale.cli import check_output_dir
    assert check_output_dir(None, "--out") is None
    assert check_output_dir(str(tmp_path / "to" / "make"), "--out") == str(tmp_path / "to" / "make")
    assert not (tmp_path / "to").exists()                               # the command makes it, after its checks
    with pytest.raises(ConfigError, match=rf"^--out '{blocker}' is a file; give a folder \(it is made if missing\)\.$"):
        check_output_dir(str(blocker), "--out")
    with pytest.raises(ConfigError, match=rf"^--out '{blocker}/sub' cannot be made: {blocker} is a file"):
        check_output_dir(str(blocker / "sub"), "--out")
    with pytest.raises(ConfigError, match=r"^--out '/proc/x/y' cannot be written"):
        check_output_dir("/proc/x/y", "--out")                         # a file system that takes no files


@pytest.mark.parametrize("module, argv", [
    ("launch.sample", ["--run", "{tmp}/none", "--out", "{tmp}"]),
    ("launch.export", ["{tmp}/none", "--out", "{tmp}"]),
    ("launch.evaluate", ["--run-dir", "{tmp}/none", "--out", "{tmp}"]),
    ("launch.probe", ["{tmp}/none", "--out", "{tmp}"]),
    ("launch.plot", ["{tmp}/none", "--out", "{tmp}"]),
], ids=lambda v: v.split(".")[-1] if isinstance(v, str) else None)
def test_an_output_that_cannot_be_written_stops_the_command_before_its_inputs_are_read(module, argv, tmp_path, capsys):
    """The output is checked first: the error names --out, not the missing run that would be read next."""
    import importlib
    main = importlib.import_module(module).main
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --out '{tmp_path}' is a directory"), err


@pytest.mark.parametrize("module, argv, flag", [
    ("launch.evaluate", ["--run-dir", "r", "--num-samples", "0"], "--num-samples"),   # 0 would read as the default
    ("launch.sample", ["--run", "r", "--steps", "0"], "--steps"),
    ("launch.sample", ["--run", "r", "--per-class", "-2"], "--per-class/--per-prompt"),
    ("launch.probe", ["r", "--steps", "two"], "--steps"),
    ("launch.analyze_experts", ["r", "--bins", "0"], "--bins"),
    ("launch.submit", ["--config", "c.yaml", "--run-dir", "r", "--gpus-per-node", "-1"], "--gpus-per-node"),
    ("launch.gpu_check", ["--dry-run", "--warmup", "-1"], "--warmup"),
    ("launch.bench", ["masking", "--steps", "0"], "--steps"),
    ("launch.coord_check", ["--config", "c.yaml", "--widths", "64,abc"], "--widths"),
    ("launch.gpu_check", ["--dry-run", "--batches", "2,0"], "--batches"),
], ids=lambda v: v.split(".")[-1] if isinstance(v, str) and v.startswith("launch.") else None)
def test_a_count_below_its_least_value_is_refused_by_the_parser(module, argv, flag, capsys):
    """Counts are positive (or at least 0) where the parser reads them: `--num-samples 0` used to start the run's
    default 50,000 samples, `--per-class -2` ended in a traceback."""
    import importlib
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("usage: ") and f"error: argument {flag}: must be " in err[-1], err


def test_the_count_types():
    import argparse
    from dit_scale.cli import non_negative_int, positive_int, positive_int_list
    assert positive_int("3") == 3 and non_negative_int("0") == 0 and positive_int_list("64,128") == [64, 128]
    for bad, typ in (("0", positive_int), ("-1", non_negative_int), ("1.5", positive_int), ("", non_negative_int),
                     ("64,", positive_int_list), ("64,-2", positive_int_list)):
        with pytest.raises(argparse.ArgumentTypeError, match="^must be "):
            typ(bad)


def test_a_mask_ratio_without_a_whole_token_budget_is_refused_by_the_masking_bench(capsys):
    """bench.py masking times the token budget too: a ratio whose budget is no whole number of images (0.6 keeps 102
    of 256 tokens) is the config check's sentence, not a budget silently rounded to 204 tokens against 256."""
    from launch.bench import main
    assert main(["masking", "--model", "DiT-S/2", "--ratio", "0.6"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mask.ratio=0.6 keeps 102 of 256 tokens" in err[0] and "mask.ratio=0.75" in err[0], err
