"""A real ComfyUI server on loopback with this pack loaded: the example workflow, converted to an API
prompt, runs; the node changes the result at strength 1 and not at strength 0; bad input gives a clear
error. Runs when COMFYUI_DIR points at a ComfyUI checkout whose dependencies this interpreter has."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

import real_comfy
from workflow_tools import load_workflows, ui_to_api

pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not real_comfy.comfy_available(), reason="needs COMFYUI_DIR with ComfyUI importable")]

ROOT = Path(__file__).resolve().parent.parent


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def _post(url, data):
    req = urllib.request.Request(url, data=json.dumps(data).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("comfy")
    packs = tmp / "custom_nodes"
    packs.mkdir()
    (packs / "attnlab").symlink_to(ROOT)
    (packs / "attnlab_test_pack").symlink_to(ROOT / "tests" / "comfy_test_pack" / "attnlab_test_pack")
    (tmp / "extra.yaml").write_text(f"attnlab:\n    custom_nodes: {packs}\n")
    port = _free_port()
    log = open(tmp / "server.log", "w")
    env = dict(os.environ)  # the server runs in COMFYUI_DIR: keep relative PYTHONPATH entries working
    env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p)
    proc = subprocess.Popen(
        [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
         "--database-url", "sqlite:///:memory:", "--extra-model-paths-config", str(tmp / "extra.yaml"),
         "--output-directory", str(tmp / "output"), "--disable-all-custom-nodes",
         "--whitelist-custom-nodes", "attnlab", "attnlab_test_pack"],
        cwd=real_comfy.comfy_dir(), env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(180):
            try:
                _get(f"{url}/object_info/AttnlabEntropyScaling")
                break
            except Exception:
                if proc.poll() is not None:
                    raise RuntimeError((tmp / "server.log").read_text()[-3000:])
                time.sleep(0.5)
        else:
            raise RuntimeError("ComfyUI did not come up:\n" + (tmp / "server.log").read_text()[-3000:])
        yield url, tmp
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _tiny_prompt(strength=1.0, token_count="joint"):
    """The SD1.5 entropy example workflow on the test pack's tiny model (see `_workflow_prompt`)."""
    return _workflow_prompt("entropy_scaling_sd15.json", "sd15", "AttnlabEntropyScaling", f"latents/s{strength}",
                            strength=strength, token_count=token_count)


def _workflow_prompt(workflow: str, family: str, node_type: str, prefix: str, **node_inputs):
    """An example workflow as an API prompt, with the model files swapped for the test pack's tiny seeded
    `family` model and conditionings, a small latent, 2 steps, the image save replaced by SaveLatent
    (files `prefix`_*.latent) and `node_inputs` set on the attnlab node."""
    prompt = ui_to_api(load_workflows()[workflow])
    by_type = {}
    for node_id, node in prompt.items():
        by_type.setdefault(node["class_type"], []).append(node_id)
    ckpt = by_type["CheckpointLoaderSimple"][0]
    prompt[ckpt] = {"class_type": "AttnlabTestTinyModel", "inputs": {"family": family, "seed": 0}}
    for i, node_id in enumerate(by_type["CLIPTextEncode"]):
        prompt[node_id] = {"class_type": "AttnlabTestTinyConditioning",
                           "inputs": {"family": family, "seed": 0, "negative": i == 1}}
    prompt[by_type["EmptyLatentImage"][0]]["inputs"].update(width=128, height=128)
    ks = prompt[by_type["KSampler"][0]]["inputs"]
    ks.update(steps=2)
    sampler_id = by_type["KSampler"][0]
    for node_id in by_type["VAEDecode"] + by_type["SaveImage"]:
        del prompt[node_id]
    prompt["99"] = {"class_type": "SaveLatent", "inputs": {"samples": [sampler_id, 0], "filename_prefix": prefix}}
    prompt[by_type[node_type][0]]["inputs"].update(node_inputs)
    return prompt


def _run(url, prompt):
    status, reply = _post(f"{url}/prompt", {"prompt": prompt})
    assert status == 200 and reply["node_errors"] == {}, reply
    for _ in range(240):
        history = _get(f"{url}/history/{reply['prompt_id']}")
        if reply["prompt_id"] in history and history[reply["prompt_id"]]["status"].get("completed") is not None:
            return history[reply["prompt_id"]]
        time.sleep(0.25)
    raise TimeoutError("prompt did not finish")


def _latent(tmp, strength):
    return _saved(tmp, f"s{strength}")


def _saved(tmp, stem):
    from safetensors.torch import load_file

    files = sorted((tmp / "output" / "latents").glob(f"{stem}_*.latent"))
    return load_file(str(files[-1]))["latent_tensor"]


def test_example_workflow_runs_and_the_node_acts(server):
    url, tmp = server
    info = _get(f"{url}/object_info/AttnlabEntropyScaling")["AttnlabEntropyScaling"]
    assert info["display_name"] == "Entropy Scaling" and info["category"] == "attnlab"
    on = _run(url, _tiny_prompt(1.0))
    off = _run(url, _tiny_prompt(0.0))
    assert on["status"]["status_str"] == "success" and off["status"]["status_str"] == "success"
    a, b = _latent(tmp, 1.0), _latent(tmp, 0.0)
    assert torch.isfinite(a).all() and not torch.equal(a, b)


def test_stock_and_zero_strength_agree_bit_for_bit(server):
    url, tmp = server
    prompt = _tiny_prompt(0.0)
    ent_id = next(k for k, v in prompt.items() if v["class_type"] == "AttnlabEntropyScaling")
    ks_id = next(k for k, v in prompt.items() if v["class_type"] == "KSampler")
    prompt[ks_id]["inputs"]["model"] = prompt[ent_id]["inputs"]["model"]  # bypass the node
    del prompt[ent_id]
    prompt["99"]["inputs"]["filename_prefix"] = "latents/stock"
    assert _run(url, prompt)["status"]["status_str"] == "success"
    _run(url, _tiny_prompt(0.0))
    from safetensors.torch import load_file

    stock = load_file(str(sorted((tmp / "output" / "latents").glob("stock_*.latent"))[-1]))["latent_tensor"]
    assert torch.equal(stock, _latent(tmp, 0.0))


def test_bad_combo_value_gives_a_clear_error(server):
    url, _ = server
    result = _run(url, _tiny_prompt(1.0, token_count="pixels"))
    assert result["status"]["status_str"] == "error"
    messages = json.dumps(result["status"]["messages"])
    assert "token_count must be one of" in messages


def test_example_workflows_are_served_as_templates(server):
    url, _ = server
    templates = _get(f"{url}/workflow_templates")
    assert sorted(templates["attnlab"]) == sorted(p.stem for p in (ROOT / "workflows").glob("*.json"))


def test_softpag_workflow_runs_and_the_node_acts(server):
    """The SDXL SoftPAG example (heads 'm0', CFG 4) on the tiny SDXL model: it perturbs, scale 0 is the
    stock sampler bit for bit."""
    url, tmp = server
    info = _get(f"{url}/object_info/AttnlabSoftPAG")["AttnlabSoftPAG"]
    assert info["category"] == "attnlab" and "sd3-medium-layers-7-10" in json.dumps(info["input"]["required"]["preset"])
    on = _run(url, _workflow_prompt("softpag_sdxl.json", "sdxl", "AttnlabSoftPAG", "latents/pag_on", scale=3.0))
    off = _run(url, _workflow_prompt("softpag_sdxl.json", "sdxl", "AttnlabSoftPAG", "latents/pag_off", scale=0.0))
    stock = _workflow_prompt("softpag_sdxl.json", "sdxl", "AttnlabSoftPAG", "latents/pag_stock")
    node = next(k for k, v in stock.items() if v["class_type"] == "AttnlabSoftPAG")
    sampler = next(k for k, v in stock.items() if v["class_type"] == "KSampler")
    stock[sampler]["inputs"]["model"] = stock[node]["inputs"]["model"]
    del stock[node]
    for result in (on, off, _run(url, stock)):
        assert result["status"]["status_str"] == "success"
    a, b, c = _saved(tmp, "pag_on"), _saved(tmp, "pag_off"), _saved(tmp, "pag_stock")
    assert torch.isfinite(a).all() and not torch.equal(a, c)
    assert torch.equal(b, c)


def test_softpag_bad_heads_give_a_clear_error(server):
    url, _ = server
    result = _run(url, _workflow_prompt("softpag_sdxl.json", "sdxl", "AttnlabSoftPAG", "latents/pag_bad", heads="L99:*"))
    assert result["status"]["status_str"] == "error"
    assert "layer 99 is out of range" in json.dumps(result["status"]["messages"])
