"""The engine is plain Python: importing it must not pull in IPython or ipywidgets."""

import subprocess
import sys


def test_engine_import_does_not_import_ipython():
    code = (
        "import sys, ipylora.engine, ipylora.engine.train, ipylora.engine.chat, ipylora.engine.models;"
        "bad = [m for m in ('IPython', 'ipywidgets', 'traitlets') if m in sys.modules];"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"engine imported {out.stdout.strip()}"


def test_load_ext_is_light():
    code = "import sys, ipylora; ipylora.load_ipython_extension; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
