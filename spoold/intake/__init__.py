"""From a file in incoming/ (or a CLI or API submission) to a pending job, or a rejection with
its reason: the watcher, schema validation, admission and the intake that applies it.

Above schedule (a job with a schedule is accepted as one).
"""
