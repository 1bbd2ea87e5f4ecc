"""M7C model: public API, parameter count, dense baseline, checkpointing, incremental decode."""

import pytest
import torch

from nsa.attention.rope import RotaryEmbedding
from nsa.config import ModelConfig
from nsa.errors import UserError
from nsa.model import M7C, RMSNorm, build_model

TINY = dict(vocab_size=100, dim=32, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=8, ffn_hidden=64,
            nsa=dict(cmp_block=8, cmp_stride=4, slc_block=8, n_selected=3, window=12))


def test_build_model_from_dict_and_typed_config():
    for cfg in (TINY, ModelConfig.from_dict(TINY)):
        model = build_model(cfg)
        assert isinstance(model, torch.nn.Module)
        logits = model(torch.randint(0, 100, (2, 21)))
        assert logits.shape == (2, 21, 100)
    assert model.embed.weight.shape[0] == 128  # vocab padded to a multiple of 64
    assert model.head.weight is model.embed.weight  # tied


def test_m7c_parameter_count_documented():
    with torch.device("meta"):
        nsa, full = build_model({}), build_model({"attention": "full"})
    # documented in nsa/model.py's docstring and README
    assert round(nsa.num_params() / 1e6, 1) == 124.9
    assert round(full.num_params() / 1e6, 1) == 111.8
    assert nsa.cfg.padded_vocab_size == 50304


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_rmsnorm_matches_its_formula_through_torch_rms_norm(dtype, tol):
    """The norm and both gradients against x * rsqrt(mean(x^2) + eps) * w written out in fp64 (tolerance relative
    to each tensor's largest entry), the output in x's dtype; and it goes through F.rms_norm, which CUDA runs as one
    fused kernel each way, not through the written-out elementwise ops."""
    torch.manual_seed(0)
    norm = RMSNorm(48, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48))
    x = (3 * torch.randn(2, 7, 48)).to(dtype).requires_grad_()
    calls = []

    class Calls(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            calls.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    with Calls():
        y = norm(x)
    assert "rms_norm" in calls and "pow" not in calls and "rsqrt" not in calls, calls
    grad = torch.randn(y.shape).to(dtype)
    dx, dw = torch.autograd.grad(y, (x, norm.weight), grad)
    x64, w64 = x.detach().double().requires_grad_(), norm.weight.detach().double().requires_grad_()
    ref = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * w64
    dx64, dw64 = torch.autograd.grad(ref, (x64, w64), grad.double())
    assert y.dtype == dx.dtype == dw.dtype == dtype
    for got, want in ((y, ref), (dx, dx64), (dw, dw64)):
        assert (got.double() - want).abs().max() <= tol * want.abs().max()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # training: the fp32 residual stream stays fp32
        assert RMSNorm(48, 1e-5)(torch.randn(3, 48)).dtype == torch.float32


@pytest.mark.parametrize("bad, key", [
    ({"dimm": 3}, "model.dimm"),
    ({"n_heads": 12, "n_kv_heads": 5}, "n_kv_heads"),
    ({"attention": "sparse"}, "model.attention"),
    ({"nsa": {"cmp_stride": 64}}, "cmp_stride"),
    ({"nsa": {"n_selected": "16"}}, "model.nsa.n_selected"),
])
def test_bad_model_config_names_the_key(bad, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        build_model(bad)


@pytest.mark.parametrize("attention", ["nsa", "full"])
def test_model_is_causal(attention):
    torch.manual_seed(0)
    model = build_model({**TINY, "attention": attention}).double()
    x = torch.randint(0, 100, (1, 40))
    x2 = x.clone()
    x2[:, 25:] = torch.randint(0, 100, (1, 15))
    a, b = model(x), model(x2)
    assert torch.allclose(a[:, :25], b[:, :25], atol=1e-12, rtol=0)
    assert not torch.allclose(a[:, 25:], b[:, 25:])


def test_activation_checkpointing_same_gradients():
    torch.manual_seed(0)
    model = build_model(TINY).double()
    x = torch.randint(0, 100, (2, 30))
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.set_activation_checkpointing(ckpt)
        model(x).logsumexp(-1).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-12, rtol=0)


@pytest.mark.parametrize("attention, prompt", [("nsa", 13), ("nsa", 5), ("full", 13)])
def test_incremental_decode_matches_full_forward(attention, prompt):
    """prompt 13 is not a block multiple; prompt 5 is shorter than a compressed block (l = 8), so
    the compressed stream starts during decode."""
    torch.manual_seed(1)
    model = build_model({**TINY, "attention": attention}).eval()
    seq = torch.randint(0, 100, (2, 70))
    full = model(seq)
    logits, caches = model.prefill(seq[:, :prompt])
    assert (logits - full[:, :prompt]).abs().max() <= 1e-4
    for t in range(prompt, seq.shape[1]):
        step = model.decode_step(seq[:, t], caches)
        assert (step - full[:, t]).abs().max() <= 1e-4, t
    assert caches[0].length == 70


def test_decode_tokens_read_per_step():
    """Per step, NSA reads the compressed tokens so far + n selected blocks of l' + the window.
    For S tokens (incl. the new one) that is (floor((S - l)/d) + 1) + n*l' + w: the paper's
    floor((S - l)/d) + n*l' + w counts one compressed token fewer (block 0)."""
    torch.manual_seed(2)
    model = build_model(TINY).eval()
    nsa = model.cfg.nsa
    seq = torch.randint(0, 100, (1, 80))
    _, caches = model.prefill(seq[:, :40])
    for t in range(40, 80):
        model.decode_step(seq[:, t], caches)
        S = t + 1
        exact = (S - nsa.cmp_block) // nsa.cmp_stride + 1 + nsa.n_selected * nsa.slc_block + nsa.window
        assert caches[0].tokens_read["total"] == exact
        assert exact - ((S - nsa.cmp_block) // nsa.cmp_stride + nsa.n_selected * nsa.slc_block + nsa.window) == 1
    # the dense baseline reads everything
    dense = build_model({**TINY, "attention": "full"}).eval()
    _, dc = dense.prefill(seq[:, :40])
    dense.decode_step(seq[:, 40], dc)
    assert dc[0].tokens_read == 41


@pytest.mark.parametrize("attention, prompt", [("nsa", 13), ("nsa", 3), ("full", 13)])
def test_static_decode_matches_dynamic_decode(attention, prompt, monkeypatch):
    """Decode over the static caches (static_decode.py: fixed buffers, the position a device tensor,
    what a CUDA graph replays; eager here through GraphedStep) gives the dynamic caches' logits and
    reads at every step: compressed tokens emitted during decode (prompt 3 < l), the window ring
    wrapping, selection blocks filling; and no step waits on the device (.item() is never called)."""
    from nsa.attention.static_decode import GraphedStep

    torch.manual_seed(3)
    model = build_model({**TINY, "attention": attention}).eval()
    seq = torch.randint(0, 100, (2, 60))
    _, dynamic = model.prefill(seq[:, :prompt])
    caches, position = model.new_static_caches(batch=2, capacity=60)
    logits, _ = model.prefill(seq[:, :prompt], caches)
    assert position.host == prompt and int(position.t) == prompt and caches[0].length == prompt
    step = GraphedStep(lambda ids: model.decode_step(ids, caches), seq[:, prompt], position)
    # a replayed CUDA graph writes only the tensors it captured: the reads are counted from the cache's
    # own buffers, which the steps write in place (on the GPU a tensor made by the step was garbage)
    buffers = [(b, b.data_ptr()) for c in caches for b in (getattr(c, "last_t", None), getattr(c, "last_sel", None))
               if b is not None]
    assert len(buffers) == (2 * len(caches) if attention == "nsa" else 0)
    item = torch.Tensor.item
    for t in range(prompt, seq.shape[1]):
        want = model.decode_step(seq[:, t], dynamic)
        monkeypatch.setattr(torch.Tensor, "item", lambda self: pytest.fail("a static decode step synchronised"))
        got = step(seq[:, t])
        monkeypatch.setattr(torch.Tensor, "item", item)
        assert (got - want).abs().max() <= 1e-5, t
        assert caches[0].length == dynamic[0].length == t + 1 == int(position.t)
        assert caches[1].tokens_read == dynamic[1].tokens_read, t
    assert all(b.data_ptr() == ptr for b, ptr in buffers)
    with pytest.raises(UserError, match="capacity of 60 tokens"):
        step(seq[:, 0])
    with pytest.raises(UserError, match="capacity of 60 tokens"):  # stepping without GraphedStep: same check
        model.decode_step(seq[:, 0], caches)
    with pytest.raises(UserError, match="capacity"):
        model.prefill(torch.randint(0, 100, (2, 61)), model.new_static_caches(batch=2, capacity=60)[0])
    with pytest.raises(UserError, match="a batch of 3 sequences does not fit static decode caches made for 2"):
        model.prefill(torch.randint(0, 100, (3, 10)), model.new_static_caches(batch=2, capacity=60)[0])


def test_decode_position_knows_when_a_compressed_block_completes():
    """`emitting` (a host bool: which step graph to replay) is true exactly at the positions t where
    a block of l = 8 tokens every d = 4 completes (t + 1 - l >= 0, a multiple of d)."""
    from nsa.attention.static_decode import DecodePosition

    position = DecodePosition("cpu", 40)
    assert not position.emitting  # no NSA cache yet: nothing to compress
    position.compresses(8, 4)
    position.set(3)
    seen = []
    for _ in range(20):
        seen.append((position.host, position.emitting))
        position.advance()
    assert [t for t, e in seen if e] == [7, 11, 15, 19]
    assert int(position.t) == position.host == 23
    with pytest.raises(ValueError, match="cannot share one DecodePosition"):
        position.compresses(16, 8)


@pytest.mark.slow
def test_static_decode_step_compiles_as_one_graph():
    """GraphedStep(compile=True): the static NSA layer step goes through torch.compile as one graph
    (fullgraph: no break, no host sync) and gives the eager step's outputs across compressed-token
    emissions (~25 s on CPU: Inductor's C++ build)."""
    from nsa.attention.layer import NSAttention
    from nsa.attention.rope import RotaryEmbedding
    from nsa.attention.static_decode import DecodePosition, GraphedStep, StaticNSACache

    torch.manual_seed(5)
    cfg = ModelConfig.from_dict(TINY)
    layer, rope = NSAttention(cfg).eval(), RotaryEmbedding(cfg.head_dim)
    x = torch.randn(2, 40, cfg.dim)
    caches = [StaticNSACache(layer, 2, 40, DecodePosition("cpu", 40), "cpu", torch.float32) for _ in range(2)]
    for cache in caches:
        layer(x[:, :11], rope, cache)
    eager = GraphedStep(lambda x_: layer.decode_step(x_, rope, caches[0]), x[:, 11:12], caches[0].position)
    compiled = GraphedStep(lambda x_: layer.decode_step(x_, rope, caches[1]), x[:, 11:12], caches[1].position,
                           compile=True)
    for t in range(11, 24):
        want = eager(x[:, t:t + 1])
        assert (compiled(x[:, t:t + 1]) - want).abs().max() <= 1e-5, t


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("attention", ["nsa", "full"])
def test_static_decode_replays_as_a_cuda_graph(attention):
    """On the GPU the whole model's decode step is captured once (a host sync or a data-dependent shape
    would fail the capture) and its replays, across compressed-token emissions and the window wrap,
    give: in fp32, the dynamic decode's logits (which run the Triton kernels); in bf16 (the Triton
    RoPE and gate-and-combine kernels inside the graph), the same static step run eagerly."""
    from nsa.attention.static_decode import GraphedStep

    cfg = {**TINY, "attention": attention, "dim": 64, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16}
    seq = torch.randint(0, 100, (3, 90), generator=torch.Generator().manual_seed(4)).cuda()
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 1e-2)):
        torch.manual_seed(4)
        model = build_model(cfg).cuda().to(dtype).eval()
        graphed, position = model.new_static_caches(batch=3, capacity=90)
        model.prefill(seq[:, :30], graphed)
        if dtype == torch.float32:
            _, other = model.prefill(seq[:, :30])  # the growing caches
        else:
            other, other_position = model.new_static_caches(batch=3, capacity=90)
            model.prefill(seq[:, :30], other)
        step = GraphedStep(lambda ids: model.decode_step(ids, graphed), seq[:, 30], position)
        assert step.graphs
        for t in range(30, 90):
            want = model.decode_step(seq[:, t], other).float()
            if dtype != torch.float32:
                other_position.advance()
            got = step(seq[:, t]).float()
            assert (got - want).abs().max() <= tol * want.abs().max(), (dtype, t)
            assert graphed[1].tokens_read == other[1].tokens_read, (dtype, t)  # counted from the replay's writes
        assert int(position.t) == 90
        if attention == "nsa":  # one graph for steps that compute a compressed token, one for the others
            assert set(step.graphs) == {False, True}


def test_cache_buffer_slides_like_a_list():
    """The decode caches' buffer (appends at the end, drops at the front without copying) holds
    exactly what a plain list would through growth and in-place compaction, at any drop size."""
    from nsa.attention.cache import _Buffer

    g = torch.Generator().manual_seed(0)
    buf, ref = _Buffer(torch.arange(5.0).view(1, 1, 5, 1)), list(range(5))
    nxt = 5
    for _ in range(300):
        n = int(torch.randint(1, 4, (1,), generator=g))
        buf.append(torch.arange(nxt, nxt + n, dtype=torch.float32).view(1, 1, n, 1))
        ref += list(range(nxt, nxt + n))
        nxt += n
        if len(ref) > 12:  # a sliding window of 12, as the window branch keeps
            drop = len(ref) - 12
            buf.drop_front(drop)
            ref = ref[drop:]
        assert buf.view().flatten().tolist() == [float(x) for x in ref]
    assert buf.data.shape[2] <= 64  # compaction reuses the allocation: no unbounded growth


def test_flops_per_token_counts_sparse_attention():
    with torch.device("meta"):  # M7C dims, paper NSA defaults
        nsa, full = build_model({}), build_model({"attention": "full"})
    # from 4k to 64k NSA's per-token attention grows ~2x (only the compressed part grows),
    # dense attention 16x
    assert nsa.attention_flops_per_token(1 << 16) < nsa.attention_flops_per_token(1 << 12) * 2.5
    assert full.attention_flops_per_token(1 << 16) > full.attention_flops_per_token(1 << 12) * 15
    assert nsa.flops_per_token(64) > 6 * nsa.num_params(exclude_embeddings=True)


def test_static_caches_reserve_the_rope_tables():
    """new_static_caches builds the RoPE tables for its whole capacity (past the 4096 built by default),
    so a step traced by torch.compile reads them rather than building them inside its graph (a side
    effect that made the second call compile again: one more compile, and one a CUDA-graph capture
    could hit). The tables are those forward() looks up: same key, same values as built on demand."""
    model = build_model(TINY).eval()
    model.new_static_caches(batch=1, capacity=5000)
    cos, sin = model.rope._cache[(torch.device("cpu"), torch.float32)]
    assert cos.shape[0] >= 5000
    fresh = RotaryEmbedding(model.rope.head_dim, model.rope.theta).tables(5000, torch.device("cpu"), torch.float32)
    assert torch.equal(cos[:5000], fresh[0][:5000]) and torch.equal(sin[:5000], fresh[1][:5000])
    before = model.rope._cache
    model.rope(torch.randn(1, 2, 1, model.rope.head_dim), torch.tensor([4999]), 5000)
    assert model.rope._cache is before and model.rope._cache[(torch.device("cpu"), torch.float32)][0] is cos


def test_gate_stats_reported_for_nsa_only():
    nsa, full = build_model(TINY), build_model({**TINY, "attention": "full"})
    x = torch.randint(0, 100, (1, 20))
    nsa(x), full(x)
    stats = nsa.gate_stats()
    assert set(stats) == {"gate/cmp", "gate/slc", "gate/win"} and all(0 < v < 1 for v in stats.values())
    assert full.gate_stats() == {}
    assert isinstance(nsa, M7C)


def _loss_and_grads(model, x, y, monkeypatch, path, autocast=False, reduction="mean"):
    monkeypatch.setenv("NSA_LOSS", path)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(x, y, reduction=reduction)
    loss.sum().backward()
    return loss.detach(), {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("attention", ["nsa", "full"])
def test_chunked_loss_matches_logits_then_cross_entropy(attention, monkeypatch):
    """M7C.loss's chunked path (torch's F.linear_cross_entropy over the padded head, padding rows biased
    out) against the logits and F.cross_entropy, fp32: the loss for every reduction and every gradient.
    vocab 100 pads to 128, so the bias matters; 3 x 50 tokens are 2 chunks of CPU_LOSS_CHUNK_ROWS=128."""
    from nsa import model as model_module

    if not model_module.HAS_CHUNKED_LOSS:
        pytest.skip("this torch has no chunked F.linear_cross_entropy")
    torch.manual_seed(0)
    model = build_model({**TINY, "attention": attention})
    x, y = torch.randint(0, 100, (3, 50)), torch.randint(0, 100, (3, 50))
    for reduction in ("mean", "sum", "none"):
        ref, ref_grads = _loss_and_grads(model, x, y, monkeypatch, "full", reduction=reduction)
        got, grads = _loss_and_grads(model, x, y, monkeypatch, "chunked", reduction=reduction)
        assert got.dtype == torch.float32 and got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
    # the padding rows of the tied head/embedding get no gradient from either path
    assert grads["embed.weight"][100:].abs().max() == 0
    # the logits path is unchanged: model(x) without targets
    assert model(x).shape == (3, 50, 100)


def test_chunked_loss_is_exact_in_bf16(monkeypatch):
    """In bf16 torch sums the chunked loss across chunks in bf16 (15% off at 128 chunks); M7C.loss takes
    per-token losses there and sums them in fp32. With 8-row chunks (19 of them) the mean must agree with
    the fp32 loss of the same bf16 logits to within bf16 rounding of single tokens, not of a running sum."""
    from nsa import model as model_module

    if not model_module.HAS_CHUNKED_LOSS:
        pytest.skip("this torch has no chunked F.linear_cross_entropy")
    monkeypatch.setattr(model_module, "CPU_LOSS_CHUNK_ROWS", 8)
    torch.manual_seed(0)
    model = build_model({**TINY, "init_std": 0.5})
    x, y = torch.randint(0, 100, (3, 50)), torch.randint(0, 100, (3, 50))
    ref, ref_grads = _loss_and_grads(model, x, y, monkeypatch, "full", autocast=True)
    for reduction, scale in (("sum", 150), ("mean", 1)):
        got, grads = _loss_and_grads(model, x, y, monkeypatch, "chunked", autocast=True, reduction=reduction)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got / scale, ref, rtol=2e-3, atol=0)
    for name, g in ref_grads.items():  # the mean's: bf16 GEMMs on both sides, differently blocked
        assert (grads[name] - g).norm() <= 0.02 * g.norm(), name


def test_loss_path_setting(monkeypatch):
    from nsa import model as model_module

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(model_module, "HAS_CHUNKED_LOSS", True)
    monkeypatch.delenv("NSA_LOSS", raising=False)
    assert model_module.loss_path(cpu) == "chunked" and model_module.loss_path(cuda) == "full"
    assert model_module.loss_path(cuda, "chunked") == "chunked" and model_module.loss_path(cpu, "full") == "full"
    monkeypatch.setenv("NSA_LOSS", "fused")
    with pytest.raises(UserError, match="NSA_LOSS='fused'"):
        model_module.loss_path(cpu)
    monkeypatch.setattr(model_module, "HAS_CHUNKED_LOSS", False)  # an older torch: the logits path
    assert model_module.loss_path(cpu, "chunked") == "full"


@pytest.mark.parametrize("path", ["chunked", "full"])
def test_loss_traces_under_torch_compile(path, monkeypatch):
    """The trainer compiles model(x, targets) (runtime.compile): Dynamo traces the loss with the model (the
    NSA branches stay eager behind their graph break). Compiled with aot_eager (tracing and autograd, no
    Inductor code generation: seconds, not minutes), the loss and gradients equal the eager ones."""
    from torch._dynamo.backends.registry import lookup_backend

    from nsa import model as model_module
    from nsa.model import compile_model

    if path == "chunked" and not model_module.HAS_CHUNKED_LOSS:
        pytest.skip("this torch has no chunked F.linear_cross_entropy")
    monkeypatch.setenv("NSA_LOSS", path)
    torch.manual_seed(0)
    model = build_model(TINY)
    x, y = torch.randint(0, 100, (2, 40)), torch.randint(0, 100, (2, 40))
    want, want_grads = _loss_and_grads(model, x, y, monkeypatch, path)
    graphs = []  # what Dynamo captured, then aot_eager runs it

    def backend(gm, example_inputs):
        graphs.append(gm.code)
        return lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    compiled = compile_model(model, backend=backend)
    got, grads = _loss_and_grads(compiled, x, y, monkeypatch, path)
    torch._dynamo.reset()
    assert any(("linear_cross_entropy" if path == "chunked" else "cross_entropy") in code for code in graphs)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for name, g in want_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7, msg=name)
