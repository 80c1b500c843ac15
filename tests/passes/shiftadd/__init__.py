"""Tests of the shift-add passes (ptool/passes/shiftadd)."""
