"""A sweep's trials re-use the LoRA layers of the trials it unloads.

Attaching an adapter makes PEFT build every LoRA layer again (196 on a 28-layer model: module
objects, a walk of the whole model per pass, the random start drawn on the host), which was most of
what a sweep trial spent before its first step. Inside `Recycler`'s lifetime (one sweep), an adapter
the sweep unloads is parked under a spare name instead of deleted, and the next trial whose LoRA
config is the same (rank, alpha, dropout, targets, init) takes it: the layers are renamed to the
trial's name, B is zeroed and A gets the start a fresh attach would have drawn at this point, so a
trial's weights, and so its losses, are the same as a fresh adapter's (tested). That start is
recorded from the first fresh attach of each config at each random state (the state a trial's seed
gives); at another state it is drawn as PEFT draws it. What the recycler keeps is released when the
sweep ends (`close`).

A spare of another rank, alpha or dropout (same targets and init) is reshaped rather than passed
over: its A and B get new tensors of the trial's rank, and its scaling and dropout are set as
PEFT's `update_layer` sets them. So only a sweep's first trial builds layers, whatever ranks it tries
(PEFT's injection walk is quadratic in the adapters loaded: every module name is checked against every
existing adapter's prefixes, which is what made a fresh attach mid-sweep cost 0.85 s on the 1.5B shape).

Only plain LoRA is recycled: default or gaussian init on Linear-like layers, no DoRA, no saved
modules (their full copies would need the base's weights back), no fused-expert parameters. Any
other adapter is deleted and attached as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math

SPARES = 2
"""Parked adapters kept at most (the oldest is deleted past it), and recorded starts. Any spare fits
any rank (`_reshape`), so the next trial needs one; each adapter loaded makes every walk of the model
(PEFT's, accelerate's, the Trainer's: dozens per trial) longer. Measured on a 28-layer model on CPU:
0.10 s of overhead per trial with 2 spares, 0.28 s with 4. The best trials' adapters that no spare
holds any more are loaded from their run folders as the sweep ends (SweepRunner._keep_best)."""
SPARE = "~spare-"
"""Parked adapters' names: '~' is in no name `check_name` accepts, so no user's adapter has one; they
never reach `session.adapters`."""


RESHAPED = ("r", "lora_alpha", "lora_dropout")
"""LoraConfig fields a parked adapter can be given anew (`_reshape`) without building its layers again."""
BOOKKEEPING = ("base_model_name_or_path", "revision", "inference_mode", "peft_version", "auto_mapping")
"""LoraConfig fields PEFT fills in as it attaches (get_peft_model names the base) that build nothing."""


def config_key(config, targets=None) -> str:
    """The LoRA config as a string, the same for two configs that build the same layers. `targets`:
    the modules PEFT resolved the config's target_modules to (all-linear becomes module names)."""
    fields = {k: v for k, v in config.to_dict().items() if k not in BOOKKEEPING}
    if targets is not None:
        fields["target_modules"] = targets
    return json.dumps(fields, sort_keys=True, default=lambda v: sorted(v) if isinstance(v, (set, frozenset)) else str(v))


def shape_key(key: str) -> str | None:
    """`config_key` less the fields `_reshape` sets: two configs with one shape key differ at most in
    rank, alpha and dropout. None where the rank or alpha varies by layer (no reshape then)."""
    fields = json.loads(key)
    if fields.get("rank_pattern") or fields.get("alpha_pattern"):
        return None
    return json.dumps({k: v for k, v in fields.items() if k not in RESHAPED}, sort_keys=True)


def recyclable(config) -> bool:
    return (config.init_lora_weights in (True, "gaussian") and not config.use_dora and not config.modules_to_save
            and not getattr(config, "target_parameters", None) and not getattr(config, "trainable_token_indices", None)
            and not getattr(config, "lora_bias", False))


class Recycler:
    """Spare adapters by config, and the recorded starts of fresh ones (see the module doc)."""

    def __init__(self, limit: int = SPARES):
        self.limit = limit
        self.spares: dict[str, str] = {}  # spare name -> config key, oldest first
        self.kept: dict[str, tuple[str, object]] = {}  # spare name -> (run name, its Adapter), while untouched
        self.keys: dict[str, str] = {}  # loaded adapter -> the key of the config it was attached with
        self.starts: dict[tuple[str, str], tuple[list, object]] = {}
        self.parked = 0
        self.protected: set[str] = set()
        """Runs whose parked adapter a trial takes only if no other spare fits (the sweep's best so far)."""
        self.ranks: tuple = ()
        self.seed: int | None = None
        self.ahead: dict[tuple, tuple[list, object]] = {}  # (rank, init, state, layer shapes) -> (starts, state after)
        self._drawing = None  # the thread drawing them

    def expect(self, ranks, seed: int | None) -> None:
        """The ranks the sweep's trials will take and the seed each trial starts from (None: it varies).
        Once the first adapter's layers exist, the start of each of those ranks is drawn in a thread
        (`_draw_ahead`), while trials train, from a generator in the very state the seed gives: the first
        trial of a new rank copies it instead of drawing ~27M numbers on the host (1.5B shape, r 16)
        between trials."""
        self.ranks, self.seed = tuple(dict.fromkeys(ranks)), seed

    # -- parking -----------------------------------------------------------------------------------
    def park(self, session, name: str) -> bool:
        """Rename loaded adapter `name` to a spare if it can be recycled (True; `session.adapters` no
        longer lists it); False: nothing changed."""
        model = session.model
        if name not in self.keys:  # only adapters attached fresh (or recycled) in this sweep
            return False
        tuners = _tuners(model)  # one walk of the model for all that follows
        if not all(_plain(layer, name) for layer in _layers(tuners, name)):
            return False
        from ipylora.engine import decode, graphdecode

        decode.forget(model, tuners)  # generation-time copies and captured steps hold the adapter by name
        graphdecode.release(model)
        self.parked += 1
        spare = f"{SPARE}{self.parked}"
        _rename(model, tuners, name, spare)
        self.spares[spare] = self.keys.pop(name)
        self.kept[spare] = (name, session.adapters.pop(name))
        if session.active_adapter == name:
            session.active_adapter = next(iter(session.adapters), None)
        while len(self.spares) > self.limit:  # memory stays flat whatever the space
            self._drop(model, next(iter(self.spares)))
        session._changed()
        return True

    def unpark(self, session, name: str) -> bool:
        """Give run `name` its parked adapter back, if no trial has taken it since (True)."""
        spare = next((s for s, (run, _) in self.kept.items() if run == name), None)
        if spare is None:
            return False
        _rename(session.model, _tuners(session.model), spare, name)
        self.keys[name] = self.spares.pop(spare)
        session.adapters[name] = self.kept.pop(spare)[1]
        return True

    def take(self, model, name: str, config) -> bool:
        """Turn a parked adapter of the same config, or of one `_reshape` can turn into it, into a fresh
        adapter `name` (True), or False."""
        if not recyclable(config):
            return False
        key = config_key(config)
        shape = shape_key(key)
        fitting = [s for s, k in self.spares.items() if k == key] or \
            [s for s, k in self.spares.items() if shape is not None and shape_key(k) == shape]
        spare = min(fitting, key=lambda s: self.kept.get(s, ("",))[0] in self.protected, default=None)
        if spare is None:
            return False
        import torch

        same = self.spares.pop(spare) == key
        self.keys[name] = key
        self.kept.pop(spare, None)
        tuners = _tuners(model)
        _rename(model, tuners, spare, name)
        layers = _layers(tuners, name)
        if not same:
            _reshape(model, layers, name, config)
        state = _digest(torch.random.get_rng_state())
        recorded = self.starts.get((key, state)) or self._drawn_ahead(layers, name, config, state)
        with torch.no_grad():
            if recorded is not None:
                starts, after = recorded
                for layer, start in zip(layers, starts):
                    layer.lora_A[name].weight.copy_(start)
                torch.random.set_rng_state(after)  # where a fresh attach leaves the host generator
            else:
                for layer in layers:
                    layer.lora_A[name].weight.copy_(_fresh_start(layer, name, config))
            self._remember(key, state, recorded or _start_of(layers, name))  # for this config's later trials
            for layer in layers:
                layer.lora_B[name].weight.zero_()
                for param in (layer.lora_A[name].weight, layer.lora_B[name].weight):
                    param.grad = None
        return True

    # -- starts ------------------------------------------------------------------------------------
    def before_fresh(self, config) -> str | None:
        """Call before PEFT attaches a fresh adapter of `config`: the random state it starts from."""
        import torch

        return _digest(torch.random.get_rng_state()) if recyclable(config) else None

    def after_fresh(self, model, name: str, config, state: str | None) -> None:
        """Record the fresh adapter's start (A of every layer, in order) for the trials that will recycle it."""
        if state is None:
            return
        key = self.keys[name] = config_key(config, model.peft_config[name].target_modules)
        layers = _layers(_tuners(model), name)
        self._remember(key, state, _start_of(layers, name))
        self._draw_ahead(layers, config)

    def _remember(self, key: str, state: str, start: tuple) -> None:
        """Keep `start` (A of every layer, the generator state after) for trials of `key` at `state`."""
        if (key, state) not in self.starts:
            self.starts[key, state] = start
            while len(self.starts) > self.limit:
                del self.starts[next(iter(self.starts))]

    def _draw_ahead(self, layers: list, config) -> None:
        """Start drawing the expected ranks' starts for these layers (see `expect`), once per sweep."""
        if self.seed is None or self._drawing is not None or not layers:
            return
        import threading

        import torch

        shapes = tuple((layer.in_features, layer.out_features) for layer in layers)
        device = layers[0].lora_A[next(iter(layers[0].lora_A))].weight.device
        init, seed, ranks = config.init_lora_weights, self.seed, [r for r in self.ranks if r != config.r]

        def draw() -> None:
            for r in ranks:
                generator = torch.Generator().manual_seed(seed)
                state = _digest(generator.get_state())
                starts = [_drawn_start(generator, i, o, r, init).to(device) for i, o in shapes]
                self.ahead[r, init, state, shapes] = (starts, generator.get_state())

        self._drawing = threading.Thread(target=draw, name="ipylora-draw-ahead", daemon=True)
        self._drawing.start()

    def _drawn_ahead(self, layers: list, name: str, config, state: str):
        """The start `_draw_ahead` drew for this trial's rank at random state `state`, if any."""
        if self._drawing is None or config.r not in self.ranks:
            return None
        self._drawing.join()  # drawn while the trials before trained: done by now, as a rule
        shapes = tuple((layer.in_features, layer.out_features) for layer in layers)
        return self.ahead.get((config.r, config.init_lora_weights, state, shapes))

    def close(self, session) -> None:
        """Delete every spare (the sweep is over) and forget the starts."""
        if self._drawing is not None:
            self._drawing.join()
        self.ahead.clear()
        self.starts.clear()
        for spare in list(self.spares):
            if session.model is not None and len(session.model.peft_config) == 1:
                session.model = session.model.unload()
                self.spares.clear()
                break
            self._drop(session.model, spare)
        self.kept.clear()

    def _drop(self, model, spare: str) -> None:
        del self.spares[spare]
        self.kept.pop(spare, None)
        if spare in model.active_adapters:
            others = [n for n in model.peft_config if n != spare]
            model.set_adapter(next((n for n in others if not n.startswith(SPARE)), others[0]))
        model.delete_adapter(spare)


@contextlib.contextmanager
def recycling(session):
    """Adapters deleted in this block are parked for the attaches that follow (a sweep's trials)."""
    session.recycler = Recycler()
    try:
        yield session.recycler
    finally:
        recycler, session.recycler = session.recycler, None
        recycler.close(session)


def _tuners(model) -> list:
    """The model's PEFT tuner layers, in module order (the order PEFT built them)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def _layers(tuners: list, name: str) -> list:
    """The LoRA layers among `tuners` holding adapter `name`."""
    from peft.tuners.lora import LoraLayer

    return [m for m in tuners if isinstance(m, LoraLayer) and name in m.lora_A]


def _plain(layer, name: str) -> bool:
    return name not in layer.lora_embedding_A and name not in getattr(layer, "lora_variant", {}) \
        and hasattr(layer.lora_A[name], "weight") and hasattr(layer, "in_features")


def _start_of(layers: list, name: str) -> tuple:
    """Adapter `name`'s A in every layer as it starts, and where the host generator is now."""
    import torch

    return [layer.lora_A[name].weight.detach().clone() for layer in layers], torch.random.get_rng_state()


def _reshape(model, layers: list, name: str, config) -> None:
    """Give adapter `name` the rank, alpha and dropout of `config` as PEFT's `update_layer` would: A
    and B of a new rank get new (uninitialised) tensors, on the old ones' device and dtype; the
    scaling is alpha / r (alpha / sqrt(r) with rsLoRA)."""
    import torch

    from ipylora.engine import dropout as lora_dropout

    r, alpha, dropout = config.r, config.lora_alpha, config.lora_dropout
    for layer in layers:
        a, b = layer.lora_A[name], layer.lora_B[name]
        if layer.r[name] != r:
            a.weight = torch.nn.Parameter(a.weight.new_empty(r, a.in_features), a.weight.requires_grad)
            b.weight = torch.nn.Parameter(b.weight.new_empty(b.out_features, r), b.weight.requires_grad)
            a.out_features = b.in_features = r
        layer.r[name], layer.lora_alpha[name] = r, alpha
        layer.scaling[name] = alpha / math.sqrt(r) if layer.use_rslora[name] else alpha / r
        if getattr(layer.lora_dropout[name], "p", 0.0) != dropout:
            lora_dropout.restore(layer, name)  # the training that follows defers the new dropout again
            module = torch.nn.Dropout(p=dropout) if dropout > 0.0 else torch.nn.Identity()
            layer.lora_dropout[name] = module.train(layer.lora_dropout[name].training)
    held = model.peft_config[name]
    held.r, held.lora_alpha, held.lora_dropout = r, alpha, dropout


def _fresh_start(layer, name: str, config):
    """A as PEFT's update_layer draws it from this random state: it builds lora_A, then lora_B (both
    nn.Linear, whose own init draws), then re-draws A (kaiming-uniform, or normal for gaussian)."""
    import torch

    return _drawn_start(torch.default_generator, layer.in_features, layer.out_features, layer.r[name],
                        config.init_lora_weights)


def _drawn_start(generator, fan_in: int, fan_out: int, r: int, init):
    """`_fresh_start` from `generator`: nn.Linear(fan_in, r) and nn.Linear(r, fan_out) each draw their
    weight (kaiming-uniform, a = sqrt(5)), then A is drawn again. On the host, in fp32, as PEFT draws."""
    import torch

    a = torch.empty(r, fan_in)
    torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
    torch.nn.init.kaiming_uniform_(torch.empty(fan_out, r), a=math.sqrt(5), generator=generator)
    if init is True:
        torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
    else:
        torch.nn.init.normal_(a, std=1 / r, generator=generator)
    return a


def _rename(model, tuners: list, old: str, new: str) -> None:
    """Adapter `old` becomes `new` in every tuner layer and in the model's configs and active names.

    PEFT keeps an adapter as entries keyed by its name in each layer's `adapter_layer_names` and
    `other_param_names` (the attributes its own delete_adapter walks) and in `peft_config`."""
    def renamed(active):
        if isinstance(active, str):
            return new if active == old else active
        return [new if a == old else a for a in active]

    for module in tuners:
        for attr in (*module.adapter_layer_names, *module.other_param_names, "lora_variant"):
            entries = getattr(module, attr, None)
            if entries is not None and old in entries:
                entries[new] = entries.pop(old)
        module._active_adapter = renamed(module._active_adapter)
    model.peft_config[new] = model.peft_config.pop(old)
    for holder in (model, model.base_model):  # PeftModel and its LoraModel each keep the active name
        if "active_adapter" in holder.__dict__:
            holder.active_adapter = renamed(holder.active_adapter)


def _digest(state) -> str:
    return hashlib.sha1(state.numpy().tobytes()).hexdigest()
