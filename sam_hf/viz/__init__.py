"""Figures (matplotlib, the `viz` extra) and PIL overlays."""

from __future__ import annotations

from .overlays import color_labels, contact_sheet, label_colors, overlay
from .plots import (
    compare_runs,
    error_map,
    figure_to_array,
    object_colors,
    plot_automatic_masks,
    plot_base_vs_tuned,
    plot_ground_truth,
    plot_interactive_curve,
    plot_loss_curves,
    save_figure,
    show_box,
    show_mask,
    show_points,
)
from .runs import has_loss_curves, load_trainer_state, metric_summary, runs_table_markdown

__all__ = [
    "color_labels",
    "compare_runs",
    "contact_sheet",
    "error_map",
    "figure_to_array",
    "has_loss_curves",
    "label_colors",
    "load_trainer_state",
    "metric_summary",
    "object_colors",
    "overlay",
    "plot_automatic_masks",
    "plot_base_vs_tuned",
    "plot_ground_truth",
    "plot_interactive_curve",
    "plot_loss_curves",
    "runs_table_markdown",
    "save_figure",
    "show_box",
    "show_mask",
    "show_points",
]
