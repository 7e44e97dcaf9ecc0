"""IPython magics: thin parsers over the engine, one module per magic. Registered by `%load_ext ipylora`."""


def register(ipython) -> None:
    from ipylora.magics.chat import ChatMagics
    from ipylora.magics.dataset import DatasetMagics
    from ipylora.magics.runs import RunsMagics
    from ipylora.magics.settings import register_settings
    from ipylora.magics.status import StatusMagics
    from ipylora.magics.train import TrainMagics

    register_settings(ipython)
    from ipylora.magics.evaluate import EvalMagics
    from ipylora.magics.export import ExportMagics

    for magics in (DatasetMagics, TrainMagics, ChatMagics, StatusMagics, RunsMagics, EvalMagics, ExportMagics):
        ipython.register_magics(magics)
    try:
        from ipylora.lab.comm import register_comm_target
    except ImportError:  # the JupyterLab side is optional
        return
    register_comm_target(ipython)
