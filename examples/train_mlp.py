"""Remote training of the lecture's 2-layer sigmoid network, and of a softmax classifier.

The data is generated deterministically here (no download): two interleaving half-moons for
the binary network, three spiral arms for the softmax classifier. Every optimizer step runs on
the server; this script only streams mini-batches and prints the loss as it goes down.

    python examples/train_mlp.py            # both models
    python examples/train_mlp.py --model seed
"""

from __future__ import annotations

import argparse
import os

import numpy as np

import chainrule.client as cr


def two_moons(count: int, noise: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    angles = rng.uniform(0, np.pi, count)
    upper = rng.random(count) < 0.5
    points = np.where(
        upper[:, None],
        np.stack([np.cos(angles), np.sin(angles)], axis=1),
        np.stack([1 - np.cos(angles), 0.5 - np.sin(angles)], axis=1),
    )
    return points + rng.normal(scale=noise, size=points.shape), upper.astype(np.float64)[:, None]


def spirals(count: int, classes: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, classes, count)
    radius = rng.uniform(0.1, 1.0, count)
    angle = labels * 2 * np.pi / classes + radius * 3.0 + rng.normal(scale=0.15, size=count)
    points = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)
    return points, np.eye(classes)[labels]


def seed_network(hidden: int, rng: np.random.Generator) -> cr.GraphBuilder:
    """The lecture's network with a bias column: x_0 = 1 feeds every a_j, z_0 = 1 feeds b."""
    graph = cr.GraphBuilder("seed network on two moons")
    x, y_star = graph.input("x", dtype="float64", shape=[-1, 2]), graph.input("y_star", dtype="float64", shape=[-1, 1])
    alpha = graph.parameter("alpha", rng.normal(scale=1.0, size=(2, hidden)))
    alpha_0 = graph.parameter("alpha_0", np.zeros(hidden))
    beta = graph.parameter("beta", rng.normal(scale=1.0, size=(hidden, 1)))
    beta_0 = graph.parameter("beta_0", np.zeros(1))
    z = cr.sigmoid(x @ alpha + alpha_0, name="z")
    b = (z @ beta + beta_0).named("b")
    cr.sigmoid(b, name="y")
    # -J with J = y* log y + (1 - y*) log(1 - y), computed stably from b rather than from y.
    cr.sigmoid_cross_entropy(b, y_star, name="loss")
    return graph


def softmax_classifier(hidden: int, classes: int, rng: np.random.Generator) -> cr.GraphBuilder:
    graph = cr.GraphBuilder("softmax classifier on spirals")
    x, labels = graph.input("x", dtype="float64", shape=[-1, 2]), graph.input("labels", shape=[-1, classes])
    w1 = graph.parameter("w1", rng.normal(scale=1.0, size=(2, hidden)))
    b1 = graph.parameter("b1", np.zeros(hidden))
    w2 = graph.parameter("w2", rng.normal(scale=0.5, size=(hidden, classes)))
    b2 = graph.parameter("b2", np.zeros(classes))
    logits = (cr.sigmoid(x @ w1 + b1) @ w2 + b2).named("logits")
    cr.softmax_cross_entropy(logits, labels, name="loss")
    return graph


def report(history: cr.History, every: int) -> None:
    for index in range(0, len(history), every):
        window = history.losses[index : index + every]
        print(
            f"  steps {history.steps[index]:>5}-{history.steps[index] + len(window) - 1:<5} loss {np.mean(window):.4f}"
        )


def train_seed(client: cr.Client, rng: np.random.Generator) -> float:
    x, y = two_moons(1200, 0.1, rng)
    info = client.create_graph(seed_network(8, rng))
    print("seed network (2-8-1, sigmoid hidden and output, binary cross-entropy) on two moons:")
    history = client.fit(
        info.graph_id,
        {"x": x[:1000], "y_star": y[:1000]},
        loss="loss",
        optimizer=cr.Adam(0.05),
        batch_size=50,
        epochs=40,
    )
    report(history, 100)
    predicted = client.forward(info.graph_id, {"x": x[1000:]}, ["y"])["y"] > 0.5
    accuracy = float(np.mean(predicted == (y[1000:] > 0.5)))
    print(f"  held-out accuracy {accuracy:.1%}")
    client.delete_graph(info.graph_id)
    return accuracy


def train_softmax(client: cr.Client, rng: np.random.Generator) -> float:
    x, labels = spirals(1500, 3, rng)
    info = client.create_graph(softmax_classifier(32, 3, rng))
    print("softmax classifier (2-32-3, sigmoid hidden, softmax cross-entropy) on three spirals:")
    history = client.fit(
        info.graph_id,
        {"x": x[:1200], "labels": labels[:1200]},
        loss="loss",
        optimizer=cr.Adam(0.03),
        batch_size=60,
        epochs=60,
    )
    report(history, 200)
    logits = client.forward(info.graph_id, {"x": x[1200:]}, ["logits"])["logits"]
    accuracy = float(np.mean(logits.argmax(axis=1) == labels[1200:].argmax(axis=1)))
    print(f"  held-out accuracy {accuracy:.1%}")
    client.delete_graph(info.graph_id)
    return accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default=os.environ.get("CHAINRULE_ADDRESS", "127.0.0.1:50051"))
    parser.add_argument("--model", choices=["seed", "softmax", "both"], default="both")
    args = parser.parse_args()
    rng = np.random.default_rng(2024)
    with cr.Client(args.address) as client:
        if args.model in ("seed", "both"):
            train_seed(client, rng)
        if args.model in ("softmax", "both"):
            train_softmax(client, rng)


if __name__ == "__main__":
    main()
