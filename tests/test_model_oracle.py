"""The forward pass against transformers' DeepseekV3ForCausalLM on the same tiny checkpoints, in fp32."""

import pytest
import torch

from hybrid.generation.generate import Stats, generate, new_cache, prefill
from hybrid.run.loader import load_model
from hybrid.generation.sampling import SamplingParams
from oracle import assert_oracle_holds_checkpoint, load_oracle, write_oracle_twin

PROMPT_LEN = 100  # past original_max_position_embeddings (64): YaRN's interpolated frequencies matter


@pytest.fixture(scope="module", params=["k2", "v3"])
def pair(request, tmp_path_factory):
    """(checkpoint folder, our model, the oracle) for K2-style and DeepSeek-V3-style routing."""
    folder = request.getfixturevalue(f"{request.param}_tiny")
    twin = write_oracle_twin(folder, tmp_path_factory.mktemp("oracle") / request.param)
    oracle = load_oracle(twin)
    assert_oracle_holds_checkpoint(oracle, folder)
    return folder, load_model(folder), oracle


def prompt(n=PROMPT_LEN, vocab=512, seed=0):
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def test_prefill_logits_match_oracle(pair):
    folder, model, oracle = pair
    ids = prompt()
    with torch.no_grad():
        want = oracle(ids).logits
    got = model(ids)
    assert got.shape == want.shape == (1, PROMPT_LEN, model.config.vocab_size)
    assert got.dtype == torch.float32
    assert rel_err(got, want) < 1e-4
    assert float(got.std(dim=-1).min()) > 0.1  # logits are not all equal


def test_router_chooses_the_oracles_experts_on_every_layer(pair):
    folder, model, oracle = pair
    ids = prompt(seed=1)
    mine, theirs = {}, {}
    hooks = []
    for i, (a, b) in enumerate(zip(model.model.layers, oracle.model.layers)):
        if not model.config.is_moe_layer(i):
            continue
        hooks.append(a.mlp.gate.register_forward_hook(lambda m, inp, out, i=i: mine.__setitem__(i, out[1])))
        hooks.append(b.mlp.gate.register_forward_hook(lambda m, inp, out, i=i: theirs.__setitem__(i, out[2])))
    with torch.no_grad():
        model(ids), oracle(ids)
    for h in hooks:
        h.remove()
    assert sorted(mine) == sorted(theirs) == list(model.config.moe_layers)
    for i in mine:
        assert torch.equal(mine[i].sort(dim=-1).values, theirs[i].sort(dim=-1).values), f"layer {i}"


def test_decode_through_compressed_cache_matches_full_forward(pair):
    folder, model, _ = pair
    ids = prompt(n=80, seed=2)
    full = model(ids)
    cache = new_cache(model, 80)
    steps = [model(ids[:, :40], cache=cache)]  # a 40-token prefill, then one token at a time
    steps += [model(ids[:, t:t + 1], cache=cache) for t in range(40, 80)]
    assert cache.length == 80
    assert cache.latent.shape[-1] == model.config.kv_lora_rank  # only the latent and the roped key are kept
    assert cache.k_pe.shape[-1] == model.config.qk_rope_head_dim
    assert rel_err(torch.cat(steps, dim=1), full) < 1e-5


def test_chunked_prefill_equals_one_pass(pair):
    folder, model, _ = pair
    ids = prompt(n=90, seed=3)
    one = prefill(model, new_cache(model, 90), ids[0].tolist(), chunk=90)
    chunked = prefill(model, new_cache(model, 90), ids[0].tolist(), chunk=16)
    assert rel_err(chunked, one) < 1e-5


def test_greedy_tokens_match_oracle_for_32_steps(pair):
    folder, model, oracle = pair
    ids = prompt(n=70, seed=4)
    with torch.no_grad():
        # An explicit mask: generate() would otherwise infer one from pad_token_id and mask real tokens.
        want = oracle.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                               eos_token_id=None, pad_token_id=0, max_length=None)[0, 70:].tolist()
    stats = Stats()
    list(generate(model, ids[0].tolist(), SamplingParams(max_new_tokens=32), stats=stats))
    assert stats.tokens == want
    assert len(set(want)) > 1  # the model really moves from token to token


def test_yarn_matters_past_the_original_context(k2_tiny):
    """Without YaRN the same weights give other logits: the test above really exercises the scaling."""
    import dataclasses

    model = load_model(k2_tiny)
    ids = prompt()
    with_yarn = model(ids)
    plain = dataclasses.replace(model.config, rope_scaling=None)
    from hybrid.run.rope import Rope

    model.rope = Rope(plain)
    assert rel_err(model(ids), with_yarn) > 1e-3
