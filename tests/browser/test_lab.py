"""The JupyterLab extension in a real JupyterLab and a real Chromium.

One JupyterLab server and one browser page for the module (startup is most of
the cost on a small machine); the tests run in order on that page:

1. the extension loads, the launcher has "LoRA fine-tuning notebook";
2. a plain kernel: the sidebar says ipylora is not loaded;
3. highlighting classes on %%lora_dataset cells (CSV, JSON, YAML), none on
   a Python cell; "Insert LoRA Dataset Cell" inserts a highlighted cell;
4. the comm against a fake session in the real kernel: model, live run
   progress, adapter switch, Stop button;
5. the kernel crashes: the sidebar says so; `%load_ext ipylora` in the new
   kernel connects it to the real session;
6. the quickstart notebook (from a temporary copy of examples/) runs all
   cells, the loss image appears; the sidebar follows a real background run
   of the engine (step/total rising, sparkline) and its Stop button stops it:
   "stopped" in the sidebar and in runs/<name>/run.json.

`IPYLORA_UPDATE_DOCS_SCREENSHOT=1` also rewrites docs/sidebar.png from test 6.

Every test also asserts that the browser console has no errors.
Needs: the built extension (`npm run build:prod` in labextension/ or
`pip install .`), `pip install playwright`, Chromium at /usr/bin/chromium
(`apt-get install chromium`; never `playwright install`).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
BUILT = ROOT / "ipylora" / "lab" / "labextension"
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = os.environ.get("IPYLORA_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# A background run long enough to watch and stop from the sidebar (the tiny
# model does ~10 steps/s on a small CPU: minutes, and the test stops it).
LIVE_RUN = "sidebar-run"
LIVE_TRAIN_LINE = f"%lora_train concepts --name {LIVE_RUN} --steps 3000 --background"
QUICKSTART_STEPS = 60
TIMEOUT_MS = 60_000

# The README's test command sets IPYLORA_REQUIRE_BROWSER=1: there a missing browser is a failure,
# not a silent skip.
if os.environ.get("IPYLORA_REQUIRE_BROWSER") == "1":
    import playwright.sync_api as playwright_api  # noqa: F401

    assert Path(CHROMIUM).exists(), f"no Chromium at {CHROMIUM}: apt-get install chromium"
else:
    playwright_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium", allow_module_level=True)

DATASET_JSON = '%%lora_dataset pairs\n[{"prompt": "hi", "response": "hello", "n": 1, "ok": true}]'
DATASET_YAML = "%%lora_dataset pairs --reader yaml\n- prompt: hi  # greeting\n  response: hello"
PLAIN_CODE = "x = [1, 2, 3]  # plain python\nprint(sum(x))"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _notebook(*sources: str) -> dict:
    return {
        "cells": [
            {"cell_type": "code", "execution_count": None, "id": f"c{i}", "metadata": {},
             "outputs": [], "source": src}
            for i, src in enumerate(sources)
        ],
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)",
                                    "language": "python"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def _short_quickstart() -> dict:
    """examples/quickstart.ipynb with its foreground run cut to QUICKSTART_STEPS steps.

    The full run (300 steps) is the notebook test's job (tests/test_quickstart_notebook.py);
    here it would take minutes of a small shared CPU and only the plot matters.
    """
    notebook = json.loads((ROOT / "examples" / "quickstart.ipynb").read_text())
    trains = [c for c in notebook["cells"] if "".join(c["source"]).startswith("%lora_train ")]
    assert len(trains) == 1, "the quickstart should have one %lora_train cell"
    trains[0]["source"] = "".join(trains[0]["source"]).rstrip() + f" --steps {QUICKSTART_STEPS}"
    return notebook


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on 127.0.0.1 with an isolated config, settings and workspace."""
    if not (BUILT / "package.json").exists():
        pytest.fail(f"extension not built: run `npm run build:prod` in labextension/ ({BUILT} missing)")
    tmp = tmp_path_factory.mktemp("lab")
    notebooks = tmp / "notebooks"
    notebooks.mkdir()
    (notebooks / "cells.ipynb").write_text(json.dumps(_notebook(DATASET_JSON, DATASET_YAML, PLAIN_CODE)))
    # The kernel's cwd is this temporary folder, so runs/ never lands in the repository.
    (notebooks / "quickstart.ipynb").write_text(json.dumps(_short_quickstart()))
    shutil.copytree(ROOT / "examples" / "data", notebooks / "data")
    # The source-tree build comes first on the extensions path, so this tests
    # the files just built even if an older ipylora is installed.
    extensions = tmp / "labextensions"
    extensions.mkdir()
    (extensions / "ipylora").symlink_to(BUILT, target_is_directory=True)
    settings = tmp / "settings"
    news = settings / "@jupyterlab" / "apputils-extension"
    news.mkdir(parents=True)
    # No news fetch or update check: nothing may go outside loopback.
    (news / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False})
    )
    port = _free_port()
    token = secrets.token_hex(16)
    env = dict(os.environ)
    env.update(
        JUPYTER_CONFIG_DIR=str(tmp / "config"),
        JUPYTER_RUNTIME_DIR=str(tmp / "runtime"),
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), str(HERE), env.get("PYTHONPATH")])),
    )
    log = open(tmp / "jupyterlab.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "jupyterlab",
            "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}",
            f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={notebooks}",
            f"--LabApp.extra_labextensions_path={extensions}",
            f"--LabApp.user_settings_dir={settings}",
            f"--LabApp.workspaces_dir={tmp / 'workspaces'}",
            "--LabApp.expose_app_in_browser=True",
        ],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=notebooks,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                log.close()
                pytest.fail("JupyterLab did not start:\n" + (tmp / "jupyterlab.log").read_text()[-3000:])
            time.sleep(0.3)
    yield {"base": base, "token": token, "log": tmp / "jupyterlab.log", "root": notebooks}
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


class Console:
    """Errors the page logged; every test asserts there are none of its own."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.seen = 0

    def on_console(self, msg) -> None:
        if msg.type == "error":
            self.errors.append(f"console.error: {msg.text}")

    def on_pageerror(self, exc) -> None:
        self.errors.append(f"uncaught: {exc}")

    def new(self) -> list[str]:
        fresh, self.seen = self.errors[self.seen:], len(self.errors)
        return fresh


@pytest.fixture(scope="module")
def browser_page(lab):
    ARTIFACTS.mkdir(exist_ok=True)
    console = Console()
    with playwright_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        context = browser.new_context(viewport={"width": 1440, "height": 900})
        context.set_default_timeout(TIMEOUT_MS)
        page = context.new_page()
        page.on("console", console.on_console)
        page.on("pageerror", console.on_pageerror)
        page.goto(f"{lab['base']}/lab/tree/cells.ipynb?reset&token={lab['token']}")
        page.wait_for_selector(".jp-NotebookPanel .jp-Cell .cm-content")
        _wait_kernel_idle(page)
        try:
            yield page, console
        finally:
            page.screenshot(path=str(ARTIFACTS / "lab-final.png"))
            context.close()
            browser.close()


@pytest.fixture
def page(browser_page, request):
    page, console = browser_page
    console.new()
    yield page
    errors = console.new()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        page.screenshot(path=str(ARTIFACTS / f"failed-{request.node.name}.png"))
    assert errors == [], "browser console errors:\n" + "\n".join(errors)


def _command(page, command: str, args: dict | None = None):
    return page.evaluate(
        "([c, a]) => window.jupyterapp.commands.execute(c, a)", [command, args or {}]
    )


def _wait_kernel_idle(page) -> None:
    page.wait_for_function(
        """() => {
            const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
            const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
            return k && k.status === 'idle';
        }""",
        timeout=TIMEOUT_MS,
    )


def _run_code(page, code: str) -> None:
    """Append a cell at the end of the current notebook, run it, wait for idle."""
    page.evaluate(
        """(code) => {
            const nb = window.jupyterapp.shell.currentWidget.content;
            nb.activeCellIndex = nb.widgets.length - 1;
        }""",
        code,
    )
    _command(page, "notebook:insert-cell-below")
    page.evaluate(
        "(code) => window.jupyterapp.shell.currentWidget.content.activeCell.model.sharedModel.setSource(code)",
        code,
    )
    _command(page, "notebook:run-cell")
    _wait_kernel_idle(page)


def _sidebar(page):
    _command(page, "ipylora:open-sidebar")
    panel = page.locator("#ipylora-sidebar")
    panel.wait_for(state="visible")
    return panel


def test_extension_loads_and_launcher_has_the_quickstart(page):
    plugins = page.evaluate("() => window.jupyterapp.hasPlugin('ipylora:sidebar') && window.jupyterapp.hasPlugin('ipylora:highlighting')")
    assert plugins
    _command(page, "launcher:create")
    card = page.locator(".jp-LauncherCard", has_text="LoRA fine-tuning notebook")
    card.wait_for(state="visible")
    tab = page.locator(".jp-SideBar.jp-mod-right [data-id='ipylora-sidebar']")
    assert tab.count() == 1
    # The card creates a notebook from the quickstart template.
    card.click()
    quick = page.locator(".jp-NotebookPanel:visible")
    quick.locator(".jp-Cell", has_text="%load_ext ipylora").first.wait_for()
    dataset = quick.locator(".jp-Cell", has_text="%%lora_dataset concepts")
    dataset.scroll_into_view_if_needed()
    dataset.locator(".cm-line.cm-ipylora-body-csv").first.wait_for()
    assert page.evaluate("() => window.jupyterapp.shell.currentWidget.context.path").endswith(".ipynb")
    # Back to the notebook under test.
    _command(page, "docmanager:open", {"path": "cells.ipynb"})
    _wait_kernel_idle(page)


def test_sidebar_says_ipylora_is_not_loaded_in_a_plain_kernel(page):
    panel = _sidebar(page)
    message = panel.locator(".jp-ipylora-message")
    message.filter(has_text="ipylora is not loaded in this kernel — run %load_ext ipylora").wait_for()
    assert panel.get_attribute("data-connection") == "not-loaded"
    assert panel.locator(".jp-ipylora-notebook").inner_text() == "cells.ipynb"
    page.screenshot(path=str(ARTIFACTS / "lab-not-loaded.png"))


def test_dataset_cells_are_highlighted_and_other_cells_are_not(page):
    cells = page.locator(".jp-NotebookPanel:visible .jp-Notebook .jp-Cell")
    json_cell, yaml_cell, plain_cell = cells.nth(0), cells.nth(1), cells.nth(2)
    assert json_cell.locator(".cm-ipylora-magic").first.inner_text() == "%%lora_dataset"
    assert json_cell.locator(".cm-line.cm-ipylora-body-json").count() == 1
    assert json_cell.locator(".cm-ipylora-key").all_inner_texts()[:2] == ['"prompt"', '"response"']
    assert json_cell.locator(".cm-ipylora-literal").all_inner_texts() == ["true"]
    assert yaml_cell.locator(".cm-line.cm-ipylora-body-yaml").count() == 2
    assert yaml_cell.locator(".cm-ipylora-flag").all_inner_texts() == ["--reader"]
    assert yaml_cell.locator(".cm-ipylora-comment").all_inner_texts() == ["# greeting"]
    assert plain_cell.locator("[class*='cm-ipylora']").count() == 0
    # The body's colours are the data's, not Python's: a JSON key (a Python
    # string) is coloured as a key, like a YAML key, not as a string.
    def color(cell, selector: str) -> str:
        # The innermost element's colour is what the reader sees.
        return cell.locator(selector).first.evaluate(
            "e => { while (e.firstElementChild) e = e.firstElementChild; return getComputedStyle(e).color; }"
        )

    json_key = color(json_cell, ".cm-ipylora-key")
    assert json_key == color(yaml_cell, ".cm-ipylora-key")
    assert json_key != color(json_cell, ".cm-ipylora-string")
    assert color(json_cell, ".cm-ipylora-magic") != color(plain_cell, ".cm-line")

    # The command inserts a CSV dataset cell, highlighted as CSV.
    page.evaluate("() => { window.jupyterapp.shell.currentWidget.content.activeCellIndex = 2; }")
    _command(page, "ipylora:insert-dataset-cell")
    inserted = cells.nth(3)
    inserted.locator(".cm-ipylora-magic").wait_for()
    assert inserted.locator(".cm-ipylora-header").all_inner_texts() == ["concept", "description"]
    assert inserted.locator(".cm-line.cm-ipylora-body-csv").count() >= 2
    inserted.scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "lab-highlighting.png"))
    _command(page, "notebook:delete-cell")


def test_sidebar_shows_a_fake_session_run_and_stop_stops_it(page):
    # The real comm module in the real kernel, against the fake session.
    _run_code(
        page,
        "from fake_session import FakeSession\n"
        "from ipylora.lab.comm import register_comm_target\n"
        "fake = FakeSession()\n"
        "register_comm_target(get_ipython(), get_session=lambda: fake)\n"
        "fake.start_run(name='demo', total=2000, step_s=0.02)",
    )
    panel = _sidebar(page)
    panel.locator(".jp-ipylora-model-id", has_text="ipylora/tiny-llama").wait_for()
    assert panel.get_attribute("data-connection") == "ready"
    assert "concepts" in panel.locator("[data-section='datasets']").inner_text()
    stats = panel.locator(".jp-ipylora-run-stats")
    stats.filter(has_text=re.compile(r"step [1-9]\d*/2000")).wait_for()
    first = int(re.search(r"step (\d+)/", stats.inner_text()).group(1))
    page.wait_for_function(
        "(n) => { const m = document.querySelector('#ipylora-sidebar .jp-ipylora-run-stats').textContent.match(/step (\\d+)\\//); return m && +m[1] > n; }",
        arg=first,
    )
    assert panel.locator(".jp-ipylora-sparkline path").get_attribute("d").startswith("M")
    assert "tokens/s" in stats.inner_text() and "ETA" in stats.inner_text()

    # Adapter switcher: the kernel confirms by marking the adapter active.
    panel.locator(".jp-ipylora-adapter-select").select_option("sd-prompts")
    panel.locator(".jp-ipylora-list li.jp-mod-active", has_text="sd-prompts").wait_for()

    page.screenshot(path=str(ARTIFACTS / "lab-sidebar-run.png"))

    panel.locator("button.jp-ipylora-stop").click()
    panel.locator(".jp-ipylora-run-name", has_text="demo — stopped").wait_for()
    assert panel.locator("button.jp-ipylora-stop").is_hidden()
    step = int(re.search(r"step (\d+)/", stats.inner_text()).group(1))
    assert step < 2000
    _run_code(page, "assert fake.stop_requested.is_set() and fake.run['status'] == 'stopped'")
    assert page.locator(".jp-NotebookPanel:visible .jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']").count() == 0


def test_sidebar_says_so_when_the_kernel_crashes(page):
    _run_code(page, "import os; os._exit(1)")
    dialog = page.locator(".jp-Dialog")
    try:
        dialog.wait_for(timeout=15_000)
        page.locator(".jp-Dialog .jp-mod-accept").click()
    except playwright_api.TimeoutError:
        pass  # some versions only show a status-bar notice
    panel = _sidebar(page)
    panel.locator(
        ".jp-ipylora-message", has_text="The kernel restarted. ipylora is not loaded in this kernel"
    ).wait_for()
    assert panel.get_attribute("data-connection") == "not-loaded"
    page.screenshot(path=str(ARTIFACTS / "lab-kernel-restarted.png"))


def test_load_ext_ipylora_connects_the_sidebar_to_the_real_session(page):
    # After the crash the kernel is fresh; loading ipylora registers the comm
    # target and the sidebar reconnects by itself after the cell runs.
    _run_code(page, "%load_ext ipylora")
    panel = _sidebar(page)
    panel.locator(".jp-ipylora-body").wait_for(state="visible")
    assert panel.get_attribute("data-connection") == "ready"
    section = panel.locator("[data-section='model']")
    assert "No model loaded yet." in section.inner_text()
    assert panel.locator(".jp-ipylora-error").is_hidden()


def _step(stats) -> int:
    return int(re.search(r"step (\d+)/", stats.inner_text()).group(1))


def test_quickstart_runs_and_the_sidebar_follows_and_stops_a_real_background_run(page, lab):
    _command(page, "docmanager:open", {"path": "quickstart.ipynb"})
    _wait_kernel_idle(page)
    _command(page, "notebook:run-all-cells")
    notebook = page.locator(".jp-NotebookPanel:visible")
    # The foreground run's loss plot (a PNG, updated in place) is the loss image.
    notebook.locator(".jp-OutputArea-output img").first.wait_for(timeout=150_000)
    _wait_kernel_idle(page)
    assert notebook.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']").count() == 0
    panel = _sidebar(page)
    assert panel.locator(".jp-ipylora-notebook").inner_text() == "quickstart.ipynb"
    panel.locator(".jp-ipylora-model-id", has_text="ipylora/tiny-llama").wait_for()
    panel.locator(".jp-ipylora-list li", has_text="sd-prompts").first.wait_for()

    # A background run: the cell returns at once, the sidebar follows it.
    _run_code(page, LIVE_TRAIN_LINE)
    stats = panel.locator(".jp-ipylora-run-stats")
    panel.locator(".jp-ipylora-run-name", has_text=LIVE_RUN).wait_for()
    stats.filter(has_text=re.compile(r"step [1-9]\d*/3000")).wait_for(timeout=60_000)
    first = _step(stats)
    page.wait_for_function(
        "(n) => { const m = document.querySelector('#ipylora-sidebar .jp-ipylora-run-stats').textContent.match(/step (\\d+)\\//); return m && +m[1] >= n + 20; }",
        arg=first, timeout=60_000,
    )
    assert panel.locator(".jp-ipylora-sparkline path").get_attribute("d").startswith("M")
    assert "tokens/s" in stats.inner_text() and "ETA" in stats.inner_text()
    assert panel.locator("button.jp-ipylora-stop").is_visible()
    notebook.locator(".jp-Cell").last.scroll_into_view_if_needed()
    if os.environ.get("IPYLORA_UPDATE_DOCS_SCREENSHOT") == "1":
        # Let the loss curve take shape before the picture for the README.
        page.wait_for_function(
            "(n) => +document.querySelector('#ipylora-sidebar progress').value >= n", arg=first + 150,
            timeout=90_000,
        )
        page.screenshot(path=str(ROOT / "docs" / "sidebar.png"))
    page.screenshot(path=str(ARTIFACTS / "lab-sidebar-live-run.png"))

    panel.locator("button.jp-ipylora-stop").click()
    panel.locator(".jp-ipylora-run-name", has_text=f"{LIVE_RUN} — stopped").wait_for(timeout=60_000)
    assert panel.locator("button.jp-ipylora-stop").is_hidden()
    assert _step(stats) < 3000
    record = json.loads((lab["root"] / "runs" / LIVE_RUN / "run.json").read_text())
    assert record["status"] == "stopped", record["status"]
    assert 0 < record["step"] < 3000
    assert (lab["root"] / "runs" / LIVE_RUN / "adapter" / "adapter_config.json").exists()
