"""XKD: cross-architecture knowledge distillation (docs/design.md)."""
