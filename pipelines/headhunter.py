"""HeadHunter on diffusers pipelines: score head sets by generating images with SoftPAG and an objective.

    from attnlab.pipelines.headhunter import run_headhunter

    result, files = run_headhunter(pipe, ["a lighthouse at dusk", "a bowl of fruit"], seeds=[0, 1],
                                   objective="sharpness", out_dir="out/hh", top_k=3, rounds=5, steps=20)
    # files["preset"] -> out/hh/headset.json, loadable with SoftPAGPipeline.from_pipe(pipe, preset=...)

Scoring a head set S generates one image per (prompt, seed) pair with `SoftPAGPipeline` (heads S, u, w),
CFG off by default as in the official code (`guidance_scale=0`; FLUX: no true CFG, its distilled
guidance embedding stays at the pipeline default), and averages `objective(image, prompt)`.

Objectives are callables `(PIL.Image, prompt) -> float`, higher is better. `load_objective` takes a
built-in name (`sharpness`, `colorfulness`, `contrast`: pure NumPy, no weights), `clip:PATH` (a local
CLIP-style model directory: CLIPScore, or PickScore when PATH holds PickScore's weights and processor),
or `module:function` / `path/to/file.py:function`.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from ..processors.headhunter import SearchResult, SingleProcess, search
from ..processors.headsets import HeadSet
from ..processors.host_diffusers.model_info import attention_sites, family_of
from ..processors.presets import save_preset
from ..processors.softpag import JOINT_MODES, TARGETS, SoftPAG
from ..processors.host_diffusers.session import denoiser_names
from .softpag import SoftPAGPipeline

Objective = Callable[[Any, str], float]

STATE_FILE = "state.json"
PRESET_FILE = "headset.json"
VALIDATION_DIR = "validation"
VALIDATION_SHEET = "validation.png"


# --------------------------------------------------------------------------------------- objectives


def _gray(image) -> np.ndarray:
    """Luma in [0, 1] (ITU-R 601 weights, as PIL's "L")."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    return rgb @ np.array([0.299, 0.587, 0.114])


def sharpness(image, prompt: str = "") -> float:
    """Variance of the 4-neighbour Laplacian of the luma (0-255 scale, as OpenCV's blur metric)."""
    g = _gray(image) * 255.0
    if min(g.shape) < 3:
        return 0.0
    lap = g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:] - 4.0 * g[1:-1, 1:-1]
    return float(lap.var())


def colorfulness(image, prompt: str = "") -> float:
    """Hasler & Süsstrunk (2003) colourfulness M = σ_rgyb + 0.3·μ_rgyb on 0-255 RGB."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    rg = r - g
    yb = 0.5 * (r + g) - b
    return float(math.sqrt(rg.std() ** 2 + yb.std() ** 2) + 0.3 * math.sqrt(rg.mean() ** 2 + yb.mean() ** 2))


def contrast(image, prompt: str = "") -> float:
    """RMS contrast: standard deviation of the luma in [0, 1]."""
    return float(_gray(image).std())


BUILTIN_OBJECTIVES: dict[str, Objective] = {"sharpness": sharpness, "colorfulness": colorfulness, "contrast": contrast}


class ClipScore:
    """`logit_scale · cos(image, text)` of a local CLIP-style model directory (CLIPModel + its processor).

    With openai CLIP weights this is CLIPScore without the clamp (logit_scale = 100); with PickScore's
    weights (`yuvalkirstain/PickScore_v1` plus the `laion/CLIP-ViT-H-14` processor files in the same
    folder) it is PickScore. Loaded with `local_files_only=True`: nothing is downloaded.
    """

    def __init__(self, path: Union[str, Path], device=None, prefix: str = ""):
        from transformers import CLIPModel, CLIPProcessor

        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"objective 'clip:{path}': {str(path)!r} is not a local directory with a CLIP model "
                             "(config.json, weights, tokenizer and preprocessor files)")
        try:
            self.model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
            self.processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"objective 'clip:{path}': cannot load a CLIP model and processor from it ({e})") from None
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.model.to(self.device)
        self.prefix = prefix
        self.max_length = int(self.model.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def __call__(self, image, prompt: str) -> float:
        inputs = self.processor(text=[self.prefix + prompt], images=[image.convert("RGB")], return_tensors="pt",
                                padding="max_length", truncation=True, max_length=self.max_length)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        img = self.model.get_image_features(pixel_values=inputs["pixel_values"])
        txt = self.model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
        img = _embeds(img)
        txt = _embeds(txt)
        cos = torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1)
        return float(self.model.logit_scale.exp().float() * cos[0])


def _embeds(out) -> torch.Tensor:
    """transformers 5 may return a model output instead of a tensor from get_*_features."""
    if isinstance(out, torch.Tensor):
        return out
    for name in ("pooler_output", "image_embeds", "text_embeds"):
        value = getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return value
    return out[0]


def objective_name(objective: Union[str, Objective]) -> str:
    """A stable text name of an objective (for the search config)."""
    if isinstance(objective, str):
        return objective.strip()
    module = getattr(objective, "__module__", None) or type(objective).__module__
    qual = getattr(objective, "__qualname__", None) or type(objective).__qualname__
    return f"{module}:{qual}"


def load_objective(spec: Union[str, Objective], device=None) -> Objective:
    """A callable `(PIL.Image, prompt) -> float` from a built-in name, `clip:PATH`, `module:function`
    or `path/to/file.py:function` (or a callable, returned as is)."""
    if callable(spec) and not isinstance(spec, str):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"objective must be a built-in name ({', '.join(BUILTIN_OBJECTIVES)}), 'clip:PATH' or "
                         f"'module:function', got {spec!r}")
    spec = spec.strip()
    if spec in BUILTIN_OBJECTIVES:
        return BUILTIN_OBJECTIVES[spec]
    if spec.startswith("clip:"):
        return ClipScore(spec[len("clip:"):], device=device)
    module_name, colon, attr = spec.rpartition(":")
    if not colon or not module_name or not attr:
        raise ValueError(f"unknown objective {spec!r}; choose a built-in ({', '.join(BUILTIN_OBJECTIVES)}), "
                         "'clip:PATH' (local CLIP model folder) or 'module:function' / 'file.py:function'")
    if module_name.endswith(".py"):
        file = Path(module_name)
        if not file.is_file():
            raise ValueError(f"objective {spec!r}: no file {module_name!r}")
        mod_spec = importlib.util.spec_from_file_location(f"attnlab_objective_{file.stem}", file)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ValueError(f"objective {spec!r}: cannot import module {module_name!r} ({e})") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"objective {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"objective {spec!r}: {attr!r} is not callable; it must be f(image, prompt) -> float")
    return obj


# ------------------------------------------------------------------------------------------ candidates


def _denoiser(pipe) -> torch.nn.Module:
    names = denoiser_names(pipe)
    if not names:
        raise ValueError(f"{type(pipe).__name__} has no unet/transformer; pass a diffusers pipeline")
    return getattr(pipe, names[0])


def heads_per_layer(pipe, dual_attention: bool = False) -> dict[int, int]:
    """{layer: heads} of the attention layers SoftPAG perturbs (self / joint / single, never cross)."""
    probe = SoftPAG(HeadSet(), dual_attention=dual_attention)
    out: dict[int, int] = {}
    for spec in attention_sites(_denoiser(pipe)):
        if probe.perturbs(spec.site):
            out[spec.site.layer] = int(spec.module.heads)
    return out


def candidate_heads(pipe, layers: Optional[Iterable[int]] = None, max_candidates: Optional[int] = None,
                    dual_attention: bool = False) -> list[tuple[int, int]]:
    """Every (layer, head) SoftPAG can perturb, layer-major; `layers` keeps only those layers,
    `max_candidates` keeps the first N."""
    table = heads_per_layer(pipe, dual_attention)
    if not table:
        raise ValueError(f"{type(pipe).__name__} has no attention layers SoftPAG can perturb")
    if layers is not None:
        layers = sorted({int(x) for x in layers})
        bad = [x for x in layers if x not in table]
        if bad:
            raise ValueError(f"layers: {bad[0]} is out of range; this model's perturbable layers are "
                             f"{min(table)}-{max(table)}")
        if not layers:
            raise ValueError("layers: the restriction is empty")
    pairs = [(layer, h) for layer in sorted(table) if layers is None or layer in layers for h in range(table[layer])]
    if max_candidates is not None:
        if int(max_candidates) < 1:
            raise ValueError(f"max_candidates must be >= 1, got {max_candidates}")
        pairs = pairs[: int(max_candidates)]
    return pairs


# ------------------------------------------------------------------------------------------- scoring


def _first_image(output):
    """The first image of a pipeline output; the middle frame of a video."""
    from PIL import Image

    images = getattr(output, "images", None)
    if images is None:
        images = getattr(output, "frames", None)
    if images is None:
        images = output[0]
    item = images[0]
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, (list, tuple)):  # a video as a list of frames
        item = item[len(item) // 2]
        if isinstance(item, Image.Image):
            return item
    array = np.asarray(item.detach().float().cpu() if isinstance(item, torch.Tensor) else item, dtype=np.float32)
    if array.ndim == 4:  # frames, H, W, C
        array = array[len(array) // 2]
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = array.transpose(1, 2, 0)
    return Image.fromarray((np.clip(array, 0.0, 1.0) * 255).round().astype("uint8").squeeze())


class PipelineScorer:
    """score(HeadSet) -> mean objective over the prompt × seed grid, images made with SoftPAG.

    u, scale: SoftPAG interpolation and guidance scale w during the search. cfg: CFG scale s (<= 1: off,
    the default, as HeadHunter's code; FLUX: true CFG with an empty negative prompt). steps, size
    ((height, width) or an int), frames (Wan): generation settings. call_kwargs: added to every call
    (e.g. max_sequence_length). The empty head set generates without any guidance (the baseline).
    """

    def __init__(self, pipe, prompts: Sequence[str], seeds: Sequence[int] = (0,), objective: Union[str, Objective] = "sharpness",
                 *, u: float = 1.0, scale: float = 3.0, cfg: float = 0.0, steps: int = 20, size=None,
                 frames: Optional[int] = None, target: str = "identity", joint: str = "full",
                 call_kwargs: Optional[Mapping[str, Any]] = None, quiet: bool = True):
        self.pipe = pipe
        self.prompts = check_prompts(prompts)
        self.seeds = check_seeds(seeds)
        self.pairs = [(p, s) for p in self.prompts for s in self.seeds]
        self.objective = load_objective(objective, device=getattr(pipe, "device", None))
        self.objective_name = objective_name(objective)
        check_settings(u, scale, cfg, steps, target, joint)
        self.u, self.scale, self.cfg = float(u), float(scale), float(cfg or 0.0)
        self.steps = int(steps)
        self.size = _hw(size)
        self.target, self.joint = target, joint
        self.family = family_of(_denoiser(pipe))
        self.frames = None if frames is None or self.family != "wan" else int(frames)
        self.call_kwargs = dict(call_kwargs or {})
        self.generations = 0
        self.gen_seconds = 0.0
        self.eval_seconds = 0.0
        if quiet and hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)

    def config(self) -> dict:
        """Everything that determines the scores (goes into the resumable search config)."""
        return {"prompts": self.prompts, "seeds": self.seeds, "objective": self.objective_name, "u": self.u,
                "scale": self.scale, "cfg": self.cfg, "steps": self.steps,
                "size": list(self.size) if self.size else None, "frames": self.frames, "target": self.target,
                "joint": self.joint, "family": self.family, "call_kwargs": _plain(self.call_kwargs),
                "dtype": str(getattr(_denoiser(self.pipe), "dtype", "")).replace("torch.", "")}

    def call_arguments(self, prompt: str, seed: int) -> dict:
        kw: dict[str, Any] = dict(prompt=prompt, num_inference_steps=self.steps, output_type="pil",
                                  generator=torch.Generator().manual_seed(int(seed)))
        if self.family == "flux":
            if self.cfg > 1.0:
                kw.update(true_cfg_scale=self.cfg, negative_prompt="")
        else:
            kw.update(guidance_scale=self.cfg)
            if self.cfg > 1.0:
                kw["negative_prompt"] = ""
        if self.size is not None:
            kw.update(height=self.size[0], width=self.size[1])
        if self.frames is not None:
            kw["num_frames"] = self.frames
        kw.update(self.call_kwargs)
        return kw

    def runner(self, heads: HeadSet):
        if not heads:
            return self.pipe
        return SoftPAGPipeline.from_pipe(self.pipe, heads=heads, scale=self.scale, u=self.u, target=self.target,
                                         joint=self.joint)

    def images(self, heads) -> list:
        """One image per (prompt, seed) pair, with SoftPAG on `heads` (none: no guidance at all)."""
        run = self.runner(HeadSet.of(heads))
        out = []
        with torch.no_grad():
            for prompt, seed in self.pairs:
                t0 = time.perf_counter()
                out.append(_first_image(run(**self.call_arguments(prompt, seed))))
                self.gen_seconds += time.perf_counter() - t0
                self.generations += 1
        return out

    def score_images(self, images: Sequence) -> float:
        t0 = time.perf_counter()
        values = [float(self.objective(img, prompt)) for img, (prompt, _) in zip(images, self.pairs)]
        self.eval_seconds += time.perf_counter() - t0
        return float(np.mean(values))

    def __call__(self, heads) -> float:
        return self.score_images(self.images(heads))

    def cost(self) -> dict:
        n = max(self.generations, 1)
        return {"generations": self.generations, "generation_s": round(self.gen_seconds, 3),
                "objective_s": round(self.eval_seconds, 3), "per_generation_s": round(self.gen_seconds / n, 4),
                "per_objective_s": round(self.eval_seconds / n, 4)}


def check_settings(u: float = 1.0, scale: float = 3.0, cfg: float = 0.0, steps: int = 20, target: str = "identity",
                   joint: str = "full") -> None:
    """Raise ValueError naming the first search setting out of range."""
    u, scale, cfg = float(u), float(scale), float(cfg or 0.0)
    if not 0.0 < u <= 1.0 or math.isnan(u):
        raise ValueError(f"u must be in (0, 1] for a search (1 = PAG, the official code's value), got {u}")
    if not scale > 0.0 or not math.isfinite(scale):
        raise ValueError(f"scale (w) must be > 0 for a search, got {scale}")
    if not math.isfinite(cfg) or cfg < 0.0:
        raise ValueError(f"cfg must be >= 0 (<= 1 turns CFG off), got {cfg}")
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if target not in TARGETS or joint not in JOINT_MODES:
        raise ValueError(f"target must be one of {TARGETS} and joint one of {JOINT_MODES}, got {target!r}, {joint!r}")


def check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = [str(p).strip() for p in (prompts or [])]
    if not prompts or not all(prompts):
        raise ValueError("prompts: give at least one non-empty prompt (a HeadHunter search averages the objective "
                         "over prompts × seeds)")
    return prompts


def check_seeds(seeds) -> list[int]:
    if isinstance(seeds, int):
        seeds = [seeds]
    try:
        seeds = [int(s) for s in seeds]
    except (TypeError, ValueError):
        raise ValueError(f"seeds must be integers, got {seeds!r}") from None
    if not seeds or min(seeds) < 0:
        raise ValueError(f"seeds: give at least one non-negative integer seed, got {seeds!r}")
    return seeds


def _hw(size) -> Optional[tuple[int, int]]:
    if size is None:
        return None
    if isinstance(size, int):
        size = (size, size)
    size = tuple(int(s) for s in size)
    if len(size) == 3:
        size = size[1:]
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size must be HEIGHT or (HEIGHT, WIDTH) in pixels, got {size!r}")
    return size


def _plain(value):
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


# ------------------------------------------------------------------------------------------ validation


def _label(index: int) -> str:
    return "baseline" if index == 0 else f"round{index}"


def make_validator(scorer: PipelineScorer, out_dir: Union[str, Path]):
    """validate(heads, index): images for every prompt–seed pair saved as PNGs (index 0 = the baseline
    without guidance), scored with the objective."""
    folder = Path(out_dir) / VALIDATION_DIR

    def validate(heads: HeadSet, index: int) -> dict:
        folder.mkdir(parents=True, exist_ok=True)
        images = scorer.images(heads)
        files = []
        for j, image in enumerate(images):
            name = f"{_label(index)}_{j:02d}.png"
            image.save(folder / name)
            files.append(f"{VALIDATION_DIR}/{name}")
        return {"label": _label(index), "score": scorer.score_images(images), "files": files}

    return validate


def contact_sheet(out_dir: Union[str, Path], validation: Sequence[Mapping], pairs: Sequence[tuple[str, int]],
                  min_size: int = 128) -> Optional[Path]:
    """validation.png: one row per validation (baseline, round 1, ...), one column per prompt–seed pair."""
    from PIL import Image, ImageDraw

    out_dir = Path(out_dir)
    rows = [(v, [out_dir / f for f in v.get("files", [])]) for v in validation if v]
    rows = [(v, files) for v, files in rows if files and all(f.is_file() for f in files)]
    if not rows:
        return None
    first = Image.open(rows[0][1][0])
    factor = max(1, -(-min_size // max(first.size)))
    w, h = first.width * factor, first.height * factor
    label_w, pad = 150, 14
    sheet = Image.new("RGB", (label_w + w * len(rows[0][1]), pad + h * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for j, (prompt, seed) in enumerate(pairs[: len(rows[0][1])]):
        draw.text((label_w + j * w + 2, 1), f"{prompt[:max(4, w // 7)]} / {seed}", fill="black")
    for i, (v, files) in enumerate(rows):
        y = pad + i * h
        draw.text((4, y + 4), str(v.get("label", i)), fill="black")
        score = v.get("score")
        draw.text((4, y + 18), f"score {score:.4g}" if isinstance(score, (int, float)) else "", fill="black")
        draw.text((4, y + 32), str(v.get("heads", ""))[:24], fill="black")
        for j, f in enumerate(files):
            img = Image.open(f).convert("RGB")
            sheet.paste(img.resize((w, h), Image.NEAREST), (label_w + j * w, y))
    path = out_dir / VALIDATION_SHEET
    sheet.save(path)
    return path


# ------------------------------------------------------------------------------------------ the search
class Processes:
    """The processes of a `torchrun` / `accelerate launch` job sharing one search (data parallel: every process
    holds its own pipeline and scores its share of each round's candidates; see docs/scale_out.md)."""

    def __init__(self, group=None):
        import torch.distributed as dist

        self._dist, self.group = dist, group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)

    def exchange(self, value) -> list:
        out = [None] * self.size
        self._dist.all_gather_object(out, value, group=self.group)
        return out

    def share(self, value):
        box = [value]
        self._dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


def join_processes():
    """The processes this program was launched with: `Processes` under torchrun / accelerate launch (WORLD_SIZE
    > 1; joins the default process group if nobody has, NCCL on CUDA else gloo, and selects this process's GPU),
    else `SingleProcess`. Call it before loading the pipeline."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not (dist.is_available() and dist.is_initialized()):
        return SingleProcess()
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    return Processes()




def run_headhunter(pipe, prompts: Sequence[str], seeds: Sequence[int] = (0,), objective: Union[str, Objective] = "sharpness",
                   out_dir: Union[str, Path] = "out/headhunter", *, top_k: int = 3, rounds: int = 5, u: float = 1.0,
                   scale: float = 3.0, cfg: float = 0.0, steps: int = 20, size=None, frames: Optional[int] = None,
                   target: str = "identity", joint: str = "full", layers: Optional[Iterable[int]] = None,
                   max_candidates: Optional[int] = None, restart: bool = False, validation: bool = True,
                   progress: bool = True, call_kwargs: Optional[Mapping[str, Any]] = None,
                   model: Optional[str] = None, workers=None) -> tuple[SearchResult, dict]:
    """Search heads on `pipe` (Algorithm 1) and write `out_dir`: state.json (resumable), headset.json
    (a SoftPAG preset with a "search" record), validation/*.png and validation.png.

    Returns the SearchResult and {"state", "preset", "validation_sheet"} paths. Rerunning with the same
    arguments resumes; other arguments on an existing state file raise unless `restart=True`.
    `model` names the model in the config and preset (default: the pipeline's `_name_or_path`).
    `workers`: the processes sharing the search (`join_processes()`; default one process). Every process runs
    this call with the same arguments and its own pipeline; process 0 writes the files, every process returns
    the same result.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an integer >= 1 (heads added per round), got {top_k!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
    scorer = PipelineScorer(pipe, prompts, seeds, objective, u=u, scale=scale, cfg=cfg, steps=steps, size=size,
                            frames=frames, target=target, joint=joint, call_kwargs=call_kwargs)
    candidates = candidate_heads(pipe, layers, max_candidates)
    model = model or str(getattr(getattr(pipe, "config", None), "_name_or_path", "") or type(pipe).__name__)
    config = {"model": model, "pipeline": type(pipe).__name__, **scorer.config()}
    out_dir = Path(out_dir)
    workers = workers if workers is not None else SingleProcess()
    lead = workers.rank == 0
    if lead:
        out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = search(candidates, scorer, top_k, rounds, state_path=out_dir / STATE_FILE, config=config,
                    restart=restart, validate=make_validator(scorer, out_dir) if validation else None,
                    progress=progress and lead, workers=workers)
    seconds = time.perf_counter() - t0
    files = {"state": out_dir / STATE_FILE, "preset": out_dir / PRESET_FILE}
    if not lead:
        return result, files
    sheet = contact_sheet(out_dir, result.validation, scorer.pairs) if validation else None
    if sheet is not None:
        files["validation_sheet"] = sheet
    record = result.summary()
    record["config"] = {**record["config"], "candidates": str(HeadSet.from_pairs(candidates))}
    record["cost"] = {**scorer.cost(), "seconds": round(seconds, 3), "candidates_scored": result.evaluated,
                      "candidates_resumed": result.resumed_scores, "prompt_seed_pairs": len(scorer.pairs)}
    files["preset"] = save_preset(
        out_dir / PRESET_FILE, result.selected, u=scorer.u, scale=scorer.scale,
        name=f"headhunter-{out_dir.name}", family=scorer.family, model=model, target=target, joint=joint,
        source=f"attnlab headhunter search (objective {scorer.objective_name!r}, top_k={top_k}, rounds={rounds}, "
               f"{len(scorer.pairs)} prompt-seed pairs)",
        notes="u is the search value; the HeadHunter paper recommends post-tuning it (e.g. 1.0 -> 0.5).",
        search=record)
    return result, files
