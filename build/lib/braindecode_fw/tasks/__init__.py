"""Tasks: plain functions of a composed config (the console scripts are thin wrappers)."""
