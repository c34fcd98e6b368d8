"""The model builders, the exporters, the development Triton and the modeller's evaluation."""
