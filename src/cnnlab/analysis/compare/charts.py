"""The comparison's charts: accuracy against cost with the frontier, and validation curves."""

from __future__ import annotations

from collections import defaultdict

from cnnlab.analysis.compare.groups import Group

MAX_CURVES = 10  # configurations whose learning curves are drawn, best first; more make the plot unreadable
PLOTS = {
    "test_acc_vs_params.png": "Test accuracy vs parameters (mean and 95% interval over seeds; the frontier dashed)",
    "test_acc_vs_epoch_time.png": "Test accuracy vs time per epoch (mean and 95% interval; the frontier dashed)",
    "val_acc_curves.png": "Validation accuracy by epoch (mean over seeds; the band spans the lowest to the highest)",
}


def _plots(groups: list[Group], curves: dict[str, list[list[tuple[int, float]]]]) -> dict[str, bytes]:
    """PNG bytes of each plot in PLOTS. Each configuration keeps one colour across the plots."""
    colors = {g.label: f"C{i % 10}" for i, g in enumerate(groups)}
    return {
        "test_acc_vs_params.png": _scatter(groups, colors, "params", "parameters (log scale)", log_x=True),
        "test_acc_vs_epoch_time.png": _scatter(groups, colors, "epoch_time_s", "time per epoch (s)", log_x=False),
        "val_acc_curves.png": _curves_plot(curves, colors),
    }


def _figure(title: str):
    # A bare Figure renders PNGs with Agg; no pyplot means no GUI backend and no global figure state.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    return fig, ax


def _png(fig) -> bytes:
    """The figure as PNG; its y axis is an accuracy, so it stops just above 1."""
    from cnnlab.training.plots import png  # at first use: `cnnlab compare --help` waits for no matplotlib

    for ax in fig.axes:
        ax.set_ylim(top=min(ax.get_ylim()[1], 1.01))
    return png(fig, dpi=fig.dpi)


def _scatter(groups: list[Group], colors: dict, x_key: str, xlabel: str, log_x: bool) -> bytes:
    """Mean test accuracy against a cost, the 95% interval as error bars, the frontier dashed."""
    fig, ax = _figure(f"Test accuracy vs {xlabel.split(' (')[0]}")
    points = [g for g in groups if getattr(g, x_key) is not None and g.acc]
    for g in points:
        acc = g.acc
        below, above = (acc.mean - acc.ci_low, acc.ci_high - acc.mean) if acc.ci_low is not None else (0, 0)
        ax.errorbar(getattr(g, x_key), acc.mean, yerr=[[below], [above]], fmt="o", color=colors[g.label], capsize=4,
                    markersize=7, zorder=3)
        ax.annotate(f"{g.label} (n={acc.n})", (getattr(g, x_key), acc.mean), xytext=(6, 4), textcoords="offset points",
                    fontsize=9)
    frontier = sorted((getattr(g, x_key), g.acc.mean) for g in points if x_key in g.frontier)
    if len(frontier) > 1:
        ax.step([x for x, _ in frontier], [y for _, y in frontier], where="post", linestyle="--", color="0.4",
                zorder=2, label="Pareto frontier")
        ax.legend(fontsize=9, loc="lower right")
    if log_x and points:
        from matplotlib.ticker import EngFormatter, LogLocator, NullFormatter

        xs = [getattr(g, x_key) for g in points]
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # "224k", not 2.24 x 10^5
        # Within one decade only minor ticks fall in range: label them, but only at 1.5, 2, 3, 5 and 7
        # times a power of ten, at least 0.13 decades apart: the default 2..9 put 800k, 900k and 1M
        # on top of each other. Across decades minor labels would crowd: none.
        ax.xaxis.set_minor_locator(LogLocator(subs=(1.5, 2, 3, 5, 7)))
        ax.xaxis.set_minor_formatter(EngFormatter(sep="") if max(xs) < 10 * min(xs) else NullFormatter())
    if not points:
        ax.text(0.5, 0.5, "no runs with these metrics", ha="center", transform=ax.transAxes)
    ax.margins(x=0.25, y=0.15)  # room for the labels
    ax.set(xlabel=xlabel, ylabel="test accuracy (mean, 95% CI)")
    return _png(fig)


def _curves_plot(curves: dict[str, list[list[tuple[int, float]]]], colors: dict) -> bytes:
    """Per configuration, the mean validation accuracy of its seeds by epoch, and a band from the
    lowest to the highest seed (epochs some seeds lack, after early stopping, average the others)."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = _figure("Validation accuracy by epoch")
    drawn = False
    for label, runs in curves.items():
        by_epoch: dict[int, list[float]] = defaultdict(list)
        for points in runs:
            for epoch, acc in points:
                by_epoch[epoch].append(acc)
        if not by_epoch:
            continue
        epochs = sorted(by_epoch)
        mean = [sum(by_epoch[e]) / len(by_epoch[e]) for e in epochs]
        ax.plot(epochs, mean, marker="o", color=colors[label], label=f"{label} (n={len(runs)})")
        if len(runs) > 1:
            ax.fill_between(epochs, [min(by_epoch[e]) for e in epochs], [max(by_epoch[e]) for e in epochs],
                            color=colors[label], alpha=0.2, linewidth=0)
        drawn = True
    if drawn:
        ax.legend(fontsize=9)
    else:
        ax.text(0.5, 0.5, "no validation history", ha="center", transform=ax.transAxes)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="epoch", ylabel="validation accuracy")
    return _png(fig)

