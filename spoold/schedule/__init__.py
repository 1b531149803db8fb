"""Recurring jobs: triggers and plans (pure), and the APScheduler wrapper that fires them.

Above run (a fired run is a pending job the dispatcher hears of).
"""
