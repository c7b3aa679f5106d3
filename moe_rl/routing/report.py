"""The routing-stability report of a finished (or running) run: PNG plots and a Markdown summary.

Input, from a run directory:

- ``metrics.jsonl`` (one record per optimizer step, as the metric writer writes it): the
  ``routing/<metric>/<pair>[/layer_<l>]`` drift metrics, the ``routing/<load metric>[/layer_<l>]``
  load metrics (names and definitions in :mod:`moe_rl.routing.metrics`) and, if present, any
  ``routing/replay_*`` value. At least one drift or load metric must be there, else
  :class:`ReportError` naming the file. A step here is a loop step (the record's
  ``policy_version``): routing is measured once per rollout batch, and a batch trained in
  several optimizer steps repeats its values in each of their records; the report keeps one
  point per loop step, the numbering route dumps use (records without ``policy_version``,
  from older runs, count by ``step``).
- optionally route dumps ``routes/step_<8-digit step>.pt``, each a ``torch.save`` of a dict::

      {"format": 1, "step": int, "num_experts": int, "pass": str (e.g. "old"),
       "routes": {global_layer_index: Tensor[T, K] integer expert ids}}

  holding only real tokens (no padding; the same T tokens in every layer). When dumps exist,
  the expert-load plot shows the latest dump's tokens per expert; otherwise it shows the load
  metrics over steps. :func:`write_route_dump` writes one (rank 0, after gathering the routes).

Output, into ``out_dir`` (each file written atomically, whole or not at all):

- ``flip_frac_layers.png``  flip fraction of every layer over steps, one panel per pair
- ``flip_frac_heatmap.png`` layer x step heatmap of the flip fraction, one panel per pair
- ``expert_load.png``       tokens per expert per layer (dump) or load metrics over steps
- ``drift_pairs.png``       rollout->old next to old->new: layer-averaged metrics over steps and
                            the per-layer flip fraction of the last third of the steps
- ``summary.md``            averages with their trend, the worst layers, load, replay checks

Trend: the mean over the first third of the steps that logged a metric against the mean over
the last third (at least one step each); "flat" when they differ by at most 10% of the larger
magnitude. Worst layers: highest mean flip fraction over all logged steps.
"""

from __future__ import annotations

import glob
import io
import math
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping, Optional

from moe_rl.checkpoint.atomic import replace_file
from moe_rl.observability.writer import read_metrics
from moe_rl.routing.metrics import DRIFT_METRICS, LOAD_METRICS, PAIRS

if TYPE_CHECKING:
    import torch

# L layers, E experts, S steps, T tokens, K top-k

PAIR_LABELS = {"rollout_old": "rollout -> old", "old_new": "old -> new"}
PLOTS = ("flip_frac_layers.png", "flip_frac_heatmap.png", "expert_load.png", "drift_pairs.png")
DUMP_FORMAT = 1
_DRIFT_RE = re.compile(rf"^routing/({'|'.join(DRIFT_METRICS)})/({'|'.join(PAIRS)})(?:/layer_(\d+))?$")
_LOAD_RE = re.compile(rf"^routing/({'|'.join(LOAD_METRICS)})(?:/layer_(\d+))?$")
_DUMP_RE = re.compile(r"^step_(\d{8})\.pt$")
Series = list[tuple[int, float]]  # (step, value), steps ascending


class ReportError(ValueError):
    """The run directory lacks what the report needs (the message names the file)."""


@dataclass
class RoutingHistory:
    """Every routing metric of a run, as series over loop steps (policy versions)."""

    metrics_path: str
    drift: dict[tuple[str, str, Optional[int]], Series] = field(default_factory=dict)  # (metric, pair, layer|None)
    load: dict[tuple[str, Optional[int]], Series] = field(default_factory=dict)  # (metric, layer|None)
    replay: dict[str, Series] = field(default_factory=dict)  # routing/replay_* by full name

    def pairs(self) -> list[str]:
        return [p for p in PAIRS if any(k[1] == p for k in self.drift)]

    def layers(self, metric: str, pair: str) -> list[int]:
        return sorted(k[2] for k in self.drift if k[0] == metric and k[1] == pair and k[2] is not None)

    def load_layers(self, metric: str) -> list[int]:
        return sorted(k[1] for k in self.load if k[0] == metric and k[1] is not None)

    def steps(self) -> list[int]:
        all_series = list(self.drift.values()) + list(self.load.values())
        return sorted({s for series in all_series for s, _ in series})


@dataclass
class RouteDump:
    path: str
    step: int
    num_experts: int
    routes: dict  # global layer index -> Tensor[T, K]


def load_history(run_dir: str) -> RoutingHistory:
    """Parse ``run_dir/metrics.jsonl``; :class:`ReportError` if it is missing or has no routing metric."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ReportError(f"{path} does not exist: not a run directory (the metric writer creates it)")
    h = RoutingHistory(metrics_path=path)
    seen: set[int] = set()
    for rec in read_metrics(path):
        # Routing metrics are measured once per loop step (policy version) and repeated in each of
        # its optimizer-step records: one point per policy version, the step route dumps are named by.
        step = int(rec.get("policy_version", rec["step"]))
        if step in seen:
            continue
        seen.add(step)
        for name, value in rec.items():
            if not name.startswith("routing/") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if m := _DRIFT_RE.match(name):
                key = (m[1], m[2], None if m[3] is None else int(m[3]))
                h.drift.setdefault(key, []).append((step, float(value)))
            elif m := _LOAD_RE.match(name):
                h.load.setdefault((m[1], None if m[2] is None else int(m[2])), []).append((step, float(value)))
            elif name.startswith("routing/replay_"):
                h.replay.setdefault(name, []).append((step, float(value)))
    if not h.drift and not h.load:
        raise ReportError(f"{path} has no routing metrics (routing/<metric>/<pair>[/layer_<l>] or "
                          f"routing/<load metric>[/layer_<l>]): was the run made with a MoE model and "
                          f"routing metrics on?")
    for d in (h.drift, h.load, h.replay):
        for k in d:
            d[k].sort()
    return h


def dump_path(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, "routes", f"step_{int(step):08d}.pt")


def write_route_dump(run_dir: str, step: int, routes: Mapping[int, "torch.Tensor"], num_experts: int, *,
                     pass_name: str = "old") -> str:
    """Save one step's routes (global layer index -> [T, K] expert ids of the real tokens) as
    ``run_dir/routes/step_XXXXXXXX.pt``, atomically; returns the path. Call it on one rank."""
    import torch

    if not routes:
        raise ValueError("write_route_dump needs the routes of at least one layer")
    shapes = {int(l): tuple(t.shape) for l, t in routes.items()}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 2:
        raise ValueError(f"routes must be one [tokens, top_k] tensor per layer, same shape in all, got {shapes}")
    dtype = torch.int16 if num_experts <= torch.iinfo(torch.int16).max else torch.int32
    payload = {"format": DUMP_FORMAT, "step": int(step), "num_experts": int(num_experts), "pass": pass_name,
               "routes": {int(l): t.detach().to("cpu", dtype) for l, t in routes.items()}}
    path = dump_path(run_dir, step)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    replace_file(path, lambda f: torch.save(payload, f))
    return path


def load_dumps(run_dir: str) -> list[RouteDump]:
    """Every ``run_dir/routes/step_XXXXXXXX.pt``, by step; [] when the run saved none."""
    import torch

    out = []
    for path in sorted(glob.glob(os.path.join(run_dir, "routes", "step_*.pt"))):
        m = _DUMP_RE.match(os.path.basename(path))
        if m is None:
            continue
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a torn or foreign file: name it
            raise ReportError(f"{path} is not a readable route dump: {e}") from e
        if not isinstance(d, dict) or d.get("format") != DUMP_FORMAT or not isinstance(d.get("routes"), dict):
            raise ReportError(f"{path} is not a route dump of format {DUMP_FORMAT} "
                              f"(a dict with 'format', 'step', 'num_experts', 'routes')")
        if int(d.get("step", -1)) != int(m[1]):
            raise ReportError(f"{path} holds step {d.get('step')}, its name says {int(m[1])}")
        routes = {int(k): v for k, v in d["routes"].items()}
        shapes = {tuple(v.shape) for v in routes.values()}
        if not routes or len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ReportError(f"{path}: routes must be one [tokens, top_k] tensor per layer, got shapes {sorted(shapes)}")
        out.append(RouteDump(path, int(d["step"]), int(d["num_experts"]), routes))
    return out


def dump_load(dump: RouteDump):
    """``(layer_ids, load_LE)``: tokens per expert in each dumped layer."""
    import torch

    from moe_rl.routing.metrics import load_counts

    layer_ids = sorted(dump.routes)
    topk_TLK = torch.stack([dump.routes[l] for l in layer_ids], dim=1)
    try:
        return layer_ids, load_counts(topk_TLK, dump.num_experts)
    except ValueError as e:
        raise ReportError(f"{dump.path}: {e}") from e


def _mean(series: Series) -> float:
    return sum(v for _, v in series) / len(series)


def thirds(series: Series) -> tuple[float, float]:
    """Mean over the first and the last third of the series (at least one point each)."""
    n = max(1, math.ceil(len(series) / 3))
    return _mean(series[:n]), _mean(series[-n:])


def trend_word(first: float, last: float) -> str:
    if abs(last - first) <= 0.1 * max(abs(first), abs(last)) or not math.isfinite(last - first):
        return "flat" if math.isfinite(last - first) else "n/a"
    return "rising" if last > first else "falling"


def worst_layers(h: RoutingHistory, pair: str, top: int) -> list[tuple[int, float]]:
    """``(layer, mean flip fraction over the run)``, highest first."""
    scored = [(l, _mean(h.drift[("flip_frac", pair, l)])) for l in h.layers("flip_frac", pair)]
    return sorted(scored, key=lambda x: (-x[1], x[0]))[:top]


def _fmt(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return f"{x:.4g}"


def summary_markdown(h: RoutingHistory, dumps: list[RouteDump], plots: list[str], *, run_dir: str,
                     top: int = 5) -> str:
    steps = h.steps()
    lines = [f"# Routing report: {os.path.basename(os.path.abspath(run_dir))}", ""]
    lines.append(f"{len(steps)} steps with routing metrics, steps {steps[0]}..{steps[-1]} "
                 f"(from `{os.path.basename(h.metrics_path)}`). Trend: mean over the first third of the "
                 f"logged steps vs the last third; flat within 10%.")
    lines += ["", "## Layer-averaged drift", "", "| metric | pair | first third | last third | trend |",
              "|---|---|---|---|---|"]
    any_avg = False
    for metric in DRIFT_METRICS:
        for pair in PAIRS:
            s = h.drift.get((metric, pair, None))
            if s:
                any_avg = True
                f, l = thirds(s)
                lines.append(f"| {metric} | {PAIR_LABELS[pair]} | {_fmt(f)} | {_fmt(l)} | {trend_word(f, l)} |")
    if not any_avg:
        lines.append("| (none logged) | | | | |")
    for pair in h.pairs():
        worst = worst_layers(h, pair, top)
        if not worst:
            continue
        lines += ["", f"## Worst layers, {PAIR_LABELS[pair]} (highest mean flip fraction)", "",
                  "| layer | flip_frac (mean) | first third | last third | trend | topk_overlap (mean) | router_kl (mean) |",
                  "|---|---|---|---|---|---|---|"]
        for layer, mean_flip in worst:
            f, l = thirds(h.drift[("flip_frac", pair, layer)])
            ov = h.drift.get(("topk_overlap", pair, layer))
            kl = h.drift.get(("router_kl", pair, layer))
            lines.append(f"| {layer} | {_fmt(mean_flip)} | {_fmt(f)} | {_fmt(l)} | {trend_word(f, l)} | "
                         f"{_fmt(_mean(ov) if ov else None)} | {_fmt(_mean(kl) if kl else None)} |")
        lines.append("")
        if worst[0][1] > 0:
            lines.append(f"Worst layer for {PAIR_LABELS[pair]}: **layer {worst[0][0]}** "
                         f"(mean flip fraction {_fmt(worst[0][1])}).")
        else:
            lines.append(f"No layer changed experts for {PAIR_LABELS[pair]} in any logged step.")
    lines += ["", "## Expert load", ""]
    if dumps:
        d = dumps[-1]
        ids, load_LE = dump_load(d)
        lines += [f"From the route dump of step {d.step} (`{os.path.relpath(d.path, run_dir)}`, "
                  f"{len(dumps)} dump(s) in all), {load_LE.shape[1]} experts.", "",
                  "| layer | max/mean | dead experts |", "|---|---|---|"]
        rows = []
        for j, l in enumerate(ids):
            n = load_LE[j].double()
            rows.append((float(n.max() / n.mean()) if n.sum() > 0 else float("nan"), l, int((n == 0).sum())))
        for mom, l, dead in sorted(rows, key=lambda r: (-r[0], r[1]))[:top]:
            lines.append(f"| {l} | {_fmt(mom)} | {dead} |")
    elif h.load:
        lines += ["Last logged value per layer, most imbalanced first.", "",
                  "| layer | load_max_over_mean | load_cv | dead_experts |", "|---|---|---|---|"]
        layers = h.load_layers("load_max_over_mean")
        last = {k: v[-1][1] for k, v in h.load.items()}
        for l in sorted(layers, key=lambda l: (-last[("load_max_over_mean", l)], l))[:top]:
            lines.append(f"| {l} | {_fmt(last.get(('load_max_over_mean', l)))} | {_fmt(last.get(('load_cv', l)))} | "
                         f"{_fmt(last.get(('dead_experts', l)))} |")
        for metric in LOAD_METRICS:
            if (metric, None) in h.load:
                f, l = thirds(h.load[(metric, None)])
                lines.append(f"\nLayer mean `{metric}`: {_fmt(f)} (first third) -> {_fmt(l)} (last third), "
                             f"{trend_word(f, l)}.")
    else:
        lines.append("No load metrics and no route dumps in this run.")
    if h.replay:
        lines += ["", "## Replay", "", "| metric | last | max |", "|---|---|---|"]
        for name, s in sorted(h.replay.items()):
            lines.append(f"| {name} | {_fmt(s[-1][1])} | {_fmt(max(v for _, v in s))} |")
    lines += ["", "## Plots", ""]
    lines += [f"![{p[:-4]}]({p})" for p in plots] or ["(no plot: nothing per layer to draw)"]
    return "\n".join(lines) + "\n"


# ---- plots -------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: never needs a display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    _pyplot().close(fig)
    replace_file(path, lambda f: f.write(buf.getvalue()))


def _layer_colors(plt, layers: list[int]):
    cmap = plt.get_cmap("viridis")
    span = max(1, len(layers) - 1)
    return {l: cmap(j / span) for j, l in enumerate(layers)}


def plot_flip_layers(h: RoutingHistory, path: str) -> bool:
    pairs = [p for p in h.pairs() if h.layers("flip_frac", p)]
    if not pairs:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(pairs), figsize=(5.5 * len(pairs), 3.6), squeeze=False, sharey=True)
    for ax, pair in zip(axes[0], pairs):
        layers = h.layers("flip_frac", pair)
        colors = _layer_colors(plt, layers)
        for l in layers:
            s = h.drift[("flip_frac", pair, l)]
            ax.plot([x for x, _ in s], [v for _, v in s], color=colors[l], lw=1, label=f"layer {l}")
        if ("flip_frac", pair, None) in h.drift:
            s = h.drift[("flip_frac", pair, None)]
            ax.plot([x for x, _ in s], [v for _, v in s], color="black", lw=2, ls="--", label="mean")
        ax.set_title(f"flip fraction per layer, {PAIR_LABELS[pair]}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(layers) <= 12:
            ax.legend(fontsize=7, ncol=2)
        else:
            sm = plt.cm.ScalarMappable(cmap="viridis", norm=plt.Normalize(layers[0], layers[-1]))
            fig.colorbar(sm, ax=ax, label="layer")
    axes[0][0].set_ylabel("fraction of tokens whose top-k set changed")
    fig.tight_layout()
    _save(fig, path)
    return True


def plot_flip_heatmap(h: RoutingHistory, path: str) -> bool:
    import numpy as np

    pairs = [p for p in h.pairs() if h.layers("flip_frac", p)]
    if not pairs:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(pairs), figsize=(5.5 * len(pairs), 3.8), squeeze=False)
    vmax = max(v for k, s in h.drift.items() if k[0] == "flip_frac" for _, v in s) or 1.0
    for ax, pair in zip(axes[0], pairs):
        layers = h.layers("flip_frac", pair)
        steps = sorted({s for l in layers for s, _ in h.drift[("flip_frac", pair, l)]})
        col = {s: j for j, s in enumerate(steps)}
        grid_LS = np.full((len(layers), len(steps)), np.nan)
        for i, l in enumerate(layers):
            for s, v in h.drift[("flip_frac", pair, l)]:
                grid_LS[i, col[s]] = v
        im = ax.imshow(np.ma.masked_invalid(grid_LS), aspect="auto", origin="lower", cmap="magma",
                       vmin=0.0, vmax=vmax, interpolation="nearest")
        xt = range(0, len(steps), math.ceil(len(steps) / 8))
        ax.set_xticks(xt, [str(steps[j]) for j in xt])
        yt = range(0, len(layers), math.ceil(len(layers) / 12))
        ax.set_yticks(yt, [str(layers[j]) for j in yt])
        ax.set_xlabel("step")
        ax.set_ylabel("layer")
        ax.set_title(f"flip fraction, {PAIR_LABELS[pair]}")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    _save(fig, path)
    return True


def plot_expert_load(h: RoutingHistory, dumps: list[RouteDump], path: str) -> bool:
    plt = _pyplot()
    if dumps:
        d = dumps[-1]
        ids, load_LE = dump_load(d)
        n_LE = load_LE.double()
        share_LE = (n_LE / n_LE.mean(-1, keepdim=True).clamp_min(1e-12)).numpy()
        from matplotlib.colors import TwoSlopeNorm

        fig, ax = plt.subplots(figsize=(min(14.0, max(6.0, 0.12 * n_LE.shape[1] + 3)), min(10.0, max(3.2, 0.2 * len(ids) + 1.8))))
        # white = uniform share (1), blue = under-used (0 = dead), red = overloaded
        im = ax.imshow(share_LE, aspect="auto", origin="lower", cmap="coolwarm", interpolation="nearest",
                       norm=TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, float(share_LE.max()))))
        yt = range(0, len(ids), math.ceil(len(ids) / 16))
        ax.set_yticks(yt, [str(ids[j]) for j in yt])
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_title(f"expert load at step {d.step}: tokens / layer mean")
        fig.colorbar(im, ax=ax, label="1 = uniform, 0 = dead")
    else:
        metrics = [m for m in LOAD_METRICS if h.load_layers(m)]
        if not metrics:
            return False
        fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 3.4), squeeze=False)
        for ax, metric in zip(axes[0], metrics):
            layers = h.load_layers(metric)
            colors = _layer_colors(plt, layers)
            for l in layers:
                s = h.load[(metric, l)]
                ax.plot([x for x, _ in s], [v for _, v in s], color=colors[l], lw=1, label=f"layer {l}")
            ax.set_title(metric)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if len(layers) <= 12:
                ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    _save(fig, path)
    return True


def plot_pairs(h: RoutingHistory, path: str) -> bool:
    metrics = [m for m in DRIFT_METRICS if any((m, p, None) in h.drift for p in PAIRS)]
    per_layer = [p for p in PAIRS if h.layers("flip_frac", p)]
    if not metrics and not per_layer:
        return False
    plt = _pyplot()
    n = len(metrics) + (1 if per_layer else 0)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig, axes_rc = plt.subplots(nrows, ncols, figsize=(4.0 * ncols, 3.0 * nrows), squeeze=False)
    axes = list(axes_rc.flat)
    for ax in axes[n:]:
        ax.set_visible(False)
    style = {"rollout_old": dict(color="tab:orange"), "old_new": dict(color="tab:blue")}
    for ax, metric in zip(axes, metrics):
        for pair in PAIRS:
            s = h.drift.get((metric, pair, None))
            if s:
                ax.plot([x for x, _ in s], [v for _, v in s], label=PAIR_LABELS[pair], **style[pair])
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if per_layer:
        ax = axes[n - 1]
        layers = sorted({l for p in per_layer for l in h.layers("flip_frac", p)})
        width = 0.8 / len(per_layer)
        for j, pair in enumerate(per_layer):
            xs, ys = [], []
            for i, l in enumerate(layers):
                s = h.drift.get(("flip_frac", pair, l))
                if s:
                    xs.append(i + (j - (len(per_layer) - 1) / 2) * width)
                    ys.append(thirds(s)[1])
            ax.bar(xs, ys, width=width, label=PAIR_LABELS[pair], **style[pair])
        step = max(1, len(layers) // 12)
        ax.set_xticks(range(0, len(layers), step), [str(l) for l in layers[::step]])
        ax.set_xlabel("layer")
        ax.set_title("flip_frac per layer, last third")
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    return True


def write_report(run_dir: str, out_dir: str, *, top: int = 5) -> list[str]:
    """Write the plots and ``summary.md`` of ``run_dir`` into ``out_dir``; returns the paths written.
    :class:`ReportError` when the run has no routing metrics or a dump is unreadable."""
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    h = load_history(run_dir)
    dumps = load_dumps(run_dir)
    os.makedirs(out_dir, exist_ok=True)
    makers: dict[str, Callable[[str], bool]] = {
        "flip_frac_layers.png": lambda p: plot_flip_layers(h, p),
        "flip_frac_heatmap.png": lambda p: plot_flip_heatmap(h, p),
        "expert_load.png": lambda p: plot_expert_load(h, dumps, p),
        "drift_pairs.png": lambda p: plot_pairs(h, p),
    }
    plots = [name for name, make in makers.items() if make(os.path.join(out_dir, name))]
    text = summary_markdown(h, dumps, plots, run_dir=run_dir, top=top)
    summary = os.path.join(out_dir, "summary.md")
    replace_file(summary, lambda f: f.write(text.encode()))
    return [os.path.join(out_dir, p) for p in plots] + [summary]
