"""`attnlab softpag` and `attnlab eraser` end to end on the embedded tiny models (in-process, 2 steps, small sizes)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from attnlab.cli import build_parser, main
from attnlab.images import centred_mask

SP_KEYS = {"method", "model", "family", "native_size", "call", "seed", "heads", "heads_given", "preset", "effect",
           "extra_passes", "seconds", "files"}
ER_KEYS = {"method", "model", "family", "inpaint_pipeline", "image", "mask", "prompt", "eraser_prompt", "size", "seed",
           "steps", "guidance", "effect", "extra_passes", "seconds", "files"}


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def _code(argv):
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own errors
        return e.code


def test_softpag_cli_writes_off_on_compare_and_params(tmp_path, capsys):
    out = tmp_path / "sp"
    argv = ["softpag", "--model", "tiny-sd3", "--steps", "2", "--height", "32", "--width", "32", "--u", "0.7",
            "--target", "uniform", "--joint", "full", "--guidance", "3", "--seed", "3", "--out", str(out)]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out.split("\nwrote ")[0])
    assert printed["heads"] == "L1:*" and printed["extra_passes"] == 2
    for name in ("off.png", "on.png", "compare.png", "params.json"):
        assert (out / name).is_file()
    params = json.loads((out / "params.json").read_text())
    assert SP_KEYS <= set(params)
    assert params["heads"] == "L1:*" and params["heads_given"] is None  # default: the middle joint layer
    assert params["effect"] == {"scale": 3.0, "u": 0.7, "target": "uniform", "joint": "full"}
    assert params["call"]["num_inference_steps"] == 2 and params["call"]["height"] == 32
    assert params["call"]["guidance_scale"] == 3.0 and params["seed"] == 3
    assert params["extra_passes"] == 2 and set(params["seconds"]) == {"stock", "softpag"}
    off, on = _pixels(out / "off.png"), _pixels(out / "on.png")
    assert off.shape == on.shape == (32, 32, 3) and not np.array_equal(off, on)
    assert Image.open(out / "compare.png").width == 3 * Image.open(out / "compare.png").height - 3 * 18


def test_softpag_cli_unet_blocks_resolve(tmp_path, capsys):
    out = tmp_path / "sp"
    assert main(["softpag", "--model", "tiny-sd15", "--heads", "m0", "--steps", "1", "--height", "32", "--width",
                 "32", "--guidance", "1", "--out", str(out)]) == 0
    params = json.loads((out / "params.json").read_text())
    assert params["heads_given"] == "m0" and params["heads"] == "L2:*"  # the tiny SD1.5 mid block is layer 2
    assert params["extra_passes"] == 1
    assert not np.array_equal(_pixels(out / "off.png"), _pixels(out / "on.png"))


@pytest.mark.parametrize("heads, message", [
    ("L9:*", "layer 9 is out of range"),
    ("L1:H99", "head 99 is out of range for layer 1"),
    ("L0:Hx", "cannot read head"),
    ("m0", "UNet blocks"),
    ("  ", "--heads: empty head set"),
])
def test_softpag_cli_bad_heads(tmp_path, capsys, heads, message):
    out = tmp_path / "sp"
    assert _code(["softpag", "--model", "tiny-sd3", "--heads", heads, "--steps", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "attnlab softpag: " in err and message in err
    assert not (out / "params.json").exists()


def test_eraser_cli_generated_input_and_default_mask(tmp_path, capsys):
    out = tmp_path / "er"
    assert main(["eraser", "--model", "tiny-sd15", "--steps", "2", "--strength", "1.0", "--height", "32", "--width",
                 "32", "--ss-steps", "1", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out.split("\nwrote ")[0])
    assert printed["extra_passes"] == {"plain": 0, "erased": 2}
    for name in ("input.png", "mask.png", "plain.png", "erased.png", "compare.png", "params.json"):
        assert (out / name).is_file()
    params = json.loads((out / "params.json").read_text())
    assert ER_KEYS <= set(params)
    assert params["image"] == "generated" and params["size"] == [32, 32]
    assert params["effect"]["sarg_scale"] == 9.0 and params["effect"]["ss_scale"] == 0.3
    assert params["effect"]["ss_steps"] == 1 and params["effect"]["strength"] == 1.0 and params["effect"]["mode"] == "sip"
    mask = np.asarray(Image.open(out / "mask.png")) > 127
    assert mask.sum() == 16 * 16 and mask[8:24, 8:24].all()  # centred, 1/4 of the area
    plain, erased = _pixels(out / "plain.png"), _pixels(out / "erased.png")
    assert plain.shape == erased.shape == (32, 32, 3) and not np.array_equal(plain, erased)


def test_eraser_cli_given_image_and_mask(tmp_path, capsys):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (4, 4, 14, 20))
    mask.save(tmp_path / "m.png")
    out = tmp_path / "er"
    assert main(["eraser", "--model", "tiny-sd15", "--image", str(tmp_path / "in.png"), "--mask",
                 str(tmp_path / "m.png"), "--steps", "2", "--strength", "1.0", "--scale", "3", "--out", str(out)]) == 0
    params = json.loads((out / "params.json").read_text())
    assert params["image"].endswith("in.png") and params["mask"].endswith("m.png") and params["prompt"] is None
    assert params["effect"]["sarg_scale"] == 3.0 and params["extra_passes"]["erased"] == 2
    assert np.array_equal(_pixels(out / "input.png"), _pixels(tmp_path / "in.png"))
    assert np.array_equal(np.asarray(Image.open(out / "mask.png")), np.asarray(mask))


@pytest.mark.parametrize("extra, message", [
    (["--image", "/no/such.png"], "argument --image: no such file: '/no/such.png'"),
    (["--strength", "0"], "argument --strength: must be a finite number in (0, 1]; got 0"),
    (["--scale", "-1"], "argument --scale: must be a finite number in [0, 100]; got -1"),
    (["--model", "tiny-nope"], "unknown tiny model"),
    (["--model", "tiny-flux", "--mode", "dip"], "UNet pipelines"),
])
def test_eraser_cli_bad_inputs(tmp_path, capsys, extra, message):
    out = tmp_path / "er"
    assert _code(["eraser", "--steps", "1", "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert "attnlab eraser: " in err and message in err
    assert not (out / "params.json").exists()


def test_centred_mask_is_a_quarter():
    m = np.asarray(centred_mask(40, 24)) > 0
    assert m.sum() == 20 * 12 and m[6:18, 10:30].all()


@pytest.mark.parametrize("command, options", [
    ("softpag", ["--heads", "--preset", "--scale", "--u", "--target", "--joint", "--guidance", "--steps", "--seed",
                 "--height", "--width", "--out"]),
    ("eraser", ["--image", "--mask", "--scale", "--ss-scale", "--ss-steps", "--strength", "--steps", "--mode",
                "--seed", "--out", "--prompt"]),
    ("refam", ["--image", "--expression", "--caption", "--noise", "--layers", "--map-mode", "--gas-mode", "--magnets",
               "--keep-stopwords", "--threshold", "--blur", "--resize", "--eval", "--seed", "--out"]),
])
def test_help(capsys, command, options):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for option in options:
        assert option in text
    assert "default" in text and "%(default)" not in text


def test_softpag_cli_preset_and_joint_image(tmp_path, capsys):
    # a shipped preset is checked against the model: SD3-medium layers 7-10 do not exist in the 3-layer tiny SD3
    assert _code(["softpag", "--model", "tiny-sd3", "--preset", "sd3-medium-layers-7-10", "--steps", "1",
                  "--out", str(tmp_path / "a")]) == 2
    assert "layer 7 is out of range" in capsys.readouterr().err
    # explicit --heads override the preset; joint='image' with the identity target
    out = tmp_path / "b"
    assert main(["softpag", "--model", "tiny-sd3", "--preset", "sd3-medium-layers-7-10", "--heads", "L0:H0",
                 "--joint", "image", "--steps", "1", "--height", "32", "--width", "32", "--out", str(out)]) == 0
    params = json.loads((out / "params.json").read_text())
    assert params["heads"] == "L0:H0" and params["preset"] == "sd3-medium-layers-7-10"
    assert params["effect"]["joint"] == "image" and params["extra_passes"] == 1


def test_refam_cli_toy_scene_and_given_image(tmp_path, capsys):
    out = tmp_path / "a"
    assert _code(["refam", "--model", "tiny-sd15", "--out", str(out)]) == 0
    report = json.loads((out / "params.json").read_text())
    assert report["method"] == "refam" and report["family"] == "unet" and report["words"]
    assert report["prompt"].startswith(report["expression"])
    for name in report["files"].values():
        assert (out / name).is_file()
    assert Image.open(out / "mask.png").size == (64, 64) and 0 < report["mask_fraction"] < 1
    img = tmp_path / "in.png"
    Image.fromarray(np.full((61, 64, 3), 128, np.uint8)).save(img)
    assert _code(["refam", "--model", "tiny-flux", "--image", str(img), "--expression", "the grey square", "--out",
                  str(out)]) == 2
    assert "not a multiple of" in capsys.readouterr().err
    assert _code(["refam", "--model", "tiny-flux", "--image", str(img), "--expression", "the grey square", "--resize",
                  "--noise", "0.3,0.6", "--layers", "1-2", "--magnets", "", "--out", str(out)]) == 0
    report = json.loads((out / "params.json").read_text())
    assert report["layers"] == [1, 2] and report["prompt"] == "the grey square" and report["seconds"]["forwards"] == 2
    assert Image.open(out / "mask.png").size == (64, 61)
    assert _code(["refam", "--expression", " ", "--out", str(out)]) == 2
    assert "argument --expression: must not be empty" in capsys.readouterr().err
    assert _code(["refam", "--noise", "x", "--out", str(out)]) == 2


def test_refam_cli_eval_table(tmp_path, capsys):
    out = tmp_path / "e"
    assert _code(["refam", "--model", "tiny-sd15", "--eval", "1", "--out", str(out)]) == 0
    report = json.loads((out / "params.json").read_text())
    names = [r["variant"] for r in report["eval"]]
    assert names[0] == "default" and "no magnets" in names and all(0 <= r["mIoU"] <= 1 for r in report["eval"])
    assert all(0 <= r["pointing"] <= 1 and 0 < r["pointing_chance"] < 1 for r in report["eval"])
    assert (out / "eval.md").read_text().startswith("| variant |")


def test_bench_runs_landed_methods_and_skips_the_rest(tmp_path, capsys):
    out = tmp_path / "b"
    assert _code(["bench", "--model", "tiny-sd15", "--n", "1", "--steps", "2", "--methods", "refam,eraser,freeswim",
                  "--out", str(out)]) in (0,)
    data = json.loads((out / "bench.json").read_text())
    by = {(r["method"], r.get("metric")) for r in data["rows"]}
    assert ("refam", "mIoU") in by and ("eraser", "PSNR in the mask vs the scene without the object (dB)") in by
    text = capsys.readouterr().out
    assert "| refam | mIoU |" in text
    assert _code(["bench", "--methods", "nope"]) == 2


def test_bench_eraser_options_reach_the_eraser_run_only():
    from attnlab.loading import load_model
    from attnlab.toyworld.bench import Bench, bench_eraser

    bench = Bench(load_model("tiny-sd15", "cpu", progress_bar=False), 1, 2, 0)
    as_plain = bench_eraser(bench, {"sarg_scale": 0.0})  # the "on" run made plain inpainting: off == on
    assert all(r["off"] == r["on"] for r in as_plain)
    default = bench_eraser(bench)
    assert [r["off"] for r in default] == [r["off"] for r in as_plain]
    assert any(r["off"] != r["on"] for r in default)
