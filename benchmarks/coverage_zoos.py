"""Coverage of structprune beyond the torchvision classifiers, with Torch-Pruning side by side.

Zoos (``--zoo``):

* ``tv-detection``, ``tv-segmentation``, ``tv-video``, ``tv-flow``: every model of
  ``torchvision.models.list_models(module=torchvision.models.<detection|segmentation|video|
  optical_flow>)``, ``weights=None, weights_backbone=None``, small inputs (detectors: a list of
  two images, score threshold 0 so that boxes come out of a random-init model);
* ``timm``: one model per family (module of ``timm.list_modules()``): the one with the fewest
  parameters, counted on the meta device, among the family's first 60 names (the choice is
  cached in ``results/coverage_timm_selection.json``), ``pretrained=False``, ``num_classes=10``,
  ``img_size`` 64 where the constructor takes it (else 64, 96, 128 or the model's default size:
  the first the model runs on);
* ``hf``: Hugging Face transformers built from tiny configs (2 layers, hidden 64, 4 heads, 2 KV
  heads, vocabulary 100), random init, called with no wrapper (``(input_ids,)``, or a dict of
  keyword inputs for encoder-decoders);
* ``plain``: small pure-torch models (what the test suite runs without torchvision or timm).

For each model (its own subprocess, one thread, a timeout): prune 50% of every group by L2
magnitude, ignoring the classifier / LM head, with :class:`structprune.Pruner`, then record

* MACs before/after (``structprune.plan.count_macs``) and an independent count of the
  ``nn.Conv*``/``nn.Linear`` MACs with forward hooks (``hook-%``);
* the oracle: the pruned output equals the captured graph run with the dropped activations
  zeroed (float64, random norm statistics and random values for constant parameters);
* the second size: batch 2 -> 3 and another image / sequence size (new images for detectors;
  the batch alone when the original model does not run at another size): does the pruned model
  run, with the original's output shapes, and does it still equal the masked original there;
* ONNX parity (``structprune.export_onnx(..., check=True)``);
* what is frozen (top reasons), how the model was captured (fx / export) and what came back
  (own class / GraphModule), the error (class, first line, where) and the time per stage;
* Torch-Pruning (``tp.pruner.MetaPruner``, ``MagnitudeImportance(p=2)``, ratio 0.5, the same
  ignored layers) on a copy of the same model in the same process: did it run, MACs removed (its
  own counter and the hook counter), does the pruned model run with the original's output
  shapes, and at the second size. Its exactness cannot be checked with our oracle.

Results: ``benchmarks/results/coverage_<zoo>.json`` and ``.md``. Run through
``benchmarks/coverage.py --zoo <zoo>`` or directly::

    python benchmarks/coverage_zoos.py --zoo timm --timeout 120
    python benchmarks/coverage_zoos.py --zoo hf --models LlamaForCausalLM,T5Model
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
ZOOS = ("tv-detection", "tv-segmentation", "tv-video", "tv-flow", "timm", "hf")
ALL_ZOOS = ZOOS + ("plain",)
GOAL_MACS_PCT = 30.0
HF_REQUIRED = ("BertForSequenceClassification", "ViTForImageClassification", "GPT2LMHeadModel",
               "LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM", "T5Model")


@dataclass
class Case:
    """One model to prune: the model, its example inputs (a tuple of positional inputs or a dict
    of keyword inputs), candidate inputs of a second size (the first the original runs on is
    used), the modules to ignore (classifier / LM head) and free-form notes."""

    name: str
    model: Any
    inputs: Any
    second: list = field(default_factory=list)
    ignore: list = field(default_factory=list)
    note: str = ""


# ------------------------------------------------------------------------------------------------
# helpers shared by every zoo
# ------------------------------------------------------------------------------------------------
def implied(reason: str) -> bool:
    """Frozen entries every pruning of a classifier has: the ignored head and the output."""
    return reason == "ignored by the user" or "model output keeps its shape" in reason


def last_layer(model: Any) -> Optional[Any]:
    """The last ``nn.Linear`` (else the last ``nn.Conv2d``) in module order: the classifier."""
    import torch.nn as nn

    last_lin = last_conv = None
    for _, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last_lin = m
        elif isinstance(m, nn.modules.conv._ConvNd):
            last_conv = m
    return last_lin or last_conv


def map_tensors(x: Any, fn: Callable) -> Any:
    """Apply ``fn`` to every tensor in nested lists / tuples / dicts."""
    import torch

    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, dict):
        return type(x)((k, map_tensors(v, fn)) for k, v in x.items()) \
            if not hasattr(x, "to_tuple") else {k: map_tensors(v, fn) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(map_tensors(v, fn) for v in x) if not hasattr(x, "_fields") else x
    return x


def call(model: Any, inputs: Any) -> Any:
    """``model(*inputs)`` or ``model(**inputs)``, without gradients."""
    import torch

    with torch.no_grad():
        return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


def out_shapes(out: Any) -> list:
    """Shapes of every tensor of an output, in a fixed order (``flatten_outputs``)."""
    from structprune.oracle import flatten_outputs

    return [list(t.shape) for t in flatten_outputs(out)]


def in_shapes(inputs: Any) -> Any:
    """The shapes of example inputs (nested lists for detectors' image lists), for the row."""
    import torch

    def one(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return list(v.shape)
        if isinstance(v, (list, tuple)):
            return [one(u) for u in v]
        return None if v is None else type(v).__name__
    if isinstance(inputs, dict):
        return {k: one(v) for k, v in inputs.items()}
    return [one(v) for v in inputs]


def hook_macs(model: Any, inputs: Any) -> int:
    """MACs of the ``nn.Conv*``/``nn.Linear`` modules, measured with forward hooks."""
    import torch
    import torch.nn as nn

    total = [0]

    def hook(m: Any, inp: Any, out: Any) -> None:
        if not isinstance(out, torch.Tensor):
            return
        if isinstance(m, nn.modules.conv._ConvNd):
            total[0] += out.numel() * math.prod(m.weight.shape[1:])
        elif isinstance(m, nn.Linear):
            total[0] += out.numel() * m.in_features

    hs = [m.register_forward_hook(hook) for m in model.modules()
          if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    try:
        call(model, inputs)
    finally:
        for h in hs:
            h.remove()
    return total[0]


def onnx_check(rec: dict[str, Any], pruned: Any, inputs: Any) -> None:
    """``rec["onnx"]``: ``export_onnx(..., check=True)`` passes, or fails with the error."""
    import structprune as sp

    try:
        with tempfile.TemporaryDirectory() as d:
            sp.export_onnx(pruned, inputs, os.path.join(d, "m.onnx"), check=True)
        rec["onnx"] = "pass"
    except Exception as e:
        rec["onnx"] = "fail"
        rec["onnx_error"] = tb_info(e)


def tb_info(exc: BaseException) -> dict[str, Any]:
    """Error class, first line, where (last structprune frame; last frame outside torch and
    structprune: the model's code) and the traceback tail."""
    frames = traceback.extract_tb(exc.__traceback__)

    def rel(f: Any) -> str:
        p = f.filename
        for marker in ("site-packages/", ROOT + "/"):
            if marker in p:
                p = p.split(marker, 1)[1]
        return f"{p}:{f.lineno} in {f.name}"
    sp_frames = [f for f in frames if "/structprune/" in f.filename]
    user = [f for f in frames if "/structprune/" not in f.filename and "benchmarks" not in f.filename
            and "site-packages/torch/" not in f.filename]
    msg = str(exc)
    tail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return {"type": type(exc).__name__, "first_line": (msg.strip().splitlines() or [""])[0][:300],
            "message": msg[:2000], "where": rel(sp_frames[-1]) if sp_frames else None,
            "where_model": rel(user[-1]) if user else None,
            "traceback_tail": tail.splitlines()[-20:]}


def randomize_constants(model: Any, seed: int = 1) -> list[str]:
    """Give every constant-initialised parameter (zero biases, zero heads, layer scales, norm
    weights of ones) random values so that the oracle cannot pass vacuously; returns their names."""
    import torch

    g = torch.Generator().manual_seed(seed)
    names = []
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.numel() > 1 and bool((p == p.flatten()[0]).all()):
                c = float(p.flatten()[0])
                base = 1.0 if (p.dim() == 1 and c != 0.0) else 0.0  # scales stay around 1
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1 + base)
                names.append(pname)
    return names


def module_paths(model: Any, modules: list) -> list[str]:
    """The dotted paths of ``modules`` inside ``model``."""
    ids = {id(m) for m in modules}
    return [n for n, m in model.named_modules() if id(m) in ids]


# ------------------------------------------------------------------------------------------------
# zoos: names and cases
# ------------------------------------------------------------------------------------------------
def _img(b: int, c: int, h: int, w: int, seed: int) -> Any:
    import torch

    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed))


# plain: pure torch, always available ------------------------------------------------------------
def _plain_cnn() -> Any:
    import torch.nn as nn

    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 64), nn.ReLU(),
                         nn.Linear(64, 5))


def _plain_mha() -> Any:
    import torch.nn as nn

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(50, 32)
            self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
            self.norm = nn.LayerNorm(32)
            self.ff = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
            self.head = nn.Linear(32, 3)

        def forward(self, ids: Any) -> Any:
            x = self.emb(ids)
            x = self.norm(x + self.attn(x, x, x, need_weights=False)[0])
            x = x + self.ff(x)
            return self.head(x.mean(1))

    return Encoder()


PLAIN = {"plain_cnn": _plain_cnn, "plain_mha": _plain_mha}


def _plain_case(name: str) -> Case:
    import torch

    model = PLAIN[name]()
    if name == "plain_mha":
        ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
        ids2 = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(1))
        return Case(name, model, (ids,), [(ids2,)], [model.head])
    return Case(name, model, (_img(2, 3, 16, 16, 0),), [(_img(3, 3, 24, 24, 1),)], [model[-1]])


# torchvision ------------------------------------------------------------------------------------
TV_MODULES = {"tv-detection": "detection", "tv-segmentation": "segmentation",
              "tv-video": "video", "tv-flow": "optical_flow"}


def _tv_names(zoo: str) -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=getattr(torchvision.models, TV_MODULES[zoo]))


def _det_kwargs(name: str) -> dict[str, Any]:
    if "rcnn" in name:
        return {"min_size": 128, "max_size": 160, "box_score_thresh": 0.0,
                "box_detections_per_img": 10, "rpn_pre_nms_top_n_test": 100,
                "rpn_post_nms_top_n_test": 50}
    if name.startswith(("retinanet", "fcos")):
        return {"min_size": 128, "max_size": 160, "score_thresh": 0.0, "detections_per_img": 10,
                "topk_candidates": 50}
    return {"score_thresh": 0.0, "detections_per_img": 10, "topk_candidates": 50}  # ssd*


def _tv_candidates(zoo: str, name: str) -> list[tuple[dict, Any, list]]:
    """(constructor kwargs, example inputs, second-size candidates), tried in order."""
    import torch

    if zoo == "tv-detection":
        imgs = [_img(1, 3, 96, 128, 0)[0], _img(1, 3, 112, 96, 1)[0]]
        imgs2 = [_img(1, 3, 128, 96, 2)[0], _img(1, 3, 80, 112, 3)[0], _img(1, 3, 96, 96, 4)[0]]
        return [(_det_kwargs(name), (imgs,), [(imgs2,)])]
    if zoo == "tv-segmentation":
        return [({}, (_img(2, 3, 64, 64, 0),), [(_img(3, 3, 96, 96, 1),), (_img(3, 3, 64, 64, 1),)])]
    if zoo == "tv-flow":
        # RAFT's correlation pyramid needs feature maps (1/8 of the image) of at least 16
        a, b = _img(2, 3, 128, 128, 0), _img(2, 3, 128, 128, 1)
        a2, b2 = _img(3, 3, 160, 144, 2), _img(3, 3, 160, 144, 3)
        return [({}, (a, b), [(a2, b2), (a2[:, :, :128, :128], b2[:, :, :128, :128])])]
    # video: (B, 3, T, H, W)

    def vid(b: int, t: int, s: int, seed: int) -> Any:
        return torch.randn(b, 3, t, s, s, generator=torch.Generator().manual_seed(seed))
    out = []
    if name.startswith("mvit"):  # the builders fix spatial_size (224) and temporal_size (16)
        return [({}, (vid(2, 16, 224, 0),), [(vid(3, 16, 224, 1),)])]
    for t, s in ((4, 32), (8, 64), (16, 112), (16, 224)):
        out.append(({}, (vid(2, t, s, 0),), [(vid(3, t + 4, s + 16, 1),), (vid(3, t, s, 1),)]))
    return out


def _tv_case(zoo: str, name: str) -> Case:
    import torchvision

    errors = []
    for kwargs, inputs, second in _tv_candidates(zoo, name):
        try:
            extra = {"weights_backbone": None} if zoo in ("tv-detection", "tv-segmentation") \
                else {}
            model = torchvision.models.get_model(name, weights=None, **extra, **kwargs).eval()
            call(model, inputs)
        except Exception as e:  # try the next size
            errors.append(f"{kwargs} {in_shapes(inputs)}: {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200] if str(e) else ''}")
            continue
        note = f"kwargs {kwargs}" if kwargs else ""
        return Case(name, model, inputs, second, [last_layer(model)], note)
    raise RuntimeError("the original model ran on none of the inputs tried: " + " | ".join(errors))


# timm -------------------------------------------------------------------------------------------
TIMM_SELECTION = os.path.join(RESULTS, "coverage_timm_selection.json")


def timm_selection(refresh: bool = False) -> dict[str, Optional[str]]:
    """``{family: model}``: per ``timm.list_modules()`` module, the model with the fewest
    parameters (counted on the meta device) among the module's first 60 names. Cached in
    ``results/coverage_timm_selection.json`` (keyed by the timm version)."""
    import timm
    import torch

    if not refresh and os.path.exists(TIMM_SELECTION):
        with open(TIMM_SELECTION) as f:
            data = json.load(f)
        if data.get("timm") == timm.__version__:
            return data["selection"]
    sel: dict[str, Optional[str]] = {}
    params: dict[str, int] = {}
    for mod in sorted(timm.list_modules()):
        best = None
        for n in timm.list_models(module=mod)[:60]:
            try:
                with torch.device("meta"):
                    m = timm.create_model(n, pretrained=False, num_classes=10)
                p = sum(x.numel() for x in m.parameters())
            except Exception:
                continue
            if best is None or p < best[1]:
                best = (n, p)
        sel[mod] = best[0] if best else None
        if best:
            params[best[0]] = best[1]
    os.makedirs(RESULTS, exist_ok=True)
    with open(TIMM_SELECTION, "w") as f:
        json.dump({"timm": timm.__version__, "rule": "fewest parameters on the meta device among "
                   "the first 60 names of each timm.list_modules() module", "selection": sel,
                   "params": params}, f, indent=1)
    return sel


def _timm_case(name: str) -> Case:
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    default = (cfg.input_size if cfg is not None and cfg.input_size else (3, 224, 224))
    tries: list[tuple[dict, int]] = [({"img_size": 64}, 64), ({}, 64), ({"img_size": 96}, 96),
                                     ({}, 96), ({"img_size": 128}, 128), ({}, 128),
                                     ({}, int(default[-1]))]
    errors = []
    for kw, side in tries:
        x = _img(2, int(default[0]), side, side, 0)
        try:
            model = timm.create_model(name, pretrained=False, num_classes=10, **kw).eval()
            call(model, (x,))
        except Exception as e:
            errors.append(f"{kw} {side}: {type(e).__name__}: "
                          f"{(str(e).splitlines() or [''])[0][:160]}")
            continue
        c = int(default[0])
        second = [(_img(3, c, side + 32, side + 32, 1),), (_img(3, c, side, side, 1),)]
        head = model.get_classifier() if hasattr(model, "get_classifier") else None
        heads = [h for h in (head if isinstance(head, (tuple, list)) else [head])
                 if h is not None and any(True for _ in h.parameters())]
        return Case(name, model, (x,), second, heads or [last_layer(model)],
                    f"kwargs {kw}, {side}px" if kw else f"{side}px")
    raise RuntimeError("the original model ran on none of the inputs tried: " + " | ".join(errors))


# Hugging Face -----------------------------------------------------------------------------------
def _hf_specs() -> dict[str, tuple[str, str, dict]]:
    """name -> (config class, kind, config kwargs). Tiny: 2 layers, hidden 64, 4 heads, 2 KV
    heads, vocabulary 100."""
    dec = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    enc = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=128, max_position_embeddings=64, num_labels=3)
    img = dict(image_size=32, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=2,
               num_attention_heads=4, intermediate_size=128, num_labels=3)
    return {
        "BertForSequenceClassification": ("BertConfig", "text", enc),
        "ViTForImageClassification": ("ViTConfig", "image", img),
        "GPT2LMHeadModel": ("GPT2Config", "text", dict(vocab_size=100, n_embd=64, n_layer=2,
                                                       n_head=4, n_positions=64)),
        "LlamaForCausalLM": ("LlamaConfig", "text", dec),
        "Qwen2ForCausalLM": ("Qwen2Config", "text", dec),
        "MistralForCausalLM": ("MistralConfig", "text", dec),
        "T5Model": ("T5Config", "seq2seq", dict(vocab_size=100, d_model=64, d_kv=16, d_ff=128,
                                                num_layers=2, num_heads=4,
                                                decoder_start_token_id=0)),
        "DistilBertForSequenceClassification": ("DistilBertConfig", "text", dict(
            vocab_size=100, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
            max_position_embeddings=64, num_labels=3)),
        "RobertaForSequenceClassification": ("RobertaConfig", "text", {
            **enc, "max_position_embeddings": 80}),
        "AlbertForSequenceClassification": ("AlbertConfig", "text", {**enc, "embedding_size": 32}),
        "ElectraForSequenceClassification": ("ElectraConfig", "text", {**enc,
                                                                        "embedding_size": 32}),
        "DeiTForImageClassification": ("DeiTConfig", "image", img),
        "SwinForImageClassification": ("SwinConfig", "image", dict(
            image_size=32, patch_size=4, num_channels=3, embed_dim=16, depths=[1, 1],
            num_heads=[2, 4], window_size=4, num_labels=3)),
        "ConvNextForImageClassification": ("ConvNextConfig", "image", dict(
            num_channels=3, num_stages=2, hidden_sizes=[16, 32], depths=[1, 1],
            num_labels=3)),
        "ResNetForImageClassification": ("ResNetConfig", "image", dict(
            num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
            layer_type="bottleneck", num_labels=3)),
        "WhisperModel": ("WhisperConfig", "speech", dict(
            vocab_size=100, num_mel_bins=16, encoder_layers=2, decoder_layers=2,
            encoder_attention_heads=4, decoder_attention_heads=4, d_model=64,
            encoder_ffn_dim=128, decoder_ffn_dim=128, max_source_positions=16,
            max_target_positions=32, pad_token_id=1, bos_token_id=2, eos_token_id=2,
            decoder_start_token_id=2, suppress_tokens=[], begin_suppress_tokens=[])),
        "OPTForCausalLM": ("OPTConfig", "text", dict(
            vocab_size=100, hidden_size=64, num_hidden_layers=2, ffn_dim=128,
            num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=64)),
        "PhiForCausalLM": ("PhiConfig", "text", dec),
        "GemmaForCausalLM": ("GemmaConfig", "text", {**dec, "head_dim": 16}),
        "FalconForCausalLM": ("FalconConfig", "text", dict(
            vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_kv_heads=2, new_decoder_architecture=True)),
        "BartModel": ("BartConfig", "seq2seq", dict(
            vocab_size=100, d_model=64, encoder_layers=2, decoder_layers=2,
            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
            decoder_ffn_dim=128, max_position_embeddings=64)),
        "Qwen3ForCausalLM": ("Qwen3Config", "text", {**dec, "head_dim": 16}),
        "MobileBertForSequenceClassification": ("MobileBertConfig", "text", {
            **enc, "embedding_size": 32, "intra_bottleneck_size": 32, "true_hidden_size": 32,
            "num_feedforward_networks": 2}),
    }


def _hf_names() -> list[str]:
    return list(_hf_specs())


def _hf_case(name: str) -> Case:
    import torch
    import transformers

    cfg_cls, kind, kw = _hf_specs()[name]
    config = getattr(transformers, cfg_cls)(**kw)
    model = getattr(transformers, name)(config).eval()

    def ids(b: int, n: int, seed: int) -> Any:
        return torch.randint(3, 100, (b, n), generator=torch.Generator().manual_seed(seed))
    if kind == "text":
        inputs, second = (ids(2, 8, 0),), [(ids(3, 12, 1),), (ids(3, 8, 1),)]
    elif kind == "image":
        inputs = (_img(2, 3, 32, 32, 0),)
        second = [(_img(3, 3, 48, 48, 1),), (_img(3, 3, 32, 32, 1),)]
    elif kind == "seq2seq":
        inputs = {"input_ids": ids(2, 8, 0), "decoder_input_ids": ids(2, 5, 1)}
        second = [{"input_ids": ids(3, 12, 2), "decoder_input_ids": ids(3, 7, 3)},
                  {"input_ids": ids(3, 8, 2), "decoder_input_ids": ids(3, 5, 3)}]
    else:  # speech: Whisper's encoder takes exactly 2 * max_source_positions frames
        feats = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(0))
        feats2 = torch.randn(3, 16, 32, generator=torch.Generator().manual_seed(1))
        inputs = {"input_features": feats, "decoder_input_ids": ids(2, 5, 1)}
        second = [{"input_features": feats2, "decoder_input_ids": ids(3, 7, 3)}]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        head = getattr(model, "classifier", None)
    ignore = [head] if head is not None else []
    call(model, inputs)  # the original runs
    return Case(name, model, inputs, second, ignore, f"{kind}, config {cfg_cls}")


# dispatch ---------------------------------------------------------------------------------------
def list_names(zoo: str) -> list[str]:
    """The model names of a zoo (for ``timm``: one per family, see :func:`timm_selection`)."""
    if zoo == "plain":
        return list(PLAIN)
    if zoo in TV_MODULES:
        return _tv_names(zoo)
    if zoo == "timm":
        return [m for m in timm_selection().values() if m]
    if zoo == "hf":
        return _hf_names()
    raise ValueError(f"unknown zoo {zoo!r}; one of {', '.join(ALL_ZOOS)}")


def build_case(zoo: str, name: str) -> Case:
    """The :class:`Case` of one model of a zoo (random init, eval mode, float32)."""
    if zoo == "plain":
        return _plain_case(name)
    if zoo in TV_MODULES:
        return _tv_case(zoo, name)
    if zoo == "timm":
        return _timm_case(name)
    if zoo == "hf":
        return _hf_case(name)
    raise ValueError(f"unknown zoo {zoo!r}")


# ------------------------------------------------------------------------------------------------
# one model
# ------------------------------------------------------------------------------------------------
class _InParts(Exception):
    """The model was pruned in parts; :func:`_in_parts` filled the row."""


def parts_outputs(model: Any, paths: list[str], inputs: Any) -> tuple[Any, dict[str, list]]:
    """One forward of ``model``: its output and, per submodule path, the outputs of its calls."""
    import torch

    seen: dict[str, list] = {p: [] for p in paths}
    hooks = [model.get_submodule(p).register_forward_hook(
        lambda m, a, o, p=p: seen[p].append(o)) for p in paths]
    try:
        with torch.no_grad():
            return call(model, inputs), seen
    finally:
        for h in hooks:
            h.remove()


def parts_masked_output(model: Any, info: Any, inputs: Any, seen: Optional[dict] = None) -> Any:
    """The whole model's masked original when it was pruned in parts: the original model run
    with each pruned part's output replaced by that part's captured graph run with the part's
    dropped activations zeroed (on the inputs the part receives in this very forward). With
    ``seen`` (a dict), the masked outputs of each part's calls are appended there by path."""
    import torch
    from torch.utils import _pytree as pytree

    from structprune.graph.shapes import placeholder_values
    from structprune.oracle import MaskedInterpreter

    hooks = []

    def make(plan: Any, path: str) -> Callable:
        gm = plan.graph.graph_module
        masks = plan.activation_masks_all()

        def hook(mod: Any, args: tuple, kwargs: dict, out: Any) -> Any:
            got = MaskedInterpreter(gm, masks).run(*placeholder_values(gm, args, kwargs))
            leaves, spec = pytree.tree_flatten(out)
            new = pytree.tree_leaves(got)
            if len(new) != len(leaves):
                raise RuntimeError(f"a part's masked graph returns {len(new)} tensors, the part "
                                   f"{len(leaves)}")
            res = pytree.tree_unflatten(new, spec)
            if seen is not None:
                seen.setdefault(path, []).append(res)
            return res
        return hook
    try:
        for p in info.parts:
            if p.pruned and p.plans:
                hooks.append(model.get_submodule(p.path).register_forward_hook(
                    make(p.plans[-1], p.path), with_kwargs=True))
        with torch.no_grad():
            return call(model, inputs)
    finally:
        for h in hooks:
            h.remove()


def _in_parts(rec: dict, pruner: Any, model: Any, inputs: Any, second: Any, tol: float,
              whole: BaseException, stage: Callable, done: Callable) -> None:
    """Fill the row of a model that does not capture whole: ``Pruner.run`` prunes it in parts;
    the oracle is the whole model with each part's masked graph in place of the part."""
    from structprune.oracle import max_rel_diff
    from structprune.partial import parts_macs

    stage("parts")
    pruned = pruner.run()
    info = pruner.parts
    if info is None:
        raise whole
    rec["capture"] = "parts"
    rec["parts"] = {"whole_error": info.whole_error,
                    "parts": [{"path": p.path, "cls": p.cls, "capture": p.capture,
                               "calls": p.calls, "params_before": p.params_before,
                               "params_after": p.params_after, "oracle_diff": p.oracle_diff}
                              for p in info.parts],
                    "kept": [list(k) for k in info.kept[:40]]}
    kept = [k for k in info.kept if "ignored" not in k[2]]
    rec["frozen"] = {"count": len(info.kept), "count_excluding_ignored": len(kept),
                     "top_reasons": Counter(k[2] for k in kept).most_common(3),
                     "first": f"{kept[0][0]} ({kept[0][1]}): {kept[0][2]}" if kept else None}
    done("parts")
    if not any(p.pruned for p in info.parts):
        raise _NothingPruned
    stage("plan")
    before, after = parts_macs(model, pruned, inputs)
    rec.update(macs_before=before, macs_after=after,
               mac_reduction_pct=round(100.0 * (1 - after / before), 2) if before else None)
    record_returned(rec, pruner, pruned, model)
    done("plan")
    stage("oracle")
    # Each pruned part's outputs in one whole forward of the pruned model against the masked
    # part graphs in one whole forward of the original (the oracle); the final outputs are
    # compared too, but only recorded: post-processing such as NMS is discontinuous, so float
    # rounding in the parts can reorder tied detections.
    paths = [p.path for p in info.parts if p.pruned]
    got, got_parts = parts_outputs(pruned, paths, inputs)
    want_parts: dict[str, list] = {}
    rec["final_output_diff"] = max_rel_diff(got, parts_masked_output(model, info, inputs,
                                                                     want_parts))
    diff = max((max_rel_diff(got_parts[p], want_parts.get(p, [])) for p in paths), default=0.0)
    rec.update(oracle_max_diff=diff, oracle_equal=bool(diff <= tol),
               pruned_out_shapes_equal=out_shapes(got) == rec["out_shapes"])
    rec["status"] = "oracle-equal" if rec["oracle_equal"] else "oracle-mismatch"
    done("oracle")
    stage("second")
    sec = rec["second"]
    if second is None:
        sec["runs"] = None
    elif run_second(sec, pruned, second) is not None:
        try:
            got2, got2_parts = parts_outputs(pruned, paths, second)
            want2: dict[str, list] = {}
            sec["final_output_diff"] = max_rel_diff(got2, parts_masked_output(
                model, info, second, want2))
            sec["oracle_max_diff"] = max((max_rel_diff(got2_parts[p], want2.get(p, []))
                                          for p in paths), default=0.0)
            sec["oracle_equal"] = bool(sec["oracle_max_diff"] <= tol)
        except Exception as e:
            sec["oracle_error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
    done("second")
    stage("onnx")
    onnx_check(rec, pruned, inputs)
    done("onnx")
    rec["stage"] = None


class _NothingPruned(Exception):
    """The plan drops nothing: the row is frozen (with the reasons the graph gives)."""


def _write(rec: dict, path: Optional[str]) -> None:
    if path:
        with open(path + ".tmp", "w") as f:
            json.dump(rec, f, default=str)
        os.replace(path + ".tmp", path)


def record_returned(rec: dict, pruner: Any, pruned: Any, model: Any) -> None:
    """What sp.prune handed back: its parameter count, its type and why that type."""
    import torch

    rec["params_after"] = sum(p.numel() for p in pruned.parameters())
    rec["returned"] = {"type": type(pruned).__name__,
                       "graph_module": isinstance(pruned, torch.fx.GraphModule),
                       "own_class": type(pruned) is type(model),
                       "reason": getattr(getattr(pruner, "applied", None), "reason", None)}


def refused_by_guard(error: dict) -> bool:
    """Whether the pruned model refused an input with structprune's own call-time check of a
    size the export capture fixed (the message names the input and the size or condition)."""
    return error.get("type") == "AssertionError" and "captured by torch.export" in str(
        error.get("first_line"))


def run_second(sec: dict, pruned: Any, inputs: Any) -> Any:
    """Run ``pruned`` on ``inputs`` of another size; ``sec`` gets runs / shapes_equal / error.
    Returns the output, or None when it raised."""
    try:
        got = call(pruned, inputs)
    except Exception as e:
        sec["runs"] = False
        sec["error"] = tb_info(e)
        return None
    sec["runs"] = True
    sec["shapes_equal"] = out_shapes(got) == sec["out_shapes"]
    return got


def check_second(sec: dict, model: Any, pruned: Any, gm: Any, plan: Any, inputs: Any,
                 tol: float) -> None:
    """Run ``pruned`` on ``inputs`` of another size and compare it with the masked original;
    ``sec`` gets runs / shapes_equal / error / oracle_* / graph_* entries."""
    import torch

    from structprune.graph.capture import normalize_inputs
    from structprune.graph.shapes import placeholder_values
    from structprune.oracle import MaskedInterpreter, masked_output, max_rel_diff

    got2 = run_second(sec, pruned, inputs)
    if got2 is None:
        return
    # the masked original at the second size, and the captured graph vs the model
    try:
        want2 = masked_output(plan.graph, plan, inputs)
        sec["oracle_max_diff"] = max_rel_diff(got2, want2)
        sec["oracle_equal"] = bool(sec["oracle_max_diff"] <= tol)
        a, k = normalize_inputs(inputs)
        with torch.no_grad():
            g2 = MaskedInterpreter(gm, {}).run(*placeholder_values(gm, a, k))
        sec["graph_vs_model_diff"] = max_rel_diff(g2, call(model, inputs))
        sec["graph_equal"] = bool(sec["graph_vs_model_diff"] <= tol)
    except Exception as e:
        sec["oracle_error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


def run_case(case: Case, tol64: float = 1e-5, tol32: float = 1e-4, f32_above_m: float = 50.0,
             onnx: bool = True, tp: bool = True, out_path: Optional[str] = None,
             zoo: str = "") -> dict[str, Any]:
    """Prune one case and check it (see the module docstring); returns the row. With
    ``out_path`` the row is also written there after structprune's part and after
    Torch-Pruning's, so that a timeout in Torch-Pruning keeps structprune's result."""
    import torch

    import structprune as sp
    from structprune.oracle import masked_output, max_rel_diff
    from structprune.plan import count_macs
    from structprune.testing import randomize_

    rec: dict[str, Any] = {"model": case.name, "zoo": zoo, "status": "failed", "stage": None,
                           "times": {}, "note": case.note}
    t_all = time.perf_counter()
    starts: dict[str, float] = {}

    def stage(s: str) -> None:
        rec["stage"] = s
        starts[s] = time.perf_counter()
        _write({**rec, "status": "in-progress"}, out_path)  # a timeout names the stage

    def done(s: str) -> None:
        rec["times"][s] = round(time.perf_counter() - starts.pop(s), 2)

    model, inputs = case.model.eval(), case.inputs
    second_inputs = None
    try:
        stage("setup")
        nparams = sum(p.numel() for p in model.parameters())
        dtype = torch.float32 if nparams > f32_above_m * 1e6 else torch.float64
        tol = tol32 if dtype == torch.float32 else tol64
        model = model.to(dtype)
        randomize_(model)
        rec["reinit_constant_params"] = len(randomize_constants(model))
        cast = (lambda t: t.to(dtype) if t.is_floating_point() else t)
        try:
            ref = call(model, map_tensors(inputs, cast))
        except Exception as e:
            if dtype != torch.float64:
                raise
            # a model that builds float32 tensors of its own (RAFT's coordinate grids) does not
            # run in float64: check it in float32
            rec["float64_error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
            dtype, tol = torch.float32, tol32
            model = model.to(dtype)
            cast = (lambda t: t.to(dtype) if t.is_floating_point() else t)
            ref = call(model, map_tensors(inputs, cast))
        inputs = map_tensors(inputs, cast)
        rec.update(input=in_shapes(inputs), dtype=str(dtype).replace("torch.", ""), tol=tol,
                   params_model=nparams, ignore=module_paths(model, case.ignore),
                   out_shapes=out_shapes(ref))
        # the second size: the first candidate the original runs on
        rec["second"] = {"input": None}
        later_inputs: list = []
        for cand in case.second:
            cand = map_tensors(cand, cast)
            try:
                ref2 = call(model, cand)
            except Exception as e:
                rec["second"].setdefault("original_failed_on", []).append(
                    [in_shapes(cand), f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"])
                continue
            if second_inputs is None:
                second_inputs = cand
                rec["second"].update(input=in_shapes(cand), out_shapes=out_shapes(ref2))
            else:  # tried when the pruned model refuses the first with a named size
                later_inputs.append((cand, out_shapes(ref2)))
        done("setup")

        stage("capture")
        pruner = sp.Pruner(model, inputs, ratio=0.5, importance="l2", ignore=case.ignore)
        try:
            graph = pruner.graph
        except sp.TraceError as whole:
            if not hasattr(pruner, "parts"):
                raise
            done("capture")
            _in_parts(rec, pruner, model, inputs, second_inputs, tol, whole, stage, done)
            raise _InParts
        gm = graph.graph_module
        rec["capture"] = gm.meta.get("structprune_capture", "fx")
        frozen = graph.frozen()
        reasons = Counter(e.reason for e in frozen)
        named = [e for e in frozen if not implied(e.reason)]
        rec["frozen"] = {
            "count": len(frozen), "count_excluding_ignored": len(named),
            "top_reasons": Counter(e.reason for e in named).most_common(3),
            "first": f"{named[0].node} ({named[0].op}): {named[0].reason}" if named else None,
            "reasons": dict(reasons.most_common()),
        }
        rec["groups"] = len(graph.groups())
        done("capture")

        stage("plan")
        plan = pruner.plan()
        macs0 = int(count_macs(plan.graph))
        macs1 = int(count_macs(plan.graph, plan.new_sizes()))
        rec.update(macs_before=macs0, macs_after=macs1, units_dropped=int(plan.num_dropped()),
                   mac_reduction_pct=round(100.0 * (1 - macs1 / macs0), 2) if macs0 else None)
        done("plan")
        if plan.is_empty:
            raise _NothingPruned

        stage("apply")
        pruned = pruner.apply(plan)
        record_returned(rec, pruner, pruned, model)
        done("apply")

        stage("oracle")
        got = call(pruned, inputs)
        want = masked_output(plan.graph, plan)
        diff = max_rel_diff(got, want)
        rec["oracle_max_diff"] = diff
        rec["oracle_equal"] = bool(diff <= tol)
        rec["pruned_out_shapes_equal"] = out_shapes(got) == rec["out_shapes"]
        flat = [t.flatten().double() for t in _flat(got) if t.is_floating_point() and t.numel()]
        rec["output_std"] = float(torch.cat(flat).std()) if flat else None
        try:
            rec["hook_macs_before"] = hook_macs(model, inputs)
            rec["hook_macs_after"] = hook_macs(pruned, inputs)
            if rec["hook_macs_before"]:
                rec["hook_mac_reduction_pct"] = round(
                    100.0 * (1 - rec["hook_macs_after"] / rec["hook_macs_before"]), 2)
        except Exception as e:  # diagnostic only
            rec["hook_macs_error"] = f"{type(e).__name__}: {e}"[:300]
        rec["status"] = "oracle-equal" if rec["oracle_equal"] else "oracle-mismatch"
        done("oracle")

        stage("second")
        sec = rec["second"]
        if second_inputs is None:
            sec["runs"] = None
        else:
            check_second(sec, model, pruned, gm, plan, second_inputs, tol)
            if sec["runs"] is False and refused_by_guard(sec["error"]):
                # a size export had to fix, refused by name: does another size (batch) run?
                for cand, shapes in later_inputs[:1]:
                    sec["other"] = {"input": in_shapes(cand), "out_shapes": shapes}
                    check_second(sec["other"], model, pruned, gm, plan, cand, tol)
        done("second")

        stage("onnx")
        if not onnx:
            rec["onnx"] = "skipped"
        else:  # keyword inputs too: export_onnx says when it cannot order them
            onnx_check(rec, pruned, inputs)
        done("onnx")
        rec["stage"] = None
    except _NothingPruned:
        rec["status"] = "nothing-pruned"
        rec["stage"] = None
    except _InParts:
        pass
    except Exception as e:
        rec["error"] = tb_info(e)
        rec["status"] = "failed"
        if rec["stage"] in starts:
            done(rec["stage"])
    finally:
        rec["seconds"] = round(time.perf_counter() - t_all, 2)
    _write(rec, out_path)
    if tp:
        t0 = time.perf_counter()
        rec["tp"] = run_tp(model, inputs, case.ignore, second_inputs, rec.get("out_shapes"),
                           rec.get("second", {}).get("out_shapes"))
        rec["tp"]["seconds"] = round(time.perf_counter() - t0, 2)
        _write(rec, out_path)
    return rec


def _flat(out: Any) -> list:
    from structprune.oracle import flatten_outputs

    return flatten_outputs(out)


def run_tp(model: Any, inputs: Any, ignore: list, second: Any, shapes: Optional[list],
           shapes2: Optional[list]) -> dict[str, Any]:
    """Torch-Pruning's MetaPruner (L2 magnitude, ratio 0.5, the same ignored layers) on a copy
    of ``model``: did it run, MACs removed (its counter and the hook counter), does the result
    run with the original's output shapes, at the example and at the second size."""
    res: dict[str, Any] = {"ran": False}
    try:
        import torch_pruning as tp
    except ImportError:
        return {"ran": None, "error": {"type": "ImportError", "first_line": "torch_pruning "
                                       "is not installed"}}
    res["version"] = getattr(tp, "__version__", None)
    stage = "copy"
    try:
        paths = module_paths(model, ignore)
        m = copy.deepcopy(model)
        ign = [m.get_submodule(p) for p in paths]
        ex = dict(inputs) if isinstance(inputs, dict) else tuple(inputs)
        stage = "count"
        macs0 = hook_macs(m, inputs)
        try:
            res["tp_macs_before"] = int(tp.utils.count_ops_and_params(m, ex)[0])
        except Exception as e:
            res["tp_count_error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
        stage = "build"
        pruner = tp.pruner.MetaPruner(m, ex, importance=tp.importance.MagnitudeImportance(p=2),
                                      pruning_ratio=0.5, ignored_layers=ign)
        stage = "step"
        pruner.step()
        res["ran"] = True
        stage = "run"
        try:
            out = call(m, inputs)
            res["runs"] = True
            res["shapes_equal"] = out_shapes(out) == shapes
        except Exception as e:
            res["runs"] = False
            res["run_error"] = tb_info(e)
        if res["runs"]:
            macs1 = hook_macs(m, inputs)
            if macs0:
                res["hook_mac_reduction_pct"] = round(100.0 * (1 - macs1 / macs0), 2)
            if "tp_macs_before" in res:
                try:
                    after = int(tp.utils.count_ops_and_params(m, ex)[0])
                    res["tp_mac_reduction_pct"] = round(
                        100.0 * (1 - after / res["tp_macs_before"]), 2)
                except Exception as e:
                    res["tp_count_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        if second is not None:
            try:
                out2 = call(m, second)
                res["second_runs"] = True
                res["second_shapes_equal"] = out_shapes(out2) == shapes2
            except Exception as e:
                res["second_runs"] = False
                res["second_error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
    except Exception as e:
        res["stage"] = stage
        res["error"] = tb_info(e)
    return res


# ------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------
def _worker(zoo: str, name: str, out: str, args: argparse.Namespace) -> int:
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    rec: dict[str, Any] = {"model": name, "zoo": zoo, "status": "build-error", "stage": "build"}
    t0 = time.perf_counter()
    try:
        case = build_case(zoo, name)
    except Exception as e:
        rec["error"] = tb_info(e)
        rec["seconds"] = round(time.perf_counter() - t0, 2)
        _write(rec, out)
        return 0
    build_s = round(time.perf_counter() - t0, 2)
    rec = run_case(case, args.tol64, args.tol32, args.f32_above, onnx=not args.no_onnx,
                   tp=not args.no_tp, out_path=out, zoo=zoo)
    rec["times"]["build"] = build_s
    _write(rec, out)
    return 0


def run_in_subprocess(zoo: str, name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one model in a fresh process with a timeout; a timeout during Torch-Pruning keeps
    structprune's part of the row."""
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", zoo, name, "--worker-out", out,
           "--tol64", str(args.tol64), "--tol32", str(args.tol32),
           "--f32-above", str(args.f32_above)] + (["--no-onnx"] if args.no_onnx else []) + \
          (["--no-tp"] if args.no_tp else [])
    t0 = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cpu_limit = int(args.timeout)

    def limit_cpu() -> None:  # the timeout counts CPU seconds: fair on a shared, loaded machine
        import resource

        resource.setrlimit(resource.RLIMIT_CPU, (cpu_limit, cpu_limit + 5))
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, preexec_fn=limit_cpu,
                           timeout=args.timeout * args.wall_factor)
        rc, stderr = p.returncode, p.stderr
    except subprocess.TimeoutExpired as e:
        rc, stderr = None, (e.stderr.decode() if isinstance(e.stderr, bytes) else e.stderr) or ""
    elapsed = round(time.perf_counter() - t0, 2)
    if rc is not None and rc in (-signal.SIGXCPU, -signal.SIGKILL):
        rc = None  # killed by the CPU-time limit: a timeout
    try:
        with open(out) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        rec = None
    finally:
        for p_ in (out, out + ".tmp"):
            try:
                os.unlink(p_)
            except OSError:
                pass
    kind = "timeout" if rc is None else "crashed"
    if rec is not None and rec.get("status") == "in-progress" and "oracle_equal" in rec:
        # structprune pruned and the oracle ran; a later check (second size, ONNX) ran out
        stage = rec["stage"]
        rec["status"] = "oracle-equal" if rec["oracle_equal"] else "oracle-mismatch"
        if stage == "onnx":
            rec["onnx"] = kind
        elif stage == "second":
            rec["second"]["runs"] = None
            rec["second"]["error"] = {"type": kind, "first_line": f"{kind} at the second size"}
        rec["stage"] = None
        rec["incomplete"] = f"{kind} in stage {stage} after {elapsed}s"
        rec["tp"] = {"ran": False, "error": {"type": kind, "first_line":
                                             f"not run: {kind} in stage {stage} before it"}}
    if rec is None or rec.get("status") == "in-progress":
        # killed inside structprune's part (the row says in which stage) or before it
        stage = rec.get("stage") if rec else "build"
        rec = dict(rec or {"model": name, "zoo": zoo})
        rec.update(status=kind, stage=stage, returncode=rc, seconds=elapsed,
                   error={"type": kind, "first_line": f"{kind} in stage {stage} after {elapsed}s "
                          f"(rc={rc})", "where": None,
                          "traceback_tail": stderr.splitlines()[-20:]})
    elif rc != 0 and "tp" not in rec and not args.no_tp:
        # structprune's part finished, Torch-Pruning did not
        rec["tp"] = {"ran": False, "error": {"type": kind, "first_line":
                                             f"Torch-Pruning {kind} after {elapsed}s (rc={rc})"}}
    rec["wall_seconds"] = elapsed
    return rec


def _git_rev() -> str:
    sys.path.insert(0, HERE)
    from _common import git_rev

    return git_rev()


# ------------------------------------------------------------------------------------------------
# summary and markdown
# ------------------------------------------------------------------------------------------------
PRUNED = ("oracle-equal", "oracle-mismatch")
FAILED = ("failed", "timeout", "crashed")


def silently_wrong(r: dict[str, Any]) -> list[str]:
    """Why a row is silently wrong (no error, but an output that is not the masked original):
    an oracle mismatch at the example, a mismatch at the second size, or a captured graph that
    computes something else than the model at the second size while the pruned model runs."""
    why = []
    if r.get("status") == "oracle-mismatch":
        why.append(f"oracle {r.get('oracle_max_diff')}")
    first = r.get("second") or {}
    for sec, at in ((first, "the second size"), (first.get("other") or {}, "another size")):
        if r.get("status") not in PRUNED or not sec.get("runs"):
            continue
        if sec.get("oracle_equal") is False:
            why.append(f"{at}: oracle {sec.get('oracle_max_diff')}")
        if sec.get("graph_equal") is False:
            why.append(f"captured graph != model at {at} ({sec.get('graph_vs_model_diff')})")
        if sec.get("shapes_equal") is False and not _data_dependent_shapes(r):
            why.append(f"output shapes at {at} differ from the original's")
    if r.get("status") in PRUNED and r.get("pruned_out_shapes_equal") is False \
            and not _data_dependent_shapes(r):
        why.append("output shapes differ from the original's")
    return why


def _data_dependent_shapes(r: dict[str, Any]) -> bool:
    """A model pruned in parts (a detector): how many detections it returns depends on the
    values, and pruning changes the values, so its output shapes need not be the original's;
    each part is checked against its masked original instead (``oracle_equal``)."""
    return r.get("capture") == "parts"


def error_kind(r: dict[str, Any]) -> Optional[str]:
    """A short cause for grouping failures: error class + first line with numbers and names
    blurred."""
    import re

    err = r.get("error")
    if not err:
        return None
    line = err.get("first_line") or err.get("message") or ""
    line = re.sub(r"'[^']*'", "'…'", line)
    line = re.sub(r"\d+(\.\d+)?", "N", line)
    return f"[{r.get('stage')}] {err.get('type')}: {line[:140]}"


def summarize(zoo: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts and the issue's goals for one zoo."""
    n = len(rows)
    st = Counter(r["status"] for r in rows)
    pruned = [r for r in rows if r["status"] in PRUNED]
    wrong = {r["model"]: silently_wrong(r) for r in rows if silently_wrong(r)}
    frozen_named = [r for r in rows if r["status"] == "nothing-pruned"
                    and (r.get("frozen") or {}).get("count_excluding_ignored")]
    ok_or_named = [r for r in rows if r["status"] == "oracle-equal" and not silently_wrong(r)] \
        + frozen_named
    macs = [r["mac_reduction_pct"] for r in pruned if r.get("mac_reduction_pct") is not None]
    ge = [r for r in rows if r["status"] == "oracle-equal" and not silently_wrong(r)
          and (r.get("mac_reduction_pct") or 0) >= GOAL_MACS_PCT]
    exp = [r for r in pruned if r.get("capture") == "export"]
    exp_second = [r for r in exp if (r.get("second") or {}).get("runs")]
    # refused the second size by name (a size export fixed: a branch on it) and ran at another
    exp_refused = [r for r in exp if not r["second"].get("runs")
                   and refused_by_guard(r["second"].get("error") or {})]
    exp_other = [r for r in exp_refused if (r["second"].get("other") or {}).get("runs")]
    sec_tried = [r for r in pruned if (r.get("second") or {}).get("runs") is not None]
    sec_ok = [r for r in sec_tried if r["second"]["runs"]]
    onnx = Counter(r.get("onnx", "-") for r in pruned)
    ret = Counter(("gm" if r["returned"]["graph_module"] else "own" if r["returned"]["own_class"]
                   else "other") for r in pruned if r.get("returned"))
    tp_rows = [r.get("tp") or {} for r in rows if r["status"] != "build-error"]
    tp_ran = [t for t in tp_rows if t.get("ran")]
    tp_runs = [t for t in tp_ran if t.get("runs")]
    tp_shape = [t for t in tp_runs if t.get("shapes_equal")]
    tp_second = [t for t in tp_runs if t.get("second_runs")]
    tp_ge = [t for t in tp_shape if (t.get("tp_mac_reduction_pct") or t.get(
        "hook_mac_reduction_pct") or 0) >= GOAL_MACS_PCT]
    causes: dict[str, list[str]] = {}
    for r in rows:
        k = error_kind(r)
        if k and r["status"] != "build-error":
            causes.setdefault(k, []).append(r["model"])
    s: dict[str, Any] = {
        "zoo": zoo, "models": n, "build_errors": st["build-error"],
        "pruned": len(pruned), "oracle_equal": st["oracle-equal"],
        "silently_wrong": len(wrong), "silently_wrong_models": wrong,
        "nothing_pruned": st["nothing-pruned"], "nothing_pruned_with_named_reason": len(frozen_named),
        "failed": sum(st[k] for k in FAILED), "failed_breakdown": {k: st[k] for k in FAILED if st[k]},
        "pruned_or_frozen_with_reason": len(ok_or_named),
        "pruned_or_frozen_with_reason_pct": round(100.0 * len(ok_or_named) / (n - st["build-error"]), 1)
        if n - st["build-error"] else None,
        "macs_ge_30pct": len(ge),
        "macs_ge_30pct_pct": round(100.0 * len(ge) / n, 1) if n else None,
        "mac_reduction_pct_median": round(statistics.median(macs), 2) if macs else None,
        "second_size_tried": len(sec_tried), "second_size_runs": len(sec_ok),
        "export_captured": len(exp), "export_captured_second_size_runs": len(exp_second),
        "export_captured_refused_by_name": {r["model"]: r["second"]["error"]["first_line"]
                                            for r in exp_refused},
        "export_captured_refused_ran_other": len(exp_other),
        "onnx": dict(onnx), "returned": dict(ret),
        "failure_causes": dict(sorted(causes.items(), key=lambda kv: -len(kv[1]))),
        "tp": {"ran": len(tp_ran), "runs": len(tp_runs), "shapes_equal": len(tp_shape),
               "second_size_runs": len(tp_second), "macs_ge_30pct_and_runs": len(tp_ge),
               "of": len(tp_rows)},
    }
    if zoo == "hf":
        s["hf_required_ge_30pct"] = {m: next((r["status"] == "oracle-equal" and not silently_wrong(r)
                                              and (r.get("mac_reduction_pct") or 0) >= GOAL_MACS_PCT
                                              for r in rows if r["model"] == m), None)
                                     for m in HF_REQUIRED}
    return s


def goal_lines(s: dict[str, Any]) -> list[str]:
    """The issue's goals as lines of text."""
    n = s["models"]
    lines = [
        f"silently wrong (no error, not the masked original): {s['silently_wrong']} (goal 0)"
        + (f": {', '.join(s['silently_wrong_models'])}" if s["silently_wrong_models"] else ""),
        f"pruned exactly or frozen with a named reason: {s['pruned_or_frozen_with_reason']}/"
        f"{n - s['build_errors']} ({s['pruned_or_frozen_with_reason_pct']}%; goal 100%)",
        f"exact with >= {GOAL_MACS_PCT:.0f}% MACs removed: {s['macs_ge_30pct']}/{n} "
        f"({s['macs_ge_30pct_pct']}%)" + (" (goal >= 95% of timm families)" if s["zoo"] == "timm"
                                         else ""),
        f"export-captured models that run at a second size: "
        f"{s['export_captured_second_size_runs']}/{s['export_captured']} (goal all); refused "
        f"it with an error naming the size or condition fixed by the capture: "
        f"{len(s.get('export_captured_refused_by_name', {}))}, of which ran at another size "
        f"(batch 3): {s.get('export_captured_refused_ran_other', 0)}; all pruned "
        f"models at a second size: {s['second_size_runs']}/{s['second_size_tried']}",
        f"Torch-Pruning: ran {s['tp']['ran']}/{s['tp']['of']}, its output runs "
        f"{s['tp']['runs']}, with the original's shapes {s['tp']['shapes_equal']}, at the second "
        f"size {s['tp']['second_size_runs']}, >= 30% MACs removed and runs "
        f"{s['tp']['macs_ge_30pct_and_runs']}",
    ]
    if "hf_required_ge_30pct" in s:
        req = s["hf_required_ge_30pct"]
        lines.insert(3, f"HF models of the issue exact with >= 30% MACs removed: "
                        f"{sum(1 for v in req.values() if v)}/{len(req)} (goal all)"
                        + "".join(f"; {k} no" for k, v in req.items() if not v))
    return lines


def _pct(v: Any) -> str:
    return "-" if v is None else f"{v:.1f}"


def _cell(text: Any, n: int = 90) -> str:
    return str(text).replace("|", "/").replace("\n", " ")[:n]


def markdown(data: dict[str, Any]) -> str:
    """The table of one zoo's results, its goal lines and its failures by cause."""
    s = data["summary"]
    out = [f"# structprune coverage: {s['zoo']}", "",
           f"torch {data.get('torch')}, {data.get('versions', '')}, Torch-Pruning "
           f"{data.get('torch_pruning')}, structprune {data.get('structprune_rev')}; ratio 0.5, "
           f"L2, classifier ignored; timeout {data.get('timeout')} s per model, 1 thread; "
           f"load average at the end {data.get('loadavg')}.", "",
           "Goals:", ""] + [f"- {g}" for g in goal_lines(s)] + [
        "", "MAC-%: MACs removed (structprune's count); hook-%: Conv/Linear MACs removed, "
        "measured with forward hooks (the same counter for both tools); 2nd: runs at the second "
        "size (batch 3, another size) and equals the masked original there (`=`), runs but "
        "differs (`WRONG`), fails (`no`), refused with an error naming the size or condition "
        "its export capture fixed (`refused`; then `batch =`: runs at batch 3 and the example's "
        "size, equal to the masked original); cap: fx / export; ret: own class / gm (GraphModule); "
        "TP: Torch-Pruning MetaPruner ratio 0.5 (`ok` ran and its output has the original's "
        "shapes, `shape` ran but the output shapes changed, `run` ran but the pruned model "
        "fails, `fail` it raised).", "",
        "| model | status | MAC-% | hook-% | oracle | 2nd | ONNX | cap | ret | frozen (top reason)"
        " / error | s | TP | TP MAC-% | TP hook-% | TP 2nd |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["results"]:
        sec = r.get("second") or {}
        if sec.get("runs") is None:
            s2 = "-"
        elif not sec["runs"] and refused_by_guard(sec.get("error") or {}):
            s2 = "refused" + ("; batch " + ("=" if sec["other"].get("oracle_equal") else "runs"
                                            if sec["other"].get("runs") else "no")
                              if sec.get("other") else "")
        elif not sec["runs"]:
            s2 = "no"
        elif sec.get("oracle_equal") is False or sec.get("graph_equal") is False \
                or (sec.get("shapes_equal") is False and not _data_dependent_shapes(r)):
            s2 = "WRONG"
        elif sec.get("oracle_equal"):
            s2 = "="
        else:
            s2 = "runs"
        err = r.get("error")
        if err:
            note = f"[{r.get('stage')}] {err.get('type')}: {err.get('first_line', '')}"
        else:
            fr = (r.get("frozen") or {}).get("top_reasons") or []
            note = f"{fr[0][1]}x {fr[0][0]}" if fr else ""
        if r.get("onnx") == "fail":
            note = f"ONNX {r['onnx_error'].get('type')}: {r['onnx_error'].get('first_line')} ; {note}"
        ret = r.get("returned")
        t = r.get("tp") or {}
        if t.get("ran") is None and "error" not in t:
            tps = "-"
        elif t.get("ran"):
            tps = ("ok" if t.get("shapes_equal") else "shape") if t.get("runs") else "run"
        else:
            tps = "fail"
        d = r.get("oracle_max_diff")
        status = r["status"] if not silently_wrong(r) else "**SILENTLY WRONG**"
        out.append("| " + " | ".join(_cell(c) for c in (
            r["model"], status, _pct(r.get("mac_reduction_pct")),
            _pct(r.get("hook_mac_reduction_pct")), "-" if d is None else f"{d:.0e}", s2,
            r.get("onnx", "-"), r.get("capture", "-"),
            "-" if not ret else "gm" if ret["graph_module"] else "own" if ret["own_class"]
            else "other", _cell(note, 110), r.get("wall_seconds", r.get("seconds", "-")), tps,
            _pct(t.get("tp_mac_reduction_pct")), _pct(t.get("hook_mac_reduction_pct")),
            "-" if t.get("second_runs") is None else "yes" if t["second_runs"] else "no")) + " |")
    out += ["", "## Failures by cause", ""]
    by_cause: dict[str, list[dict]] = {}
    for r in data["results"]:
        k = error_kind(r)
        if k:
            by_cause.setdefault(k, []).append(r)
    for k, rs in sorted(by_cause.items(), key=lambda kv: -len(kv[1])):
        e = rs[0]["error"]
        out.append(f"- **{len(rs)}x** {_cell(k, 200)}: {', '.join(r['model'] for r in rs)}  \n"
                   f"  e.g. {rs[0]['model']}: where {e.get('where')}; model code "
                   f"{e.get('where_model')}")
    if not by_cause:
        out.append("(none)")
    frozen: Counter = Counter()
    for r in data["results"]:
        for reason, c in (r.get("frozen") or {}).get("top_reasons") or []:
            frozen[reason] += 1
    out += ["", "## Most common frozen reasons (models)", ""]
    out += [f"- {c}x {_cell(reason, 200)}" for reason, c in frozen.most_common(10)] or ["(none)"]
    return "\n".join(out) + "\n"


def run_zoo(zoo: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run every model of one zoo (or ``--models``), rewriting the JSON after each model."""
    import torch

    versions = ""
    if zoo.startswith("tv"):
        import torchvision
        versions = f"torchvision {torchvision.__version__}"
    elif zoo == "timm":
        import timm
        versions = f"timm {timm.__version__}"
    elif zoo == "hf":
        import transformers
        versions = f"transformers {transformers.__version__}"
    try:
        import torch_pruning as tp
        tpv = getattr(tp, "__version__", "?")
    except ImportError:
        tpv = None
    names = args.models.split(",") if args.models else list_names(zoo)
    out = args.out or os.path.join(RESULTS, f"coverage_{zoo}{args.suffix}.json")
    previous: list = []
    if (args.update or args.resume) and os.path.exists(out):
        with open(out) as f:
            previous = json.load(f).get("results", [])
    if args.resume:  # run only the models the output does not hold yet
        done_names = {r["model"] for r in previous}
        names = [n for n in names if n.strip() not in done_names]
    print(f"== {zoo}: {len(names)} models, timeout {args.timeout:.0f}s -> {out}", flush=True)
    results: list = []
    data: dict[str, Any] = {}
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max(1, args.jobs))
    futures = [pool.submit(run_in_subprocess, zoo, name.strip(), args) for name in names]
    for fut in futures:  # in the zoo's order; up to --jobs models run at once
        rec = fut.result()
        rec["structprune_rev"] = _git_rev()
        results.append(rec)
        t = rec.get("tp") or {}
        print(f"{rec['model'][:34]:34s} {rec['status']:15s} MAC-% {_pct(rec.get('mac_reduction_pct')):>5s} "
              f"2nd {str((rec.get('second') or {}).get('runs')):5s} onnx {rec.get('onnx', '-'):5s} "
              f"TP {'-' if not t else 'ran' if t.get('ran') else 'fail':4s} {rec.get('wall_seconds')}s "
              f"{error_kind(rec) or ''}"[:230], flush=True)
        new = {r["model"]: r for r in results}
        merged = [new.pop(r["model"], r) for r in previous] + list(new.values())
        data = {"zoo": zoo, "torch": torch.__version__, "versions": versions,
                "torch_pruning": tpv, "structprune_rev": _git_rev(), "timeout": args.timeout,
                "ratio": 0.5, "importance": "l2", "loadavg": _loadavg(),
                "summary": summarize(zoo, merged), "results": merged}
        _save(data, out)
    pool.shutdown()
    return data


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def _save(data: dict[str, Any], out: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(data, f, indent=1, default=str)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(markdown(data))


def main(argv: Optional[list[str]] = None) -> int:
    """Command line: run (or ``--resummarize``) one zoo, several (comma-separated) or all."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", default="timm", help=f"one of {', '.join(ALL_ZOOS)}, or all")
    ap.add_argument("--models", default=None, help="comma-separated names (default: the zoo's)")
    ap.add_argument("--timeout", type=float, default=120.0, help="CPU seconds per model (default "
                    "120; the process is stopped after this many CPU seconds, or after "
                    "--wall-factor times as many wall-clock seconds)")
    ap.add_argument("--wall-factor", type=float, default=4.0)
    ap.add_argument("--out", default=None, help="JSON path (default results/coverage_<zoo>"
                    "<suffix>.json; the .md goes next to it)")
    ap.add_argument("--suffix", default="", help="added to the default file names, e.g. _baseline")
    ap.add_argument("--update", action="store_true", help="merge into the existing output")
    ap.add_argument("--resume", action="store_true", help="merge into the existing output and "
                    "run only the models it does not hold yet")
    ap.add_argument("--resummarize", action="store_true", help="run nothing: rewrite the summary "
                    "and the markdown of the existing output")
    ap.add_argument("--tol64", type=float, default=1e-5)
    ap.add_argument("--tol32", type=float, default=1e-4)
    ap.add_argument("--f32-above", type=float, default=50.0, help="run models with more than this "
                    "many million parameters in float32 (default 50)")
    ap.add_argument("--jobs", type=int, default=1, help="models run at once, each in its own "
                    "one-thread process (default 1)")
    ap.add_argument("--no-onnx", action="store_true")
    ap.add_argument("--no-tp", action="store_true")
    ap.add_argument("--select-timm", action="store_true", help="recompute the timm selection")
    ap.add_argument("--worker", nargs=2, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return _worker(args.worker[0], args.worker[1], args.worker_out, args)
    if args.select_timm:
        print(json.dumps(timm_selection(refresh=True), indent=1))
        return 0
    zoos = list(ZOOS) if args.zoo == "all" else args.zoo.split(",")
    for zoo in zoos:
        if zoo not in ALL_ZOOS:
            ap.error(f"--zoo {zoo!r}: one of {', '.join(ALL_ZOOS)}, or all")
    for zoo in zoos:
        out = args.out or os.path.join(RESULTS, f"coverage_{zoo}{args.suffix}.json")
        if args.resummarize:
            with open(out) as f:
                data = json.load(f)
            data["summary"] = summarize(zoo, data["results"])
            _save(data, out)
        else:
            data = run_zoo(zoo, args)
        print(f"\nSUMMARY {zoo}:")
        for g in goal_lines(data["summary"]):
            print("  " + g)
        for k, ms in data["summary"]["failure_causes"].items():
            print(f"  {len(ms)}x {k}: {', '.join(ms)}"[:300])
    return 0


if __name__ == "__main__":
    sys.exit(main())
