"""The lecture's second example: a 2-layer sigmoid network and its hand-derived gradients.

    a_j = sum_i alpha_ji x_i      z_j = sigmoid(a_j)
    b   = sum_j beta_j z_j        y   = sigmoid(b)
    J   = y* log y + (1 - y*) log(1 - y)

The server differentiates J by reverse propagation; this script prints each gradient next to
the lecture's formula evaluated in numpy. Careful with the lecture's last line: a_j depends on
x_i through every j, so dJ/dx_i = sum_j dJ/da_j * alpha_ji (the slide drops the sum over j).
"""

from __future__ import annotations

import numpy as np
from _common import parse_args

import chainrule.client as cr

M, D = 3, 4  # inputs, hidden units


def build(alpha: np.ndarray, beta: np.ndarray) -> cr.GraphBuilder:
    graph = cr.GraphBuilder("lecture: 2-layer sigmoid network")
    x, y_star = graph.input("x", shape=[M]), graph.input("y_star", shape=[])
    a = cr.matmul(graph.parameter("alpha", alpha), x, name="a")
    z = cr.sigmoid(a, name="z")
    b = cr.matmul(graph.parameter("beta", beta), z, name="b")
    y = cr.sigmoid(b, name="y")
    (y_star * cr.log(y) + (1.0 - y_star) * cr.log(1.0 - y)).named("J")
    return graph


def by_hand(alpha: np.ndarray, beta: np.ndarray, x: np.ndarray, y_star: float) -> dict[str, np.ndarray]:
    """The lecture's backward formulas, one line each, with the sum over j restored for dJ/dx."""
    a = alpha @ x
    z = 1 / (1 + np.exp(-a))
    b = beta @ z
    y = 1 / (1 + np.exp(-b))
    dj_dy = y_star / y + (1 - y_star) / (y - 1)
    dj_db = dj_dy * np.exp(-b) / (np.exp(-b) + 1) ** 2
    dj_dbeta = dj_db * z
    dj_dz = dj_db * beta
    dj_da = dj_dz * np.exp(-a) / (np.exp(-a) + 1) ** 2
    dj_dalpha = np.outer(dj_da, x)
    dj_dx = dj_da @ alpha  # sum over j of dJ/da_j * alpha_ji
    return {"y": y, "b": dj_db, "beta": dj_dbeta, "z": dj_dz, "a": dj_da, "alpha": dj_dalpha, "x": dj_dx}


def main() -> None:
    args = parse_args(__doc__ or "")
    rng = np.random.default_rng(0)
    alpha, beta = rng.normal(size=(D, M)), rng.normal(size=D)
    x, y_star = np.array([0.5, -1.0, 2.0]), 1.0
    expected = by_hand(alpha, beta, x, y_star)
    with cr.Client(args.address) as client:
        info = client.create_graph(build(alpha, beta))
        feeds = {"x": x, "y_star": y_star}
        print(f"y = {float(client.forward(info.graph_id, feeds, ['y'])['y']):.6f} (by hand {expected['y']:.6f})")
        loss, gradients = client.gradients(info.graph_id, feeds, loss="J", wrt=["b", "beta", "z", "a", "alpha", "x"])
        print(f"J = {float(loss):.6f}")
        for name, gradient in gradients.items():
            agrees = np.allclose(gradient, expected[name], rtol=1e-10, atol=1e-12)
            print(f"dJ/d{name} = {np.array2string(np.asarray(gradient), precision=6)}  matches the lecture: {agrees}")
        client.delete_graph(info.graph_id)


if __name__ == "__main__":
    main()
