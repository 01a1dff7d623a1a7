"""`python -m serve_app.batch`: embed, compare and search tables far larger than a sheet.

Submitted to a Ray cluster with `ray job submit --working-dir . -- python -m
serve_app.batch ...`; uses the service's model code, settings and GPU fraction.
"""
