"""The pack inside a real ComfyUI server (subprocess, --cpu), driven over HTTP like a user's frontend.

The server and its models come from conftest.py (one server for every e2e test).
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from scripts import demo  # the repository root is on sys.path: conftest.py
from scripts.comfy_server import PromptExecutionError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE_WORKFLOW = os.path.join(ROOT, "example_workflows", "wan21_t2v_quantdit.json")
SAVE_WORKFLOW = os.path.join(ROOT, "example_workflows", "quantize_and_save_dit.json")
BF16 = demo.VARIANT["bf16"]
INT8 = demo.VARIANT["int8-lightx2v"]
TRUNCATED_NAME = "wan21_tiny_int8_truncated.safetensors"
# EmptyHunyuanLatentVideo 64x64x5 with Wan's 8x spatial / 4x temporal compression.
EXPECTED_LATENT_SHAPE = [1, 16, (5 - 1) // 4 + 1, 64 // 8, 64 // 8]


@pytest.fixture(scope="module")
def bf16_latent(server):
    result = server.run_prompt(demo.build_prompt(BF16.file_name, baseline=True, filename_prefix="e2e_bf16"))
    return demo.load_latent(demo.saved_latent(server, result))


def combo_options(spec) -> list:
    """Options of a combo input in /object_info: [[...], {...}] (V1 nodes) or ["COMBO", {"options": [...]}]."""
    if isinstance(spec[0], list):
        return spec[0]
    assert spec[0] == "COMBO", spec
    return spec[1]["options"]


@pytest.mark.e2e
def test_object_info_lists_quantdit_loader(server):
    info = server.object_info()
    assert "QuantDiTLoader" in info, "the pack's node is not registered in the running server"
    node = info["QuantDiTLoader"]
    required = node["input"]["required"]
    assert node["input_order"]["required"] == ["unet_name", "backend", "compute_dtype"]
    assert {BF16.file_name, INT8.file_name} <= set(combo_options(required["unet_name"]))
    assert "auto" in combo_options(required["backend"])
    assert combo_options(required["compute_dtype"]) == ["default", "bf16", "fp16", "fp32"]
    assert node["output"] == ["MODEL", "STRING"]
    assert node["category"].startswith("QuantDiT")


@pytest.mark.e2e
def test_int8_lightx2v_workflow_matches_bf16(server, bf16_latent):
    assert list(bf16_latent.shape) == EXPECTED_LATENT_SHAPE
    prompt = demo.build_prompt(INT8.file_name, filename_prefix="e2e_int8")
    assert prompt[demo.LOADER_NODE]["class_type"] == "QuantDiTLoader"
    result = server.run_prompt(prompt)
    assert result.history["status"]["status_str"] == "success"
    assert result.seconds is not None and result.seconds > 0
    path = demo.saved_latent(server, result)
    assert os.path.isfile(path) and os.path.basename(path).startswith("e2e_int8")
    latent = demo.load_latent(path)
    assert list(latent.shape) == list(bf16_latent.shape)
    assert torch.isfinite(latent).all()
    err = demo.rel_l2(latent, bf16_latent)
    assert err < 0.05, f"int8 W8A8 output is {err:.4f} (relative L2) from bf16"
    assert err > 0, "identical to bf16: the quantized path did not run"


@pytest.mark.e2e
def test_truncated_file_fails_with_a_message_naming_it(server, models):
    folder, paths = models
    with open(paths[INT8.key], "rb") as f:
        data = f.read()
    with open(os.path.join(folder, "diffusion_models", TRUNCATED_NAME), "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(PromptExecutionError) as caught:
        server.run_prompt(demo.build_prompt(TRUNCATED_NAME, filename_prefix="e2e_truncated"))
    err = caught.value
    assert err.node_type == "QuantDiTLoader"
    assert TRUNCATED_NAME in err.exception_message and "truncated" in err.exception_message, err.exception_message
    # The server survives a bad file.
    assert server.object_info("QuantDiTLoader")["output"] == ["MODEL", "STRING"]


@pytest.mark.e2e
def test_hardware_probe_scheme_wired_into_quantize_model(server, bf16_latent):
    """The probe's dit_scheme output (a COMBO) drives Quantize Model's scheme input through the
    server's own validation and execution."""
    info = server.object_info("QuantDiTHardwareProbe")
    assert info["output"] == ["COMBO", "COMBO", "STRING"] and info["output_name"][:2] == ["dit_scheme", "encoder_scheme"]
    prompt = demo.build_prompt(BF16.file_name, baseline=True, filename_prefix="e2e_probe")
    sampler = next(k for k, v in prompt.items() if v["class_type"] == "KSampler")
    prompt["90"] = {"class_type": "QuantDiTHardwareProbe", "inputs": {}}
    prompt["91"] = {"class_type": "QuantDiTQuantizeModel",
                    "inputs": {"model": prompt[sampler]["inputs"]["model"], "scheme": ["90", 0], "backend": "auto",
                               "skip_patterns": "", "keep_small_m_layers": False, "quantize_modulation": True}}
    prompt[sampler]["inputs"]["model"] = ["91", 0]
    result = server.run_prompt(prompt)
    assert result.history["status"]["status_str"] == "success"
    latent = demo.load_latent(demo.saved_latent(server, result))
    # The CPU server gets int8 weight-only (0.36% from bf16 on the tiny Wan of test_quantize_node).
    err = demo.rel_l2(latent, bf16_latent)
    assert 0 < err < 0.02, f"probe-driven quantized output is {err:.4f} (relative L2) from bf16"


# --- example_workflows/wan21_t2v_quantdit.json against the running server -------------------------
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
MODEL_FILE_INPUTS = {"unet_name", "clip_name", "vae_name"}  # real users' files: not on this server


def _inputs(node_info) -> list[tuple[str, list, bool]]:
    """(name, spec, required) in the order the frontend lays them out."""
    out = []
    for section in ("required", "optional"):
        specs = node_info["input"].get(section, {})
        for name in node_info.get("input_order", {}).get(section, list(specs)):
            out.append((name, specs[name], section == "required"))
    return out


def _is_widget(spec) -> bool:
    return isinstance(spec[0], list) or spec[0] in WIDGET_TYPES


MISSING = object()  # a widget input with no value left in widgets_values


def _widgets(node, node_info):
    """Pairs a UI node's widgets_values with the widget inputs it does not link, in the frontend's
    order: ([(name, spec, required, value or MISSING, control value or None)], values left over)."""
    values = list(node.get("widgets_values", []))
    linked = {i["name"] for i in node.get("inputs", []) if i.get("link") is not None}
    pairs = []
    for name, spec, required in _inputs(node_info):
        if not _is_widget(spec) or name in linked:
            continue
        if not values:
            pairs.append((name, spec, required, MISSING, None))
            continue
        value = values.pop(0)
        opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        control = (values.pop(0) if values else MISSING) if opts.get("control_after_generate") else None
        pairs.append((name, spec, required, value, control))
    return pairs, values


def _check_widgets(node, node_info, problems):
    where = f"node {node['id']} ({node['type']})"
    pairs, values = _widgets(node, node_info)
    for name, spec, required, value, control in pairs:
        if value is MISSING:
            if required:
                problems.append(f"{where}: no widget value for {name}")
            continue
        opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        if opts.get("control_after_generate") and control not in ("fixed", "increment", "decrement", "randomize"):
            problems.append(f"{where}: {name} control_after_generate value {None if control is MISSING else control!r}")
        kind = "COMBO" if isinstance(spec[0], list) else spec[0]
        if kind == "COMBO":
            if name not in MODEL_FILE_INPUTS and value not in combo_options(spec):
                problems.append(f"{where}: {name}={value!r} is not one of {combo_options(spec)}")
            if name in MODEL_FILE_INPUTS and not str(value).endswith((".safetensors", ".pth")):
                problems.append(f"{where}: {name}={value!r} is not a .safetensors or .pth file name")
        elif kind in ("INT", "FLOAT"):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    (kind == "INT" and not isinstance(value, int)):
                problems.append(f"{where}: {name}={value!r} is not {kind}")
            elif not opts.get("min", value) <= value <= opts.get("max", value):
                problems.append(f"{where}: {name}={value} outside [{opts.get('min')}, {opts.get('max')}]")
            elif kind == "INT" and opts.get("step", 1) > 1 and (value - opts.get("min", 0)) % opts["step"]:
                problems.append(f"{where}: {name}={value} is off the widget's step {opts['step']}")
        elif kind == "BOOLEAN" and not isinstance(value, bool):
            problems.append(f"{where}: {name}={value!r} is not a boolean")
        elif kind == "STRING" and not isinstance(value, str):
            problems.append(f"{where}: {name}={value!r} is not a string")
    if values:
        problems.append(f"{where}: {len(values)} widget values left over: {values}")


def workflow_problems(wf: dict, info: dict) -> list[str]:
    """Everything in a UI-format workflow that the running server would not accept as the frontend
    lays it out: dangling or mistyped links, unconnected required inputs, widget values out of place."""
    nodes = {n["id"]: n for n in wf["nodes"]}
    problems = []
    link_ids = set()
    for link_id, src_id, src_slot, dst_id, dst_slot, link_type in wf["links"]:
        link_ids.add(link_id)
        src, dst = nodes.get(src_id), nodes.get(dst_id)
        if src is None or dst is None:
            problems.append(f"link {link_id}: node {src_id if src is None else dst_id} does not exist")
            continue
        src_info, dst_info = info[src["type"]], info[dst["type"]]
        # output side: the server's output type at that slot, and the node's own record of the link
        if src_slot >= len(src_info["output"]):
            problems.append(f"link {link_id}: {src['type']} has no output slot {src_slot}")
            continue
        out_type = src_info["output"][src_slot]
        out = src["outputs"][src_slot]
        if link_id not in (out.get("links") or []) or out["type"] != out_type:
            problems.append(f"link {link_id}: {src['type']} output {src_slot} is {out} (server: {out_type})")
        # input side: the slot holds this link, and the server's input of that name takes this type
        if dst_slot >= len(dst["inputs"]) or dst["inputs"][dst_slot].get("link") != link_id:
            problems.append(f"link {link_id}: {dst['type']} input slot {dst_slot} does not hold it")
            continue
        name = dst["inputs"][dst_slot]["name"]
        spec = {n: s for n, s, _ in _inputs(dst_info)}.get(name)
        if spec is None:
            problems.append(f"link {link_id}: {dst['type']} has no input {name!r}")
            continue
        in_type = "COMBO" if isinstance(spec[0], list) else spec[0]
        if not (out_type == in_type == link_type):
            problems.append(f"link {link_id}: {src['type']}.{out_type} -> {dst['type']}.{name} ({in_type}), "
                            f"link says {link_type}")
    for n in wf["nodes"]:
        node_info = info[n["type"]]
        # every socket input is connected, and every link a node records is in the links array
        linked = {i["name"] for i in n.get("inputs", []) if i.get("link") is not None}
        for name, spec, required in _inputs(node_info):
            if required and not _is_widget(spec) and name not in linked:
                problems.append(f"node {n['id']} ({n['type']}): required input {name} is not connected")
        for i in n.get("inputs", []):
            if i.get("link") is not None and i["link"] not in link_ids:
                problems.append(f"node {n['id']}: input {i['name']} names unknown link {i['link']}")
        for o in n.get("outputs", []):
            for l in o.get("links") or []:
                if l not in link_ids:
                    problems.append(f"node {n['id']}: output {o['name']} names unknown link {l}")
        _check_widgets(n, node_info, problems)
    return problems


@pytest.mark.e2e
def test_example_workflow_matches_server(server):
    with open(EXAMPLE_WORKFLOW, encoding="utf-8") as f:
        wf = json.load(f)
    info = server.object_info()
    assert wf["version"] == 0.4
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]), "duplicate node ids"
    missing = sorted({n["type"] for n in wf["nodes"]} - set(info))
    assert not missing, f"node types the server does not have: {missing}"
    assert {n["type"] for n in wf["nodes"]} >= {"QuantDiTLoader", "QuantDiTT5Loader", "VAELoader", "CLIPTextEncode",
                                                "EmptyHunyuanLatentVideo", "KSampler", "VAEDecode",
                                                "SaveAnimatedWEBP"}
    assert wf["last_node_id"] >= max(nodes) and wf["last_link_id"] >= max(l[0] for l in wf["links"])

    problems = workflow_problems(wf, info)
    assert not problems, "\n".join(problems)

    # what real users get
    by_type = {}
    for n in wf["nodes"]:
        by_type.setdefault(n["type"], []).append(n)
    assert by_type["QuantDiTLoader"][0]["widgets_values"][0] == "wan2.1_t2v_1.3B_int8_lightx2v.safetensors"
    assert by_type["QuantDiTT5Loader"][0]["widgets_values"] == ["models_t5_umt5-xxl-enc-int8.pth", "auto"]
    assert by_type["VAELoader"][0]["widgets_values"] == ["wan_2.1_vae.safetensors"]
    assert by_type["EmptyHunyuanLatentVideo"][0]["widgets_values"][:3] == [832, 480, 33]
    ks = by_type["KSampler"][0]["widgets_values"]
    assert (ks[2], ks[3], ks[4], ks[5]) == (30, 6, "uni_pc", "simple")
    assert len(by_type["CLIPTextEncode"]) == 2


def api_prompt(wf: dict, info: dict) -> dict:
    """The API-format prompt the frontend queues for a UI-format workflow (one workflow_problems
    accepts): links become [node id, slot], widget values take their inputs' names in order."""
    links = {link[0]: link for link in wf["links"]}
    prompt = {}
    for n in wf["nodes"]:
        inputs = {i["name"]: [str(links[i["link"]][1]), links[i["link"]][2]]
                  for i in n.get("inputs", []) if i.get("link") is not None}
        inputs.update((name, value) for name, _, _, value, _ in _widgets(n, info[n["type"]])[0] if value is not MISSING)
        prompt[str(n["id"])] = {"class_type": n["type"], "inputs": inputs}
    return prompt


@pytest.mark.e2e
def test_quantize_and_save_workflow_writes_a_file_the_loader_runs(server, bf16_latent):
    """example_workflows/quantize_and_save_dit.json, run by the server on the demo's bf16 DiT; the
    file it saves then runs through Load Quantized DiT -> KSampler."""
    with open(SAVE_WORKFLOW, encoding="utf-8") as f:
        wf = json.load(f)
    info = server.object_info()
    problems = workflow_problems(wf, info)
    assert not problems, "\n".join(problems)
    prompt = api_prompt(wf, info)
    by_type = {v["class_type"]: v["inputs"] for v in prompt.values()}
    assert set(by_type) == {"UNETLoader", "QuantDiTQuantizeModel", "QuantDiTSaveQuantized"}
    assert by_type["UNETLoader"]["unet_name"] == "wan2.1_t2v_14B_bf16.safetensors"  # what real users get
    assert by_type["QuantDiTQuantizeModel"]["scheme"] == "int8-w8a8"
    by_type["UNETLoader"]["unet_name"] = BF16.file_name
    by_type["QuantDiTSaveQuantized"]["filename_prefix"] = "e2e_saved/wan"
    result = server.run_prompt(prompt)
    assert result.history["status"]["status_str"] == "success"
    save_id = next(k for k, v in prompt.items() if v["class_type"] == "QuantDiTSaveQuantized")
    report = result.history["outputs"][save_id]["text"][0]  # the report the node shows
    saved = report.splitlines()[0].removeprefix("QuantDiT: saved ").removesuffix(" in models/diffusion_models")
    assert saved.startswith("e2e_saved/wan_") and saved.endswith(".safetensors"), report
    run = server.run_prompt(demo.build_prompt(saved, filename_prefix="e2e_saved_run"))
    err = demo.rel_l2(demo.load_latent(demo.saved_latent(server, run)), bf16_latent)
    assert 0 < err < 0.05, f"the saved int8 model's output is {err:.4f} (relative L2) from bf16"
