"""The example workflows in a real browser: headless Chromium loads ComfyUI's own frontend from the
test server, drops each example_workflows/*.json in through ``app.loadGraphData`` (what drag-and-drop
calls) and checks that every node type is known to the frontend (no missing-node warning) and that
every widget got the value the file holds. A screenshot of each is kept under the pytest temp folder
(``browser_screenshots/``).

Chromium is driven over the Chrome DevTools Protocol with aiohttp's websocket client (aiohttp comes
with ComfyUI's requirements). Install the browser with ``apt-get install -y chromium``; without it the
test skips and says so.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from comfyui_safetydpo import lora_files

from test_example_workflows import EXAMPLES, FRONTEND_ONLY_NODES, load_example
from test_nodes_comfyui import attention_modules, random_expert

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-extensions", "--window-size=1600,1000")
PAGE_TIMEOUT = 120.0


@pytest.fixture(scope="module")
def chromium() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no Chromium found (looked for chromium, chromium-browser, google-chrome): install it with "
                "`apt-get install -y chromium` to run the browser check of example_workflows/")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DevTools:
    """The smallest CDP client: one page, commands answered in order, JavaScript evaluation."""

    def __init__(self, websocket):
        self.websocket = websocket
        self.next_id = 0

    async def call(self, method: str, **params):
        self.next_id += 1
        ident = self.next_id
        await self.websocket.send_json({"id": ident, "method": method, "params": params})
        while True:
            message = await asyncio.wait_for(self.websocket.receive_json(), timeout=PAGE_TIMEOUT)
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    async def evaluate(self, expression: str, await_promise: bool = True):
        result = await self.call("Runtime.evaluate", expression=expression, awaitPromise=await_promise,
                                 returnByValue=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise RuntimeError(details.get("exception", {}).get("description") or json.dumps(details)[:2000])
        return result["result"].get("value")


_GRAPH_STATE = """(() => {
  const nodes = app.graph._nodes;
  return {
    count: nodes.length,
    unregistered: nodes.filter(n => !LiteGraph.registered_node_types[n.type]).map(n => `${n.id}:${n.type}`),
    flagged: nodes.filter(n => n.has_errors).map(n => `${n.id}:${n.type}`),
    widgets: Object.fromEntries(nodes.map(n => [n.id, (n.widgets || []).map(w => [w.name, w.value])])),
  };
})()"""


async def _close_dialogs(tools: DevTools) -> None:
    """Close first-run dialogs (the template browser) so the screenshot shows the graph."""
    for _ in range(3):
        open_dialogs = await tools.evaluate("document.querySelectorAll('[role=dialog]').length", False)
        if not open_dialogs:
            return
        for kind in ("keyDown", "keyUp"):
            await tools.call("Input.dispatchKeyEvent", type=kind, key="Escape", code="Escape",
                             windowsVirtualKeyCode=27)
        await asyncio.sleep(0.5)


async def _inspect_examples(browser: str, url: str, examples, shots: Path, profile: Path):
    import aiohttp

    port = _free_port()
    process = subprocess.Popen([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                f"--remote-debugging-port={port}", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = {}
    try:
        async with aiohttp.ClientSession() as session:
            deadline = time.time() + 30
            while True:
                try:
                    async with session.get(f"http://127.0.0.1:{port}/json/list") as response:
                        pages = [p for p in await response.json() if p["type"] == "page"]
                    if pages:
                        break
                except aiohttp.ClientError:
                    pass
                if time.time() > deadline or process.poll() is not None:
                    raise RuntimeError("Chromium did not open its DevTools port")
                await asyncio.sleep(0.2)
            async with session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0) as websocket:
                tools = DevTools(websocket)
                await tools.call("Page.enable")
                await tools.call("Emulation.setDeviceMetricsOverride", width=1600, height=1000,
                                 deviceScaleFactor=1, mobile=False)
                await tools.call("Page.navigate", url=url)
                deadline = time.time() + PAGE_TIMEOUT
                ready = False
                while not ready:
                    try:
                        ready = await tools.evaluate(
                            "!!(window.app && app.graph && window.LiteGraph && document.querySelector('canvas')"
                            " && LiteGraph.registered_node_types['SafetyDPOApplyExperts'])", False)
                    except RuntimeError:
                        ready = False
                    if not ready:
                        if time.time() > deadline:
                            text = await tools.evaluate(
                                "document.body ? document.body.innerText.slice(0, 1000) : ''", False)
                            raise RuntimeError(f"the ComfyUI frontend did not finish loading: {text!r}")
                        await asyncio.sleep(0.5)
                await asyncio.sleep(2.0)  # the frontend restores its start-up workflow after it is ready
                await _close_dialogs(tools)
                for path in examples:
                    workflow = load_example(path)
                    state = None
                    for _ in range(2):  # a start-up graph that lands late replaces ours: load again once
                        await tools.evaluate(f"app.loadGraphData({json.dumps(workflow)})")
                        deadline = time.time() + 10
                        while time.time() < deadline:
                            await asyncio.sleep(0.5)
                            state = await tools.evaluate(_GRAPH_STATE, False)
                            if state["count"] == len(workflow["nodes"]):
                                break
                        if state["count"] == len(workflow["nodes"]):
                            break
                    await _close_dialogs(tools)
                    await asyncio.sleep(1.0)  # let the canvas draw
                    shot = await tools.call("Page.captureScreenshot", format="png")
                    target = shots / f"{path.stem}.png"
                    target.write_bytes(base64.b64decode(shot["data"]))
                    results[path.name] = (workflow, state, target)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)
    return results


def install_example_files(server, checkpoint: Path) -> None:
    """Put files under the names the examples use (checkpoint, experts) so the graphs load without errors."""
    modules = None
    for path in EXAMPLES:
        for node in load_example(path)["nodes"]:
            if node["type"] == "CheckpointLoaderSimple":
                server.add_model(checkpoint, "checkpoints", node["widgets_values"][0])
            if node["type"] == "UNETLoader":  # only the name must be listed for the graph to load
                server.add_model(checkpoint, "diffusion_models", node["widgets_values"][0])
            if node["type"] in ("SafetyDPOLoadExpert", "LoraLoader", "LoraLoaderModelOnly"):
                value = node["widgets_values"][0]
                folder, _, name = (value.partition("/") if node["type"] == "SafetyDPOLoadExpert"
                                   else ("loras", "", value))
                target = server.base_dir / "models" / folder / name
                if not target.exists():
                    modules = modules or attention_modules(checkpoint)
                    expert = random_expert(modules, Path(name).stem, "sd15", 0)
                    lora_files.save_expert(expert, target)


@pytest.fixture(scope="module")
def browser_results(chromium, comfyui_server, sd15_checkpoint, tmp_path_factory):
    install_example_files(comfyui_server, sd15_checkpoint)
    shots = tmp_path_factory.mktemp("browser_screenshots")
    profile = tmp_path_factory.mktemp("chromium_profile")
    results = asyncio.run(_inspect_examples(chromium, comfyui_server.url, EXAMPLES, shots, profile))
    print(f"\nbrowser screenshots: {shots}")
    return results


@pytest.mark.slow
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_loads_in_the_browser_without_missing_nodes(browser_results, path):
    workflow, state, screenshot = browser_results[path.name]
    assert state["count"] == len(workflow["nodes"])
    assert not state["unregistered"], f"the frontend does not know node types {state['unregistered']} (missing nodes)"
    assert not state["flagged"], f"the frontend marks nodes with errors: {state['flagged']}"
    misaligned = []
    for node in workflow["nodes"]:
        values = node.get("widgets_values") or []
        if node["type"] in FRONTEND_ONLY_NODES or not values:
            continue
        shown = [value for _, value in state["widgets"][str(node["id"])]]
        if shown != values:  # a widget the file does not count for shifts every later value
            names = [name for name, _ in state["widgets"][str(node["id"])]]
            misaligned.append(f"node {node['id']} ({node['type']}): widgets {names} show {shown}, file has {values}")
    assert not misaligned, "\n".join(misaligned)
    assert screenshot.stat().st_size > 20_000, f"{screenshot} looks blank"
