"""Fine-tune a toy SD model's VAE decoder on the latents its own denoiser produces (issue 15).

    python -m attnlab.toyworld.decoder_tune --model models/toy/sd --out out/dec/pipeline --steps 1500

The encoder, text encoder and UNet stay frozen, so the latent space every other component learnt does not move
(img2img, inpainting and the methods that encode images see the same latents); only the decoder (and
``post_quant_conv``) learns. Training pairs: a training scene ``x`` (indices from ``SAMPLE_OFFSET``: neither the
validation seeds 500 000… nor the evaluation's 0-199), its latent ``z = E(x)`` noised to a timestep
``t ~ U[0, t_max]``, and the UNet's one-step clean-latent prediction ``x0(z_t, caption)`` under classifier-free
guidance ``g`` -- what the sampler's last steps hand the decoder; the target is ``x``. ``clean_share`` of each batch
decodes ``z`` itself, so the round trip is kept. Loss: L1 + MSE weighted ``object_weight`` on object pixels and
their edge ring (:func:`train.object_weights`), as the VAE was trained.

The output folder is a copy of ``--model`` with the new decoder; ``training.json`` records the run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from . import train as T
from .models import load_toy_pipeline

SAMPLE_OFFSET = 200_000_000  # training indices of this phase (the VAE's start at 100 000 000, the denoiser's at 0)


def clean_latent_prediction(pipe, lat: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, t: torch.Tensor,
                            noise: torch.Tensor, guidance: float) -> torch.Tensor:
    """The UNet's guided x0 prediction for ``lat`` noised to ``t`` (v-prediction): sqrt(a) x_t - sqrt(1-a) v.
    cond / uncond: the captions' and the empty caption's text embeddings, one row per latent."""
    ac = pipe.scheduler.alphas_cumprod.to(lat)[t].view(-1, 1, 1, 1)
    noisy = ac.sqrt() * lat + (1 - ac).sqrt() * noise
    v_c, v_u = pipe.unet(torch.cat([noisy, noisy]), torch.cat([t, t]), torch.cat([cond, uncond])).sample.chunk(2)
    v = v_u + guidance * (v_c - v_u)
    return ac.sqrt() * noisy - (1 - ac).sqrt() * v


def tune_decoder(model: str | Path, out: str | Path, *, steps: int = 1500, batch: int = 16, lr: float = 2e-4,
                 t_max: int = 400, guidance: float = 4.0, clean_share: float = 0.25, object_weight: float = 10.0,
                 seed: int = 0, threads: int = 1, log_every: int = 25) -> dict:
    if threads:
        torch.set_num_threads(threads)
    model, out = Path(model), Path(out)
    pipe = load_toy_pipeline("sd", path=model, dtype=torch.float32)
    if pipe.scheduler.config.prediction_type != "v_prediction":
        raise ValueError(f"{model}: decoder tuning expects a v-prediction UNet, "
                         f"got {pipe.scheduler.config.prediction_type!r}")
    vae = pipe.vae
    for m in (vae, pipe.unet, pipe.text_encoder):
        m.eval().requires_grad_(False)
    params = list(vae.decoder.parameters()) + (list(vae.post_quant_conv.parameters())
                                               if vae.post_quant_conv is not None else [])
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scale = vae.config.scaling_factor
    size = vae.config.sample_size
    data = T.StepBatches(batch, size, SAMPLE_OFFSET)
    gen = torch.Generator().manual_seed(seed)
    n_clean = int(round(clean_share * batch))
    text = {"tokenizer": pipe.tokenizer, "text_encoder": pipe.text_encoder}
    with torch.no_grad():
        uncond = T._encode_text_sd(text, [""], "cpu").expand(batch - n_clean, -1, -1)
    t0, avg = time.time(), None
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = T._lr_at(step, steps, lr, warmup=50)
        x, caps = data[step]
        with torch.no_grad():
            lat = vae.encode(x).latent_dist.mean * scale
            k = batch - n_clean
            t = torch.randint(0, t_max + 1, (k,), generator=gen)
            noise = torch.randn(lat[:k].shape, generator=gen)
            cond = T._encode_text_sd(text, caps[:k], "cpu")
            pred = clean_latent_prediction(pipe, lat[:k], cond, uncond, t, noise, guidance)
            z = torch.cat([pred, lat[k:]]) / scale
        vae.decoder.train()
        rec = vae.decode(z).sample
        vae.decoder.eval()
        w = T.object_weights(x, object_weight)
        loss = (w * ((rec - x).abs() + (rec - x) ** 2)).sum() / (w.sum() * x.shape[1])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        avg = loss.item() if avg is None else 0.95 * avg + 0.05 * loss.item()
        if step % log_every == 0 or step == steps - 1:
            print(f"[{time.strftime('%H:%M:%S')}] decoder step {step} loss {loss.item():.4f} avg {avg:.4f} "
                  f"({time.time() - t0:.0f}s)", flush=True)
    vae.requires_grad_(False)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(model, out)
    vae.to(torch.float16).save_pretrained(str(out / "vae"), safe_serialization=True)
    run = {"command": f"python -m attnlab.toyworld.decoder_tune --model {model} --out {out} --steps {steps} "
                      f"--batch {batch} --lr {lr} --t-max {t_max} --guidance {guidance} --clean-share {clean_share} "
                      f"--object-weight {object_weight} --seed {seed}",
           "steps": steps, "wall_s": round(time.time() - t0, 1), "final_loss_avg": avg, "torch": torch.__version__}
    info_path = out / "training.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    info.setdefault("decoder_tune", []).append(run)
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    return run


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default=str(T.REPO_ROOT / "models" / "toy" / "sd"), help="toy SD pipeline folder")
    ap.add_argument("--out", required=True, help="folder for the copy with the tuned decoder")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (warm-up 50, cosine to 10 %%)")
    ap.add_argument("--t-max", type=int, default=400, help="largest training timestep the latents are noised to")
    ap.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance of the x0 prediction")
    ap.add_argument("--clean-share", type=float, default=0.25, help="share of each batch decoded from E(x) itself")
    ap.add_argument("--object-weight", type=float, default=10.0, help="loss weight on object pixels and their ring")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    if not 0.0 <= a.clean_share <= 1.0:
        ap.error("--clean-share must lie in [0, 1]")
    if not 0 <= a.t_max < 1000:
        ap.error("--t-max must lie in [0, 999]")
    print(tune_decoder(a.model, a.out, steps=a.steps, batch=a.batch, lr=a.lr, t_max=a.t_max, guidance=a.guidance,
                       clean_share=a.clean_share, object_weight=a.object_weight, seed=a.seed, threads=a.threads))


if __name__ == "__main__":
    main()
