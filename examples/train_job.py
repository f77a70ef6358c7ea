"""A training job on the server: scikit-learn's handwritten digits uploaded once as datasets,
an MLP trained by a job that outlives this script, watched as it goes, and its curves plotted.

The job keeps the data beside the compute: no batch crosses the network. It evaluates the
held-out accuracy (argmax, equal, cast, mean) and loss every 100 steps and at the end, and its
history stays on the server with it, so `chainrule watch JOB_ID` or `Job.history()` can read it
again later, from any client.

    python examples/train_job.py                       # 30 epochs, held-out accuracy >= 95%
    python examples/train_job.py --plot job.png        # also draw loss and metrics (needs matplotlib)
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from sklearn.datasets import load_digits

import chainrule.client as cr

HELD_OUT = 297
HIDDEN = 64


def digits() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Training and held-out columns: 8x8 images as 64 float32 pixels in [0, 1], int64 labels."""
    images, labels = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(labels))
    pixels = (images[order] / 16.0).astype(np.float32)
    classes = labels[order].astype(np.int64)
    return (
        {"pixels": pixels[HELD_OUT:], "labels": classes[HELD_OUT:]},
        {"pixels": pixels[:HELD_OUT], "labels": classes[:HELD_OUT]},
    )


def classifier() -> cr.GraphBuilder:
    """64-64-10 with ReLU and dropout; softmax cross-entropy on class labels; accuracy to evaluate."""
    rng = np.random.default_rng(1)
    g = cr.GraphBuilder("digits mlp", default_dtype="float32")
    x = g.input("x", dtype="float32", shape=[-1, 64])
    y = g.input("y", dtype="int64", shape=[-1])
    w1 = g.parameter("w1", (rng.normal(size=(64, HIDDEN)) * np.sqrt(2 / 64)).astype(np.float32))
    b1 = g.parameter("b1", np.zeros(HIDDEN, np.float32))
    w2 = g.parameter("w2", (rng.normal(size=(HIDDEN, 10)) / np.sqrt(HIDDEN)).astype(np.float32))
    b2 = g.parameter("b2", np.zeros(10, np.float32))
    hidden = cr.dropout(cr.relu(x @ w1 + b1), 0.1)
    logits = (hidden @ w2 + b2).named("logits")
    cr.softmax_cross_entropy(logits, y, name="loss")
    right = cr.equal(cr.argmax(logits, axis=1), y)
    cr.mean(cr.cast(right, "float32"), name="accuracy")
    return g


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default=os.environ.get("CHAINRULE_ADDRESS", "127.0.0.1:50051"))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--plot", help="write the loss and metric curves to this PNG (needs matplotlib)")
    args = parser.parse_args()
    train, held_out = digits()
    with cr.Client(args.address) as client:
        graph = client.create_graph(classifier())
        train_set = client.upload_dataset("digits: train", train)
        held_out_set = client.upload_dataset("digits: held out", held_out)
        print(f"uploaded {train_set.num_examples} training and {held_out_set.num_examples} held-out digits")
        job = client.create_job(
            graph.graph_id,
            train_set.dataset_id,
            loss="loss",
            optimizer=cr.Adam(0.01),
            feeds={"x": "pixels", "y": "labels"},
            batch_size=50,
            epochs=args.epochs,
            seed=0,
            evaluation=cr.Evaluation(
                ["accuracy", "loss"], dataset_id=held_out_set.dataset_id, every_steps=100, batch_size=100
            ),
            schedule=cr.Cosine(period_steps=args.epochs * 30, min_learning_rate=0.0005, warmup_steps=20),
        )
        print(f"job {job.job_id}: {job.info().total_steps} steps")
        for event in job.watch():
            if event.state is not None:
                print(f"  {event.state}")
            elif event.metrics:
                held_out = f"held-out loss {event.metrics['loss']:.4f}  accuracy {event.metrics['accuracy']:.3f}"
                print(f"  step {event.step:>4}  epoch {event.epoch:>2}  loss {event.loss:.4f}  {held_out}")
        info = job.info()
        print(f"{info.state} at step {info.step}: held-out accuracy {info.metrics['accuracy']:.1%}")
        if args.plot:
            job.history().plot(args.plot, title="digits MLP: training loss, held-out metrics")
            print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
