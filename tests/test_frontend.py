"""Every UI workflow in workflows/ loads cleanly into ComfyUI's real web frontend, in two versions:
the one ComfyUI 0.3.75 bundles (1.32.9, from the venv) and the newest on PyPI (NEWEST_FRONTEND, which
tools/setup.sh installs under .comfyui/frontend-<version>/ and the server gets via --front-end-root).

For each frontend a ComfyUI server serves it at `/`; a headless Chromium (tools/browser.py, CDP over
aiohttp) opens it, and each workflow file is loaded with the frontend's own `app.loadGraphData`,
exactly as dropping the file on the canvas does. Then, in the page: no node type is missing
(LiteGraph.registered_node_types, the frontend's own missing-nodes list), no node is flagged
(has_errors; the only one allowed is the newer frontends' "model file missing" flag on a checkpoint
loader whose file the test server lacks and whose download the workflow names in properties.models),
no dialog (but that "Missing Models" one) or console error appeared, every widget holds the file's
value, every combo value is one the server offers (the absent SD1.5/SDXL/Flux/SD3.5 checkpoints excepted: the
frontend must keep that value), and the nodes and links are the file's, each link attached to the
slots it names. One browser per frontend.

Widgets are matched to widgets_values the way LGraphNode.configure/serialize do it: in order, over the
widgets whose own `serialize` flag is not false. (`options.serialize === false` marks a widget kept
out of the API prompt, e.g. control_after_generate and LoadImage's upload button, but the UI format
still stores it, so those widgets are compared too.)

Needs a Chromium binary (Debian: `apt-get install -y chromium`); skipped without one.
Also writes out/frontend_workflow.png (the TinySD prompt-to-prompt replace demo, bundled frontend)
and out/screenshots/<workflow>.png (each top-level workflow fitted to view in the newest frontend);
docs/ holds copies. Running the tests leaves the checkout clean.
"""
from __future__ import annotations

import json
import pathlib
import shutil
import sys
import urllib.request

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from browser import Browser, find_chromium  # noqa: E402

WORKFLOWS = sorted(REPO.glob("workflows/*.json")) + sorted(REPO.glob("workflows/demo/*.json"))
SCREENSHOT_WORKFLOW = REPO / "workflows" / "demo" / "p2p_replace_tinysd.json"
SCREENSHOT = REPO / "out" / "frontend_workflow.png"
SCREENSHOTS = REPO / "out" / "screenshots"  # every top-level workflow, fitted to view in the newest frontend
# Combo values that may be absent from the server's options: the real checkpoints are not shipped.
ABSENT_OK = {("CheckpointLoaderSimple", "ckpt_name", name) for name in (
    "v1-5-pruned-emaonly.safetensors", "sd_xl_base_1.0.safetensors", "flux1-dev-fp8.safetensors",
    "sd3.5_large_fp8_scaled.safetensors")}
NEWEST_FRONTEND = "1.58.1"  # the newest comfyui-frontend-package on PyPI; tools/setup.sh installs it too

pytestmark = pytest.mark.skipif(find_chromium() is None,
                                reason="no Chromium binary on PATH (install it: apt-get install -y chromium)")

# Loads one workflow with the frontend's own API and reads back what the page holds.
LOAD_JS = """(async () => {
  const wf = %(workflow)s;
  window.__attnEditMissing = null;
  const dialogsBefore = document.querySelectorAll('.p-dialog').length;
  await app.loadGraphData(wf, true, true, %(name)s);
  await new Promise(r => setTimeout(r, 50));   // let Vue render any dialog the load opened
  const g = app.graph;
  const links = g.links instanceof Map ? [...g.links.values()] : Object.values(g.links).filter(Boolean);
  const opened = [...document.querySelectorAll('.p-dialog')].slice(dialogsBefore);
  const dialogs = opened.map(d => d.innerText.slice(0, 300));
  for (const d of opened) d.querySelector('.p-dialog-close-button')?.click();  // the next load starts clean
  return {
    missing: window.__attnEditMissing,   // the frontend's list, from the afterConfigureGraph hook
    unregistered: wf.nodes.map(n => n.type).filter(t => !(t in LiteGraph.registered_node_types)),
    dialogs,
    nodes: g.nodes.map(n => ({
      id: Number(n.id), type: n.type, has_errors: !!n.has_errors,   // ids: numbers in 1.32.9, strings in 1.58
      inputs: (n.inputs || []).map(i => i.link ?? null),
      outputs: (n.outputs || []).map(o => Array.from(o.links ?? [])),   // an array, or Set-like in 1.58
      widgets: (n.widgets || []).filter(w => w.serialize !== false).map(w => ({
        name: w.name, type: w.type, value: w.value === undefined ? null : w.value,
        options: Array.isArray(w.options?.values) ? w.options.values : null})),
    })),
    links: links.map(l => [l.id, Number(l.origin_id), l.origin_slot, Number(l.target_id), l.target_slot, l.type]),
  };
})()"""


def _set_setting(server, key: str, value) -> None:
    req = urllib.request.Request(f"{server.url}/settings/{key}", data=json.dumps(value).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=30).read()


def frontend_roots() -> dict[str, pathlib.Path | None]:
    """name -> static folder for --front-end-root (None: the one ComfyUI bundles, from the venv)."""
    newest = REPO / ".comfyui" / f"frontend-{NEWEST_FRONTEND}" / "comfyui_frontend_package" / "static"
    return {"bundled": None, NEWEST_FRONTEND: newest}


@pytest.fixture(scope="module", params=list(frontend_roots()))
def page(request, tmp_path_factory):
    """ComfyUI's frontend, open and ready in one headless Chromium: the bundled one (1.32.9 with
    ComfyUI 0.3.75) and the newest (tools/setup.sh installs it under .comfyui/), each from its own server."""
    import comfyui_env

    root = frontend_roots()[request.param]
    if root is not None and not (root / "index.html").exists():
        pytest.fail(f"frontend {request.param} is not installed at {root}: run tools/setup.sh")
    extra = ("--front-end-root", str(root)) if root is not None else ()
    server = comfyui_env.server_module().ComfyServer(tmp_path_factory.mktemp(f"frontend-{request.param}"),
                                                     extra_args=extra).start(timeout=90)
    inputs = server.workdir / "input"
    inputs.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(REPO / "demo_model" / "red_circle.png", inputs / "attention_edit_red_circle.png")
    shutil.copyfile(server.comfyui / "input" / "example.png", inputs / "example.png")
    # A first-time user gets the templates browser over the canvas; this server's user is not one.
    _set_setting(server, "Comfy.TutorialCompleted", True)
    node_types = sorted(server.object_info())
    browser = Browser(width=1600, height=1000, timeout=60).start()
    try:
        browser.send("Page.addScriptToEvaluateOnNewDocument",  # the "try Nodes 2.0" banner, dismissed
                     {"source": "localStorage.setItem('vueNodesBannerDismissed', 'true')"})
        browser.navigate(server.url + "/")
        browser.wait_for("!!(window.app && window.app.graph && window.app.vueAppReady && window.LiteGraph"
                         " && LiteGraph.registered_node_types && app.extensionManager?.workflow?.activeWorkflow)",
                         timeout=120)
        browser.frontend_version = browser.evaluate("window.__COMFYUI_FRONTEND_VERSION__ ?? null")
        if root is not None:
            assert browser.frontend_version == NEWEST_FRONTEND, browser.frontend_version
        unregistered = browser.evaluate(
            f"{json.dumps(node_types)}.filter(t => !(t in LiteGraph.registered_node_types))")
        assert not unregistered, f"the frontend did not register these server node types: {unregistered}"
        browser.evaluate("app.registerExtension({name: 'attention_edit.test_frontend',"
                         " afterConfigureGraph(missing) { window.__attnEditMissing = missing; }})")
        yield browser
    finally:
        browser.close()
        server.stop()


def load(page: Browser, path: pathlib.Path) -> tuple[dict, dict, list[dict]]:
    """(file's workflow, what the page holds after loading it, console errors during the load)."""
    workflow = json.loads(path.read_text())
    n_console = len(page.console)
    state = page.evaluate(LOAD_JS % {"workflow": json.dumps(workflow), "name": json.dumps(path.stem)})
    errors = [c for c in page.console[n_console:] if c["type"] in ("error", "exception", "assert")]
    return workflow, state, errors


def absent_model_flag(node: dict) -> bool:
    """Whether a flag on this node is the newer frontends' "model file missing" one, for a checkpoint the
    test server does not have (ABSENT_OK) and whose download the node names (properties.models)."""
    values = node.get("widgets_values") or []
    models = {m["name"] for m in node.get("properties", {}).get("models", [])}
    return bool(values) and (node["type"], "ckpt_name", values[0]) in ABSENT_OK and values[0] in models


def problems(workflow: dict, state: dict, errors: list[dict]) -> list[str]:
    """Every way the loaded graph differs from the file, or the load went wrong; [] when clean."""
    out = []
    if state["missing"] is None:
        out.append("the load did not finish (no afterConfigureGraph call)")
    elif state["missing"]:
        out.append(f"the frontend reports missing node types: {state['missing']}")
    if state["unregistered"]:
        out.append(f"node types not in LiteGraph.registered_node_types: {sorted(set(state['unregistered']))}")
    absent = {m["name"] for n in workflow["nodes"] for m in n.get("properties", {}).get("models", [])
              if (n["type"], "ckpt_name", m["name"]) in ABSENT_OK}
    for text in state["dialogs"]:
        # The checkpoint the example names is not on the test server: the frontend lists it with its download
        # (properties.models), which is what a user without it should see. Any other dialog is a problem.
        if not (absent and text.startswith("Missing Models") and all(name in text for name in absent)):
            out.append(f"dialog opened: {text!r}")
    out += [f"console {e['type']}: {e['text'][:500]}" for e in errors
            # that dialog asks the download's size from its URL, which the test machine cannot reach (the
            # answer can arrive during the next load, so it is allowed in any)
            if not e["text"].startswith("Error fetching file size")]
    if len(state["nodes"]) != len(workflow["nodes"]):
        out.append(f"{len(state['nodes'])} nodes in the page, {len(workflow['nodes'])} in the file")
    if len(state["links"]) != len(workflow["links"]):
        out.append(f"{len(state['links'])} links in the page, {len(workflow['links'])} in the file")
    page_links = sorted(map(tuple, state["links"]))
    file_links = sorted(tuple(link[:6]) for link in workflow["links"])
    if page_links != file_links:
        out.append(f"links differ: only in the file {sorted(set(file_links) - set(page_links))}, "
                   f"only in the page {sorted(set(page_links) - set(file_links))}")
    page_nodes = {n["id"]: n for n in state["nodes"]}
    by_id = {link[0]: link for link in state["links"]}
    for node in state["nodes"]:  # every slot's link exists in the page and ends at that slot
        for slot, link_id in enumerate(node["inputs"]):
            link = by_id.get(link_id)
            if link_id is not None and (link is None or link[3:5] != [node["id"], slot]):
                out.append(f"node {node['id']} ({node['type']}) input {slot}: link {link_id} is {link}")
        for slot, link_ids in enumerate(node["outputs"]):
            for link_id in link_ids:
                link = by_id.get(link_id)
                if link is None or link[1:3] != [node["id"], slot]:
                    out.append(f"node {node['id']} ({node['type']}) output {slot}: link {link_id} is {link}")
    for node in workflow["nodes"]:
        where = f"node {node['id']} ({node['type']})"
        loaded = page_nodes.get(node["id"])
        if loaded is None:
            out.append(f"{where}: not in the page")
            continue
        if loaded["type"] != node["type"]:
            out.append(f"{where}: is a {loaded['type']} in the page")
        if loaded["has_errors"] and not absent_model_flag(node):
            out.append(f"{where}: the frontend flags it has_errors")
        values = node.get("widgets_values") or []
        if isinstance(values, dict):
            out.append(f"{where}: widgets_values is a dict, not a list: {values}")
            continue
        widgets = loaded["widgets"]  # the widgets that widgets_values maps onto, in order
        if len(widgets) != len(values):
            out.append(f"{where}: {len(values)} widgets_values in the file, {len(widgets)} serialized widgets "
                       f"in the page ({[w['name'] for w in widgets]})")
        for widget, value in zip(widgets, values):
            if widget["value"] != value or isinstance(widget["value"], bool) != isinstance(value, bool):
                out.append(f"{where} widget {widget['name']!r}: file {value!r}, page {widget['value']!r}")
            if (widget["type"] == "combo" and widget["options"] is not None
                    and widget["value"] not in widget["options"]
                    and (node["type"], widget["name"], widget["value"]) not in ABSENT_OK):
                out.append(f"{where} widget {widget['name']!r}: value {widget['value']!r} is not among the "
                           f"server's options {widget['options'][:20]}")
    return out


def fit_and_screenshot(page: Browser, path: pathlib.Path) -> pathlib.Path:
    """The loaded graph fitted to the view, at full detail, without overlays: a PNG at `path`."""
    page.evaluate("""(async () => {
      const setting = app.extensionManager.setting;
      await setting.set('LiteGraph.Canvas.MinFontSizeForLOD', 0);  // full detail when zoomed out
      await setting.set('Comfy.Minimap.Visible', false);
      await setting.set('Comfy.Graph.CanvasInfo', false);          // no FPS counter
      app.extensionManager.toast?.removeAll?.();                    // toasts and alerts, e.g. "model missing"
      for (const alert of document.querySelectorAll('[role="status"]')) {
        const close = [...alert.querySelectorAll('button')].find(b => /close|dismiss/i.test(b.getAttribute('aria-label') || ''));
        if (close) close.click(); else alert.style.visibility = 'hidden';
      }
      await app.extensionManager.command.execute('Comfy.Canvas.FitView');
      app.graph.setDirtyCanvas(true, true);
      await new Promise(r => setTimeout(r, 500));
    })()""")
    shot = page.screenshot(path)
    assert shot.stat().st_size > 20_000, "the screenshot is suspiciously small (blank page?)"
    return shot


def test_screenshot(page):
    """The TinySD prompt-to-prompt replace demo in the editor, fitted to view: out/frontend_workflow.png."""
    if page.frontend_version == NEWEST_FRONTEND:
        pytest.skip("the README's picture is taken in the bundled frontend")
    workflow, state, errors = load(page, SCREENSHOT_WORKFLOW)
    assert not problems(workflow, state, errors)
    fit_and_screenshot(page, SCREENSHOT)


@pytest.mark.parametrize("path", WORKFLOWS, ids=[str(p.relative_to(REPO / "workflows")) for p in WORKFLOWS])
def test_workflow_loads_in_frontend(page, path):
    workflow, state, errors = load(page, path)
    found = problems(workflow, state, errors)
    assert not found, f"{path.relative_to(REPO)} in ComfyUI's frontend {page.frontend_version}:\n  " + "\n  ".join(found)
    if page.frontend_version == NEWEST_FRONTEND and path.parent == REPO / "workflows":
        # what a user sees on opening it: out/screenshots/<workflow>.png (docs/screenshots/ holds copies)
        fit_and_screenshot(page, SCREENSHOTS / f"{path.stem}.png")


# What a user types in the node search (double-click on the canvas) -> nodes of the pack it must offer.
# The newest frontend searches search_aliases too; the bundled one (1.32.9) only names and display names.
SEARCHES = {
    NEWEST_FRONTEND: {"prompt to prompt": {"P2P Replace (word swap)", "P2P Refine (add words)", "P2P Re-weight",
                                           "P2P Local Blend"},
                      "free prompt editing": {"FPE Self-Attention Inject"},
                      "inversion": {"DDIM Invert", "Null-Text Inversion"},
                      "attention map": {"Attention Map Preview"}},
    "bundled": {"P2P": {"P2P Replace (word swap)", "P2P Refine (add words)", "P2P Re-weight", "P2P Local Blend"},
                "FPE": {"FPE Self-Attention Inject"}, "Invert": {"DDIM Invert"},
                "Attention": {"Attention Store (source branch)", "Attention Map Preview"}},
}


def search(page: Browser, term: str) -> list[str]:
    """The node search box's results for `term`, typed as a user does (the option texts)."""
    import time

    page.evaluate("(async () => { await app.extensionManager.command.execute('Workspace.SearchBox.Toggle');"
                  " await new Promise(r => setTimeout(r, 800)); })()")
    try:
        page.send("Input.insertText", {"text": term})
        time.sleep(1.5)  # the search is debounced
        return page.evaluate("[...document.querySelectorAll('[role=option]')].map(e => e.innerText.replace(/\\s+/g, ' '))")
    finally:
        for kind in ("keyDown", "keyUp"):
            page.send("Input.dispatchKeyEvent", {"type": kind, "key": "Escape", "code": "Escape",
                                                 "windowsVirtualKeyCode": 27})
        time.sleep(0.3)


def test_node_search_finds_the_pack(page):
    key = NEWEST_FRONTEND if page.frontend_version == NEWEST_FRONTEND else "bundled"
    for term, expected in SEARCHES[key].items():
        results = search(page, term)
        found = {name for name in expected if any(r.startswith(name) for r in results)}
        assert found == expected, f"searching {term!r} in frontend {page.frontend_version}: {results[:12]}"
