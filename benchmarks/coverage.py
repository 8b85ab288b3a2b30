"""Coverage of structprune on every torchvision classification model.

For each model of ``torchvision.models.list_models(module=torchvision.models)`` (weights=None):
prune 50% of every group by L2 magnitude, ignoring the classifier (the last ``nn.Linear``, or the
last ``nn.Conv2d`` when there is no Linear, e.g. SqueezeNet), then check

* the oracle: the pruned model's output equals the original traced graph run with the plan's
  dropped activations zeroed (``max_rel_diff <= tol``; float64, random norm statistics);
* ONNX parity: ``structprune.export.onnx.export_onnx(..., check=True)`` (``n/a`` when that module
  is not importable);
* models are run in float64 eval mode with random norm statistics (``randomize_``) and every
  constant-initialised parameter (zero biases, ViT's zero head and class token, ConvNeXt's
  layer_scale) replaced by random values, so that the oracle cannot pass vacuously;
* MACs before/after (``structprune.plan.count_macs``), plus an independent count of the MACs of
  the ``nn.Conv*``/``nn.Linear`` modules measured with forward hooks on the original and the
  pruned model, and parameters before/after;
* what is frozen (entries and reasons) and which nodes keep most of their MACs;
* what ``Pruner.apply`` returned (column ``ret``): ``own`` for an object of the model's own class,
  ``gm`` for an ``fx.GraphModule``, with the pruner's reason (``Pruner.applied.reason``); the
  summary groups the GraphModule reasons.

Each model runs in its own subprocess with a timeout, so that one crash or hang does not stop the
run; time and peak RSS are recorded per model. Results go to ``benchmarks/results/coverage.json``.

Usage::

    python benchmarks/coverage.py                      # all 80 models
    python benchmarks/coverage.py --models resnet18,vit_b_16 --timeout 120
    python benchmarks/coverage.py --zoo timm           # other zoos: see coverage_zoos.py
    python benchmarks/coverage.py --zoo all --jobs 2   # the classifiers, then every other zoo
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")

# Constructor kwargs and input side for models that cannot take the default small input.
DEFAULT_SIDE = 64
SPECIAL: dict[str, tuple[dict[str, Any], int]] = {
    "inception_v3": ({}, 75),          # smallest valid input
    "maxvit_t": ({}, 224),             # every block's grid must be divisible by partition 7
    "vit_b_16": ({"image_size": 64}, 64),
    "vit_b_32": ({"image_size": 64}, 64),
    "vit_l_16": ({"image_size": 64}, 64),
    "vit_l_32": ({"image_size": 64}, 64),
    "vit_h_14": ({"image_size": 56}, 56),
}


# ------------------------------------------------------------------------------------------------
# worker: one model, in its own process
# ------------------------------------------------------------------------------------------------
def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _classifier(model: Any) -> tuple[str, Any]:
    import torch.nn as nn

    last_lin = last_conv = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last_lin = (name, m)
        elif isinstance(m, nn.Conv2d):
            last_conv = (name, m)
    found = last_lin or last_conv
    if found is None:
        raise RuntimeError("no nn.Linear or nn.Conv2d to ignore as the classifier")
    return found


def _implied(reason: str) -> bool:
    """Frozen entries that any pruning of a classifier model has: the ignored classifier and
    the model output it feeds."""
    return reason == "ignored by the user" or "model output keeps its shape" in reason


def _describe(gm: Any, node: Any) -> str:
    if node.op == "call_module":
        return f"{type(gm.get_submodule(node.target)).__name__}({node.target})"
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "call_function":
        return getattr(node.target, "__name__", repr(node.target))
    return node.op


def _hook_macs(model: Any, args: tuple) -> int:
    """MACs of Conv/Linear modules measured with forward hooks (independent of structprune)."""
    from coverage_zoos import hook_macs

    return hook_macs(model, args)


def _tb_info(exc: BaseException) -> dict[str, Any]:
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    sp_frames = [f for f in frames if "structprune" in f.filename and "benchmarks" not in f.filename]
    where = None
    if sp_frames:
        f = sp_frames[-1]
        where = f"{os.path.relpath(f.filename, os.path.dirname(os.path.dirname(HERE)))}" \
                f":{f.lineno} in {f.name}"
    tail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return {"type": type(exc).__name__, "message": str(exc)[:2000], "where": where,
            "traceback_tail": tail.splitlines()[-25:]}


def run_one(name: str, tol64: float, tol32: float, f32_above_m: float) -> dict[str, Any]:
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    import torchvision

    import structprune as sp
    from structprune.plan import count_macs
    from structprune.testing import masked_output, max_rel_diff, randomize_

    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    rec: dict[str, Any] = {"model": name, "status": "failed", "stage": None, "times": {}}
    t_all = time.perf_counter()

    starts: dict[str, float] = {}

    def stage(s: str) -> None:
        rec["stage"] = s
        starts[s] = time.perf_counter()

    def done(s: str) -> None:
        rec["times"][s] = round(time.perf_counter() - starts.pop(s), 2)

    try:
        stage("build")
        kwargs, side = SPECIAL.get(name, ({}, DEFAULT_SIDE))
        model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
        nparams = sum(p.numel() for p in model.parameters())
        dtype = torch.float32 if nparams > f32_above_m * 1e6 else torch.float64
        tol = tol32 if dtype == torch.float32 else tol64
        model = model.to(dtype)
        randomize_(model)
        # Constant initialisations weaken the oracle: ViT's zero head makes the output constant,
        # ConvNeXt's layer_scale=1e-6 shrinks every residual branch below the tolerance, and zero
        # biases hide a wrongly sliced bias. Give every constant parameter random values.
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if p.numel() > 1 and bool((p == p.flatten()[0]).all()):
                    c = float(p.flatten()[0])
                    base = 1.0 if (p.dim() == 1 and c != 0.0) else 0.0  # scales stay around 1
                    p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1 + base)
                    rec.setdefault("reinit_constant_params", []).append(pname)
        x = torch.randn(1, 3, side, side, dtype=dtype)
        cls_name, cls = _classifier(model)
        rec.update(input=[1, 3, side, side], dtype=str(dtype).replace("torch.", ""), tol=tol,
                   classifier=cls_name, params_model=nparams)
        done("build")

        stage("trace")
        pruner = sp.Pruner(model, x, ratio=0.5, importance="l2", ignore=[cls])
        graph = pruner.graph
        gm = graph.graph_module
        frozen = graph.frozen()
        groups = graph.groups()
        reasons = Counter(e.reason for e in frozen)
        non_ignored = [e for e in frozen if not _implied(e.reason)]
        rec["frozen"] = {
            "count": len(frozen),
            "count_excluding_ignored": len(non_ignored),
            "first_reason": (f"{non_ignored[0].node} ({non_ignored[0].op}): {non_ignored[0].reason}"
                             if non_ignored else None),
            "reasons": dict(reasons.most_common()),
            "entries": [{"node": e.node, "op": e.op, "reason": e.reason} for e in frozen[:60]],
        }
        rec["groups"] = len(groups)
        rec["units"] = int(sum(g.num_units for g in groups))
        rec["params_before"] = sum(p.numel() for p in gm.parameters())
        done("trace")

        stage("plan")
        plan = pruner.plan()
        rec["units_dropped"] = int(plan.num_dropped())
        rec["groups_pruned"] = len(plan.drops)
        macs_before, by_before = count_macs(plan.graph, per_node=True)
        macs_after, by_after = count_macs(plan.graph, plan.new_sizes(), per_node=True)
        rec["macs_before"], rec["macs_after"] = int(macs_before), int(macs_after)
        rec["mac_reduction_pct"] = (round(100.0 * (1 - macs_after / macs_before), 2)
                                    if macs_before else None)
        # Nodes that keep most MACs: (remaining MACs, kept fraction) — where the budget went.
        nodes = {n.name: n for n in gm.graph.nodes}
        keep = []
        for k, b in by_before.items():
            a = by_after.get(k, 0)
            keep.append((a, k, b))
        keep.sort(reverse=True)
        rec["top_unreduced"] = [
            {"node": k, "op": _describe(gm, nodes[k]) if k in nodes else "?", "macs_before": b,
             "macs_after": a, "kept": round(a / b, 3) if b else None}
            for a, k, b in keep[:8] if b and a / b > 0.6]
        done("plan")
        if plan.is_empty:
            rec["status"] = "nothing-pruned"
            rec["stage"] = None
            return rec

        stage("apply")
        pruned = pruner.apply(plan)
        rec["params_after"] = sum(p.numel() for p in pruned.parameters())
        # What sp.prune / Pruner.apply handed back: the model's own class (its forward runs on
        # the smaller modules) or an fx.GraphModule, and the pruner's reason for it.
        applied = getattr(pruner, "applied", None)
        rec["returned"] = {
            "type": type(pruned).__name__,
            "graph_module": isinstance(pruned, torch.fx.GraphModule),
            "own_class": type(pruned) is type(model),
            "reason": getattr(applied, "reason", None),
        }
        done("apply")

        stage("oracle")
        with torch.no_grad():
            got = pruned(x)
        want = masked_output(plan.graph, plan)
        diff = max_rel_diff(got, want)
        rec["oracle_max_diff"] = diff
        rec["output_std"] = float(torch.cat([t.flatten().double() for t in (
            [got] if isinstance(got, torch.Tensor) else list(got))]).std())
        rec["oracle_equal"] = bool(diff <= tol)
        try:
            rec["hook_macs_before"] = _hook_macs(model, (x,))
            rec["hook_macs_after"] = _hook_macs(pruned, (x,))
            rec["hook_mac_reduction_pct"] = round(
                100.0 * (1 - rec["hook_macs_after"] / rec["hook_macs_before"]), 2)
        except Exception as e:  # pragma: no cover - diagnostic only
            rec["hook_macs_error"] = f"{type(e).__name__}: {e}"
        done("oracle")
        rec["status"] = "oracle-equal" if rec["oracle_equal"] else "oracle-mismatch"
        rec["stage"] = None

        stage("onnx")
        try:
            from structprune.export.onnx import export_onnx
        except ImportError as e:
            rec["onnx"] = "n/a"
            rec["onnx_error"] = f"ImportError: {e}"
        else:
            try:
                with tempfile.TemporaryDirectory() as d:
                    export_onnx(pruned.float(), x.float(), os.path.join(d, "m.onnx"), check=True)
                rec["onnx"] = "pass"
            except Exception as e:
                rec["onnx"] = "fail"
                rec["onnx_error"] = _tb_info(e)
                # Does the unpruned (traced) model fail the same way? Then the exporter or the
                # parity check is at fault, not the pruning.
                try:
                    with tempfile.TemporaryDirectory() as d:
                        export_onnx(gm.float(), x.float(), os.path.join(d, "m.onnx"), check=True)
                    rec["onnx_unpruned"] = "pass"
                except Exception as e2:
                    rec["onnx_unpruned"] = f"fail: {type(e2).__name__}: {str(e2)[:300]}"
                with torch.no_grad():
                    rec["output_absmax_float32"] = float(pruned.float()(x.float()).abs().max())
        done("onnx")
        rec["stage"] = None
    except Exception as e:
        rec["status"] = "failed"
        rec["error"] = _tb_info(e)
        if rec["stage"] in starts:
            done(rec["stage"])
    finally:
        rec["seconds"] = round(time.perf_counter() - t_all, 2)
        rec["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    return rec


# ------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------
def _git_rev() -> str:
    sys.path.insert(0, HERE)
    from _common import git_rev

    return git_rev()


def run_in_subprocess(name: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--worker-out", out,
           "--tol64", str(args.tol64), "--tol32", str(args.tol32),
           "--f32-above", str(args.f32_above)]
    t0 = time.perf_counter()
    rev = _git_rev()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        rc, stderr = p.returncode, p.stderr
    except subprocess.TimeoutExpired as e:
        rc, stderr = None, (e.stderr.decode() if isinstance(e.stderr, bytes) else e.stderr) or ""
    elapsed = round(time.perf_counter() - t0, 2)
    try:
        with open(out) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        rec = None
    finally:
        try:
            os.unlink(out)
        except OSError:
            pass
    if rec is None:
        status = "timeout" if rc is None else "crashed"
        rec = {"model": name, "status": status, "returncode": rc, "seconds": elapsed,
               "error": {"type": status, "message": f"{status} after {elapsed}s (rc={rc})",
                         "where": None, "traceback_tail": stderr.splitlines()[-25:]}}
    rec["structprune_rev"] = rev
    return rec


def _fmt_int(n: Optional[int]) -> str:
    if n is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def _returned(r: dict[str, Any]) -> str:
    """``own`` (the model's class), ``gm`` (an fx.GraphModule), ``other`` or ``-``."""
    ret = r.get("returned")
    if not ret:
        return "-"
    return "gm" if ret["graph_module"] else "own" if ret["own_class"] else "other"


def print_row(r: dict[str, Any], header: bool = False) -> None:
    cols = "{:<20} {:<15} {:>6} {:>6} {:>8} {:>8} {:>9} {:>5} {:>4} {:>5} {:>6} {:>6}  {}"
    if header:
        print(cols.format("model", "status", "MAC-%", "hook-%", "params0", "params1", "oracle",
                          "onnx", "frz", "ret", "sec", "MB", "first frozen reason / error"),
              flush=True)
        return
    err = r.get("error")
    note = ""
    if err:
        note = f"[{r.get('stage')}] {err['type']}: {err['message'].splitlines()[0][:140]}" \
            if err.get("message") else err["type"]
    elif r.get("frozen", {}).get("first_reason"):
        note = r["frozen"]["first_reason"][:150]
    if r.get("onnx") == "fail":
        oe = r.get("onnx_error", {})
        note = f"onnx {oe.get('type')}: {str(oe.get('message', '')).splitlines()[0][:100]} | " + note
    d = r.get("oracle_max_diff")
    fr = r.get("frozen", {})
    print(cols.format(
        r["model"][:20], r["status"][:15],
        "-" if r.get("mac_reduction_pct") is None else f"{r['mac_reduction_pct']:.1f}",
        "-" if r.get("hook_mac_reduction_pct") is None else f"{r['hook_mac_reduction_pct']:.1f}",
        _fmt_int(r.get("params_before")), _fmt_int(r.get("params_after")),
        "-" if d is None else f"{d:.1e}", r.get("onnx", "-"),
        fr.get("count_excluding_ignored", "-"), _returned(r), r.get("seconds", "-"),
        f"{r['peak_rss_mb']:.0f}" if r.get("peak_rss_mb") else "-", note), flush=True)


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(results)
    st = Counter(r["status"] for r in results)
    pruned = [r for r in results if r["status"] in ("oracle-equal", "oracle-mismatch")]
    big = [r for r in pruned if (r.get("mac_reduction_pct") or 0) >= 40.0]
    onnx = Counter(r.get("onnx", "-") for r in pruned)
    with_frozen = [r for r in results if any(not _implied(k) for k in
                                             r.get("frozen", {}).get("reasons", {}))]
    failed = [r for r in results if r["status"] in ("failed", "timeout", "crashed")]
    returned = Counter(_returned(r) for r in pruned)
    macs = [r["mac_reduction_pct"] for r in pruned if r.get("mac_reduction_pct") is not None]
    gm_reasons: dict[str, list[str]] = {}  # reason without the node it names -> models
    for r in pruned:
        if _returned(r) == "gm":
            reason = re.sub(r" \(.*\)", " (...)", r["returned"].get("reason") or "?")
            gm_reasons.setdefault(reason, []).append(r["model"])
    return {
        "models": n,
        "pruned": len(pruned),
        "oracle_equal": st["oracle-equal"],
        "oracle_mismatch": st["oracle-mismatch"],
        "onnx_parity": onnx["pass"],
        "onnx_fail": onnx["fail"],
        "onnx_na": onnx["n/a"],
        "frozen_with_reason": len(with_frozen),
        "nothing_pruned": st["nothing-pruned"],
        "failed": len(failed),
        "failed_breakdown": {k: st[k] for k in ("failed", "timeout", "crashed") if st[k]},
        "macs_reduced_ge_40pct": len(big),
        "pct_macs_reduced_ge_40pct": round(100.0 * len(big) / n, 1) if n else 0.0,
        "mac_reduction_pct_median": (round(statistics.median(macs), 2) if macs else None),
        "mac_reduction_pct_min": (round(min(macs), 2) if macs else None),
        "returned_own_class": returned["own"],
        "returned_graph_module": returned["gm"],
        "returned_other": returned["other"],
        "graph_module_reasons": dict(sorted(gm_reasons.items(), key=lambda kv: -len(kv[1]))),
    }


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        description="Prune every torchvision classification model by 50% (classifier ignored) "
                    "and record oracle equality, ONNX parity, MAC reduction and what is frozen.")
    ap.add_argument("--models", default=None,
                    help="comma-separated model names (default: all of "
                         "torchvision.models.list_models(module=torchvision.models))")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per model (default 300)")
    ap.add_argument("--out", default=os.path.join(RESULTS, "coverage.json"),
                    help="JSON output path (default benchmarks/results/coverage.json)")
    ap.add_argument("--tol64", type=float, default=1e-5, help="oracle tolerance in float64")
    ap.add_argument("--tol32", type=float, default=1e-4, help="oracle tolerance in float32")
    ap.add_argument("--f32-above", type=float, default=200.0,
                    help="run models with more than this many million parameters in float32 "
                         "to stay within memory (default 200)")
    ap.add_argument("--resummarize", action="store_true",
                    help="run nothing: print the table and summary of the existing --out file "
                         "(and rewrite its summary)")
    ap.add_argument("--update", action="store_true",
                    help="merge into the existing --out file, replacing only the models run now")
    ap.add_argument("--zoo", default="torchvision",
                    help="torchvision (the classifiers, the default: this script), or one of "
                         "tv-detection, tv-segmentation, tv-video, tv-flow, timm, hf, plain, or "
                         "all (every zoo); the other zoos run benchmarks/coverage_zoos.py, which "
                         "takes further options (see its --help)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args(argv)
    if args.zoo != "torchvision":
        return _run_zoos(args, rest)
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")

    if args.worker:
        rec = run_one(args.worker, args.tol64, args.tol32, args.f32_above)
        with open(args.worker_out, "w") as f:
            json.dump(rec, f, default=str)
        return 0

    import torch
    import torchvision

    names = (args.models.split(",") if args.models
             else torchvision.models.list_models(module=torchvision.models))
    if not args.resummarize:
        print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
              f"{len(names)} models, timeout {args.timeout:.0f}s", flush=True)
    previous: list[dict[str, Any]] = []
    print_row({}, header=True)
    if args.resummarize:
        with open(args.out) as f:
            data = json.load(f)
        for r in data["results"]:
            if "frozen" in r:  # recount with the current definition of implied entries
                r["frozen"]["count_excluding_ignored"] = sum(
                    n for k, n in r["frozen"]["reasons"].items() if not _implied(k))
                first = [e for e in r["frozen"]["entries"] if not _implied(e["reason"])]
                r["frozen"]["first_reason"] = (f"{first[0]['node']} ({first[0]['op']}): "
                                               f"{first[0]['reason']}" if first else None)
            print_row(r)
        data["summary"] = summarize(data["results"])
        with open(args.out, "w") as f:
            json.dump(data, f, indent=1, default=str)
        _print_summary(data["summary"])
        return 0
    if args.update and os.path.exists(args.out):
        with open(args.out) as f:
            previous = json.load(f).get("results", [])
    results = []
    for name in names:
        rec = run_in_subprocess(name.strip(), args)
        results.append(rec)
        print_row(rec)
        if previous:
            new = {r["model"]: r for r in results}
            merged = [new.pop(r["model"], r) for r in previous] + list(new.values())
        else:
            merged = results
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:  # rewrite after each model: a partial run is usable too
            json.dump({"torch": torch.__version__, "torchvision": torchvision.__version__,
                       "ratio": 0.5, "importance": "l2", "summary": summarize(merged),
                       "results": merged}, f, indent=1, default=str)
    if previous:
        print("\nthis run: " + json.dumps(summarize(results)))
    _print_summary(summarize(merged))
    print(f"wrote {args.out}")
    return 0


def _run_zoos(args: argparse.Namespace, rest: list[str]) -> int:
    """``--zoo`` other than torchvision: run ``coverage_zoos.py`` (``all`` runs the classifiers
    here first, then every other zoo)."""
    sys.path.insert(0, HERE)
    import coverage_zoos

    passed = ["--timeout", str(args.timeout), "--tol64", str(args.tol64), "--tol32",
              str(args.tol32)] + (["--models", args.models] if args.models else []) + rest
    if args.zoo == "all":
        rc = main(["--timeout", str(args.timeout)])
        return rc or coverage_zoos.main(["--zoo", "all"] + passed)
    return coverage_zoos.main(["--zoo", args.zoo] + passed)


def _print_summary(s: dict[str, Any]) -> None:
    print(f"\nSUMMARY: {s['models']} models | pruned {s['pruned']} | oracle-equal "
          f"{s['oracle_equal']} | oracle-mismatch {s['oracle_mismatch']} | onnx-parity "
          f"{s['onnx_parity']} (fail {s['onnx_fail']}, n/a {s['onnx_na']}) | frozen-with-reason "
          f"{s['frozen_with_reason']} | nothing-pruned {s['nothing_pruned']} | failed "
          f"{s['failed']} {s['failed_breakdown'] or ''} | MACs reduced >= 40%: "
          f"{s['macs_reduced_ge_40pct']}/{s['models']} ({s['pct_macs_reduced_ge_40pct']}%, "
          f"median {s.get('mac_reduction_pct_median')}%, min {s.get('mac_reduction_pct_min')}%)"
          f" | returned own class {s.get('returned_own_class', '-')}, GraphModule "
          f"{s.get('returned_graph_module', '-')}, other {s.get('returned_other', '-')}")
    for reason, models in (s.get("graph_module_reasons") or {}).items():
        print(f"  GraphModule x{len(models)}: {reason[:200]}: {', '.join(models)}")


if __name__ == "__main__":
    sys.exit(main())
