"""Every drag-in workflow in example_workflows/ fits the running ComfyUI: known node types, valid
links, and widget values that line up with each node's widget inputs (as the frontend builds them).

``check_ui_workflow`` is shared with the browser test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO_ROOT / "example_workflows").glob("*.json"))
FRONTEND_ONLY_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
"""Node types the frontend provides itself (not in /object_info)."""
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def load_example(path: Path) -> dict:
    return json.loads(path.read_text())


def widget_inputs(node_info: dict):
    """The node's widget inputs in frontend order; ``control_after_generate`` where the frontend adds one.

    The frontend adds a "control after generate" widget after INT inputs that ask for it and, unless
    ``control_after_generate`` is set to False, after any INT input named ``seed`` or ``noise_seed``
    (seen in the browser test with frontend 1.49).
    """
    names = []
    for section in ("required", "optional"):
        for name in node_info.get("input_order", {}).get(section, []):
            spec = node_info["input"][section][name]
            kind = spec[0]
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if options.get("forceInput"):
                continue
            if kind == "COMBO":  # V3 nodes list a dropdown's choices under "options"
                kind = list(options.get("options", []))
            if isinstance(kind, list) or kind in WIDGET_TYPES:
                names.append((name, kind, options))
                control = options.get("control_after_generate", name in ("seed", "noise_seed"))
                if kind == "INT" and control:
                    names.append(("control_after_generate", "CONTROL", {}))
    return names


def check_ui_workflow(workflow: dict, object_info: dict) -> list:
    """Problems of a UI-format workflow against /object_info (empty when it loads cleanly)."""
    problems = []
    for key in ("nodes", "links", "version"):
        if key not in workflow:
            problems.append(f"missing top-level {key!r}")
    nodes = {node["id"]: node for node in workflow.get("nodes", [])}
    if len(nodes) != len(workflow.get("nodes", [])):
        problems.append("duplicate node ids")
    if workflow.get("last_node_id", 0) < max(nodes, default=0):
        problems.append("last_node_id is smaller than a node id")
    for node in nodes.values():
        for field in ("id", "type", "pos", "size"):
            if field not in node:
                problems.append(f"node {node.get('id')} ({node.get('type')}) has no {field!r}")
        kind = node.get("type")
        if kind in FRONTEND_ONLY_NODES:
            continue
        if kind not in object_info:
            problems.append(f"node {node['id']}: type {kind!r} is not listed by /object_info")
            continue
        info = object_info[kind]
        widgets = widget_inputs(info)
        values = node.get("widgets_values", [])
        if len(values) != len(widgets):
            problems.append(f"node {node['id']} ({kind}): {len(values)} widget values for {len(widgets)} widgets "
                            f"{[w[0] for w in widgets]}")
            continue
        for (name, widget_kind, options), value in zip(widgets, values):
            if widget_kind == "CONTROL":
                if value not in ("fixed", "increment", "decrement", "randomize"):
                    problems.append(f"node {node['id']} ({kind}).{name}: {value!r}")
            elif widget_kind in ("INT", "FLOAT"):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                        widget_kind == "INT" and value != int(value)):
                    problems.append(f"node {node['id']} ({kind}).{name}: {value!r} is not a {widget_kind}")
                elif not options.get("min", -float("inf")) <= value <= options.get("max", float("inf")):
                    problems.append(f"node {node['id']} ({kind}).{name}: {value} outside [{options.get('min')}, "
                                    f"{options.get('max')}]")
            elif widget_kind == "STRING" and not isinstance(value, str):
                problems.append(f"node {node['id']} ({kind}).{name}: {value!r} is not text")
            elif widget_kind == "BOOLEAN" and not isinstance(value, bool):
                problems.append(f"node {node['id']} ({kind}).{name}: {value!r} is not a boolean")
            elif isinstance(widget_kind, list) and name not in _FILE_INPUTS and value not in widget_kind:
                problems.append(f"node {node['id']} ({kind}).{name}: {value!r} is not one of {widget_kind}")
        socket_inputs = {name: spec for section in ("required", "optional")
                         for name, spec in info["input"].get(section, {}).items()}
        for slot in node.get("inputs", []):
            if slot.get("widget"):
                continue
            if slot["name"] not in socket_inputs:
                problems.append(f"node {node['id']} ({kind}) has an input {slot['name']!r} the node does not have")
        linked = {slot["name"] for slot in node.get("inputs", []) if slot.get("link") is not None}
        for name in info["input"].get("required", {}):
            spec = info["input"]["required"][name]
            if not (isinstance(spec[0], list) or spec[0] in WIDGET_TYPES) and name not in linked:
                problems.append(f"node {node['id']} ({kind}): required input {name!r} is not connected")
        for index, output in enumerate(node.get("outputs", [])):
            if output.get("links") and (index >= len(info["output"]) or output["type"] != info["output"][index]):
                problems.append(f"node {node['id']} ({kind}): linked output {index} is {output['type']}, the node "
                                f"gives {list(info['output'])}")
    link_ids = set()
    for link in workflow.get("links", []):
        link_id, source, source_slot, target, target_slot, link_type = link
        link_ids.add(link_id)
        if source not in nodes or target not in nodes:
            problems.append(f"link {link_id} joins a missing node")
            continue
        outputs, inputs = nodes[source]["outputs"], nodes[target]["inputs"]
        if source_slot >= len(outputs) or link_id not in (outputs[source_slot].get("links") or []):
            problems.append(f"link {link_id}: output slot {source_slot} of node {source} does not list it")
            continue
        if target_slot >= len(inputs) or inputs[target_slot].get("link") != link_id:
            problems.append(f"link {link_id}: input slot {target_slot} of node {target} does not point back")
            continue
        accepted = inputs[target_slot]["type"]
        if link_type != outputs[source_slot]["type"] or accepted not in ("*", link_type):
            problems.append(f"link {link_id}: {outputs[source_slot]['type']} into {accepted} "
                            f"({nodes[source]['type']} → {nodes[target]['type']}.{inputs[target_slot]['name']})")
    if workflow.get("last_link_id", 0) < max(link_ids, default=0):
        problems.append("last_link_id is smaller than a link id")
    for node in nodes.values():
        for slot in node.get("inputs", []):
            if slot.get("link") is not None and slot["link"] not in link_ids:
                problems.append(f"node {node['id']}: input {slot['name']!r} points at missing link {slot['link']}")
    return problems


_FILE_INPUTS = {"ckpt_name", "unet_name", "expert_name", "lora_name", "statistics_file"}
"""Dropdowns of the user's own model files: the example names a typical file, which need not exist here."""


def test_there_is_one_example_per_feature():
    names = {path.name for path in EXAMPLES}
    assert {"apply_safety_experts.json", "apply_experts_by_prompt.json", "merge_and_save_experts.json",
            "safetydpo_on_your_finetune.json", "distill_safety_experts.json",
            "save_safe_checkpoint.json"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_workflow_matches_the_running_comfyui(comfyui_server, path):
    workflow = load_example(path)
    problems = check_ui_workflow(workflow, comfyui_server.object_info())
    assert not problems, "\n".join(problems)
    notes = [n for n in workflow["nodes"] if n["type"] in ("Note", "MarkdownNote")]
    assert notes and all(len(n["widgets_values"][0]) > 200 for n in notes), \
        "each example needs a note saying what goes where"


def test_checker_finds_broken_workflows(comfyui_server):
    """The checks above can fail: an unknown node, a shifted widget list and a broken link are reported."""
    info = comfyui_server.object_info()
    workflow = load_example(REPO_ROOT / "example_workflows" / "merge_and_save_experts.json")
    merge = next(n for n in workflow["nodes"] if n["type"] == "SafetyDPOMergeExperts")
    merge["widgets_values"].insert(4, "fixed")
    workflow["nodes"][1]["type"] = "NoSuchNode"
    workflow["links"][0][4] += 1
    problems = "\n".join(check_ui_workflow(workflow, info))
    assert "'NoSuchNode' is not listed" in problems
    assert "SafetyDPOMergeExperts): 9 widget values for 8 widgets" in problems
    assert "does not point back" in problems
