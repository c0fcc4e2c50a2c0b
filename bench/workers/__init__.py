"""Workload processes: each runs one measured job, started fresh by bench.common.run_worker.

Called as `python -m bench.workers.<name> <spec.json> <result.json>`; the TRL ones import TRL,
the others never do.
"""
