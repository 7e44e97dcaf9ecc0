"""Adapters on the resident model: one PeftModel holds them side by side, by name.

Attaching a fresh adapter (or one started from a copy of another's weights, for SFT -> DPO),
loading a saved one from a run folder or a PEFT folder, deleting one. Each function takes the
`Session`, whose `model` it may replace (the first adapter wraps the base in a PeftModel; the last
one deleted unwraps it) and whose `adapters` table it keeps.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path

from ipylora.engine import decode, graphdecode
from ipylora.engine.config import LoraArgs
from ipylora.engine.errors import ConfigError, UnknownNameError
from ipylora.engine.models import base_memo, base_of, saved_tokenizer
from ipylora.engine.runs import check_name, read_json


@dataclass
class Adapter:
    name: str
    run_dir: Path
    template: str
    dataset: str


def attach(session, name: str, lora: LoraArgs, start: str | None = None):
    """A fresh trainable LoRA adapter `name` on the resident model (replacing one of that name).

    `start`: begin from a copy of that adapter's weights and shape (SFT -> DPO); `start` itself
    stays as it is, frozen (preference methods use it as their reference).
    """
    import copy

    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    if start is not None:
        if start == name:
            raise ConfigError(f"--from-adapter {start} would be replaced by the run it starts: pass --name NEW.")
        session.adapter(start)
        config = copy.deepcopy(session.model.peft_config[start])
        config.inference_mode = False
    else:
        saved = _names(lora.modules_to_save)
        tied = False
        if lora.add_tokens:  # the tokenizer has them already (Session._check_data): the vocabulary follows
            fit_vocabulary(session, len(session.tokenizer))
            embeddings, tied = embedding_names(session.model)
            saved = list(dict.fromkeys([*(saved or []), *embeddings]))
        config = LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=_dropout(session.model, lora), bias="none",
            task_type="CAUSAL_LM", target_modules=_resolved_targets(session.model, lora.target_modules), use_dora=lora.dora,
            use_rslora=lora.rslora, init_lora_weights=_init(lora.init), modules_to_save=saved,
            ensure_weight_tying=tied,
        )
        config.target_parameters = _expert_parameters(session.model, lora)
    saved_modules = _has_saved_modules(session.model)
    if saved_modules:
        # Another adapter's --modules-to-save copies are Linear layers too: all-linear (or a
        # pattern) would put this adapter's LoRA inside them.
        config.exclude_modules = r".*\.(modules_to_save\..*|original_module)"
    if isinstance(session.model, PeftModel) and name in session.model.peft_config:
        if len(session.model.peft_config) == 1:
            session.model = session.model.unload()
        else:
            other = next(n for n in session.model.peft_config if n != name)
            session.model.set_adapter(other)
            session.model.delete_adapter(name)
        session.adapters.pop(name, None)
    recycler = session.recycler if start is None else None
    if recycler is not None and isinstance(session.model, PeftModel) and recycler.take(session.model, name, config):
        pass  # a sweep's unloaded trial, its layers renamed and restarted (recycle.py)
    else:
        state = recycler.before_fresh(config) if recycler is not None else None
        if not isinstance(session.model, PeftModel):
            if session.quantization:
                session.model = prepare_model_for_kbit_training(session.model, use_gradient_checkpointing=False)
            with _quiet_fused_expert_patterns(), _targets_checked(config):
                session.model = get_peft_model(session.model, config, adapter_name=name)
        else:
            with _quiet_fused_expert_patterns(), _targets_checked(config):
                session.model.add_adapter(name, config)
        if recycler is not None:
            recycler.after_fresh(session.model, name, config, state)
    session.model.set_adapter(name)
    if start is None and lora.target_modules == "all-linear" and not saved_modules and not config.modules_to_save:
        base_memo(session.model, "all-linear", lambda: session.model.peft_config[name].target_modules)
    if start is None and lora.init == "loftq":
        _loftq(session, name)
    if start is not None:
        import torch

        params = dict(session.model.named_parameters())
        with torch.no_grad():
            for param_name, param in params.items():
                if ("lora_" in param_name or ".modules_to_save." in param_name) and f".{start}." in param_name:
                    params[param_name.replace(f".{start}.", f".{name}.")].copy_(param)
    for param_name, param in session.model.named_parameters():
        param.requires_grad = _trained_by(param_name, name)
    return session.model


# Inits that start from the base weights' SVD (PiSSA) or QR (OLoRA): PEFT moves the adapter's start
# out of the base (W_res = W - s B0 A0), which on a resident base shared by every adapter must not outlive the run.
RESIDUAL_INITS = ("pissa", "olora")
INITIAL = "initial-adapter"


def keep_initial(model, name: str, run_dir: Path) -> Path:
    """Save a PiSSA/OLoRA adapter's start (once per run: a resumed run keeps the first one), so that the
    run saves a plain LoRA of what training changed (PEFT's path_initial_model_for_weight_conversion)
    and the base can be restored (`restore_base`)."""
    import shutil
    import tempfile

    folder = run_dir / INITIAL
    if (folder / "adapter_config.json").exists():
        return folder
    config = model.peft_config[name]
    init, config.init_lora_weights = config.init_lora_weights, True  # the start loads as a plain adapter
    try:
        with tempfile.TemporaryDirectory(prefix=".initial-", dir=run_dir) as tmp:
            model.save_pretrained(tmp, selected_adapters=[name])
            saved = Path(tmp) / name if (Path(tmp) / name / "adapter_config.json").exists() else Path(tmp)
            shutil.copytree(saved, folder)
    finally:
        config.init_lora_weights = init
    return folder


def restore_base(session, name: str, initial: Path, saved: Path | None) -> None:
    """After a PiSSA/OLoRA run: put the adapter's start back into the base weights (W = W_res + s B0 A0),
    and replace the residual adapter by the plain LoRA the run saved, the one any base loads."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    start = load_file(str(initial / "adapter_model.safetensors"))
    with torch.no_grad():
        for module_name, module in session.model.named_modules():
            if not (hasattr(module, "lora_A") and name in module.lora_A):
                continue
            a, b = start[f"{module_name}.lora_A.weight"].float(), start[f"{module_name}.lora_B.weight"].float()
            weight = module.get_base_layer().weight
            delta = module.scaling[name] * (b @ a)
            weight += (delta.T if getattr(module, "fan_in_fan_out", False) else delta).to(weight.dtype)
    model = session.model
    if len(model.peft_config) == 1:
        session.model = model = model.unload()
    else:
        model.set_adapter(next(n for n in model.peft_config if n != name))
        model.delete_adapter(name)
    if saved is not None:
        if isinstance(model, PeftModel):
            model.load_adapter(str(saved), adapter_name=name)
        else:
            session.model = PeftModel.from_pretrained(model, str(saved), adapter_name=name)
        session.model.set_adapter(name)


def _trained_by(param_name: str, adapter: str) -> bool:
    """Whether parameter `param_name` belongs to adapter `adapter`: its LoRA matrices (and DoRA
    magnitudes), and its full copies of --modules-to-save modules."""
    return (("lora_" in param_name and f".{adapter}." in param_name)
            or f".modules_to_save.{adapter}." in param_name)


def _init(init: str | None):
    """PEFT's init_lora_weights for --init (None: PEFT's default, Kaiming A and zero B). LoftQ starts
    as the default and is replaced after the adapter exists (`_loftq`), the way PEFT documents it
    for an already quantized 4-bit base."""
    return True if init in (None, "loftq") else init


def _loftq(session, name: str) -> None:
    """LoftQ on the 4-bit path: the adapter's A and B are set so that base + adapter approximate the
    unquantized weights, read from the model's safetensors file (PEFT's replace_lora_weights_loftq)."""
    import torch
    from peft import replace_lora_weights_loftq

    source = Path(session.model_source or "")
    if not any(source.glob("*.safetensors")):
        raise ConfigError(f"--init loftq reads the unquantized weights from the model's safetensors files, and "
                          f"{session.model_id} has none in {source or 'a local folder'}: use a local checkpoint "
                          "saved in safetensors, or drop --init loftq.")
    if torch.cuda.is_available():
        replace_lora_weights_loftq(session.model, model_path=str(source), adapter_name=name)
    else:
        _loftq_on_cpu(session.model, source, name)
    _unscale_loftq(session.model, name)


def _loftq_on_cpu(model, source: Path, name: str) -> None:
    """PEFT's replace_lora_weights_loftq, computed where the weights are: PEFT's runs the SVD on "cuda"
    (or "xpu") whatever the model's device, so on a CPU-only build it stops at "Torch not compiled
    with CUDA enabled". Same steps, with PEFT's own loader and decomposition: A, B = the rank-r SVD
    of (unquantized weight - dequantized 4-bit weight)."""
    import bitsandbytes as bnb
    import torch
    from peft.tuners.lora import Linear4bit
    from peft.utils.loftq_utils import _low_rank_decomposition, _SafetensorLoader

    loader = _SafetensorLoader(model, str(source))
    prefix = "base_model.model."
    with torch.no_grad():
        for module_name, module in model.named_modules():
            if not (isinstance(module, Linear4bit) and name in module.lora_A):
                continue
            weight = loader.get_tensor(module_name.removeprefix(prefix) + ".weight").float()
            quantized = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
            parts = _low_rank_decomposition(weight - quantized, reduced_rank=module.r[name])
            module.lora_A[name].weight.data = parts["R"].to(module.lora_A[name].weight.dtype)
            module.lora_B[name].weight.data = parts["L"].to(module.lora_B[name].weight.dtype)


def _unscale_loftq(model, name: str) -> None:
    """Divide LoftQ's B by the adapter's scaling: PEFT sets B·A to the quantization residual itself, but
    the layer adds scaling·B·A (alpha/r, 2 at the model defaults), which would overshoot it
    (huggingface/peft#1982, open question there). With this, base + adapter ≈ the unquantized weight
    at any alpha."""
    import torch
    from peft.tuners.lora import Linear4bit

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Linear4bit) and name in module.lora_B:
                module.lora_B[name].weight.div_(module.scaling[name])


# -- --add-tokens ---------------------------------------------------------------------------------
def add_tokens(tokenizer, spec: str | None) -> list[str]:
    """Add --add-tokens' names that `tokenizer` lacks, as whole tokens (never split, not normalised, and
    shown in decoded text, so chat answers keep them); returns the ones added."""
    from tokenizers import AddedToken

    vocab = tokenizer.get_vocab()
    new = [t for t in dict.fromkeys(_names(spec) or []) if t not in vocab]
    if new:
        tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in new])
    return new


def fit_vocabulary(session, size: int) -> None:
    """Grow the resident base's input and output embeddings to `size` rows (new rows: transformers' mean
    resizing), unless they have that many already (many checkpoints keep spare rows)."""
    from peft.utils import ModulesToSaveWrapper

    base = base_of(session.model)
    rows = base.get_input_embeddings().weight.shape[0]
    if size <= rows:
        return
    wrapped = any(isinstance(m, ModulesToSaveWrapper) for m in (base.get_input_embeddings(), base.get_output_embeddings()))
    holders = [n for n, c in getattr(session.model, "peft_config", {}).items() if c.modules_to_save] if wrapped else []
    if holders:
        raise ConfigError(f"--add-tokens grows the vocabulary to {size}, which the full embedding copies of the loaded "
                          f"adapter(s) {', '.join(holders)} cannot follow: delete them first "
                          f"(%lora_adapters --delete NAME), then train; their saved copies stay on disk.")
    base.resize_token_embeddings(size, mean_resizing=True)


def embedding_names(model) -> tuple[list[str], bool]:
    """The input and output embedding modules' names (what --modules-to-save takes), and whether they are tied."""
    base = base_of(model)
    inputs, outputs = base.get_input_embeddings(), base.get_output_embeddings()
    wanted = {id(inputs): None, **({id(outputs): None} if outputs is not None else {})}
    names = [name.rsplit(".", 1)[-1] for name, module in base.named_modules() if id(module) in wanted]
    tied = outputs is not None and outputs.weight is inputs.weight
    return names, tied


def _adopt_tokens(session, folder: Path) -> None:
    """Before loading an adapter saved with its tokenizer: give the resident tokenizer its added tokens (at
    the same ids) and the base the rows they need."""
    saved = saved_tokenizer(folder)
    if saved is None:
        return
    vocab = session.tokenizer.get_vocab()
    missing = {token: i for token, i in saved.get_added_vocab().items() if token not in vocab}
    if missing:
        add_tokens(session.tokenizer, ",".join(sorted(missing, key=missing.get)))
        moved = {t: (i, session.tokenizer.convert_tokens_to_ids(t)) for t, i in missing.items()
                 if session.tokenizer.convert_tokens_to_ids(t) != i}
        if moved:
            raise ConfigError(f"The adapter in {folder} was trained with tokens at ids this session's tokenizer already "
                              f"uses ({', '.join(f'{t} {a}->{b}' for t, (a, b) in list(moved.items())[:3])}): load it "
                              "in a fresh session (%lora_unload, then %lora_load).")
    fit_vocabulary(session, len(saved))  # the rows training had: grown to the tokenizer, or spare ones already


def _names(spec: str | None) -> list[str] | None:
    return [t.strip() for t in spec.split(",") if t.strip()] if spec else None


@contextlib.contextmanager
def _targets_checked(config):
    """PEFT's own refusal of targets that match nothing, as one line that says what to pass."""
    try:
        yield
    except ValueError as exc:
        if "target" in str(exc).lower():  # "Target modules ... not found", "No modules were targeted ..."
            raise ConfigError(f"--target-modules {config.target_modules!r} matches no layer of this model "
                              f"({str(exc).splitlines()[0][:160]}): pass all-linear, names such as q_proj,v_proj, "
                              r"or a regular expression over module paths such as '.*\.(q|v)_proj'.") from None
        raise


def lora_args(session, name: str) -> LoraArgs:
    """The shape of loaded adapter `name` (what a run started from it trains)."""
    config = session.model.peft_config[session.adapter(name).name]
    targets = config.target_modules
    # PEFT stores "all-linear" resolved to full module paths; it matches names by suffix, so the
    # layer names say the same thing shorter.
    targets = targets if isinstance(targets, str) else ",".join(sorted({t.rsplit(".", 1)[-1] for t in targets}))
    init = config.init_lora_weights
    record = Path(session.adapter(name).run_dir) / "run.json"
    tokens = read_json(record).get("lora", {}).get("add_tokens") if record.exists() else None
    return LoraArgs(r=config.r, alpha=float(config.lora_alpha), dropout=float(config.lora_dropout),
                    target_modules=targets, dora=bool(config.use_dora), rslora=bool(config.use_rslora),
                    init=init if isinstance(init, str) else None,
                    modules_to_save=",".join(config.modules_to_save) if config.modules_to_save else None,
                    add_tokens=tokens)


def load(session, source: str, name: str | None = None, output: str = "runs") -> str:
    """Load a saved adapter (a run name under `output`, or a PEFT folder) into the resident model."""
    from peft import PeftModel

    from ipylora.engine.models import check_safetensors_adapter
    from ipylora.engine.runs import adapter_dir

    session._check_idle()
    run_dir = Path(output) / source
    folder = adapter_dir(run_dir) if (run_dir / "run.json").exists() else Path(source)
    if folder is None or not (folder / "adapter_config.json").exists():
        raise UnknownNameError(f"No saved adapter at {source!r}: give a run name from %lora_runs or a PEFT folder.")
    check_safetensors_adapter(folder)
    record = read_json(run_dir / "run.json") if (run_dir / "run.json").exists() else {}
    name = check_name(name or record.get("name") or folder.name, "adapter")
    if session.model is None:  # e.g. after a restart: load the base the adapter was trained on
        session.ensure_model(record.get("model"), record.get("quantization"))
    _adopt_tokens(session, folder)
    if isinstance(session.model, PeftModel):
        if name in session.model.peft_config:
            raise ConfigError(f"Adapter {name!r} is already loaded: delete it first or pass another name.")
        session.model.load_adapter(str(folder), adapter_name=name)
    else:
        session.model = PeftModel.from_pretrained(session.model, str(folder), adapter_name=name)
    dataset = record.get("dataset", {})
    session.adapters[name] = Adapter(name, run_dir if record else folder, dataset.get("template", "{prompt}{response}"),
                                  dataset.get("name", ""))
    session.active_adapter = name
    session._changed()
    return name


def delete(session, name: str) -> None:
    """Remove adapter `name` from the resident model (its saved copy on disk stays)."""
    session._check_idle()
    session.adapter(name)
    if session.recycler is not None and session.recycler.park(session, name):
        return  # kept, renamed, for the sweep's next trial (recycle.py; it drops the copies below itself)
    decode.forget(session.model)  # the generation-time copies of adapter weights
    graphdecode.release(session.model)  # and the decode step captured with them
    if len(session.model.peft_config) == 1:
        session.model = session.model.unload()
    else:
        if session.model.active_adapter == name:
            session.model.set_adapter(next(n for n in session.model.peft_config if n != name))
        session.model.delete_adapter(name)
    del session.adapters[name]
    if session.active_adapter == name:
        session.active_adapter = next(iter(session.adapters), None)
    session._changed()


def _dropout(model, lora: LoraArgs) -> float:
    """The LoRA dropout PEFT can apply to this model's targets.

    On fused MoE experts (3-D expert weights, transformers 5) PEFT's all-linear also adapts the
    expert and router parameters (`target_parameters`, lora.ParamWrapper), which refuses any
    dropout ("lora.ParamWrapper does not work with lora_dropout != 0"): the model default of 0.05
    would fail every MoE run, so such runs train without dropout, as PEFT requires.
    """
    if lora.dropout and lora.target_modules == "all-linear" and _has_fused_experts(model):
        return 0.0
    return lora.dropout


def _expert_parameters(model, lora: LoraArgs) -> list[str] | None:
    """The fused expert weights all-linear adapts where PEFT's all-linear leaves them out.

    PEFT turns all-linear into the fused experts (`target_parameters`) only for the families whose
    experts were nn.Linear before transformers 5 (Mixtral, Qwen2/3-MoE). gpt-oss's were 3-D
    parameters from the start, so all-linear would adapt its attention alone and no MLP weight:
    here its expert projections (gate_up_proj, down_proj) are added as PEFT's target_parameters;
    their biases and the router stay frozen.
    """
    if lora.target_modules != "all-linear" or not _has_fused_experts(model):
        return None
    try:
        from peft.utils.transformers_weight_conversion import _MODEL_TO_CONVERSION_PATTERN, _MOE_TARGET_MODULE_MAPPING
    except ImportError:  # a PEFT without the conversion: what it adapts is left as it is
        return None
    if _MODEL_TO_CONVERSION_PATTERN.get(getattr(model.config, "model_type", None)) in _MOE_TARGET_MODULE_MAPPING:
        return None  # PEFT's conversion adapts them itself
    return sorted({name.rsplit(".", 1)[-1] for name, p in model.named_parameters()
                   if p.ndim == 3 and "expert" in name}) or None


@contextlib.contextmanager
def _quiet_fused_expert_patterns():
    """Hide PEFT's false alarm on fused MoE experts: its own v4->v5 conversion gives the fused
    `gate_up_proj` parameter double rank/alpha patterns, which its later check looks for among
    module names only ("rank_pattern keys did not match any targeted module"); they do apply."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"The following (rank|alpha)_pattern keys did not match.*gate_up_proj")
        yield


def _has_saved_modules(model) -> bool:
    """Whether a loaded adapter keeps full copies of modules (--modules-to-save)."""
    return any(config.modules_to_save for config in getattr(model, "peft_config", {}).values())


def _has_fused_experts(model) -> bool:
    return base_memo(model, "fused-experts",
                 lambda: any(p.ndim == 3 and "expert" in name for name, p in model.named_parameters()))


def _resolved_targets(model, spec: str):
    """`_targets(spec)`, with all-linear as PEFT resolved it the first time on this base model.

    PEFT resolves all-linear by walking every module of the model, then shortens the names: 0.1 s of
    each adapter attached to a 28-layer model (each sweep trial), measured. Fused MoE experts keep
    PEFT's own resolution (its conversion reads all-linear itself)."""
    if spec == "all-linear" and not _has_fused_experts(model):
        known = base_memo(model, "all-linear")
        if known is not None:
            return set(known)
    return _targets(spec)


def _targets(spec: str):
    """PEFT's target_modules: "all-linear", a regular expression (a string PEFT matches in full), or names."""
    from ipylora.engine.config import is_pattern

    return spec if spec == "all-linear" or is_pattern(spec) else [t.strip() for t in spec.split(",") if t.strip()]
