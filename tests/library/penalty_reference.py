"""NumPy implementations of the L2-SP paper's penalties (eqs. 1-7).

Written from the equations, independently of keras_sp, to check it.
"""

import numpy as np

KERNEL_NAMES = ("kernel", "depthwise_kernel", "pointwise_kernel")


def group_axes(variable_name, layer_class, rank):
    """Output-channel groups; a depthwise kernel's are (channel, multiplier)."""
    depthwise = variable_name == "depthwise_kernel" or (
        variable_name == "kernel" and layer_class.startswith("Depthwise")
    )
    if depthwise:
        return tuple(range(rank - 2))
    return tuple(range(rank - 1))


def shared_penalty(kind, alpha, w, w0, fisher, axes):
    """The shared-part penalty of one variable, as written in the paper."""
    w = np.asarray(w, "float64")
    w0 = np.asarray(w0, "float64")
    f = np.ones_like(w) if fisher is None else np.asarray(fisher, "float64")
    if kind == "l2":  # eq. 1
        return alpha / 2 * np.sum(w**2)
    if kind in ("l2_sp", "l2_sp_fisher"):  # eqs. 2 and 4
        return alpha / 2 * np.sum(f * (w - w0) ** 2)
    if kind == "l1_sp":  # eq. 5
        return alpha * np.sum(np.abs(w - w0))
    # eqs. 6 and 7: alpha * sum_g sqrt(p_g) * sqrt(sum_{j in g} F_j d_j^2)
    squared = f * (w - w0) ** 2
    group_size = int(np.prod([w.shape[a] for a in axes])) if axes else 1
    norms = np.sqrt(np.sum(squared, axis=axes) if axes else squared)
    return alpha * np.sqrt(group_size) * np.sum(norms)


def shared_gradient(kind, alpha, w, w0, fisher, axes):
    """The analytic gradient of `shared_penalty` with respect to w."""
    w = np.asarray(w, "float64")
    w0 = np.asarray(w0, "float64")
    f = np.ones_like(w) if fisher is None else np.asarray(fisher, "float64")
    if kind == "l2":
        return alpha * w
    if kind in ("l2_sp", "l2_sp_fisher"):
        return alpha * f * (w - w0)
    if kind == "l1_sp":
        return alpha * np.sign(w - w0)
    squared = f * (w - w0) ** 2
    group_size = int(np.prod([w.shape[a] for a in axes])) if axes else 1
    norms = np.sqrt(
        np.sum(squared, axis=axes, keepdims=True) if axes else squared
    )
    return alpha * np.sqrt(group_size) * f * (w - w0) / norms
