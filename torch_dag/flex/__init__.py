"""Reserved for the flex subsystem (see DESIGN.md)."""
