"""Hostile input to `attnlab` (and `attnlab bench` / `attnlab demo`): exit code 2, one line on stderr that names the
option, no traceback, and no work done: options are checked before any model is loaded; what only the model can
tell (its size multiple, its layers) is checked before any denoiser forward. Internal errors keep their traceback.
Every shipped tiny model runs at its default size."""

from __future__ import annotations

import json

import pytest

from attnlab import loading
from attnlab.cli import main
from attnlab.processors.host_diffusers import denoisers_of


@pytest.fixture
def work(monkeypatch):
    """Counts model loads and denoiser forwards of everything main() loads."""
    counts = {"loads": 0, "forwards": 0}
    load_pipe = loading._load_pipe

    def counting_load(name, dtype):
        pipe = load_pipe(name, dtype)
        counts["loads"] += 1
        for denoiser in denoisers_of(pipe):
            denoiser.register_forward_pre_hook(lambda *_: counts.__setitem__("forwards", counts["forwards"] + 1))
        return pipe

    monkeypatch.setattr(loading, "_load_pipe", counting_load)
    return counts


def _exit_code(argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own exit
        return e.code


def _unwritable_folder(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    return str(blocker / "out")


# (argv without --out, the option the message must name); all fail while parsing, before any model is loaded
PARSE_ERRORS = [
    # zero, negative, NaN, infinity, huge
    (["entropy", "--steps", "0"], "--steps"),
    (["entropy", "--height", "-64"], "--height"),
    (["entropy", "--width", "1000000"], "--width"),
    (["entropy", "--steps", "1000000000"], "--steps"),
    (["entropy", "--strength", "nan"], "--strength"),
    (["entropy", "--strength", "5"], "--strength"),
    (["entropy", "--train-size", "0x64"], "--train-size"),
    (["entropy", "--frames", "4"], "--frames"),
    (["softpag", "--guidance", "nan"], "--guidance"),
    (["softpag", "--u", "inf"], "--u"),
    (["softpag", "--u", "0"], "--u"),
    (["softpag", "--scale", "-1"], "--scale"),
    (["softpag", "--seed", "-1"], "--seed"),
    (["eraser", "--ss-scale", "0"], "--ss-scale"),
    (["eraser", "--ss-steps", "-2"], "--ss-steps"),
    (["eraser", "--strength", "1.5"], "--strength"),
    (["eraser", "--scale", "inf"], "--scale"),
    (["refam", "--eval", "-1"], "--eval"),
    (["refam", "--noise", "1.5"], "--noise"),
    (["refam", "--noise", "nan"], "--noise"),
    (["refam", "--blur", "-1"], "--blur"),
    (["refam", "--size", "0"], "--size"),
    (["headhunter", "--top-k", "0"], "--top-k"),
    (["headhunter", "--rounds", "-3"], "--rounds"),
    (["headhunter", "--threads", "0"], "--threads"),
    (["headhunter", "--max-candidates", "0"], "--max-candidates"),
    (["headhunter", "--size", "0"], "--size"),
    (["headhunter", "--cfg", "-inf"], "--cfg"),
    # wrong types
    (["refam", "--layers", "abc"], "--layers"),
    (["refam", "--layers", "5-2"], "--layers"),
    (["headhunter", "--seeds", "x"], "--seeds"),
    (["entropy", "--seed", "1.5"], "--seed"),
    (["entropy", "--steps", "four"], "--steps"),
    # empty strings
    (["entropy", "--model", ""], "--model"),
    (["softpag", "--heads", ""], "--heads"),
    (["softpag", "--preset", " "], "--preset"),
    (["refam", "--expression", ""], "--expression"),
    (["refam", "--noise", ""], "--noise"),
    (["headhunter", "--objective", ""], "--objective"),
    # names and paths that do not exist
    (["entropy", "--model", "tiny-nope"], "--model"),
    (["entropy", "--model", "toy-nope"], "--model"),
    (["entropy", "--model", "/no/such/folder"], "--model"),
    (["eraser", "--image", "/no/such.png"], "--image"),
    (["eraser", "--mask", "/no/such.png"], "--mask"),
    (["refam", "--image", "/no/such.png"], "--image"),
    # devices this machine does not have
    (["entropy", "--device", "banana"], "--device"),
    (["entropy", "--device", "cuda:99"], "--device"),
]


@pytest.mark.parametrize("argv, option", PARSE_ERRORS, ids=[" ".join(a) for a, _ in PARSE_ERRORS])
def test_bad_option_fails_while_parsing(tmp_path, capsys, work, argv, option):
    out = tmp_path / "out"
    assert _exit_code([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"attnlab {argv[0]}: argument {option}: "), err
    assert "Traceback" not in err
    assert work == {"loads": 0, "forwards": 0}
    assert not out.exists()


def test_missing_cuda_is_a_usage_error(capsys, work):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert _exit_code(["entropy", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attnlab entropy: argument --device: 'cuda': this torch has no CUDA device")
    assert "Traceback" not in err
    assert work["loads"] == 0


@pytest.mark.parametrize("where", ["a file", "inside a file", "read-only"])
def test_unwritable_out_fails_while_parsing(tmp_path, capsys, work, where):
    if where == "a file":
        out = tmp_path / "f"
        out.write_text("")
    elif where == "inside a file":
        out = _unwritable_folder(tmp_path)
    else:
        out = "/proc/attnlab-out"  # not writable, not even by root
    assert _exit_code(["softpag", "--model", "tiny-sd15", "--steps", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("attnlab softpag: argument --out: ") and "Traceback" not in err
    assert work["loads"] == 0


@pytest.mark.parametrize("argv, option", [
    (["bench", "--n", "0"], "--n"),
    (["bench", "--steps", "nan"], "--steps"),
    (["bench", "--methods", "nope"], "--methods"),
    (["bench", "--model", "tiny-nope"], "--model"),
    (["bench", "--device", "cuda:99"], "--device"),
    (["demo", "--port", "70000"], "--port"),
    (["demo", "--port", "x"], "--port"),
    (["demo", "--device", "banana"], "--device"),
])
def test_bench_and_demo_options(capsys, work, argv, option):
    assert _exit_code(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"attnlab {argv[0]}: argument {option}: "), err
    assert work["loads"] == 0


# checks that need the model (its size multiple, its layers, the image): after loading, before any forward
MODEL_ERRORS = [
    (["entropy", "--model", "tiny-sd15", "--height", "36"], "--height/--width 36x128"),
    (["softpag", "--model", "tiny-wan", "--width", "120"], "--height/--width 128x120"),
    (["softpag", "--model", "tiny-sd3", "--heads", "L9:*"], "layer 9 is out of range"),
]


@pytest.mark.parametrize("argv, message", MODEL_ERRORS, ids=[" ".join(a) for a, _ in MODEL_ERRORS])
def test_model_dependent_errors_come_before_any_forward(tmp_path, capsys, work, argv, message):
    assert _exit_code([*argv, "--steps", "1", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith(f"attnlab {argv[0]}: ")]
    assert len(ours) == 1 and message in ours[0] and "Traceback" not in err
    assert work["loads"] == 1 and work["forwards"] == 0


def test_image_checks_come_before_loading(tmp_path, capsys, work):
    not_an_image = tmp_path / "x.png"
    not_an_image.write_text("text")
    assert _exit_code(["eraser", "--image", str(not_an_image), "--out", str(tmp_path / "o")]) == 2
    assert "attnlab eraser: --image " in capsys.readouterr().err
    assert _exit_code(["refam", "--image", str(not_an_image), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith("attnlab refam: --expression: ")
    assert work["loads"] == 0


def test_internal_errors_keep_their_traceback(tmp_path, monkeypatch):
    """A bug (here: a KeyError, and a ValueError that escapes from a library) is not dressed up as a usage error."""
    def broken(*args, **kwargs):
        raise KeyError("bug")

    monkeypatch.setattr(loading, "_load_pipe", broken)
    with pytest.raises(KeyError):
        main(["entropy", "--steps", "1", "--out", str(tmp_path / "o")])

    def library_value_error(*args, **kwargs):
        return json.loads("{")  # json.JSONDecodeError is a ValueError raised outside attnlab

    monkeypatch.setattr(loading, "_load_pipe", library_value_error)
    with pytest.raises(ValueError):
        main(["entropy", "--steps", "1", "--out", str(tmp_path / "o")])


def test_user_error_sorting():
    from attnlab.processors.params import InvalidParameter
    from attnlab.user_errors import is_user_error

    def raised(fn):
        try:
            fn()
        except Exception as err:  # noqa: BLE001
            return err

    def attnlab_raise():
        raise ValueError("a message of attnlab's own")

    assert is_user_error(raised(attnlab_raise))
    assert is_user_error(InvalidParameter("x"))
    assert is_user_error(raised(lambda: open("/no/such/file")))
    assert not is_user_error(raised(lambda: int("x")))  # a ValueError from Python, not a raise in attnlab
    assert not is_user_error(raised(lambda: {}["k"]))
    assert not is_user_error(raised(lambda: 1 / 0))


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sdxl", "tiny-sd3", "tiny-flux", "tiny-pixart", "tiny-wan"])
def test_every_tiny_model_loads_with_its_own_defaults(model):
    from attnlab.models.tiny import default_size

    loaded = loading.load_model(model)
    assert loaded.size == default_size(model[len("tiny-"):])
    assert loaded.frames == (5 if model == "tiny-wan" else None)
    assert loaded.size[0] % loaded.size_multiple == 0
    assert loaded.default_heads


@pytest.mark.parametrize("name", ["sd", "flux"])
def test_toy_models_load_with_their_evaluated_defaults(name):
    from attnlab.toyworld.models import available_toy_models, toy_call_kwargs

    if name not in available_toy_models():
        pytest.skip(f"toy-{name} weights are not installed")
    loaded = loading.load_model(f"toy-{name}")
    kw = toy_call_kwargs(name)
    assert loaded.size == (kw["height"], kw["width"]) and loaded.frames is None
    assert loaded.size[0] % loaded.size_multiple == 0
    assert loaded.call_kwargs == {k: kw[k] for k in ("max_sequence_length",) if k in kw}


@pytest.mark.parametrize("command", ["softpag", "entropy"])
def test_tiny_wan_runs_at_its_default_size(tmp_path, capsys, command):
    """Used to crash: the default size was real Wan's 480x832, beyond the tiny model's RoPE table."""
    out = tmp_path / command
    assert main([command, "--model", "tiny-wan", "--steps", "1", "--guidance", "1", "--out", str(out)]) == 0
    params = json.loads((out / "params.json").read_text())
    factor = 2 if command == "entropy" else 1
    assert params["call"]["height"] == params["call"]["width"] == 128 * factor
    assert params["call"]["num_frames"] == 5 and params["native_size"] == [5, 128, 128]
