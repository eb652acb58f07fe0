import argparse
import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest

from dalle.cli import main
from dalle.commands import pipeline
from dalle.commands.pipeline import PipelineConfig
from dalle.config import from_args

TINY = ["--dvae-steps", "2", "--dvae-batch-size", "4", "--size", "16", "--vocab-size", "300", "--reranker-steps", "2",
        "--reranker-batch-size", "4", "--prior-steps", "2", "--prior-batch-size", "4",
        "--resolution", "32", "--dvae-preset", "tiny-32",
        "--eval-captions", "2", "--eval-candidates", "2", "--eval-real-images", "4", "--eval-features", "reranker"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One complete tiny pipeline run (every test below copies it before changing it) and what it printed."""
    out = tmp_path_factory.mktemp("pipeline") / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["pipeline", "--out", str(out), *TINY]) == 0
    return out, printed.getvalue()


def copy_of(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    return out


def test_pipeline_runs_every_stage_and_ends_with_the_report(finished):
    out, first = finished
    assert "[1/6] text tokenizer: running" in first and "[5/6] reranker: finished" in first
    assert "[6/6] generation + evaluation report: finished" in first
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert (out / "dvae" / "model" / "config.json").is_file()
    assert (out / "reranker" / "model" / "config.json").is_file()
    assert (out / "prior" / "model" / "model.safetensors").is_file()
    for split in ("train", "val", "heldout"):
        assert json.loads((out / "cache" / split / "meta.json").read_text())["complete"]
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["counts"]["candidates"] == 2 and metrics["counts"]["captions"]["heldout"] == 2
    # The end of the output says where the report is and gives the headline numbers.
    tail = first.split("All stages are done")[1]
    assert f"report: {out / 'eval' / 'report.html'}" in tail
    assert f"dalle serve --run {out}" in tail
    assert "Fréchet distance (our reranker's image encoder features)" in tail and "compositional accuracy" in tail
    assert "FID" not in first
    # Every training stage ran at the precision the pipeline resolved for this machine.
    amp = PipelineConfig().amp_args()[1]
    for stage in ("dvae", "prior", "reranker"):
        assert json.loads((out / stage / "config.json").read_text())["train"]["amp"] == amp
    assert metrics["sampling_precision"] == {"bf16": "bf16", "none": "fp32"}[amp]


@pytest.mark.parametrize("given, native, expected", [("auto", True, "bf16"), ("auto", False, "none"),
                                                     ("none", True, "none"), ("bf16", False, "bf16")])
def test_pipeline_amp_auto_is_bf16_only_where_the_hardware_has_it(monkeypatch, given, native, expected):
    monkeypatch.setattr(pipeline, "native_bf16", lambda device: native)
    cfg = PipelineConfig(amp=given)
    assert cfg.amp_args() == ["--amp", expected]
    trained = [s for s in pipeline.STAGES if s.name in ("dVAE", "prior", "reranker")]
    assert len(trained) == 3
    for stage in trained:
        argv = stage.argv(cfg)[0]
        assert argv[argv.index("--amp") + 1] == expected
    (evaluation,) = [s for s in pipeline.STAGES if s.name.startswith("generation")]
    argv = evaluation.argv(cfg)[0]
    assert argv[argv.index("--precision") + 1] == {"bf16": "bf16", "none": "fp32"}[expected]  # sampling follows


def test_pipeline_skips_finished_stages_and_still_prints_the_summary(finished, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    assert main(["pipeline", "--out", str(out), *TINY]) == 0
    again = capsys.readouterr().out
    assert again.count("done already, skipping") == 6 and "running" not in again
    assert f"report: {out / 'eval' / 'report.html'}" in again and "Fréchet distance" in again
    assert "note: changed" not in again  # the run moved to another folder: not a change of settings
    # A new value for a finished stage is not silently ignored.
    assert main(["pipeline", "--out", str(out), *TINY, "--prior-steps", "3", "--data-max-aspect-ratio", "3"]) == 0
    note = capsys.readouterr().out
    assert "note: changed since the last run" in note and "--prior-steps (2 → 3)" in note
    assert "the --data-* options ([] → [" in note and "delete a stage's folder" in note


def test_pipeline_resumes_an_interrupted_cache(finished, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    meta = out / "cache" / "val" / "meta.json"
    unfinished = json.loads(meta.read_text()) | {"complete": False}
    meta.write_text(json.dumps(unfinished))  # as if the val encode had been killed before finishing
    assert main(["pipeline", "--out", str(out), *TINY]) == 0
    again = capsys.readouterr().out
    assert "[1/6] text tokenizer: done already" in again and "[2/6] dVAE: done already" in again
    assert "[3/6] token cache: running" in again and json.loads(meta.read_text())["complete"]


def test_pipeline_redoes_an_interrupted_evaluation_only(finished, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    (out / "eval" / "metrics.json").unlink()  # killed while writing the report: metrics.json comes last
    assert main(["pipeline", "--out", str(out), *TINY]) == 0
    again = capsys.readouterr().out
    assert again.count("done already, skipping") == 5
    assert "[6/6] generation + evaluation report: running" in again and "$ dalle eval --run" in again
    assert (out / "eval" / "metrics.json").is_file() and (out / "eval" / "report.html").is_file()


def test_pipeline_bad_option_is_a_clean_error(tmp_path, capsys):
    assert main(["pipeline", "--out", str(tmp_path), "--dvae-steps", "0"]) == 2
    assert "dvae_steps" in capsys.readouterr().err
    assert main(["pipeline", "--out", str(tmp_path), "--eval-features", "inception"]) == 2
    assert "inception_weights" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # argparse's own one-line "invalid choice"
        main(["pipeline", "--out", str(tmp_path), "--amp", "fp8"])
    assert exit_.value.code == 2 and "--amp" in capsys.readouterr().err


def _stage_argv(cli_args: list[str]) -> dict[str, list[list[str]]]:
    """Each stage's commands for a pipeline command line, without running any."""
    from dalle.cli import build_parser
    from dalle.config import given_as_argv
    from dalle.data.config import DataConfig

    args = build_parser().parse_args(["pipeline", *cli_args])
    cfg = from_args(PipelineConfig, args, data_options=tuple(given_as_argv(args, DataConfig, "data_",
                                                                            pipeline.PIPELINE_DATA)))
    return {stage.name: stage.argv(cfg) for stage in pipeline.STAGES}


def test_pipeline_hands_data_options_to_every_stage_that_reads_data():
    argv = _stage_argv(["--dataset", "coco/captions_train2017.json", "--data-image-root", "coco/train2017",
                        "--data-max-aspect-ratio", "2", "--data-crop", "random",
                        "--data-shapes-heldout", "red circle", "blue square"])
    given = ["--data-crop", "random", "--data-image-root", "coco/train2017", "--data-max-aspect-ratio", "2.0",
             "--data-shapes-heldout", "red circle", "blue square"]
    readers = {"text tokenizer": 1, "dVAE": 1, "token cache": 2, "reranker": 1}  # no held-out split for COCO
    for name, n in readers.items():
        assert len(argv[name]) == n
        for command in argv[name]:
            tail = command[command.index("--data-source"):]
            assert tail[1] == "coco/captions_train2017.json"
            assert tail[-len(given):] == given, (name, tail)
    # The prior reads the token cache and the evaluation the cache's recorded data options: neither gets them.
    assert not any("--data-crop" in c for c in argv["prior"] + argv["generation + evaluation report"])
    # The same options parsed back build the same data config the stage would use.
    from dalle.config import add_options
    from dalle.data.config import DataConfig

    parser = argparse.ArgumentParser()
    add_options(parser, DataConfig, prefix="data_")
    data = from_args(DataConfig, parser.parse_args(argv["dVAE"][0][argv["dVAE"][0].index("--data-source"):]), "data_")
    assert data.image_root == Path("coco/train2017") and data.max_aspect_ratio == 2.0 and data.crop == "random"
    assert data.shapes_heldout == ("red circle", "blue square")


def test_pipeline_prior_size_options_reach_dalle_train():
    prior = _stage_argv(["--prior-dim", "128", "--prior-layers", "2", "--prior-heads", "4", "--prior-lr", "3e-4"])
    command = prior["prior"][0]
    for flag, value in (("--dim", "128"), ("--n-layers", "2"), ("--n-heads", "4"), ("--lr", "0.0003")):
        assert command[command.index(flag) + 1] == value
    wide = _stage_argv(["--prior-dim", "512"])["prior"][0]  # heads follow the width: 16 heads of 32
    assert wide[wide.index("--n-heads") + 1] == "16"
    default = _stage_argv([])["prior"][0]
    assert not {"--dim", "--n-layers", "--n-heads", "--lr"} & set(default)


def test_pipeline_time_budget_gives_each_training_stage_its_share_as_a_time_limit():
    from dalle.cli import build_parser

    argv = _stage_argv(["--time-budget", "1000"])
    shares = {"dVAE": 360.0, "prior": 390.0, "reranker": 80.0}
    for name, seconds in shares.items():
        args = build_parser().parse_args(argv[name][0])  # the stage's own command accepts what it is handed
        assert args.time_limit == seconds
    others = ["text tokenizer", "token cache", "generation + evaluation report"]
    assert not any("--time-limit" in command for name in others for command in argv[name])
    assert not any("--time-limit" in command for commands in _stage_argv([]).values() for command in commands)


def test_pipeline_prior_evaluates_four_times_in_its_run():
    from dalle.cli import build_parser

    for steps, every in (("1600", 400), ("1000", 250), ("1601", 401)):
        args = build_parser().parse_args(_stage_argv(["--prior-steps", steps])["prior"][0])
        assert args.eval_every == every


def test_pipeline_images_take_the_dvae_presets_size_unless_given(tmp_path, capsys):
    def resolution(argv):
        return {cmd[cmd.index("--data-resolution") + 1] for cmds in _stage_argv(argv).values() for cmd in cmds
                if "--data-resolution" in cmd}

    assert resolution([]) == {"64"}  # tiny-64
    assert resolution(["--dvae-preset", "tiny-48"]) == {"48"}  # `make demo`'s: 12×12 codes
    assert resolution(["--dvae-preset", "tiny-48", "--resolution", "96"]) == {"96"}
    assert main(["pipeline", "--out", str(tmp_path), "--dvae-preset", "tiny-7"]) == 2
    assert "unknown dVAE preset 'tiny-7'" in capsys.readouterr().err


def test_pipeline_keeps_its_own_data_options_to_itself(tmp_path, capsys):
    # The pipeline sets each stage's split and seed itself: a --data-split would contradict it.
    with pytest.raises(SystemExit) as exit_:
        main(["pipeline", "--out", str(tmp_path), "--data-split", "val"])
    assert exit_.value.code == 2 and "--data-split" in capsys.readouterr().err
    assert main(["pipeline", "--out", str(tmp_path), "--prior-layers", "0"]) == 2
    assert "prior_layers" in capsys.readouterr().err
    assert main(["pipeline", "--out", str(tmp_path), "--data-max-aspect-ratio", "0.5"]) == 2
    assert "max_aspect_ratio" in capsys.readouterr().err


def test_pipeline_runs_on_a_users_folder_of_captioned_images(tmp_path, capsys):
    """A dataset the project has never seen: odd sizes and modes, a missing caption and a broken file are skipped,
    there is no held-out split, and the report is still written (without the shapes checker's accuracy)."""
    import numpy as np
    from PIL import Image

    data = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for i in range(24):
        folder = data / f"album{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)
        Image.fromarray(pixels).convert("L" if i % 3 == 0 else "RGB").save(folder / f"p{i}.png")
        (folder / f"p{i}.txt").write_text(f"Photo number {i} of a {'cat' if i % 2 else 'dog'}\n")
    (data / "album0" / "uncaptioned.png").write_bytes((data / "album0" / "p0.png").read_bytes())
    (data / "album1" / "broken.png").write_bytes(b"not a png")
    (data / "album1" / "broken.txt").write_text("a broken file")
    out = tmp_path / "run"
    tiny = [a for a in TINY if a not in ("--size", "16")]
    # 25 records and the default 2% for validation: no record hashes into val, which is said before any training.
    assert main(["pipeline", "--out", str(out), "--dataset", str(data), *tiny]) == 2
    err = capsys.readouterr().err
    assert "validation split" in err and "--val-fraction" in err and "Traceback" not in err
    assert not (out / "dvae").exists()
    assert main(["pipeline", "--out", str(out), "--dataset", str(data), "--val-fraction", "0.3", *tiny,
                 "--data-max-aspect-ratio", "3", "--prior-dim", "32", "--prior-layers", "1", "--prior-heads", "2"]) == 0
    printed = capsys.readouterr().out
    assert "--data-val-fraction 0.3" in printed
    for split in ("train", "val"):
        assert json.loads((out / "cache" / split / "meta.json").read_text())["data"]["max_aspect_ratio"] == 3.0
    prior = json.loads((out / "prior" / "model" / "config.json").read_text())
    assert (prior["dim"], prior["n_layers"], prior["n_heads"]) == (32, 1, 2)
    assert "missing caption" in printed and "not an image" in printed
    assert not (out / "cache" / "heldout").exists()
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert "heldout" not in metrics["counts"]["captions"] and (out / "eval" / "report.html").is_file()
    assert "All stages are done" in printed
