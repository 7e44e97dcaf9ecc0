"""Notebook front end: renderings, the live training panel, and ipywidgets forms."""


def __getattr__(name):
    # Lazy, so `%load_ext ipylora` does not import ipywidgets.
    if name in ("TrainForm", "DatasetForm"):
        from ipylora.ui import forms

        return getattr(forms, name)
    if name == "SweepForm":
        from ipylora.ui import sweep_form

        return sweep_form.SweepForm
    raise AttributeError(name)
