"""The lecture's first example, f(x, y, z) = (x + y) z at x = -2, y = 5, z = -4.

Expected: q = 3, f = -12, df/dq = z = -4, df/dz = q = 3, df/dx = df/dy = df/dq * 1 = -4.
Run a server first (`chainrule serve`), then `python examples/lecture_simple.py`.
"""

from __future__ import annotations

from _common import parse_args

import chainrule.client as cr


def build() -> cr.GraphBuilder:
    graph = cr.GraphBuilder("lecture: f = (x + y) z")
    x, y, z = graph.input("x"), graph.input("y"), graph.input("z")
    q = (x + y).named("q")
    (q * z).named("f")
    return graph


def main() -> None:
    args = parse_args(__doc__ or "")
    with cr.Client(args.address) as client:
        info = client.create_graph(build())
        feeds = {"x": -2.0, "y": 5.0, "z": -4.0}
        print(f"q = {float(client.forward(info.graph_id, feeds, ['q'])['q']):g}")
        stream = client.backward(info.graph_id, feeds, loss="f", wrt=["q", "x", "y", "z"])
        for name, gradient in stream:
            if stream.loss is not None and name == "q":
                print(f"f = {float(stream.loss):g}")
            print(f"df/d{name} = {float(gradient):g}")
        client.delete_graph(info.graph_id)


if __name__ == "__main__":
    main()
