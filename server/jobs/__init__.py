"""Training jobs: queued in creation order, run by a pool of workers on the engine's training
sessions, reading their batches from the memory-mapped dataset cache, and watched live. No gRPC here.
planning.py decodes and checks specs, manager.py keeps the queue and answers the calls, runner.py
runs the loop of a job's steps, each computed by a StepExecutor (executor.py).

Reproducible by construction: everything a step depends on is a function of what a commit
stores (the graph's parameters, optimizer state and state nodes, the job's step) and of the
spec: the batch of job step `s` comes from epoch `s // batches_per_epoch`, whose order is a
permutation drawn from Philox keyed by (seed, epoch); dropout is keyed by (seed, s); the learning
rate is the schedule's rate of `s`. So a job resumed from its last commit after a crash computes
exactly the steps an uninterrupted run computes.

Durable: every `checkpoint_every` steps and at its end, a job commits the graph's checkpoint,
its own row and the history of the steps since its last commit in one store transaction.
Between commits the history lives in memory (`Job.tail`), where watchers read it; a watcher
that falls behind the tail reads the store instead, so the job never waits for a watcher.
"""

from chainrule.server.jobs.manager import DEFAULT_JOB_WORKERS, JobManager, WatchItem

__all__ = ["DEFAULT_JOB_WORKERS", "JobManager", "WatchItem"]
