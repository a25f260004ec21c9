"""Recipe study for the toy models (issue 15): short runs, each scored on a fixed held-out set as it trains.

    python -m attnlab.toyworld.recipe vae --name vae2x --factor 2 --latent-channels 4 --steps 1500
    python -m attnlab.toyworld.recipe plot --out docs/images/toy_recipe_vae.png out/recipe/vae*.json

Every run writes ``out/recipe/<name>.json``: its settings, wall time and a learning curve (one score row per
checkpoint). The VAE rows are :func:`evaluate.vae_ceiling` on 100 + 100 validation scenes (seeds 500 000 and
up: never trained on, and not the evaluation's seeds 0-199, so choosing a recipe does not tune the test set).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

from . import train as T
from .evaluate import vae_ceiling

VALIDATION_SEED_BASE = 500_000
STUDY_DIR = T.REPO_ROOT / "out" / "recipe"


def run_vae(name: str, *, factor: int, latent_channels: int, steps: int, batch: int, lr: float, kl_weight: float,
            size: int, threads: int, eval_every: int, n_val: int = 100, resume: bool = False,
            object_weight: float = 1.0, init: str | None = None, study_dir: Path = STUDY_DIR,
            tiny: bool = False) -> dict:
    import diffusers

    torch.set_num_threads(threads)
    study_dir = Path(study_dir)
    state = study_dir / name
    state.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(**T.vae_spec(size, factor, latent_channels, tiny=tiny))
    if init:  # warm start from another study run's weights (a new schedule, a new optimiser)
        vae.load_state_dict(torch.load(study_dir / init / "vae_weights.pt", map_location="cpu"))
    rec = {"name": name, "kind": "vae", "factor": factor, "latent_channels": latent_channels, "steps": steps,
           "batch": batch, "lr": lr, "kl_weight": kl_weight, "object_weight": object_weight, "init": init,
           "size": size, "threads": threads,
           "params_M": sum(p.numel() for p in vae.parameters()) / 1e6, "curve": []}
    t0 = time.time()
    prev = study_dir / f"{name}.json"
    if resume and prev.exists():  # a longer schedule continues the same curve (its rows keep their wall time)
        old = json.loads(prev.read_text())
        rec["curve"], rec["resumed_from_steps"] = old["curve"], old["steps"]
        t0 -= old["curve"][-1]["wall_s"] if old["curve"] else 0.0

    def score(step, model):
        c = vae_ceiling(model, n=n_val, seed_base=VALIDATION_SEED_BASE, size=size)
        row = {"step": step, "wall_s": round(time.time() - t0, 1),
               **{k: c[k] for k in ("objects_medium_large", "single_colour_shape", "two_object_both",
                                    "background_style")}}
        rec["curve"].append(row)
        print(f"[{name}] {row}", flush=True)
        (study_dir / f"{name}.json").write_text(json.dumps(rec, indent=2) + "\n")
        torch.save(model.state_dict(), state / "vae_weights.pt")

    T.train_vae(vae, steps=steps, batch=batch, size=size, device="cpu", state_dir=state, resume=resume, seed=0,
                lr=lr, ckpt_every=eval_every, kl_weight=kl_weight, on_checkpoint=score, object_weight=object_weight)
    rec["wall_s"] = round(time.time() - t0, 1)
    (study_dir / f"{name}.json").write_text(json.dumps(rec, indent=2) + "\n")
    return rec


def save_vae_folder(name: str, folder: Path, *, factor: int, latent_channels: int, size: int = T.IMAGE_SIZE,
                    study_dir: Path = STUDY_DIR, tiny: bool = False) -> Path:
    """The study VAE ``name`` as a pipeline-like folder (``vae/`` + training.json with its latent statistics),
    for ``train(..., vae_from=folder)``."""
    import diffusers

    vae = diffusers.AutoencoderKL(**T.vae_spec(size, factor, latent_channels, tiny=tiny))
    vae.load_state_dict(torch.load(Path(study_dir) / name / "vae_weights.pt", map_location="cpu"))
    vae.eval()
    with torch.no_grad():
        z = torch.cat([vae.encode(T.batch_at(b, 64, size)[0]).latent_dist.mean for b in range(0, 512, 64)])
    stats = {"mean": float(z.mean()), "std": float(z.std()), "from_study_run": name}
    vae.register_to_config(scaling_factor=1.0 / stats["std"], shift_factor=stats["mean"])
    folder = Path(folder)
    vae.save_pretrained(str(folder / "vae"), safe_serialization=True)
    (folder / "training.json").write_text(json.dumps({"vae_latent_stats": stats, "size": size}, indent=2) + "\n")
    return folder


def run_denoiser(name: str, arch: str, *, vae_from: str, n_val: int = 50, eval_every: int = 500,
                 study_dir: Path = STUDY_DIR, tiny: bool = False, **settings) -> dict:
    """One denoiser variant on a frozen study VAE; every checkpoint is scored on n_val one-object + n_val
    two-object validation prompts with the model's default sampling settings."""
    from .evaluate import evaluate
    from .models import load_toy_pipeline, toy_call_kwargs

    r = T.Recipe().replace(decoder_every=0, **settings)
    study_dir = Path(study_dir)
    out = study_dir / name / "pipeline"
    rec = {"name": name, "kind": arch, "vae_from": str(vae_from), **{k: v for k, v in settings.items()}, "curve": []}
    t0 = time.time()
    eval_s = [0.0]

    def score(step, folder):
        te = time.time()
        pipe = load_toy_pipeline(arch, path=folder)
        kw = toy_call_kwargs(arch, height=r.size, width=r.size)
        res = evaluate(pipe, name=name, n=n_val, seed_base=VALIDATION_SEED_BASE, call_kwargs=kw, log=lambda *_: None)
        g = res["generated"]
        eval_s[0] += time.time() - te
        row = {"step": step, "wall_s": round(time.time() - t0 - eval_s[0], 1),
               **{k: g[k] for k in ("single_colour_shape", "single_colour_only", "two_object_both",
                                    "two_object_relation", "background_style")}}
        rec["curve"].append(row)
        print(f"[{name}] {row}", flush=True)
        (study_dir / f"{name}.json").write_text(json.dumps(rec, indent=2, default=str) + "\n")

    T.train(arch, out, recipe=r, state_dir=study_dir / name / "state", vae_from=vae_from, ckpt_every=eval_every,
            log_file=study_dir / f"{name}.train.log", on_checkpoint=score, tiny=tiny)
    rec["wall_s_train"] = round(time.time() - t0 - eval_s[0], 1)
    (study_dir / f"{name}.json").write_text(json.dumps(rec, indent=2, default=str) + "\n")
    return rec


_LOSS_LINE = re.compile(r"\] (?:sd|flux) step (\d+) loss \S+ avg (\S+) lr \S+(?: dec \S+)? \((\d+)s\)")


def loss_curve(log_path) -> list[dict]:
    """The denoiser's running-mean training loss from a run's train log: rows {step, wall_s, loss}."""
    rows = []
    for line in Path(log_path).read_text().splitlines():
        m = _LOSS_LINE.search(line)
        if m:
            rows.append({"step": int(m.group(1)), "wall_s": float(m.group(3)), "loss": float(m.group(2))})
    return rows


def plot(paths: list[str], out: str, metrics: tuple[str, ...]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(Path(p).read_text()) for p in paths]
    for p, r in zip(paths, runs):
        log = Path(p).with_suffix(".train.log")
        if "loss" in metrics and log.is_file():
            r["curve"] = r["curve"] + loss_curve(log)
    for p, r in zip(paths, runs):  # a warm-started run continues its parent's time axis
        parent = Path(p).parent / f"{r.get('init')}.json"
        r["offset_s"] = json.loads(parent.read_text())["curve"][-1]["wall_s"] if r.get("init") and parent.is_file() else 0.0
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        for r in runs:
            rows = sorted((row for row in r["curve"] if m in row), key=lambda row: row["wall_s"])
            xs = [(r["offset_s"] + row["wall_s"]) / 60 for row in rows]
            ys = [row[m] if m == "loss" else 100 * row[m] for row in rows]
            ax.plot(xs, ys, marker="o" if m != "loss" else None, ms=3, label=r["name"])
        ax.set_title(m.replace("_", " ") + (" (running mean)" if m == "loss" else ""))
        ax.set_xlabel("minutes (2 CPU cores shared)")
        ax.set_ylabel("training loss" if m == "loss" else "% on validation scenes")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("vae", help="one VAE variant")
    v.add_argument("--name", required=True)
    v.add_argument("--factor", type=int, default=2)
    v.add_argument("--latent-channels", type=int, default=4)
    v.add_argument("--steps", type=int, default=1500)
    v.add_argument("--batch", type=int, default=16)
    v.add_argument("--lr", type=float, default=1e-3)
    v.add_argument("--kl-weight", type=float, default=1e-6)
    v.add_argument("--size", type=int, default=T.IMAGE_SIZE)
    v.add_argument("--threads", type=int, default=1)
    v.add_argument("--eval-every", type=int, default=250)
    v.add_argument("--resume", action="store_true")
    v.add_argument("--object-weight", type=float, default=1.0)
    v.add_argument("--init", default=None, help="start from this study run's weights")
    d = sub.add_parser("denoiser", help="one denoiser variant on a study VAE (recipe settings as KEY=VALUE)")
    d.add_argument("--name", required=True)
    d.add_argument("--arch", choices=("sd", "flux"), default="sd")
    d.add_argument("--vae-from", required=True, help="folder made by `recipe.py vae-folder`")
    d.add_argument("--eval-every", type=int, default=500)
    d.add_argument("--n-val", type=int, default=50)
    d.add_argument("set", nargs="*", help="recipe settings, e.g. steps=800 lr=1e-3 unet_blocks=32,64,128")
    f = sub.add_parser("vae-folder", help="save a study VAE as a folder for --vae-from")
    f.add_argument("--name", required=True)
    f.add_argument("--out", required=True)
    f.add_argument("--factor", type=int, default=2)
    f.add_argument("--latent-channels", type=int, default=4)
    q = sub.add_parser("plot", help="learning curves of finished runs")
    q.add_argument("runs", nargs="+")
    q.add_argument("--out", required=True)
    q.add_argument("--metrics", default="objects_medium_large,background_style")
    a = p.parse_args(argv)
    if a.cmd == "vae":
        run_vae(a.name, factor=a.factor, latent_channels=a.latent_channels, steps=a.steps, batch=a.batch, lr=a.lr,
                kl_weight=a.kl_weight, size=a.size, threads=a.threads, eval_every=a.eval_every, resume=a.resume,
                object_weight=a.object_weight, init=a.init)
    elif a.cmd == "vae-folder":
        save_vae_folder(a.name, Path(a.out), factor=a.factor, latent_channels=a.latent_channels)
    elif a.cmd == "denoiser":
        run_denoiser(a.name, a.arch, vae_from=a.vae_from, n_val=a.n_val, eval_every=a.eval_every,
                     **dict(_setting(kv) for kv in a.set))
    else:
        plot(a.runs, a.out, tuple(a.metrics.split(",")))


def _setting(kv: str):
    key, _, val = kv.partition("=")
    default = {f.name: f.default for f in T.fields(T.Recipe)}
    if key not in default:
        raise SystemExit(f"unknown recipe setting {key!r}; known: {sorted(default)}")
    d = default[key]
    if isinstance(d, bool):
        return key, val.lower() in ("1", "true", "yes")
    if isinstance(d, tuple):
        return key, tuple(int(x) for x in val.split(","))
    return key, (float(val) if isinstance(d, float) else int(val))


if __name__ == "__main__":
    main()
