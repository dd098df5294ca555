"""Execution backends behind one contract (`engines.base`)."""
