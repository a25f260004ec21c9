"""Golden-trace format for ComfyUI's attention hook contract (our own code, MIT).

A *trace* describes what a node pack observes while ComfyUI samples a tiny model: every
``optimized_attention_override`` call (layouts, heads positional/keyword, mask, skip flags, kwargs,
``transformer_options`` keys and value formats, block ids, ``cond_or_uncond``, token counts, token
order), every ``APPLY_MODEL`` call (inputs and per-call options), ``DIFFUSION_MODEL`` wrapper calls,
UNet attention patches/replaces, DiT block replaces and post-CFG calls. Values that differ by design
between the fake and a real ComfyUI (numerics, sigma values, uuids, object identities) are reduced
to formats. Keys the pack adds itself (anything starting with ``"attnlab"``) are left out.

The same scenario runner drives a *backend*: ``tests/fake_comfy`` (CI) or ``tests/real_comfy.py``
(a real ComfyUI checkout in ``COMFYUI_DIR``). A backend provides ``build_tiny(family, seed)``,
``conditioning(family, seed, uniform_text)``, ``sample_tiny(patcher, family, ...)``, ``WrappersMP``,
``calc_cond_batch`` and ``source_info()``; it is driven only through ComfyUI's public patcher API.

Token order is made visible without reading ComfyUI internals: the scenarios use conditioning whose
text (and CLIP-vision) rows are all identical, so those rows stay identical in q/k/v, and each tensor
is summarised as runs of identical rows ``S<n>`` and of varying rows ``V<n>`` (e.g. ``S5+V64`` =
5 text tokens first, then 64 image tokens).
"""

from __future__ import annotations

import json
import math
import uuid
from typing import Any, Callable

import torch

FORMAT = "attnlab-comfy-trace/1"
OVERRIDE = "optimized_attention_override"
GUARD = "_inside_attn_wrapper"
OWN_PREFIX = "attnlab"
TRACE_KEY = "attnlab_trace"
PASS_MARKER = "attnlab_pass"
#: transformer_options keys whose values (not only formats) are part of the contract
INFO_KEYS = ("block", "block_index", "transformer_index", "activations_shape", "original_shape", "cond_or_uncond",
             "block_type", "total_blocks", "img_slice")

# ----------------------------------------------------------------------------- scenarios
#: name -> spec. ``family`` as in ``fake_comfy.FAMILIES``; 2 Euler steps, seed 42, conditioning seed 1.
SCENARIOS: dict[str, dict] = {
    "sd15_cfg4_b2": {"family": "sd15", "batch": 2, "cfg": 4.0},
    "sd15_cfg1_b2": {"family": "sd15", "batch": 2, "cfg": 1.0},
    "sd15_split_b2": {"family": "sd15", "batch": 2, "cfg": 4.0, "split_calls": True},
    "sd15_foreign_override": {"family": "sd15", "batch": 1, "cfg": 4.0, "foreign_override": True},
    "sd15_unet_patches": {"family": "sd15", "batch": 1, "cfg": 4.0, "unet_patches": True},
    "sd15_postcfg_pass": {"family": "sd15", "batch": 1, "cfg": 4.0, "postcfg_pass": True},
    "sdxl_cfg4_b1": {"family": "sdxl", "batch": 1, "cfg": 4.0},
    "sd3_cfg4_b1": {"family": "sd3", "batch": 1, "cfg": 4.0, "dit_replace": [["double_block", 0]]},
    "sd3_x_cfg4_b1": {"family": "sd3_x", "batch": 1, "cfg": 4.0},
    "flux_cfg1_b2": {"family": "flux", "batch": 2, "cfg": 1.0,
                     "dit_replace": [["double_block", 0], ["single_block", 0]]},
    "flux_cfg3_b1": {"family": "flux", "batch": 1, "cfg": 3.0},
    "flux_kontext_cfg1_b1": {"family": "flux", "batch": 1, "cfg": 1.0, "kontext": True},
    "wan_t2v_cfg4_b1": {"family": "wan_t2v", "batch": 1, "cfg": 4.0, "dit_replace": [["double_block", 0]]},
    "wan_i2v_cfg4_b1": {"family": "wan_i2v", "batch": 1, "cfg": 4.0},
}
STEPS = 2
SAMPLE_SEED = 42
COND_SEED = 1


# ----------------------------------------------------------------------------- value formats
def _own(key) -> bool:
    return isinstance(key, str) and key.startswith(OWN_PREFIX)


def shape_str(t) -> str:
    return "tensor[" + ",".join(str(s) for s in t.shape) + "]"


def fmt(v: Any, depth: int = 0) -> Any:
    """JSON-able *format* of a value: tensors -> shape, objects -> type names, small scalars kept."""
    if torch.is_tensor(v):
        return shape_str(v)
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return round(v, 6)
    if isinstance(v, uuid.UUID):
        return "UUID"
    if isinstance(v, torch.dtype):
        return str(v)
    if isinstance(v, tuple):
        return {"tuple": [fmt(x, depth + 1) for x in v]}
    if isinstance(v, list):
        return [fmt(x, depth + 1) for x in v] if len(v) <= 8 else f"list[len={len(v)}]"
    if isinstance(v, dict):
        return "dict"
    if callable(v):
        return "callable"
    return f"<{type(v).__name__}>"


def type_fmt(v: Any) -> str:
    """Type-only format, e.g. ``tuple[str,int]``, ``list[int]``, ``tensor[2]``, ``list[UUID]``."""
    if torch.is_tensor(v):
        return shape_str(v)
    if v is None:
        return "None"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float, str)):
        return type(v).__name__
    if isinstance(v, uuid.UUID):
        return "UUID"
    if isinstance(v, (tuple, list)):
        inner = sorted({type_fmt(x) for x in v})
        return f"{type(v).__name__}[{','.join(inner) if len(inner) == 1 else ','.join(type_fmt(x) for x in v)}]"
    if isinstance(v, dict):
        return "dict"
    if callable(v):
        return "callable"
    return type(v).__name__


def jsonable(v: Any) -> Any:
    if isinstance(v, (tuple, list)):
        return [jsonable(x) for x in v]
    if torch.is_tensor(v):
        return shape_str(v)
    return fmt(v)


def options_keys(options: dict) -> list:
    return sorted(str(k) for k in options if not _own(k))


def options_formats(options: dict) -> dict:
    return {str(k): type_fmt(v) for k, v in options.items() if not _own(k)}


def options_info(options: dict) -> dict:
    return {k: jsonable(options[k]) for k in INFO_KEYS if k in options}


# ----------------------------------------------------------------------------- attention calls
def layout_of(t, skip_reshape: bool) -> str:
    if t.ndim == 3:
        return "B,L,HD"
    if t.ndim == 4:
        return "B,H,L,D" if skip_reshape else "B,L,H,D"
    return f"rank{t.ndim}"


def row_pattern(t, layout: str) -> str:
    """Runs of identical (``S``) and varying (``V``) token rows of batch row 0."""
    x = t[0].detach().float()
    if layout == "B,H,L,D":
        x = x.transpose(0, 1)
    rows = x.reshape(x.shape[0], -1)
    if rows.shape[0] == 0:
        return ""
    if rows.shape[0] == 1:
        return "V1"
    scale = float(rows.abs().max()) or 1.0
    same = ((rows[1:] - rows[:-1]).abs().amax(dim=1) <= 1e-5 * scale).tolist()
    groups = [1]
    for s in same:
        if s:
            groups[-1] += 1
        else:
            groups.append(1)
    out: list[list] = []
    for g in groups:
        kind = "S" if g > 1 else "V"
        if out and out[-1][0] == kind == "V":
            out[-1][1] += g
        else:
            out.append([kind, g])
    return "+".join(f"{k}{n}" for k, n in out)


def normalize_call(func: Callable, args: tuple, kwargs: dict, txt_len: int | None = None) -> dict:
    """One override call ``override(func, *args, **kwargs)`` -> normalized JSON-able record."""
    q, k, v = args[0], args[1], args[2]
    skip_reshape = bool(kwargs.get("skip_reshape", False))
    if len(args) > 3:
        heads_as, heads = "positional", args[3]
    elif "heads" in kwargs:
        heads_as, heads = "keyword", kwargs["heads"]
    else:
        heads_as, heads = "missing", None
    if len(args) > 4:
        mask_as, mask = "positional", args[4]
    elif "mask" in kwargs:
        mask_as, mask = "keyword", kwargs["mask"]
    else:
        mask_as, mask = "absent", None
    mask_desc = mask_as if mask_as == "absent" else (
        f"{mask_as}:None" if mask is None else f"{mask_as}:rank{mask.ndim}")
    lay = {n: layout_of(t, skip_reshape) for n, t in (("q", q), ("k", k), ("v", v))}
    if skip_reshape:
        n_heads, d, lq, lk = q.shape[1], q.shape[-1], q.shape[2], k.shape[2]
    else:
        n_heads, lq, lk = heads, q.shape[1], k.shape[1]
        d = q.shape[-1] // heads if heads else None
    if lk == lq:
        k_is = "q_len"
    elif txt_len is not None and lk == txt_len:
        k_is = "txt"
    else:
        k_is = "other"
    options = kwargs.get("transformer_options")

    def flag(name):
        return kwargs[name] if name in kwargs else "absent"

    rec = {
        "ev": "attn",
        "backend": getattr(func, "__name__", type(func).__name__),
        "n_args": len(args),
        "kwargs": sorted(kwargs),
        "heads": f"{heads_as}:{heads}",
        "mask": mask_desc,
        "skip_reshape": flag("skip_reshape"),
        "skip_output_reshape": flag("skip_output_reshape"),
        "attn_precision": str(kwargs["attn_precision"]) if "attn_precision" in kwargs else "absent",
        "guard": kwargs.get(GUARD, "absent"),
        "q": f"{lay['q']}{list(q.shape)}", "k": f"{lay['k']}{list(k.shape)}", "v": f"{lay['v']}{list(v.shape)}",
        "H": n_heads, "D": d, "Lq": lq, "Lk": lk, "k_is": k_is,
        "rows": {"q": row_pattern(q, lay["q"]), "k": row_pattern(k, lay["k"])},
    }
    if options is None:
        rec["to_keys"] = None
    else:
        rec["to_keys"] = options_keys(options)
        rec["to_fmt"] = options_formats(options)
        rec["to"] = options_info(options)
    return rec


def make_recorder(log: list, prev: Callable | None = None, txt_len: int | None = None,
                  call_options: dict | None = None) -> Callable:
    """An override that appends :func:`normalize_call` records to ``log`` and chains to ``prev``
    (a previously installed override) or to ``func``. With ``call_options`` (the per-call
    ``transformer_options`` dict the APPLY_MODEL wrapper saw) each record notes whether the override
    received that very dict object."""

    def recording_override(func, *args, **kwargs):
        rec = normalize_call(func, args, kwargs, txt_len)
        if call_options is not None:
            rec["to_is_call_options"] = kwargs.get("transformer_options") is call_options
        out = prev(func, *args, **kwargs) if prev is not None else func(*args, **kwargs)
        rec["out"] = f"{layout_of(out, out.ndim == 4)}{list(out.shape)}" if torch.is_tensor(out) else fmt(out)
        log.append(rec)
        return out

    return recording_override


# ----------------------------------------------------------------------------- model description
def model_attrs(patcher) -> dict:
    model = patcher.model
    dm = model.diffusion_model
    cfg = model.model_config
    out = {
        "model_config": type(cfg).__name__,
        "model_config_mro": [c.__name__ for c in type(cfg).__mro__[:3]],
        "model_base": type(model).__name__,
        "diffusion_model": type(dm).__name__,
        "latent_format": {"channels": model.latent_format.latent_channels,
                          "dims": model.latent_format.latent_dimensions},
    }
    name = type(dm).__name__
    a: dict = {}
    if name == "UNetModel":
        for attr in ("model_channels", "num_heads", "num_head_channels", "in_channels", "out_channels"):
            a[attr] = getattr(dm, attr)
        a["len_input_blocks"] = len(dm.input_blocks)
        a["len_output_blocks"] = len(dm.output_blocks)
        sts = []
        for where, seqs in (("input", list(dm.input_blocks)), ("middle", [dm.middle_block]),
                            ("output", list(dm.output_blocks))):
            for i, seq in enumerate(seqs):
                for mod in seq:
                    if type(mod).__name__ == "SpatialTransformer":
                        tb = mod.transformer_blocks
                        sts.append([where, i, len(tb), type(tb[0]).__name__, tb[0].attn1.heads, tb[0].attn1.dim_head])
        a["spatial_transformers"] = sts
    elif name == "OpenAISignatureMMDITWrapper":
        for attr in ("depth", "num_heads", "hidden_size", "patch_size", "register_length"):
            a[attr] = getattr(dm, attr)
        a["len_joint_blocks"] = len(dm.joint_blocks)
        a["x_block_self_attn"] = [bool(b.x_block.x_block_self_attn) for b in dm.joint_blocks]
        a["context_pre_only"] = [bool(b.context_block.pre_only) for b in dm.joint_blocks]
        a["pos_embed"] = shape_str(dm.pos_embed)
    elif name == "Flux":
        p = dm.params
        a["params"] = {k: jsonable(getattr(p, k)) for k in (
            "in_channels", "out_channels", "vec_in_dim", "context_in_dim", "hidden_size", "num_heads", "depth",
            "depth_single_blocks", "axes_dim", "theta", "patch_size", "guidance_embed")}
        for attr in ("patch_size", "in_channels", "num_heads", "hidden_size"):
            a[attr] = getattr(dm, attr)
        a["len_double_blocks"] = len(dm.double_blocks)
        a["len_single_blocks"] = len(dm.single_blocks)
        a["pe_embedder"] = [type(dm.pe_embedder).__name__, dm.pe_embedder.dim, jsonable(dm.pe_embedder.axes_dim)]
    elif name == "WanModel":
        for attr in ("model_type", "num_layers", "num_heads", "dim", "text_len", "in_dim", "out_dim", "freq_dim"):
            a[attr] = getattr(dm, attr)
        a["patch_size"] = list(dm.patch_size)
        a["len_blocks"] = len(dm.blocks)
        a["cross_attn"] = type(dm.blocks[0].cross_attn).__name__
        a["img_emb"] = None if dm.img_emb is None else type(dm.img_emb).__name__
        a["rope_embedder"] = [type(dm.rope_embedder).__name__, dm.rope_embedder.dim,
                              jsonable(dm.rope_embedder.axes_dim)]
    out["attrs"] = a
    return out


# ----------------------------------------------------------------------------- recorder
class TraceRecorder:
    """Installs recording hooks on a (real or fake) ModelPatcher through ComfyUI's public API."""

    def __init__(self, wrappers_mp, calc_cond_batch: Callable | None = None):
        self.W = wrappers_mp
        self.calc_cond_batch = calc_cond_batch
        self.timeline: list = []
        self.current: dict | None = None
        self.current_options: dict | None = None
        self.pending_order: list = []
        self.counts = {"foreign_override": 0}

    # ---- hooks (plain closures: they survive ModelPatcher.clone()'s deepcopy as the same object)
    def hooks(self) -> dict:
        rec = self

        def apply_model_wrapper(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
            prev = transformer_options.get(OVERRIDE)
            txt_len = c_crossattn.shape[1] if torch.is_tensor(c_crossattn) else None
            sigmas = transformer_options.get("sample_sigmas")
            entry = {
                "class_obj": type(executor.class_obj).__name__,
                "x": fmt(x), "t": fmt(t), "c_concat": fmt(c_concat), "c_crossattn": fmt(c_crossattn),
                "control": fmt(control), "kwargs": {k: fmt(v) for k, v in sorted(kwargs.items())},
                "to_keys": options_keys(transformer_options), "to_fmt": options_formats(transformer_options),
                "cond_or_uncond": jsonable(transformer_options.get("cond_or_uncond")),
                "sample_sigmas_last": None if sigmas is None else float(sigmas[-1]),
                "override_present": prev is not None,
                "marker": transformer_options.get(PASS_MARKER),
                "wrapper_order": rec.pending_order + ["trace"],
                "events": [],
            }
            rec.pending_order = []
            rec.current, rec.current_options = entry, transformer_options
            rec.timeline.append(("apply", entry))
            transformer_options[OVERRIDE] = make_recorder(entry["events"], prev, txt_len, transformer_options)
            try:
                return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
            finally:
                if prev is None:
                    transformer_options.pop(OVERRIDE, None)
                else:
                    transformer_options[OVERRIDE] = prev
                rec.current = rec.current_options = None

        def first_apply_model_wrapper(executor, *args, **kwargs):
            rec.pending_order.append("first")
            return executor(*args, **kwargs)

        def diffusion_model_wrapper(executor, *args, **kwargs):
            rec._event({"ev": "diffusion_model", "class_obj": type(executor.class_obj).__name__,
                        "args": [fmt(a) for a in args], "kwargs": {k: fmt(v) for k, v in sorted(kwargs.items())}})
            return executor(*args, **kwargs)

        def foreign_override(func, *args, **kwargs):
            rec.counts["foreign_override"] += 1
            return func(*args, **kwargs)

        def input_patch(name):
            def patch(n, context, value, extra_options):
                rec._event({"ev": name, "n": fmt(n), "context": fmt(context), "value": fmt(value),
                            "extra_keys": options_keys(extra_options), "extra": rec._extra(extra_options),
                            "extra_is_call_options": extra_options is rec.current_options})
                return n, context, value
            return patch

        def output_patch(name):
            def patch(n, extra_options):
                rec._event({"ev": name, "n": fmt(n), "extra_keys": options_keys(extra_options)})
                return n
            return patch

        def attn_replace(name):
            def replace(q, k, v, extra_options):
                rec._event({"ev": name, "q": fmt(q), "k": fmt(k), "v": fmt(v),
                            "extra_keys": options_keys(extra_options), "extra": rec._extra(extra_options)})
                if q.shape[1] == k.shape[1]:
                    return v  # PAG-style: self-attention replaced by identity
                h = extra_options["n_heads"]
                split = [t.reshape(t.shape[0], t.shape[1], h, -1).transpose(1, 2) for t in (q, k, v)]
                out = torch.nn.functional.scaled_dot_product_attention(*split)
                return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)
            return replace

        def dit_replace(kind, index):
            def replace(args, extra):
                to = args.get("transformer_options")
                rec._event({"ev": "dit_replace", "key": [kind, index],
                            "args": {k: fmt(v) for k, v in sorted(args.items()) if k != "transformer_options"},
                            "args_keys": sorted(args), "extra_keys": sorted(extra),
                            "to_is_call_options": to is rec.current_options})
                return extra["original_block"](args)
            return replace

        def post_cfg(extra_pass):
            def fn(args):
                mo = args["model_options"]
                entry = {"args_keys": sorted(args), "cond_scale": args["cond_scale"],
                         "uncond_is_none": args["uncond"] is None, "sigma": fmt(args["sigma"]),
                         "input": fmt(args["input"]), "denoised": fmt(args["denoised"]),
                         "model_class": type(args["model"]).__name__,
                         "mo_keys": sorted(str(k) for k in mo if not _own(k)),
                         "mo_to_keys": options_keys(mo.get("transformer_options", {}))}
                rec.timeline.append(("post_cfg", entry))
                if extra_pass:
                    mo2 = dict(mo)
                    to2 = dict(mo.get("transformer_options", {}))
                    to2[PASS_MARKER] = "perturbed"
                    mo2["transformer_options"] = to2
                    (ptb,) = rec.calc_cond_batch(args["model"], [args["cond"]], args["input"], args["sigma"], mo2)
                    entry["extra_pass_out"] = fmt(ptb)
                return args["denoised"]
            return fn

        return {"apply_model": apply_model_wrapper, "first_apply_model": first_apply_model_wrapper,
                "diffusion_model": diffusion_model_wrapper, "foreign_override": foreign_override,
                "input_patch": input_patch, "output_patch": output_patch, "attn_replace": attn_replace,
                "dit_replace": dit_replace, "post_cfg": post_cfg}

    def _event(self, ev: dict) -> None:
        if self.current is not None:
            self.current["events"].append(ev)
        else:
            self.timeline.append(("event", ev))

    @staticmethod
    def _extra(extra_options: dict) -> dict:
        keys = INFO_KEYS + ("n_heads", "dim_head", "attn_precision")
        return {k: jsonable(extra_options[k]) if k != "attn_precision" else str(extra_options[k])
                for k in keys if k in extra_options}

    def install(self, patcher, spec: dict) -> None:
        h = self.hooks()
        W = self.W
        if spec.get("foreign_override"):
            patcher.add_wrapper_with_key(W.APPLY_MODEL, "attnlab_first", h["first_apply_model"])
            patcher.model_options["transformer_options"][OVERRIDE] = h["foreign_override"]
        patcher.add_wrapper_with_key(W.APPLY_MODEL, TRACE_KEY, h["apply_model"])
        patcher.add_wrapper_with_key(W.DIFFUSION_MODEL, TRACE_KEY, h["diffusion_model"])
        if spec.get("unet_patches"):
            patcher.set_model_attn1_patch(h["input_patch"]("attn1_patch"))
            patcher.set_model_attn2_patch(h["input_patch"]("attn2_patch"))
            patcher.set_model_attn1_output_patch(h["output_patch"]("attn1_output_patch"))
            patcher.set_model_attn2_output_patch(h["output_patch"]("attn2_output_patch"))
            patcher.set_model_attn1_replace(h["attn_replace"]("attn1_replace"), "middle", 0, 0)
            patcher.set_model_attn2_replace(h["attn_replace"]("attn2_replace"), "output", 1)
        if spec.get("postcfg_pass"):
            patcher.set_model_sampler_post_cfg_function(h["post_cfg"](True))
        for kind, index in spec.get("dit_replace", []):
            patcher.set_model_patch_replace(h["dit_replace"](kind, index), "dit", kind, index)


# ----------------------------------------------------------------------------- scenario runner
def _dedupe(items: list, prefix: str):
    ids, table, seq = {}, {}, []
    for item in items:
        key = json.dumps(item, sort_keys=True)
        if key not in ids:
            ids[key] = f"{prefix}{len(ids)}"
            table[ids[key]] = item
        seq.append(ids[key])
    return table, seq


def run_scenario(backend, name: str, cache: dict | None = None) -> dict:
    """Run scenario ``name`` on ``backend`` and return its normalized trace."""
    spec = SCENARIOS[name]
    family = spec["family"]
    cache = {} if cache is None else cache
    if family not in cache:
        cache[family] = backend.build_tiny(family, seed=0)
    base = cache[family]
    positive, negative = backend.conditioning(family, seed=COND_SEED, uniform_text=True)
    if spec.get("kontext"):
        g = torch.Generator().manual_seed(3)
        ref = torch.randn(1, 16, 8, 8, generator=g)
        positive = [[positive[0][0], dict(positive[0][1], reference_latents=[ref])]]
    n_wrappers_before = len(base.get_all_wrappers(backend.WrappersMP.APPLY_MODEL))
    recorder = TraceRecorder(backend.WrappersMP, backend.calc_cond_batch)
    m = base.clone()
    recorder.install(m, spec)
    out = backend.sample_tiny(m, family, steps=STEPS, cfg=spec["cfg"], batch=spec["batch"],
                              split_calls=bool(spec.get("split_calls")), positive=positive, negative=negative,
                              seed=SAMPLE_SEED)
    applies = [e for kind, e in recorder.timeline if kind == "apply"]
    posts = [e for kind, e in recorder.timeline if kind == "post_cfg"]
    loose = [e for kind, e in recorder.timeline if kind == "event"]
    apply_table, apply_seq = _dedupe(applies, "A")
    post_table, post_seq = _dedupe(posts, "P")
    timeline, ai, pi = [], iter(apply_seq), iter(post_seq)
    for kind, _ in recorder.timeline:
        if kind == "apply":
            timeline.append(next(ai))
        elif kind == "post_cfg":
            timeline.append(next(pi))
    summary = {
        "apply_model_calls": len(applies),
        "attention_calls": sum(1 for a in applies for e in a["events"] if e["ev"] == "attn"),
        "attention_calls_per_apply": [sum(1 for e in a["events"] if e["ev"] == "attn") for a in applies],
        "cond_or_uncond": [a["cond_or_uncond"] for a in applies],
        "x_per_apply": [a["x"] for a in applies],
        "diffusion_model_wrapper_calls": sum(1 for a in applies for e in a["events"] if e["ev"] == "diffusion_model"),
        "post_cfg_calls": len(posts),
        "foreign_override_calls": recorder.counts["foreign_override"],
        "override_leaked_into_model_options": OVERRIDE in m.model_options.get("transformer_options", {})
        and not spec.get("foreign_override"),
        "base_patcher_untouched": len(base.get_all_wrappers(backend.WrappersMP.APPLY_MODEL)) == n_wrappers_before,
        "out": fmt(out),
        "out_finite": bool(torch.isfinite(out).all()),
    }
    trace = {
        "format": FORMAT,
        "scenario": name,
        "setup": dict(spec, steps=STEPS, seed=SAMPLE_SEED, cond_seed=COND_SEED),
        "source": backend.source_info(),
        "model": model_attrs(base),
        "summary": summary,
        "timeline": timeline,
        "applies": apply_table,
        "post_cfg": post_table,
    }
    if loose:
        trace["loose_events"] = loose
    return trace


# ----------------------------------------------------------------------------- I/O and comparison
def _dump(o, indent: int = 0) -> str:
    pad = " " * indent
    if isinstance(o, dict) and o and "ev" not in o and indent < 6:
        items = [f'{pad} {json.dumps(str(k))}: {_dump(v, indent + 1).lstrip()}' for k, v in sorted(o.items())]
        return pad + "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(o, list) and o and any(isinstance(x, dict) for x in o):
        items = [_dump(x, indent + 1) if isinstance(x, dict) and "ev" not in x
                 else pad + " " + json.dumps(x, sort_keys=True) for x in o]
        return pad + "[\n" + ",\n".join(items) + "\n" + pad + "]"
    return pad + json.dumps(o, sort_keys=True)


def dumps_trace(trace: dict) -> str:
    """Stable text form: nested dicts indented, each hook event on one line."""
    return _dump(json.loads(json.dumps(trace))) + "\n"


def write_trace(path, trace: dict) -> None:
    with open(path, "w") as f:
        f.write(dumps_trace(trace))


def load_trace(path) -> dict:
    with open(path) as f:
        return json.load(f)


IGNORED_TOP_KEYS = ("source",)


def compare(expected: dict, actual: dict, limit: int = 60) -> list[str]:
    """Readable differences (``path: expected X, got Y``); empty when the traces agree."""
    diffs: list[str] = []
    actual = json.loads(json.dumps(actual))

    def short(v):
        s = json.dumps(v, sort_keys=True)
        return s if len(s) <= 160 else s[:157] + "..."

    def walk(e, a, path):
        if len(diffs) >= limit:
            return
        if isinstance(e, dict) and isinstance(a, dict):
            for k in sorted(set(e) | set(a)):
                if path == "" and k in IGNORED_TOP_KEYS:
                    continue
                p = f"{path}.{k}" if path else k
                if k not in a:
                    diffs.append(f"{p}: missing in actual (expected {short(e[k])})")
                elif k not in e:
                    diffs.append(f"{p}: unexpected in actual ({short(a[k])})")
                else:
                    walk(e[k], a[k], p)
        elif isinstance(e, list) and isinstance(a, list):
            if len(e) != len(a):
                diffs.append(f"{path}: length {len(a)}, expected {len(e)}")
            for i, (x, y) in enumerate(zip(e, a)):
                walk(x, y, f"{path}[{i}]")
        elif isinstance(e, float) and isinstance(a, (int, float)) and not isinstance(a, bool):
            if not math.isclose(e, a, rel_tol=1e-6, abs_tol=1e-9):
                diffs.append(f"{path}: expected {short(e)}, got {short(a)}")
        elif e != a or type(e) is not type(a):
            diffs.append(f"{path}: expected {short(e)}, got {short(a)}")

    walk(expected, actual, "")
    if len(diffs) >= limit:
        diffs.append(f"... (stopped after {limit} differences)")
    return diffs
