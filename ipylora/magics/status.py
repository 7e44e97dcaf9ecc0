"""%lora_status: what is resident in this kernel."""

from __future__ import annotations

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class
from IPython.display import display

from ipylora.engine import get_session
from ipylora.magics.common import user_errors

@magics_class
class StatusMagics(Magics):
    """%lora_status."""

    @line_magic
    @user_errors
    def lora_status(self, line):
        """Show the resident model (device, dtype, quantization, memory), datasets and adapters."""
        from ipylora.ui.render import status_table

        if line.strip():
            raise UsageError("%lora_status takes no arguments.")
        session = get_session()
        display(status_table(session.snapshot(), {"rss": _rss_text()}))


def _rss_text() -> str:
    try:
        import psutil

        return f"{psutil.Process().memory_info().rss / 2**20:,.0f} MiB RSS"
    except ImportError:
        return "-"
