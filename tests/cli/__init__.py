"""Tests of the ``bigload`` command (src/bigload/cli)."""
