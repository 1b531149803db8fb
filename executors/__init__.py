"""spoold's built-in executors, installed as ``spoold.executors``; discovered by entry points."""
