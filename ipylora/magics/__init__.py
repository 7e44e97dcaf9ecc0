"""IPython magics: thin parsers over the engine. Registered by `%load_ext ipylora`."""


def register(ipython) -> None:
    from ipylora.magics.core import LoraMagics

    ipython.register_magics(LoraMagics)
    try:
        from ipylora.lab.comm import register_comm_target
    except ImportError:  # the JupyterLab side is optional
        return
    register_comm_target(ipython)
