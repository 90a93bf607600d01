"""Seam 2, routing: which node holds which device, and node-addressed delivery."""
