"""XKD: cross-architecture knowledge distillation (DESIGN.md section 4)."""
