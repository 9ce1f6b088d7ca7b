"""web/report_preview.js in a real browser: headless Chromium (Debian's chromium and chromium-driver,
which `make setup` installs) opens ComfyUI's own frontend served by the real server, builds a graph,
queues it and reads the nodes back through the frontend's app object."""
from __future__ import annotations

import json
import shutil
import time
import urllib.request

import pytest

from scripts import demo

INT8_FILE = demo.VARIANT["int8-lightx2v"].file_name
EXTENSION = "QuantDiT.ReportPreview"

# Builds Load Quantized DiT -> Preview as Text and Hardware Probe -> Preview as Text on an empty
# canvas and queues it as a user would (the Queue button calls app.queuePrompt).
_BUILD_AND_QUEUE = """
const app = window.app;
app.graph.clear();
const add = (type) => { const node = LiteGraph.createNode(type); app.graph.add(node); return node; };
const loader = add('QuantDiTLoader');
loader.widgets.find(w => w.name === 'unet_name').value = arguments[0];
const loaderText = add('PreviewAny');
loader.connect(1, loaderText, 0);
const probe = add('QuantDiTHardwareProbe');
const probeText = add('PreviewAny');
probe.connect(2, probeText, 0);
window.__quantdit = {loader, loaderText, probe, probeText};
app.queuePrompt(0);
"""


def _find(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: the web tests need Debian's chromium and chromium-driver "
                    "packages (make setup installs them where it runs as root)")
    return path


@pytest.fixture(scope="module")
def browser(server):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = _find("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1600,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(_find("chromedriver")), options=options)
    try:
        driver.get(server.url)
        _wait(driver, "return !!(window.app && window.LiteGraph && LiteGraph.registered_node_types['QuantDiTLoader'])",
              timeout=90, what="ComfyUI's frontend with the QuantDiT nodes")
        yield driver
    finally:
        driver.quit()


def _wait(driver, script: str, timeout: float, what: str, *args):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = driver.execute_script(script, *args)
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _preview(driver, node: str) -> str:
    return driver.execute_script(
        "const w = window.__quantdit[arguments[0]].widgets.find(w => w.name === 'preview_text');"
        "return w ? w.value : null;", node)


@pytest.fixture(scope="module")
def ran(browser):
    """The graph above, run once; every preview filled."""
    browser.execute_script(_BUILD_AND_QUEUE, INT8_FILE)
    nodes = ("loader", "loaderText", "probe", "probeText")
    deadline = time.time() + 180
    while not all(_preview(browser, n) for n in nodes):
        if time.time() > deadline:
            filled = {n: bool(_preview(browser, n)) for n in nodes}
            raise AssertionError(f"after 180 s, the text previews filled: {filled}")
        time.sleep(0.5)
    return browser


@pytest.mark.e2e
def test_the_frontend_loads_the_extension_from_the_packs_web_directory(server, browser):
    with urllib.request.urlopen(server.url + "/extensions") as r:
        assert "/extensions/ComfyUI-QuantDiT/report_preview.js" in json.loads(r.read())
    names = browser.execute_script("return window.app.extensions.map(e => e.name)")
    assert EXTENSION in names


@pytest.mark.e2e
def test_a_report_node_gets_a_text_preview_and_other_nodes_do_not(browser):
    widgets = browser.execute_script("""
        const names = (type) => LiteGraph.createNode(type).widgets?.map(w => w.name) ?? [];
        return {loader: names('QuantDiTLoader'), probe: names('QuantDiTHardwareProbe'), sampler: names('KSampler')};
    """)
    assert widgets["loader"] == ["unet_name", "backend", "compute_dtype", "scaled_fp8", "preview_text", "preview_mode"]
    assert widgets["probe"] == ["preview_text", "preview_mode"]
    assert "preview_text" not in widgets["sampler"]


@pytest.mark.e2e
def test_reports_show_on_their_nodes_after_a_run(ran):
    loader, probe = _preview(ran, "loader"), _preview(ran, "probe")
    # The node shows exactly the STRING its report output carries (Preview as Text received it).
    assert loader == _preview(ran, "loaderText")
    assert probe == _preview(ran, "probeText")
    assert loader.startswith(f"QuantDiT: {INT8_FILE}") and "int8-w8a8" in loader
    assert probe.startswith("QuantDiT hardware probe") and "suggested for the diffusion model" in probe


@pytest.mark.e2e
def test_previews_fill_again_when_the_results_come_from_the_cache(ran):
    """A second run of the same graph executes nothing: ComfyUI sends the cached report again."""
    before = {n: _preview(ran, n) for n in ("loader", "probe")}
    ran.execute_script("""
        for (const n of [window.__quantdit.loader, window.__quantdit.probe])
            n.widgets.find(w => w.name === 'preview_text').value = '';
        window.app.queuePrompt(0);
    """)
    deadline = time.time() + 60
    while not all(_preview(ran, n) for n in before):
        assert time.time() < deadline, {n: _preview(ran, n) for n in before}
        time.sleep(0.5)
    assert {n: _preview(ran, n) for n in before} == before


@pytest.mark.e2e
def test_previews_stay_out_of_saved_workflows(ran):
    saved = json.loads(ran.execute_script("return JSON.stringify(window.app.graph.serialize())"))
    values = {n["type"]: n.get("widgets_values") for n in saved["nodes"] if n["type"].startswith("QuantDiT")}
    assert values["QuantDiTLoader"] == [INT8_FILE, "auto", "default", "auto"]
    assert not values["QuantDiTHardwareProbe"]
    # Loaded again, the workflow has its widget values and an empty preview until it runs.
    reloaded = ran.execute_script("""
        return window.app.loadGraphData(arguments[0]).then(() => {
            const loader = window.app.graph.nodes.find(n => n.type === 'QuantDiTLoader');
            return loader.widgets.map(w => [w.name, w.value]);
        });
    """, saved)
    assert reloaded[:4] == [["unet_name", INT8_FILE], ["backend", "auto"], ["compute_dtype", "default"],
                            ["scaled_fp8", "auto"]]
    assert reloaded[4] == ["preview_text", ""]
