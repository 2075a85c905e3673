"""Merge methods: their parameters as data (`specs`, torch-free) and their functions over tensors."""
