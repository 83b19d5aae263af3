"""Evaluation: teacher-forced retention, and (later) accuracy, memory and speed of generation."""
