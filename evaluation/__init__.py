"""``diffgraph eval``: the paper's results table — methods × prompt sets × metrics, with bootstrap intervals.

``evaluation.methods`` defines the compared methods, ``evaluation.metrics`` the scorers, ``evaluation.prompts``
the prompt sets, ``evaluation.run`` the resumable run and ``evaluation.report`` the table, JSON and HTML.
Imports point downstream: evaluation uses planner, merger and calibration; nothing upstream imports it.
"""
