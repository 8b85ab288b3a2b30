"""Build-time benchmark: structprune vs Torch-Pruning on ImageNet-size CNNs, side by side.

Times, in one process and on the same inputs:

* ``structprune``  ``trace``  -- ``sp.trace(model, x)`` (trace + coupling into groups)
* ``structprune``  ``full``   -- ``sp.prune_(model, x, ratio, importance="l2", ignore=[classifier])``
  (trace, couple, score, allocate, slice the model in place -- what Torch-Pruning does, so each
  repeat gets a fresh ``copy.deepcopy``; the copy is not timed)
* ``structprune``  ``copy``   -- the same with ``sp.prune`` (the input model is not modified; the
  pruned copy is built inside the timing)
* ``torch_pruning`` ``trace`` -- ``tp.DependencyGraph().build_dependency(model, example_inputs=x)``
* ``torch_pruning`` ``full``  -- ``tp.pruner.BasePruner(model, x, MagnitudeImportance(p=2),
  pruning_ratio=ratio, ignored_layers=[classifier])`` construction + ``pruner.step()``
  (in place, so every repeat gets a fresh ``copy.deepcopy``; the copy is not timed)

Reports the median of ``--repeats`` runs per (model, tool, phase), the structprune / Torch-Pruning
ratio per model (the median of per-repeat ratios: each repeat runs the tools back to back, so a
slow spell of the machine hits both; the ratio of medians is kept too), parameter counts of both pruned models (so the comparison is at equal work),
a forward-pass sanity check of both, and structprune time per conv layer across the ResNet depths
("linear in depth"). Writes ``benchmarks/results/build_time.json`` and, if matplotlib is
available, ``benchmarks/results/build_time.png``.

Usage (from the repo root)::

    PYTHONPATH=. python benchmarks/build_time.py              # all four models, 5 repeats
    PYTHONPATH=. python benchmarks/build_time.py --quick      # resnet50, 1 repeat
    PYTHONPATH=. python benchmarks/build_time.py --models resnet50 densenet121 --repeats 3
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import models  # noqa: E402
import structprune as sp  # noqa: E402

try:
    import torch_pruning as tp
except ImportError:  # pragma: no cover - optional competitor
    tp = None

DEFAULT_MODELS = ["resnet50", "resnet101", "resnet152", "densenet121"]
RESULTS_DIR = ROOT / "benchmarks" / "results"
PHASES = ("trace", "full")


def classifier_of(model: nn.Module) -> nn.Module:
    for name in ("fc", "classifier", "head"):
        mod = getattr(model, name, None)
        if isinstance(mod, nn.Module):
            return mod
    raise ValueError(f"no classifier found on {type(model).__name__}")


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def n_convs(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())


def timed(fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    gc.collect()
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def tail(exc: BaseException, lines: int = 8) -> str:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()
    return "\n".join(tb.splitlines()[-lines:])


# ---------------------------------------------------------------------------------------- tools
def sp_trace(model, x, ratio):
    return sp.trace(model, x)


def sp_full(model, x, ratio):
    return sp.prune_(model, x, ratio=ratio, importance="l2", ignore=[classifier_of(model)])


def sp_copy(model, x, ratio):
    return sp.prune(model, x, ratio=ratio, importance="l2", ignore=[classifier_of(model)])


def tp_trace(model, x, ratio):
    return tp.DependencyGraph().build_dependency(model, example_inputs=x)


def tp_full(model, x, ratio):
    pruner = tp.pruner.BasePruner(
        model, x, importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=ratio, ignored_layers=[classifier_of(model)])
    pruner.step()
    return model


TOOLS: dict[str, dict[str, Callable]] = {
    "structprune": {"trace": sp_trace, "full": sp_full, "copy": sp_copy},
    "torch_pruning": {"trace": tp_trace, "full": tp_full},
}
IN_PLACE = {("structprune", "full"), ("torch_pruning", "full")}


def bench_model(tools: list[str], model: nn.Module, x, ratio: float, repeats: int) -> tuple:
    """Interleave (tool, phase) inside each repeat so background load hits every cell alike."""
    cells = [(t, ph) for t in tools for ph in TOOLS[t]]
    recs = {c: {"times_s": []} for c in cells}
    last: dict = {}
    for _ in range(repeats):
        for tool, phase in cells:
            rec = recs[(tool, phase)]
            if "error" in rec:
                continue
            m = copy.deepcopy(model) if (tool, phase) in IN_PLACE else model  # copy not timed
            # TP's own API takes a single tensor for a single input.
            xin = x[0] if (tool == "torch_pruning" and len(x) == 1) else x
            fn = TOOLS[tool][phase]
            try:
                t, out = timed(fn, m, xin, ratio)
            except Exception as exc:  # report, keep going
                rec["error"] = tail(exc)
                continue
            rec["times_s"].append(t)
            last[(tool, phase)] = out
            del m, out
    for rec in recs.values():
        ts = rec["times_s"]
        rec["median_s"] = statistics.median(ts) if ts else None
        rec["min_s"] = min(ts) if ts else None
    return recs, last


def sanity(pruned: Any, x, ref_shape) -> dict:
    if not isinstance(pruned, nn.Module):
        return {"ok": False, "error": "no pruned model"}
    try:
        with torch.no_grad():
            y = pruned(*x)
        ok = tuple(y.shape) == tuple(ref_shape) and bool(torch.isfinite(y).all())
        return {"ok": ok, "params": n_params(pruned), "out_shape": list(y.shape)}
    except Exception as exc:
        return {"ok": False, "params": n_params(pruned), "error": tail(exc)}


def run(model_names: list[str], repeats: int, ratio: float) -> dict:
    tools = [t for t in TOOLS if t != "torch_pruning" or tp is not None]
    results: dict[str, Any] = {
        "meta": {
            "repeats": repeats, "ratio": ratio, "importance": "l2 magnitude",
            "torch": torch.__version__, "structprune": getattr(sp, "__version__", "?"),
            "torch_pruning": getattr(tp, "__version__", None) if tp else None,
            "python": platform.python_version(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "note": "median wall seconds, tools interleaved per repeat; the in-place runs "
                    "(structprune full = sp.prune_, Torch-Pruning full) get a fresh deepcopy per "
                    "repeat (untimed); structprune copy = sp.prune, which does not mutate its "
                    "input and builds the pruned copy inside the timing",
        },
        "models": {},
    }
    for name in model_names:
        torch.manual_seed(0)
        model = models.get(name).eval()
        x = models.example_inputs(name)
        with torch.no_grad():
            ref_shape = model(*x).shape
        p0 = n_params(model)
        rec: dict[str, Any] = {"params": p0, "convs": n_convs(model), "tools": {}}
        print(f"\n== {name}: {p0 / 1e6:.2f}M params, {rec['convs']} convs", flush=True)
        recs, last = bench_model(tools, model, x, ratio, repeats)
        for tool in tools:
            trec: dict[str, Any] = {}
            for phase in TOOLS[tool]:
                r = trec[phase] = recs[(tool, phase)]
                med = (f"median {r['median_s']:.3f}s  min {r['min_s']:.3f}s"
                       if r["median_s"] is not None else "ERROR")
                print(f"  {tool:14s} {phase:6s} {med}", flush=True)
                if "error" in r:
                    print("    " + r["error"].replace("\n", "\n    "), flush=True)
            trec["pruned"] = sanity(last.get((tool, "full")), x, ref_shape)
            if "copy" in TOOLS[tool]:
                trec["pruned_copy"] = sanity(last.get((tool, "copy")), x, ref_shape)
            rec["tools"][tool] = trec
        del last
        if n_params(model) != p0:
            rec["warning"] = "structprune mutated the input model's parameter count"
        if "torch_pruning" in rec["tools"]:
            ours, theirs = rec["tools"]["structprune"], rec["tools"]["torch_pruning"]
            pairs = (("trace", "trace"), ("full", "full"), ("copy", "full"))
            # "copy" is compared with Torch-Pruning's (in-place) full
            rec["ratio_of_medians"] = {
                ph: (ours[ph]["median_s"] / theirs[tp_ph]["median_s"])
                if ours[ph]["median_s"] and theirs[tp_ph]["median_s"] else None
                for ph, tp_ph in pairs}
            # The repeats interleave the tools, so repeat i of each ran within seconds of the
            # other: the median of per-repeat ratios is robust to the box slowing down mid-run.
            rec["ratio_sp_over_tp"] = {
                ph: statistics.median(a / b for a, b in zip(ours[ph]["times_s"],
                                                           theirs[tp_ph]["times_s"]))
                if ours[ph]["times_s"] and len(ours[ph]["times_s"]) == len(theirs[tp_ph]["times_s"])
                else rec["ratio_of_medians"][ph]
                for ph, tp_ph in pairs}
        results["models"][name] = rec
    # "linear in depth": structprune seconds per conv layer across the ResNets
    depth = {}
    for name, rec in results["models"].items():
        if name.startswith("resnet"):
            s = rec["tools"]["structprune"]
            depth[name] = {ph: (s[ph]["median_s"] / rec["convs"] * 1e3) if s[ph]["median_s"] else None
                           for ph in TOOLS["structprune"]}
            depth[name]["convs"] = rec["convs"]
    results["ms_per_conv_structprune"] = depth
    return results


def fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def print_table(res: dict) -> None:
    print("\nMedian wall time (s); x = median over repeats of structprune / torch_pruning "
          f"(repeats={res['meta']['repeats']}, ratio={res['meta']['ratio']})")
    hdr = (f"{'model':12s} {'sp trace':>9s} {'tp trace':>9s} {'x':>6s} "
           f"{'sp full':>9s} {'tp full':>9s} {'x':>6s} {'sp copy':>9s} {'x':>6s}  {'params':>8s} "
           f"{'sp pruned':>10s} {'tp pruned':>10s}")
    print(hdr)
    print("-" * len(hdr))
    for name, rec in res["models"].items():
        s = rec["tools"]["structprune"]
        t = rec["tools"].get("torch_pruning", {})
        r = rec.get("ratio_sp_over_tp", {})
        sp_p = s.get("pruned", {}).get("params")
        tp_p = t.get("pruned", {}).get("params") if t else None
        print(f"{name:12s} {fmt(s['trace']['median_s']):>9s} "
              f"{fmt(t.get('trace', {}).get('median_s')):>9s} {fmt(r.get('trace'), '.2f'):>6s} "
              f"{fmt(s['full']['median_s']):>9s} {fmt(t.get('full', {}).get('median_s')):>9s} "
              f"{fmt(r.get('full'), '.2f'):>6s} {fmt(s['copy']['median_s']):>9s} "
              f"{fmt(r.get('copy'), '.2f'):>6s}  {rec['params'] / 1e6:7.2f}M "
              f"{fmt(sp_p and sp_p / 1e6, '.2f') + 'M':>10s} "
              f"{fmt(tp_p and tp_p / 1e6, '.2f') + 'M':>10s}")
    print("(full: both in place on an untimed copy; sp copy: sp.prune, input untouched, "
          "x vs. Torch-Pruning's full)")
    for name, rec in res["models"].items():
        for tool, trec in rec["tools"].items():
            for key in ("pruned", "pruned_copy"):
                p = trec.get(key)
                if p is not None and not p.get("ok"):
                    print(f"  ! {name}/{tool}/{key}: pruned model sanity check failed: "
                          f"{p.get('error', p)}")
        if rec.get("warning"):
            print(f"  ! {name}: {rec['warning']}")
    if res["ms_per_conv_structprune"]:
        print("\nstructprune ms per conv layer (flat => linear in depth)")
        for name, d in res["ms_per_conv_structprune"].items():
            print(f"  {name:10s} convs={d['convs']:3d}  trace {fmt(d['trace'], '.2f')} ms/conv  "
                  f"full {fmt(d['full'], '.2f')} ms/conv  copy {fmt(d['copy'], '.2f')} ms/conv")


def plot(res: dict, path: Path) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed; plot skipped"
    names = list(res["models"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    bars = {"trace": [("structprune", "trace"), ("torch_pruning", "trace")],
            "full": [("structprune", "full"), ("structprune", "copy"), ("torch_pruning", "full")]}
    for ax, phase in zip(axes, PHASES):
        w = 0.8 / len(bars[phase])
        for i, (tool, ph) in enumerate(bars[phase]):
            vals = [res["models"][n]["tools"].get(tool, {}).get(ph, {}).get("median_s") or 0
                    for n in names]
            label = {"copy": f"{tool} (copy)", "full": f"{tool} (in place)"}.get(ph, tool)
            ax.bar([k + (i - (len(bars[phase]) - 1) / 2) * w for k in range(len(names))], vals, w,
                   label=label)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names)
        ax.set_ylabel("median wall time (s)")
        ax.set_title({"trace": "dependency graph build", "full": "trace + prune (ratio "
                      f"{res['meta']['ratio']})"}[phase])
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS,
                    help=f"models to run (default: {' '.join(DEFAULT_MODELS)})")
    ap.add_argument("--repeats", type=int, default=5, help="repeats per (model, tool, phase); "
                    "the median is reported (default: 5)")
    ap.add_argument("--ratio", type=float, default=0.5, help="pruning ratio (default: 0.5)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads "
                    "(default: 1, steadier on a shared box; 0 keeps torch's default)")
    ap.add_argument("--quick", action="store_true", help="1 repeat, resnet50 only")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "build_time.json",
                    help="results JSON path (the PNG goes next to it)")
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.repeats = ["resnet50"], 1
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    if tp is None:
        print("torch_pruning not installed (pip install torch-pruning --no-deps): "
              "structprune only", file=sys.stderr)

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    res = run(args.models, args.repeats, args.ratio)
    print_table(res)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    note = plot(res, args.out.with_suffix(".png"))
    print(note or f"wrote {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
