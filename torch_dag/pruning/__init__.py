"""Reserved for the pruning subsystem (see DESIGN.md)."""
