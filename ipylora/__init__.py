"""ipylora: LoRA/QLoRA fine-tuning inside Jupyter, with the base model resident in the kernel.

`%load_ext ipylora` registers the magics (`%%lora_dataset`, `%lora_train`, `%lora_chat`,
`%lora_status`). Everything heavy (torch, transformers, peft, trl) is imported on first use, so
loading the extension is instant. Scripts use the engine directly: `from ipylora import Session`.
"""

__version__ = "0.1.0"


def load_ipython_extension(ipython):
    from ipylora.magics import register

    register(ipython)


def unload_ipython_extension(ipython):
    pass


def __getattr__(name):
    # Lazy: `import ipylora` must not import torch.
    if name in ("Session", "get_session"):
        from ipylora import engine

        return getattr(engine, name)
    raise AttributeError(name)
