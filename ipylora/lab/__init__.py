"""JupyterLab integration: the kernel-side comm behind the LoRA sidebar.

The frontend (TypeScript, in ``labextension/``) is built into
``ipylora/lab/labextension`` and installed as a prebuilt extension under
``share/jupyter/labextensions/ipylora``.
"""

from ipylora.lab.comm import TARGET_NAME, register_comm_target, unregister_comm_target


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    """Where ``jupyter labextension develop`` finds the built extension."""
    return [{"src": "lab/labextension", "dest": "ipylora"}]


__all__ = ["TARGET_NAME", "register_comm_target", "unregister_comm_target"]
