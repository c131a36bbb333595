"""Benchmark scripts, run as `python benchmarks/<script>.py`; a package only so that
import-linter checks what they import (nothing from tests/)."""
