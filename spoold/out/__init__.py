"""What leaves spoold: the durable outbox of signed callbacks and the sender that delivers it.

Above core; below everything that changes a job's state (each change prepares its delivery).
"""
