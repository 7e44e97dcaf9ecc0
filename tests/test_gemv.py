"""The decode step's one-token kernel (ipylora.engine.gemv) gives PyTorch's results, and only where it may.

On a GPU the kernel runs compiled; off one, in Triton's interpreter (TRITON_INTERPRET=1, set by
conftest.py) on CPU tensors: the same kernel source."""

from __future__ import annotations

import numpy
import pytest
import torch

pytest.importorskip("triton")

from ipylora.engine import gemv  # noqa: E402


@pytest.fixture()
def device():
    """Where the kernels run: CUDA, or the CPU through the interpreter."""
    if torch.cuda.is_available():
        return "cuda"
    if not gemv.interpreted():
        pytest.skip("no GPU, and Triton's interpreter is off")
    return "cpu"


@pytest.fixture()
def interpreted(device):
    if device != "cpu":
        pytest.skip("checks the interpreter's CPU path")


# (out, in): rows that do not fill the last program, rows longer than one chunk and not a multiple of it.
SHAPES = [(40, 384), (96, 1536), (7, 64)]


@pytest.mark.parametrize("out_features,in_features", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_dense_kernel_matches_linear_with_and_without_the_adapter_term(device, out_features, in_features, bias):
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, out_features, bias=bias, device=device)
    x = torch.randn(1, 1, in_features, device=device)
    spec = gemv.spec(linear, torch.float32)
    assert spec is not None
    assert torch.allclose(gemv.gemv(x, spec), linear(x), atol=1e-5)
    t, b = torch.randn(16, device=device), torch.randn(out_features, 16, device=device) * 0.1
    expected = linear(x) + t @ b.t()
    got = gemv.gemv(x, spec, t, b)
    assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-5)
    # A rank that is not a power of two (the kernel pads it) and the GPU's tilings of the same
    # product (the interpreter's default takes 16 rows a program).
    t, b = t[:12], b[:, :12].contiguous()
    for tiling in ((1, 512, 4), (2, 64, 1), (8, 2048, 8)):
        assert torch.allclose(gemv.gemv(x, spec, t, b, tuning=tiling), linear(x) + t @ b.t(), atol=1e-5)
    # In bf16, as chat runs it: fp32 sums, one rounding at the end.
    linear, x, t, b = linear.to(torch.bfloat16), x.to(torch.bfloat16), t.to(torch.bfloat16), b.to(torch.bfloat16)
    expected = x.float() @ linear.weight.float().t() + (linear.bias.float() if bias else 0) + t.float() @ b.float().t()
    got = gemv.gemv(x, gemv.spec(linear, torch.bfloat16), t, b)
    assert got.dtype == torch.bfloat16 and (got.float() - expected).abs().max() <= 0.01 * expected.abs().max()


def test_layers_the_kernel_does_not_take_keep_their_forward(interpreted):
    import bitsandbytes as bnb
    from transformers.pytorch_utils import Conv1D

    linear = torch.nn.Linear(64, 32)
    assert gemv.spec(linear, torch.bfloat16) is None  # another dtype than the compute dtype
    assert gemv.spec(Conv1D(32, 64), torch.float32) is None  # GPT-2's transposed layout
    assert gemv.spec(torch.nn.Embedding(10, 8), torch.float32) is None
    # An 8-bit layer keeps bitsandbytes' kernel (4-bit ones: test_nf4_layers_the_kernel_does_not_take).
    assert gemv.spec(bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False), torch.float16) is None


def test_no_spec_off_cuda_without_the_interpreter(interpreted, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    assert gemv.spec(torch.nn.Linear(64, 32), torch.float32) is None


def test_captured_form_runs_the_kernels_and_gives_peft_logits(interpreted, monkeypatch):
    """In the decode step's captured form every adapted layer (and the plain ones) runs one kernel:
    the logits are PEFT's."""
    from ipylora.engine import decode
    from tests.test_decode import lora_model, step_logits

    model = lora_model()
    calls = []
    original = gemv.gemv
    monkeypatch.setattr(gemv, "gemv", lambda x, spec, *rest, **kw: calls.append(len(rest)) or original(x, spec, *rest, **kw))
    expected, _ = step_logits(model)
    got, (_, _, plain) = step_logits(model, decode.lean_lora(model), decode.capturing(),
                                     decode.kernel_linears(model.get_base_model()))
    adapted = sum(1 for m in model.modules() if hasattr(m, "lora_A"))
    assert calls.count(2) == adapted  # each LoRA layer: base and adapter in one kernel
    assert plain >= adapted  # their base layers were offered the plain kernel too (unused here)
    assert torch.allclose(expected, got, atol=1e-4)
    assert not any("forward" in m.__dict__ for m in model.modules())  # every forward restored


def test_a_compiled_step_keeps_the_layers_own_forward(interpreted):
    """Under torch.compile (--compile) the patched layers trace their own forward: inductor makes that
    step's kernels, and the compile needs no Triton launch from Python."""
    from ipylora.engine import decode

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 32))
    x = torch.randn(1, 64)
    with torch.no_grad(), decode.kernel_linears(model) as patched:
        launched = []
        original = gemv.gemv
        gemv.gemv = lambda *args, **kwargs: launched.append(1) or original(*args, **kwargs)
        try:
            compiled = torch.compile(lambda v: model(v), fullgraph=True, dynamic=False)(x)
            eager = model(x)
        finally:
            gemv.gemv = original
    assert patched == 2 and len(launched) == 2  # the eager call ran the kernels, the compiled one did not
    assert torch.allclose(compiled, eager, atol=1e-5)


def test_merged_copies_run_the_kernel_in_the_captured_form(interpreted, monkeypatch):
    """Chat's and evals' merged weight copies (decode.merged_lora) run gemv's kernel for one token in
    the captured step, with no adapter term left to add, q/k/v and gate/up each as one kernel over
    their stacked copies: PEFT's logits."""
    from ipylora.engine import decode
    from tests.test_decode import lora_model, step_logits

    model = lora_model()
    calls = []
    original = gemv.gemv
    monkeypatch.setattr(gemv, "gemv", lambda x, spec, *rest, **kw: calls.append(len(rest)) or original(x, spec, *rest, **kw))
    expected, _ = step_logits(model)
    got, (_, merged, _) = step_logits(model, decode.lean_lora(model), decode.merged_lora(model, 1 << 40),
                                      decode.capturing())
    blocks = len(model.get_base_model().model.layers)
    assert merged > 0 and calls == [0] * 4 * blocks  # q/k/v stacked, o, gate/up stacked, down: four kernels a block
    assert torch.allclose(expected, got, atol=1e-4)


def test_stacked_copies_with_biases_give_peft_logits(interpreted):
    """Qwen2's q/k/v have biases and fewer key/value heads: their stacked copy (rows of different
    heights, biases stacked with them) gives PEFT's logits in the captured form and out of it."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from ipylora.engine import decode
    from tests.test_decode import step_logits

    torch.manual_seed(0)
    base = Qwen2ForCausalLM(Qwen2Config(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0))
    for module in base.modules():
        if getattr(module, "bias", None) is not None:
            torch.nn.init.normal_(module.bias, std=0.5)  # zero biases would hide a misplaced one
    model = get_peft_model(base, LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False)).eval()
    expected, _ = step_logits(model)
    captured, _ = step_logits(model, decode.lean_lora(model), decode.merged_lora(model, 1 << 40), decode.capturing())
    eager, _ = step_logits(model, decode.lean_lora(model), decode.merged_lora(model, 1 << 40))
    assert torch.allclose(expected, captured, atol=1e-4) and torch.allclose(expected, eager, atol=1e-4)


@pytest.mark.parametrize("merge", [False, True])
def test_compiled_decode_layers_run_the_kernel_as_an_operator(device, merge, monkeypatch):
    """Inside torch.compile of the decode step (decode_layers.py, `%lora_chat --compile`), one token's
    layers still run the kernel, through the custom operator ipylora::gemv: the unmerged adapter's
    layers with its term, the merged copies stacked (q/k/v, gate/up: 4 launches a layer, not 7), with
    the eager step's logits."""
    from ipylora.engine import graphdecode
    from ipylora.engine.decode import capturing, kernel_linears, lean_lora, merged_lora
    from tests.test_graphdecode import gqa_lora_model

    model = gqa_lora_model(layers=2, vocab=256).to(device)
    launched = []
    launch = gemv._launch
    monkeypatch.setattr(gemv, "_launch", lambda *args: launched.append(args[1].shape) or launch(*args))

    def steps(compiled: bool) -> list:
        graphdecode.release(model)
        with torch.inference_mode(), lean_lora(model), merged_lora(model, 10**9 if merge else 0), \
                graphdecode.folded_gqa():
            graph = graphdecode.step_graph(model, 16, compiled, capture=False)
            token = graph.prefill([5, 6, 7, 8]).argmax(-1)
            out = []
            with capturing(True), kernel_linears(model), graph._compiling():
                for position in range(4, 8):
                    graph.token.copy_(token.view(1, 1))
                    graph.position.fill_(position)
                    out.append(graph._step().float().clone())
                    token = out[-1].argmax(-1)
        graphdecode.release(model)
        return out

    expected = steps(False)
    launched.clear()
    torch._dynamo.reset()
    got = steps(True)
    assert len(launched) == 4 * 2 * (4 if merge else 7)
    assert max((a - b).abs().max().item() for a, b in zip(expected, got)) < 1e-4


def nf4_layer(out_features, in_features, device, bias=False, nested=True, blocksize=64, dtype=torch.bfloat16,
              quant_type="nf4"):
    """bitsandbytes' Linear4bit over a random weight, quantized where it will run."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, out_features, bias=bias)
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias, compute_dtype=dtype, quant_type=quant_type,
                              compress_statistics=nested)
    layer.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type=quant_type,
                                     compress_statistics=nested, blocksize=blocksize)._quantize(device)
    if bias:
        layer.bias = torch.nn.Parameter(torch.randn(out_features, device=device, dtype=dtype), requires_grad=False)
    return layer


# (out, in, bias, double quantization, block, dtype): rows that are not a multiple of 512 weights
# (padded), blocks of 128 (their scale repeated), fp16 inputs.
NF4_CASES = [(40, 1024, False, True, 64, torch.bfloat16), (7, 704, True, False, 64, torch.bfloat16),
             (24, 1536, False, True, 128, torch.float16)]


@pytest.mark.parametrize("mma", [True, False])
@pytest.mark.parametrize("out_features,in_features,bias,nested,blocksize,dtype", NF4_CASES)
def test_nf4_kernel_gives_the_dequantized_layer_s_product(device, out_features, in_features, bias, nested, blocksize,
                                                           dtype, mma, monkeypatch):
    """The repacked nf4 kernel computes x W^T with W as bitsandbytes dequantizes it (to bf16's rounding
    of the code book: 0.3% a weight), its bias and the adapter's term, at any tiling; repacked once."""
    import bitsandbytes as bnb

    # The tensor-core kernel, or the fp32 one that layers of few rows keep.
    monkeypatch.setattr(gemv, "NF4_MMA_MAX_SMALL", 0 if mma else 1024)
    layer = nf4_layer(out_features, in_features, device, bias, nested, blocksize, dtype)
    spec = gemv.spec(layer, dtype)
    assert spec is not None and spec.scales is not None and gemv.spec(layer, dtype) is spec
    assert spec.weight.dim() == (3 if mma else 2)
    weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    x = torch.randn(1, 1, in_features, device=device, dtype=dtype)
    t = torch.randn(12, device=device, dtype=dtype)
    b = (torch.randn(out_features, 12, device=device) * 0.1).to(dtype)
    expected = x.float() @ weight.t() + (layer.bias.float() if bias else 0)
    got = gemv.gemv(x, spec)
    assert got.dtype == dtype and got.shape == expected.shape
    assert (got.float() - expected).abs().max() <= 0.01 * expected.abs().max()
    expected = expected + t.float() @ b.float().t()
    for pdl in (False, True) if device == "cuda" and mma else (False,):  # plainly or as a dependent launch
        monkeypatch.setattr(gemv, "PDL", pdl)
        for tiling in (None, (1, 1, 1), (8, 2, 4)):
            got = gemv.gemv(x, spec, t, b, tuning=tiling)
            assert (got.float() - expected).abs().max() <= 0.01 * expected.abs().max(), (pdl, tiling)
    # An input that starts 2 bytes into its storage (the kernel reads 32-bit pairs): taken as a copy.
    shifted = torch.cat([x.new_zeros(1, 1, 1), x], dim=-1)[..., 1:]
    assert shifted.data_ptr() % 4 and torch.equal(gemv.gemv(shifted, spec, t, b), gemv.gemv(x, spec, t, b))


def test_nf4_layers_the_kernel_does_not_take(interpreted):
    assert gemv.spec(nf4_layer(32, 512, "cpu", quant_type="fp4"), torch.bfloat16) is None  # another code book
    assert gemv.spec(nf4_layer(32, 512, "cpu", blocksize=32), torch.bfloat16) is None  # blocks under 64 weights
    assert gemv.spec(nf4_layer(32, 512, "cpu", dtype=torch.float32), torch.float32) is None  # fp32 inputs


def _run_ptx(asm: str, registers: dict) -> dict:
    """The lookup's PTX run by a model of its five instructions (prmt as the PTX manual defines it:
    a selector's low 3 bits pick one of the 8 bytes of {b, a}, its top bit replicates that byte's sign)."""
    def value(token):
        return registers[token] if token in registers else int(token, 0)

    for line in asm.strip("{}\n").splitlines():
        line = line.strip().rstrip(";")
        if line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        out, *args = [a.strip() for a in rest.split(",")]
        if op == "prmt.b32":
            a, b, c = (value(arg) for arg in args)
            source = (b << 32 | a).to_bytes(8, "little")
            result = 0
            for i in range(4):
                selector = (c >> 4 * i) & 15
                byte = source[selector & 7]
                result |= ((0xFF if byte & 0x80 else 0) if selector & 8 else byte) << 8 * i
        else:
            a, b = (value(arg) for arg in args)
            result = {"and.b32": a & b, "or.b32": a | b, "shr.b32": a >> b}[op]
        registers[out] = result & 0xFFFFFFFF
    return registers


def test_nf4_lookup_assembly_gives_the_table_for_every_code():
    """The inline PTX of the GPU path (which the interpreter does not run) turns each word of 8 codes
    into the table's 8 weights, for codes drawn at random and each code in each place."""
    import random
    import struct

    from ipylora.engine import gemv_kernels

    table = gemv_kernels.table_values()
    assert max(abs(v - c) for v, c in zip(table, gemv_kernels.NF4)) < 0.003
    planes = {f"${9 + i}": w & 0xFFFFFFFF for i, w in enumerate(gemv_kernels.NF4_PLANES)}
    rng = random.Random(0)
    words = [[rng.randrange(16) for _ in range(8)] for _ in range(300)] + [[c] * 8 for c in range(16)]
    for codes in words:
        registers = _run_ptx(gemv_kernels.NF4_LOOKUP.value, {"$8": sum(c << 4 * k for k, c in enumerate(codes)),
                                                               **planes})
        got = [struct.unpack("<f", struct.pack("<I", registers[f"${k}"]))[0] for k in range(8)]
        assert got == [table[c] for c in codes], codes


def _operands(text: str) -> list:
    """PTX operands: names, or lists of names for {a, b, ...} groups."""
    out, depth, current = [], 0, ""
    for ch in text + ",":
        if ch == "{":
            depth, current = 1, ""
        elif ch == "}":
            depth = 0
            out.append([name.strip() for name in current.split(",")])
            current = None
        elif ch == "," and depth == 0:
            if current is not None and current.strip():
                out.append(current.strip())
            current = ""
        elif current is not None:
            current += ch
    return out


def _half_float(bits: int, bf16: bool) -> float:
    import struct

    if bf16:
        return struct.unpack("<f", struct.pack("<I", (bits & 0xFFFF) << 16))[0]
    return float(numpy.array([bits & 0xFFFF], dtype=numpy.uint16).view(numpy.float16)[0])


def _run_warp(asm: str, lanes: list[dict], shared: dict | None = None) -> list[dict]:
    """The nf4 mma kernel's PTX run by a model of a warp: `lanes` are the 32 lanes' registers, run in
    step; mma.sync takes every lane's fragment as the PTX manual lays out m16n8k16 (lane 4 g + c: A
    rows g and g + 8 at columns 2 c, 2 c + 1 and 8 more; B columns g at rows 2 c, 2 c + 1 and 8 more;
    C rows g and g + 8 at columns 2 c, 2 c + 1), the other instructions lane by lane; `shared`: the
    block's shared memory, 32-bit words by byte address (the table's symbol is at 1024)."""
    import struct

    def f32(bits):
        return struct.unpack("<f", struct.pack("<I", bits & 0xFFFFFFFF))[0]

    def bits32(value):
        return struct.unpack("<I", struct.pack("<f", value))[0]

    for line in asm.strip("{}\n").splitlines():
        line = line.strip().rstrip(";")
        if line.startswith((".reg", ".shared")):
            continue
        op, rest = line.split(None, 1)
        args = _operands(rest)
        if op == "st.shared.v4.b32":
            for regs in lanes:
                address = regs[args[0].strip("[]")]
                for k, name in enumerate(args[1]):
                    shared[address + 4 * k] = regs[name]
            continue
        if op == "ld.shared.b32":
            for regs in lanes:
                regs[args[0]] = shared[regs[args[1].strip("[]")]]
            continue
        if op.startswith("mma.sync"):
            bf16 = ".bf16." in op
            d, a, b, c = args
            A, B, C = numpy.zeros((16, 16)), numpy.zeros((16, 8)), numpy.zeros((16, 8))
            for lane, regs in enumerate(lanes):
                g, q = divmod(lane, 4)
                for e in (0, 1):
                    for i, (row, col) in enumerate(((g, 2 * q), (g + 8, 2 * q), (g, 2 * q + 8), (g + 8, 2 * q + 8))):
                        A[row, col + e] = _half_float(regs[a[i]] >> 16 * e, bf16)
                    B[2 * q + e, g] = _half_float(regs[b[0]] >> 16 * e, bf16)
                    B[2 * q + 8 + e, g] = _half_float(regs[b[1]] >> 16 * e, bf16)
                    C[g, 2 * q + e] = f32(regs[c[e]])
                    C[g + 8, 2 * q + e] = f32(regs[c[2 + e]])
            D = (A @ B + C).astype(numpy.float32)
            for lane, regs in enumerate(lanes):
                g, q = divmod(lane, 4)
                for e in (0, 1):
                    regs[d[e]] = bits32(D[g, 2 * q + e])
                    regs[d[2 + e]] = bits32(D[g + 8, 2 * q + e])
            continue
        for regs in lanes:
            def value(token):
                return regs[token] if token in regs else int(token, 0)

            out, *ins = args
            if op in ("mov.b64", "mov.b32") and isinstance(out, list):  # split a register into halves
                width = 32 if op == "mov.b64" else 16
                for k, name in enumerate(out):
                    regs[name] = (regs[ins[0]] >> width * k) & ((1 << width) - 1)
            elif op == "mov.f32":
                regs[out] = int(ins[0][2:], 16)
            elif op == "mov.u32":
                regs[out] = 1024 if ins[0] == "ipylora_nf4_table" else value(ins[0])
            elif op in ("shl.b32", "add.u32"):
                a, b = (value(name) for name in ins)
                regs[out] = ((a << b) if op == "shl.b32" else (a + b)) & 0xFFFFFFFF
            elif op == "cvt.f32.f16":
                regs[out] = bits32(_half_float(regs[ins[0]], False))
            elif op == "fma.rn.f32":
                x, y, z = (f32(regs[name]) for name in ins)
                regs[out] = bits32(float(numpy.float32(x) * numpy.float32(y) + numpy.float32(z)))
            else:
                _run_ptx(f"{op} {out}, {', '.join(ins)};", regs)
    return lanes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nf4_mma_assembly_run_by_a_warp_model_gives_the_layer_s_product(interpreted, dtype, monkeypatch):
    """The GPU path's PTX (which the interpreter does not run), fed what nf4_mma_kernel's lanes read
    of the repacked layout, gives bitsandbytes' dequantized product: the repacked codes meet the
    tensor cores' fragments as the PTX manual lays them out, with the code book looked up in the
    shared table that the fill's PTX writes (one warp filling all of it)."""
    import bitsandbytes as bnb

    from ipylora.engine import gemv_kernels

    monkeypatch.setattr(gemv, "NF4_MMA_MAX_SMALL", 0)
    layer = nf4_layer(24, 256, "cpu", dtype=dtype)
    spec = gemv.spec(layer, dtype)
    assert spec.weight.shape == (2, 4, 128) and spec.scales.shape == (2, 4, 16)
    weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    x = torch.randn(256, dtype=dtype)
    expected = x.float() @ weight.t()
    bf16 = dtype == torch.bfloat16
    planes = [w & 0xFFFFFFFF for w in gemv._pair_planes(bf16)]
    shared = {}
    asm = (gemv_kernels.NF4_TABLE_BF16 if bf16 else gemv_kernels.NF4_TABLE_FP16).value
    fill = [{} for _ in range(32)]
    _run_warp(gemv_kernels.TABLE_BASE.value, fill)
    base = fill[0]["$0"]
    for k in range(2048 // 32):  # the kernel's fill with WARPS = 1
        for lane, regs in enumerate(fill):
            slot = lane + 32 * k
            regs.update({"$1": base + slot // 8 * 128 + slot % 8 * 16, "$2": slot // 8,
                         **{f"${3 + i}": plane for i, plane in enumerate(planes)}})
        _run_warp(gemv_kernels.NF4_FILL.value, fill, shared)
    assert len(shared) == 8192
    words = spec.weight.view(torch.int64)
    pairs = x.view(torch.int64)
    scales = spec.scales.view(torch.int32)
    got = torch.zeros(32)
    for tile in range(2):
        lanes = [{"$9": 0, "$10": 0} for _ in range(32)]
        for group in range(4):
            for lane, regs in enumerate(lanes):
                regs.update({"$2": int(words[tile, group, 2 * lane]) & (1 << 64) - 1,
                             "$3": int(words[tile, group, 2 * lane + 1]) & (1 << 64) - 1,
                             "$8": int(scales[tile, group, lane // 4]) & 0xFFFFFFFF,
                             **{f"${4 + s}": int(pairs[group * 16 + lane % 4 * 4 + s]) & (1 << 64) - 1 for s in range(4)},
                             "$11": 4 * lane, "$12": base})
            _run_warp(asm, lanes, shared)
            for regs in lanes:
                regs["$9"], regs["$10"] = regs["$0"], regs["$1"]
        for r in range(8):  # every lane of row r holds its sum
            assert len({lanes[4 * r + c]["$0"] for c in range(4)}) == 1
            got[16 * tile + r], got[16 * tile + 8 + r] = numpy.array([lanes[4 * r]["$0"], lanes[4 * r]["$1"]],
                                                                     dtype=numpy.uint32).view(numpy.float32).tolist()
    assert (got[:24] - expected).abs().max() <= 0.01 * expected.abs().max()


def test_captured_form_of_a_4bit_model_runs_the_nf4_kernel_and_release_drops_its_codes(interpreted, monkeypatch):
    """A bf16 4-bit model with an adapter: in the captured form each adapted layer runs the nf4 kernel
    with its adapter's term (but the tiny model's down projections, 344 weights wide: bitsandbytes'
    blocks of 64 cross their rows, so they keep its kernel), q/k/v and gate/up as one stacked kernel
    each (gate/up's 344 rows padded to 352 in the stack), the logits are PEFT's over bitsandbytes'
    layers; graphdecode.release drops the repacked codes."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from ipylora.engine import decode, graphdecode
    from ipylora.engine.models import _keep_4bit_layout_trainable
    from ipylora.engine.tiny import tiny_model_path
    from tests.test_decode import step_logits

    quantized = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path(), quantization_config=quantized, device_map={"": "cpu"},
                                                dtype=torch.bfloat16)
    _keep_4bit_layout_trainable(base)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False)).eval()
    monkeypatch.setattr(gemv, "NF4_MMA_MAX_SMALL", 0)  # the tensor-core kernel for the tiny model's layers too
    launched = []
    launch = gemv._launch_nf4
    monkeypatch.setattr(gemv, "_launch_nf4", lambda *args: launched.append(args[5] is not None) or launch(*args))
    expected, _ = step_logits(model)
    got, _ = step_logits(model, decode.lean_lora(model), decode.capturing(), decode.kernel_linears(base))
    adapted = [m for m in model.modules() if hasattr(m, "lora_A")]
    taken = [m for m in adapted if m.base_layer.in_features % 64 == 0]
    assert len(taken) == len(adapted) - 2
    stacked = [m for m in taken if m.base_layer.__dict__.get(gemv._NF4_STACK, (0, None))[1] is not None]
    # nf4 base and adapter in one kernel; stacked: q/k/v in one, gate/up in one, o alone (2 blocks)
    assert launched == [True] * 3 * 2
    assert len(stacked) == 4  # q_proj and gate_proj hold their stacks
    assert (got.float() - expected.float()).abs().max() <= 0.03 * expected.float().abs().max()
    assert sum(m.base_layer.__dict__[gemv._NF4][1] is not None for m in adapted if gemv._NF4 in m.base_layer.__dict__) \
        == len(taken) - 10  # the stacked layers make no copy of their own
    graphdecode.release(model)
    assert not any(gemv._NF4 in m.__dict__ or gemv._NF4_STACK in m.__dict__ or decode._GEMV in m.__dict__
                   for m in model.modules())


def test_captured_form_of_a_plain_4bit_model_stacks_q_k_v_and_gate_up(interpreted, monkeypatch):
    """Without an adapter, kernel_linears runs q/k/v and gate/up of each block as one stacked nf4
    kernel each (o_proj alone; the down projections keep bitsandbytes' kernel): the model's logits."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from ipylora.engine import decode
    from ipylora.engine.models import _keep_4bit_layout_trainable
    from ipylora.engine.tiny import tiny_model_path
    from tests.test_decode import step_logits

    quantized = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path(), quantization_config=quantized,
                                                 device_map={"": "cpu"}, dtype=torch.bfloat16).eval()
    _keep_4bit_layout_trainable(model)  # bitsandbytes' CPU kernels as a training run keeps them
    model.get_base_model = lambda: model
    monkeypatch.setattr(gemv, "NF4_MMA_MAX_SMALL", 0)
    launched = []
    launch = gemv._launch_nf4
    monkeypatch.setattr(gemv, "_launch_nf4", lambda *args: launched.append(args[1].shape[0]) or launch(*args))
    expected, _ = step_logits(model)
    got, (_, patched) = step_logits(model, decode.capturing(), decode.kernel_linears(model))
    assert launched == [3 * 128 // 16, 128 // 16, 2 * 352 // 16] * 2 and patched == 2 * 6
    assert (got.float() - expected.float()).abs().max() <= 0.03 * expected.float().abs().max()


def test_nf4_stack_gives_each_layer_s_product_and_adapter_term(device, monkeypatch):
    """gemv.nf4_stack: layers of unequal rows (k/v under q, as in GQA; 20 rows padded to 32), some with
    a bias, as one kernel whose tiles each add their own layer's adapter term (t_index)."""
    import bitsandbytes as bnb

    monkeypatch.setattr(gemv, "NF4_MMA_MAX_SMALL", 0)
    layers = [nf4_layer(48, 128, device), nf4_layer(16, 128, device, bias=True), nf4_layer(20, 128, device)]
    spec, spans = gemv.nf4_stack(layers, torch.bfloat16)
    assert [(s.start, s.stop) for s in spans] == [(0, 48), (48, 64), (64, 84)] and spec.out_features == 96
    assert gemv.nf4_stack(layers, torch.bfloat16)[0] is spec  # kept on the first layer
    x = torch.randn(1, 1, 128, device=device, dtype=torch.bfloat16)
    t = torch.randn(3 * 4, device=device, dtype=torch.bfloat16)
    bs = [(torch.randn(layer.out_features, 4, device=device) * 0.1).to(torch.bfloat16) for layer in layers]
    b = torch.zeros(96, 4, device=device, dtype=torch.bfloat16)
    for span, layer_b in zip(spans, bs):
        b[span] = layer_b
    t_index = torch.tensor([0, 0, 0, 4, 8, 8], dtype=torch.int32, device=device)
    made = gemv.stack_terms(spec, spans, bs)  # what decode._Group hands the kernel
    assert torch.equal(made[0], b) and torch.equal(made[1], t_index)
    got = gemv.gemv(x, spec, t, b, t_index=t_index)
    for i, (layer, span, layer_b) in enumerate(zip(layers, spans, bs)):
        weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        expected = x.float() @ weight.t() + (layer.bias.float() if layer.bias is not None else 0) \
            + t[4 * i:4 * i + 4].float() @ layer_b.float().t()
        assert (got[..., span].float() - expected).abs().max() <= 0.01 * expected.abs().max(), i
    assert not got[..., 84:].any()  # padding rows: zeros
    monkeypatch.setattr(gemv, "NF4_STACK", False)
    assert gemv.nf4_stack(layers, torch.bfloat16) is None
