"""Running jobs: the executor registry, the worker and its processes, steps and their order,
which pending job runs next, retries that are due, hooks, cancellation and crash recovery.

Above core and out; the executors (``spoold.executors``) are plugins of this layer.
"""
