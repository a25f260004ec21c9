"""The attnlab Gradio demo: one tab per method, a model picker, progress through the sampling steps.

    attnlab demo [--port 7860] [--device cpu]          (or: python -m attnlab.demo)
"""

from __future__ import annotations

import functools
import os

from .. import arguments as arg
from . import runs

TITLE = "attnlab — training-free attention methods"
INTRO = ("Every tab runs a method of the pack off and on with the same seed. The embedded **toy-sd** model was "
         "trained by the pack on its synthetic toy world (coloured shapes on patterned backgrounds, 48 px): "
         "prompts in that world's grammar work best, e.g. *a large red star on a plain white background*. "
         "It gets the object colour right and the shape nearly four times in five (one object: colour 100 %, "
         "colour and shape 77.5 % of held-out prompts; two objects both right 51 %); *toy-flux* is its FLUX-architecture sibling. Each tab's default input is "
         "one example on which the method's effect shows (picked on validation scenes by "
         "`benchmarks/demo_defaults.py`); what each method does on average is measured in docs/toyworld.md. "
         "The *tiny-** models have random weights (plumbing only). Type a local diffusers folder (or a hub "
         "id, with internet) for real models.")


# The toy models make 48-px images: show every picture scaled up to its box, with crisp pixels.
CSS = (".attnlab-pixels img { width: 100% !important; height: 100% !important; object-fit: contain; "
       "image-rendering: pixelated; } .attnlab-gallery img { image-rendering: pixelated; }")


def _ui_errors(fn):
    """Bad input becomes a readable message in the UI (gr.Error) instead of a stack trace."""
    import gradio as gr

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, TypeError, NotImplementedError, FileNotFoundError, OSError) as err:
            raise gr.Error(str(err)) from None

    return wrapped


def _progress(progress):
    return lambda frac, desc: progress(frac, desc=desc)


def _steps_seed(steps: int = 20):
    import gradio as gr

    with gr.Row():
        return gr.Slider(1, 50, steps, step=1, label="Steps"), gr.Number(0, precision=0, label="Seed")


def _results(prefix: str, labels, kind: str = "image"):
    """Output components side by side (images or galleries) and a details box, with elem_ids prefix-<n>."""
    import gradio as gr

    with gr.Row():
        if kind == "gallery":
            outs = [gr.Gallery(label=text, columns=3, height=240, elem_id=f"{prefix}-{i}", elem_classes=["attnlab-gallery"])
                    for i, text in enumerate(labels)]
        else:
            outs = [gr.Image(label=text, height=240, elem_id=f"{prefix}-{i}", elem_classes=["attnlab-pixels"])
                    for i, text in enumerate(labels)]
    return outs + [gr.Textbox(label="Details", elem_id=f"{prefix}-info")]


def build_app(store: runs.ModelStore | None = None):
    import gradio as gr

    store = store or runs.ModelStore()
    models = runs.embedded_models()

    with gr.Blocks(title=TITLE) as app:
        gr.Markdown(f"# {TITLE}\n{INTRO}")
        model = gr.Dropdown(models, value=models[0], label="Model", allow_custom_value=True, elem_id="model",
                            info="embedded models, or type a local diffusers folder / hub id")

        with gr.Tab("SoftPAG", elem_id="tab-softpag"):
            with gr.Row():
                with gr.Column():
                    sp_prompt = gr.Textbox("a large red star on a plain white background", label="Prompt",
                                           elem_id="sp-prompt")
                    sp_heads = gr.Dropdown(label="Heads", allow_custom_value=True, elem_id="sp-heads",
                                           info="e.g. 'L7:H3,H5; L9:*', UNet blocks 'm0', or a preset; empty = default")
                    with gr.Row():
                        sp_scale = gr.Slider(0, 10, 3.0, step=0.5, label="Scale w")
                        sp_u = gr.Slider(0, 1, 1.0, step=0.05, label="u (interpolation to identity)")
                    sp_steps, sp_seed = _steps_seed()
                    sp_run = gr.Button("Generate off / on", variant="primary", elem_id="sp-run")
                with gr.Column():
                    sp_out = _results("sp", ["off (stock)", "SoftPAG"])

        with gr.Tab("RefAM", elem_id="tab-refam"):
            with gr.Row():
                with gr.Column():
                    ra_image = gr.Image(type="pil", label="Image", height=240, elem_id="ra-image",
                                        elem_classes=["attnlab-pixels"])
                    with gr.Row():
                        ra_seed = gr.Number(500505, precision=0, label="Scene seed")
                        ra_scene = gr.Button("Make a toy scene", elem_id="ra-scene")
                    ra_expr = gr.Textbox("the square", label="Referring expression", elem_id="ra-expr")
                    with gr.Row():
                        ra_noise = gr.Slider(0.05, 0.95, 0.5, step=0.05, label="Noise level")
                        ra_gas = gr.Radio(["drop", "suppress", "redirect"], value="drop", label="Attention sinks")
                    ra_run = gr.Button("Segment", variant="primary", elem_id="ra-run")
                with gr.Column():
                    ra_out = _results("ra", ["Heatmap overlay", "Mask", "Heatmap"])

        with gr.Tab("Attentive Eraser", elem_id="tab-eraser"):
            with gr.Row():
                with gr.Column():
                    er_editor = gr.ImageMask(type="numpy", label="Paint over the object to remove", elem_id="er-editor",
                                             canvas_size=(64, 64),
                                             brush=gr.Brush(default_size=4, colors=["#000000"], color_mode="fixed"))
                    with gr.Row():
                        er_seed_scene = gr.Number(500402, precision=0, label="Scene seed")
                        er_scene = gr.Button("Load a toy scene", elem_id="er-scene")
                    er_scale = gr.Slider(0, 15, 9.0, step=0.5, label="SARG scale")
                    er_steps, er_seed = _steps_seed(20)
                    er_run = gr.Button("Erase", variant="primary", elem_id="er-run")
                with gr.Column():
                    er_out = _results("er", ["input", "plain inpainting (s = 0)", "Attentive Eraser"])

        with gr.Tab("Entropy scaling", elem_id="tab-entropy"):
            with gr.Row():
                with gr.Column():
                    en_prompt = gr.Textbox("a medium green star on a striped black and gray background", label="Prompt",
                                           elem_id="en-prompt")
                    en_res = gr.Slider(0.5, 3.0, 2.0, step=0.25, label="Resolution (× native size)", elem_id="en-res")
                    en_steps, en_seed = _steps_seed()
                    en_run = gr.Button("Generate off / on", variant="primary", elem_id="en-run")
                with gr.Column():
                    en_out = _results("en", ["stock", "entropy scaling"])

        with gr.Tab("AlignedGen", elem_id="tab-alignedgen"):
            with gr.Row():
                with gr.Column():
                    ag_prompts = gr.Textbox("a small orange star\na small orange circle\na large red star",
                                            lines=4, label="Prompts, one per line (the first is the style reference)",
                                            elem_id="ag-prompts")
                    ag_steps, ag_seed = _steps_seed()
                    ag_run = gr.Button("Generate plain / aligned", variant="primary", elem_id="ag-run")
                with gr.Column():
                    ag_out = _results("ag", ["plain batch", "style-aligned batch"], kind="gallery")

        with gr.Tab("FreeSwim", elem_id="tab-freeswim"):
            with gr.Row():
                with gr.Column():
                    fs_prompt = gr.Textbox("a small yellow star left of a medium blue circle on a black to brown gradient background",
                                           label="Prompt", elem_id="fs-prompt")
                    fs_scale = gr.Slider(1.25, 4.0, 2.0, step=0.25, label="Target size (× native side)", elem_id="fs-scale")
                    fs_steps, fs_seed = _steps_seed()
                    fs_run = gr.Button("Generate direct / FreeSwim", variant="primary", elem_id="fs-run")
                with gr.Column():
                    fs_out = _results("fs", ["direct sampling", "FreeSwim (two stages)"])

        # --- events --------------------------------------------------------------------------------
        @_ui_errors
        def heads_for(name):
            choices = runs.softpag_choices(store, name)
            return gr.Dropdown(choices=choices, value=choices[0])

        @_ui_errors
        def softpag(name, prompt, heads, scale, u, steps, seed, progress=gr.Progress()):
            return runs.run_softpag(store, name, prompt, heads, scale, u, steps, seed, _progress(progress))

        @_ui_errors
        def scene(seed):
            return runs.toy_scene(seed)

        @_ui_errors
        def refam(name, image, expr, noise, gas, progress=gr.Progress()):
            return runs.run_refam(store, name, image, expr, noise, gas, _progress(progress))

        @_ui_errors
        def eraser_scene(seed):
            return runs.eraser_scene(seed)

        @_ui_errors
        def eraser(name, editor, scale, steps, seed, progress=gr.Progress()):
            return runs.run_eraser(store, name, editor, scale, steps, seed, _progress(progress))

        @_ui_errors
        def entropy(name, prompt, res, steps, seed, progress=gr.Progress()):
            return runs.run_entropy(store, name, prompt, res, steps, seed, progress=_progress(progress))

        @_ui_errors
        def alignedgen(name, prompts, steps, seed, progress=gr.Progress()):
            return runs.run_alignedgen(store, name, prompts, steps, seed, _progress(progress))

        @_ui_errors
        def freeswim(name, prompt, scale, steps, seed, progress=gr.Progress()):
            return runs.run_freeswim(store, name, prompt, scale, steps, seed, _progress(progress))

        model.change(heads_for, model, sp_heads, api_name="heads")
        app.load(heads_for, model, sp_heads)
        sp_run.click(softpag, [model, sp_prompt, sp_heads, sp_scale, sp_u, sp_steps, sp_seed],
                     sp_out, api_name="softpag")
        ra_scene.click(scene, ra_seed, [ra_image, ra_expr], api_name="toy_scene")
        ra_run.click(refam, [model, ra_image, ra_expr, ra_noise, ra_gas], ra_out, api_name="refam")
        er_scene.click(eraser_scene, er_seed_scene, er_editor, api_name="eraser_scene")
        er_run.click(eraser, [model, er_editor, er_scale, er_steps, er_seed], er_out, api_name="eraser")
        en_run.click(entropy, [model, en_prompt, en_res, en_steps, en_seed], en_out, api_name="entropy")
        ag_run.click(alignedgen, [model, ag_prompts, ag_steps, ag_seed], ag_out, api_name="alignedgen")
        fs_run.click(freeswim, [model, fs_prompt, fs_scale, fs_steps, fs_seed], fs_out, api_name="freeswim")
    return app


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    ap = arg.OneLineParser(prog="attnlab demo", description="The attnlab Gradio demo (one tab per method).")
    ap.add_argument("--host", type=arg.non_empty, default="127.0.0.1", help="address to listen on (default: %(default)s)")
    ap.add_argument("--port", type=arg.int_in(1, 65535), default=7860, help="port (default: %(default)s)")
    ap.add_argument("--device", type=arg.device, default="cpu", help="torch device for the models (default: %(default)s)")
    ap.add_argument("--share", action="store_true", help="also make a public gradio.live link (needs internet)")
    args = ap.parse_args(argv)
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("attnlab demo needs gradio: pip install 'attnlab[demo]' (gradio==6.31.0)")
        return 2
    app = build_app(runs.ModelStore(args.device))
    app.queue(default_concurrency_limit=2).launch(server_name=args.host, server_port=args.port, share=args.share,
                                                        css=CSS)
    return 0
