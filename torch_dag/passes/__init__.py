"""Reserved for the passes subsystem (see DESIGN.md)."""
