"""Adapters to external projects, used only by tests and benchmarks (not part of the installed library).

Each subpackage calls an installed upstream package; none holds a copy of upstream code. See README.md.
"""
