"""Hugging Face models as shipped: built from tiny configs (random init, nothing downloaded),
pruned with no wrapper, oracle-exact, run at another batch and sequence size, and — where the
pruned sizes are a config's — returned as the user's class with a config that round-trips
through ``save_pretrained`` / ``from_pretrained``."""
from __future__ import annotations

import warnings

import pytest
import torch

import structprune as sp
from structprune.oracle import max_rel_diff
from structprune.testing import assert_oracle

transformers = pytest.importorskip("transformers")


def _tiny(name: str):
    T = transformers
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (2, 16))
    dec = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64)
    if name == "bert":
        cfg = T.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=128,
                           max_position_embeddings=64)
        return T.BertForSequenceClassification(cfg), {"input_ids": ids}
    if name == "vit":
        cfg = T.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                          num_attention_heads=4, intermediate_size=128, num_labels=10)
        return T.ViTForImageClassification(cfg), {"pixel_values": torch.randn(2, 3, 32, 32)}
    if name == "gpt2":
        cfg = T.GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                           bos_token_id=0, eos_token_id=0)
        return T.GPT2LMHeadModel(cfg), {"input_ids": ids}
    if name == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(**dec)), {"input_ids": ids}
    if name == "qwen2":
        return T.Qwen2ForCausalLM(T.Qwen2Config(**dec)), {"input_ids": ids}
    if name == "mistral":
        return T.MistralForCausalLM(T.MistralConfig(**dec)), {"input_ids": ids}
    if name == "t5":
        cfg = T.T5Config(vocab_size=100, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                         num_heads=4)
        return T.T5Model(cfg), {"input_ids": ids, "decoder_input_ids": ids[:, :8]}
    raise KeyError(name)


def _second(inputs: dict) -> dict:
    """Another batch and sequence size (images: another batch; ViT takes one image size)."""
    out = {}
    for k, v in inputs.items():
        if v.is_floating_point():
            out[k] = torch.randn(3, *v.shape[1:])
        else:
            out[k] = torch.randint(0, 100, (3, v.shape[1] - 5))
    return out


def _prune(model, inputs, **kw):
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = sp.Pruner(model, inputs, ratio=0.5, **kw)
        pruned = assert_oracle(pruner)
    return pruner, pruned


@pytest.mark.parametrize("name", ["bert", "vit", "gpt2", "llama", "qwen2", "mistral", "t5"])
def test_prunes_as_shipped(name):
    model, inputs = _tiny(name)
    before = [t.clone() for t in model.state_dict().values()]
    pruner, pruned = _prune(model, inputs)
    # the input model is untouched
    assert all(torch.equal(a, b) for a, b in zip(before, model.state_dict().values()))
    rep = sp.report(model, pruned, inputs)
    assert rep.macs_after <= 0.7 * rep.macs_before, (rep.macs_before, rep.macs_after)
    out = pruned(**inputs)
    assert type(out) is type(model(**inputs))  # the ModelOutput is rebuilt
    # another batch and sequence / image size
    second = _second(inputs)
    with torch.no_grad():
        got = pruned(**second)
    want_shape = model(**second)[0].shape
    assert got[0].shape[0] == 3 and got[0].shape[2:] == want_shape[2:]


def _keep(model):
    """What a config cannot express: the hidden width (its first embedding or patch conv) and
    the rotary frequencies (a head size the config would derive other frequencies for)."""
    keep = [m for m in model.modules() if isinstance(m, (torch.nn.Embedding, torch.nn.Conv2d))]
    rotary = [m for n, m in model.named_modules() if n.endswith("rotary_emb")]
    return keep[:1] + rotary


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "vit", "t5"])
def test_own_class_and_config_round_trip(name, tmp_path):
    model, inputs = _tiny(name)
    pruner, pruned = _prune(model, inputs, ignore=_keep(model))
    assert pruner.applied.own_class, pruner.applied.reason
    assert type(pruned) is type(model)
    assert pruned.config is not model.config
    heads = lambda c: getattr(c, "num_attention_heads", None) or c.n_head  # noqa: E731
    assert heads(pruned.config) < heads(model.config)
    if hasattr(model.config, "num_key_value_heads"):
        # GQA: every KV head keeps the same number of query heads
        assert pruned.config.num_attention_heads % pruned.config.num_key_value_heads == 0
    pruned.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        for x in (inputs, _second(inputs)):
            assert max_rel_diff(again(**x)[0], pruned(**x)[0]) <= 1e-6


def test_pruned_llama_generates():
    model, inputs = _tiny("llama")
    _, pruned = _prune(model, inputs, ignore=_keep(model))
    out = pruned.generate(inputs["input_ids"][:1, :5], max_new_tokens=4, do_sample=False,
                          pad_token_id=0)
    assert out.shape == (1, 9)


def test_rmsnorm_hidden_width_is_exact_as_a_graph():
    """Pruning Llama's hidden width (RMSNorm written out as a mean) is exact; the class's own
    forward would average over the kept width only, so the graph is returned, saying why."""
    model, inputs = _tiny("llama")
    model.eval()
    pruner = sp.Pruner(model, inputs, ratio=0.5)
    with pytest.warns(sp.StructpruneWarning, match="returns None where LlamaForCausalLM "
                                                   "returns a DynamicCache"):
        pruned = assert_oracle(pruner)
    assert pruned(**inputs).past_key_values is None
    assert pruned.get_parameter("model.norm.weight").shape[0] < 64
    assert not pruner.applied.own_class
    assert "config" in pruner.applied.reason or "different values" in pruner.applied.reason


def test_gpt2_heads_are_not_a_config():
    """GPT-2 derives the head size from n_embd / n_head: fewer heads at the same width is no
    GPT2Config, so the pruned graph comes back, saying so."""
    model, inputs = _tiny("gpt2")
    pruner, pruned = _prune(model, inputs, ignore=_keep(model))
    assert pruned.get_parameter("transformer.h.0.attn.c_attn.weight").shape == (64, 96)
    assert not pruner.applied.own_class
    assert "GPT2Config" in pruner.applied.reason


def test_pruned_graph_saves_loads_and_exports(tmp_path):
    """BERT's pruned heads are no BertConfig (its head size is hidden / heads): the graph comes
    back, rebuilds the SequenceClassifierOutput, saves, loads and exports to ONNX."""
    pytest.importorskip("onnxruntime")
    model, inputs = _tiny("bert")
    _, pruned = _prune(model, inputs)
    assert isinstance(pruned, torch.fx.GraphModule)
    sp.save(pruned, str(tmp_path / "m.sp"))
    again = sp.load(str(tmp_path / "m.sp"))
    out = again(**inputs)
    assert type(out).__name__ == "SequenceClassifierOutput"
    assert torch.equal(out.logits, pruned(**inputs).logits)
    sp.export_onnx(pruned, inputs, str(tmp_path / "m.onnx"), check=True)  # keyword inputs
    # keyword inputs that are not forward's leading ones are called by name; this graph was
    # captured without an attention mask, and its guard says so
    with pytest.raises(AssertionError, match="attention_mask"):
        sp.export_onnx(pruned, {"attention_mask": torch.ones(2, 16, dtype=torch.long)},
                       str(tmp_path / "n.onnx"))


def test_the_readme_example_runs(tmp_path, monkeypatch):
    import os
    import re

    readme = open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md")).read()
    part = readme[readme.index("**Hugging Face models as shipped**"):]
    code = re.search(r"```python\n(.*?)```", part, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope = {"torch": torch, "sp": sp}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, "README.md", "exec"), scope)
    small = scope["small"]
    assert type(small).__name__ == "LlamaForCausalLM"
    assert (small.config.num_attention_heads, small.config.num_key_value_heads) == (2, 1)


def test_float64_graph_and_own_class_with_a_cache_export_to_onnx(tmp_path):
    """A graph captured in float64 casts to float64 inside; the float32 file casts to float32.
    An own-class result returns a cache object, which ONNX has no form for: it is exported
    as a graph capture without it."""
    pytest.importorskip("onnxruntime")
    model, inputs = _tiny("llama")
    _, graph = _prune(model.double(), inputs)
    assert isinstance(graph, torch.fx.GraphModule)
    sp.export_onnx(graph, inputs, str(tmp_path / "g.onnx"), check=True)
    model, inputs = _tiny("llama")
    _, own = _prune(model, inputs, ignore=_keep(model))
    assert type(own).__name__ == "LlamaForCausalLM"
    sp.export_onnx(own, inputs, str(tmp_path / "o.onnx"), check=True)
